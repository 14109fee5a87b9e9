"""Active/standby: two `cdcsync run` with one configuration; kill -9 and a lost lock session."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bench import failover, netns
from bench.common import readyz
from cdcsync.localpg import free_port
from tests.conftest import SOURCE_DSN_ENV, TARGET_DSN_ENV, DbPair
from tests.harness import cli, converged, execute, start_daemon, wait_for, write_config, writer

pytestmark = pytest.mark.slow

SCHEMA = """
CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL,
                       updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
"""


def _transfer(conn: psycopg.Connection[tuple[object, ...]], rng: random.Random) -> None:
    a, b = rng.sample(range(1, 101), 2)
    amount = rng.randint(1, 50)
    conn.execute("INSERT INTO accounts (id, balance) VALUES (%s, 0), (%s, 0) "
                 "ON CONFLICT DO NOTHING", (min(a, b), max(a, b)))
    conn.execute("UPDATE accounts SET balance = balance - %s, updated_at = clock_timestamp() "
                 "WHERE id = %s", (amount, a))
    conn.execute("UPDATE accounts SET balance = balance + %s, updated_at = clock_timestamp() "
                 "WHERE id = %s", (amount, b))
    conn.commit()


class Daemon:
    def __init__(self, config: Path, log: Path) -> None:
        self.port = free_port()
        self.env = {"CDCSYNC_HTTP__LISTEN": f"127.0.0.1:{self.port}"}
        self.process = start_daemon(config, log, env=self.env)

    @property
    def pid(self) -> int:
        return self.process.pid

    def role(self) -> tuple[str | None, str | None]:
        body = readyz(self.port)
        return body.get("role"), body.get("state")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _status(config: Path, daemon: Daemon) -> dict[str, Any]:
    result = cli("status", "--json", config=config, env=daemon.env)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_standby_takes_over(dbpair: DbPair, tmp_path: Path) -> None:
    """One process streams, the other waits; killing the active's lock session moves the role
    at once, kill -9 of the active hands over within 15 s, and the target equals the source."""
    execute(dbpair.source_dsn, SCHEMA)
    config = write_config(tmp_path / "cdcsync.toml", dbpair)
    assert cli("setup", "--create-tables", config=config).returncode == 0
    stop = threading.Event()
    writers = [writer(dbpair.source_dsn, stop, seed, _transfer, pause_s=0.005)
               for seed in range(2)]
    first = Daemon(config, tmp_path / "first.log")
    second: Daemon | None = None
    try:
        wait_for(lambda: first.role() == ("active", "streaming"), timeout=60,
                 what="the first daemon to stream")
        for thread in writers:
            thread.start()
        second = Daemon(config, tmp_path / "second.log")
        wait_for(lambda: second is not None and second.role() == ("standby", "standby"),
                 timeout=60, what="the second daemon to wait as a standby")
        status = _status(config, second)
        assert status["role"] == "standby" and status["daemon"] == "standby"
        assert status["active_process"].startswith(f"cdcsync {first.pid}@")
        consumer = status["slot_consumer"]
        assert consumer.startswith(f"'cdcsync {first.pid}@"), consumer
        assert consumer.endswith(f"(walsender PID {status['slot_active_pid']})"), consumer
        assert status["slot_consumer_recorded"] is True
        assert status["standbys_waiting"] == 1
        assert f"cdcsync {first.pid}@" in readyz(second.port)["reason"]
        with urllib.request.urlopen(f"http://127.0.0.1:{second.port}/metrics") as response:
            assert f'cdcsync_standby{{slot="{dbpair.slot}"}} 1.0' in response.read().decode()

        # The active's lock session is killed: it stops streaming, the standby takes over.
        with psycopg.connect(dbpair.target_dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE application_name = %s", (f"cdcsync {first.pid}@" + _host(),))
        wait_for(lambda: second is not None and second.role() == ("active", "streaming"),
                 timeout=30, what="the standby to stream after the lock session was lost")
        wait_for(lambda: first.role() == ("standby", "standby"), timeout=30,
                 what="the first daemon to wait as a standby")

        # kill -9 of the active: the standby streams within 15 s.
        second.process.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for(lambda: first.role() == ("active", "streaming"), timeout=30,
                 what="the standby to take over after kill -9")
        takeover_s = time.monotonic() - killed_at
        assert takeover_s < 15, f"takeover took {takeover_s:.1f} s"
        time.sleep(1)
        stop.set()
        for thread in writers:
            thread.join()
        wait_for(converged(dbpair, ["public.accounts"]), timeout=60, what="convergence")
        first.process.send_signal(signal.SIGTERM)
        assert first.process.wait(timeout=15) == 0
    finally:
        stop.set()
        first.stop()
        if second is not None:
            second.stop()
    logs = (tmp_path / "first.log").read_text() + (tmp_path / "second.log").read_text()
    assert "Traceback" not in logs
    assert '"event":"lock_lost"' in logs
    with psycopg.connect(dbpair.target_dsn) as conn:
        # No spurious conflicts: nothing was applied twice over newer rows.
        assert conn.execute("SELECT count(*) FROM cdcsync.conflicts").fetchone() == (0,)
        assert conn.execute("SELECT sum(balance) FROM accounts").fetchone() == (0,)


def _host() -> str:
    return subprocess.run(["hostname"], capture_output=True, text=True,
                          check=True).stdout.strip()[:40]


def test_standby_takes_over_from_a_host_that_vanished(tmp_path: Path) -> None:
    """The active daemon's host drops off the network (every packet lost, nothing reset), while
    a batch's target transaction is most often open: the servers end its sessions, the standby
    streams, and the lost daemon comes back as a standby once its link returns."""
    if os.environ.get(SOURCE_DSN_ENV) or os.environ.get(TARGET_DSN_ENV):
        pytest.skip("needs throwaway clusters it may make listen on the namespaces' links")
    missing = netns.unavailable()
    if missing is not None:
        pytest.skip(missing)
    result = failover.run(1, tmp_path, failover.Plan("vanish", target_delay_ms=200))
    assert result["converged"], result
    # Each server ends the sessions 10 s after its first unanswered send (tcp_user_timeout), or
    # after 5 + 3 * 3 s of silence; the system defaults would keep them for hours, and the slot
    # until wal_sender_timeout (60 s).
    assert all(seconds is not None and seconds < 20
               for side in ("source", "target")
               for seconds in result[f"{side}_sessions_ended_s"]), result
    assert result["takeover_s"][0] < 25, result


def test_standby_takes_over_from_a_host_that_lost_the_source_alone(tmp_path: Path) -> None:
    """The active daemon's host loses its route to the source and keeps the target's: it keeps
    its lock's connection, so only giving the lock up (failover_after_s) lets the standby,
    which reaches the source, stream. Without it the standby never takes over."""
    if os.environ.get(SOURCE_DSN_ENV) or os.environ.get(TARGET_DSN_ENV):
        pytest.skip("needs throwaway clusters it may make listen on the namespaces' links")
    missing = netns.unavailable()
    if missing is not None:
        pytest.skip(missing)
    plan = failover.Plan("partition", source={"receive_timeout_s": 2, "failover_after_s": 3})
    result = failover.run(1, tmp_path, plan)
    assert result["converged"], result
    # The stream gives the silent source up after 2 s, the lock goes 3 s later, and the source
    # ends the lost daemon's walsender 10 s after its first unanswered send.
    assert result["takeover_s"][0] < 25, result
    assert result["source_sessions_ended_s"][0] is not None, result
