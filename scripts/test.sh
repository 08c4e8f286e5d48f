#!/usr/bin/env bash
# Install everything (scripts/setup.sh), plus llama.cpp's own server for the runtime tests (tests/test_runtimes.py),
# and run the whole test suite offline on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PYTHON="${VENV:-.venv}/bin/python" sh scripts/install_llama_server.sh
"${VENV:-.venv}/bin/python" -m pytest -q "$@"
