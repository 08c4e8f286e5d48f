"""What the trainer of every training method shares (qlora/sft.py, qlora/dpo.py, qlora/orpo.py): the
Trainer arguments that come from the run's settings, and the Trainer subclass that feeds micro-batches by token
budget, counts the tokens it trains on, and writes each checkpoint whole."""

from __future__ import annotations

import shutil
from pathlib import Path

from . import atomic
from .config import Config
from .device import precision, wait_for_everyone
from .errors import writing
from .runfolder import STAGING
from .stopping import resume_command


def training_arguments(config: Config, backend: str, has_eval: bool, accumulation: int, resuming: bool) -> dict:
    """transformers' TrainingArguments from the run's settings, as keywords for any TRL config (SFTConfig, ...)."""
    import torch

    on_gpu = torch.cuda.is_available()
    eval_steps = config.eval_steps or config.save_steps
    early_stopping = config.early_stopping_patience is not None and has_eval
    return dict(
        output_dir=config.output_dir,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=max(1, (config.token_budget or 0) // config.max_seq_length,
                                       config.per_device_train_batch_size),
        gradient_accumulation_steps=accumulation,
        learning_rate=config.learning_rate,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        # bitsandbytes' 8-bit AdamW synchronises with the GPU after every parameter; the LoRA states are small anyway
        optim=config.optim if config.optim != "auto" else ("adamw_torch_fused" if on_gpu else "adamw_torch"),
        bf16=precision() == "bf16",
        fp16=precision() == "fp16",
        use_cpu=not on_gpu,  # also what makes torchrun's processes on a CPU train together (gloo)
        # every LoRA weight gets a gradient each step: DDP need not search the graph for unused ones
        ddp_find_unused_parameters=False,
        # Unsloth brings its own gradient checkpointing; on the other backends the Trainer turns it on
        gradient_checkpointing=config.gradient_checkpointing != "false" and backend != "unsloth",
        logging_steps=config.logging_steps,
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps,
        # the starting eval loss, so the report shows what training changed (a resumed run has it already)
        eval_on_start=has_eval and not resuming,
        load_best_model_at_end=early_stopping,
        metric_for_best_model="eval_loss" if early_stopping else None,
        seed=config.seed,
        data_seed=config.seed,
        report_to=config.report_to,
    )


def pair_arguments(config: Config, backend: str, has_eval: bool, accumulation: int, resuming: bool) -> dict:
    """training_arguments for a preference method: a pair is two sequences, so an evaluation batch takes half the
    rows."""
    arguments = training_arguments(config, backend, has_eval, accumulation, resuming)
    return arguments | {"per_device_eval_batch_size": max(1, arguments["per_device_eval_batch_size"] // 2)}


def with_early_stopping(callbacks: list, config: Config, has_eval: bool) -> list:
    from transformers import EarlyStoppingCallback

    if config.early_stopping_patience is not None and has_eval:
        return callbacks + [EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience)]
    return callbacks


def run_trainer(trainer_class, config: Config, meter, kept=()):
    """`trainer_class` (TRL's SFTTrainer, ...) feeding micro-batches of up to config.token_budget tokens, counting
    the training batches' tokens in `meter` (report.Meter), and writing each checkpoint whole: with the meter's
    counts and the state of each of `kept` (`save(checkpoint, rank)`: the samples taken, qlora/samples.py) in it."""
    from .batching import TokenBudgetBatches, example_tokens

    class Trainer(trainer_class):
        def _get_train_sampler(self, train_dataset=None):
            if not config.token_budget:
                return super()._get_train_sampler(train_dataset)
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            return TokenBudgetBatches(example_tokens(dataset, config.pad_to_multiple_of), config.token_budget,
                                      config.seed, rank=self.args.process_index, world=self.args.world_size)

        def get_train_dataloader(self):
            """Training batches go through the meter's counting collator (evaluation batches do not)."""
            collate = self.data_collator
            self.data_collator = meter.counting(collate)
            try:
                return super().get_train_dataloader()
            finally:
                self.data_collator = collate

        def _save_checkpoint(self, model, trial):
            """Write each checkpoint into a staging folder and rename it when complete, so a kill at any instant
            never leaves a checkpoint-N that looks complete and is not."""
            final_dir = Path(self.args.output_dir)
            self.args.output_dir = str(final_dir / STAGING)
            name = f"checkpoint-{self.state.global_step}"
            # torch.save says a failed write (a full disk) in a RuntimeError naming no file
            lost = f"{name} is not saved, the older checkpoints are whole; resume with: {resume_command(final_dir)}"
            try:
                with writing(final_dir / STAGING / name, lost):
                    super()._save_checkpoint(model, trial)
            finally:
                self.args.output_dir = str(final_dir)
            for part in (meter, *kept):
                part.save(final_dir / STAGING / name, self.args.process_index)
            wait_for_everyone()  # every rank has written its part (each saves its own RNG state)
            if self.args.should_save:
                atomic.replace_dir(final_dir / STAGING / name, final_dir / name)
                shutil.rmtree(final_dir / STAGING)  # and the model card the trainer wrote beside it
                if self.state.best_model_checkpoint:
                    self.state.best_model_checkpoint = str(final_dir / Path(self.state.best_model_checkpoint).name)
                from transformers.trainer_utils import rotate_checkpoints

                rotate_checkpoints(output_dir=str(final_dir), save_total_limit=self.args.save_total_limit,
                                   best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)

    return Trainer
