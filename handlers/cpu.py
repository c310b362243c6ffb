"""The CPU budget this process really has: its CPU affinity and its cgroup's CPU quota (v1 or v2).

`os.cpu_count()` counts the machine's cores; a container limited to 2 CPUs on a 64-core host, or a process
pinned with `taskset`, gets far less. Sizing thread pools from the machine's count oversubscribes the budget,
which on this project's benchmarks collapsed throughput (docs/benchmarks.md). Standard library only (no `ts`,
no torch), so handlers, benchmarks and the serving side share it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def affinity_cpus() -> int:
    """CPUs this process may run on (sched_getaffinity), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _mounts(mountinfo: Path) -> list[tuple[str, str, str, set[str]]]:
    """(mount point, root inside the hierarchy, fs type, super options) of every cgroup mount."""
    out = []
    for line in mountinfo.read_text().splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3 or not tail[0].startswith("cgroup"):
            continue
        out.append((fields[4], fields[3], tail[0], set(tail[2].split(","))))
    return out


def _limit(folder: Path, top: Path, read) -> float | None:
    """The smallest quota (in CPUs) from `folder` up to the mount point `top`: a parent's limit binds too."""
    best = None
    while True:
        value = read(folder)
        if value is not None:
            best = value if best is None else min(best, value)
        if folder == top or top not in folder.parents:
            return best
        folder = folder.parent


def _v2(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _v1(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def cgroup_cpu_limit(proc: str | os.PathLike = "/proc/self") -> float | None:
    """The CPU quota of this process's cgroup in CPUs (e.g. 1.5), or None when there is none (or no cgroup fs).
    cgroup v2 (`cpu.max`) and v1 (`cpu.cfs_quota_us` / `cpu.cfs_period_us`), ancestors included."""
    proc = Path(proc)
    try:
        groups = [line.split(":", 2) for line in (proc / "cgroup").read_text().splitlines() if line.count(":") >= 2]
        mounts = _mounts(proc / "mountinfo")
    except OSError:
        return None
    limits = []
    for hierarchy, controllers, path in groups:
        v2 = hierarchy == "0" and controllers == ""
        if not v2 and "cpu" not in controllers.split(","):
            continue
        for point, root, fstype, options in mounts:
            if (fstype == "cgroup2") != v2 or (not v2 and "cpu" not in options):
                continue
            rel = os.path.relpath(path, root) if path.startswith(root) else path.lstrip("/")
            top = Path(point)
            limit = _limit((top / rel).resolve() if rel != "." else top, top, _v2 if v2 else _v1)
            if limit is not None:
                limits.append(limit)
    return min(limits) if limits else None


def cpu_budget() -> int:
    """Whole CPUs this process can use: the affinity count, capped by the cgroup quota (rounded down, at least
    1: a thread pool sized above the quota is throttled)."""
    cpus = affinity_cpus()
    limit = cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, max(1, math.floor(limit)))
    return max(1, cpus)


def threads_per_worker(workers: int) -> int:
    """The CPU budget shared among `workers` processes, at least one thread each."""
    return max(1, cpu_budget() // max(1, workers))
