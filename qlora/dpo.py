"""Direct preference optimisation: TRL's DPOTrainer on prepared pairs (qlora/pairs.py: Mistral-exact ids, the prompt
shared by both answers, only the answers trained), with what every method's trainer shares (qlora/trainers.py).

The reference is the policy's own start, with no second copy of the base in memory: TRL keeps a frozen copy of the
LoRA adapter as it was before the first step (of an SFT run's adapter with --init_adapter; of a new adapter it is the
base itself) and runs the reference pass through it, without gradients.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .config import Config
from .trainers import pair_arguments, run_trainer, with_early_stopping


REFERENCE_ADAPTER = "ref"  # the name TRL gives the frozen copy of the starting adapter


def dpo_config(config: Config, backend: str, has_eval: bool, accumulation: int, resuming: bool = False):
    from trl import DPOConfig

    return DPOConfig(
        **pair_arguments(config, backend, has_eval, accumulation, resuming),
        beta=config.beta,
        max_length=None,  # pairs are cut to max_seq_length already, the prompt kept whole
    )


def on_prepared_pairs(trainer_class):
    """DPOTrainer that trains on the prepared ids as they are: its own tokenizing would render the pairs with the
    tokenizer's Hugging Face chat template, one `▁` away from Mistral's ids."""

    class PreparedPairsDPOTrainer(trainer_class):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

        def _save_checkpoint(self, model, trial):
            """Checkpoints without the reference adapter ("ref", a subfolder): it is the starting adapter, made again
            from it when a run resumes, and where a checkpoint holds adapters in subfolders transformers resumes only
            those, leaving the trained one as it started."""
            super()._save_checkpoint(model, trial)
            checkpoint = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
            shutil.rmtree(checkpoint / REFERENCE_ADAPTER, ignore_errors=True)

    return PreparedPairsDPOTrainer


def make_trainer(model, tokenizer, data, config: Config, backend: str, accumulation: int, meter, callbacks: list,
                 resuming: bool = False, kept=()):
    from trl import DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    has_eval = "eval" in data
    # padded with EOS, masked out (Mistral has no pad token), to a multiple of pad_to_multiple_of
    collator = DataCollatorForPreference(pad_token_id=tokenizer.eos_token_id,
                                         pad_to_multiple_of=config.pad_to_multiple_of)
    return run_trainer(on_prepared_pairs(DPOTrainer), config, meter, kept)(
        model=model, args=dpo_config(config, backend, has_eval, accumulation, resuming), data_collator=collator,
        train_dataset=data["train"], eval_dataset=data["eval"] if has_eval else None, processing_class=tokenizer,
        callbacks=with_early_stopping(callbacks, config, has_eval))
