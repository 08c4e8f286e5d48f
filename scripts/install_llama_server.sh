#!/bin/sh
# llama.cpp's own server (llama-server), built from the llama.cpp source that llama-cpp-python vendors, at the version
# and with the CPU flags scripts/install_llama_cpp.sh compiles the Python bindings with: so the chat-template engine
# and the tokenizer it runs are those that LM Studio, Jan and `llama-server --jinja` users run, on the same build.
# The tests check the export's GGUF template with it (tests/test_runtimes.py); users can serve a GGUF with it.
#
#   sh scripts/install_llama_server.sh      # PYTHON (default: python) picks the virtualenv it lands in
#
# Statically linked, without the web UI (its assets would be downloaded), kept in the same cache folder as the wheel
# (named after the version and the flags), then copied into the virtualenv's bin/ as llama-server.
set -eu
cd "$(dirname "$0")/.."
. scripts/llama_cpp_flags.sh

PYTHON=${PYTHON:-python}
BIN=$("$PYTHON" -c 'import sys, os; print(os.path.join(sys.prefix, "bin"))')
server="$WHEELS/llama-server"
if [ ! -x "$server" ]; then
  echo "compiling llama-server $VERSION with $FLAGS (a few minutes on two cores)"
  CMAKE=$(command -v cmake || true)
  if [ -z "$CMAKE" ]; then  # no system cmake: PyPI's, in the virtualenv
    "$PYTHON" -m pip install --quiet cmake
    CMAKE="$BIN/cmake"
  fi
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: --no-cache-dir "llama-cpp-python==$VERSION" -d "$work"
  tar -xzf "$work"/llama_cpp_python-"$VERSION".tar.gz -C "$work"
  # shellcheck disable=SC2086  # FLAGS is a list of cmake arguments
  "$CMAKE" -S "$work/llama_cpp_python-$VERSION/vendor/llama.cpp" -B "$work/build" -DCMAKE_BUILD_TYPE=Release $FLAGS \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF >"$work/cmake.log" 2>&1 || { tail -20 "$work/cmake.log"; exit 1; }
  "$CMAKE" --build "$work/build" --target llama-server -j "$(nproc)" >"$work/build.log" 2>&1 \
    || { tail -30 "$work/build.log"; exit 1; }
  mkdir -p "$WHEELS"
  cp "$work/build/bin/llama-server" "$server.tmp" && mv "$server.tmp" "$server"  # only a finished binary lands
else
  echo "llama-server $VERSION built with these flags before: $server"
fi
cp "$server" "$BIN/llama-server"
"$BIN/llama-server" --version 2>&1 | head -n 2
