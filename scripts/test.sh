#!/usr/bin/env bash
# Install everything (scripts/setup.sh), then what only the tests need: Go (Ollama's template engine) and llama.cpp's
# own server (tests/test_runtimes.py), and run the whole test suite offline on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
sh scripts/install_go.sh
PYTHON="${VENV:-.venv}/bin/python" sh scripts/install_llama_server.sh
"${VENV:-.venv}/bin/python" -m pytest -q "$@"
