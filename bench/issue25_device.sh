#!/usr/bin/env bash
# Issue 25's figure from the 16-core GPU host in one device call of about 6 minutes: the whole full export
# (merge, f16, q4_k_m, every check) of the 7.24 B stand-in, timed and measured by bench/bench_export_memory.py, as a
# user of that host runs it (its 128 GiB hold the f16 file, so llama.cpp checks it; the reference runs on the GPU).
# Carry .gpu and .llama.cpp (llama.cpp's converter, from scripts/setup.sh). .gpu needs bundle.tar.xz and
# tokenizer.model (bench/gpu_host.sh) and llama.tar.xz: llama-cpp-python as scripts/install_llama_cpp.sh built it here
# (portable: no -march=native; ctypes, so any Python 3 there loads it), with its dist-info (the converter's version
# check reads it) and diskcache, which the host lacks:
#   (cd .venv/lib/python3.11/site-packages && tar -cJf ../../../../.gpu/llama.tar.xz llama_cpp \
#       llama_cpp_python-*.dist-info diskcache diskcache-*.dist-info)
#   bash bench/issue25_device.sh      # output and the table row in $OUT/export16.log
set -euo pipefail
OUT=${OUT:-/tmp/issue25-out}
mkdir -p "$OUT" /tmp/site
tar -C /tmp/site -xJf .gpu/bundle.tar.xz
tar -C /tmp/site -xJf .gpu/llama.tar.xz
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export MISTRAL_TOKENIZER_MODEL=$PWD/.gpu/tokenizer.model
PY=$(command -v python || command -v python3)
echo "cores: $(nproc)"
"$PY" -c "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
timeout 540 "$PY" bench/bench_export_memory.py --workdir /tmp/bm 2>&1 | tee "$OUT/export16.log" | grep -v "converting to"
