#!/usr/bin/env bash
# The whole full export's time and memory on the 16-core GPU host, in one device call of about 6 minutes: the export
# (merge, f16, q4_k_m, every check) of the 7.24 B stand-in, timed and measured by bench/bench_export_memory.py, as a
# user of that host runs it (its 128 GiB hold the f16 file, so llama.cpp checks it; the reference runs on the GPU).
# Carry .gpu (bundle.tar.xz, tokenizer.model and llama.tar.xz: bench/gpu_host/README.md) and .llama.cpp (llama.cpp's
# converter, from scripts/setup.sh):
#   bash bench/export_memory_on_gpu_host.sh      # output and the table row in $OUT/export16.log
set -euo pipefail
OUT=${OUT:-/tmp/export-memory-out}
mkdir -p "$OUT"
source bench/gpu_host/env.sh
tar -C /tmp/site -xJf .gpu/llama.tar.xz
PY=$(command -v python || command -v python3)
echo "cores: $(nproc)"
"$PY" -c "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
timeout 540 "$PY" bench/bench_export_memory.py --workdir /tmp/bm 2>&1 | tee "$OUT/export16.log" | grep -v "converting to"
