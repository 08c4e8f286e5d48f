"""Where and how the scripts compute, decided in one place: the backend (Unsloth or transformers on a CUDA GPU, or
the CPU), the precision, this process's GPU and its free memory, and the processes of a run under torchrun or
accelerate launch."""

from __future__ import annotations

import functools
import importlib.util
import os
import sys

from .hub import LOCAL_MODEL, parameter_count

SMOKE_PRESET = "configs/smoke.yaml"
# Below this many parameters (by the model's config) `backend: auto` trains on the CPU when no GPU can be used: the
# smoke model takes minutes there, a 7 B model in float32 about 29 GB of RAM and days.
CPU_TRAINING_LIMIT = 1_000_000_000


class BackendError(RuntimeError):
    pass


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def note(problem: str, then: str) -> None:
    """The GPU that cannot be used, named on stderr, when the script goes on without it."""
    print(f"note: {problem}; {then}", file=sys.stderr, flush=True)


@functools.lru_cache  # infer.py asks again for --input's settings: the note is said once
def pick_backend(choice: str, doing: str, no_gpu: str = "this machine has none") -> str:
    """unsloth, hf (transformers on the GPU) or cpu for `choice` (auto, unsloth, hf or cpu): auto is Unsloth on a CUDA
    GPU (transformers where Unsloth is not installed), else the CPU, noting that it goes on `doing` there. A GPU
    backend refuses a machine without a usable GPU, saying `no_gpu`; an NVIDIA GPU that torch cannot use is named,
    never taken for no GPU."""
    from .gpu import unusable_gpu

    has_cuda = cuda_available()
    problem = None if has_cuda else unusable_gpu()
    if choice in ("unsloth", "hf") and not has_cuda:
        raise BackendError(f"--backend {choice} needs a CUDA GPU: {problem or no_gpu}")
    if choice == "unsloth" and importlib.util.find_spec("unsloth") is None:
        raise BackendError("--backend unsloth: Unsloth is not installed (pip install unsloth)")
    if has_cuda:
        return choice if choice != "auto" else "unsloth" if importlib.util.find_spec("unsloth") else "hf"
    if problem:
        note(problem, doing)
    return "cpu"


def training_backend(config) -> str:
    """The backend to train on, before any weights are read: as pick_backend, and `auto` without a usable GPU trains
    on the CPU only a small model in 16 or 32 bits."""
    no_gpu = f"this machine has no CUDA GPU; for a CPU run use the smoke preset: --config {SMOKE_PRESET}"
    if config.backend == "auto" and not cuda_available():
        from .gpu import unusable_gpu

        problem = unusable_gpu()
        if config.load_in_4bit and "bnb-4bit" in config.model_name:
            raise BackendError(f"{config.model_name} is a 4-bit GPU model: {problem or no_gpu}")
        count = parameter_count(config.model_name, "model", LOCAL_MODEL)
        if count >= CPU_TRAINING_LIMIT:
            raise BackendError(f"{config.model_name} has {count / 1e9:.1f} B parameters, too many to train on the "
                               f"CPU (float32, days): {problem or 'this machine has no CUDA GPU'}; "
                               f"--backend cpu trains on the CPU anyway")
    return pick_backend(config.backend, "training on the CPU", no_gpu)


def precision() -> str:
    """bf16 where the GPU has it, fp16 (with a gradient scaler in training) where not (T4), fp32 on a CPU."""
    import torch

    if not torch.cuda.is_available():
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def compute_dtype():
    """precision() as a torch dtype: what models are loaded and LoRA computes in."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision()]


def local_device_index() -> int:
    """This process's GPU under torchrun / accelerate launch (LOCAL_RANK), else the first."""
    return int(os.environ.get("LOCAL_RANK", 0))


def processes():
    """The processes of this run: one for `python`, N under torchrun / accelerate launch (the first call joins them)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())  # on a CPU, torchrun's processes meet over gloo


def is_main_process() -> bool:
    return processes().is_main_process


def wait_for_everyone() -> None:
    """A barrier, so that other processes read what the main one wrote."""
    processes().wait_for_everyone()


def least_free_memory() -> int:
    """The free memory of this process's GPU, or under torchrun the least free on any of the run's GPUs: every
    process must plan the same micro-batches a step, or their gradient exchanges would not meet."""
    import torch

    free = torch.cuda.mem_get_info(local_device_index())[0]
    if processes().num_processes == 1:
        return free
    least = torch.tensor([free], device=processes().device)
    torch.distributed.all_reduce(least, op=torch.distributed.ReduceOp.MIN)
    return int(least.item())
