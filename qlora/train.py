"""Training: TRL's SFTTrainer on Mistral-exact, responses-only token ids, with LoRA adapters from qlora.model.

Read `run` and `train_run` top to bottom: lock and check the output folder, pick the checkpoint to resume from, prepare
the data, load the model, train (resumable, interruptible), save the adapter, write the reports.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path

import yaml

from . import atomic, report, runfolder
from .chat import find_tokenizer_file, load_prompt_format
from .config import FIELDS, TRAIN, Config, given_by, is_dump, show, to_yaml
from .data import PREPARED_MARK, is_prepared, load_prepared, prepare_dataset
from .errors import interpreter, writing
from .planner import LAYERS

STAGING = ".checkpoint-staging"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")  # the config last: it marks a finished adapter
# What a run writes into output_dir besides its checkpoint-N folders (README.md: PEFT's model card; export: where
# export_gguf.py writes by default): --overwrite_output_dir removes these and nothing else
RUN_FILES = ADAPTER_FILES + ("README.md", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                             "special_tokens_map.json", "chat_template.jinja", "config.yaml", "metrics.json",
                             "loss.png", "manifest.json", "profile.txt", "profile.trace.json.gz", "runs", "data",
                             "export", STAGING, ".adapter-staging")
# What a checkpoint fixes, so that --resume goes on only with them: the rows it is trained on (data settings, the base's
# tokenizer), the adapter's shape, and the optimizer and schedule whose state it holds
RESUME_FIXED = tuple(name for name, f in FIELDS.items() if f.metadata["group"] in ("data", "base")) + (
    "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "optim", "learning_rate", "lr_scheduler_type",
    "warmup_steps", "weight_decay")


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


def checkpoints(output_dir: Path) -> list[Path]:
    """The checkpoint-N folders, newest first. They appear under that name only once written (see _save_checkpoint)."""
    steps = [(int(p.name.split("-")[1]), p) for p in output_dir.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return [p for _, p in sorted(steps, reverse=True)]


def newest_complete_checkpoint(output_dir: Path) -> Path:
    """The newest checkpoint whose files all read back whole; damaged newer ones are named and passed over."""
    damaged = []
    for checkpoint in checkpoints(output_dir):
        problem = runfolder.checkpoint_problem(checkpoint)
        if problem is None:
            if damaged and is_main_process():
                print(f"note: {'; '.join(damaged)}; resuming from {checkpoint.name}, the newest complete checkpoint")
            return checkpoint
        damaged.append(f"{checkpoint.name} is damaged ({problem})")
    if damaged:
        raise RunError(f"{output_dir}: no complete checkpoint to resume from ({'; '.join(damaged)}); start over "
                       f"with --overwrite_output_dir")
    raise RunError(f"{output_dir}: no complete checkpoint to resume from; start without --resume")


def finished_steps(output_dir: Path) -> int | None:
    """The steps of the finished run in `output_dir` (its adapter and metrics.json, written last, are there)."""
    try:
        if (output_dir / "adapter_config.json").is_file():
            return json.loads((output_dir / "metrics.json").read_text(encoding="utf-8"))["global_step"]
    except (OSError, ValueError, KeyError):  # no metrics.json, or a damaged one: the run's end was not written
        pass
    return None


def holds_run(out: Path) -> bool:
    return out.is_dir() and ((out / "adapter_config.json").exists() or bool(checkpoints(out)))


def check_output_dir(config: Config) -> str | None:
    """Refuse to clobber a finished run; returns the checkpoint to resume from, if asked to resume."""
    out = Path(config.output_dir)
    if config.resume_from_checkpoint:
        checkpoint = Path(config.resume_from_checkpoint)
        problem = runfolder.checkpoint_problem(checkpoint) if checkpoint.is_dir() else "no such folder"
        if problem:
            raise RunError(f"{checkpoint}: not a complete checkpoint ({problem}); pass another, or --resume for the "
                           f"newest complete one")
        check_resumed_settings(config, checkpoint)
        return str(checkpoint)
    if config.resume:
        checkpoint = newest_complete_checkpoint(out)
        check_resumed_settings(config, checkpoint)
        return str(checkpoint)
    if holds_run(out):
        if not config.overwrite_output_dir:
            raise RunError(f"{out} already holds a run; pass --resume to continue it or --overwrite_output_dir "
                           f"to start over")
    return None  # an old run to overwrite stays until this one has its data and model (remove_old_run)


def check_resumed_settings(config: Config, checkpoint: Path) -> None:
    """Refuse to go on from `checkpoint` with settings other than its run's (its folder's config.yaml) that the
    checkpoint fixes: PEFT would stop on another rank with a traceback, and other data or a changed schedule would
    train silently into another model."""
    saved = checkpoint.parent / "config.yaml"
    try:
        run = yaml.safe_load(saved.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        run = None
    if not isinstance(run, dict):
        return  # no record of the run's settings
    differ = [name for name in RESUME_FIXED if name in run and run[name] != getattr(config, name)]
    if differ:
        raise RunError(f"{checkpoint} was trained with " + ", ".join(
            f"{name}: {run[name]!r} (given: {getattr(config, name)!r})" for name in differ) +
            "; a checkpoint goes on only with its run's settings: leave out " +
            ", ".join(f"--{name}" for name in differ) + f", or resume with --config {saved}")


def check_own_files(out: Path) -> None:
    """The run writes its files (RUN_FILES) into output_dir. In a folder no run has written to (no run, no config.yaml
    of a run's), a file of one of those names is the user's and would be replaced: refused, naming them. A README.md
    is kept instead (the run then writes no card); a prepared data/ folder is a killed run's own."""
    saved = out / "config.yaml"
    if saved.exists() and not holds_run(out) and not is_dump(saved):  # beside a run, it is the run's (maybe edited)
        raise RunError(f"{saved}: not the settings of a run (a preset of yours?), and the run writes its own there; "
                       f"choose another --output_dir, or move the file")
    if holds_run(out) or saved.exists():
        return
    theirs = [name for name in RUN_FILES if (out / name).exists() and name != "README.md"
              and not name.startswith(".") and not (name == "data" and is_prepared(out / name))]
    if theirs:
        raise RunError(f"{out}: holds {', '.join(theirs)}, which no run wrote and the run would replace; choose "
                       f"another --output_dir, or move them")


def is_model_card(path: Path) -> bool:
    """PEFT's model card (save_pretrained's README.md): YAML front matter naming the library; any other README.md in
    the output folder is the user's."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return text.startswith("---") and "library_name: peft" in text.split("\n---", 1)[0]


def check_reporting(config: Config) -> None:
    """--report_to names integrations of transformers that must be installed: checked before the model loads."""
    from transformers.integrations import get_available_reporting_integrations

    wanted = [name.strip() for name in config.report_to.split(",") if name.strip() not in ("none", "all")]
    missing = [name for name in wanted if name not in get_available_reporting_integrations()]
    if missing:
        raise RunError(f"--report_to {config.report_to}: {missing[0]} is not installed for {sys.executable} (or is "
                       f"not an integration of transformers); pip install {missing[0]}, or pass --report_to none")


def remove_old_run(out: Path, reads: Path) -> None:
    """--overwrite_output_dir, once the new run has checked its settings, prepared its data and loaded its model: the
    old run's files go; the user's other files in the folder stay, and so does the data folder this run reads."""
    for path in sorted(out.glob("checkpoint-*")) + [out / name for name in RUN_FILES]:
        if path.resolve() == reads.resolve() or not path.exists():
            continue
        if path.name == "README.md" and not is_model_card(path):
            continue  # the user's own README, not the card an earlier run wrote
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


@contextmanager
def output_lock(out: Path):
    """The main process locks the output folder (qlora.runfolder); the others learn whether it could, so that all
    go on or all stop."""
    from accelerate.utils import broadcast_object_list

    with ExitStack() as held:
        refusal = None
        if is_main_process():
            try:
                held.enter_context(runfolder.locked(out))
            except runfolder.Locked as err:
                refusal = str(err)
        refusal = broadcast_object_list([refusal])[0]
        if refusal:
            raise RunError(refusal)
        yield


# ---------------------------------------------------------------- data


def data_settings(config: Config | dict) -> dict:
    """The settings that decide the prepared token ids: the data group and the base (its tokenizer)."""
    values = dataclasses.asdict(config) if isinstance(config, Config) else config
    return {name: values.get(name) for name, f in FIELDS.items() if f.metadata["group"] in ("data", "base")}


def as_prepared(config: Config) -> Config:
    """With a data_prep output folder as --dataset, the data settings it was prepared with are the run's, so that
    config.yaml records what the model is trained on. A data setting given otherwise (not left at its default) cannot
    apply to rows tokenized already: refused. Its `dataset` names the raw source and its `seed` only split it."""
    saved = Path(config.dataset) / "config.yaml"
    if not is_prepared(config.dataset) or not saved.is_file():
        return config
    try:
        prepared = yaml.safe_load(saved.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise RunError(f"{saved}: not readable ({str(err).splitlines()[0]}); prepare {config.dataset} again") from None
    fixed = [name for name, f in FIELDS.items()
             if f.metadata["group"] == "data" and name not in ("dataset", "seed") and name in (prepared or {})]
    given = [name for name in fixed if getattr(config, name) not in (prepared[name], FIELDS[name].default)]
    if given:
        presets = list(dict.fromkeys(given_by(config, n) for n in given if given_by(config, n) != f"--{n}"))
        again = " ".join(["data_prep.py"] + [f"--config {preset}" for preset in presets])
        raise RunError(f"{config.dataset} was prepared with " + ", ".join(f"{n}: {prepared[n]!r}" for n in given) +
                       f", which --dataset cannot change; {leave_out(config, given, presets)}; or prepare it again "
                       f"with {again} (or give its raw data as --dataset)")
    config = dataclasses.replace(config, **{name: prepared[name] for name in fixed})
    check_prepared_tokenizer(config)
    return config


def check_prepared_tokenizer(config: Config) -> None:
    """The prepared rows are token ids of the tokenizer named in stats.json: the model trained on them must have the
    same (family and vocabulary), or every id would stand for another word."""
    stats = json.loads((Path(config.dataset) / PREPARED_MARK).read_text(encoding="utf-8"))
    tokenizer = find_tokenizer_file(config.model_name, config.tokenizer_name)
    model_has = load_prompt_format(tokenizer, config.template).description
    if stats.get("tokenizer") not in (None, model_has):
        raise RunError(f"{config.dataset} was prepared with the {stats['tokenizer']} tokenizer, but {tokenizer} is "
                       f"{model_has}: its token ids would mean other words to {config.model_name}; prepare the data "
                       f"again with data_prep.py --model_name {config.model_name} (or give the raw data as --dataset)")


def leave_out(config: Config, names: list[str], presets: list[str]) -> str:
    """What to leave out, by where each value came from: `leave out --a` for a flag given, `configs/x.yaml sets b: 1:
    leave b out of it` for a preset's value."""
    flags = [f"--{n}" for n in names if given_by(config, n) == f"--{n}"]
    parts = [f"leave out {', '.join(flags)}"] if flags else []
    for preset in presets:
        mine = [n for n in names if given_by(config, n) == preset]
        parts.append(f"{preset} sets " + ", ".join(f"{n}: {getattr(config, n)!r}" for n in mine) +
                     f": leave {', '.join(mine)} out of it")
    return "; ".join(parts)


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


def sft_config(config: Config, backend: str, has_eval: bool, accumulation: int, resuming: bool = False):
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
        # the starting eval loss, so the report shows what training changed (a resumed run has it already)
        eval_on_start=has_eval and not resuming,
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


def make_trainer(model, tokenizer, data, config: Config, backend: str, accumulation: int, meter, callbacks: list,
                 resuming: bool = False):
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
            name = f"checkpoint-{self.state.global_step}"
            # torch.save says a failed write (a full disk) in a RuntimeError naming no file
            lost = f"{name} is not saved, the older checkpoints are whole; resume with: {resume_command(final_dir)}"
            try:
                with writing(final_dir / STAGING / name, lost):
                    super()._save_checkpoint(model, trial)
            finally:
                self.args.output_dir = str(final_dir)
            meter.save(final_dir / STAGING / f"checkpoint-{self.state.global_step}", self.args.process_index)
            wait_for_everyone()  # every rank has written its part (each saves its own RNG state)
            if self.args.should_save:
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
    return Trainer(model=model, args=sft_config(config, backend, has_eval, accumulation, resuming),
                   train_dataset=data["train"], eval_dataset=data["eval"] if has_eval else None,
                   processing_class=tokenizer, callbacks=callbacks)


def resume_command(out: Path) -> str:
    return f"{interpreter()} train_unsloth.py --config {out / 'config.yaml'} --resume"


def close_progress_bars(trainer) -> None:
    for callback in trainer.callback_handler.callbacks:
        for bar in (getattr(callback, "training_bar", None), getattr(callback, "prediction_bar", None)):
            if bar is not None:
                bar.close()


class AtLastStep(Exception):
    """The checkpoint resumed from holds the run's last step: nothing is left to train."""


def stop_at_last_step():
    """A callback that ends train() before its first step when the resumed checkpoint is the last step (the Trainer
    would train one step past max_steps). The model and state are the checkpoint's by then."""
    from transformers import TrainerCallback

    class Callback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                raise AtLastStep

    return Callback()


class StopOnSignal:
    """Ctrl-C or SIGTERM asks the trainer to save a checkpoint at the end of the current step and stop; a second one
    stops at once, in one line (a third is the system's own: the process ends)."""

    def __init__(self, out: Path):
        from transformers import TrainerCallback

        self.received, self.out = None, out
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
        name = signal.Signals(signum).name
        if self.received:  # a second one: stop now. SystemExit unwinds like KeyboardInterrupt, without a traceback
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_DFL)
            print(f"\n{name} again: stopped at once, without a checkpoint of this step; resume from the newest one "
                  f"with: {resume_command(self.out)}", file=sys.stderr, flush=True)
            raise SystemExit(130 if name == "SIGINT" else 143)
        self.received = name
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


def plan_feeding(config: Config, backend: str, longest_row: int, figures=None,
                 free: int | None = None) -> tuple[Config, dict | None]:
    """Resolve `token_budget`, `gradient_checkpointing` and `checkpoint_skip_layers` set to auto from the free GPU
    memory before the model is loaded (`free`, or read now) and the card's `figures` (qlora.planner; None: the
    built-in ones): the returned config holds the concrete micro-batch, accumulation and checkpointing, so that
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
    free = least_free_memory() if free is None else free
    # --backend hf has no offloading: its checkpointing recomputes
    checkpointing = "true" if backend == "hf" and config.gradient_checkpointing == "unsloth" else config.gradient_checkpointing
    if budget_auto:
        chosen = planner.plan(free, share, longest_row, backend, checkpointing, config.checkpoint_skip_layers, figures)
        config = dataclasses.replace(config, token_budget=chosen.micro_tokens, keep_gradient_accumulation=True,
                                     gradient_accumulation_steps=chosen.accumulation)
    else:  # a micro-batch size of the user's: only the checkpointing is chosen
        tokens = config.token_budget or config.per_device_train_batch_size * config.max_seq_length
        chosen = planner.plan(free, tokens, tokens, backend, checkpointing, config.checkpoint_skip_layers, figures)
    config = dataclasses.replace(config, gradient_checkpointing=chosen.checkpointing,
                                 checkpoint_skip_layers=chosen.skip_layers)
    return config, {**chosen.as_dict(), "figures": (figures or planner.DEFAULT_FIGURES[backend]).as_dict()}


def cached_calibration(config: Config, backend: str) -> tuple[dict | None, bool]:
    """(this card's cached calibration record or None, whether to measure the card once the model is loaded). Measured
    are Unsloth runs of one process whose checkpointing is left to the planner (the model is then loaded
    checkpointed, and set to the plan after measuring); other runs take a cached record where there is one."""
    from . import calibrate

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

    from . import calibrate
    from .planner import BYTES_PER_TOKEN, Figures

    record, failed = None, None
    try:
        record = calibrate.measure(model, planned.gradient_checkpointing, config.tokens_per_step,
                                   BYTES_PER_TOKEN[backend])
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


def plan_and_load(config: Config, backend: str, longest_row: int):
    """Plan the feeding from this card's cached figures (or the built-in ones) and load the model; where the card has
    not been measured yet, measure it on the loaded model and plan again. Returns (config, plan, model, tokenizer)."""
    from . import calibrate
    from .model import load_for_training
    from .planner import Figures

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
            f"{resume_command(out)}, plus the flags above")


# ---------------------------------------------------------------- saving


def save_adapter(trainer, tokenizer, config: Config) -> None:
    """Adapter + tokenizer in output_dir (save_pretrained, safetensors), each file renamed into place when whole."""
    out = Path(config.output_dir)
    with writing(out / ".adapter-staging"), atomic.atomic_dir(out / ".adapter-staging") as tmp:
        trainer.model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # the base's own tokenizer file (tokenizer.model, or Tekken's tokenizer.json), which the prompt format, export
        # and llama.cpp all read: as it was, not as save_pretrained writes it again
        source = find_tokenizer_file(config.model_name, config.tokenizer_name)
        shutil.copyfile(source, tmp / source.name)
    staged = out / ".adapter-staging"
    if (out / "README.md").exists() and not is_model_card(out / "README.md"):
        (staged / "README.md").unlink(missing_ok=True)  # PEFT's model card: the user's README.md stays
        print(f"note: {out / 'README.md'} is not a model card of a run: kept as it is, without PEFT's card")
    names = sorted(p.name for p in staged.iterdir() if p.name not in ADAPTER_FILES) + list(ADAPTER_FILES)
    for name in names:
        os.replace(staged / name, out / name)
    staged.rmdir()


def run(config: Config, backend: str) -> int:
    """Train with `config` on `backend` (Unsloth already imported by the caller if chosen), one run at a time in the
    output folder. Returns an exit code."""
    out = Path(config.output_dir)
    with output_lock(out):
        steps = finished_steps(out) if config.resume else None
        if steps is not None:
            if is_main_process():
                print(f"{out}: the run is finished ({steps} steps; its adapter and metrics.json are there), nothing to "
                      f"resume. To train it further, pass --resume_from_checkpoint with one of its checkpoints and a "
                      f"larger --max_steps or --num_train_epochs")
            return 0
        return train_run(config, backend)


def train_run(config: Config, backend: str) -> int:
    import torch

    from transformers import set_seed

    from .batching import padded
    from .compat import patch_trl_without_triton

    check_reporting(config)
    # what `auto` became here: the config printed and saved says what ran (the CPU never loads 4-bit weights)
    config = dataclasses.replace(as_prepared(config), backend=backend,
                                 load_in_4bit=config.load_in_4bit and backend != "cpu")
    resume_from = check_output_dir(config)
    out = Path(config.output_dir)
    check_own_files(out)
    overwrite = config.overwrite_output_dir and resume_from is None and holds_run(out)
    if is_main_process():
        atomic.check_writable(out)
        shutil.rmtree(out / STAGING, ignore_errors=True)  # what a killed checkpoint write left behind
        atomic.remove_stale_temporaries(out)
    wait_for_everyone()
    data = load_data(config)
    longest_row = padded(max(len(ids) for ids in data["train"]["input_ids"]), config.pad_to_multiple_of)
    check_settings(config, longest_row, "eval" in data, backend)
    if patch_trl_without_triton():
        print("note: no Triton here; TRL's fused loss runs in plain PyTorch (qlora/compat.py)")
    set_seed(config.seed)  # the LoRA weights start the same in every run and in every process
    config, feeding, model, tokenizer = plan_and_load(config, backend, longest_row)
    if is_main_process():
        show(config, TRAIN)  # resolved: the backend, the prepared data's settings, the plan's micro-batches
        if overwrite:
            remove_old_run(out, reads=Path(config.dataset) if is_prepared(config.dataset) else out / "data")
        atomic.write_text(out / "config.yaml", to_yaml(config))
    wait_for_everyone()
    count = processes().num_processes
    accumulation = accumulation_for(config, count)
    if is_main_process():
        micro = (f"up to {config.token_budget} tokens" if config.token_budget
                 else f"{config.per_device_train_batch_size} rows")
        print(f"effective batch: {micro} per device x {accumulation} accumulation x {count} process(es); "
              f"precision: {precision()}")
    stop = StopOnSignal(out)
    meter = report.Meter()
    callbacks = [stop.callback, meter.callback]
    if config.profile_steps:
        callbacks.append(report.StepProfiler(out / "profile.txt", config.profile_steps).callback)
    if resume_from:
        callbacks.append(stop_at_last_step())
        restored = meter.restore(Path(resume_from), processes().process_index)
        if is_main_process():
            print(f"resuming from {resume_from}" + ("" if restored else "; it holds no token counts (written by an "
                                                    "older version), so metrics.json counts from here"))
    trainer = make_trainer(model, tokenizer, data, config, backend, accumulation, meter, callbacks,
                           resuming=bool(resume_from))
    meter.start()
    advice = None
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except torch.cuda.OutOfMemoryError as error:
        advice = oom_advice(config, error, trainer.state.global_step)
    except OSError:  # a full disk (qlora/errors.py says it in one line): the step's progress bar is closed first,
        close_progress_bars(trainer)  # or it would draw itself again at exit, after that line
        raise
    except AtLastStep:
        if is_main_process():
            print(f"{Path(resume_from).name} holds the run's last step: nothing left to train; writing the adapter "
                  f"from it")
    if advice:  # outside the except block, whose traceback holds the step's tensors
        print(f"{advice}\n{save_after_oom(trainer, config)}", file=sys.stderr)
        return 3
    if stop.received:
        print(f"stopped by {stop.received} at step {trainer.state.global_step}; a checkpoint is saved.\n"
              f"resume with: {resume_command(out)}")
        return 130 if stop.received == "SIGINT" else 143
    evaluated = [h["step"] for h in trainer.state.log_history if "eval_loss" in h]
    if "eval" in data and evaluated[-1:] != [trainer.state.global_step]:
        trainer.evaluate()  # the end of training, unless the last step was just evaluated
    meter.sum_over_processes()
    if trainer.is_world_process_zero():
        save_adapter(trainer, tokenizer, config)
        with writing(out):
            report.write_all(out, trainer, meter, config, data, wall_time=meter.seconds(), backend=backend,
                             plan=feeding)
    return 0
