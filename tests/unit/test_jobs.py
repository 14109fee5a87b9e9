"""Periodic jobs: a failing job is logged, counted and run again; it never stops anything."""

from __future__ import annotations

import logging
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cdcsync.alerts import Alerter, Thresholds
from cdcsync.config import Settings
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
    settings = Settings(tables=("a.b",), source={"dsn": dsn, "heartbeat_interval_s": 0.2},
                        target={"dsn": dsn}, alerts={"check_interval_s": 0.2})
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
