#!/usr/bin/env bash
# Training speed and plan by card, in one device call of at most about 9 minutes: the 7.24 B stand-in built once, then
# as a T4-class card (8% of the SMs, 15 GiB free) and as a 4090-class card (20%, 23 GiB) our default plan (measured on
# the card: qlora/calibrate.py) beside the stock recipe (Unsloth's notebook with TRL packing), then the cache lookup of
# the T4-class figures, and a second run on the 4090-class card that must find them cached, if time is left.
#   bash bench/train_speed_by_card.sh          # needs .gpu/bundle.tar.xz and .gpu/tokenizer.model (bench/gpu_host/)
#   CARDS=h200 bash bench/train_speed_by_card.sh     # the whole H200 instead, at 15 and 23 GiB free
#   CARDS=whole bash bench/train_speed_by_card.sh    # the whole H200 with all its memory
#   CARDS=4090 bash bench/train_speed_by_card.sh     # the 4090-class card alone, 8 steps (2 untimed), twice
# Everything it prints, and the runs' metrics.json, calibration caches and logs, go to $OUT/train_speed_by_card.tar.gz.
set -uo pipefail
NAME=train_speed_by_card
DATA="--data guanaco_shaped"
source bench/gpu_host/by_card.sh

case ${CARDS:-slow} in
h200)
    bench h200_15_23 $(( $(left) - 15 )) --gpu_memory_gib 15 23 --steps 6 --warmup 2 --stock notebook+packing
    finish ;;
whole)
    bench h200_whole $(( $(left) - 15 )) --steps 6 --warmup 2 --stock notebook+packing
    finish ;;
4090)  # the 4090-class ratio alone, with more timed steps, twice in turn: ours and the stock recipe, then again
    bench 4090_class_a $(( $(left) / 2 )) --gpu_sm_percent 20 --gpu_memory_gib 23 --steps 8 --warmup 2 \
        --stock notebook+packing
    bench 4090_class_b $(( $(left) - 15 )) --gpu_sm_percent 20 --gpu_memory_gib 23 --steps 8 --warmup 2 \
        --stock notebook+packing
    finish ;;
esac

# T4-class: a step takes about 8 s here (12 s for the stock recipe), so 4 steps, the first untimed; a model load
# takes about a minute
bench t4_class $(( $(left) - 215 )) --gpu_sm_percent 8 --gpu_memory_gib 15 --steps 4 --warmup 1 \
    --stock notebook+packing

# the T4-class figures, looked up as train_unsloth.py does, under the same share of the SMs
stop_mps
echo "== cache lookup, 8% of the SMs (at ${SECONDS} s)"
mkdir -p $MPS_PIPE $MPS_LOG
CUDA_MPS_PIPE_DIRECTORY=$MPS_PIPE CUDA_MPS_LOG_DIRECTORY=$MPS_LOG nvidia-cuda-mps-control -d &&
    CUDA_MPS_PIPE_DIRECTORY=$MPS_PIPE CUDA_MPS_LOG_DIRECTORY=$MPS_LOG CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=8 \
    timeout 60 "$PY" -m qlora.calibrate --model_name "$MODEL"
stop_mps

bench 4090_class $(( $(left) - 15 )) --gpu_sm_percent 20 --gpu_memory_gib 23 --steps 5 --warmup 1 \
    --stock notebook+packing

if [ "$(left)" -gt 120 ]; then  # a second run on the 4090-class card: its figures come from the cache
    bench 4090_class_again $(( $(left) - 10 )) --gpu_sm_percent 20 --gpu_memory_gib 23 --steps 4 --warmup 1 \
        --stock '' --ours "ours (default), second run="
fi

finish
