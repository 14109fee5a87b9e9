"""The sd_notify protocol on real AF_UNIX datagram sockets (path and abstract), no database."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cdcsync.health import Health
from cdcsync.notify import Notifier, SystemdReporter
from tests.harness import FakeClock


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(2)
    yield sock, path
    sock.close()


def _received(sock: socket.socket) -> list[str]:
    sock.setblocking(False)
    messages = []
    try:
        while True:
            messages.append(sock.recv(4096).decode())
    except BlockingIOError:
        return messages
    finally:
        sock.settimeout(2)


def test_send_to_path_socket(listener: tuple[socket.socket, str]) -> None:
    """Assignments arrive as one datagram of KEY=value lines; newlines in values are flattened."""
    sock, path = listener
    assert Notifier(path).send("READY=1", "STATUS=two\nlines")
    assert sock.recv(4096) == b"READY=1\nSTATUS=two lines"


def test_send_to_abstract_socket() -> None:
    """An address starting with '@' is the abstract namespace, as systemd writes it."""
    name = f"cdcsync-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        assert Notifier("@" + name).send("WATCHDOG=1")
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_without_socket_nothing_is_sent() -> None:
    """No NOTIFY_SOCKET: disabled; a socket nobody listens on: False, never an exception."""
    notifier = Notifier.from_environ({})
    assert not notifier.enabled and not notifier.send("READY=1")
    assert not Notifier("/nonexistent/notify").send("READY=1")


def test_watchdog_from_environ() -> None:
    """WATCHDOG_USEC gives half the interval; a WATCHDOG_PID of another process disables it."""
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000"}
    assert Notifier.from_environ(env).watchdog_interval_s == 15.0
    assert Notifier.from_environ({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_usec
    assert Notifier.from_environ({**env, "WATCHDOG_PID": "1"}).watchdog_interval_s is None
    assert Notifier.from_environ({"NOTIFY_SOCKET": "@x"}).watchdog_interval_s is None


def test_reporter_lifecycle(listener: tuple[socket.socket, str]) -> None:
    """READY=1 once on the first streaming state, WATCHDOG=1 at half the interval from beats,
    STATUS= with the lag, STOPPING=1 on shutdown."""
    sock, path = listener
    clock = FakeClock()
    health = Health(clock=clock)
    health.watch(SystemdReporter(Notifier(path, watchdog_usec=4_000_000),
                                 lambda: health.lag_seconds, clock=clock))
    health.set_state("streaming")
    health.set_lag(1.25)
    assert _received(sock) == ["READY=1\nSTATUS=streaming"]
    health.beat()
    clock.now += 1.0
    health.beat()  # within half the interval: nothing
    clock.now += 1.0
    health.beat()
    assert _received(sock) == ["WATCHDOG=1\nSTATUS=streaming, lag 1.2 s",
                               "WATCHDOG=1\nSTATUS=streaming, lag 3.2 s"]
    health.set_state("reconnecting", "source down: refused")
    health.set_state("streaming")
    health.set_state("stopping")
    assert _received(sock) == ["STATUS=reconnecting: source down: refused",
                               "STATUS=streaming, lag 3.2 s", "STOPPING=1\nSTATUS=stopping"]


def test_status_refreshed_without_watchdog(listener: tuple[socket.socket, str]) -> None:
    """Without WATCHDOG_USEC beats send no WATCHDOG=1, only a STATUS= every few seconds."""
    sock, path = listener
    clock = FakeClock()
    health = Health(clock=clock)
    health.watch(SystemdReporter(Notifier(path), lambda: None, clock=clock))
    health.set_state("snapshotting")
    health.beat()
    clock.now += 1
    health.beat()
    assert _received(sock) == ["READY=1\nSTATUS=snapshotting", "STATUS=snapshotting"]


def test_a_receiver_that_stops_reading_never_blocks_the_sender(
        listener: tuple[socket.socket, str]) -> None:
    """Unread datagrams fill the socket's queue; further sends fail at once instead of blocking
    the daemon's loop (the watchdog pings come from it)."""
    _, path = listener
    notifier = Notifier(path)
    started = time.monotonic()
    sent = [notifier.send(f"STATUS=ping {i}") for i in range(200)]
    assert time.monotonic() - started < 2.0
    assert sent[0] and not all(sent)
