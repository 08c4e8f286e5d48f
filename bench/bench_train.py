"""Training speed on a CUDA host: this project's recipe (through train_unsloth.py itself) against the stock recipes,
on the same variable-length data, in one run.

    python bench/bench_train.py --workdir /tmp/bench                       # builds the 7.24 B stand-in, both data sets
    python bench/bench_train.py --workdir /tmp/bench --data my_rows.jsonl  # your own rows
    python bench/bench_train.py --workdir /tmp/bench --ours "nogc=--gradient_checkpointing false"  # variants of ours
    python bench/bench_train.py --workdir /tmp/bench --gpu_memory_gib 15 23   # as on a 16 GB and a 24 GB card
    python bench/bench_train.py --workdir /tmp/bench --nproc 1 2 --stock ''   # 1 and 2 GPUs (torchrun), for scaling
    python bench/bench_train.py --workdir /tmp/bench --gpu_sm_percent 8 --gpu_memory_gib 15   # as on a T4
    python bench/bench_train.py --workdir /tmp/bench --data preference_shaped --stock dpo_notebook --ours \\
        "ours dpo=--method dpo --max_seq_length 1024"   # DPO, ours against Unsloth's DPO notebook

--gpu_memory_gib N: a second process holds all of the GPU but N GiB for the length of the runs, so every recipe, and
torch.cuda.mem_get_info (which the toolkit's planner reads), sees a card of N GiB free. (set_per_process_memory_fraction
would cap the allocator without changing what mem_get_info reports, so the planner would not see it.)

--gpu_sm_percent P: every recipe runs with P% of the GPU's SMs, as on a slower card: the bench starts the CUDA
multi-process service (MPS; pipe and log folders under /tmp), runs every process with
CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=P, and stops the service at the end, also after an error. No GPU setting changes.

Each recipe runs in its own process (Unsloth patches libraries on import). Real tokens are the non-padding ones;
throughput is taken over the optimizer steps after the warm-up ones. Prints a markdown table for bench/RESULTS.md.
"""

import argparse
import contextlib
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STOCK = {"notebook": ["notebook"], "notebook+packing": ["notebook", "--packing"], "blog": ["blog"],
         "dpo_notebook": ["dpo_notebook"], "orpo_notebook": ["orpo_notebook"]}
INSTRUCTION_SETS = ["sample", "guanaco_shaped"]


def parse():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="scratch folder: stand-in model, data, run outputs")
    parser.add_argument("--model", help="base model folder (default: build the 7.24 B stand-in in the workdir)")
    parser.add_argument("--layers", type=int, default=32, help="stand-in layers (fewer for a quick check)")
    parser.add_argument("--data", action="append", help="data file, or 'sample' / 'guanaco_shaped' for the "
                        "generated instruction sets (default: both), 'preference_shaped' for generated preference "
                        "pairs of about 1,000 tokens (for --method dpo/orpo and the stock dpo_notebook, "
                        "orpo_notebook)")
    parser.add_argument("--rows", type=int, default=2000, help="rows of each generated set: enough that an epoch has "
                        "many steps, as on Guanaco's 9,846 (250 rows make 14, one of them a part-filled remainder)")
    parser.add_argument("--ours", action="append", default=[], help='NAME="flags for train_unsloth.py"; '
                        'default: one run of the default recipe')
    parser.add_argument("--stock", default="notebook,notebook+packing,blog", help="stock recipes to run ('' none)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    parser.add_argument("--nproc", type=int, nargs="+", default=[1],
                        help="run ours with each of these numbers of processes (GPUs), e.g. 1 2: tokens/s summed over them")
    parser.add_argument("--gpu_memory_gib", type=float, nargs="+", default=[None],
                        help="run every recipe with only this much GPU memory free (several sizes: one pass each)")
    parser.add_argument("--gpu_sm_percent", type=int, help="run every recipe with only this share of the GPU's SMs "
                        "(MPS; with --gpu_memory_gib, a slower and smaller card)")
    return parser.parse_args()


def prepare_inputs(args, workdir: Path) -> tuple[Path, list[Path]]:
    import standins
    from qlora import fixtures

    model = Path(args.model) if args.model else workdir / "mistral-7b-v0.2-standin"
    if not (model / "config.json").exists():  # in another process: this one stays off the GPU (and out of MPS)
        build = f"from bench import standins; standins.save_standin({str(model)!r}, num_layers={args.layers})"
        subprocess.run([sys.executable, "-c", build], cwd=ROOT, check=True)
    generated = {"sample": fixtures.sample_rows, "guanaco_shaped": standins.guanaco_shaped_rows,
                 "preference_shaped": standins.preference_shaped_rows}
    files = []
    for name in args.data or INSTRUCTION_SETS:
        if name in generated:
            name = fixtures.write_jsonl(workdir / f"{name}.jsonl", generated[name](args.rows))
        files.append(Path(name))
    return model, files


HOLDER = """
import sys, time, torch
free = torch.cuda.mem_get_info()[0]
held = torch.empty(max(0, free - int(float(sys.argv[1]) * 2**30)), dtype=torch.uint8, device="cuda")
print(torch.cuda.mem_get_info()[0], flush=True)
time.sleep(10**6)
"""


@contextlib.contextmanager
def gpu_memory_free(gib: float | None):
    """Hold all GPU memory but `gib` GiB in another process while the block runs (nothing held for None)."""
    if gib is None:
        yield
        return
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(gib)], stdout=subprocess.PIPE, text=True)
    try:
        free = int(holder.stdout.readline())
        print(f"holding the GPU down to {free / 2**30:.1f} GiB free", flush=True)
        yield
    finally:
        holder.kill()
        holder.wait()


MPS_FOLDERS = {"CUDA_MPS_PIPE_DIRECTORY": "/tmp/qlora-bench-mps-pipe",
               "CUDA_MPS_LOG_DIRECTORY": "/tmp/qlora-bench-mps-log"}


@contextlib.contextmanager
def gpu_sm_share(percent: int | None):
    """Every CUDA process started in the block gets `percent`% of the SMs: the MPS daemon runs for the block (nothing
    for None). This process never touches CUDA itself, so that stopping the daemon waits for no client of it."""
    if percent is None:
        yield
        return
    for folder in MPS_FOLDERS.values():
        Path(folder).mkdir(parents=True, exist_ok=True)
    os.environ.update(MPS_FOLDERS)
    for _ in range(3):  # a daemon told to quit just before may still be on its way out
        if subprocess.run(["nvidia-cuda-mps-control", "-d"]).returncode == 0:
            break
        time.sleep(3)
    else:
        sys.exit("error: nvidia-cuda-mps-control -d could not start the MPS daemon")
    os.environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(percent)
    print(f"MPS: every process gets {percent}% of the SMs", flush=True)
    try:
        yield
    finally:
        del os.environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"]
        subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True, timeout=120)
        print("MPS: stopped", flush=True)


def run(command: list[str], log: Path) -> bool:
    with open(log, "w") as out:
        code = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        print(f"  failed ({code}); last lines of {log}:\n" + "".join(log.read_text().splitlines(True)[-15:]))
    return code == 0


def summarize(metrics_file: Path, warmup: int) -> dict:
    from qlora.report import throughput

    m = json.loads(metrics_file.read_text())
    timed = throughput(m["steps"], warmup)
    # the preference trainers' last logged rewards, where the run kept its trainer's log
    rewards = [h for h in m.get("log_history", []) if "rewards/margins" in h]
    return {"real_tok_s": timed["real_tokens_per_second"], "s_per_step": timed["seconds_per_step"],
            "padding": m.get("padding_share", 0.0), "peak_gib": m["peak_gpu_memory_gib"],
            "final_loss": m["train_loss"][-1]["loss"] if m["train_loss"] else float("nan"), "plan": m.get("plan"),
            **({"reward_margin": rewards[-1]["rewards/margins"], "reward_accuracy": rewards[-1]["rewards/accuracies"]}
               if rewards else {})}


def recipes(args, model: Path, data: Path, out: Path):
    """(name, command, metrics file) for every recipe on one data file."""
    ours = args.ours or ["ours (default)="]
    for spec in ours:
        for processes in args.nproc:
            name, _, flags = spec.partition("=")
            if processes > 1:  # the same script under torchrun, one process a GPU (README: More than one GPU)
                name = f"{name} x {processes} GPUs"
            launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes)] if processes > 1 else []
            run_dir = out / name.replace(" ", "_").replace("(", "").replace(")", "")
            yield name, [sys.executable, *launcher, "train_unsloth.py", "--dataset", str(data), "--model_name",
                         str(model), "--max_steps", str(args.steps), "--output_dir", str(run_dir),
                         "--overwrite_output_dir", "--save_steps", "100000", "--eval_fraction", "0", "--logging_steps",
                         "5", *shlex.split(flags)], run_dir / "metrics.json"
    for name in filter(None, args.stock.split(",")):
        run_dir = out / name.replace("+", "_")
        yield name, [sys.executable, "bench/stock_recipes.py", *STOCK[name], "--data", str(data), "--model",
                     str(model), "--steps", str(args.steps), "--out", str(run_dir)], run_dir / "metrics.json"


def table_row(r: dict) -> str:
    return (f"| {r['sms']} | {r['free_gib']} | {r['data']} | {r['recipe']} | {r['real_tok_s']:,.0f} | "
            f"{r['s_per_step']:.2f} | {r['padding']:.0%} | {r['peak_gib']:.1f} |")


def plan_line(r: dict) -> str:
    """What the planner chose and predicted, against what was measured, and where its figures came from."""
    plan = r["plan"]
    measured = r["real_tok_s"] / (1 - r["padding"])  # padded tokens/s, as the planner predicts
    calibration = plan.get("calibration")
    if not calibration:
        figures = f"figures: {plan['figures']['source']}"
    elif calibration.get("cached"):
        figures = f"figures cached ({calibration['cached']})"
    else:
        figures = (f"calibration {calibration['seconds']:.1f} s (+ {calibration['first_pass_seconds']:.1f} s first "
                   f"pass, compiling)")
    ratio = plan["predicted_tokens_per_second"] / measured
    return (f"plan, {r['sms']} / {r['free_gib']} / {r['data']} / {r['recipe']}: {plan['summary']}; measured "
            f"{measured:,.0f} padded tokens/s, predicted / measured {ratio:.2f}; {figures}")


def header() -> str:
    from qlora.calibrate import driver_version
    from qlora.report import versions_line

    name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                          text=True).stdout.splitlines()[:1]  # not torch: this process stays off the GPU
    versions = versions_line(("torch", "transformers", "trl", "peft", "unsloth", "bitsandbytes"))
    return (f"device: {' '.join(name) or 'unknown'} (driver {driver_version()}); date: {time.strftime('%Y-%m-%d')}; "
            f"python {platform.python_version()}; {versions}")


def main():
    args = parse()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a time limit's kill still stops MPS and the holder
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model, data_files = prepare_inputs(args, workdir)
    rows = []
    (workdir / "bench_train.json").write_text("[]")  # no rows of an earlier run left to be mistaken for this one's
    sms = f"{args.gpu_sm_percent or 100}%"
    with gpu_sm_share(args.gpu_sm_percent):
        for gib in args.gpu_memory_gib:
            size = "whole card" if gib is None else f"{gib:g}"
            with gpu_memory_free(gib):
                for data in data_files:
                    out = workdir / "runs" / f"{sms[:-1]}sm_{size.replace(' ', '_')}" / data.stem
                    for name, command, metrics_file in recipes(args, model, data, out):
                        print(f"{sms} / {size} / {data.name} / {name}: {' '.join(command[1:])}", flush=True)
                        metrics_file.parent.mkdir(parents=True, exist_ok=True)
                        started = time.time()
                        if run(command, metrics_file.parent.parent / f"{metrics_file.parent.name}.log"):
                            rows.append({"sms": sms, "free_gib": size, "data": data.name, "recipe": name,
                                         **summarize(metrics_file, args.warmup)})
                            # as each run ends, so that a run cut short by a time limit still leaves its rows
                            print(f"  {time.time() - started:.0f} s: {table_row(rows[-1])}", flush=True)
                            if rows[-1]["plan"]:
                                print(f"  {plan_line(rows[-1])}", flush=True)
                            (workdir / "bench_train.json").write_text(json.dumps(rows, indent=2))
    print("\n" + header() + f"; {args.steps} steps, first {args.warmup} untimed\n")
    print("| SMs | free GiB | data | recipe | real tokens/s | s/step | padding | peak GiB |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(table_row(r))
    for r in rows:
        if r.get("plan"):
            print(plan_line(r))


if __name__ == "__main__":
    main()
