"""CPU time of a process tree from ``/proc`` (Linux), to show which side of the benchmark is saturated."""

from __future__ import annotations

import os
from pathlib import Path

_PROC = Path("/proc")
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: split after the last ')'.
    return text[text.rfind(")") + 2 :].split()


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (uvicorn's worker processes, for instance)."""
    parents: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found.extend(kids)
        todo.extend(kids)
    return found


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by ``pid`` and its descendants, those already waited for included.

    A descendant that ended in between (redis-server's forked AOF rewrite, for instance) is no longer listed;
    once its parent has waited for it, its time is in the parent's cutime/cstime, which are counted here.
    """
    total = 0
    for member in [pid, *children(pid)]:
        fields = _stat_fields(member)
        if fields is not None:
            # utime, stime, cutime, cstime: fields 14 to 17 of stat
            total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return total / _TICKS


def cpu_ticks() -> dict[str, tuple[int, int]]:
    """Per core, (busy, total) clock ticks since boot from ``/proc/stat`` (idle and iowait count as not busy)."""
    ticks: dict[str, tuple[int, int]] = {}
    for line in (_PROC / "stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            numbers = [int(v) for v in values[:8]]  # user nice system idle iowait irq softirq steal
            total = sum(numbers)
            ticks[name] = (total - numbers[3] - numbers[4], total)
    return ticks


def busy_between(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict[str, float]:
    """Fraction of each core that was busy between two ``cpu_ticks`` snapshots."""
    busy: dict[str, float] = {}
    for name, (busy_after, total_after) in after.items():
        busy_before, total_before = before.get(name, (0, 0))
        elapsed = total_after - total_before
        busy[name] = (busy_after - busy_before) / elapsed if elapsed > 0 else 0.0
    return busy
