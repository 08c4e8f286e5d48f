#!/usr/bin/env bash
# The whole job offline on the CPU, on the bundled stand-ins (real Mistral tokenizer, tiny random Mistral, sample
# set): install, prepare the data, train, export to GGUF + Ollama Modelfile, and answer a prompt from each format.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${VENV:-.venv}/bin/python
OUT=outputs/smoke
$PY data_prep.py --config configs/smoke.yaml --output_dir $OUT-data
$PY train_unsloth.py --config configs/smoke.yaml --dataset $OUT-data --output_dir $OUT --overwrite_output_dir
$PY export_gguf.py --adapter_dir $OUT --gguf_types f16 q8_0 q4_k_m
for model in $OUT $OUT/export/merged $OUT/export/model-f16.gguf; do
  $PY infer.py $model --prompt "Count from 3 to 9." --temperature 0 --max_new_tokens 24
done
