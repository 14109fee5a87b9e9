"""Periodic jobs: a failing job is logged, counted and run again; it never stops anything."""

from __future__ import annotations

import logging
import threading
import time
from typing import ClassVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cdcsync.alerts import Alerter, Thresholds
from cdcsync.config import Settings
from cdcsync.daemon import JobsOnceSettled
from cdcsync.health import Health
from cdcsync.jobs import Jobs
from cdcsync.localpg import free_port
from cdcsync.metrics import Metrics
from cdcsync.pipeline import Progress


def _job_errors(metrics: Metrics) -> float:
    families = text_string_to_metric_families(metrics.render().decode())
    return sum(s.value for f in families for s in f.samples
               if s.name == "cdcsync_errors_total" and s.labels.get("kind") == "job")


def test_failing_jobs_are_counted_logged_and_rerun(caplog: pytest.LogCaptureFixture) -> None:
    """With both servers unreachable, the jobs fail on every run, and each failure is counted
    and logged while the scheduler keeps running them."""
    dsn = f"host=127.0.0.1 port={free_port()} dbname=x user=u connect_timeout=1"
    settings = Settings.model_validate({
        "tables": ("a.b",), "source": {"dsn": dsn, "heartbeat_interval_s": 0.2},
        "target": {"dsn": dsn}, "alerts": {"check_interval_s": 0.2}})
    metrics = Metrics("s")
    jobs = Jobs(settings, Progress(), metrics, Health(),
                Alerter(Thresholds(), slot="s", sentry=False))
    caplog.set_level(logging.WARNING, logger="cdcsync")
    logging.getLogger("cdcsync").propagate = True
    jobs.start()
    try:
        deadline = time.monotonic() + 10
        while _job_errors(metrics) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        jobs.close()
    assert _job_errors(metrics) >= 4
    failed = {getattr(r, "cdcsync_fields", {}).get("job") for r in caplog.records
              if r.getMessage() == "job_failed"}
    assert failed == {"heartbeat", "observe", "retention"}



class _Counted:
    """Stands for the daemon's jobs: counts how they are made, started and closed."""

    made: ClassVar[list[_Counted]] = []

    def __init__(self) -> None:
        self.started = threading.Event()
        self.closed = threading.Event()
        _Counted.made.append(self)

    def start(self) -> None:
        self.started.set()

    def close(self) -> None:
        self.closed.set()


def test_the_daemon_starts_its_jobs_once_settled_and_once_only() -> None:
    """The daemon's jobs wait until it leaves the starting state (importing them would delay
    the stream's start), are made and started once whatever the states after, and closed."""
    _Counted.made = []
    health = Health()
    jobs = JobsOnceSettled(_Counted)
    health.watch(jobs)
    health.set_state("starting")
    time.sleep(0.2)
    assert _Counted.made == []
    health.set_state("standby")
    health.set_state("streaming")
    health.set_state("reconnecting", "target down: test")
    made = _wait_made(1)
    assert made.started.wait(5)
    health.set_state("streaming")
    time.sleep(0.2)
    assert len(_Counted.made) == 1 and not made.closed.is_set()
    jobs.close()
    assert made.closed.is_set()


def test_jobs_closed_while_starting_are_closed_once_started() -> None:
    _Counted.made = []
    health = Health()
    jobs = JobsOnceSettled(_Counted)
    health.watch(jobs)
    jobs.close()
    health.set_state("streaming")
    time.sleep(0.2)
    assert _Counted.made == []  # closed before: never made
    jobs = JobsOnceSettled(_Counted)
    health.watch(jobs)
    health.set_state("snapshotting")
    jobs.close()
    made = _wait_made(1)
    assert made.closed.wait(5) and made.started.is_set()


def _wait_made(count: int) -> _Counted:
    deadline = time.monotonic() + 5
    while len(_Counted.made) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(_Counted.made) == count
    return _Counted.made[-1]
