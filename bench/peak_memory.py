"""Peak memory of a command together with every process it starts (the GGUF converter, llama.cpp's check children).

Two figures, because llama.cpp memory-maps the GGUF files it reads:
- `max_rss`: the largest resident set of any one process of the tree: the most of each process's VmHWM (its
  high-water mark since it was exec'd) seen. It counts the pages of memory-mapped files that were read, which are page
  cache: the kernel drops them under memory pressure and reads them again when needed. Not `wait4`'s ru_maxrss (what
  `/usr/bin/time -v` prints): a child inherits its parent's RSS at fork as its own high-water mark and keeps it
  through exec, so a bench that had just built a 14.5 GB stand-in read 13.87 GiB for an export that never held 8.
- `peak_anon`: the most anonymous memory (heap, tensors: what must fit in RAM or swap) that the whole tree held at
  once, sampled every `interval` seconds as each process's proportional share (Pss_Anon of /proc/PID/smaps_rollup).
  Not RssAnon: a child between fork and exec reports all of its parent's pages, which it only shares, and a sample
  that fell there counted them twice (the same export measured 0.71, 0.99 and 1.57 GiB).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Measured:
    returncode: int
    seconds: float
    max_rss: int  # bytes: the largest VmHWM of one process
    peak_anon: int  # bytes
    peak_tree_rss: int  # bytes: RSS of the whole tree at once, mapped files included
    at_peak: list  # (anonymous bytes, command line) of each process at the anonymous peak, largest first
    at_rss_peak: list  # (RSS bytes, command line) of each process when the tree's RSS peaked, largest first


def tree(root: int) -> list[int]:
    """`root` and its descendants, from /proc/*/stat's parent ids."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # ended meanwhile
                continue
            parents[int(entry.name)] = int(fields[1])
    found, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def status_bytes(pid: int, *keys: str, table: str = "status") -> int:
    try:
        lines = Path(f"/proc/{pid}/{table}").read_text().splitlines()
    except OSError:
        return 0
    return sum(int(line.split()[1]) * 1024 for line in lines if line.split(":")[0] in keys)


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
    except OSError:
        return "?"


def measure(command: list[str], interval: float = 0.05, **popen) -> Measured:
    """Run `command` (subprocess.Popen arguments in `popen`) to its end, sampling its tree's memory."""
    start = time.perf_counter()
    process = subprocess.Popen(command, **popen)
    peaks = {"anon": 0, "rss": 0, "hwm": 0}
    at_peak, at_rss_peak = [], []
    done = threading.Event()

    def sample():
        while not done.is_set():
            pids = tree(process.pid)
            anon = {p: status_bytes(p, "Pss_Anon", table="smaps_rollup") for p in pids}
            if sum(anon.values()) > peaks["anon"]:
                peaks["anon"] = sum(anon.values())
                at_peak[:] = sorted(((size, command_line(p)) for p, size in anon.items()), reverse=True)
            rss = {p: status_bytes(p, "VmRSS") for p in pids}
            peaks["hwm"] = max([peaks["hwm"]] + [status_bytes(p, "VmHWM") for p in pids])
            if sum(rss.values()) > peaks["rss"]:
                peaks["rss"] = sum(rss.values())
                at_rss_peak[:] = sorted(((size, command_line(p)) for p, size in rss.items()), reverse=True)
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, _ = os.wait4(process.pid, 0)
    done.set()
    sampler.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    return Measured(process.returncode, time.perf_counter() - start, peaks["hwm"], peaks["anon"],
                    peaks["rss"], at_peak, at_rss_peak)


@contextmanager
def memory_cgroup(limit_gib: float | None):
    """A fresh memory cgroup limited to `limit_gib` (v2, else v1), as (command prefix that moves a command into it,
    a function reading its peak usage, page cache included); removed after. Without a limit, no prefix."""
    if limit_gib is None:
        yield [], lambda: None
        return
    v2 = Path("/sys/fs/cgroup/cgroup.controllers").is_file()
    folder = Path("/sys/fs/cgroup" if v2 else "/sys/fs/cgroup/memory") / f"qlora-bench-{os.getpid()}"
    folder.mkdir()
    try:
        (folder / ("memory.max" if v2 else "memory.limit_in_bytes")).write_text(str(int(limit_gib * 2**30)))
        peak = folder / ("memory.peak" if v2 else "memory.max_usage_in_bytes")
        # the shell joins the cgroup, then becomes the command
        yield ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(folder / "cgroup.procs")], lambda: int(peak.read_text())
    finally:
        remove_cgroup(folder)


def remove_cgroup(folder: Path, seconds: float = 30) -> None:
    """rmdir once the command's last process has left (multiprocessing's resource tracker outlives it briefly)."""
    deadline = time.monotonic() + seconds
    while (folder / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.5)
    try:
        folder.rmdir()
    except OSError as err:
        print(f"note: {folder} stays ({err.strerror}); rmdir it once its processes end")
