"""CPU seconds a consumer's processes used, read from ``/proc`` (local servers only).

On a machine with few cores, wall time hides where the work goes: a consumer whose processes
need more CPU seconds per change drains slower as soon as the cores are all busy, whatever it
overlaps. Each process is read once the backlog is drained, while it still runs; every one of
them was started for this drain, so its total is the drain's work (the daemon's includes its
start-up).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

TICKS = os.sysconf("SC_CLK_TCK")


def process_seconds(pid: int) -> float | None:
    """User plus system CPU seconds of ``pid`` so far; None if it is gone or not readable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def process_faults(pid: int) -> int | None:
    """Minor page faults of ``pid`` so far: each maps a page the process touches for the first
    time, zeroed by the kernel; a process that frees its buffers to the system and allocates
    them again pays them batch after batch (see :mod:`cdcsync.allocator`)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[7])


def status_number(pid: int, field: str) -> int | None:
    """The number a line of ``/proc/PID/status`` gives ``field`` (``VmRSS`` in kB, ``Threads``,
    ...); None if the process is gone or has no such line."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def process_waits(pid: int) -> int | None:
    """How often ``pid`` gave the CPU up to wait (voluntary context switches): a walsender
    waits when its consumer's socket is full, a consumer when nothing has arrived."""
    return status_number(pid, "voluntary_ctxt_switches")


@dataclass(frozen=True)
class Spent:
    """What a consumer's processes used so far, per role: CPU seconds (:func:`usage`), waits
    (:func:`waits`) and minor page faults (:func:`faults`)."""

    cpu_s: dict[str, float]
    waits: dict[str, int]
    faults: dict[str, int]

    def since(self, before: Spent) -> Spent:
        """What was used between ``before`` and this reading."""
        return Spent({role: round(s - before.cpu_s.get(role, 0.0), 2)
                      for role, s in self.cpu_s.items()},
                     {role: w - before.waits.get(role, 0) for role, w in self.waits.items()},
                     {role: f - before.faults.get(role, 0) for role, f in self.faults.items()})


def spent(pids: dict[str, list[int]] | None) -> Spent | None:
    """The processes' use so far; None without processes (servers not local)."""
    return Spent(usage(pids), waits(pids), faults(pids)) if pids else None


def walsender_pid(source: psycopg.Connection[Any], slot: str) -> int | None:
    row = source.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s",
                         (slot,)).fetchone()
    return int(row[0]) if row and row[0] is not None else None


def usage(pids: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds per role, summed over its processes."""
    return {role: round(sum(s for pid in group if (s := process_seconds(pid)) is not None), 2)
            for role, group in pids.items()}


def faults(pids: dict[str, list[int]]) -> dict[str, int]:
    """Minor page faults (:func:`process_faults`) per role, summed over its processes."""
    return {role: sum(f for pid in group if (f := process_faults(pid)) is not None)
            for role, group in pids.items()}


def waits(pids: dict[str, list[int]]) -> dict[str, int]:
    """Waits (:func:`process_waits`) per role, summed over its processes."""
    return {role: sum(w for pid in group if (w := process_waits(pid)) is not None)
            for role, group in pids.items()}


def native_pids(source: psycopg.Connection[Any], target: psycopg.Connection[Any],
                subscription: str, slot: str) -> dict[str, list[int]]:
    """The subscription's apply worker on the target and its walsender on the source."""
    rows = target.execute("SELECT pid FROM pg_stat_subscription WHERE subname = %s "
                          "AND relid IS NULL AND pid IS NOT NULL", (subscription,)).fetchall()
    sender = walsender_pid(source, slot)
    return {"apply worker": [int(r[0]) for r in rows],
            "walsender": [sender] if sender is not None else []}


def cdcsync_pids(source: psycopg.Connection[Any], target: psycopg.Connection[Any],
                 daemon_pid: int, slot: str) -> dict[str, list[int]]:
    """The daemon, its target connections (all but ``target``'s own) and its walsender."""
    rows = target.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                          "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
                          ).fetchall()
    sender = walsender_pid(source, slot)
    return {"daemon": [daemon_pid], "target backends": [int(r[0]) for r in rows],
            "walsender": [sender] if sender is not None else []}
