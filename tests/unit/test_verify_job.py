"""The scheduled verification is a periodic job of the daemon only when [verify] interval_s > 0."""

from __future__ import annotations

import logging
import time

import pytest

from cdcsync.alerts import Alerter, Thresholds
from cdcsync.config import Settings
from cdcsync.health import Health
from cdcsync.jobs import Jobs
from cdcsync.localpg import free_port
from cdcsync.metrics import Metrics
from cdcsync.pipeline import Progress


def _failed_jobs(interval_s: float, caplog: pytest.LogCaptureFixture) -> set[str]:
    port = free_port()
    dsn = f"host=127.0.0.1 port={port} dbname=x user=u connect_timeout=1"
    # A slot of its own: Jobs.close does not wait for a running job, so one of an earlier case
    # may still fail, and log it, while this one runs.
    slot = f"jobs_{port}"
    settings = Settings.model_validate({
        "tables": ("a.b",), "source": {"dsn": dsn, "slot": slot, "heartbeat_interval_s": 0},
        "target": {"dsn": dsn}, "alerts": {"check_interval_s": 0.2},
        "verify": {"interval_s": interval_s}})
    health = Health()
    health.set_state("streaming")
    jobs = Jobs(settings, Progress(), Metrics("s"), health,
                Alerter(Thresholds(), slot="s", sentry=False))
    caplog.set_level(logging.WARNING, logger="cdcsync")
    logging.getLogger("cdcsync").propagate = True
    def failed() -> list[str]:
        return [str(getattr(r, "cdcsync_fields", {}).get("job")) for r in caplog.records
                if r.getMessage() == "job_failed"
                and getattr(r, "cdcsync_fields", {}).get("slot") == slot]

    jobs.start()
    try:
        # Both jobs run every 0.2 s: three failures of observe give verify as many chances.
        deadline = time.monotonic() + 15
        while failed().count("observe") < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        jobs.close()
    return set(failed())


@pytest.mark.parametrize(("interval_s", "expected"), [(0.2, {"observe", "retention", "verify"}),
                                                      (0.0, {"observe", "retention"})])
def test_verify_job_runs_only_when_configured(caplog: pytest.LogCaptureFixture,
                                              interval_s: float, expected: set[str]) -> None:
    """With the source unreachable every job fails, which shows which jobs are scheduled."""
    assert _failed_jobs(interval_s, caplog) == expected


@pytest.mark.parametrize(("state", "runs"), [
    ("streaming", 1), ("reconnecting", 1), ("starting", 0), ("snapshotting", 0), ("standby", 0),
    ("halted", 0), ("stopping", 0)])
def test_verify_runs_while_the_process_streams_or_reconnects(state: str, runs: int) -> None:
    """Not during the snapshot, in a standby, or once halted or stopping."""
    settings = Settings.model_validate({
        "tables": ("a.b",), "source": {"dsn": "host=h dbname=x", "slot": "s"},
        "target": {"dsn": "host=h dbname=x"}})
    health = Health()
    health.set_state(state)
    jobs = Jobs(settings, Progress(), Metrics("s"), health,
                Alerter(Thresholds(), slot="s", sentry=False))
    calls: list[str] = []
    jobs.verify(lambda: calls.append(state))
    assert len(calls) == runs
