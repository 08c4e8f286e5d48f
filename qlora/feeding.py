"""Feeding the GPU: the micro-batches, accumulation and checkpointing of a run, resolved from `auto` by the planner
(qlora/planner.py) from the card's figures: this card's measured ones (qlora/calibrate.py, cached), measured on the
loaded model where none are cached yet, or the built-in ones. The resolved config holds the concrete plan, so that
--resume replays it."""

from __future__ import annotations

import dataclasses
import math

from . import calibrate, planner
from .config import Config
from .device import is_main_process, least_free_memory, processes
from .errors import RunError
from .model import load_for_training
from .planner import BYTES_PER_TOKEN, LAYERS, Figures


def plan_and_load(config: Config, backend: str, longest_row: int):
    """Plan the feeding from this card's cached figures (or the built-in ones) and load the model; where the card has
    not been measured yet, measure it on the loaded model and plan again. Returns (config, plan, model, tokenizer)."""
    calibration, measure = cached_calibration(config, backend)
    planned, feeding = plan_feeding(config, backend, longest_row,
                                    Figures.from_dict(calibration["figures"]) if calibration else None)
    if feeding and calibration:
        print(calibrate.describe(calibration))
        feeding["calibration"] = calibration
    if measure:  # loaded with every layer checkpointed, recomputed or offloaded as the built-in figures planned
        loading = "unsloth" if planned.gradient_checkpointing == "unsloth" else "true"
        planned = dataclasses.replace(planned, gradient_checkpointing=loading, checkpoint_skip_layers=0)
    model, tokenizer = load_for_training(planned, backend)
    if measure:
        planned, feeding = calibrated_feeding(model, config, planned, backend, longest_row, feeding["free_bytes"])
    if feeding:
        print(f"plan: {feeding['summary']}")
    return planned, feeding, model, tokenizer


def plan_feeding(config: Config, backend: str, longest_row: int, figures=None,
                 free: int | None = None) -> tuple[Config, dict | None]:
    """Resolve `token_budget`, `gradient_checkpointing` and `checkpoint_skip_layers` set to auto from the free GPU
    memory before the model is loaded (`free`, or read now) and the card's `figures` (qlora.planner; None: the
    built-in ones): the returned config holds the concrete micro-batch, accumulation and checkpointing, so that
    --resume replays them. With N processes each plans for its share of `tokens_per_step` in the least free memory
    among them, so the effective batch stays the same and every process cuts its steps alike."""
    budget_auto, checkpointing_auto = config.token_budget == "auto", config.gradient_checkpointing == "auto"
    skip_auto = config.checkpoint_skip_layers == "auto"
    share = max(longest_row, math.ceil(config.tokens_per_step / processes().num_processes))
    if skip_auto and (backend != "unsloth" or config.gradient_checkpointing in ("false", "unsloth")):
        # skipping layers is Unsloth's, and only where layers are recomputed
        config, skip_auto = dataclasses.replace(config, checkpoint_skip_layers=0), False
    if backend == "cpu":
        if budget_auto:
            config = dataclasses.replace(config, token_budget=share, gradient_accumulation_steps=1,
                                         keep_gradient_accumulation=True)
        return dataclasses.replace(config, gradient_checkpointing="false" if checkpointing_auto else
                                   config.gradient_checkpointing), None
    if not (budget_auto or checkpointing_auto or skip_auto):
        return config, None
    free = least_free_memory() if free is None else free
    # --backend hf has no offloading: its checkpointing recomputes
    checkpointing = "true" if backend == "hf" and config.gradient_checkpointing == "unsloth" else config.gradient_checkpointing
    reference = config.method == "dpo"  # a forward pass of the reference model over every pair
    if budget_auto:
        chosen = planner.plan(free, share, longest_row, backend, checkpointing, config.checkpoint_skip_layers, figures,
                              reference)
        config = dataclasses.replace(config, token_budget=chosen.micro_tokens, keep_gradient_accumulation=True,
                                     gradient_accumulation_steps=chosen.accumulation)
    else:  # a micro-batch size of the user's: only the checkpointing is chosen
        tokens = config.token_budget or config.per_device_train_batch_size * config.max_seq_length
        chosen = planner.plan(free, tokens, tokens, backend, checkpointing, config.checkpoint_skip_layers, figures,
                              reference)
    config = dataclasses.replace(config, gradient_checkpointing=chosen.checkpointing,
                                 checkpoint_skip_layers=chosen.skip_layers)
    return config, {**chosen.as_dict(), "figures": (figures or planner.DEFAULT_FIGURES[backend]).as_dict()}


def cached_calibration(config: Config, backend: str) -> tuple[dict | None, bool]:
    """(this card's cached calibration record or None, whether to measure the card once the model is loaded). Measured
    are Unsloth runs of one process whose checkpointing is left to the planner (the model is then loaded
    checkpointed, and set to the plan after measuring); other runs take a cached record where there is one."""
    planned = "auto" in (config.token_budget, config.gradient_checkpointing, config.checkpoint_skip_layers)
    if backend != "unsloth" or not config.calibrate or not planned:
        return None, False
    record = calibrate.load_cached(calibrate.card_key(config))
    can_measure = config.gradient_checkpointing == "auto" and processes().num_processes == 1
    if record and can_measure and calibrate.outgrown(record, least_free_memory()):
        print(f"note: this card's cached figures were measured with {record['free_bytes'] / 2**30:.1f} GiB free; "
              f"measuring again for the larger micro-batches that fit now")
        record = None
    return record, record is None and can_measure


def calibrated_feeding(model, config: Config, planned: Config, backend: str, longest_row: int, free: int):
    """Measure the card on the model (loaded checkpointed like `planned`), cache the figures, plan again from them for
    the `free` memory there was before loading, and set the model's layers to the plan. Returns (config, plan) as
    plan_feeding does."""
    import torch

    record, failed = None, None
    try:
        record = calibrate.measure(model, planned.gradient_checkpointing, config.tokens_per_step,
                                   BYTES_PER_TOKEN[backend], config.max_seq_length)
    except Exception as error:  # out of memory, or an Unsloth that changed: the run goes on with the built-in figures
        failed = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
    if record is None:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        print(f"note: measuring this GPU failed ({failed}); planning from the built-in figures")
        config, feeding = plan_feeding(config, backend, longest_row, free=free)
    else:
        record |= {"cached": None, "free_bytes": free}
        print(calibrate.describe(record))
        try:
            print(f"  kept in {calibrate.save(calibrate.card_key(config), record)}")
        except OSError as error:
            print(f"note: the calibration could not be cached ({error}); the next run measures again")
        config, feeding = plan_feeding(config, backend, longest_row, Figures.from_dict(record["figures"]), free)
        feeding["calibration"] = record
    calibrate.apply_plan(model, config.gradient_checkpointing, config.checkpoint_skip_layers)
    return config, feeding


def accumulation_for(config: Config, count: int) -> int:
    """Gradient accumulation per process. By default N processes accumulate N times less, so that the effective
    batch (per device x accumulation x processes) stays the one-process recipe's."""
    if config.keep_gradient_accumulation or count == 1:
        return config.gradient_accumulation_steps
    steps = max(1, config.gradient_accumulation_steps // count)
    if steps * count != config.gradient_accumulation_steps and is_main_process():
        print(f"note: accumulation {config.gradient_accumulation_steps} does not divide by {count} processes; "
              f"using {steps}, so the effective batch changes")
    return steps


def check_settings(config: Config, longest_row: int, has_eval: bool, backend: str = "unsloth") -> None:
    """Settings that the trainer would refuse (or ignore) only after the model is loaded, refused before."""
    skip = config.checkpoint_skip_layers
    if skip != "auto" and not 0 <= skip <= LAYERS:
        raise RunError(f"--checkpoint_skip_layers must be auto or 0 to {LAYERS} (Mistral-7B's layers), got {skip}")
    if backend != "unsloth" and skip not in ("auto", 0):
        raise RunError(f"--checkpoint_skip_layers is Unsloth's (--backend unsloth); with --backend {backend} leave it "
                       f"at auto")
    if config.gradient_checkpointing in ("false", "unsloth") and skip not in ("auto", 0):
        raise RunError(f"--checkpoint_skip_layers keeps layers out of recomputation: it needs --gradient_checkpointing "
                       f"true or auto, not {config.gradient_checkpointing}")
    if isinstance(config.token_budget, int) and config.token_budget < longest_row:
        raise RunError(f"--token_budget {config.token_budget} is smaller than the longest training row ({longest_row} "
                       f"tokens, padded); raise it, lower --max_seq_length, or use --token_budget auto")
    eval_steps = config.eval_steps or config.save_steps
    if config.early_stopping_patience is not None and has_eval and config.save_steps % eval_steps:
        raise RunError(f"--early_stopping_patience keeps the best evaluated checkpoint, so --save_steps "
                       f"({config.save_steps}) must be a multiple of --eval_steps ({eval_steps})")
