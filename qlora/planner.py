"""How to feed the GPU: the micro-batch size and the activation checkpointing that train fastest in the free memory.

The optimizer step stays the same on every card: `tokens_per_step` padded tokens (12,288 by default). What changes is
how a step is cut: one micro-batch of 12,288 tokens without checkpointing where memory holds it (about 51 GiB for
Mistral-7B), else more, smaller micro-batches accumulated, or checkpointed activations (recomputed in the backward
pass, or offloaded to host memory). Each choice costs a measured amount of memory per token and of time per token,
and every micro-batch also costs a fixed time; the planner predicts the throughput of every choice that fits and takes
the best. The figures are Mistral-7B's in 4 bits (bench/RESULTS.md); a smaller model only fits more easily.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

GIB, MIB = 2**30, 2**20


@dataclass(frozen=True)
class Mode:
    checkpointing: str  # the gradient_checkpointing setting: false, true (recompute) or unsloth (offload)
    bytes_per_token: int  # activation memory per padded token of a micro-batch
    seconds_per_token: float  # GPU time per padded token (forward and backward)


# Measured on an H100 and an H200 with the 7.24 B stand-in of Mistral-7B-Instruct-v0.2 (bench/RESULTS.md).
MODES = {
    "unsloth": (Mode("false", int(3.75 * MIB), 35e-6), Mode("true", int(0.5 * MIB), 70e-6),
                Mode("unsloth", int(0.28 * MIB), 77e-6)),
    "hf": (Mode("false", 9 * MIB, 110e-6), Mode("true", int(0.6 * MIB), 100e-6)),
}
SECONDS_PER_MICRO_BATCH = 0.28  # launch, host and optimizer time that does not grow with the tokens
FIXED_BYTES = 6 * GIB  # 4-bit weights, LoRA weights, gradients and optimizer states, the loss's chunk, workspace
USABLE = 0.9  # share of the free memory a plan may fill: the allocator fragments, and the estimates are averages
MAX_ACCUMULATION = 16


@dataclass(frozen=True)
class Plan:
    checkpointing: str
    micro_tokens: int
    accumulation: int
    predicted_bytes: int
    predicted_tokens_per_second: float
    free_bytes: int

    def summary(self) -> str:
        return (f"gradient_checkpointing {self.checkpointing}, micro-batches of up to {self.micro_tokens:,} tokens x "
                f"{self.accumulation} accumulation: about {self.predicted_bytes / GIB:.1f} GiB of "
                f"{self.free_bytes / GIB:.1f} GiB free, about {self.predicted_tokens_per_second:,.0f} padded "
                f"tokens/s predicted")

    def as_dict(self) -> dict:
        return {**asdict(self), "summary": self.summary()}


def candidates(free_bytes: int, tokens_per_step: int, longest_row: int, modes) -> list[Plan]:
    """Every (mode, accumulation) whose micro-batch holds the longest row, with its memory and predicted speed."""
    plans = []
    for mode in modes:
        for accumulation in range(1, MAX_ACCUMULATION + 1):
            micro = math.ceil(tokens_per_step / accumulation)
            if micro < longest_row:
                break
            need = FIXED_BYTES + micro * mode.bytes_per_token
            seconds = accumulation * SECONDS_PER_MICRO_BATCH + micro * accumulation * mode.seconds_per_token
            plans.append(Plan(mode.checkpointing, micro, accumulation, need, micro * accumulation / seconds,
                              free_bytes))
    return plans


def plan(free_bytes: int, tokens_per_step: int, longest_row: int, backend: str, checkpointing: str = "auto") -> Plan:
    """The fastest plan that fits in USABLE x free memory; if none fits, the one that needs the least memory (the
    out-of-memory advice takes over from there). `checkpointing` other than auto keeps that mode."""
    modes = [m for m in MODES[backend] if checkpointing in ("auto", m.checkpointing)]
    if not modes:
        raise ValueError(f"gradient_checkpointing {checkpointing} is not available with --backend {backend}")
    options = candidates(free_bytes, tokens_per_step, longest_row, modes)
    if not options:  # a row longer than tokens_per_step: one row per micro-batch
        options = candidates(free_bytes, longest_row, longest_row, modes)
    fitting = [p for p in options if p.predicted_bytes <= USABLE * free_bytes]
    if fitting:
        return max(fitting, key=lambda p: p.predicted_tokens_per_second)
    return min(options, key=lambda p: p.predicted_bytes)
