#!/usr/bin/env bash
# Carry the GPU install as users get it to the offline GPU host (README.md): resolve requirements.txt as
# `pip install -r requirements.txt` would (pip --dry-run --report, nothing installed), download every resolved package
# for CPython 3.12 on Linux x86-64 except torch, triton and the CUDA libraries (the host's own torch 2.11 + cu130
# stands in for them), and pack them unpacked into one archive, as ../shared/gpu/build-bundle.sh does for its subset
# (bitsandbytes keeps only its CUDA 13.0 and CPU libraries; Unsloth's web studio is left out).
#
#   bash bench/gpu_host/resolved_set.sh .gpu/resolved.tar.xz [HOST_PACKAGES]
#   on the host: mkdir -p /tmp/site && tar -C /tmp/site -xJf .gpu/resolved.tar.xz && export PYTHONPATH=/tmp/site
#
# HOST_PACKAGES: a file of package names the host image already holds (one a line), left out to keep the archive
# within what the device tool carries. The archive holds resolved.txt (name==version of everything pip resolved), so
# the host can report which of the packages it supplies itself differ from what a user would get.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=$(realpath -m "${1:?usage: resolved_set.sh OUT.tar.xz [HOST_PACKAGES]}")
host_packages=$(realpath -m "${2:-/dev/null}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# torch as scripts/install_gpu.sh installs it where none fits the GPU (requirements.txt states only the range)
printf 'torch==2.11.0\ntorchvision==0.26.0\n' > "$work/torch.txt"
python3 -m pip install -q --dry-run --ignore-installed --report "$work/report.json" -r requirements.txt \
  -c "$work/torch.txt"
mkdir "$work/site"
python3 - "$work" "$host_packages" <<'EOF'
import json, sys
work = sys.argv[1]
resolved = sorted((i["metadata"]["name"], i["metadata"]["version"]) for i in json.load(open(f"{work}/report.json"))["install"])
open(f"{work}/site/resolved.txt", "w").write("".join(f"{n}=={v}\n" for n, v in resolved))
def canonical(name):
    return name.lower().replace("_", "-").replace(".", "-")
host = {canonical(line.strip()) for line in open(sys.argv[2]) if line.strip()}
def cuda(name):  # the host's CUDA build of torch 2.11 and its libraries
    return name.lower() in ("torch", "triton") or name.lower().startswith(("nvidia", "cuda"))
carry = [(n, v) for n, v in resolved if not cuda(n) and canonical(n) not in host]
open(f"{work}/carry.txt", "w").write("".join(f"{n}=={v}\n" for n, v in carry))
EOF
platforms=()
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$work/whl" -r "$work/carry.txt"
for w in "$work"/whl/*.whl; do python3 -m zipfile -e "$w" "$work/site"; done
rm -rf "$work/site/studio"
find "$work/site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*cuda130*' ! -name '*cpu*' -delete
find "$work/site" -name __pycache__ -prune -exec rm -rf {} +
tar -C "$work/site" -cf - . | xz -T2 -6 > "$out.tmp" && mv "$out.tmp" "$out"
echo "wrote $out ($(du -h "$out" | cut -f1)), $(wc -l < "$work/carry.txt") packages of $(wc -l < "$work/site/resolved.txt")"
