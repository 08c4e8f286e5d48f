"""How to feed the GPU: the micro-batch size and the activation checkpointing that train fastest in the free memory.

The optimizer step stays the same on every card: `tokens_per_step` padded tokens (12,288 by default). What changes is
how a step is cut: one micro-batch of 12,288 tokens without checkpointing where memory holds it (about 49 GiB for
Mistral-7B), else more, smaller micro-batches accumulated, or checkpointed activations (recomputed in the backward
pass, or offloaded to host memory and recomputed), or recomputation of only some decoder layers while the others keep
their activations (Unsloth's `checkpoint_skip_layers`). Each choice costs an amount of memory per token and of time
per token, and every micro-batch also costs a fixed time; the planner predicts the throughput of every choice that
fits and takes the best.

Memory per token is the model's (Mistral-7B in 4 bits, measured in bench/RESULTS.md; fp16 activations are bf16's size,
so a T4 plans with the same figures); the times are the card's. `Figures` holds the times: measured on the card at the
start of a run (qlora/calibrate.py), or the built-in ones fitted on an H200. On a fast card the fixed cost of a
micro-batch (the host launching its kernels) is what big micro-batches save; on a slow one the GPU's queue hides the
host, and recomputing is one more forward pass for every token, so small micro-batches without it win.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

GIB, MIB = 2**30, 2**20
LAYERS = 32  # Mistral-7B's decoder layers: recomputing k fewer of them saves k/32 of the recompute time
HIDDEN = 4096
# Offloading keeps each decoder layer's input in host memory, 16 bits a value: 256 KiB a token (3 GiB for 12,288)
HOST_BYTES_PER_TOKEN = LAYERS * HIDDEN * 2

# Activation memory per padded token of a micro-batch, by gradient_checkpointing setting: false (keep every
# activation), true (recompute), unsloth (offload). From the peaks measured on an H200 with the 7.24 B stand-in of
# Mistral-7B-Instruct-v0.2 in 4 bits (bench/RESULTS.md, 2026-12-02); a bound, a little above what was measured at up
# to 12,288 tokens a micro-batch: 10.0 GiB predicted for every layer recomputed (9.8 measured), 19.8 keeping 8 layers
# (17.9), 49.0 without checkpointing (45.9).
BYTES_PER_TOKEN = {"unsloth": {"false": int(3.75 * MIB), "true": int(0.5 * MIB), "unsloth": int(0.28 * MIB)},
                   "hf": {"false": 9 * MIB, "true": int(0.6 * MIB)}}  # --backend hf has no offloading
FIXED_BYTES = 4 * GIB  # 4-bit weights, LoRA weights, gradients and optimizer states, the loss's chunk, workspace
USABLE = 0.9  # share of the free memory a plan may fill at most: the allocator fragments; estimates are averages
MAX_ACCUMULATION = 16


@dataclass(frozen=True)
class Figures:
    """The card's side of a plan: GPU time per padded token (forward and backward) of each gradient_checkpointing
    setting, the fixed time of every micro-batch and of every optimizer step, and the memory a plan leaves unused."""
    seconds_per_token: dict = field(default_factory=dict)  # false / true / unsloth -> seconds
    seconds_per_micro_batch: float = 0.0  # launches and host work that do not grow with the tokens
    seconds_per_step: float = 0.0  # the optimizer step
    reserve_bytes: int = 0  # free memory a plan never fills, where more than (1 - USABLE) of it: allocator slack
    source: str = "built-in"

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Figures":
        return cls(**values)


# Fitted to the H200 runs of bench/RESULTS.md (2026-12-02): steps of about 11,800 padded tokens took 0.70 s without
# checkpointing, 1.02 s recomputing every layer.
DEFAULT_FIGURES = {
    "unsloth": Figures({"false": 40e-6, "true": 67e-6, "unsloth": 74e-6}, 0.23, source="built-in (fitted on an H200)"),
    "hf": Figures({"false": 110e-6, "true": 100e-6}, 0.23, source="built-in (fitted on an H100)"),
}


@dataclass(frozen=True)
class Mode:
    checkpointing: str  # the gradient_checkpointing setting: false, true (recompute) or unsloth (offload)
    bytes_per_token: int  # activation memory per padded token of a micro-batch
    seconds_per_token: float  # GPU time per padded token (forward and backward)
    skip_layers: int = 0  # with recompute: decoder layers that keep their activations instead (checkpoint_skip_layers)


def keeping(layers: int, keep: Mode, recompute: Mode) -> Mode:
    """Recompute with `layers` of the 32 decoder layers keeping their activations: memory and time in proportion."""
    share = layers / LAYERS
    kept_bytes = share * (keep.bytes_per_token - recompute.bytes_per_token)
    saved_seconds = share * (recompute.seconds_per_token - keep.seconds_per_token)
    return replace(recompute, skip_layers=layers, bytes_per_token=round(recompute.bytes_per_token + kept_bytes),
                   seconds_per_token=recompute.seconds_per_token - saved_seconds)


def modes_for(backend: str, checkpointing: str = "auto", skip_layers: int | str = "auto",
              figures: Figures | None = None) -> list[Mode]:
    """The modes a plan may use: `checkpointing` other than auto keeps that one; with Unsloth, recompute also comes
    with every number of layers kept (or the `skip_layers` given)."""
    figures = figures or DEFAULT_FIGURES[backend]
    every = {name: Mode(name, size, figures.seconds_per_token[name]) for name, size in BYTES_PER_TOKEN[backend].items()}
    modes = [m for m in every.values() if checkpointing in ("auto", m.checkpointing)]
    if not modes:
        raise ValueError(f"gradient_checkpointing {checkpointing} is not available with --backend {backend}")
    if backend == "unsloth" and every["true"] in modes:
        kept = range(LAYERS) if skip_layers == "auto" else [skip_layers]
        modes = [m for m in modes if m.checkpointing != "true"] + [keeping(k, every["false"], every["true"])
                                                                      for k in kept]
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
    host_bytes: int = 0  # host memory the offloaded activations take (gradient_checkpointing unsloth)

    def summary(self) -> str:
        kept = f" ({self.skip_layers} of {LAYERS} layers not recomputed)" if self.skip_layers else ""
        host = f", {self.host_bytes / GIB:.1f} GiB of host memory" if self.host_bytes else ""
        return (f"gradient_checkpointing {self.checkpointing}{kept}, micro-batches of up to {self.micro_tokens:,} "
                f"tokens x {self.accumulation} accumulation: about {self.predicted_bytes / GIB:.1f} GiB of "
                f"{self.free_bytes / GIB:.1f} GiB free{host}, about {self.predicted_tokens_per_second:,.0f} padded "
                f"tokens/s predicted")

    def as_dict(self) -> dict:
        return {**asdict(self), "summary": self.summary()}


def usable_bytes(free_bytes: int, figures: Figures) -> float:
    """What a plan may fill: the free memory less a margin, since near the cap the allocator thrashes (a run at 13.8
    of 15 GiB ran at less than half the speed of one at 11.1)."""
    return free_bytes - max((1 - USABLE) * free_bytes, figures.reserve_bytes)


def candidates(free_bytes: int, tokens_per_step: int, longest_row: int, modes, figures: Figures,
               reference_pass: bool = False) -> list[Plan]:
    """Every (mode, accumulation) whose micro-batch holds the longest row, with its memory and predicted speed.
    `reference_pass`: DPO's forward pass of the reference over every token too, without gradients (so no memory
    kept), about a third of a forward and backward pass of the same tokens."""
    reference_seconds = figures.seconds_per_token.get("false", 0.0) / 3 if reference_pass else 0.0
    plans = []
    for mode in modes:
        for accumulation in range(1, MAX_ACCUMULATION + 1):
            micro = math.ceil(tokens_per_step / accumulation)
            if micro < longest_row:
                break
            need = FIXED_BYTES + micro * mode.bytes_per_token
            seconds = (figures.seconds_per_step + accumulation * figures.seconds_per_micro_batch
                       + micro * accumulation * (mode.seconds_per_token + reference_seconds))
            host = micro * HOST_BYTES_PER_TOKEN if mode.checkpointing == "unsloth" else 0
            plans.append(Plan(mode.checkpointing, mode.skip_layers, micro, accumulation, need,
                              micro * accumulation / seconds, free_bytes, host))
    return plans


def plan(free_bytes: int, tokens_per_step: int, longest_row: int, backend: str, checkpointing: str = "auto",
         skip_layers: int | str = "auto", figures: Figures | None = None, reference_pass: bool = False) -> Plan:
    """The fastest plan that fits in the usable memory; if none fits, the one that needs the least memory (the
    out-of-memory advice takes over from there). `figures`: the card's (default: the built-in ones). A preference
    pair's two sequences count as one row of both lengths (qlora/batching.py); `reference_pass` for DPO."""
    figures = figures or DEFAULT_FIGURES[backend]
    modes = modes_for(backend, checkpointing, skip_layers, figures)
    options = candidates(free_bytes, tokens_per_step, longest_row, modes, figures, reference_pass)
    if not options:  # a row longer than tokens_per_step: one row per micro-batch
        options = candidates(free_bytes, longest_row, longest_row, modes, figures, reference_pass)
    fitting = [p for p in options if p.predicted_bytes <= usable_bytes(free_bytes, figures)]
    if fitting:
        return max(fitting, key=lambda p: p.predicted_tokens_per_second)
    return min(options, key=lambda p: p.predicted_bytes)
