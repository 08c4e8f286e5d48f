# The stages of a "by card" bench (bench/train_speed_by_card.sh, bench/dpo_speed_by_card.sh), sourced by them after
# they set NAME (the bench's name: its log, its tarball and its folders under /tmp are named after it) and DATA (the
# bench_train.py data flags). It sets up the host (env.sh), empties the calibration cache (so that each card's first
# run measures), builds the 7.24 B stand-in once, and sends everything printed to $OUT/$NAME.log; then:
#   bench STAGE SECONDS FLAGS...   one bench_train.py call cut at SECONDS, its rows and runs copied to $OUT/STAGE
#   left                           seconds left of LIMIT_SECONDS (570 by default) for the whole script
#   stop_mps                       stops an MPS daemon a cut-short stage left running
#   finish                         the calibration cache and everything in $OUT into $OUT/$NAME.tar.gz; exits
PY=$(command -v python || command -v python3)  # hosts with only python3
OUT=${OUT:-/tmp/$NAME-out}
LIMIT=${LIMIT_SECONDS:-570}
mkdir -p "$OUT"
left() { echo $((LIMIT - SECONDS)); }
exec > >(tee "$OUT/$NAME.log") 2>&1

source bench/gpu_host/env.sh
export QLORA_MISTRAL_CACHE=/tmp/$NAME-cache
rm -rf "$QLORA_MISTRAL_CACHE"
W=/tmp/$NAME
MODEL=$W/mistral-7b-v0.2-standin
echo "setup: ${SECONDS} s"

[ -f "$MODEL/config.json" ] ||
    "$PY" -c "from pathlib import Path; from bench import standins; standins.save_standin(Path('$MODEL'))"
echo "stand-in: ${SECONDS} s"

export MPS_PIPE=/tmp/qlora-bench-mps-pipe MPS_LOG=/tmp/qlora-bench-mps-log  # bench_train.py's MPS folders
stop_mps() {
    echo quit | CUDA_MPS_PIPE_DIRECTORY=$MPS_PIPE nvidia-cuda-mps-control >/dev/null 2>&1
    sleep 2
}

bench() {
    local name=$1 seconds=$2
    shift 2
    stop_mps
    echo "== $name: $* (up to $seconds s, at ${SECONDS} s)"
    # TERM first: bench_train.py then stops its runs, the memory holder and MPS
    # shellcheck disable=SC2086  # DATA holds several flags
    timeout --signal=TERM --kill-after=60 "$seconds" "$PY" bench/bench_train.py --workdir "$W/$name" \
        --model "$MODEL" $DATA "$@"
    echo "== $name: exit $?, at ${SECONDS} s"
    mkdir -p "$OUT/$name"
    cp "$W/$name/bench_train.json" "$OUT/$name/" 2>/dev/null
    (cd "$W/$name" && find runs \( -name metrics.json -o -name '*.log' -o -name config.yaml \) \
        -exec cp --parents {} "$OUT/$name" \;)
}

finish() {
    cp -r "$QLORA_MISTRAL_CACHE" "$OUT/calibration-cache" 2>/dev/null
    echo "== done at ${SECONDS} s"
    tar -C "$OUT" -czf "/tmp/$NAME.tar.gz" --exclude "$NAME.tar.gz" . && mv "/tmp/$NAME.tar.gz" "$OUT/"
    exit 0
}
