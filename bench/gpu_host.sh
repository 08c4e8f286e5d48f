#!/usr/bin/env bash
# Set up the offline GPU host (no network) for the benchmarks and gpu tests, then run the command given:
#   bash bench/gpu_host.sh python bench/bench_train.py --workdir /tmp/bench ...
# Needs .gpu/bundle.tar.xz (../shared/gpu/build-bundle.sh: unsloth, trl, bitsandbytes, datasets, ...) and
# .gpu/tokenizer.model (the real Mistral tokenizer from the mistral-common wheel), carried with the command.
set -euo pipefail
mkdir -p /tmp/site && [ -d /tmp/site/unsloth ] || tar -C /tmp/site -xJf .gpu/bundle.tar.xz
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export MISTRAL_TOKENIZER_MODEL=$PWD/.gpu/tokenizer.model
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
"$@"
