#!/usr/bin/env bash
# Does this tree train and export the smoke run (configs/smoke.yaml, CPU) as another commit does? A refactor must not
# change behaviour: the adapter within 1e-6 (max abs diff over every tensor) and each exported file's verdict the same.
#   bash bench/compare_smoke_run.sh 7bfa61d      # about 5 minutes on two cores; needs scripts/setup.sh done
set -euo pipefail
REF=${1:?usage: bash bench/compare_smoke_run.sh COMMIT}
cd "$(dirname "$0")/.."
HERE=$PWD
PY=$HERE/${VENV:-.venv}/bin/python
WORK=$(mktemp -d)
git worktree add -q --detach "$WORK/ref" "$REF"
trap 'git worktree remove --force "$WORK/ref"; rm -rf "$WORK"' EXIT
ln -s "$HERE/fixtures" "$WORK/ref/fixtures"      # the stand-ins and sample set, built by setup.sh (not in git)
ln -s "$HERE/.llama.cpp" "$WORK/ref/.llama.cpp"  # llama.cpp's converter
for side in ref this; do
  tree=$HERE; [ $side = ref ] && tree=$WORK/ref
  echo "== $side: $(git -C "$tree" rev-parse --short HEAD)"
  (cd "$tree" &&
   $PY data_prep.py --config configs/smoke.yaml --output_dir "$WORK/$side-data" > "$WORK/$side.log" &&
   $PY train_unsloth.py --config configs/smoke.yaml --dataset "$WORK/$side-data" --output_dir "$WORK/$side" \
     >> "$WORK/$side.log" 2>&1 &&
   $PY export_gguf.py --adapter_dir "$WORK/$side" --gguf_types f16 q8_0 q4_k_m >> "$WORK/$side.log" 2>&1) ||
    { tail -n 30 "$WORK/$side.log"; exit 1; }
done
$PY bench/compare_runs.py "$WORK/ref" "$WORK/this"
