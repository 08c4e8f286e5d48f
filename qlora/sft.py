"""Supervised fine-tuning: TRL's SFTTrainer on the prepared rows, Mistral-exact token ids with the prompt masked
(-100 in `labels`), with what every method's trainer shares (qlora/trainers.py)."""

from __future__ import annotations

from .config import Config
from .trainers import run_trainer, training_arguments, with_early_stopping


def sft_config(config: Config, backend: str, has_eval: bool, accumulation: int, resuming: bool = False):
    from trl import SFTConfig

    return SFTConfig(
        **training_arguments(config, backend, has_eval, accumulation, resuming),
        # The rows are already Mistral ids with -100 on the prompt (the `labels` column is used as is); dynamic
        # padding per batch. Packing goes padding-free, which needs max_length=None; rows are truncated already.
        max_length=None if config.packing else config.max_seq_length,
        pad_to_multiple_of=config.pad_to_multiple_of,
        packing=config.packing,
        padding_free=config.packing,  # explicit: otherwise Unsloth turns padding-free on by itself
        dataset_kwargs={"skip_prepare_dataset": not config.packing},
    )


def make_trainer(model, tokenizer, data, config: Config, backend: str, accumulation: int, meter, callbacks: list,
                 resuming: bool = False, kept=()):
    from trl import SFTTrainer

    has_eval = "eval" in data
    return run_trainer(SFTTrainer, config, meter, kept)(
        model=model, args=sft_config(config, backend, has_eval, accumulation, resuming),
        train_dataset=data["train"], eval_dataset=data["eval"] if has_eval else None, processing_class=tokenizer,
        callbacks=with_early_stopping(callbacks, config, has_eval))
