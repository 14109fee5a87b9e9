"""Connections whose link went dead while cdcsync waits on them: found, confirmed, and cut.

TCP's keepalives and user timeout (see :mod:`cdcsync.dsn`) find a peer that vanished: its packets
go unanswered. A middlebox between cdcsync and a server (a load balancer, a TCP proxy, a NAT
gateway) that stops relaying a connection but keeps it open defeats them, as its own kernel
acknowledges every packet. A query on such a connection waits for ever, and so does the thread
that sent it: an apply lane, the slot lock's keeper, the stream's catalog questions, a scheduled
job (whose later runs are skipped meanwhile, the lag alerts with them), the initial snapshot's
copy, a resync's chunk, a verification, an operator's command.

Silence alone proves nothing: a query may run for minutes, or wait on another session's lock.
So a connection that is waiting for a command's answer and has received and sent nothing for
``silent_s`` is asked about on a fresh connection to the same server. If the server's session
(the backend the connection's start-up named, under the same user and application name) is
idle or in a ``Client`` wait, each end waits on the other, and only the link between them can
be at fault. A server that was paused (a stopped process, a frozen virtual machine) shows the
same until it has run again for a moment, so the watch looks again a second later. If the
session has not moved and the connection is still silent, the watch ends the session, whose
open transaction would otherwise keep its row locks (or the slot's lock) as long as the
middlebox keeps the connection, and shuts the connection's socket down: the waiting thread gets
the error of a lost connection and reconnects. The connection's owner is then told (a pool
drops its idle connections, which went through the same middlebox: each would stall its next
user for as long again), and for a while the watch asks about the server's other connections
after a second of silence: one lent before the pool dropped it is stuck behind the same box.

Nothing is done without the server's word. A server that is down or paused (the fresh
connection cannot be made or asked) answers the old connection again once it is back, before
the second look. A pooler or proxy that gives its clients backend ids of its own (PgBouncer
does) shows no such session, and its connections are left to its own timeouts.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
from psycopg import pq
from psycopg.rows import TupleRow

from cdcsync import libpq
from cdcsync.dsn import describe
from cdcsync.logs import event

Conn = psycopg.Connection[TupleRow]

SILENT_S = 10.0
CHECK_EVERY_S = 2.0
# The fresh connection's budget, to connect and then to answer: a watch stuck on a dead link of
# its own would watch nothing more.
_ASK_TIMEOUT_S = 10

# struct tcp_info (linux/tcp.h): milliseconds since data was last sent, and since it was last
# received, at these offsets since Linux 2.6.
_TCP_INFO_LAST = struct.Struct("=I4xI")
_TCP_INFO_LAST_OFFSET = 44

# The session, if the server shows it waiting on its client (or idle: the query never came).
_WAITING_SESSION = (b"FROM pg_stat_activity WHERE pid = $1 AND usename = current_user "
                    b"AND application_name = $2 "
                    b"AND (state LIKE 'idle%' OR wait_event_type = 'Client')")
_SESSION_STATE = (b"SELECT state, coalesce(wait_event, ''), state_change::text "
                  + _WAITING_SESSION)
# Ends it only if it has not moved since it was first seen: the check and the act in one
# statement, so a session that went on meanwhile is left alone.
_END_SESSION = (b"SELECT pg_terminate_backend(pid) " + _WAITING_SESSION
                + b" AND state_change::text = $3")
# Between the two looks at the session. A server that was only paused (a stopped process, a
# frozen virtual machine) shows its sessions as they were, idle while a query waits unread in
# the socket, until it has run again for a moment: by then it has answered the connection too.
_SETTLE_S = 1.0
# Once a connection to a server was cut, the middlebox is known to drop connections: others to
# the same server that went silent later (lent by a pool since) are asked about after this much
# silence, for three times silent_s.
_SUSPECT_SILENT_S = 1.0


@dataclass(frozen=True, slots=True)
class Cut:
    """A connection the watch cut: its server's session, what the server said it was doing, and
    how long the connection had been silent."""

    pid: int
    server_state: str
    silent_s: float


@dataclass(slots=True)
class _Watched:
    dsn: str
    pid: int
    application_name: str
    on_cut: Callable[[], None] | None
    # The other end of a pipe this connection feeds or is fed by (see LinkWatch.pair).
    partner: weakref.ref[Conn] | None = None
    cut: bool = False
    # The silence at which the server is asked again: each answer that the session is at work
    # doubles it, so a query running for an hour costs a dozen questions, not 1,800.
    ask_at_s: float = 0.0


@dataclass(slots=True)
class _Suspect:
    """A connection silent long enough to ask about, and what the server said at first."""

    conn: Conn
    info: _Watched
    silent: tuple[float, tuple[object, object]]
    probe: Conn
    seen: list[str]


class LinkWatch:
    """Watches registered connections from a thread of its own (see the module docstring);
    connections closed or forgotten by their users drop out by themselves. Its events name
    ``slot``, if the watch serves one (an operator's command may not)."""

    def __init__(self, slot: str | None, *, silent_s: float = SILENT_S,
                 check_every_s: float = CHECK_EVERY_S) -> None:
        self.slot = slot
        self._silent_s = silent_s
        self._every = check_every_s
        self._conns: weakref.WeakKeyDictionary[Conn, _Watched] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # When a connection to each DSN was last cut.
        self._cut_at: dict[str, float] = {}

    def watch(self, conn: Conn, dsn: str, on_cut: Callable[[], None] | None = None) -> None:
        """Watch ``conn``, opened with ``dsn`` (which the fresh connection reuses); call
        ``on_cut`` from the watch's thread once it is cut."""
        name = conn.info.parameter_status("application_name") or ""
        with self._lock:
            self._conns[conn] = _Watched(dsn, conn.info.backend_pid, name, on_cut)
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="cdcsync-link-watch",
                                                daemon=True)
                self._thread.start()

    def pair(self, one: Conn, other: Conn) -> None:
        """Make two watched connections the ends of a pipe (a ``COPY TO STDOUT`` whose data
        goes straight into a ``COPY FROM STDIN``). Each end's server rightly waits on the
        client while the other end is slow (a source query yet to send its next rows, a target
        busy with its indexes), so an end is cut only when its partner has no command in
        flight, or its server waits on the client too, or it was cut."""
        with self._lock:
            for conn, partner in ((one, other), (other, one)):
                info = self._conns.get(conn)
                if info is not None:
                    info.partner = weakref.ref(partner)

    def close(self) -> None:
        """Stop watching. A pass asking a server finishes on its own: the thread is a daemon's,
        and a shutdown does not wait the question's timeout out."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=1)

    def check(self) -> list[Cut]:
        """One pass over the watched connections; the ones cut. The connections silent long
        enough are asked about together, one fresh connection per server, and looked at again
        after one pause."""
        with self._lock:
            watched = list(self._conns.items())
        probes: dict[str, Conn | None] = {}
        try:
            suspects = [found for conn, info in watched
                        if (found := self._first_look(conn, info, probes)) is not None]
            if suspects:
                time.sleep(_SETTLE_S)
            # Decided for all before any is cut: a cut ends the session a partner is asked about.
            free = []
            for found in suspects:
                if self._partner_waits(found, probes):
                    free.append(found)
                else:  # waiting on a partner at work, asked about as one at work itself
                    found.info.ask_at_s = 2 * found.silent[0]
            return [cut for found in free if (cut := self._second_look(found)) is not None]
        finally:
            for probe in probes.values():
                if probe is not None:
                    probe.close()

    def _first_look(self, conn: Conn, info: _Watched,
                    probes: dict[str, Conn | None]) -> _Suspect | None:
        silent = _silence(conn)
        cut_at = self._cut_at.get(info.dsn, -math.inf)
        recent = time.monotonic() - cut_at < 3 * self._silent_s
        limit = _SUSPECT_SILENT_S if recent else self._silent_s
        if silent is None or silent[0] < limit:
            info.ask_at_s = 0.0
            return None
        if silent[0] < info.ask_at_s:
            return None
        if info.dsn not in probes:
            probes[info.dsn] = _connect(info.dsn)
        probe = probes[info.dsn]
        seen = None if probe is None else _first_row(probe, _SESSION_STATE, _params(info))
        if probe is None or seen is None:
            info.ask_at_s = 2 * silent[0]
            return None
        return _Suspect(conn, info, silent, probe, seen)

    def _partner_waits(self, suspect: _Suspect, probes: dict[str, Conn | None]) -> bool:
        """Whether the suspect's partner, if it has one, is not at work: no command in flight,
        or its server waiting on the client too (asked whatever the partner's silence: a
        partner blocked behind the suspect's dead link may be on a Unix socket)."""
        partner = None if suspect.info.partner is None else suspect.info.partner()
        if partner is None or partner.pgconn.transaction_status != pq.TransactionStatus.ACTIVE:
            return True
        with self._lock:
            info = self._conns.get(partner)
        if info is None:
            return False
        if info.cut:  # its owner, blocked on this end, has yet to find out
            return True
        if info.dsn not in probes:
            probes[info.dsn] = _connect(info.dsn)
        probe = probes[info.dsn]
        return probe is not None and _first_row(probe, _SESSION_STATE, _params(info)) is not None

    def _second_look(self, suspect: _Suspect) -> Cut | None:
        conn, info, silent = suspect.conn, suspect.info, suspect.silent
        # The socket may have closed, and its descriptor been reused, while the server was
        # asked: the same two ends, nothing moved on them.
        if not _still_silent(conn, silent) or _first_row(
                suspect.probe, _END_SESSION, [*_params(info), suspect.seen[2].encode()]) is None:
            info.ask_at_s = 2 * silent[0]
            return None
        if _still_silent(conn, silent):
            _shut(conn)
        info.cut = True
        self._cut_at[info.dsn] = time.monotonic()
        partner = None if info.partner is None else info.partner()
        with self._lock:
            other = None if partner is None else self._conns.get(partner)
        if other is not None:
            # The pipe's owner may be blocked on the partner, which waits on a partner at
            # work no more: asked about at once rather than when its silence doubled.
            other.ask_at_s = 0.0
        state, wait, _ = suspect.seen
        cut = Cut(info.pid, f"{state}, waiting on {wait}" if wait else state, silent[0])
        event(logging.WARNING, "link_cut", slot=self.slot, server=describe(info.dsn),
              backend_pid=info.pid, application=info.application_name,
              server_state=cut.server_state,
              silent_s=round(silent[0], 1))
        if info.on_cut is not None:
            info.on_cut()
        return cut

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            try:
                self.check()
            except Exception as exc:  # the watch must outlive whatever one pass meets
                event(logging.WARNING, "link_watch_failed", slot=self.slot, error=repr(exc))


@contextmanager
def watching(links: LinkWatch | None, slot: str | None) -> Iterator[LinkWatch]:
    """``links``, or else a watch of its own until the block ends."""
    if links is not None:
        yield links
        return
    own = LinkWatch(slot)
    try:
        yield own
    finally:
        own.close()


def connect(dsn: str, links: LinkWatch | None, *, autocommit: bool = True,
            connect_timeout: int = 10) -> Conn:
    """A connection to ``dsn``, watched by ``links`` when there is a watch."""
    conn = psycopg.connect(dsn, autocommit=autocommit, connect_timeout=connect_timeout)
    if links is not None:
        links.watch(conn, dsn)
    return conn


def _silence(conn: Conn) -> tuple[float, tuple[object, object]] | None:
    """While ``conn`` waits for a command's answer over TCP: the seconds since it last sent or
    received data, whichever is shorter, and its two ends; otherwise None."""
    pgconn = conn.pgconn
    waiting = pgconn.transaction_status == pq.TransactionStatus.ACTIVE
    if pgconn.status != pq.ConnStatus.OK or not waiting:
        return None
    try:
        with socket.socket(fileno=os.dup(pgconn.socket)) as sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                return None  # a Unix socket has no middlebox
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
            sent_ms, received_ms = _TCP_INFO_LAST.unpack_from(info, _TCP_INFO_LAST_OFFSET)
            return min(sent_ms, received_ms) / 1000, (sock.getsockname(), sock.getpeername())
    except (OSError, psycopg.Error):
        return None


def _still_silent(conn: Conn, before: tuple[float, tuple[object, object]]) -> bool:
    """Whether ``conn`` still waits on the same socket, and nothing moved on it since ``before``
    was measured."""
    now = _silence(conn)
    return now is not None and now[1] == before[1] and now[0] >= before[0]


def _shut(conn: Conn) -> None:
    # shutdown acts on the socket itself, which the duplicate shares: the waiting thread's poll
    # wakes, and libpq reads the end of the connection.
    try:
        with socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except (OSError, psycopg.Error):
        pass


def _connect(dsn: str) -> Conn | None:
    try:
        return psycopg.connect(dsn, autocommit=True, connect_timeout=_ASK_TIMEOUT_S,
                               application_name="cdcsync-link-watch")
    except psycopg.Error:
        return None


def _params(info: _Watched) -> list[bytes]:
    return [str(info.pid).encode(), info.application_name.encode()]


def _first_row(conn: Conn, query: bytes, params: list[bytes]) -> list[str] | None:
    """The first row of ``query``'s answer, as text; None if there is none, or no answer within
    the budget."""
    pgconn = conn.pgconn
    try:
        pgconn.send_query_params(query, list(params))
        libpq.flush(pgconn, _ASK_TIMEOUT_S)
        answers = libpq.results(pgconn, _ASK_TIMEOUT_S)
    except psycopg.Error:
        return None
    for result in answers:
        if result.status == pq.ExecStatus.TUPLES_OK and result.ntuples:
            return [bytes(result.get_value(0, i) or b"").decode() for i in range(result.nfields)]
    return None
