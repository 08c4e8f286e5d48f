#!/bin/sh
# The GPU install: keeps a torch that already uses the GPU (Colab's, yours) and installs requirements.txt against
# it, or installs the pinned torch built for the CUDA that this machine's driver runs, then the rest; it prints what it
# chose and why. The decision is qlora/gpu_install.py's (tests/test_gpu_install.py). PYTHON picks the interpreter.
#   sh scripts/install_gpu.sh
cd "$(dirname "$0")/.." || exit 1
exec "${PYTHON:-python3}" -m qlora.gpu_install
