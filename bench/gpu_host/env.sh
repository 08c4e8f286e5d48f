# The offline GPU host's setup, sourced from the repository root by every script that runs there (README.md beside
# this file says what to carry): the packages of .gpu/bundle.tar.xz unpacked once under /tmp/site and put on
# PYTHONPATH, the hub and datasets offline, the real Mistral tokenizer from .gpu/tokenizer.model (the host has no
# mistral-common), and the card printed. It sets no shell options: the scripts that source it keep their own.
mkdir -p /tmp/site
[ -d /tmp/site/unsloth ] || tar -C /tmp/site -xJf .gpu/bundle.tar.xz
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export MISTRAL_TOKENIZER_MODEL=$PWD/.gpu/tokenizer.model
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader
