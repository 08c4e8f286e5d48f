"""What a run leaves behind besides the adapter: metrics.json (with the samples taken), loss.png and manifest.json."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from collections import deque
from importlib import metadata
from pathlib import Path

from . import atomic
from .errors import RunError

METER_STATE = "meter_{rank}.json"  # in each checkpoint, one per process
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "unsloth", "unsloth_zoo", "bitsandbytes", "datasets")


def check_reporting(config) -> None:
    """--report_to names integrations of transformers that must be installed: checked before the model loads."""
    from transformers.integrations import get_available_reporting_integrations

    wanted = [name.strip() for name in config.report_to.split(",") if name.strip() not in ("none", "all")]
    missing = [name for name in wanted if name not in get_available_reporting_integrations()]
    if missing:
        raise RunError(f"--report_to {config.report_to}: {missing[0]} is not installed for {sys.executable} (or is "
                       f"not an integration of transformers); pip install {missing[0]}, or pass --report_to none")


class Meter:
    """Times every optimizer step and counts the tokens of every training batch: real ones (not padding) and all.

    The counts come from the collator, on the host, so measuring adds no GPU synchronisation; a batch counts once it
    is trained on (the data loader makes the next one ahead of time). Each checkpoint holds the meter's state (save);
    a resumed run goes on from it (restore), so that metrics.json covers the whole run."""

    def __init__(self):
        from transformers import TrainerCallback

        self.real = self.total = 0
        self.made: deque[tuple[int, int]] = deque()  # (real, all) tokens of the batches made and not yet trained on
        self.steps: list[tuple[int, float, int]] = []  # (global step, seconds, real tokens so far) of this session
        self.earlier: list[dict] = []  # the timeline before the resume
        self.earlier_seconds = 0.0  # and the training time
        self.began = self.started = None  # when this session's first step began, and its training
        outer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                outer.began = outer.began or time.perf_counter()

            def on_substep_end(self, args, state, control, **kwargs):  # a micro-batch of an accumulated step
                outer.trained_on_one()

            def on_step_end(self, args, state, control, **kwargs):  # the step's last micro-batch
                outer.trained_on_one()
                outer.steps.append((state.global_step, time.perf_counter(), outer.real))

        self.callback = Callback()

    def start(self) -> None:
        self.started = time.perf_counter()

    def seconds(self) -> float:
        """Training time: this session's, plus the sessions' before the resume."""
        return self.earlier_seconds + time.perf_counter() - self.started

    def counting(self, collate):
        """Wrap a collator so that every batch it makes is counted."""

        def counted(examples):
            batch = collate(examples)
            self.made.append(batch_tokens(batch))
            return batch

        return counted

    def trained_on_one(self) -> None:
        """The trainer is done with the oldest batch made (micro-batches are trained in the order they are made)."""
        if self.made:  # empty only where another process makes the batches (accelerate's dispatch_batches)
            real, total = self.made.popleft()
            self.real += real
            self.total += total

    def save(self, checkpoint: Path, rank: int) -> None:
        """This process's counts into a checkpoint being written (each process counts its own batches)."""
        state = {"real": self.real, "total": self.total, "seconds": self.seconds(), "timeline": self.timeline()}
        atomic.write_text(Path(checkpoint) / METER_STATE.format(rank=rank), json.dumps(state))

    def restore(self, checkpoint: Path, rank: int) -> bool:
        """Go on from the counts in `checkpoint`; False where it has none (a checkpoint of an older version)."""
        file = Path(checkpoint) / METER_STATE.format(rank=rank)
        if not file.is_file():
            return False
        state = json.loads(file.read_text(encoding="utf-8"))
        self.real, self.total, self.earlier_seconds = state["real"], state["total"], state["seconds"]
        self.earlier = state["timeline"]
        return True

    def sum_over_processes(self) -> None:
        """Under torchrun each process counts its own batches; every process must call this before reporting."""
        import torch
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            # NCCL reduces only tensors on the process's own GPU; gloo takes CPU tensors
            device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
            counts = torch.tensor([self.real, self.total], dtype=torch.float64, device=device)
            scale = counts.clone()
            dist.all_reduce(counts)
            counts, scale = counts.tolist(), scale.tolist()
            factor = counts[0] / scale[0] if scale[0] else 1.0
            self.steps = [(s, t, int(n * factor)) for s, t, n in self.steps]
            self.earlier = [{**point, "real_tokens": int(point["real_tokens"] * factor)} for point in self.earlier]
            self.real, self.total = int(counts[0]), int(counts[1])

    def timeline(self) -> list[dict]:
        """Per optimizer step: seconds since the first step ended, and real tokens counted so far. After a resume the
        seconds go on from the last step before it, counting the time of this session's steps only."""
        if self.earlier:
            origin, offset = self.began, self.earlier[-1]["seconds"]
        else:
            origin, offset = (self.steps[0][1] if self.steps else 0.0), 0.0
        return self.earlier + [{"step": s, "seconds": offset + t - origin, "real_tokens": n} for s, t, n in self.steps]


def batch_tokens(batch: dict) -> tuple[int, int]:
    """(real, all) tokens of a collated batch: `input_ids` and its mask (SFT, DPO's chosen-then-rejected rows), or
    ORPO's `chosen_` and `rejected_` ones (its `prompt_` columns are the same tokens again). A padding-free batch is
    one row of packed real tokens, without a mask."""
    keys = ["input_ids"] if "input_ids" in batch else ["chosen_input_ids", "rejected_input_ids"]
    total = sum(batch[key].numel() for key in keys)
    masks = [key.replace("input_ids", "attention_mask") for key in keys]
    real = sum(int(batch[mask].sum()) for mask in masks) if all(mask in batch for mask in masks) else total
    return real, total


def throughput(timeline: list[dict], warmup: int = 1) -> dict:
    """Real tokens per second and seconds per step over the steps after the first `warmup` ones."""
    if len(timeline) <= warmup + 1:
        return {}
    first, last = timeline[warmup], timeline[-1]
    seconds = last["seconds"] - first["seconds"]
    return {"timed_steps": last["step"] - first["step"], "seconds_per_step": seconds / (last["step"] - first["step"]),
            "real_tokens_per_second": (last["real_tokens"] - first["real_tokens"]) / seconds}


class StepProfiler:
    """torch.profiler over `steps` optimizer steps after `skip` warm-up ones; writes the busiest operations, by GPU
    time and by CPU time, to `path` (where the time of a step goes)."""

    def __init__(self, path: Path, steps: int, skip: int = 3):
        from transformers import TrainerCallback

        self.path, self.steps, self.skip, self.profiler = Path(path), steps, skip, None
        outer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == outer.skip and outer.profiler is None and args.process_index == 0:
                    outer.start()

            def on_step_end(self, args, state, control, **kwargs):
                if outer.profiler is not None and state.global_step == outer.skip + outer.steps:
                    outer.stop()

        self.callback = Callback()

    def start(self) -> None:
        import torch

        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        # with Python stacks, so that the trace names the code behind every host synchronisation
        self.profiler = torch.profiler.profile(activities=activities, with_stack=True)
        self.profiler.__enter__()
        self.started = time.perf_counter()

    def stop(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.started
        self.profiler.__exit__(None, None, None)
        table = self.profiler.key_averages()
        # the share of the wall time the GPU spent in kernels (kernel events only: an operator's row repeats the time of
        # the kernels it launched); what is left is the GPU waiting for the host
        kernels = [e for e in table if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.self_device_time_total for e in kernels) / 1e6 / wall
        sections = [f"{self.steps} optimizer steps after {self.skip}; totals over those steps",
                    f"wall {wall:.3f} s, {wall / self.steps:.3f} s a step; GPU busy {busy:.1%} of it"]
        for key in ("self_device_time_total", "self_cpu_time_total"):
            listing = table.table(sort_by=key, row_limit=25, max_name_column_width=70)
            sections.append(f"\n== sorted by {key}\n{listing}")
        atomic.write_text(self.path, "\n".join(sections))
        trace = self.path.with_suffix(".trace.json.gz")  # for ui.perfetto.dev, or scripts/trace_gaps.py
        with atomic.atomic_path(trace) as tmp:
            self.profiler.export_chrome_trace(f"{tmp}.gz")  # torch gzips a path that ends in .gz
            os.replace(f"{tmp}.gz", tmp)
        self.profiler = None
        print(f"profile of {self.steps} steps: {self.path}, {trace.name}; {sections[1]}")


def data_fingerprint(data) -> str:
    """sha256 of every split's ids and labels (a pair's prompt and answers): the same fingerprint means the same
    training tokens."""
    digest = hashlib.sha256()
    for split in sorted(data):
        for column in sorted(data[split].column_names):
            for row in data[split][column]:
                digest.update(json.dumps(row).encode())
    return digest.hexdigest()


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions_line(names) -> str:
    """"torch 2.11.0, transformers 5.17.0, ...": the versions line of the benchmark tables."""
    return ", ".join(f"{name} {package_version(name) or 'not installed'}" for name in names)


def manifest(data, backend: str) -> dict:
    import torch

    return {"versions": {name: package_version(name) for name in PACKAGES}, "python": platform.python_version(),
            "git_commit": git_commit(), "data_fingerprint": data_fingerprint(data), "backend": backend,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"}


REWARD_KEYS = ("rewards/margins", "eval_rewards/margins", "rewards/accuracies", "eval_rewards/accuracies")


def metrics(trainer, meter: Meter, wall_time: float, plan: dict | None = None, samples: list[dict] = ()) -> dict:
    import torch

    history, timeline = trainer.state.log_history, meter.timeline()
    return {
        "global_step": trainer.state.global_step,
        "train_loss": [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h],
        "eval_loss": [{"step": h["step"], "loss": h["eval_loss"]} for h in history if "eval_loss" in h],
        # DPO's and ORPO's implicit rewards, chosen over rejected: the mean margin and the share of pairs ranked right
        "rewards": {key: [{"step": h["step"], "value": h[key]} for h in history if key in h]
                    for key in REWARD_KEYS if any(key in h for h in history)},
        "samples": list(samples),  # greedy answers to held-out prompts, by step (qlora/samples.py)
        "real_tokens_seen": meter.real,
        "padding_share": 1 - meter.real / meter.total if meter.total else 0.0,
        "throughput_after_warmup": throughput(timeline),
        "real_tokens_per_second": meter.real / wall_time,
        "steps": timeline,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "wall_time_s": wall_time,
        "plan": plan,  # what the planner chose for this GPU and why (qlora.planner), None where nothing was planned
    }


def plot_loss(result: dict, path: Path) -> None:
    """The train and eval losses by step, twice side by side: on a linear scale, and on a log scale, where the late
    steps' small changes show."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards = result.get("rewards") or {}
    fig, axes = plt.subplots(2 if rewards else 1, 2, figsize=(11, 8 if rewards else 4), squeeze=False)
    for ax, scale in zip(axes[0], ("linear", "log")):
        for key, style in (("train_loss", "-"), ("eval_loss", "o-")):
            if result[key]:
                ax.plot([p["step"] for p in result[key]], [p["loss"] for p in result[key]], style, label=key)
        ax.set_yscale(scale)
        ax.set_title(f"{scale} scale")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    if rewards:
        plot_rewards(axes[1], rewards)
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plot_rewards(axes, rewards: dict) -> None:
    """A preference run's reward margin and accuracy (chosen over rejected) by step, train and eval."""
    for ax, (name, label) in zip(axes, (("margins", "reward margin"), ("accuracies", "reward accuracy"))):
        for key, style in ((f"rewards/{name}", "-"), (f"eval_rewards/{name}", "o-")):
            if rewards.get(key):
                ax.plot([p["step"] for p in rewards[key]], [p["value"] for p in rewards[key]], style,
                        label="eval" if key.startswith("eval_") else "train")
        ax.set_title(label)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend()


def write_all(out: Path, trainer, meter: Meter, config, data, wall_time: float, backend: str,
              plan: dict | None = None, samples: list[dict] = ()) -> dict:
    """metrics.json, manifest.json and loss.png, then the model card from them (qlora/model_card.py)."""
    result = metrics(trainer, meter, wall_time, plan, samples)
    atomic.write_text(out / "metrics.json", json.dumps(result, indent=2))
    atomic.write_text(out / "manifest.json", json.dumps(manifest(data, backend), indent=2))
    plot_loss(result, out / "loss.png")
    from .model_card import write_run_card  # here: `python -m qlora env` reads this module without PyYAML

    carded = write_run_card(out)  # from the files just written
    first, last = (result["eval_loss"][0], result["eval_loss"][-1]) if result["eval_loss"] else (None, None)
    print(f"done: {result['global_step']} steps in {wall_time:.0f} s, "
          f"{result['real_tokens_per_second']:.0f} real tokens/s"
          + (f", eval loss {first['loss']:.3f} -> {last['loss']:.3f}" if first else "")
          + (f"; plan: {plan['summary']}" if plan else "")
          + f"; adapter, metrics.json, loss.png, manifest.json{' and the model card README.md' if carded else ''} "
            f"in {out}")
    return result
