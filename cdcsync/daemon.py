"""``cdcsync run``: the pipeline with its HTTP endpoints, periodic jobs, alerting and signals."""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from types import FrameType
from typing import TYPE_CHECKING, Protocol

import psycopg
from psycopg_pool import ConnectionPool

from cdcsync import __version__, alerts, leader, link_watch, prerequisites
from cdcsync.admin import Conn, connect
from cdcsync.alerts import Alerter, Thresholds
from cdcsync.apply.tables import ColumnRows
from cdcsync.backfill import snapshot
from cdcsync.backfill.resync import Resyncer
from cdcsync.checkpoint import Checkpoint
from cdcsync.config import Settings
from cdcsync.errors import PrerequisiteError, is_transient
from cdcsync.health import Health, HttpServer
from cdcsync.leader import SlotLock
from cdcsync.link_watch import LinkWatch
from cdcsync.logs import event
from cdcsync.metrics import Metrics
from cdcsync.notify import Notifier, SystemdReporter
from cdcsync.pipeline import Pipeline, Progress, open_target_pool
from cdcsync.refusals import connection_error
from cdcsync.target_ahead import TargetAhead, TargetState, target_state

if TYPE_CHECKING:
    from cdcsync.jobs import Jobs
    from cdcsync.source.early import EarlyStream


@contextmanager
def ask_target(settings: Settings, ahead: TargetAhead | None = None,
               links: LinkWatch | None = None
               ) -> Iterator[tuple[Conn, TargetState | PrerequisiteError]]:
    """A connection to the target and its answer to :func:`target_ahead.target_state` (or its
    refusal): those asked ``ahead`` when they are for these settings, else asked now. The
    connection is watched by ``links`` (or by a watch of its own while open)."""
    dsn, slot = settings.target.dsn.get_secret_value(), settings.source.slot
    answered = ahead.take(dsn, slot) if ahead is not None else None
    if isinstance(answered, psycopg.OperationalError):
        raise connection_error(answered, dsn, "target") from None
    if answered is not None and ahead is not None:
        with link_watch.watching(links, slot) as watch, answered[0] as tgt:
            watch.watch(tgt, ahead.session_dsn)
            yield answered
        return
    with connect(dsn, "target", links) as tgt:
        try:
            known: TargetState | PrerequisiteError = target_state(tgt, slot)
        except PrerequisiteError as exc:
            known = exc
        yield tgt, known


def preflight(settings: Settings, tgt: Conn, known: TargetState | PrerequisiteError,
              early: EarlyStream | None = None, links: LinkWatch | None = None
              ) -> dict[str, ColumnRows]:
    """Fail fast, with the fix, on what no retry would cure. ``tgt`` and ``known`` come from
    :func:`ask_target`. The ``early`` stream is closed if this process will not stream from it
    first: as a standby, or when the initial snapshot is to re-create the slot. Return the
    target's catalog rows of every target table (see :func:`prerequisites.check_target`).
    The source's connection is watched by ``links`` (or by a watch of its own while open).

    The target is asked everything it is asked here in two round trips (a target far away pays
    each one at every start), the first of them usually while the daemon loaded: the lock's
    holder, the metadata schema and the copy states, then the columns of every target table."""
    slot = settings.source.slot
    # Refused only after the source's checks, whose failures come first.
    standby = (known.standby if isinstance(known, TargetState)
               else leader.lock_holder(tgt, slot) is not None)
    with connect(settings.source.dsn.get_secret_value(), "source", links) as src:
        selected, found = prerequisites.check_source(
            src, settings, standby=standby, ours=early.backend_pid if early else None,
            recorded=known.recorded_walsender if isinstance(known, TargetState) else None)
    if isinstance(known, PrerequisiteError):
        raise known
    # The initial snapshot re-creates the slot; a crash in between leaves none, which the
    # next snapshot attempt cures by itself.
    fresh = (settings.snapshot.mode == "initial"
             and snapshot.needed(known.states, [t.source for t in selected]))
    described = prerequisites.check_target(tgt, settings, selected)
    if early is not None and (standby or fresh):
        early.close()
    if found is None and not fresh:
        raise PrerequisiteError(
            f"replication slot {slot!r} does not exist on the source",
            fix="run `cdcsync setup` first",
        )
    return described


def _alerter(settings: Settings) -> Alerter:
    conf = settings.alerts
    dsn = conf.sentry_dsn.get_secret_value() if conf.sentry_dsn else None
    sentry = alerts.init_sentry(dsn, slot=settings.source.slot, release=__version__)
    thresholds = Thresholds(lag_seconds=conf.lag_seconds,
                            retained_wal_bytes=conf.retained_wal_bytes,
                            retained_wal_fraction=conf.retained_wal_fraction,
                            apply_errors=conf.apply_errors, grace_s=conf.grace_s)
    return Alerter(thresholds, slot=settings.source.slot, sentry=sentry)


def run(settings: Settings, stop: threading.Event | None = None,
        notifier: Notifier | None = None, early: EarlyStream | None = None,
        ahead: TargetAhead | None = None) -> None:
    """Stream until SIGTERM/SIGINT (or ``stop``); return normally after a clean shutdown.

    ``notifier`` (systemd's NOTIFY_SOCKET, given by the CLI) hears readiness, watchdog pings,
    status with the lag, and the start of the shutdown. ``early``, the slot's stream the CLI
    opened as soon as it knew the settings, is the first term's first stream, unless this
    process has no use for it (it is closed then); ``ahead``, the target's first question the
    CLI asked as early, answers the checks' (see :func:`ask_target`).
    """
    stop = stop or threading.Event()
    slot = settings.source.slot

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        event(logging.INFO, "stopping", slot=slot, signal=signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    metrics = Metrics(slot)
    health = Health(ready_lag_s=settings.http.ready_lag_s)
    health.watch(_StandbyGauge(metrics))
    if notifier is not None and notifier.enabled:
        health.watch(SystemdReporter(notifier, lambda: health.lag_seconds))
    server = HttpServer(settings.http.listen, metrics, health)
    server.start()
    links = LinkWatch(slot)
    lock = SlotLock(settings.target.dsn.get_secret_value(), slot, health, stop,
                    failover_after_s=settings.source.failover_after_s, links=links)
    pool: ConnectionPool | None = None
    try:
        with ask_target(settings, ahead, links) as (tgt, known):
            active = isinstance(known, TargetState) and not known.standby
            # The checks wait on both databases: meanwhile, the lock's connection (opened
            # while the daemon loaded, where the target was asked then) takes the lock where
            # no one held it; the process that is to stream opens the pool of its first term.
            lock.open_ahead(take=active, opened=None if ahead is None else partial(
                ahead.lock_connection, settings.target.dsn.get_secret_value(), slot))
            if active:
                pool = open_target_pool(settings, links)
            described = preflight(settings, tgt, known, early, links)
        _contend(settings, stop, metrics, health, lock, links=links, ahead=pool, early=early,
                 described=described)
    finally:
        if pool is not None:
            pool.close(timeout=2)
        if ahead is not None:
            ahead.close()
        if early is not None:
            early.close()
        lock.release()
        links.close()
        server.close()
    event(logging.INFO, "stopped", slot=slot)


def _contend(settings: Settings, stop: threading.Event, metrics: Metrics, health: Health,
             lock: SlotLock, *, links: LinkWatch, ahead: ConnectionPool | None,
             early: EarlyStream | None, described: dict[str, ColumnRows] | None = None) -> None:
    """Alternate between standby and active terms until ``stop``; the first term streams with
    the pool ``ahead``, when given, which opened its connections while the lock was asked for,
    and resolves its tables from the checks' catalog rows, ``described``, if it streams at once
    (a term that waited first asks the target again).

    The jobs and the alerter live as long as the process, so an alert raised while the target
    was down (and the lock with it) gets its recovery once this process streams again.
    """
    progress = Progress()
    alerter = _alerter(settings)

    def make_jobs() -> Jobs:
        from cdcsync.jobs import Jobs  # noqa: PLC0415 (see JobsOnceSettled)

        return Jobs(settings, progress, metrics, health, alerter, links=links)

    jobs = JobsOnceSettled(make_jobs)
    health.watch(jobs)

    def standing_by() -> None:
        # The lock was taken since the target's answer: its holder needs the slot, and a
        # standby, which may wait for months, holds no target connections it does not use.
        nonlocal ahead, described
        described = None
        if early is not None:
            early.close()
        if ahead is not None:
            ahead.close(timeout=2)
            ahead = None

    try:
        # A term as the active process ends on stop or when the lock is lost; then this
        # process waits as a standby again.
        while (term := lock.acquire(waiting=standing_by)) is not None:
            pool, ahead = ahead or open_target_pool(settings, links), None
            try:
                _stream(settings, term, pool, progress, metrics=metrics, health=health,
                        links=links, early=early, described=described)
                early = described = None
            finally:
                if stop.is_set():
                    health.set_state("stopping")
                lock.release()
    finally:
        if ahead is not None:
            ahead.close(timeout=2)
        jobs.close()
        lock.release()
        alerts.flush()


def _stream(settings: Settings, term: threading.Event, pool: ConnectionPool,
            progress: Progress, *, metrics: Metrics, health: Health, links: LinkWatch,
            early: EarlyStream | None, described: dict[str, ColumnRows] | None = None) -> None:
    """One term as the active process: copy what needs copying, stream (from ``early`` first,
    if given, resolving tables from ``described``) until ``term`` is set; then close ``pool``."""
    resyncer = Resyncer(settings, pool, lambda: progress.checkpoint, term, links)
    try:
        saved = _prepare_copies(settings, pool, term, health, links)
        if term.is_set():
            return
        resyncer.start()
        Pipeline(settings, pool, term, metrics, health, progress=progress, links=links,
                 on_message=resyncer.on_message, early=early, saved=saved,
                 described=described).run()
    finally:
        # The term ends here, on a halt too, whose lock is released only after: the resync
        # worker, which waits on the term, stops now rather than at the join's timeout.
        term.set()
        resyncer.join(timeout=5)
        pool.close(timeout=2)


def _prepare_copies(settings: Settings, pool: ConnectionPool, term: threading.Event,
                    health: Health, links: LinkWatch) -> Checkpoint | None:
    """The initial snapshot or the queueing of online copies, retried like the stream when a
    connection is lost, until ``term`` ends; the checkpoint :func:`snapshot.prepare` read."""
    attempt = 0
    while not term.is_set():
        try:
            return snapshot.prepare(settings, pool, term, snapshot.Hooks(
                started=lambda: health.set_state("snapshotting"), alive=health.beat,
                links=links))
        except snapshot.Stopped:
            return None
        except Exception as exc:
            if not is_transient(exc):
                raise
            attempt += 1
            delay = min(30.0, 0.5 * 2 ** min(attempt, 6)) * random.uniform(0.5, 1.0)
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            health.set_state("reconnecting", f"during the snapshot: {reason}")
            event(logging.WARNING, "reconnecting", slot=settings.source.slot, attempt=attempt,
                  delay_s=round(delay, 2), error=reason)
            deadline = time.monotonic() + delay
            while (left := deadline - time.monotonic()) > 0 and not term.wait(min(left, 0.5)):
                health.beat()
    return None


class _StandbyGauge:
    """Keeps ``cdcsync_standby`` equal to "the health state is standby"."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def state_changed(self, state: str, reason: str | None) -> None:
        self._metrics.set_standby(state == "standby")

    def beat(self) -> None:
        """Beats say nothing about the role."""


class Startable(Protocol):
    def start(self) -> None: ...

    def close(self) -> None: ...


class JobsOnceSettled:
    """Starts the periodic jobs (:mod:`cdcsync.jobs`) on a thread of their own when the process
    first leaves the starting state: streaming, snapshotting, standing by or reconnecting.

    Importing the scheduler and the verifier and the jobs' first run cost about 0.1 CPU second,
    which the start of the stream used to wait for (``bench/startup.py``, 7 starts alternating:
    0.80 -> 0.68 s, CPU 0.76 -> 0.61 s)."""

    def __init__(self, make: Callable[[], Startable]) -> None:
        self._make = make
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._jobs: Startable | None = None
        self._closed = False

    def state_changed(self, state: str, reason: str | None) -> None:
        with self._lock:
            if self._thread is not None or self._closed or state == "starting":
                return
            self._thread = threading.Thread(target=self._start, name="cdcsync-jobs-start",
                                            daemon=True)
        self._thread.start()

    def beat(self) -> None:
        """Beats change nothing here."""

    def _start(self) -> None:
        jobs = self._make()
        jobs.start()
        with self._lock:
            self._jobs = jobs
            if not self._closed:
                return
        jobs.close()

    def close(self) -> None:
        """Stop the jobs, if started; jobs still starting stop once they have."""
        with self._lock:
            self._closed = True
            jobs = self._jobs
        if jobs is not None:
            jobs.close()


class DaemonThread(threading.Thread):
    """:func:`run` on a thread of this process (the demo, tests), stopped as SIGTERM would stop
    it; its failure is kept for the caller to raise."""

    def __init__(self, settings: Settings, early: EarlyStream | None = None,
                 ahead: TargetAhead | None = None) -> None:
        super().__init__(name="cdcsync-daemon", daemon=True)
        self.settings = settings
        self.early = early
        self.ahead = ahead
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            run(self.settings, self.stop, early=self.early, ahead=self.ahead)
        except BaseException as exc:
            self.error = exc

    def close(self, timeout: float = 15.0) -> bool:
        """Ask it to stop; return whether it did within ``timeout``."""
        self.stop.set()
        self.join(timeout)
        return not self.is_alive()
