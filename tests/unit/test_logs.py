"""The daemon's log stream is JSON lines only, the libraries' warnings and errors included.

Run in a process of its own: :func:`cdcsync.logs.configure` sets the process's logging up, which
the test runner's own handlers should not see.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from cdcsync.localpg import free_port

# Jobs failing against servers that refuse connections (apscheduler logs each job's exception),
# and a pool failing to connect (psycopg_pool warns with libpq's message, over several lines).
SCRIPT = """
import sys, time
from psycopg_pool import ConnectionPool
from cdcsync.alerts import Alerter, Thresholds
from cdcsync.config import Settings
from cdcsync.health import Health
from cdcsync.jobs import Jobs
from cdcsync.logs import configure
from cdcsync.metrics import Metrics
from cdcsync.pipeline import Progress

level, fmt, dsn = sys.argv[1:]
configure(level, fmt)
settings = Settings.model_validate({
    "tables": ("a.b",), "source": {"dsn": dsn, "heartbeat_interval_s": 0.2},
    "target": {"dsn": dsn}, "alerts": {"check_interval_s": 0.2}})
jobs = Jobs(settings, Progress(), Metrics("s"), Health(),
            Alerter(Thresholds(), slot="s", sentry=False))
jobs.start()
pool = ConnectionPool(dsn, min_size=1, open=False, name="refused")
pool.open(wait=False)
time.sleep(1.5)
jobs.close()
pool.close()
"""


def _run(level: str, fmt: str) -> str:
    dsn = f"host=127.0.0.1 port={free_port()} dbname=x user=u password=hunter2 connect_timeout=1"
    done = subprocess.run([sys.executable, "-c", SCRIPT, level, fmt, dsn], capture_output=True,
                          text=True, timeout=60, check=True)
    return done.stderr


def _events(stderr: str) -> list[dict[str, Any]]:
    lines = stderr.splitlines()
    assert lines
    return [json.loads(line) for line in lines]  # fails on any line that is not JSON


@pytest.mark.parametrize("level", ["info", "debug"])
def test_library_warnings_and_failed_jobs_are_one_json_line_each(level: str) -> None:
    stderr = _run(level, "json")
    events = _events(stderr)
    failed = [e for e in events if e["event"] == "job_failed"]
    assert {e["job"] for e in failed} == {"heartbeat", "observe", "retention"}
    # apscheduler's own record of each failure is not logged a second time.
    assert not [e for e in events if e.get("logger", "").startswith("apscheduler")]
    # Tracebacks only with debug logs, inside the line.
    assert all(("traceback" in e) == (level == "debug") for e in failed)
    pool = [e for e in events if e["event"] == "library_log" and e["logger"] == "psycopg.pool"]
    assert pool and all(e["level"] == "warning" and "refused" in e["message"] for e in pool)
    assert "hunter2" not in stderr


def test_library_warnings_in_text_name_their_logger() -> None:
    lines = _run("info", "text").splitlines()
    assert any(" warning psycopg.pool: error connecting in 'refused'" in line for line in lines)
    assert not any(line.startswith("Traceback") for line in lines)
