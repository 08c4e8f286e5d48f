#!/usr/bin/env bash
# Install the CPU stack into a virtualenv (VENV, default .venv), llama.cpp compiled portably and checked
# (scripts/install_llama_cpp.sh) and llama.cpp's converters, then build the offline fixtures: what the smoke run needs,
# nothing from the system's package manager (Go, for the tests only, comes with scripts/test.sh). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first, alone. Without an NVIDIA GPU, the CPU build from PyTorch's CPU wheel index, as PyTorch documents
# (https://pytorch.org/get-started/locally/): the package index's torch for Linux x86-64 is the CUDA build and brings
# about 20 nvidia-*/cuda-* packages and triton (gigabytes). Where that index cannot be reached, pip's own indexes.
TORCH=torch==2.13.0
CPU_INDEX=https://download.pytorch.org/whl/cpu
if nvidia-smi -L >/dev/null 2>&1 || [ -e /proc/driver/nvidia/version ]; then
  "$VENV/bin/python" -m pip install -q "$TORCH"   # an NVIDIA GPU: the package index's build, with CUDA
elif "$VENV/bin/python" -c "import urllib.request as u; u.urlopen('$CPU_INDEX/torch/', timeout=20)" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q --index-url "$CPU_INDEX" "$TORCH"
else
  echo "note: PyTorch's CPU wheel index ($CPU_INDEX) cannot be reached; installing $TORCH from pip's configured" \
       "indexes instead (the CPU build only where they hold it, as a local wheel folder may; else the CUDA build)"
  "$VENV/bin/python" -m pip install -q "$TORCH"
fi
"$VENV/bin/python" -c 'import torch; print(f"torch {torch.__version__}")'
"$VENV/bin/python" -m pip install -q -r requirements-dev.txt
PYTHON="$VENV/bin/python" sh scripts/install_llama_cpp.sh
# (again where .llama.cpp/ predates the LoRA converter)
[ -f .llama.cpp/convert_lora_to_gguf.py ] || PYTHON="$VENV/bin/python" sh scripts/get_llama_cpp_converter.sh
"$VENV/bin/python" -m qlora.fixtures
