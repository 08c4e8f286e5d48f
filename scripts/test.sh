#!/usr/bin/env bash
# Install everything (scripts/setup.sh) and run the whole test suite offline on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
"${VENV:-.venv}/bin/python" -m pytest -q "$@"
