"""The scripts' edge: every failure a user can cause ends in one `error:` line and a non-zero exit, never a traceback.

Each script runs its work inside `one_line_errors(...)`, naming the toolkit's own errors (each already one line that
names the file or setting and what to do). File-system failures on a user's path (an output folder that is a file,
a folder that cannot be written, a full disk) come as OSError from wherever they happen; they become one line naming
the path, so that no function needs its own try/except for them.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from .isolate import REBUILD_LLAMA_CPP

ADVICE = {
    errno.ENOSPC: "the disk is full: free some space or choose a folder on another disk",
    errno.EACCES: "choose a folder you can write to, or change its permissions",
    errno.EPERM: "choose a folder you can write to, or change its permissions",
    errno.EROFS: "the file system is read-only: choose a folder on another one",
    errno.ENOTDIR: "a file is where a folder should be: choose another path, or move the file",
    errno.EEXIST: "a file is where a folder should be: choose another path, or move the file",
    errno.EISDIR: "a folder is where a file should be: choose another path, or move the folder",
    errno.EDQUOT: "your disk quota is used up: free some space or choose a folder on another disk",
    errno.EFBIG: "the file is larger than this system lets a process write (ulimit -f): raise the limit",
    errno.EIO: "the disk failed to write: check it (df -h, dmesg) and try again",
}


class RunError(RuntimeError):
    """A training run that cannot go on as asked: one line naming the setting or folder and what to do."""


def missing_package(err: ModuleNotFoundError) -> str:
    """What to run for a package this Python lacks: llama.cpp's own install script, else the requirements (often the
    script was started with a Python other than the virtualenv's, so the message names it)."""
    if str(err.name).split(".")[0] in ("llama_cpp", "llama-cpp-python"):
        how = f"run `{REBUILD_LLAMA_CPP}`"
    else:
        how = ("install the requirements: `sh scripts/install_gpu.sh` on a GPU, or `bash scripts/setup.sh` on a CPU "
               "and run the scripts with .venv/bin/python")
    return f"the Python package {err.name!r} is not installed for {sys.executable}; {how}"


# How libraries that write files say a write failed without raising an OSError: torch.save's RuntimeError
# ("PytorchStreamWriter failed writing file ...: file write failed", "basic_ios::clear: iostream error", its zip
# writer's "unexpected pos" after a short write), safetensors' SafetensorError (an IoError), tokenizers' "os error"
WRITE_FAILED = ("write failed", "iostream error", "unexpected pos", "No space left on device", "StorageFull",
                "File too large", "FileTooLarge", "IoError")
NEARLY_FULL = 64 * 2**20  # free bytes under which a write that failed without an errno is taken for a full disk


def interpreter() -> str:
    """This Python as a command to copy: `python` where that is it on PATH (an activated virtualenv), else its path,
    relative where it lies below the working folder (`.venv/bin/python`): another Python may lack the packages."""
    here = os.path.abspath(sys.executable)
    on_path = shutil.which("python")
    if on_path and os.path.abspath(on_path) == here:
        return "python"
    relative = os.path.relpath(here)
    return here if relative.startswith("..") else relative


def describe(err: OSError) -> str:
    """`path: what happened; what to do` for an OSError (the toolkit's own, raised with a message, as it is)."""
    if err.filename is None:
        return f"{err.strerror}; {ADVICE[err.errno]}" if err.errno in ADVICE else str(err)
    return f"{err.filename}: {err.strerror or err}; {ADVICE.get(err.errno, 'check the path')}"


@contextmanager
def writing(path: str | Path, consequence: str = ""):
    """A failed write under `path` as an OSError naming it (and, in its words, the `consequence`), which the scripts'
    edge turns into one line with what to do: an OSError that names no file, and the write failures of libraries
    that raise their own errors instead (WRITE_FAILED)."""
    also = f" ({consequence})" if consequence else ""
    try:
        yield
    except OSError as err:
        if err.filename is not None and not consequence:
            raise
        raise OSError(err.errno, f"{err.strerror or err}{also}", err.filename or str(path)) from None
    except Exception as err:
        told = _chain(err)
        if not any(words in told for words in WRITE_FAILED):
            raise
        said = next((line for line in told.splitlines() if any(words in line for words in WRITE_FAILED)), "")
        code = errno.EFBIG if "too large" in said.lower() or "FileTooLarge" in said else \
            errno.ENOSPC if "No space" in said or "StorageFull" in said or nearly_full(Path(path)) else errno.EIO
        what = "No space left on device" if code == errno.ENOSPC else f"could not be written ({said})"
        raise OSError(code, f"{what}{also}", str(path)) from None


def _chain(err: BaseException) -> str:
    """The messages of an error and those it was raised during (torch's "unexpected pos" hides a "write failed")."""
    told = []
    while err is not None and len(told) < 8:
        told.append(str(err))
        err = err.__cause__ or err.__context__
    return "\n".join(told)


def nearly_full(path: Path) -> bool:
    """Whether the disk `path` is on (or would be) has so little room left that a failed write was for want of it."""
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    return shutil.disk_usage(existing).free < NEARLY_FULL


@contextmanager
def one_line_errors(*expected: type[Exception]):
    """Run a script's work: the `expected` errors, a missing package and any OSError end the script with one `error:`
    line."""
    try:
        yield
    except expected as err:
        sys.exit(f"error: {err}")
    except ModuleNotFoundError as err:  # also importlib.metadata's PackageNotFoundError
        sys.exit(f"error: {missing_package(err)}")
    except KeyboardInterrupt:  # Ctrl-C outside training (during it, qlora.train stops at the end of a step)
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as err:
        sys.exit(f"error: {describe(err)}")
