"""How much RAM this process can still fill: what the machine has available (psutil's MemAvailable, page cache that
can be dropped included), or less where a memory cgroup limits the process (a container, `systemd-run -p MemoryMax`,
a cgroup v1 `memory.limit_in_bytes`), since that limit is what the kernel enforces, and evicts page cache against."""

from __future__ import annotations

from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
NO_LIMIT = 2**60  # cgroup v1 writes "no limit" as a page-rounded 2^63 - 1


def available_bytes() -> int:
    import psutil

    free = psutil.virtual_memory().available
    room = cgroup_room()
    return free if room is None else min(free, room)


def cgroup_room() -> int | None:
    """The memory cgroup's limit less what it holds beyond reclaimable file pages, or None without a limit."""
    try:
        memberships = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:  # not Linux
        return None
    for line in memberships:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            folder, files = CGROUP_ROOT, ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):  # cgroup v1
            folder, files = CGROUP_ROOT / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes",
                                                       "total_inactive_file")
        else:
            continue
        room = room_in(own_folder(folder, path), *files)
        if room is not None:
            return room
    return None


def own_folder(root: Path, path: str) -> Path:
    """The process's cgroup folder; inside a container's cgroup namespace its cgroup is the mount's root."""
    inside = root / path.lstrip("/")
    return inside if inside.is_dir() else root


def room_in(folder: Path, limit_file: str, usage_file: str, inactive_key: str) -> int | None:
    try:
        limit = (folder / limit_file).read_text().strip()
        usage = int((folder / usage_file).read_text())
        stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
    except (OSError, ValueError):
        return None
    if limit == "max" or int(limit) >= NO_LIMIT:
        return None
    return int(limit) - usage + int(stat.get(inactive_key, 0))
