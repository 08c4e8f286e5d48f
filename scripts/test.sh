#!/usr/bin/env bash
# Install everything (scripts/setup.sh, then Go for the Modelfile template tests) and run the whole test suite offline
# on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
sh scripts/install_go.sh
"${VENV:-.venv}/bin/python" -m pytest -q "$@"
