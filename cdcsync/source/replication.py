"""The replication connection: start streaming a slot, read XLogData, answer keepalives, confirm.

psycopg 3 has no replication API; its low-level ``pgconn`` carries the COPY BOTH protocol fine on
a connection opened with ``replication="database"``. Only the simple query protocol works there,
so the few statements sent are built from names the configuration validated (plain identifiers).

Guarantee: the position reported to the server as flushed is only ever one given to
:meth:`ReplicationStream.confirm`, that is, one the target's checkpoint already holds. The source
therefore keeps every byte of WAL the target still needs.
"""

from __future__ import annotations

import fcntl
import importlib
import os
import select
import struct
import sys
import termios
import time
from collections.abc import Callable, Iterator
from typing import Final

import psycopg
from psycopg import pq
from psycopg.rows import TupleRow

from cdcsync import libpq
from cdcsync.dsn import application_name, with_session_options
from cdcsync.errors import ConnectionLost, PrerequisiteError, SlotBusy
from cdcsync.model import PG_EPOCH, ZERO_LSN, Lsn
from cdcsync.refusals import refusal

_XLOG_HEADER: Final = struct.Struct(">cQQq")  # 'w', data start, WAL end, send time
_KEEPALIVE: Final = struct.Struct(">cQqB")  # 'k', WAL end, send time, reply requested
# 'r', written, flushed, applied, client time, reply requested
_STATUS: Final = struct.Struct(">cQQQqB")
_W: Final = ord("w")
_K: Final = ord("k")
_PG_EPOCH_UNIX_US: Final = int(PG_EPOCH.timestamp()) * 1_000_000
# The walsender sends each message as soon as it is decoded, so a reader that keeps up wakes for
# every one or two of them: up to 50,000 wake-ups (select, recv, the loop around them) for 300,000
# rows, a quarter of its CPU. A wake-up that brought less than _TRICKLE_BYTES soon after the last
# one means the stream trickles: the next read waits _GATHER_S first, for dozens of messages at
# once. A lone message after a quiet spell is read at once.
_TRICKLE_BYTES: Final = 8192
_GATHER_S: Final = 0.0005
_TRICKLE_GAP_S: Final = 0.002


# Messages taken from libpq's buffer per call of the compiled reader: a bound on the list a read
# holds (the early stream may have buffered 32 MiB), large enough that the call is amortised.
_TAKE_LIMIT: Final = 4096
# How long the walsender may take to answer START_REPLICATION (or to end a stream) before the
# connection counts as lost and the stream starts again: it answers within a round trip unless
# the source or the network stalls.
_START_TIMEOUT_S: Final = 60.0

Take = Callable[[int, int], tuple[list[bytes], int]]


def batch_reader() -> Take | None:
    """``_copybatch.take`` bound to the libpq psycopg has loaded, or None: the extension is not
    compiled (a pure-Python install), or this process has no single libpq file mapped (not
    Linux, or two copies). Call it once psycopg has opened a connection."""
    try:
        copybatch = importlib.import_module("cdcsync.source._copybatch")
    except ImportError:
        return None
    path = _loaded_libpq()
    if path is None:
        return None
    try:
        copybatch.bind(path)
    except OSError:
        return None
    take: Take = copybatch.take
    return take


def _loaded_libpq() -> str | None:
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            mapped = {fields[5].strip() for line in maps
                      if len(fields := line.split(maxsplit=5)) == 6}
    except OSError:
        return None
    found = {path for path in mapped if os.path.basename(path).startswith(("libpq.so", "libpq-"))}
    return found.pop() if len(found) == 1 else None


def _now_pg_us() -> int:
    return time.time_ns() // 1000 - _PG_EPOCH_UNIX_US


class ReplicationStream:
    """One logical slot streamed over one replication connection; not thread-safe."""

    def __init__(self, dsn: str, slot: str, *, status_interval_s: float = 10.0,
                 batched: bool = True) -> None:
        # Named for this process, as its slot lock's session is: status and pg_stat_replication
        # show which process streams the slot.
        self._dsn = with_session_options(dsn, application_name(), paced=True)
        self._batched = batched
        self._take: Take | None = None
        self.slot = slot
        self._status_interval_s = status_interval_s
        # A connection that died without a reset (a host gone, a NAT's entry dropped) stays
        # silent: after half of this without a byte while waiting on it, the walsender is asked
        # for a reply; after all of it, the connection counts as lost. 0: wait forever. Set by
        # the pipeline when it takes the stream, which may have been opened before the
        # configuration was validated.
        self.receive_timeout_s = 0.0
        self._silent_s = 0.0  # spent waiting on the socket since the last byte came
        self._pinged = False
        self._conn: psycopg.Connection[TupleRow] | None = None
        self._confirmed = Lsn(0)
        self._reported = Lsn(0)
        self._sent_end = Lsn(0)
        self._last = b""
        self._last_status = 0.0
        # What the last wake-up brought, and when it came (see _TRICKLE_BYTES).
        self._haul = 0
        self._woke_at = 0.0

    @property
    def sent_end(self) -> Lsn:
        """The server's send position from its last keepalive: every commit before it was sent."""
        return self._sent_end

    @property
    def confirmed(self) -> Lsn:
        return self._confirmed

    @property
    def backend_pid(self) -> int | None:
        """The walsender's process id on the source, once the connection is open."""
        return None if self._conn is None else self._conn.pgconn.backend_pid

    def start(self, start_lsn: Lsn, options: dict[str, str]) -> None:
        """Open the connection and enter COPY BOTH at ``start_lsn`` (0/0: the slot's confirmed)."""
        try:
            self._conn = psycopg.connect(self._dsn, replication="database", autocommit=True,
                                         connect_timeout=10)
        except psycopg.OperationalError as exc:
            raise refusal(exc, self._dsn, "source") or ConnectionLost(
                f"cannot open the replication connection: {exc}") from exc
        pgconn = self._conn.pgconn
        # Quoted names: wal2json's options contain dashes.
        opts = ", ".join(f'"{name}" \'{value}\'' for name, value in options.items())
        command = f'START_REPLICATION SLOT "{self.slot}" LOGICAL {start_lsn} ({opts})'
        pgconn.send_query(command.encode())
        try:
            # Waited for on the socket: libpq's own wait would hold the interpreter lock, and
            # every other thread of the daemon (its start's imports included) with it.
            result = libpq.next_result(pgconn, _START_TIMEOUT_S)
        except psycopg.OperationalError as exc:
            self.close()
            raise ConnectionLost(f"START_REPLICATION on slot {self.slot!r}: {exc}") from exc
        if result is None or result.status != pq.ExecStatus.COPY_BOTH:
            message = (result.error_message if result else pgconn.error_message).decode().strip()
            self.close()
            raise _start_error(self.slot, message)
        pgconn.nonblocking = 1
        if self._batched and self._take is None:
            self._take = batch_reader()
        self._confirmed = max(self._confirmed, start_lsn)
        self._last_status = time.monotonic()
        self._silent_s, self._pinged = 0.0, False

    @property
    def last_start(self) -> Lsn:
        """The WAL position of the last XLogData message read (for error messages)."""
        return Lsn(_XLOG_HEADER.unpack_from(self._last)[1]) if self._last else ZERO_LSN

    def read(self, timeout_s: float, idle: bytes | None = None) -> Iterator[bytes]:
        """Yield the payloads of the XLogData messages available within ``timeout_s``;
        keepalives are handled inline. With ``idle``, yield that object before each wait on the
        socket (and before returning), so a reader holding on to results passes them on first."""
        pgconn = self._require()
        waited = False
        while True:
            messages, status = self._messages(pgconn)
            for message in messages:
                self._haul += len(message)
                kind = message[0]
                if kind == _W:
                    self._last = message
                    yield message[_XLOG_HEADER.size :]
                elif kind == _K:
                    _, sent_end, _, reply = _KEEPALIVE.unpack_from(message)
                    self._sent_end = Lsn(max(self._sent_end, sent_end))
                    if reply:
                        self.send_status()
            if status > 0:
                continue
            if status == -1:
                raise self._ended()
            if status < -1:
                raise ConnectionLost("replication stream failed: "
                                     + pgconn.error_message.decode(errors="replace").strip())
            if idle is not None:
                yield idle
            if waited:
                return
            trickling = self._haul < _TRICKLE_BYTES
            before = time.monotonic()
            readable, _, _ = select.select([pgconn.socket], [], [], timeout_s)
            waited = True
            if not readable:
                self._silence(time.monotonic() - before)
                return
            self._silent_s, self._pinged = 0.0, False
            if trickling and time.monotonic() - self._woke_at < _TRICKLE_GAP_S:
                time.sleep(_GATHER_S)
            self._woke_at = time.monotonic()
            self._haul = 0
            try:
                pgconn.consume_input()
            except psycopg.Error as exc:
                raise ConnectionLost(f"replication stream failed: {exc}") from exc

    def _silence(self, seconds: float) -> None:
        """Count ``seconds`` more of waiting for nothing; ping, then give up (see __init__).
        Only time spent waiting counts: while the reader is held back, the walsender waits for
        it, not the other way round."""
        self._silent_s += seconds
        limit = self.receive_timeout_s
        if limit <= 0:
            return
        if self._silent_s >= limit:
            raise ConnectionLost(
                f"the source sent nothing for {self._silent_s:.0f} s, not even an answer to a "
                "status update asking for one: the connection is presumed dead "
                "([source] receive_timeout_s)")
        if self._silent_s >= limit / 2 and not self._pinged:
            self.send_status(reply=True)
            self._pinged = True

    def _messages(self, pgconn: pq.abc.PGconn) -> tuple[list[bytes], int]:
        """Messages libpq holds now, and what its last PQgetCopyData returned (see
        ``_copybatch.c``): up to :data:`_TAKE_LIMIT` of them with the compiled reader, else one."""
        if self._take is not None:
            # Every implementation has it (psycopg 3.1+); the protocol class does not declare it.
            pointer: int | None = getattr(pgconn, "pgconn_ptr", None)
            if pointer is None:
                raise ConnectionLost("the replication connection is closed")
            return self._take(pointer, _TAKE_LIMIT)
        try:
            nbytes, data = pgconn.get_copy_data(1)
        except psycopg.Error as exc:
            raise ConnectionLost(f"replication stream failed: {exc}") from exc
        # One copy out of libpq's buffer, which is then freed; slicing the memoryview and
        # copying the slice costs twice the calls (bytes() of a view looks for __bytes__).
        return ([data.tobytes()], nbytes) if nbytes > 0 else ([], nbytes)

    def buffer(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for the server, then let libpq take what has arrived into
        its buffer without reading any message (see :mod:`cdcsync.source.early`); return the
        bytes the socket held."""
        pgconn = self._require()
        readable, _, _ = select.select([pgconn.socket], [], [], timeout_s)
        if not readable:
            return 0
        held = int.from_bytes(fcntl.ioctl(pgconn.socket, termios.FIONREAD, bytes(4)),
                              sys.byteorder)
        try:
            pgconn.consume_input()
        except psycopg.Error as exc:
            raise ConnectionLost(f"replication stream failed: {exc}") from exc
        return held

    def confirm(self, lsn: Lsn) -> None:
        """Record that the target has durably applied everything up to ``lsn``."""
        self._confirmed = max(self._confirmed, lsn)

    def send_status_if_due(self) -> None:
        """Report progress within a second of it, and every status interval regardless."""
        since = time.monotonic() - self._last_status
        if since >= self._status_interval_s or (self._confirmed > self._reported and since >= 1):
            self.send_status()

    def send_status(self, reply: bool = False) -> None:
        """Report the confirmed position; with ``reply``, ask the walsender to answer at once."""
        pgconn = self._require()
        lsn = self._confirmed
        message = _STATUS.pack(b"r", lsn, lsn, lsn, _now_pg_us(), int(reply))
        try:
            pgconn.put_copy_data(message)
            libpq.flush(pgconn)
        except psycopg.Error as exc:
            raise ConnectionLost(f"cannot send a status update: {exc}") from exc
        self._last_status = time.monotonic()
        self._reported = lsn

    def close(self) -> None:
        if self._conn is not None:
            # Leaving COPY BOTH politely costs a round trip; closing ends the walsender as well.
            self._conn.pgconn.finish()
            self._conn = None

    def _require(self) -> pq.abc.PGconn:
        if self._conn is None:
            raise ConnectionLost("the replication connection is not open")
        return self._conn.pgconn

    def _ended(self) -> Exception:
        pgconn = self._require()
        try:
            result = libpq.next_result(pgconn, _START_TIMEOUT_S)
        except psycopg.OperationalError as exc:
            return ConnectionLost(f"replication stream on slot {self.slot!r} ended: {exc}")
        message = (result.error_message if result else pgconn.error_message).decode().strip()
        return _stream_error(self.slot, message or "the server ended the replication stream")


def _start_error(slot: str, message: str) -> Exception:
    if "does not exist" in message and "slot" in message:
        return PrerequisiteError(
            f"replication slot {slot!r} does not exist on the source",
            fix="run `cdcsync setup` to create it",
        )
    if "is active for PID" in message:
        # The daemon checks that the slot is free (under the slot's lock) right before: what
        # took it since is a stream that had not quite ended, or the early stream of a standby
        # starting up (cdcsync.source.early), which lets go within a second. Retried.
        return SlotBusy(
            f"replication slot {slot!r} is in use by another process: {message}",
            fix="stop the other consumer of this slot, or configure a different [source] slot",
        )
    return ConnectionLost(f"START_REPLICATION failed: {message}")


def _stream_error(slot: str, message: str) -> Exception:
    if "publication" in message and "does not exist" in message:
        return PrerequisiteError(
            f"the source says: {message}", fix="run `cdcsync setup` to create the publication"
        )
    return ConnectionLost(f"replication stream on slot {slot!r} ended: {message}")
