"""CPU time and memory of a server's process tree, read from /proc (Linux only).

A tree is the root process and its direct children: Granian's parent, its workers and, for the
gateway, the usage writer (the child whose comm is `usage-writer`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

TICK_S = 1 / os.sysconf("SC_CLK_TCK")
WRITER_COMM = "usage-writer"


@dataclass(frozen=True)
class Proc:
    """One process of a tree, classified by its role."""

    pid: int
    role: str  # "parent", "worker" or "writer"


@dataclass(frozen=True)
class Memory:
    """Resident memory in MiB: RSS counts pages shared with the parent after fork; USS
    (private pages) is what the worker costs on its own."""

    rss: float
    pss: float
    uss: float


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        # comm may hold spaces and parentheses: split after the last ')'.
        return f.read().rsplit(")", 1)[1].split()


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def tree(root: int) -> list[Proc]:
    """The root and its live children, classified."""
    procs = [Proc(root, "parent")]
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if int(_stat_fields(int(name))[1]) != root:
                continue
            role = "writer" if _comm(int(name)) == WRITER_COMM else "worker"
        except (OSError, IndexError):
            continue  # gone meanwhile
        procs.append(Proc(int(name), role))
    return procs


def cpu_by_role(procs: list[Proc]) -> dict[str, float]:
    """utime + stime in seconds per role (a process gone meanwhile counts 0)."""
    totals: dict[str, float] = {}
    for p in procs:
        try:
            fields = _stat_fields(p.pid)
        except OSError:
            continue
        ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
        totals[p.role] = totals.get(p.role, 0.0) + ticks * TICK_S
    return totals


def cpu_seconds(procs: list[Proc]) -> float:
    """utime + stime summed over the processes."""
    return sum(cpu_by_role(procs).values())


def find_pid(*argv: str) -> int | None:
    """The first process whose command line holds all of `argv`'s words."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                words = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if all(a in words for a in argv):
            return int(name)
    return None


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent not idle, summed over cores."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    guest = sum(fields[8:10])  # already counted in user and nice
    return (sum(fields) - idle - guest) * TICK_S


def memory(pid: int) -> Memory | None:
    """RSS, PSS and USS of one process, or None if it is gone."""
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[1].isdigit():
                    values[parts[0].rstrip(":")] = int(parts[1])
    except OSError:
        return None
    uss = values.get("Private_Clean", 0) + values.get("Private_Dirty", 0)
    return Memory(values.get("Rss", 0) / 1024, values.get("Pss", 0) / 1024, uss / 1024)


def worker_memory(procs: list[Proc]) -> dict[int, Memory]:
    """Memory of each worker (the writer and parent left out)."""
    out = {}
    for p in procs:
        if p.role == "worker" and (m := memory(p.pid)) is not None:
            out[p.pid] = m
    return out


def pin_tree(procs: list[Proc], cpus: set[int]) -> None:
    """Set the CPU affinity of every thread of every process (threads do not inherit a
    change made to another thread)."""
    for p in procs:
        try:
            tids = os.listdir(f"/proc/{p.pid}/task")
        except OSError:
            continue
        for tid in tids:
            with contextlib.suppress(OSError):  # thread ended meanwhile
                os.sched_setaffinity(int(tid), cpus)
