#!/usr/bin/env bash
# The cost of samples during training on a T4-class card (8% of an H200's SMs, 15 GiB free), in one device call:
# the 7.24 B stand-in, 2,000 Guanaco-shaped rows with 2% held out, our default plan with the default samples
# (3 prompts of the eval split, 64 new tokens) and without them (--sample_count 0), evaluating every 2 steps (4 steps: 3 rounds of samples).
#   bash bench/samples_cost.sh        # needs .gpu/bundle.tar.xz and .gpu/tokenizer.model (bench/gpu_host/README.md)
set -uo pipefail
PY=$(command -v python || command -v python3)
OUT=${OUT:-/tmp/samples-cost-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/samples_cost.log") 2>&1
source bench/gpu_host/env.sh
W=/tmp/samples-cost
MODEL=$W/mistral-7b-v0.2-standin
[ -f "$MODEL/config.json" ] ||
    "$PY" -c "from pathlib import Path; from bench import standins; standins.save_standin(Path('$MODEL'))"
export MPS_PIPE=/tmp/qlora-bench-mps-pipe MPS_LOG=/tmp/qlora-bench-mps-log
EVAL="--eval_fraction 0.02 --eval_steps 2"
timeout --signal=TERM --kill-after=30 ${LIMIT_SECONDS:-530} "$PY" bench/bench_train.py --workdir "$W" --model "$MODEL" --data guanaco_shaped --stock '' --steps 4 --warmup 1 \
    --gpu_sm_percent 8 --gpu_memory_gib 15 --ours "with=$EVAL" --ours "without=$EVAL --sample_count 0"
R=$W/runs/8sm_15/guanaco_shaped
"$PY" bench/samples_cost.py "$R/with" "$R/without"
for run in with without; do
  mkdir -p "$OUT/$run" && cp "$R/$run"/{metrics.json,config.yaml} "$R/$run.log" "$OUT/$run/" 2>/dev/null
done
