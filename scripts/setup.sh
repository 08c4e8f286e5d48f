#!/usr/bin/env bash
# Install the CPU stack into a virtualenv (VENV, default .venv), llama.cpp compiled portably and checked
# (scripts/install_llama_cpp.sh), llama.cpp's converters and Go (the Modelfile test renders templates with Go's
# text/template, as Ollama does), then build the offline fixtures. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q torch==2.13.0   # first, alone: the CPU build (a plain `torch` pulls CUDA)
"$VENV/bin/python" -m pip install -q -r requirements-dev.txt
PYTHON="$VENV/bin/python" sh scripts/install_llama_cpp.sh
# (again where .llama.cpp/ predates the LoRA converter)
[ -f .llama.cpp/convert_lora_to_gguf.py ] || PYTHON="$VENV/bin/python" sh scripts/get_llama_cpp_converter.sh
if ! command -v go >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && apt-get install -y -qq golang-go >/dev/null
fi
"$VENV/bin/python" -m qlora.fixtures
