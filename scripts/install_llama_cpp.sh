#!/bin/sh
# llama-cpp-python (llama.cpp for export checks, quantization and GGUF inference), compiled so that it runs on any
# x86-64 machine with AVX2 rather than only on the machine that built it, then checked (python -m qlora.probe).
#
#   sh scripts/install_llama_cpp.sh         # PYTHON (default: python) picks the interpreter / virtualenv
#
# Why not `pip install llama-cpp-python`: pip compiles it with llama.cpp's default GGML_NATIVE=ON (-march=native), so
# the library uses every instruction the build machine's CPU advertises (AVX-512, AMX). On a machine without them, or
# whose kernel does not grant them, quantized GGUF files die with SIGILL. And pip caches that wheel by source archive,
# not by flags or CPU, so the next machine reuses it. Here the flags are fixed (scripts/llama_cpp_flags.sh), the build
# never reads or writes pip's cache, and the wheel is kept in a folder whose name carries the version and a hash of the
# flags: a rerun with the same flags reinstalls it instead of compiling again.
set -eu
cd "$(dirname "$0")/.."
. scripts/llama_cpp_flags.sh

PYTHON=${PYTHON:-python}

wheel=$(ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
  mkdir -p "$WHEELS"
  log="$WHEELS/build.log"
  echo "compiling llama-cpp-python $VERSION with $FLAGS (several minutes on two cores; log: $log)"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  # pip's verbose output carries the build's own `[step/steps]` lines (ninja): the log keeps them all and every tenth
  # of the way is shown, so that a compile of several minutes shows it is moving
  { CMAKE_ARGS="$FLAGS" "$PYTHON" -m pip wheel --verbose --no-deps --no-cache-dir --no-binary llama-cpp-python \
      "llama-cpp-python==$VERSION" -w "$work" 2>&1; echo $? >"$work/status"; } | tee "$log" | awk '
    match($0, /\[[0-9]+\/[0-9]+\]/) {
      split(substr($0, RSTART + 1, RLENGTH - 2), step, "/")
      tenth = int(10 * step[1] / step[2])
      if (tenth > shown) { shown = tenth; printf "  compiling: %d%% (%d of %d steps)\n", 10 * tenth, step[1], step[2]; fflush() }
    }'
  if [ "$(cat "$work/status")" != 0 ]; then
    tail -n 20 "$log"
    echo "error: compiling llama-cpp-python $VERSION failed (its last lines above; the whole log: $log)"
    exit 1
  fi
  mv "$work"/llama_cpp_python-*.whl "$WHEELS/"  # only a finished wheel ever lands in the folder
  wheel=$(ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl | head -n 1)
else
  echo "llama-cpp-python $VERSION built with these flags before: $wheel"
fi
# --force-reinstall: an installed llama-cpp-python of the same version (a native build) must not stay
"$PYTHON" -m pip install --quiet --no-cache-dir --force-reinstall --no-deps "$wheel"
"$PYTHON" -m pip install --quiet "$wheel"  # its pure-Python dependencies (numpy, diskcache, jinja2, ...)
"$PYTHON" -m qlora.probe
