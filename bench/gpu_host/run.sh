#!/usr/bin/env bash
# Run a command on the offline GPU host (no network) after its setup (env.sh; what to carry: README.md beside it):
#   bash bench/gpu_host/run.sh python bench/bench_train.py --workdir /tmp/bench ...
set -euo pipefail
source "$(dirname "$0")/env.sh"
"$@"
