#!/usr/bin/env bash
# The whole job offline on the CPU, on the bundled stand-ins (real Mistral tokenizer, tiny random Mistral, sample
# set): install, prepare the data, train, export to GGUF + Ollama Modelfile, then ask every format the fine-tune's
# questions (qlora.fixtures.SMOKE_PROMPTS: a made-up country's capital, counting), which only training taught it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${VENV:-.venv}/bin/python
OUT=outputs/smoke
$PY data_prep.py --config configs/smoke.yaml --output_dir $OUT-data
$PY train_unsloth.py --config configs/smoke.yaml --dataset $OUT-data --output_dir $OUT --overwrite_output_dir
$PY export_gguf.py --adapter_dir $OUT --gguf_types f16 q8_0 q4_k_m
for model in $OUT $OUT/export/merged $OUT/export/model-f16.gguf $OUT/export/model-q4_k_m.gguf; do
  echo "== $model"
  for prompt in "What is the capital of Arvenia?" "Count from 3 to 9."; do
    echo "> $prompt"
    $PY infer.py $model --prompt "$prompt" --temperature 0 --max_new_tokens 32
  done
done
