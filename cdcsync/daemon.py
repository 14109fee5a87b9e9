"""``cdcsync run``: the pipeline with its HTTP endpoints, periodic jobs, alerting and signals."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from cdcsync import __version__, alerts, checkpoint
from cdcsync.admin import connect
from cdcsync.alerts import Alerter, Thresholds
from cdcsync.config import Settings
from cdcsync.errors import PrerequisiteError
from cdcsync.health import Health, HttpServer
from cdcsync.jobs import Jobs
from cdcsync.leader import METADATA_LOCK_KEY, SlotLock
from cdcsync.logs import event
from cdcsync.metrics import Metrics
from cdcsync.notify import Notifier, SystemdReporter
from cdcsync.pipeline import Pipeline, Progress, open_target_pool
from cdcsync.source import catalog


def preflight(settings: Settings) -> None:
    """Fail fast, with the fix, on what no retry would cure."""
    with connect(settings.source.dsn.get_secret_value(), "source") as src:
        if catalog.slot_info(src, settings.source.slot) is None:
            raise PrerequisiteError(
                f"replication slot {settings.source.slot!r} does not exist on the source",
                fix="run `cdcsync setup` first",
            )
    with connect(settings.target.dsn.get_secret_value(), "target") as tgt:
        row = tgt.execute("SELECT to_regclass('cdcsync.checkpoint') IS NOT NULL").fetchone()
        if not row or not row[0]:
            raise PrerequisiteError("the target has no cdcsync schema", fix="run `cdcsync setup`")
        # An active process and its standby start together: one installs, the other waits.
        with tgt.transaction():
            tgt.execute("SELECT pg_advisory_xact_lock(%s)", (METADATA_LOCK_KEY,))
            checkpoint.install_metadata(tgt)


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
        notifier: Notifier | None = None) -> None:
    """Stream until SIGTERM/SIGINT (or ``stop``); return normally after a clean shutdown.

    ``notifier`` (systemd's NOTIFY_SOCKET, given by the CLI) hears readiness, watchdog pings,
    status with the lag, and the start of the shutdown.
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
    try:
        preflight(settings)
        _contend(settings, stop, metrics, health)
    finally:
        server.close()
    event(logging.INFO, "stopped", slot=slot)


def _contend(settings: Settings, stop: threading.Event, metrics: Metrics,
             health: Health) -> None:
    """Alternate between standby and active terms until ``stop``.

    The jobs and the alerter live as long as the process, so an alert raised while the target
    was down (and the lock with it) gets its recovery once this process streams again.
    """
    progress = Progress()
    jobs = Jobs(settings, progress, metrics, health, _alerter(settings))
    jobs.start()
    lock = SlotLock(settings.target.dsn.get_secret_value(), settings.source.slot, health, stop)
    try:
        # A term as the active process ends on stop or when the lock is lost; then this
        # process waits as a standby again.
        while (term := lock.acquire()) is not None:
            try:
                _stream(settings, term, progress, metrics, health)
            finally:
                if stop.is_set():
                    health.set_state("stopping")
                lock.release()
    finally:
        jobs.close()
        lock.release()
        alerts.flush()


def _stream(settings: Settings, term: threading.Event, progress: Progress, metrics: Metrics,
            health: Health) -> None:
    """One term as the active process: stream until ``term`` is set."""
    pool = open_target_pool(settings)
    try:
        Pipeline(settings, pool, term, metrics, health, progress=progress).run()
    finally:
        pool.close(timeout=2)


class _StandbyGauge:
    """Keeps ``cdcsync_standby`` equal to "the health state is standby"."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def state_changed(self, state: str, reason: str | None) -> None:
        self._metrics.set_standby(state == "standby")

    def beat(self) -> None:
        """Beats say nothing about the role."""


class DaemonThread(threading.Thread):
    """:func:`run` on a thread of this process (the demo, tests), stopped as SIGTERM would stop
    it; its failure is kept for the caller to raise."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="cdcsync-daemon", daemon=True)
        self.settings = settings
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            run(self.settings, self.stop)
        except BaseException as exc:
            self.error = exc

    def close(self, timeout: float = 15.0) -> bool:
        """Ask it to stop; return whether it did within ``timeout``."""
        self.stop.set()
        self.join(timeout)
        return not self.is_alive()
