"""`cdcsync run` under a stand-in for systemd: a real NOTIFY_SOCKET and WATCHDOG_USEC."""

from __future__ import annotations

import itertools
import signal
import socket
import time
from pathlib import Path

import pytest

from tests.conftest import DbPair
from tests.harness import cli, converged, execute, start_daemon, wait_for, write_config

pytestmark = pytest.mark.slow


def test_daemon_notifies_systemd(dbpair: DbPair, tmp_path: Path) -> None:
    """READY=1 once streaming, WATCHDOG=1 about every second for WATCHDOG_USEC=2 s, STATUS= with
    the lag, STOPPING=1 on SIGTERM, then exit 0."""
    execute(dbpair.source_dsn, "CREATE TABLE n (id int PRIMARY KEY, v int)")
    config = write_config(tmp_path / "cdcsync.toml", dbpair)
    assert cli("setup", "--create-tables", config=config).returncode == 0
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(30)
    log = tmp_path / "daemon.log"
    daemon = start_daemon(config, log, env={"NOTIFY_SOCKET": str(tmp_path / "notify"),
                                            "WATCHDOG_USEC": "2000000"})
    messages: list[str] = []
    try:
        def receive_until(wanted: str) -> None:
            while not any(wanted in m for m in messages):
                messages.append(sock.recv(4096).decode())

        receive_until("READY=1")
        ready_at = time.monotonic()
        execute(dbpair.source_dsn, "INSERT INTO n SELECT g, g FROM generate_series(1, 100) g")
        wait_for(converged(dbpair, ["public.n"]), timeout=30, what="the insert to arrive")
        while time.monotonic() - ready_at < 4:
            messages.append(sock.recv(4096).decode())
        daemon.send_signal(signal.SIGTERM)
        receive_until("STOPPING=1")
        assert daemon.wait(timeout=15) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
        sock.close()
    assert sum("READY=1" in m for m in messages) == 1
    pings = [m for m in messages if m.startswith("WATCHDOG=1")]
    assert 3 <= len(pings) <= 8, messages  # at half the 2 s interval over ~4 s
    assert any("STATUS=streaming, lag " in m for m in pings), messages
    assert "Traceback" not in log.read_text()


def test_watchdog_petted_while_source_is_down(dbpair: DbPair, tmp_path: Path) -> None:
    """With the source stopped for 6 s the daemon backs off ever longer between attempts, yet
    WATCHDOG=1 keeps coming about every second (no restart by systemd) while STATUS= says
    reconnecting; then it streams again."""
    if dbpair.source_cluster is None:
        pytest.skip("needs a local source cluster it may stop")
    execute(dbpair.source_dsn, "CREATE TABLE IF NOT EXISTS n (id int PRIMARY KEY, v int)")
    config = write_config(tmp_path / "cdcsync.toml", dbpair)
    assert cli("setup", "--create-tables", config=config).returncode == 0
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(30)
    daemon = start_daemon(config, tmp_path / "daemon.log",
                          env={"NOTIFY_SOCKET": str(tmp_path / "notify"),
                               "WATCHDOG_USEC": "2000000"})
    pings: list[float] = []
    statuses: list[str] = []
    try:
        while "READY=1" not in sock.recv(4096).decode():
            pass
        dbpair.source_cluster.stop("immediate")
        try:
            down_until = time.monotonic() + 6
            while time.monotonic() < down_until:
                message = sock.recv(4096).decode()
                if message.startswith("WATCHDOG=1"):
                    pings.append(time.monotonic())
                statuses.append(message)
        finally:
            dbpair.source_cluster.start()
        execute(dbpair.source_dsn, "INSERT INTO n VALUES (100001, 1)")
        wait_for(converged(dbpair, ["public.n"]), timeout=60, what="streaming again")
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=15) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
        sock.close()
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert len(pings) >= 4 and max(gaps) < 2.5, gaps
    assert any("reconnecting: source down" in s for s in statuses), statuses
