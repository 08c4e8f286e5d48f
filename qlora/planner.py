"""How to feed the GPU: the micro-batch size and the activation checkpointing that train fastest in the free memory.

The optimizer step stays the same on every card: `tokens_per_step` padded tokens (12,288 by default). What changes is
how a step is cut: one micro-batch of 12,288 tokens without checkpointing where memory holds it (about 49 GiB for
Mistral-7B), else more, smaller micro-batches accumulated, or checkpointed activations (recomputed in the backward
pass, or offloaded to host memory), or recomputation of only some decoder layers while the others keep their
activations (Unsloth's `checkpoint_skip_layers`). Each choice costs a measured amount of memory per token and of time
per token, and every micro-batch also costs a fixed time; the planner predicts the throughput of every choice that
fits and takes the best. The figures are Mistral-7B's in 4 bits (bench/RESULTS.md); a smaller model only fits more
easily.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

GIB, MIB = 2**30, 2**20
LAYERS = 32  # Mistral-7B's decoder layers: recomputing k fewer of them saves k/32 of the recompute time


@dataclass(frozen=True)
class Mode:
    checkpointing: str  # the gradient_checkpointing setting: false, true (recompute) or unsloth (offload)
    bytes_per_token: int  # activation memory per padded token of a micro-batch
    seconds_per_token: float  # GPU time per padded token (forward and backward)
    skip_layers: int = 0  # with recompute: decoder layers that keep their activations instead (checkpoint_skip_layers)


# From the peaks and step times measured on an H200 with the 7.24 B stand-in of Mistral-7B-Instruct-v0.2 in 4 bits
# (bench/RESULTS.md, 2026-12-02). Memory is a bound, a little above what was measured at up to 12,288 tokens a
# micro-batch: 10.0 GiB predicted for every layer recomputed (9.8 measured), 19.8 keeping 8 layers (17.9), 49.0 without
# checkpointing (45.9). Time: steps of about 11,800 padded tokens took 0.70 s without checkpointing, 1.02 s
# recomputing every layer.
NONE, RECOMPUTE, OFFLOAD = (Mode("false", int(3.75 * MIB), 40e-6), Mode("true", int(0.5 * MIB), 67e-6),
                            Mode("unsloth", int(0.28 * MIB), 74e-6))
MODES = {"unsloth": (NONE, RECOMPUTE, OFFLOAD),
         "hf": (Mode("false", 9 * MIB, 110e-6), Mode("true", int(0.6 * MIB), 100e-6))}
SECONDS_PER_MICRO_BATCH = 0.23  # launch, host and optimizer time that does not grow with the tokens
FIXED_BYTES = 4 * GIB  # 4-bit weights, LoRA weights, gradients and optimizer states, the loss's chunk, workspace
USABLE = 0.9  # share of the free memory a plan may fill: the allocator fragments, and the estimates are averages
MAX_ACCUMULATION = 16


def keeping(layers: int) -> Mode:
    """Recompute with `layers` of the 32 decoder layers keeping their activations: memory and time in proportion."""
    share = layers / LAYERS
    kept_bytes = share * (NONE.bytes_per_token - RECOMPUTE.bytes_per_token)
    saved_seconds = share * (RECOMPUTE.seconds_per_token - NONE.seconds_per_token)
    return replace(RECOMPUTE, skip_layers=layers, bytes_per_token=round(RECOMPUTE.bytes_per_token + kept_bytes),
                   seconds_per_token=RECOMPUTE.seconds_per_token - saved_seconds)


def modes_for(backend: str, checkpointing: str = "auto", skip_layers: int | str = "auto") -> list[Mode]:
    """The modes a plan may use: `checkpointing` other than auto keeps that one; with Unsloth, recompute also comes
    with every number of layers kept (or the `skip_layers` given)."""
    modes = [m for m in MODES[backend] if checkpointing in ("auto", m.checkpointing)]
    if not modes:
        raise ValueError(f"gradient_checkpointing {checkpointing} is not available with --backend {backend}")
    if backend == "unsloth" and RECOMPUTE in modes:
        kept = range(LAYERS) if skip_layers == "auto" else [skip_layers]
        modes = [m for m in modes if m is not RECOMPUTE] + [keeping(k) for k in kept]
    return modes


@dataclass(frozen=True)
class Plan:
    checkpointing: str
    skip_layers: int
    micro_tokens: int
    accumulation: int
    predicted_bytes: int
    predicted_tokens_per_second: float
    free_bytes: int

    def summary(self) -> str:
        kept = f" ({self.skip_layers} of {LAYERS} layers not recomputed)" if self.skip_layers else ""
        return (f"gradient_checkpointing {self.checkpointing}{kept}, micro-batches of up to {self.micro_tokens:,} "
                f"tokens x {self.accumulation} accumulation: about {self.predicted_bytes / GIB:.1f} GiB of "
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
            plans.append(Plan(mode.checkpointing, mode.skip_layers, micro, accumulation, need,
                              micro * accumulation / seconds, free_bytes))
    return plans


def plan(free_bytes: int, tokens_per_step: int, longest_row: int, backend: str, checkpointing: str = "auto",
         skip_layers: int | str = "auto") -> Plan:
    """The fastest plan that fits in USABLE x free memory; if none fits, the one that needs the least memory (the
    out-of-memory advice takes over from there)."""
    modes = modes_for(backend, checkpointing, skip_layers)
    options = candidates(free_bytes, tokens_per_step, longest_row, modes)
    if not options:  # a row longer than tokens_per_step: one row per micro-batch
        options = candidates(free_bytes, longest_row, longest_row, modes)
    fitting = [p for p in options if p.predicted_bytes <= USABLE * free_bytes]
    if fitting:
        return max(fitting, key=lambda p: p.predicted_tokens_per_second)
    return min(options, key=lambda p: p.predicted_bytes)
