"""Training, top to bottom: `run` locks the output folder and sees whether the run is finished; `train` checks the
folder and picks the checkpoint to resume from, prepares the data, plans the feeding and loads the model, builds
TRL's trainer, trains (resumable, interruptible), saves the adapter and writes the reports. Each step is a module:

- runfolder: the output folder (the lock, checkpoints, a finished run, overwriting one) and the adapter saved whole;
- prepared: the rows trained on (a data_prep output folder, or prepared into output_dir/data), instruction rows for
  --method sft, preference pairs for dpo and orpo; init_adapter: an SFT run's adapter that dpo or orpo go on from;
- feeding: micro-batches, accumulation and checkpointing planned from the card's figures; the model (qlora/model.py);
- sft, dpo, orpo: TRL's SFTTrainer, DPOTrainer or ORPOTrainer (--method), with what every training method's trainer
  shares (qlora/trainers.py);
- stopping: Ctrl-C and SIGTERM, a resumed run's last step, out-of-memory advice;
- samples: greedy answers to a few held-out prompts at the start and at each evaluation;
- report: metrics.json, loss.png and manifest.json;
- model_card: the run's README.md, from those reports; push: the adapter and its card to the hub (--push_to_hub).
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

from . import atomic, dpo, orpo, report, sft
from .config import TRAIN, Config, show, to_yaml
from .data import is_prepared
from .device import is_main_process, precision, processes, wait_for_everyone
from .errors import writing
from .feeding import accumulation_for, check_settings, plan_and_load
from .init_adapter import with_init_adapter
from .prepared import as_prepared, check_method, load_data
from .push import push_run
from .runfolder import (STAGING, check_output_dir, check_own_files, finished_steps, holds_run, output_lock,
                        remove_old_run, save_adapter)
from .samples import Samples, read_prompts
from .stopping import (AtLastStep, StopOnSignal, close_progress_bars, oom_advice, resume_command, save_after_oom,
                       stop_at_last_step)

MAKE_TRAINER = {"sft": sft.make_trainer, "dpo": dpo.make_trainer, "orpo": orpo.make_trainer}  # by --method


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
        return train(config, backend)


def train(config: Config, backend: str) -> int:
    from transformers import set_seed

    from .batching import example_tokens
    from .compat import patch_trl_without_triton

    report.check_reporting(config)
    # what `auto` became here: the config printed and saved says what ran (the CPU never loads 4-bit weights)
    config = dataclasses.replace(as_prepared(config), backend=backend,
                                 load_in_4bit=config.load_in_4bit and backend != "cpu")
    check_method(config)  # pairs for dpo and orpo, instruction rows for sft: refused before anything is written
    config = with_init_adapter(config)
    asked = read_prompts(config)  # a bad --sample_prompts file is refused before anything is written
    resume_from, overwrite = ready_folder(config)
    data = load_data(config)
    longest_row = max(example_tokens(data["train"], config.pad_to_multiple_of))
    check_settings(config, longest_row, "eval" in data, backend)
    if patch_trl_without_triton():
        print("note: no Triton here; TRL's fused loss runs in plain PyTorch (qlora/compat.py)")
    set_seed(config.seed)  # the LoRA weights start the same in every run and in every process
    config, feeding, model, tokenizer = plan_and_load(config, backend, longest_row)
    record_settings(config, overwrite)
    accumulation = effective_batch(config)
    stop, meter = StopOnSignal(Path(config.output_dir)), report.Meter()
    samples = Samples.for_run(config, data, asked, backend)
    trainer = MAKE_TRAINER[config.method](model, tokenizer, data, config, backend, accumulation, meter,
                                          callbacks(config, stop, meter, samples, resume_from),
                                          resuming=bool(resume_from), kept=[samples])
    meter.start()
    stopped = train_steps(trainer, config, stop, resume_from)
    if stopped is not None:
        return stopped
    finish(trainer, tokenizer, config, data, meter, samples, backend, feeding)
    return 0


def ready_folder(config: Config) -> tuple[str | None, bool]:
    """The output folder checked (a run in it is resumed or, when asked, overwritten; the user's files are not), and
    what a killed run left cleared. Returns (the checkpoint to resume from or None, whether to overwrite a run)."""
    resume_from = check_output_dir(config)
    out = Path(config.output_dir)
    check_own_files(out)
    overwrite = config.overwrite_output_dir and resume_from is None and holds_run(out)
    if is_main_process():
        atomic.check_writable(out)
        shutil.rmtree(out / STAGING, ignore_errors=True)  # what a killed checkpoint write left behind
        atomic.remove_stale_temporaries(out)
    wait_for_everyone()
    return resume_from, overwrite


def record_settings(config: Config, overwrite: bool) -> None:
    """Once the data and model are ready: the resolved settings printed (the backend, the prepared data's settings,
    the plan's micro-batches) and saved as config.yaml, the old run's files gone when overwriting."""
    out = Path(config.output_dir)
    if is_main_process():
        show(config, TRAIN)
        if overwrite:
            remove_old_run(out, reads=Path(config.dataset) if is_prepared(config.dataset) else out / "data")
        atomic.write_text(out / "config.yaml", to_yaml(config))
    wait_for_everyone()


def effective_batch(config: Config) -> int:
    """Gradient accumulation per process, with the effective batch said."""
    count = processes().num_processes
    accumulation = accumulation_for(config, count)
    if is_main_process():
        micro = (f"up to {config.token_budget} tokens" if config.token_budget
                 else f"{config.per_device_train_batch_size} rows")
        print(f"effective batch: {micro} per device x {accumulation} accumulation x {count} process(es); "
              f"precision: {precision()}")
    return accumulation


def callbacks(config: Config, stop: StopOnSignal, meter: report.Meter, samples: Samples,
              resume_from: str | None) -> list:
    """The trainer's callbacks: signals, token counts, samples, the profiler; on resume, the meter's counts and the
    samples taken restored."""
    chosen = [stop.callback, meter.callback, samples.callback]
    if config.profile_steps:
        chosen.append(report.StepProfiler(Path(config.output_dir) / "profile.txt", config.profile_steps).callback)
    if resume_from:
        chosen.append(stop_at_last_step())
        samples.restore(Path(resume_from))
        restored = meter.restore(Path(resume_from), processes().process_index)
        if is_main_process():
            print(f"resuming from {resume_from}" + ("" if restored else "; it holds no token counts (written by an "
                                                    "older version), so metrics.json counts from here"))
    return chosen


def train_steps(trainer, config: Config, stop: StopOnSignal, resume_from: str | None) -> int | None:
    """trainer.train(); the exit code where the run stopped early (out of memory, a signal), None where it ended."""
    import torch

    out = Path(config.output_dir)
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
    return None


def finish(trainer, tokenizer, config: Config, data, meter: report.Meter, samples: Samples, backend: str,
           feeding: dict | None) -> None:
    """The last evaluation (unless the last step was just evaluated; samples are taken with it), the adapter, and the
    reports."""
    evaluated = [h["step"] for h in trainer.state.log_history if "eval_loss" in h]
    if "eval" in data and evaluated[-1:] != [trainer.state.global_step]:
        trainer.evaluate()
    meter.sum_over_processes()
    if trainer.is_world_process_zero():
        out = Path(config.output_dir)
        save_adapter(trainer, tokenizer, config)
        with writing(out):
            report.write_all(out, trainer, meter, config, data, wall_time=meter.seconds(), backend=backend,
                             plan=feeding, samples=samples.taken)
        if config.push_to_hub:  # once every file is written: a failed push loses none of them
            push_run(out, config.push_to_hub, config.hub_private)
