"""Periodic work beside the stream: the heartbeat, slot statistics, lag and alert thresholds,
the retention of old conflicts and dead letters on the target, and the optional scheduled
verification.

Jobs run on apscheduler's threads. A failing job is logged, counted in ``cdcsync_errors_total``
and simply runs again at its next interval; it never stops the stream, and the stream's own
failure is raised by the pipeline, not hidden here. The failure is logged once, as ``job_failed``
(its traceback included with debug logs): apscheduler's own record of it, a traceback at the
error level, is dropped.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from apscheduler.events import EVENT_JOB_ERROR, JobExecutionEvent
from apscheduler.schedulers.background import BackgroundScheduler
from psycopg import sql

from cdcsync import link_watch
from cdcsync.alerts import Alerter
from cdcsync.config import Settings
from cdcsync.dsn import with_session_options
from cdcsync.health import Health
from cdcsync.link_watch import LinkWatch
from cdcsync.logs import LOGGER, event
from cdcsync.metrics import Metrics
from cdcsync.model import Lsn
from cdcsync.pipeline import Progress
from cdcsync.source import catalog

HEARTBEAT_PREFIX = "cdcsync.heartbeat"


class _ReportedAsJobFailed(logging.Filter):
    """Drops apscheduler's record of a job's exception (see the module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is None


# One instance: Logger.addFilter adds it once however many Jobs are made.
_REPORTED = _ReportedAsJobFailed()


class Jobs:
    """The heartbeat and the observation job, started and stopped with the daemon."""

    def __init__(self, settings: Settings, progress: Progress, metrics: Metrics, health: Health,
                 alerter: Alerter, *, links: LinkWatch | None = None) -> None:
        self.settings = settings
        # A job stuck on a dead link would skip its later runs, the lag alerts with them.
        self._links = links
        self.progress = progress
        self.metrics = metrics
        self.health = health
        self.alerter = alerter
        self._dsn = with_session_options(settings.source.dsn.get_secret_value(), "cdcsync-jobs")
        self._target_dsn = with_session_options(settings.target.dsn.get_secret_value(),
                                                "cdcsync-jobs")
        self._scheduler = BackgroundScheduler(daemon=True)
        self._scheduler.add_listener(self._failed, EVENT_JOB_ERROR)
        # The default executor's logger: it records a job's exception there.
        logging.getLogger("apscheduler.executors.default").addFilter(_REPORTED)

    def start(self) -> None:
        interval = self.settings.source.heartbeat_interval_s
        if interval > 0:
            self._scheduler.add_job(self.heartbeat, "interval", seconds=interval,
                                    id="heartbeat", max_instances=1, coalesce=True)
        if self.settings.verify.interval_s > 0:
            # Imported only when scheduled (off by default): the jobs load while a backlog may
            # be draining, and the verifier's modules cost about 20 ms of CPU.
            from cdcsync.verify.job import ScheduledVerify  # noqa: PLC0415

            scheduled = ScheduledVerify(self.settings, self.metrics, consuming=True,
                                        links=self._links)
            self._scheduler.add_job(self.verify, "interval", args=(scheduled.run,),
                                    seconds=self.settings.verify.interval_s, id="verify",
                                    max_instances=1, coalesce=True)
        self._scheduler.add_job(self.observe, "interval",
                                seconds=self.settings.alerts.check_interval_s,
                                id="observe", max_instances=1, coalesce=True)
        self._scheduler.add_job(self.retention, "interval",
                                seconds=self.settings.retention.interval_s, id="retention",
                                max_instances=1, coalesce=True,
                                next_run_time=dt.datetime.now(dt.UTC))
        self._scheduler.start()

    def close(self) -> None:
        self._scheduler.shutdown(wait=False)

    def heartbeat(self) -> None:
        """A transactional message in the source WAL: the stream applies it like any commit, so
        an idle slot moves forward and the lag in seconds stays measurable without traffic."""
        if self.health.state == "standby":
            return  # another process streams this slot and sends its own
        with link_watch.connect(self._dsn, self._links) as conn:
            conn.execute("SELECT pg_logical_emit_message(true, %s, now()::text)",
                         (HEARTBEAT_PREFIX,))

    def verify(self, run: Callable[[], None]) -> None:
        """The scheduled verification, while this process streams the slot or reconnects to
        stream it again. Not before its snapshot is done (the target is still being filled), nor
        in a standby (the active process verifies), nor once halted or stopping (the checkpoint
        it would await no longer moves)."""
        if self.health.state in ("streaming", "reconnecting"):
            run()

    def observe(self) -> None:
        """Lag, slot statistics and every alert threshold, from one look at the source."""
        if self.health.state == "standby":
            return  # the active process measures and alerts; a standby would only repeat it
        commit_time = self.progress.commit_time
        lag = None
        if commit_time is not None:
            lag = max(0.0, (dt.datetime.now(dt.UTC) - commit_time).total_seconds())
            self.metrics.lag(lag)
            self.health.set_lag(lag)
        self.alerter.check_lag(lag)
        self.alerter.check_apply_errors(self.progress.consecutive_failures)
        with link_watch.connect(self._dsn, self._links) as conn:
            info = catalog.slot_info(conn, self.settings.source.slot)
            current = Lsn.parse(catalog.current_wal_lsn(conn))
        pending = max(0, current - self.progress.checkpoint) if self.progress.checkpoint else None
        retained = info.retained_bytes if info else None
        safe = info.safe_wal_size if info else None
        status = info.wal_status if info else "lost"
        self.metrics.slot(pending, retained, status, safe)
        self.alerter.check_retained_wal(retained, safe)
        self.alerter.check_slot_lost(status)

    def retention(self) -> None:
        """Delete conflicts and dead letters past their retention; export how many remain."""
        if self.health.state == "standby":
            return
        conf = self.settings.retention
        remaining: dict[str, int] = {}
        with link_watch.connect(self._target_dsn, self._links) as conn:
            for table, days in (("conflicts", conf.conflicts_days),
                                ("dead_letters", conf.dead_letters_days)):
                name = sql.Identifier("cdcsync", table)
                if days > 0:
                    deleted = conn.execute(
                        sql.SQL("DELETE FROM {} WHERE recorded_at < now() - %s * interval '1 day'")
                        .format(name), (days,)).rowcount
                    if deleted:
                        event(logging.INFO, "retention_deleted", slot=self.settings.source.slot,
                              table=f"cdcsync.{table}", rows=deleted, older_than_days=days)
                row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(name)).fetchone()
                remaining[table] = int(row[0]) if row else 0
        self.metrics.stored_rows(remaining["conflicts"], remaining["dead_letters"])

    def _failed(self, job_event: JobExecutionEvent) -> None:
        self.metrics.error("job")
        detail: Any = job_event.exception
        debug = ({"traceback": job_event.traceback}
                 if job_event.traceback and LOGGER.isEnabledFor(logging.DEBUG) else {})
        event(logging.WARNING, "job_failed", slot=self.settings.source.slot,
              job=job_event.job_id, error=str(detail).splitlines()[0] if detail else "unknown",
              **debug)

