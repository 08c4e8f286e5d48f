"""How a run stops before its end, and says how to go on: Ctrl-C or SIGTERM (a checkpoint after the current step),
a resumed checkpoint that holds the last step already, CUDA out of memory (what ran out, which settings to lower, the
last finished step checkpointed)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from .config import Config
from .device import local_device_index, processes
from .errors import interpreter


def resume_command(out: Path) -> str:
    return f"{interpreter()} train_unsloth.py --config {out / 'config.yaml'} --resume"


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


def oom_advice(config: Config, error: Exception, step: int) -> str:
    """What ran out and which settings to lower, read before anything is freed."""
    import torch

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


def close_progress_bars(trainer) -> None:
    for callback in trainer.callback_handler.callbacks:
        for bar in (getattr(callback, "training_bar", None), getattr(callback, "prediction_bar", None)):
            if bar is not None:
                bar.close()
