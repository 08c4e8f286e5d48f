"""Measuring the card for the planner (qlora/planner.py), in a few seconds at the start of a run, on the loaded model.

- GPU time of a forward and backward pass with every decoder layer keeping its activations (gradient_checkpointing
  false) and with every layer recomputed (true), at micro-batches of 1, 2, 4, ... rows, until a pass takes
  PASS_SECONDS or the free memory ends: through the two largest, the slope is the time a padded token costs, the
  intercept the fixed time of a micro-batch. A fast card is so measured near the sizes it will train at, where the
  host's work per micro-batch hides under the GPU's.
- Offloading (unsloth) recomputes too and moves each layer's input to host memory and back: the host link's speed is
  measured, and the moves are added to recomputing (or taken off offloading, where the model was loaded with it).
- Recomputing costs one more forward pass: between RECOMPUTE_AT_LEAST and RECOMPUTE_AT_MOST times keeping the
  activations. Recomputed passes reach large sizes on any card (their activations are small); where memory keeps the
  passes that keep every activation too short to show their cost, the bound takes over.
- The optimizer step, on copies of the LoRA weights.
- The allocator's slack at the largest pass (memory reserved but not allocated): a plan leaves at least that, and
  half a GiB more, unused (a run at 13.8 of 15 GiB thrashed).

The model is loaded once, checkpointed; switching layers between keeping and recomputing is Unsloth's
checkpoint_skip_layers, which may change between steps (its own `auto` does so after the first one), so the plan is
then applied to the same model. The figures are cached per GPU, driver, torch and Unsloth version, share of the SMs
(MPS), precision, model and LoRA shape, under ~/.cache/qlora-mistral (QLORA_MISTRAL_CACHE): a second run on the same
card measures nothing, unless it has more than MORE_MEMORY times the free memory they were measured with.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

from . import atomic
from .planner import GIB, MIB, USABLE, Figures

CACHE_ENV = "QLORA_MISTRAL_CACHE"
PASS_SECONDS = 1.0  # a mode's passes grow until one takes this long (or the memory ends)
ROW = 1024  # tokens a row in the measured micro-batches, about the middle of the 2,048 a row may have
SLACK_EXTRA = MIB * 512
# Recomputing runs each checkpointed layer's forward pass again, and a QLoRA backward through the frozen 4-bit base
# costs one to two forwards: recomputing costs between these times keeping the activations. Measured: 1.42 at 8% of an
# H200's SMs, 1.40 with all of them and 23 GiB free. Outside the range, a mode's passes were too short for the GPU to
# show its cost: on the whole H200 with 15 GiB free, keeping measured 15 us a token between passes of 984 and 1,952
# tokens (0.204 and 0.218 s, the host's launches), recomputing 77 us between 7,936 and 11,808.
RECOMPUTE_AT_LEAST, RECOMPUTE_AT_MOST = 1.4, 1.5
MORE_MEMORY = 1.25  # cached figures serve runs with up to this many times the free memory they were measured with


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "qlora-mistral")


def driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.split()
        return out[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        import torch

        return f"CUDA driver API {torch._C._cuda_getDriverVersion()}"


def card_key(config) -> dict:
    """What the figures depend on besides the code: the card (and the share of it MPS gives this process), the
    software, the precision, the model and the LoRA."""
    import torch

    from .device import compute_dtype, local_device_index
    from .report import package_version

    props = torch.cuda.get_device_properties(local_device_index())
    return {"gpu": props.name, "sms": props.multi_processor_count, "memory": props.total_memory,
            "mps_sm_percent": os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"), "driver": driver_version(),
            "torch": torch.__version__, "unsloth": package_version("unsloth"),
            "unsloth_zoo": package_version("unsloth_zoo"), "dtype": str(compute_dtype()).removeprefix("torch."),
            "model": config.model_name, "load_in_4bit": config.load_in_4bit, "max_seq_length": config.max_seq_length,
            "lora": [config.lora_r, config.lora_dropout, sorted(config.lora_target_modules)]}


def cache_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"calibration-{digest}.json"


def load_cached(key: dict) -> dict | None:
    """The calibration record for `key`, or None where there is none (or one unreadable, which is measured again)."""
    path = cache_path(key)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        Figures.from_dict(record["figures"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"note: {path}: unreadable calibration ({err}); measuring again")
        return None
    return {**record, "cached": str(path)} if record.get("key") == key else None


def outgrown(record: dict, free_bytes: int) -> bool:
    """Whether a run has so much more free memory than the cached figures were measured with that larger micro-batches
    than were measured now fit: then the card is measured again (a fast card's small passes are host-bound, and the
    line through them does not carry to micro-batches several times their size)."""
    return free_bytes > MORE_MEMORY * record.get("free_bytes", free_bytes)


def save(key: dict, record: dict) -> Path:
    path = cache_path(key)
    atomic.write_text(path, json.dumps({**record, "key": key}, indent=2))
    return path


# ---------------------------------------------------------------- the measurements


def decoder_layers(model):
    from unsloth_zoo.block_swap import find_decoder_layers

    return find_decoder_layers(model)


def keep_activations(model, layers: int) -> None:
    """`layers` decoder layers (evenly spaced) keep their activations, the others are checkpointed."""
    from unsloth.models._utils import skip_checkpointing

    for layer in decoder_layers(model):
        layer.__dict__.pop("_unsloth_skip_checkpoint", None)  # how Unsloth itself puts a layer back to checkpointing
    skip_checkpointing(model, layers)


def apply_plan(model, checkpointing: str, skip_layers: int) -> None:
    """Set a model loaded checkpointed to a plan: without checkpointing every layer keeps its activations. (A model
    loaded offloading runs a recompute plan offloading: the planner picks offloading only where recomputing does not
    fit, which depends on the memory alone, so measuring does not change that choice.)"""
    keep_activations(model, len(decoder_layers(model)) if checkpointing == "false" else skip_layers)


def one_pass(model, rows: int, length: int) -> tuple[float, int, int]:
    """Seconds, peak allocated bytes above the start, and allocator slack (reserved less allocated at the peaks) of
    one forward and backward pass over `rows` random rows of `length` tokens."""
    import torch

    device = model.get_input_embeddings().weight.device
    ids = torch.randint(3, model.config.vocab_size, (rows, length), device=device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    started = time.perf_counter()
    model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device)
    slack = torch.cuda.max_memory_reserved(device) - peak
    model.zero_grad(set_to_none=True)
    return seconds, peak - base, slack


def timed(model, rows: int, length: int) -> tuple[float, int, int, int]:
    """(seconds, peak bytes, slack bytes, tokens) of the faster of two passes, each at a shape not seen before, as
    training's micro-batches mostly are (the host then chooses kernels for it)."""
    return min((*one_pass(model, rows, n), rows * n) for n in (length, length - 8))


def measured_line(model, mode: str, length: int, cap_tokens: int, passes: list) -> tuple[tuple, tuple]:
    """The two largest passes, (tokens, seconds) each, of the mode the model is set to: the rows double until a pass
    takes PASS_SECONDS or `cap_tokens` is reached. A fast card's short passes are bound by the host's launches (on the
    whole H200 one recomputed row of 1,024 tokens took 0.37 s and five rows 0.43 s), so only passes large enough to
    keep the GPU busy show what a token costs there."""
    sizes, rows = [], 1
    while True:
        sizes.append(timed(model, rows, max(8, length - 8 * len(sizes))))  # each size at lengths not seen before
        more = min(2 * rows, cap_tokens // length)
        if len(sizes) >= 2 and (sizes[-1][0] >= PASS_SECONDS or more <= rows):
            break
        rows = max(more, rows + 1)
    for seconds, peak, slack, tokens in sizes:
        passes.append({"mode": mode, "tokens": tokens, "seconds": seconds, "peak_bytes": peak, "slack_bytes": slack})
    return tuple((tokens, seconds) for seconds, _, _, tokens in sizes[-2:])


def slope(line: tuple[tuple, tuple]) -> float:
    (small_tokens, small), (large_tokens, large) = line
    return max((large - small) / (large_tokens - small_tokens), 1e-7)


def bounded(measured: dict, loaded: str, moved: float) -> dict:
    """Seconds a token of every mode, from the slopes `measured` (of `loaded` and, where it fitted, of keeping) and the
    seconds `moved` that offloading's moves take a token. Recomputing costs one more forward pass of each layer:
    between RECOMPUTE_AT_LEAST and RECOMPUTE_AT_MOST times keeping. The recompute passes reach large sizes on any card
    (their activations are small), so a keep slope outside that range is taken for passes too short to show it."""
    recompute = measured[loaded] - moved if loaded == "unsloth" else measured[loaded]
    keep = max(measured.get("false", recompute / RECOMPUTE_AT_LEAST), recompute / RECOMPUTE_AT_MOST)
    recompute = max(recompute, RECOMPUTE_AT_LEAST * keep)
    return {"false": keep, "true": recompute, "unsloth": max(measured.get("unsloth", 0.0), recompute + moved)}


def host_link_bytes_per_second() -> float:
    """Device to host and back through pinned memory, as offloaded checkpointing moves activations."""
    import torch

    size = 256 * MIB
    gpu = torch.empty(size, dtype=torch.uint8, device="cuda")
    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    host.copy_(gpu, non_blocking=True)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(2):
        host.copy_(gpu, non_blocking=True)
        gpu.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return 4 * size / (time.perf_counter() - started)


def optimizer_seconds(model) -> float:
    """One fused AdamW step over copies of the trainable (LoRA) weights, as the trainer's default optimizer."""
    import torch

    params = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    optimizer.step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(3):
        optimizer.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / 3


def measure(model, loaded: str, tokens_per_step: int, bytes_per_token: dict, max_length: int) -> dict:
    """The calibration record of the loaded model (checkpointed as `loaded`: true or unsloth): figures, the passes
    they come from, and how long measuring took. Rows stay within `max_length` (the model's max_seq_length: Unsloth's
    rotary tables end there, and a longer row indexes past them)."""
    import torch

    layers = len(decoder_layers(model))
    length = max(64, min(ROW, tokens_per_step // 2, max_length - 8) // 8 * 8)
    model.train()
    keep_activations(model, 0)
    first = one_pass(model, 1, length + 8)[0]  # the first pass compiles Unsloth's decoder blocks (training would)
    measuring = time.perf_counter()
    # what the passes may fill: the free memory and what the allocator holds unused, less the planner's margin
    room = USABLE * (torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated())
    room -= SLACK_EXTRA
    passes, lines = [], {}
    for mode, kept in ((loaded, 0), ("false", layers)):
        keep_activations(model, kept)
        cap = min(tokens_per_step, int(room // bytes_per_token[mode]))
        if cap < 128 and mode != loaded:  # not even two short rows fit: no plan could use it, so it is not measured
            continue
        # every mode at other lengths, so that none of its shapes was seen before
        mode_length = max(64, min(length, cap // 2) // 8 * 8) - 32 * len(lines)
        lines[mode] = measured_line(model, mode, mode_length, cap, passes)
        torch.cuda.empty_cache()  # so that the next mode's slack is its own, not this mode's cached blocks
    keep_activations(model, 0)
    link = host_link_bytes_per_second()
    # each layer's input, to host memory and back
    moved = 2 * layers * model.config.hidden_size * model.get_input_embeddings().weight.element_size() / link
    measured = {mode: slope(line) for mode, line in lines.items()}  # kept in the record, to see what bounded changed
    per_token = bounded(measured, loaded, moved)
    # the fixed time of a micro-batch: what the largest pass of each mode took beyond its tokens
    fixed = [max(0.0, line[1][1] - per_token[mode] * line[1][0]) for mode, line in lines.items()]
    step = optimizer_seconds(model)
    slack = max(passes, key=lambda p: p["peak_bytes"])["slack_bytes"]  # at the pass nearest the memory's end
    gc.collect()
    torch.cuda.empty_cache()
    seconds = time.perf_counter() - measuring
    share = os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
    figures = Figures(per_token, sum(fixed) / len(fixed), step, slack + SLACK_EXTRA,
                      source=f"measured on {torch.cuda.get_device_name()}" + (f" ({share}% of SMs)" if share else ""))
    return {"figures": figures.as_dict(), "seconds": seconds, "first_pass_seconds": first,
            "host_link_gb_per_s": link / 1e9, "row_length": length, "measured_seconds_per_token": measured,
            "passes": passes}


def describe(record: dict) -> str:
    f = Figures.from_dict(record["figures"])
    us = {name: f"{seconds * 1e6:,.0f}" for name, seconds in f.seconds_per_token.items()}
    how = (f"cached ({record['cached']})" if record.get("cached") else
           f"measured in {record['seconds']:.1f} s, after a first pass of {record['first_pass_seconds']:.1f} s "
           f"that compiles the model")
    return (f"calibration, {how}: {f.source}; per padded token {us['false']} us keeping activations, {us['true']} us "
            f"recomputing, {us['unsloth']} us offloading; {f.seconds_per_micro_batch:.3f} s a micro-batch, "
            f"{f.seconds_per_step:.3f} s an optimizer step; at least {f.reserve_bytes / GIB:.1f} GiB left free")


def main() -> None:
    """python -m qlora.calibrate [train_unsloth.py flags]: whether this card's figures are cached, and what they are."""
    from .config import TRAIN, parse

    config, _ = parse(TRAIN, main.__doc__)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("error: the calibration is of a CUDA GPU, and this machine has none (torch.cuda.is_available() "
                         "is False)")
    record = load_cached(card_key(config))
    print(describe(record) if record else f"calibration: nothing cached for this card in {cache_dir()}; the next "
          f"run measures it")


if __name__ == "__main__":
    main()
