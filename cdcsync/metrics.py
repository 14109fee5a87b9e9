"""Every cdcsync metric, declared once, on an injectable registry.

Names follow ``cdcsync_<what>_<unit>`` and are a contract with dashboards and
``deploy/prometheus/alerts.yml``: rename nothing here without changing both. Every series carries
a ``slot`` label, so that several pipelines scraped by one Prometheus stay apart.

The daemon calls the small typed methods of :class:`Metrics`; nothing else touches
``prometheus_client``. A missing value (``None`` passed to :meth:`Metrics.slot`) removes the
series instead of exporting NaN: in PromQL an absent series simply matches nothing (and
``absent()`` can alert on it), while a NaN sample would silently make every comparison false.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

OPS: Final = frozenset({"insert", "update", "delete", "truncate", "copy"})
WAL_STATUSES: Final = ("reserved", "extended", "unreserved", "lost")

# One batch is one target transaction: from a single-row commit on an idle source (about 1 ms)
# to a slow merge of max_rows rows; past 30 s the exact figure no longer matters.
BATCH_SECONDS_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
# Rows per batch, including the bounds of [apply] max_rows = "auto" (20,000 near the target,
# 60,000 far from it) as bucket edges.
BATCH_ROWS_BUCKETS: Final = (
    1, 5, 10, 50, 100, 500, 1_000, 5_000, 10_000, 20_000, 50_000, 60_000, 100_000,
)


class Metrics:
    """The metrics of one pipeline (one slot). Thread-safe: any thread may call any method.

    Series that only have the ``slot`` label exist from construction (counters at 0,
    ``cdcsync_up`` at 0), so that ``increase()`` sees the first event of a fresh process.
    """

    # generate_latest() writes text format 0.0.4 whatever the client library's "latest" is.
    CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(
        self,
        slot: str,
        registry: CollectorRegistry | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # A private registry by default: the global one would collide when tests (or a demo)
        # build several pipelines in one process, and would mix in process/GC collectors.
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.slot_name = slot
        self._clock = clock
        self._lock = threading.Lock()
        self._lag_at: tuple[float, float] | None = None  # (seconds, clock() when reported)
        self._statuses: list[str] = list(WAL_STATUSES)
        self._declare()

    def _declare(self) -> None:
        reg, slot = self.registry, self.slot_name
        self._lag = Gauge("cdcsync_lag_seconds", "Now minus the source commit time of the newest "
                          "applied transaction or heartbeat.", ["slot"], registry=reg)
        self._pending = Gauge("cdcsync_slot_pending_bytes", "Source's current WAL position minus "
                              "the checkpoint.", ["slot"], registry=reg)
        self._retained = Gauge("cdcsync_slot_retained_wal_bytes", "WAL the slot holds on the "
                               "source (current WAL position minus restart_lsn).", ["slot"],
                               registry=reg)
        self._wal_status = Gauge("cdcsync_slot_wal_status", "1 for the slot's current "
                                 "pg_replication_slots.wal_status, 0 for the others.",
                                 ["slot", "status"], registry=reg)
        self._safe = Gauge("cdcsync_slot_safe_wal_size_bytes", "WAL that can still be written "
                           "before the slot is in danger of being lost (set only when "
                           "max_slot_wal_keep_size is).", ["slot"], registry=reg)
        self._applied = Counter("cdcsync_applied_changes", "Row changes applied to the target.",
                                ["slot", "table", "op"], registry=reg)
        self._conflicts = Counter("cdcsync_conflicts", "Changes that lost to a newer target row.",
                                  ["slot", "table"], registry=reg)
        self._dead_letters = Counter("cdcsync_dead_letters", "Changes the target rejected, set "
                                     "aside in cdcsync.dead_letters.", ["slot", "table"],
                                     registry=reg)
        self._stored = Gauge("cdcsync_stored_rows", "Rows in cdcsync.conflicts and "
                             "cdcsync.dead_letters, as of the last retention run.",
                             ["slot", "kind"], registry=reg)
        self._errors = Counter("cdcsync_errors", "Errors by kind, retried or not.",
                               ["slot", "kind"], registry=reg)
        # Children bound once: these series exist (at zero) from the first scrape.
        self._transactions = Counter("cdcsync_applied_transactions", "Source transactions "
                                     "applied.", ["slot"], registry=reg).labels(slot)
        self._batch_seconds = Histogram("cdcsync_batch_seconds", "Duration of one target "
                                        "transaction.", ["slot"], registry=reg,
                                        buckets=BATCH_SECONDS_BUCKETS).labels(slot)
        self._batch_rows = Histogram("cdcsync_batch_rows", "Rows merged by one target "
                                     "transaction.", ["slot"], registry=reg,
                                     buckets=BATCH_ROWS_BUCKETS).labels(slot)
        self._batch_limit = Gauge("cdcsync_batch_rows_limit", "Rows a batch merges at most: "
                                  "[apply] max_rows, or what \"auto\" chose for the link to "
                                  "the target.", ["slot"], registry=reg).labels(slot)
        self._round_trip = Gauge("cdcsync_target_round_trip_seconds", "The target's round trip "
                                 "as the batches measured it: the shortest recent wait for a "
                                 "batch's COPY to start.", ["slot"], registry=reg).labels(slot)
        self._checkpoint = Gauge("cdcsync_checkpoint_lsn", "The checkpoint LSN as a number.",
                                 ["slot"], registry=reg).labels(slot)
        self._up = Gauge("cdcsync_up", "1 while the pipeline is running, 0 otherwise.",
                         ["slot"], registry=reg).labels(slot)
        self._standby = Gauge("cdcsync_standby", "1 while this process waits as a standby "
                              "because another one holds the slot's lock, 0 otherwise.",
                              ["slot"], registry=reg).labels(slot)
        self._verify_differences = Gauge(
            "cdcsync_verify_differences", "Keys whose rows differ between source and target, "
            "as the scheduled verification last found them.", ["slot", "table"], registry=reg)
        self._verify_full_pass = Gauge(
            "cdcsync_verify_last_full_pass_timestamp_seconds", "Unix time at which the scheduled "
            "verification last finished comparing every range of every table.", ["slot"],
            registry=reg)

    def applied(self, table: str, op: str, count: int) -> None:
        """Count ``count`` changes of ``op`` (insert, update, delete, truncate) on ``table``."""
        if op not in OPS:
            # A free-form op would grow label cardinality without bound; it is a caller bug.
            raise ValueError(f"op must be one of {sorted(OPS)}, not {op!r}")
        self._applied.labels(self.slot_name, table, op).inc(count)

    def transactions(self, count: int) -> None:
        """Count source transactions applied (committed on the target)."""
        self._transactions.inc(count)

    def conflicts(self, table: str, count: int) -> None:
        """Count changes to ``table`` that lost to the conflict rule."""
        self._conflicts.labels(self.slot_name, table).inc(count)

    def dead_letters(self, table: str, count: int) -> None:
        """Count changes to ``table`` the target rejected and cdcsync set aside."""
        self._dead_letters.labels(self.slot_name, table).inc(count)

    def stored_rows(self, conflicts: int, dead_letters: int) -> None:
        """Export how many conflicts and dead letters the target holds now."""
        self._stored.labels(self.slot_name, "conflicts").set(float(conflicts))
        self._stored.labels(self.slot_name, "dead_letters").set(float(dead_letters))

    def batch(self, seconds: float, rows: int) -> None:
        """Observe one committed target transaction."""
        self._batch_seconds.observe(seconds)
        self._batch_rows.observe(rows)

    def batch_limit(self, rows: int, round_trip_s: float | None) -> None:
        """Export the batches' row limit and the round trip it was chosen for (if measured)."""
        self._batch_limit.set(rows)
        if round_trip_s is not None:
            self._round_trip.set(round_trip_s)

    def checkpoint(self, lsn: int) -> None:
        """Export the checkpoint LSN (a float: exact below 2**53, i.e. 8 PiB of WAL)."""
        self._checkpoint.set(float(lsn))

    def error(self, kind: str) -> None:
        """Count one error; ``kind`` should come from a small fixed set (e.g. the class name)."""
        self._errors.labels(self.slot_name, kind).inc()

    def set_up(self, up: bool) -> None:
        """1 while the pipeline runs (streaming or catching up), 0 when halted or stopped."""
        self._up.set(1.0 if up else 0.0)

    def set_standby(self, standby: bool) -> None:
        """1 while another process holds the slot's lock and this one waits to take over.

        Entering standby also makes the lag unknown (NaN): a lag that kept aging here would
        raise lag alerts about a slot that the active process keeps up to date.
        """
        self._standby.set(1.0 if standby else 0.0)
        if standby:
            with self._lock:
                self._lag_at = None
    def verify_differences(self, table: str, count: int) -> None:
        """Export the differing keys the scheduled verification knows of in ``table``."""
        self._verify_differences.labels(self.slot_name, table).set(float(count))

    def verify_full_pass(self, timestamp: float) -> None:
        """Record that every range of every table was compared, at Unix time ``timestamp``."""
        self._verify_full_pass.labels(self.slot_name).set(timestamp)

    def lag(self, seconds: float) -> None:
        """Report the lag as measured now; until the next report it keeps growing with the clock.

        The exported value is ``seconds`` plus the time elapsed since this call, which is exactly
        "now minus the commit time". So a main loop that stops calling this cannot freeze the
        gauge at a small value and hide the stall from the lag alert.
        """
        with self._lock:
            first = self._lag_at is None
            self._lag_at = (seconds, self._clock())
        if first:
            self._lag.labels(self.slot_name).set_function(self._current_lag)

    def _current_lag(self) -> float:
        with self._lock:
            if self._lag_at is None:
                return math.nan
            seconds, at = self._lag_at
        return seconds + (self._clock() - at)

    def slot(
        self,
        pending_bytes: int | None,
        retained_bytes: int | None,
        wal_status: str | None,
        safe_wal_size: int | None,
    ) -> None:
        """Export the slot as last read from the source; ``None`` removes that series.

        ``safe_wal_size`` is None when ``max_slot_wal_keep_size`` is -1 (unlimited);
        ``wal_status`` None (slot not found or not yet read) removes every status series.
        """
        self._set_or_remove(self._pending, pending_bytes)
        self._set_or_remove(self._retained, retained_bytes)
        self._set_or_remove(self._safe, safe_wal_size)
        with self._lock:
            if wal_status is not None and wal_status not in self._statuses:
                # A status a newer PostgreSQL may add still gets its own 1, not a silent 0.
                self._statuses.append(wal_status)
            statuses = list(self._statuses)
        for status in statuses:
            if wal_status is None:
                _remove(self._wal_status, self.slot_name, status)
            else:
                self._wal_status.labels(self.slot_name, status).set(
                    1.0 if status == wal_status else 0.0)

    def _set_or_remove(self, gauge: Gauge, value: int | None) -> None:
        if value is None:
            _remove(gauge, self.slot_name)
        else:
            gauge.labels(self.slot_name).set(float(value))

    def render(self) -> bytes:
        """The registry in Prometheus text exposition format (see :attr:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)


def _remove(gauge: Gauge, *labels: str) -> None:
    # Older prometheus_client versions raise KeyError for a series that was never set.
    with contextlib.suppress(KeyError):
        gauge.remove(*labels)
