"""How the replication stream reads the socket: a trickle is gathered into fewer wake-ups, a
backlog or a lone message after a quiet spell is read at once. libpq, select and the clock are
stand-ins, so each wake-up brings exactly what the test says."""

from __future__ import annotations

import select
import struct
import time
from collections import deque
from dataclasses import dataclass, field

import pytest

from cdcsync.model import Lsn
from cdcsync.source.replication import ReplicationStream

_XLOG = struct.Struct(">cQQq")


def xlog(payload: bytes, lsn: int = 0x1000) -> bytes:
    return _XLOG.pack(b"w", lsn, lsn, 0) + payload


@dataclass
class Socket:
    """Wake-ups to come, each the messages it brings and how long after the previous one."""

    wakeups: deque[tuple[float, list[bytes]]]
    buffered: deque[bytes] = field(default_factory=deque)
    now: float = 1000.0
    sleeps: list[float] = field(default_factory=list)

    # The PGconn calls read() makes.
    socket = 0

    def get_copy_data(self, _async: int) -> tuple[int, memoryview | bytes]:
        if not self.buffered:
            return 0, b""
        message = self.buffered.popleft()
        return len(message), memoryview(message)

    def consume_input(self) -> None:
        self.buffered.extend(self.wakeups.popleft()[1])

    # select, time.sleep and time.monotonic as read() sees them.
    def select(self, *_args: object) -> tuple[list[int], list[int], list[int]]:
        if not self.wakeups:
            return [], [], []
        self.now += self.wakeups[0][0]
        return [0], [], []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def monotonic(self) -> float:
        return self.now


@dataclass
class Conn:
    pgconn: Socket


def stream_over(monkeypatch: pytest.MonkeyPatch, wakeups: list[tuple[float, list[bytes]]]
                ) -> tuple[ReplicationStream, Socket]:
    sock = Socket(deque(wakeups))
    monkeypatch.setattr(select, "select", sock.select)
    monkeypatch.setattr(time, "sleep", sock.sleep)
    monkeypatch.setattr(time, "monotonic", sock.monotonic)
    stream = ReplicationStream("dbname=unused", "slot")
    stream._conn = Conn(sock)  # type: ignore[assignment]  # a libpq stand-in
    return stream, sock


def read_all(monkeypatch: pytest.MonkeyPatch, wakeups: list[tuple[float, list[bytes]]]
             ) -> tuple[list[bytes], list[float]]:
    """Every payload the stream yields over ``wakeups``, and the waits it made before reading."""
    stream, sock = stream_over(monkeypatch, wakeups)
    payloads: list[bytes] = []
    while sock.wakeups or sock.buffered:
        payloads.extend(stream.read(0.2))
    return payloads, sock.sleeps


def test_a_trickle_is_gathered_before_each_read_but_the_first(
        monkeypatch: pytest.MonkeyPatch) -> None:
    payloads, sleeps = read_all(monkeypatch, [(0.0001, [xlog(b"I%d" % i)]) for i in range(5)])
    assert payloads == [b"I%d" % i for i in range(5)]
    assert sleeps == [pytest.approx(0.0005)] * 4


def test_a_backlog_is_read_without_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    full = [xlog(b"I" * 200)] * 50  # more than a trickle's 8 kB
    payloads, sleeps = read_all(monkeypatch, [(0.0001, full) for _ in range(4)])
    assert len(payloads) == 200
    assert sleeps == []


def test_a_message_after_a_quiet_spell_is_read_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    payloads, sleeps = read_all(monkeypatch, [(1.0, [xlog(b"I%d" % i)]) for i in range(3)])
    assert payloads == [b"I0", b"I1", b"I2"]
    assert sleeps == []


def test_the_position_of_the_last_message_read_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    stream, _ = stream_over(monkeypatch, [(0.0, [xlog(b"I", lsn=0x2A00)])])
    assert list(stream.read(0.2)) == [b"I"]
    assert stream.last_start == Lsn(0x2A00)


def test_with_a_marker_each_wait_on_the_socket_is_announced(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader passes on what it holds when the marker comes: before each wait on the socket,
    and not between messages of one wake-up."""
    idle = b"the stream waits"
    stream, _ = stream_over(monkeypatch, [(0.0, [xlog(b"A"), xlog(b"B")]), (0.0, [xlog(b"C")])])
    got = list(stream.read(0.2, idle))
    assert got == [idle, b"A", b"B", idle]
    assert [p is idle for p in got] == [True, False, False, True]
    assert list(stream.read(0.2, idle)) == [idle, b"C", idle]
