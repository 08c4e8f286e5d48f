"""Peak memory and time of the whole full export, `export_gguf.py --gguf_types f16 q4_k_m` (merge, f16 conversion,
q4_k_m quantization and every check against the merged model), of a random stand-in of Mistral-7B-Instruct-v0.2's
shape with a random r 8 adapter on all 7 projections. Measured around export_gguf.py's process and every process it
starts (bench/peak_memory.py): the largest RSS of one process (ru_maxrss, as /usr/bin/time -v prints it: memory-mapped
GGUF pages included) and the most anonymous memory the whole tree held at once.

    python bench/bench_export_memory.py --workdir /scratch/bm                    # 7.24 B: about 50 GB of disk
    python bench/bench_export_memory.py --workdir /scratch/bm --cpus 0,1         # the same on 2 cores (taskset)
    python bench/bench_export_memory.py --workdir /scratch/bm --cpus 0,1 --ram_gib 12.7   # as in a Colab session
    python bench/bench_export_memory.py --layers 4 --workdir /tmp/bm             # a quick 4-layer stand-in
    python bench/bench_export_memory.py --layers 4 --workdir /tmp/bm --repo /old/checkout   # another checkout's export

--ram_gib runs the export in a memory cgroup of that limit (root, cgroup v1 or v2): as on a machine with that much RAM,
page cache included, which the kernel then evicts against the limit; the export sees the limit too (qlora/ram.py).
The stand-in and its adapter are built once in --workdir and reused; the export goes to WORKDIR/export-N (removed
after unless --keep). Prints a markdown table row for bench/RESULTS.md.
"""

import argparse
import datetime
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_export import device, versions  # noqa: E402  (after the path insert, like the scripts it benchmarks)
from peak_memory import measure, memory_cgroup  # noqa: E402
from qlora import hub  # noqa: E402
import standins  # noqa: E402


def parse():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32, help="stand-in layers (32: the full 7.24 B model)")
    parser.add_argument("--workdir", required=True, help="folder for the stand-in, its adapter and the export")
    parser.add_argument("--cpus", help="run the export on these cores only (taskset -c, e.g. 0,1 as on Colab)")
    parser.add_argument("--ram_gib", type=float, help="run the export in a memory cgroup of this limit (12.7: Colab)")
    parser.add_argument("--repo", default=str(ROOT), help="the checkout whose export_gguf.py runs (default: this)")
    parser.add_argument("--gguf_types", nargs="+", default=["f16", "q4_k_m"])
    parser.add_argument("--keep", action="store_true", help="keep the export folder")
    args = parser.parse_args()
    if args.ram_gib is not None and args.ram_gib <= 0:
        parser.error(f"--ram_gib {args.ram_gib:g}: give the RAM limit in GiB, above 0 (12.7 for a Colab session)")
    return args


def build_inputs(workdir: Path, layers: int) -> tuple[Path, Path]:
    """The stand-in (bf16, in 5 GB shards as on the hub; built on the GPU when there is one) and its random adapter."""
    import torch

    base, adapter = workdir / f"base-{layers}", workdir / f"adapter-{layers}"
    if not (base / "config.json").exists():
        standins.save_standin(base, num_layers=layers, device="cuda" if torch.cuda.is_available() else "cpu")
    if not (adapter / "adapter_config.json").exists():
        standins.save_random_adapter(base, adapter)
    return base, adapter


def main() -> None:
    args = parse()
    workdir = Path(args.workdir)
    base, adapter = build_inputs(workdir, args.layers)
    n = hub.parameter_count(str(base))
    out = workdir / f"export-{args.layers}"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "export_gguf.py", "--adapter_dir", str(adapter), "--export_dir", str(out),
               "--gguf_types", *args.gguf_types]
    if args.cpus:
        command = ["taskset", "-c", args.cpus] + command
    with memory_cgroup(args.ram_gib) as (prefix, cgroup_peak):
        run = measure(prefix + command, cwd=args.repo)
        held = cgroup_peak()
    for what, processes in (("anonymous", run.at_peak), ("RSS", run.at_rss_peak)):
        print(f"at the {what} peak: " + "; ".join(f"{size / 2**30:.2f} GiB {cmd[:90]}" for size, cmd in processes[:4]))
    if run.returncode != 0:
        sys.exit(f"error: the export exited with {run.returncode}")
    commit = subprocess.run(["git", "-C", args.repo, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    cores = len(args.cpus.split(",")) if args.cpus else len(os.sched_getaffinity(0))
    ram = "all" if args.ram_gib is None else f"{args.ram_gib:g} GiB (peak {held / 2**30:.2f}, page cache included)"
    print("\n| device | date | commit | layers | params | cores | RAM | types | whole export | peak anonymous (tree) "
          "| largest RSS (one process) | peak RSS (tree) | versions |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {device()} | {datetime.date.today()} | {commit} | {args.layers} | {n / 1e9:.2f} B | {cores} | {ram} "
          f"| {' '.join(args.gguf_types)} | {run.seconds:.0f} s | {run.peak_anon / 2**30:.2f} GiB "
          f"| {run.max_rss / 2**30:.2f} GiB | {run.peak_tree_rss / 2**30:.2f} GiB | {versions()} |")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
