"""A run's output folder: one run at a time writes into it (a lock); a folder holding another run or the user's files
is refused, and a finished run in it is replaced only when asked and only once the new run is ready; a checkpoint is
resumed from only with its run's settings and once every file in it has been read back complete; the adapter is
renamed into place when whole."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import zipfile
from contextlib import ExitStack, contextmanager
from pathlib import Path

from . import atomic
from .atomic import _alive, check_writable
from .chat import find_tokenizer_file
from .config import FIELDS, Config, ConfigError, is_dump, saved_settings
from .data import is_prepared
from .device import is_main_process
from .errors import RunError, writing
from .model_card import CARD, is_model_card

STAGING = ".checkpoint-staging"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")  # the config last: it marks a finished adapter
# What a run writes into output_dir besides its checkpoint-N folders (README.md: the run's model card; export: where
# export_gguf.py writes by default): --overwrite_output_dir removes these and nothing else
RUN_FILES = ADAPTER_FILES + ("README.md", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                             "special_tokens_map.json", "chat_template.jinja", "config.yaml", "metrics.json",
                             "loss.png", "manifest.json", "profile.txt", "profile.trace.json.gz", "runs", "data",
                             "export", STAGING, ".adapter-staging")
# What a checkpoint fixes, so that --resume goes on only with them: the rows it is trained on (data settings, the base's
# tokenizer), the adapter's shape, and the optimizer and schedule whose state it holds
RESUME_FIXED = tuple(name for name, f in FIELDS.items() if f.metadata["group"] in ("data", "base")) + (
    "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "optim", "learning_rate", "lr_scheduler_type",
    "warmup_steps", "weight_decay", "method", "beta", "init_adapter")
# What the Trainer reads back on resume; a missing optimizer.pt or scheduler.pt it skips without a word
CHECKPOINT_FILES = ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json", "optimizer.pt",
                    "scheduler.pt")
TORCH_SUFFIXES = (".pt", ".pth", ".bin")  # torch.save writes zip archives: their CRCs tell a damaged file


class Locked(RuntimeError):
    """The folder is in use by another run; the message names its pid."""


# ---------------------------------------------------------------- the lock


def lock_path(folder: str | Path) -> Path:
    """Beside the folder, not in it: a folder that is moved aside or swapped in keeps its lock where it was."""
    folder = Path(folder).resolve()
    return folder.with_name(f".{folder.name}.lock")


@contextmanager
def locked(folder: str | Path):
    """Hold `folder` for this process. The lock file names the holder's pid, host and script; the kernel's flock
    says whether it is still held, so a lock whose process is gone is stale (taken over) even when its pid was
    reused. On a file system without flock the pid alone decides."""
    path = lock_path(folder)
    try:
        check_writable(path.parent)  # made if missing
        descriptor = _acquire(path, Path(folder))
    except NotADirectoryError as err:  # a file where a folder of the path would go: name it
        raise Locked(f"{err.filename}: {err.strerror}; choose another output folder") from None
    except OSError as err:
        raise Locked(f"{path}: cannot write the lock file of {folder} ({err.strerror}); choose a folder you can "
                     f"write to") from None
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # before closing: whoever opens it next finds it gone and makes a new one
        os.close(descriptor)


def _acquire(path: Path, folder: Path) -> int:
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        holder = _holder(descriptor)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = False
        except BlockingIOError:
            held = True
        except OSError:  # no flock here (some network and FUSE file systems)
            held = holder is not None and _holder_alive(holder)
        if held:
            os.close(descriptor)
            raise Locked(f"{folder} is in use by {_describe(holder)}; wait for it to end, or stop it "
                         f"(lock file {path})")
        if _same_file(descriptor, path):
            break
        os.close(descriptor)  # its holder removed it while we opened it: lock the one that is there now
    if holder and holder.get("pid") != os.getpid():
        print(f"note: {path}: {_describe(holder)} is gone; taking its lock over", flush=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": Path(sys.argv[0]).name}
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, json.dumps(me).encode(), 0)
    return descriptor


def _holder(descriptor: int) -> dict | None:
    try:
        holder = json.loads(os.pread(descriptor, 4096, 0) or b"null")
    except ValueError:  # a lock file written half, or by something else
        return None
    return holder if isinstance(holder, dict) else None


def _holder_alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # another machine's process: it cannot be asked from here
    return isinstance(holder.get("pid"), int) and _alive(holder["pid"])


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another run"
    return f"pid {holder.get('pid')} ({holder.get('command')}) on {holder.get('host')}"


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(descriptor), os.stat(path))
    except FileNotFoundError:
        return False


@contextmanager
def output_lock(out: Path):
    """The main process locks the output folder; the others learn whether it could, so that all
    go on or all stop."""
    from accelerate.utils import broadcast_object_list

    with ExitStack() as held:
        refusal = None
        if is_main_process():
            try:
                held.enter_context(locked(out))
            except Locked as err:
                refusal = str(err)
        refusal = broadcast_object_list([refusal])[0]
        if refusal:
            raise RunError(refusal)
        yield


# ---------------------------------------------------------------- the run's folder


def check_output_dir(config: Config) -> str | None:
    """Refuse to clobber a finished run; returns the checkpoint to resume from, if asked to resume."""
    out = Path(config.output_dir)
    if config.resume_from_checkpoint:
        checkpoint = Path(config.resume_from_checkpoint)
        problem = checkpoint_problem(checkpoint) if checkpoint.is_dir() else "no such folder"
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


def check_resumed_settings(config: Config, checkpoint: Path) -> None:
    """Refuse to go on from `checkpoint` with settings other than its run's (its folder's config.yaml) that the
    checkpoint fixes: PEFT would stop on another rank with a traceback, and other data or a changed schedule would
    train silently into another model."""
    saved = checkpoint.parent / "config.yaml"
    try:
        run = saved_settings(saved)
    except ConfigError:
        run = None
    if run is None:
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


# ---------------------------------------------------------------- checkpoints


def checkpoints(output_dir: Path) -> list[Path]:
    """The checkpoint-N folders, newest first. They appear under that name only once written (see _save_checkpoint)."""
    steps = [(int(p.name.split("-")[1]), p) for p in output_dir.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return [p for _, p in sorted(steps, reverse=True)]


def newest_complete_checkpoint(output_dir: Path) -> Path:
    """The newest checkpoint whose files all read back whole; damaged newer ones are named and passed over."""
    damaged = []
    for checkpoint in checkpoints(output_dir):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            if damaged and is_main_process():
                print(f"note: {'; '.join(damaged)}; resuming from {checkpoint.name}, the newest complete checkpoint")
            return checkpoint
        damaged.append(f"{checkpoint.name} is damaged ({problem})")
    if damaged:
        raise RunError(f"{output_dir}: no complete checkpoint to resume from ({'; '.join(damaged)}); start over "
                       f"with --overwrite_output_dir")
    raise RunError(f"{output_dir}: no complete checkpoint to resume from; start without --resume")


def checkpoint_problem(checkpoint: Path) -> str | None:
    """The first reason `checkpoint` cannot be resumed from exactly, or None: every file the Trainer reads present,
    and every file there read back whole (safetensors header and size, JSON, torch zip archives and their CRCs)."""
    missing = [name for name in CHECKPOINT_FILES if not (checkpoint / name).is_file()]
    if not list(checkpoint.glob("rng_state*.pth")):
        missing.append("rng_state.pth")
    if missing:
        return f"{', '.join(missing)} missing"
    for file in sorted(p for p in checkpoint.iterdir() if p.is_file()):
        problem = file_problem(file)
        if problem:
            return f"{file.name}: {problem}"
    return None


def file_problem(file: Path) -> str | None:
    try:
        if file.suffix == ".safetensors":
            return safetensors_problem(file)
        if file.suffix == ".json":
            json.loads(file.read_text(encoding="utf-8"))
        elif file.suffix in TORCH_SUFFIXES:
            return torch_archive_problem(file)
    except (OSError, UnicodeDecodeError, ValueError, zipfile.BadZipFile) as err:
        return f"unreadable ({str(err).splitlines()[0]})"
    return None


def safetensors_problem(file: Path) -> str | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, "pt"):  # reads the header and checks that the tensors it lists fill the file
            return None
    except SafetensorError as err:
        return f"damaged ({err})"


def torch_archive_problem(file: Path) -> str | None:
    """torch.save's zip archive checked without unpickling it: complete, and every member's CRC right."""
    if not zipfile.is_zipfile(file):
        return "damaged (not a complete torch archive)"
    with zipfile.ZipFile(file) as archive:
        bad = archive.testzip()
    return f"damaged ({bad} fails its CRC)" if bad else None


# ---------------------------------------------------------------- the adapter


def save_adapter(trainer, tokenizer, config: Config) -> None:
    """Adapter + tokenizer in output_dir (save_pretrained, safetensors), each file renamed into place when whole."""
    out = Path(config.output_dir)
    with writing(out / ".adapter-staging"), atomic.atomic_dir(out / ".adapter-staging") as tmp:
        # the trained adapter only: DPO keeps a frozen copy of the starting one as its reference ("ref")
        trainer.model.save_pretrained(tmp, safe_serialization=True, selected_adapters=["default"])
        tokenizer.save_pretrained(tmp)
        # the base's own tokenizer file (tokenizer.model, or Tekken's tokenizer.json), which the prompt format, export
        # and llama.cpp all read: as it was, not as save_pretrained writes it again
        source = find_tokenizer_file(config.model_name, config.tokenizer_name)
        shutil.copyfile(source, tmp / source.name)
    staged = out / ".adapter-staging"
    (staged / CARD).unlink(missing_ok=True)  # PEFT's generic card: the run writes its own once its reports are written
    if (out / CARD).exists() and not is_model_card(out / CARD):
        print(f"note: {out / CARD} is not a model card of a run: kept as it is, without the run's card")
    names = sorted(p.name for p in staged.iterdir() if p.name not in ADAPTER_FILES) + list(ADAPTER_FILES)
    for name in names:
        os.replace(staged / name, out / name)
    staged.rmdir()
