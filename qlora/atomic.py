"""Write under a temporary name, rename when complete: a kill at any instant never leaves a final name half-written."""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path


def _temporary(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_dir(final: str | Path):
    """Yield a fresh temporary folder beside `final`; on success it replaces `final`, on any error it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def replace_dir(source: Path, final: Path) -> None:
    """Move a finished folder to its final name, moving any older one aside first (a rename cannot replace a folder)."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(source, final)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_path(final: str | Path):
    """Yield a temporary file path beside `final`, for writers that take a path (llama.cpp, safetensors)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(final)
    try:
        yield tmp
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(folder: Path, prefix: str = ".") -> None:
    """Temporaries of writers that were killed (their pid is gone): never final, only wasted space. `prefix` limits
    them to those of some names (`.export`: an export folder's staging folder)."""
    for tmp in [*folder.glob(f"{prefix}*.tmp-*"), *folder.glob(f"{prefix}*.old-*")]:
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()


def recover_dir(final: Path) -> None:
    """Undo `replace_dir` killed between its two renames: no `final`, the old folder aside under a dead pid. It is put
    back, so the next writer replaces it as if nothing had happened. An empty `final` (made since, by a check that the
    folder can be written) does not count: the old folder, with the user's files in it, goes back in its place."""
    if final.exists() and not (final.is_dir() and not any(final.iterdir())):
        return
    for old in final.parent.glob(f".{final.name}.old-*"):
        pid = old.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            if final.exists():
                final.rmdir()
            os.replace(old, final)
            return


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    return True


def check_writable(folder: str | Path) -> None:
    """Fail before the work, not after it, where its outputs cannot go: `folder` (made if missing) must take a file.
    The OSError names the folder (see qlora/errors.py)."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():  # the folder, or one it would be made in
        raise NotADirectoryError(errno.ENOTDIR, "is a file, not a folder", str(existing))
    folder.mkdir(parents=True, exist_ok=True)
    probe = _temporary(folder / "write-check")
    try:
        probe.touch()
    except OSError as err:
        raise type(err)(err.errno, err.strerror, str(folder)) from None
    probe.unlink()


def write_text(final: str | Path, text: str) -> None:
    with atomic_path(final) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
