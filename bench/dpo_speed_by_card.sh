#!/usr/bin/env bash
# Preference tuning speed by card, in one device call of at most about 9.5 minutes: the 7.24 B stand-in built once,
# then as a T4-class card (8% of the SMs, 15 GiB free) and as a 4090-class card (20%, 23 GiB) our DPO (default plan,
# sequences of up to 1,024 tokens) beside Unsloth's DPO notebook as published (bench/stock_recipes.py dpo_notebook), on
# generated pairs of about 1,000 tokens (bench/standins.py preference_shaped_rows); then, if time is left, whether our
# ORPO fits the T4-class card (2 steps).
#   bash bench/dpo_speed_by_card.sh            # needs .gpu/bundle.tar.xz and .gpu/tokenizer.model (bench/gpu_host/)
#   CARDS=4090 bash bench/dpo_speed_by_card.sh # the 4090-class pair alone, 6 steps (2 untimed)
#   CARDS=t4 bash bench/dpo_speed_by_card.sh   # the T4-class pair alone, 4 steps (1 untimed), then ORPO
# Everything it prints, and the runs' metrics.json, config.yaml and logs, go to $OUT/dpo_speed_by_card.tar.gz.
set -uo pipefail
PY=$(command -v python || command -v python3)  # hosts with only python3
OUT=${OUT:-/tmp/dpo-speed-by-card-out}
LIMIT=${LIMIT_SECONDS:-570}  # seconds for the whole script; each stage gets what is left of it
mkdir -p "$OUT"
left() { echo $((LIMIT - SECONDS)); }
exec > >(tee "$OUT/dpo_speed_by_card.log") 2>&1

source bench/gpu_host/env.sh
export QLORA_MISTRAL_CACHE=/tmp/dpo-speed-by-card-cache  # empty at the start: each card's first run calibrates
rm -rf "$QLORA_MISTRAL_CACHE"
W=/tmp/dpo-speed-by-card
MODEL=$W/mistral-7b-v0.2-standin
DPO="ours dpo=--method dpo --max_seq_length 1024"
echo "setup: ${SECONDS} s"

[ -f "$MODEL/config.json" ] ||
    "$PY" -c "from pathlib import Path; from bench import standins; standins.save_standin(Path('$MODEL'))"
echo "stand-in: ${SECONDS} s"

export MPS_PIPE=/tmp/qlora-bench-mps-pipe  # bench_train.py's MPS folder
stop_mps() {  # a daemon a cut-short stage left running would keep the next one from starting its own
    echo quit | CUDA_MPS_PIPE_DIRECTORY=$MPS_PIPE nvidia-cuda-mps-control >/dev/null 2>&1
    sleep 2
}

bench() {  # NAME SECONDS FLAGS...: one bench_train.py call, cut at SECONDS; its rows and runs go to $OUT/NAME
    local name=$1 seconds=$2
    shift 2
    stop_mps
    echo "== $name: $* (up to $seconds s, at ${SECONDS} s)"
    # TERM first: bench_train.py then stops its runs, the memory holder and MPS. 600 pairs: more than 4 steps take
    # in any plan, and only a few seconds of tokenizing
    timeout --signal=TERM --kill-after=60 "$seconds" "$PY" bench/bench_train.py --workdir "$W/$name" \
        --model "$MODEL" --data preference_shaped --rows 600 "$@"
    echo "== $name: exit $?, at ${SECONDS} s"
    mkdir -p "$OUT/$name"
    cp "$W/$name/bench_train.json" "$OUT/$name/" 2>/dev/null
    (cd "$W/$name" && find runs \( -name metrics.json -o -name '*.log' -o -name config.yaml \) \
        -exec cp --parents {} "$OUT/$name" \;)
}

orpo_fit() {  # our ORPO on the T4-class card, 2 steps logged each: does it fit 15 GiB, what do its rewards do
    bench t4_class_orpo $(( $(left) - 15 )) --gpu_sm_percent 8 --gpu_memory_gib 15 --steps 2 --warmup 0 \
        --stock '' --ours "ours orpo=--method orpo --max_seq_length 1024 --logging_steps 1"
}

finish() {
    cp -r "$QLORA_MISTRAL_CACHE" "$OUT/calibration-cache" 2>/dev/null
    echo "== done at ${SECONDS} s"
    tar -C "$OUT" -czf /tmp/dpo_speed_by_card.tar.gz --exclude dpo_speed_by_card.tar.gz . &&
        mv /tmp/dpo_speed_by_card.tar.gz "$OUT/"
    exit 0
}

case ${CARDS:-both} in
4090)
    bench 4090_class $(( $(left) - 15 )) --gpu_sm_percent 20 --gpu_memory_gib 23 --steps 6 --warmup 2 \
        --stock dpo_notebook --ours "$DPO"
    finish ;;
t4)
    bench t4_class $(( $(left) - 200 )) --gpu_sm_percent 8 --gpu_memory_gib 15 --steps 4 --warmup 1 \
        --stock dpo_notebook --ours "$DPO"
    orpo_fit
    finish ;;
esac

# T4-class: a run's model load and setup take about 70 s, our first run on a card calibrates it (about 50 s more), and a
# DPO step does an SFT step's work and one forward pass more (the reference: the adapter disabled). Unsloth's SFT
# notebook took 14 s a step here for 16,384 tokens; its DPO recipe's steps hold about 16,000 with the padding (8 pairs
# as 16 sequences of up to 1,024 tokens): about 18 s. So 3 steps, the first untimed (about 275 s for the pair), and
# 200 s are kept for the 4090-class pair (about 230 s at its usual length: its runs end before their limit)
bench t4_class $(( $(left) - 200 )) --gpu_sm_percent 8 --gpu_memory_gib 15 --steps 3 --warmup 1 \
    --stock dpo_notebook --ours "$DPO"

bench 4090_class $(( $(left) - 15 )) --gpu_sm_percent 20 --gpu_memory_gib 23 --steps 4 --warmup 1 \
    --stock dpo_notebook --ours "$DPO"

if [ "$(left)" -gt 170 ]; then  # a load, 2 steps and a calibration unless it finds the DPO run's cached
    orpo_fit
fi

finish
