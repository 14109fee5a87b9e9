"""``cdcsync run``: the pipeline with its HTTP endpoints, periodic jobs, alerting and signals."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from cdcsync import __version__, alerts, checkpoint, prerequisites
from cdcsync.admin import connect
from cdcsync.alerts import Alerter, Thresholds
from cdcsync.backfill import snapshot, state
from cdcsync.backfill.resync import Resyncer
from cdcsync.config import Settings
from cdcsync.errors import PrerequisiteError
from cdcsync.health import Health, HttpServer
from cdcsync.jobs import Jobs
from cdcsync.logs import event
from cdcsync.metrics import Metrics
from cdcsync.pipeline import Pipeline, Progress, open_target_pool
from cdcsync.source import catalog


def preflight(settings: Settings) -> None:
    """Fail fast, with the fix, on what no retry would cure."""
    with connect(settings.source.dsn.get_secret_value(), "source") as src:
        slot_missing = catalog.slot_info(src, settings.source.slot) is None
        selected = prerequisites.check_source(src, settings)
        names = [t.source for t in selected]
    with connect(settings.target.dsn.get_secret_value(), "target") as tgt:
        row = tgt.execute("SELECT to_regclass('cdcsync.checkpoint') IS NOT NULL").fetchone()
        if not row or not row[0]:
            raise PrerequisiteError("the target has no cdcsync schema", fix="run `cdcsync setup`")
        checkpoint.install_metadata(tgt)
        # The initial snapshot re-creates the slot; a crash in between leaves none, which the
        # next snapshot attempt cures by itself.
        fresh = (settings.snapshot.mode == "initial"
                 and snapshot.needed(state.load(tgt, settings.source.slot), names))
        prerequisites.check_target(tgt, settings, selected)
    if slot_missing and not fresh:
        raise PrerequisiteError(
            f"replication slot {settings.source.slot!r} does not exist on the source",
            fix="run `cdcsync setup` first",
        )


def _alerter(settings: Settings) -> Alerter:
    conf = settings.alerts
    dsn = conf.sentry_dsn.get_secret_value() if conf.sentry_dsn else None
    sentry = alerts.init_sentry(dsn, slot=settings.source.slot, release=__version__)
    thresholds = Thresholds(lag_seconds=conf.lag_seconds,
                            retained_wal_bytes=conf.retained_wal_bytes,
                            retained_wal_fraction=conf.retained_wal_fraction,
                            apply_errors=conf.apply_errors, grace_s=conf.grace_s)
    return Alerter(thresholds, slot=settings.source.slot, sentry=sentry)


def run(settings: Settings, stop: threading.Event | None = None) -> None:
    """Stream until SIGTERM/SIGINT (or ``stop``); return normally after a clean shutdown."""
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
    server = HttpServer(settings.http.listen, metrics, health)
    server.start()
    try:
        preflight(settings)
        _stream(settings, stop, metrics, health)
    finally:
        server.close()
    event(logging.INFO, "stopped", slot=slot)


def _stream(settings: Settings, stop: threading.Event, metrics: Metrics, health: Health) -> None:
    alerter = _alerter(settings)
    pool = open_target_pool(settings)
    progress = Progress()
    resyncer = Resyncer(settings, pool, lambda: progress.checkpoint, stop)
    pipeline = Pipeline(settings, pool, stop, metrics, health, progress=progress,
                        on_message=resyncer.on_message)
    jobs = Jobs(settings, pipeline.progress, metrics, health, alerter, target_pool=pool)
    jobs.start()
    try:
        try:
            snapshot.prepare(settings, pool, stop, snapshot.Hooks(
                started=lambda: health.set_state("snapshotting"), alive=health.beat))
        except snapshot.Stopped:
            return
        if stop.is_set():
            return
        resyncer.start()
        pipeline.run()
    finally:
        health.set_state("stopping")
        jobs.close()
        resyncer.join(timeout=5)
        pool.close(timeout=2)
        alerts.flush()


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
