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

from .isolate import REBUILD_LLAMA_CPP

ADVICE = {
    errno.ENOSPC: "the disk is full: free some space or choose a folder on another disk",
    errno.EACCES: "choose a folder you can write to, or change its permissions",
    errno.EPERM: "choose a folder you can write to, or change its permissions",
    errno.EROFS: "the file system is read-only: choose a folder on another one",
    errno.ENOTDIR: "a file is where a folder should be: choose another path, or move the file",
    errno.EEXIST: "a file is where a folder should be: choose another path, or move the file",
    errno.EISDIR: "a folder is where a file should be: choose another path, or move the folder",
}


def missing_package(err: ModuleNotFoundError) -> str:
    """What to run for a package this Python lacks: llama.cpp's own install script, else the requirements (often the
    script was started with a Python other than the virtualenv's, so the message names it)."""
    if str(err.name).split(".")[0] in ("llama_cpp", "llama-cpp-python"):
        how = f"run `{REBUILD_LLAMA_CPP}`"
    else:
        how = ("install the requirements: `sh scripts/install_gpu.sh` on a GPU, or `bash scripts/setup.sh` on a CPU "
               "and run the scripts with .venv/bin/python")
    return f"the Python package {err.name!r} is not installed for {sys.executable}; {how}"


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
        return str(err)
    return f"{err.filename}: {err.strerror or err}; {ADVICE.get(err.errno, 'check the path')}"


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
