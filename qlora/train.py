"""Training: TRL's SFTTrainer on Mistral-exact, responses-only token ids, with LoRA adapters from qlora.model.

Read `run` top to bottom: check the output folder, prepare the data, load the model, train (resumable, interruptible),
save the adapter, write the reports.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import yaml

from . import atomic, report
from .chat import find_tokenizer_file
from .config import FIELDS, Config, to_yaml
from .data import is_prepared, load_prepared, prepare_dataset
from .planner import LAYERS

GROUPS = ("data", "base", "model", "train")
STAGING = ".checkpoint-staging"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")  # the config last: it marks a finished adapter


class RunError(RuntimeError):
    pass


# ---------------------------------------------------------------- output folder and checkpoints


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


def last_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint-N. Checkpoints appear under that name only once complete (see _save_checkpoint)."""
    steps = [(int(p.name.split("-")[1]), p) for p in output_dir.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return max(steps)[1] if steps else None


def check_output_dir(config: Config) -> str | None:
    """Refuse to clobber a finished run; returns the checkpoint to resume from, if asked to resume."""
    out = Path(config.output_dir)
    if config.resume_from_checkpoint:
        if not Path(config.resume_from_checkpoint, "trainer_state.json").is_file():
            raise RunError(f"{config.resume_from_checkpoint}: not a complete checkpoint folder")
        return config.resume_from_checkpoint
    if config.resume:
        checkpoint = last_checkpoint(out) if out.exists() else None
        if checkpoint is None:
            raise RunError(f"{out}: no complete checkpoint to resume from; start without --resume")
        return str(checkpoint)
    if out.exists() and ((out / "adapter_config.json").exists() or last_checkpoint(out)):
        if not config.overwrite_output_dir:
            raise RunError(f"{out} already holds a run; pass --resume to continue it or --overwrite_output_dir "
                           f"to start over")
        if is_main_process():
            shutil.rmtree(out)
    return None


# ---------------------------------------------------------------- data


def data_settings(config: Config | dict) -> dict:
    """The settings that decide the prepared token ids: the data group and the base (its tokenizer)."""
    values = dataclasses.asdict(config) if isinstance(config, Config) else config
    return {name: values.get(name) for name, f in FIELDS.items() if f.metadata["group"] in ("data", "base")}


def load_data(config: Config):
    """A data_prep output folder as is, or the configured data set prepared into output_dir/data by the same code
    (again when a run left one there that was prepared with other data settings)."""
    if is_prepared(config.dataset):
        return load_prepared(config.dataset)
    data_dir = Path(config.output_dir) / "data"
    stale = is_prepared(data_dir) and data_settings(yaml.safe_load((data_dir / "config.yaml").read_text())) != \
        data_settings(config)
    if (stale or not is_prepared(data_dir)) and is_main_process():
        if stale:
            print(f"note: {data_dir} was prepared with other data settings; preparing it again")
        prepare_dataset(config, data_dir)
    wait_for_everyone()
    return load_prepared(data_dir)


# ---------------------------------------------------------------- the trainer


def precision() -> str:
    """Mixed precision of the run: bf16 where the GPU has it, fp16 with a gradient scaler where not (T4), fp32 on a CPU."""
    import torch

    if not torch.cuda.is_available():
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def sft_config(config: Config, backend: str, has_eval: bool, accumulation: int):
    import torch
    from trl import SFTConfig

    on_gpu = torch.cuda.is_available()
    eval_steps = config.eval_steps or config.save_steps
    early_stopping = config.early_stopping_patience is not None and has_eval
    return SFTConfig(
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
        eval_on_start=has_eval,  # the starting eval loss, so the report shows what training changed
        load_best_model_at_end=early_stopping,
        metric_for_best_model="eval_loss" if early_stopping else None,
        seed=config.seed,
        data_seed=config.seed,
        report_to=config.report_to,
        # The rows are already Mistral ids with -100 on the prompt (the `labels` column is used as is); dynamic
        # padding per batch. Packing goes padding-free, which needs max_length=None; rows are truncated already.
        max_length=None if config.packing else config.max_seq_length,
        pad_to_multiple_of=config.pad_to_multiple_of,
        packing=config.packing,
        padding_free=config.packing,  # explicit: otherwise Unsloth turns padding-free on by itself
        dataset_kwargs={"skip_prepare_dataset": not config.packing},
    )


def make_trainer(model, tokenizer, data, config: Config, backend: str, accumulation: int, meter, callbacks: list):
    from transformers import EarlyStoppingCallback
    from trl import SFTTrainer

    from .batching import TokenBudgetBatches

    class Trainer(SFTTrainer):
        def _get_train_sampler(self, train_dataset=None):
            if not config.token_budget:
                return super()._get_train_sampler(train_dataset)
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            return TokenBudgetBatches([len(ids) for ids in dataset["input_ids"]], config.token_budget, config.seed,
                                      rank=self.args.process_index, world=self.args.world_size,
                                      multiple=config.pad_to_multiple_of or 1)

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
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.output_dir = str(final_dir)
            wait_for_everyone()  # every rank has written its part (each saves its own RNG state)
            if self.args.should_save:
                name = f"checkpoint-{self.state.global_step}"
                atomic.replace_dir(final_dir / STAGING / name, final_dir / name)
                shutil.rmtree(final_dir / STAGING)  # and the model card the trainer wrote beside it
                if self.state.best_model_checkpoint:
                    self.state.best_model_checkpoint = str(final_dir / Path(self.state.best_model_checkpoint).name)
                from transformers.trainer_utils import rotate_checkpoints

                rotate_checkpoints(output_dir=str(final_dir), save_total_limit=self.args.save_total_limit,
                                   best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)

    has_eval = "eval" in data
    if config.early_stopping_patience is not None and has_eval:
        callbacks = callbacks + [EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience)]
    return Trainer(model=model, args=sft_config(config, backend, has_eval, accumulation), train_dataset=data["train"],
                   eval_dataset=data["eval"] if has_eval else None, processing_class=tokenizer, callbacks=callbacks)


class StopOnSignal:
    """Ctrl-C or SIGTERM asks the trainer to save a checkpoint at the end of the current step and stop."""

    def __init__(self):
        from transformers import TrainerCallback

        self.received = None
        outer = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if outer.received:
                    control.should_save = True
                    control.should_training_stop = True

        self.callback = Callback()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.received:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        print(f"\n{self.received}: saving a checkpoint after this step, then stopping (again to abort)", flush=True)


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


def least_free_memory() -> int:
    """The free memory of this process's GPU, or under torchrun the least free on any of the run's GPUs: every
    process must plan the same micro-batches a step, or their gradient exchanges would not meet."""
    import torch

    from .model import local_device_index

    free = torch.cuda.mem_get_info(local_device_index())[0]
    if processes().num_processes == 1:
        return free
    least = torch.tensor([free], device=processes().device)
    torch.distributed.all_reduce(least, op=torch.distributed.ReduceOp.MIN)
    return int(least.item())


def plan_feeding(config: Config, backend: str, longest_row: int) -> tuple[Config, dict | None]:
    """Resolve `token_budget`, `gradient_checkpointing` and `checkpoint_skip_layers` set to auto from the free GPU
    memory (qlora.planner): the returned config holds the concrete micro-batch, accumulation and checkpointing, so that
    --resume replays them. With N processes each plans for its share of `tokens_per_step` in the least free memory
    among them, so the effective batch stays the same and every process cuts its steps alike."""
    from . import planner

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
    free = least_free_memory()
    # --backend hf has no offloading: its checkpointing recomputes
    checkpointing = "true" if backend == "hf" and config.gradient_checkpointing == "unsloth" else config.gradient_checkpointing
    if budget_auto:
        chosen = planner.plan(free, share, longest_row, backend, checkpointing, config.checkpoint_skip_layers)
        config = dataclasses.replace(config, token_budget=chosen.micro_tokens, keep_gradient_accumulation=True,
                                     gradient_accumulation_steps=chosen.accumulation)
    else:  # a micro-batch size of the user's: only the checkpointing is chosen
        tokens = config.token_budget or config.per_device_train_batch_size * config.max_seq_length
        chosen = planner.plan(free, tokens, tokens, backend, checkpointing, config.checkpoint_skip_layers)
    config = dataclasses.replace(config, gradient_checkpointing=chosen.checkpointing,
                                 checkpoint_skip_layers=chosen.skip_layers)
    print(f"plan: {chosen.summary()}")
    return config, chosen.as_dict()


def oom_advice(config: Config, error: Exception, step: int) -> str:
    """What ran out and which settings to lower, read before anything is freed."""
    import torch

    from .model import local_device_index

    device = local_device_index()
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    if config.token_budget:
        batch = f"--token_budget (now {config.token_budget})"
    else:
        batch = (f"--per_device_train_batch_size (now {config.per_device_train_batch_size}; raise "
                 f"--gradient_accumulation_steps to keep the effective batch)")
    lower = [batch, f"--max_seq_length (now {config.max_seq_length})"]
    if config.gradient_checkpointing == "true" and config.checkpoint_skip_layers:
        lower.append(f"--checkpoint_skip_layers (now {config.checkpoint_skip_layers})")
    if config.gradient_checkpointing == "false":
        lower.append("or turn on --gradient_checkpointing true (now false)")
    return (f"CUDA out of memory at step {step + 1}: peak {peak:.1f} GiB allocated of {total:.1f} GiB on this GPU.\n"
            f"Lower {', '.join(lower)}, or let the planner choose (--token_budget auto --gradient_checkpointing auto "
            f"--checkpoint_skip_layers auto, "
            f"the defaults), with other programs on this GPU closed.\n({str(error).splitlines()[0]})")


def save_after_oom(trainer, config: Config) -> str:
    """Checkpoint the last finished step (when no checkpoint holds it yet) and say how to go on."""
    import torch

    torch.cuda.empty_cache()
    out = Path(config.output_dir)
    step = trainer.state.global_step
    if step == 0:
        return "No step had finished, so there is nothing to resume: rerun with the lower settings."
    if processes().num_processes > 1:
        return f"Step {step} had finished; with several processes the checkpoint is not written after an error."
    if not (out / f"checkpoint-{step}").is_dir():
        trainer._save_checkpoint(trainer.model, None)
    return (f"Step {step} is in {out / f'checkpoint-{step}'}; go on from it with the lower settings: "
            f"python train_unsloth.py --config {out / 'config.yaml'} --resume, plus the flags above")


# ---------------------------------------------------------------- saving


def save_adapter(trainer, tokenizer, config: Config) -> None:
    """Adapter + tokenizer in output_dir (save_pretrained, safetensors), each file renamed into place when whole."""
    out = Path(config.output_dir)
    with atomic.atomic_dir(out / ".adapter-staging") as tmp:
        trainer.model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # the base's own tokenizer file (tokenizer.model, or Tekken's tokenizer.json), which the prompt format, export
        # and llama.cpp all read: as it was, not as save_pretrained writes it again
        source = find_tokenizer_file(config.model_name, config.tokenizer_name)
        shutil.copyfile(source, tmp / source.name)
    staged = out / ".adapter-staging"
    names = sorted(p.name for p in staged.iterdir() if p.name not in ADAPTER_FILES) + list(ADAPTER_FILES)
    for name in names:
        os.replace(staged / name, out / name)
    staged.rmdir()


def run(config: Config, backend: str) -> int:
    """Train with `config` on `backend` (Unsloth already imported by the caller if chosen). Returns an exit code."""
    import torch

    from transformers import set_seed

    from .batching import padded
    from .compat import patch_trl_without_triton
    from .model import load_for_training

    resume_from = check_output_dir(config)
    out = Path(config.output_dir)
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(out / STAGING, ignore_errors=True)  # what a killed checkpoint write left behind
    wait_for_everyone()
    data = load_data(config)
    longest_row = padded(max(len(ids) for ids in data["train"]["input_ids"]), config.pad_to_multiple_of)
    check_settings(config, longest_row, "eval" in data, backend)
    config, feeding = plan_feeding(config, backend, longest_row)
    if is_main_process():
        atomic.write_text(out / "config.yaml", to_yaml(config))
    if patch_trl_without_triton():
        print("note: no Triton here; TRL's fused loss runs in plain PyTorch (qlora/compat.py)")
    set_seed(config.seed)  # the LoRA weights start the same in every run and in every process
    model, tokenizer = load_for_training(config, backend)
    count = processes().num_processes
    accumulation = accumulation_for(config, count)
    if is_main_process():
        micro = (f"up to {config.token_budget} tokens" if config.token_budget
                 else f"{config.per_device_train_batch_size} rows")
        print(f"effective batch: {micro} per device x {accumulation} accumulation x {count} process(es); "
              f"precision: {precision()}")
    stop = StopOnSignal()
    meter = report.Meter()
    callbacks = [stop.callback, meter.callback]
    if config.profile_steps:
        callbacks.append(report.StepProfiler(out / "profile.txt", config.profile_steps).callback)
    trainer = make_trainer(model, tokenizer, data, config, backend, accumulation, meter, callbacks)
    if resume_from:
        print(f"resuming from {resume_from}")
    started = time.time()
    advice = None
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except torch.cuda.OutOfMemoryError as error:
        advice = oom_advice(config, error, trainer.state.global_step)
    if advice:  # outside the except block, whose traceback holds the step's tensors
        print(f"{advice}\n{save_after_oom(trainer, config)}", file=sys.stderr)
        return 3
    if stop.received:
        print(f"stopped by {stop.received} at step {trainer.state.global_step}; a checkpoint is saved.\n"
              f"resume with: python train_unsloth.py --config {out / 'config.yaml'} --resume")
        return 130 if stop.received == "SIGINT" else 143
    evaluated = [h["step"] for h in trainer.state.log_history if "eval_loss" in h]
    if "eval" in data and evaluated[-1:] != [trainer.state.global_step]:
        trainer.evaluate()  # the end of training, unless the last step was just evaluated
    meter.sum_over_processes()
    if trainer.is_world_process_zero():
        save_adapter(trainer, tokenizer, config)
        report.write_all(out, trainer, meter, config, data, wall_time=time.time() - started, backend=backend,
                         plan=feeding)
    return 0
