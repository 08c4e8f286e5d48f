#!/usr/bin/env bash
# On the offline GPU host (bench/gpu_host/README.md): the GPU install as a user with a working torch gets it. The
# host's preinstalled torch (2.11.0+cu130, driver 580) stands in for Colab's. A fresh virtualenv that sees the host's
# packages, then `sh scripts/install_gpu.sh` with the carried wheels as the only package source; torch must stay the
# host's (same version, same file), the rest is installed, and train_unsloth.py trains 5 steps on a 2-layer stand-in
# of Mistral-7B-Instruct-v0.2 (its exact shape otherwise, random weights, the real tokenizer).
#
#   bash bench/gpu_host/wheels.sh .gpuwheels        # here, once: the wheels (and the tokenizer) to carry
#   bash bench/gpu_install_check.sh .gpuwheels      # on the host, carrying .gpuwheels
set -euo pipefail
cd "$(dirname "$0")/.."
carried=$(realpath "${1:?usage: gpu_install_check.sh WHEELS_DIR}")
work=/tmp/gpu-install-check
rm -rf "$work" && mkdir -p "$work/wheels"
tar -C "$work/wheels" -xJf "$carried/wheels.tar.xz"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

# The virtualenv sees the host's packages: --system-site-packages, or, where the host's python3 is itself a
# virtualenv (whose packages a new one's "system" site would not hold), a .pth file naming its site-packages.
host=python3
"$host" -m venv --system-site-packages "$work/venv" 2>/dev/null ||
  "$host" -m venv --system-site-packages --without-pip --clear "$work/venv"
py=$work/venv/bin/python
if [ "$("$host" -c 'import sys; print(sys.prefix != sys.base_prefix)')" = True ]; then
  "$host" -c 'import site; print("\n".join(site.getsitepackages()))' \
    > "$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/host-site.pth"
fi
"$py" -m pip --version > /dev/null 2>&1 ||
  "$py" "$(ls "$work"/wheels/pip-*.whl)/pip" install -q --no-index "$work"/wheels/pip-*.whl
where_torch() { "$py" -c 'import torch; print(torch.__version__, torch.__file__, torch.cuda.is_available())'; }
before=$(where_torch)
echo "torch before the install: $before"

PIP_NO_INDEX=1 PIP_FIND_LINKS=$work/wheels PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHON=$py sh scripts/install_gpu.sh

after=$(where_torch)
echo "torch after the install: $after"
[ "$before" = "$after" ] || { echo "FAILED: the install replaced the host's torch"; exit 1; }
"$py" - <<'EOF'
import importlib.metadata as m
names = ("torch", "torchvision", "unsloth", "unsloth_zoo", "transformers", "trl", "peft", "bitsandbytes", "xformers",
         "datasets", "gguf")
print("installed: " + ", ".join(f"{n} {m.version(n)}" for n in names))
EOF

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export MISTRAL_TOKENIZER_MODEL=$carried/tokenizer.model
"$py" - "$work" <<'EOF'
import sys
from pathlib import Path
from bench import standins
from qlora import fixtures
work = Path(sys.argv[1])
standins.save_standin(work / "standin", num_layers=2)
fixtures.write_jsonl(work / "sample.jsonl", fixtures.sample_rows())
EOF
"$py" train_unsloth.py --model_name "$work/standin" --dataset "$work/sample.jsonl" --max_steps 5 --save_steps 5 \
  --eval_steps 5 --logging_steps 1 --output_dir "$work/run"
"$py" - "$work/run/metrics.json" <<'EOF'
import json, sys
metrics = json.load(open(sys.argv[1]))
losses = [round(p["loss"], 2) for p in metrics["train_loss"]]
assert metrics["global_step"] == 5, metrics["global_step"]
print(f"PASSED: 5 steps on the host's torch, train loss {losses}, peak {metrics['peak_gpu_memory_gib']:.1f} GiB")
EOF
