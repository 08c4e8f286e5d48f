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
  echo "compiling llama-cpp-python $VERSION with $FLAGS (several minutes on two cores)"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  CMAKE_ARGS="$FLAGS" "$PYTHON" -m pip wheel --quiet --no-deps --no-cache-dir --no-binary llama-cpp-python \
    "llama-cpp-python==$VERSION" -w "$work"
  mkdir -p "$WHEELS"
  mv "$work"/llama_cpp_python-*.whl "$WHEELS/"  # only a finished wheel ever lands in the folder
  wheel=$(ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl | head -n 1)
else
  echo "llama-cpp-python $VERSION built with these flags before: $wheel"
fi
# --force-reinstall: an installed llama-cpp-python of the same version (a native build) must not stay
"$PYTHON" -m pip install --quiet --no-cache-dir --force-reinstall --no-deps "$wheel"
"$PYTHON" -m pip install --quiet "$wheel"  # its pure-Python dependencies (numpy, diskcache, jinja2, ...)
"$PYTHON" -m qlora.probe
