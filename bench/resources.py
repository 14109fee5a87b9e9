"""What a long-running daemon holds, sampled over time: the figures that must stay flat for a
process meant to stream for months.

Every ``interval`` seconds :class:`ResourceSampler` reads, for the daemon's process, its resident
memory, open file descriptors, threads and CPU seconds from ``/proc`` (the daemon runs on this
machine); and, from the servers, the daemon's connections to its target database (by
``application_name``, which every cdcsync connection sets) and the WAL its slot retains on the
source. A leak of any kind shows as a figure that keeps climbing from one window of a long run to
the next; one that levels off after the first minutes is a working set.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import psycopg

from bench.common import connect
from bench.cpu import process_seconds, status_number

RETAINED_WAL = ("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn) "
                "FROM pg_replication_slots WHERE slot_name = %s")
# The daemon's own sessions: the applier's workers, its lock, the jobs, the admin connection.
CONNECTIONS = ("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
               "AND application_name LIKE 'cdcsync%'")


@dataclass(frozen=True)
class Sample:
    at: float  # time.monotonic()
    rss_mb: float
    fds: int
    threads: int
    cpu_s: float
    target_connections: int
    retained_wal_mb: float

    def report(self) -> dict[str, Any]:
        """The sample as a bench's output shows it: without its clock reading."""
        fields = asdict(self)
        del fields["at"]
        return fields


class ResourceSampler(threading.Thread):
    """Samples the daemon ``pid`` (see the module docstring) until :meth:`finish`."""

    def __init__(self, pid: int, source_dsn: str, slot: str, target_dsn: str,
                 interval: float = 1.0) -> None:
        super().__init__(name=f"resources-{pid}", daemon=True)
        self.pid, self.slot, self.interval = pid, slot, interval
        self.source_dsn, self.target_dsn = source_dsn, target_dsn
        self.samples: list[Sample] = []
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            with connect(self.source_dsn) as source, connect(self.target_dsn) as target:
                while True:
                    self._sample(source, target)
                    if self._stop_event.wait(self.interval):
                        return
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def _sample(self, source: psycopg.Connection[Any], target: psycopg.Connection[Any]) -> None:
        rss_kb = status_number(self.pid, "VmRSS")
        threads = status_number(self.pid, "Threads")
        cpu_s = process_seconds(self.pid)
        try:
            fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return
        if rss_kb is None or threads is None or cpu_s is None:
            return
        retained = source.execute(RETAINED_WAL, (self.slot,)).fetchone()
        connections = target.execute(CONNECTIONS).fetchone()
        self.samples.append(Sample(
            at=time.monotonic(),
            rss_mb=round(rss_kb / 1024, 1), fds=fds, threads=threads, cpu_s=cpu_s,
            target_connections=int(connections[0]) if connections else 0,
            retained_wal_mb=round(float(retained[0] or 0) / (1 << 20), 1) if retained else 0.0))

    def finish(self) -> list[Sample]:
        """Stop sampling (call while the daemon still runs); the samples taken."""
        self._stop_event.set()
        self.join(timeout=10)
        if self.error is not None:
            raise self.error
        return self.samples
