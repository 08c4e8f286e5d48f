"""Odds-ratio preference optimisation: TRL's ORPOTrainer (trl.experimental.orpo) on prepared pairs (qlora/pairs.py),
with what every method's trainer shares (qlora/trainers.py). ORPO needs no reference model: its loss is the language-
model loss of the chosen conversation plus `beta` times the log odds ratio of the chosen over the rejected answer, so
it can start from the base without an SFT run first. The odds ratio is taken over the answers' tokens (the labels
here); the language-model loss, as TRL computes it after the ORPO authors' code, over the prompt's tokens as well.
"""

from __future__ import annotations

from .chat import IGNORE
from .config import Config
from .trainers import pair_arguments, run_trainer, with_early_stopping


def orpo_config(config: Config, backend: str, has_eval: bool, accumulation: int, resuming: bool, pad_id: int):
    from trl.experimental.orpo import ORPOConfig

    # max_length only bounds TRL's own tokenizing, which the prepared pairs skip (they are cut already)
    # the collator reads the pair's columns, which the model's forward does not name
    return ORPOConfig(**pair_arguments(config, backend, has_eval, accumulation, resuming), beta=config.beta,
                      max_length=config.max_seq_length, remove_unused_columns=False, padding_value=pad_id)


def orpo_row(row: dict) -> dict:
    """A prepared pair in the columns ORPOTrainer's collator reads: prompt + each answer, labels on the answer."""
    prompt = row["prompt_ids"]
    columns = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for answer in ("chosen", "rejected"):
        ids = prompt + row[f"{answer}_ids"]
        columns |= {f"{answer}_input_ids": ids, f"{answer}_attention_mask": [1] * len(ids),
                    f"{answer}_labels": [IGNORE] * len(prompt) + row[f"{answer}_ids"]}
    return columns


def on_prepared_pairs(trainer_class):
    """ORPOTrainer that takes the prepared ids as they are: its own tokenizing renders the pairs with the tokenizer's
    Hugging Face chat template, one `▁` away from Mistral's ids."""

    class PreparedPairsORPOTrainer(trainer_class):
        def tokenize_row(self, feature, model=None):
            return orpo_row(feature)

    return PreparedPairsORPOTrainer


def make_trainer(model, tokenizer, data, config: Config, backend: str, accumulation: int, meter, callbacks: list,
                 resuming: bool = False, kept=()):
    from trl.experimental.orpo import ORPOTrainer
    from trl.experimental.utils import DPODataCollatorWithPadding

    has_eval = "eval" in data
    pad_id = tokenizer.eos_token_id  # Mistral has no pad token: padded with EOS, masked out
    return run_trainer(on_prepared_pairs(ORPOTrainer), config, meter, kept)(
        model=model, args=orpo_config(config, backend, has_eval, accumulation, resuming, pad_id),
        data_collator=DPODataCollatorWithPadding(pad_token_id=pad_id),
        train_dataset=data["train"], eval_dataset=data["eval"] if has_eval else None, processing_class=tokenizer,
        callbacks=with_early_stopping(callbacks, config, has_eval))
