#!/usr/bin/env bash
# Build, here, the wheels that bench/gpu_install_check.sh installs from on the offline GPU host (README.md):
# requirements.txt resolved as scripts/install_gpu.sh resolves it there (the host's torch 2.11.0 and torchvision 0.26.0
# as constraints), downloaded as CPython 3.12 manylinux x86-64 wheels, less what the host already has (torch with its
# CUDA libraries and dependencies, transformers, numpy, pandas, pyarrow, matplotlib's dependencies; peft, accelerate
# and tokenizers travel, as the host's versions need not be the pinned ones), then packed into one archive to fit
# what the device tool carries (64 MiB). Two wheels are trimmed and repacked, their RECORD rewritten to match:
# bitsandbytes keeps only its CUDA 13.0 and CPU libraries, Unsloth drops its web studio (as
# ../shared/gpu/build-bundle.sh does). The real Mistral tokenizer goes beside them.
#
#   bash bench/gpu_host/wheels.sh /work/main/.gpuwheels    # here, a few minutes; writes wheels.tar.xz, tokenizer.model
set -euo pipefail
cd "$(dirname "$0")/../.."
out=$(realpath -m "${1:?usage: wheels.sh OUT_DIR}")
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
printf 'torch==2.11.0\ntorchvision==0.26.0\n' > "$work/host.txt"
"$python" -m pip install -q --dry-run --ignore-installed --report "$work/report.json" -r requirements.txt \
  -c "$work/host.txt"
"$python" - "$work" <<'EOF'
import json, re, sys
work = sys.argv[1]
on_host = re.compile(r"(torch|triton|nvidia-.*|cuda-.*|torchvision|transformers|numpy|pandas|pyarrow|sympy|networkx"
                     r"|mpmath|pillow|fonttools|kiwisolver|contourpy|cycler|pyparsing|python-dateutil)")
resolved = [(i["metadata"]["name"], i["metadata"]["version"])
            for i in json.load(open(f"{work}/report.json"))["install"]]
carry = [f"{n}=={v}\n" for n, v in resolved if not on_host.fullmatch(n.lower().replace("_", "-"))]
open(f"{work}/carry.txt", "w").write("".join(carry) + "pip\n")
print(f"{len(carry)} of {len(resolved)} resolved packages to carry, and pip")
EOF
platforms=()
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$work/whl" -r "$work/carry.txt"
"$python" - "$work/whl" <<'EOF'
import base64, hashlib, re, sys, zipfile
from pathlib import Path

def trim(wheel: Path, drop) -> None:
    """Rewrite `wheel` without the members `drop` selects, and its RECORD without their lines."""
    trimmed = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as old, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as new:
        for info in old.infolist():
            if drop(info.filename):
                continue
            data = old.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = "".join(line for line in data.decode().splitlines(keepends=True)
                               if not drop(line.split(",")[0])).encode()
            new.writestr(info, data)
    print(f"{wheel.name}: {wheel.stat().st_size >> 20} -> {trimmed.stat().st_size >> 20} MiB")
    trimmed.replace(wheel)

folder = Path(sys.argv[1])
trim(next(folder.glob("bitsandbytes-*.whl")),
     lambda name: bool(re.search(r"libbitsandbytes_(?!cuda130|cpu)\w+\.so$", name)))
trim(next(folder.glob("unsloth-2026*.whl")), lambda name: name.startswith("studio/"))
EOF
mkdir -p "$out"
tar -C "$work/whl" -cf - . | xz -T2 -6 > "$out/wheels.tar.xz.tmp" && mv "$out/wheels.tar.xz.tmp" "$out/wheels.tar.xz"
tokenizer='import shutil, sys; from qlora.fixtures import mistral_tokenizer_model as m; shutil.copy(m(), sys.argv[1])'
"$python" -c "$tokenizer" "$out/tokenizer.model"
echo "wrote $out: $(ls "$work/whl" | wc -l) wheels, $(du -sh "$out" | cut -f1)"
