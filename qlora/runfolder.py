"""A run's output folder kept whole: one run at a time writes into it (a lock), and a checkpoint is resumed from only
once every file in it has been read back complete."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path

from .atomic import _alive, check_writable

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


# ---------------------------------------------------------------- checkpoints


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
