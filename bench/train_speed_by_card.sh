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
PY=$(command -v python || command -v python3)  # hosts with only python3
OUT=${OUT:-/tmp/train-speed-by-card-out}
LIMIT=${LIMIT_SECONDS:-570}  # seconds for the whole script; each stage gets what is left of it
mkdir -p "$OUT"
left() { echo $((LIMIT - SECONDS)); }
exec > >(tee "$OUT/train_speed_by_card.log") 2>&1

source bench/gpu_host/env.sh
export QLORA_MISTRAL_CACHE=/tmp/train-speed-by-card-cache  # empty at the start, so that the first runs measure
rm -rf "$QLORA_MISTRAL_CACHE"
W=/tmp/train-speed-by-card
MODEL=$W/mistral-7b-v0.2-standin
echo "setup: ${SECONDS} s"

[ -f "$MODEL/config.json" ] ||
    "$PY" -c "from pathlib import Path; from bench import standins; standins.save_standin(Path('$MODEL'))"
echo "stand-in: ${SECONDS} s"

export MPS_PIPE=/tmp/qlora-bench-mps-pipe MPS_LOG=/tmp/qlora-bench-mps-log  # bench_train.py's MPS folders
stop_mps() {  # a daemon a cut-short stage left running would keep the next one from starting its own
    echo quit | CUDA_MPS_PIPE_DIRECTORY=$MPS_PIPE nvidia-cuda-mps-control >/dev/null 2>&1
    sleep 2
}

bench() {  # NAME SECONDS FLAGS...: one bench_train.py call, cut at SECONDS; its rows and runs go to $OUT/NAME
    local name=$1 seconds=$2
    shift 2
    stop_mps
    echo "== $name: $* (up to $seconds s, at ${SECONDS} s)"
    # TERM first: bench_train.py then stops its runs, the memory holder and MPS
    timeout --signal=TERM --kill-after=60 "$seconds" "$PY" bench/bench_train.py --workdir "$W/$name" \
        --model "$MODEL" --data guanaco_shaped "$@"
    echo "== $name: exit $?, at ${SECONDS} s"
    mkdir -p "$OUT/$name"
    cp "$W/$name/bench_train.json" "$OUT/$name/" 2>/dev/null
    (cd "$W/$name" && find runs \( -name metrics.json -o -name '*.log' -o -name config.yaml \) \
        -exec cp --parents {} "$OUT/$name" \;)
}

finish() {
    cp -r "$QLORA_MISTRAL_CACHE" "$OUT/calibration-cache" 2>/dev/null
    echo "== done at ${SECONDS} s"
    tar -C "$OUT" -czf /tmp/train_speed_by_card.tar.gz --exclude train_speed_by_card.tar.gz . &&
        mv /tmp/train_speed_by_card.tar.gz "$OUT/"
    exit 0
}

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
