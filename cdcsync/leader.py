"""Active/standby: one ``cdcsync run`` per slot streams, the others wait to take over.

The active process holds a session advisory lock on the target, keyed by the slot name, on a
connection of its own (never a pool connection, whose sessions are shared and recycled). A standby
tries the same lock every ``check_every_s``. When the active process dies (kill -9, host lost),
the target ends its session, the lock is free, and a standby takes it and resumes from the
checkpoint.

Guarantee: a process streams only while its lock connection answers. The keeper checks it every
``check_every_s``; when it fails, the stream is told to stop at once and the process contends
again. The slot itself is the second fence: the source lets one walsender use it at a time, and
the pipeline starts only once the previous holder's stream is gone (it ends a walsender it finds
still holding the slot, which streams for no one who holds the lock).

Like every cdcsync connection, the lock's asks the target for TCP keepalives and a user timeout
(:data:`cdcsync.dsn.PEER_TIMEOUT_OPTIONS`), so the lock of a host that vanished without closing
its connection is released in about 15 s, not hours.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow

from cdcsync import pooler
from cdcsync.dsn import application_name, with_session_options
from cdcsync.errors import PrerequisiteError
from cdcsync.logs import event

if TYPE_CHECKING:
    from cdcsync.health import Health
    from cdcsync.link_watch import LinkWatch

Conn = psycopg.Connection[TupleRow]

# The granted holds of one bigint advisory key in this database.
_HELD = sql.SQL("""l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid = {classid}::bigint::oid AND l.objid = {objid}::bigint::oid""")

_HOLDER = sql.SQL("""
SELECT a.application_name, a.pid, host(a.client_addr)
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE """)

# Standbys waiting for the slot's lock, each holding the slot's standby key shared.
_STANDBYS = sql.SQL("SELECT count(*) FROM pg_locks l WHERE l.mode = 'ShareLock' AND ")


def _key(text: str) -> int:
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def lock_key(slot: str) -> int:
    """A stable signed 64-bit advisory lock key for ``slot`` (the same on every host)."""
    return _key(f"cdcsync slot {slot}")


def standby_key(slot: str) -> int:
    """The key each standby of ``slot`` holds shared while it waits: a try for the slot's lock
    leaves no trace, and the active process must know whether anyone would take over."""
    return _key(f"cdcsync standby {slot}")


# Serializes installs of the target's cdcsync schema (shared by every slot).
METADATA_LOCK_KEY = _key("cdcsync metadata")


def _key_halves(key: int) -> tuple[int, int]:
    """pg_locks shows a bigint advisory key as classid (high 32 bits) and objid (low 32 bits)."""
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    return unsigned >> 32, unsigned & 0xFFFF_FFFF


@dataclass(frozen=True, slots=True)
class Holder:
    """The session holding a slot's lock, as the target sees it."""

    application_name: str
    backend_pid: int
    client_addr: str | None

    def describe(self) -> str:
        where = f" from {self.client_addr}" if self.client_addr else ""
        return f"{self.application_name or '(no application_name)'}{where}"


def _key_query(select: sql.SQL, key: int) -> sql.Composed:
    classid, objid = _key_halves(key)
    return select + _HELD.format(classid=classid, objid=objid)


def holder_query(slot: str) -> sql.Composed:
    """The query naming who holds ``slot``'s lock, values included: it can travel with others
    in one round trip."""
    return _key_query(_HOLDER, lock_key(slot))


def waiting_standbys(conn: Conn, slot: str) -> int:
    """How many processes wait as standbys for ``slot``'s lock on this connection's target."""
    row = conn.execute(_key_query(_STANDBYS, standby_key(slot))).fetchone()
    return int(row[0]) if row else 0


def lock_holder(conn: Conn, slot: str) -> Holder | None:
    """Who holds ``slot``'s lock on the target this connection points at, if anyone."""
    row = conn.execute(holder_query(slot)).fetchone()
    return None if row is None else Holder(str(row[0] or ""), int(row[1]), row[2])


def _gone_from_here(holder: Holder) -> bool:
    """Whether ``holder`` names a process of this host (``cdcsync PID@HOST``) that no longer
    runs. Its session outlived it: killed while a middlebox kept its connection open, or before
    the host restarted, it never closed. (A PID taken since by another process, or a container
    whose new process has the old PID, is taken for alive: the server's idle timeout ends
    the session then, see _take.)"""
    name = holder.application_name
    pid_text = name.removeprefix("cdcsync ").partition("@")[0]
    if not pid_text.isdigit() or application_name(int(pid_text)) != name:
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # it runs, under another user
    return False


def _ends_left_session(conn: Conn, holder: Holder) -> bool:
    """End ``holder``'s session if it comes from the address this connection comes from (the
    same host, not one of the same name elsewhere); whether it was asked to end."""
    row = conn.execute("SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a "
                       "WHERE a.pid = %s AND a.application_name = %s AND "
                       "host(a.client_addr) IS NOT DISTINCT FROM host(inet_client_addr())",
                       (holder.backend_pid, holder.application_name)).fetchone()
    return bool(row and row[0])


def lock_dsn(dsn: str) -> str:
    """The lock connection's DSN: named for this process (``PID@HOST``), which shows who holds
    the lock; a connection attempt to a lost host gives up after 10 s."""
    params = conninfo_to_dict(with_session_options(dsn, "cdcsync"))
    params["application_name"] = application_name()
    params.setdefault("connect_timeout", "10")
    return make_conninfo(**{k: str(v) for k, v in params.items() if v is not None})


_TAKE = sql.SQL("SELECT pg_try_advisory_lock(%s), pg_postmaster_start_time(), pg_backend_pid()")
_TAKE_AND_LIMIT_IDLE = sql.SQL("SELECT pg_try_advisory_lock(%s), pg_postmaster_start_time(), "
                               "pg_backend_pid(), set_config('idle_session_timeout', {}, false)")
_IDLE_SESSION_TIMEOUT_SINCE = 140000
# A lock session idle for this many check intervals has lost its process (see _take).
_IDLE_INTERVALS = 15
# How long a lock session asked to end may take to release the lock.
_RELEASE_S = 1.0


class SlotLock:
    """Contends for the slot's lock until it holds it; then keeps watching the connection."""

    def __init__(self, target_dsn: str, slot: str, health: Health, stop: threading.Event, *,
                 check_every_s: float = 2.0, failover_after_s: float = 0.0,
                 links: LinkWatch | None = None) -> None:
        self._dsn = lock_dsn(target_dsn)
        # A lock connection whose link died holds the lock on the target for as long as a
        # middlebox keeps it: the watch ends that session (see cdcsync.link_watch).
        self._links = links
        self.slot = slot
        self.key = lock_key(slot)
        self._health = health
        self._stop = stop
        self._every = check_every_s
        self._failover_after_s = failover_after_s
        self._term_started = 0.0
        self._standby_key = standby_key(slot)
        # The connection on which this process holds the standby key, if any.
        self._standing_on: Conn | None = None
        self._conn: Conn | None = None
        # The lock's connection, found to keep its server session behind a pooler.
        self._own_session: Conn | None = None
        self._keeper: threading.Thread | None = None
        self._term: threading.Event | None = None
        self._lost = False
        self._opening: threading.Thread | None = None
        self._taken_ahead = False
        # The target's start time when the lock was last taken: a later one means the target
        # restarted, which ended every session, this process's lock with them.
        self._target_started: dt.datetime | None = None

    def open_ahead(self, *, take: bool = False,
                   opened: Callable[[], Conn | None] | None = None) -> None:
        """Open the lock's connection on a thread of its own, while the caller does something
        else, and with ``take`` try the lock there too (the caller expects it free); then
        :meth:`acquire` only asks for the lock, or finds it held. ``opened`` gives a connection
        opened earlier with :func:`lock_dsn` (see :class:`cdcsync.target_ahead.TargetAhead`),
        or None. A failure here is left for :meth:`acquire` to meet again, and report."""
        self._opening = threading.Thread(target=self._open_quietly, args=(take, opened),
                                         name="cdcsync-lock-open", daemon=True)
        self._opening.start()

    def _open_quietly(self, take: bool, opened: Callable[[], Conn | None] | None) -> None:
        with contextlib.suppress(psycopg.Error, PrerequisiteError):
            conn = opened() if opened is not None else None
            if conn is not None and not conn.closed:
                self._conn = conn
                self._watch(conn)
            else:
                conn = self._connected()
            if take:
                self._taken_ahead = self._take(conn)

    def _opened(self) -> None:
        opening, self._opening = self._opening, None
        if opening is not None:
            opening.join()

    def acquire(self, waiting: Callable[[], None] | None = None) -> threading.Event | None:
        """Wait as a standby until the lock is ours; return an event set when it is lost or on
        stop (the active term), or None when stopped first. ``waiting`` is called once if the
        lock is not free at the first try."""
        self._health.set_role("standby")
        if self._lost:
            # Leave the first try to a standby that has been waiting: the lock was lost for a
            # reason (a partition) that may hit this host again. Not when the target restarted:
            # that ended every session alike, and handing over would only add a failover.
            self._lost = False
            if not self._target_restarted():
                self._wait(2)
        while not self._stop.is_set():
            if self._try():
                self._term_started = time.monotonic()
                term = self._term = threading.Event()
                self._keeper = threading.Thread(target=self._keep, args=(term,),
                                                name="cdcsync-lock", daemon=True)
                self._keeper.start()
                self._health.set_role("active")
                event(logging.INFO, "lock_acquired", slot=self.slot, key=self.key)
                return term
            if waiting is not None:
                waiting()
                waiting = None
            self._wait(1)
        return None

    def _try(self) -> bool:
        self._opened()
        taken_ahead, self._taken_ahead = self._taken_ahead, False
        if taken_ahead and self._conn is not None and not self._conn.closed:
            return True
        try:
            conn = self._connected()
            if self._take(conn):
                return True
            holder = lock_holder(conn, self.slot)
            if holder is not None and _gone_from_here(holder) \
                    and _ends_left_session(conn, holder):
                event(logging.WARNING, "lock_session_ended", slot=self.slot,
                      holder=holder.describe(),
                      reason="its process no longer runs on this host")
                if self._take_once_released(conn):
                    return True
            if self._standing_on is not conn:
                conn.execute("SELECT pg_try_advisory_lock_shared(%s)", (self._standby_key,))
                self._standing_on = conn
        except psycopg.Error as exc:
            self._down(exc)
            return False
        who = holder.describe() if holder else "another session"
        if self._health.state != "standby" or self._health.reason != f"lock held by {who}":
            event(logging.INFO, "standby", slot=self.slot, holder=who)
        self._health.set_state("standby", f"lock held by {who}")
        return False

    def _take_once_released(self, conn: Conn) -> bool:
        """Take the lock a session asked to end holds, once its backend has exited (at once,
        as a rule): a process just started then streams without a standby's wait."""
        deadline = time.monotonic() + _RELEASE_S
        while not self._take(conn):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _connected(self) -> Conn:
        """The lock's connection, opened again if it was closed or lost."""
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self._dsn, autocommit=True)
            self._watch(self._conn)
        return self._conn

    def _watch(self, conn: Conn) -> None:
        if self._links is not None:
            self._links.watch(conn, self._dsn)

    def _down(self, exc: psycopg.Error) -> None:
        self._close()
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        self._health.set_down("target", reason)
        event(logging.WARNING, "reconnecting", slot=self.slot, side="target",
              delay_s=self._every, error=reason)

    def _take(self, conn: Conn) -> bool:
        query: sql.SQL | sql.Composed = _TAKE
        if conn.info.server_version >= _IDLE_SESSION_TIMEOUT_SINCE:
            # Holding the lock or waiting for it, this session is asked something every
            # interval; one idle for many more has lost its process (killed while a middlebox
            # kept its connection open, which TCP's timeouts cannot tell from a live one). The
            # server then ends it, and the lock or the standby's key goes with it.
            query = _TAKE_AND_LIMIT_IDLE.format(
                sql.Literal(str(round(_IDLE_INTERVALS * self._every * 1000))))
        row = conn.execute(query, (self.key,)).fetchone()
        if not (row and row[0]):
            return False
        if pooler.behind_pooler(conn, row[2]) and self._own_session is not conn:
            if pooler.lends_sessions(conn, self._dsn, row[2], unlock=self.key):
                raise pooler.refused()
            self._own_session = conn
        self._target_started = row[1]
        if self._standing_on is conn:
            conn.execute("SELECT pg_advisory_unlock_shared(%s)", (self._standby_key,))
            self._standing_on = None
        return True

    def _target_restarted(self) -> bool:
        """Whether the target started again since the lock was taken; waits for it to answer."""
        while not self._stop.is_set():
            try:
                row = self._connected().execute("SELECT pg_postmaster_start_time()").fetchone()
                return row is not None and row[0] != self._target_started
            except psycopg.Error as exc:
                self._down(exc)
                self._wait(1)
        return False

    def _wait(self, intervals: int) -> None:
        """Sleep check intervals in slices, beating: a waiting standby is a healthy loop."""
        slices = max(1, round(intervals * self._every / 0.2))
        for _ in range(slices):
            self._health.beat()
            if self._stop.wait(intervals * self._every / slices):
                return

    def _keep(self, term: threading.Event) -> None:
        """Check the lock connection every interval, and every pass while the stream finds the
        target down; end the term at once when it fails, or give the lock up when the stream
        has not reached the source for ``failover_after_s`` and a standby waits."""
        conn = self._conn
        assert conn is not None
        alone_told = False
        next_check = time.monotonic() + self._every
        while not term.is_set() and not self._stop.wait(0.2):
            # A target that restarted took the lock's session with it. Found out only at the
            # next interval, the loss would end the term after the stream had reconnected and
            # caught up, leaving the slot unheld for the standby's turn (see acquire): a verify
            # run then could not tell changes in flight from differences.
            if time.monotonic() < next_check and self._health.down != "target":
                continue
            next_check = time.monotonic() + self._every
            stuck = self._cannot_stream()
            waiting = 0
            try:
                if stuck:
                    waiting = waiting_standbys(conn, self.slot)
                else:
                    conn.execute("SELECT 1")
            except psycopg.Error as exc:
                text = str(exc).strip()
                event(logging.ERROR, "lock_lost", slot=self.slot,
                      error=text.splitlines()[0] if text else repr(exc))
                self._lost = True
                self._close()
                break
            if not stuck:
                alone_told = False
            elif waiting:
                self._give_way()
                break
            elif not alone_told:
                # Giving way with no one to take over would only stop this process for the
                # standby's turn, every failover_after_s, while the source is out.
                alone_told = True
                event(logging.WARNING, "lock_kept", slot=self.slot,
                      reason=f"the source unreachable for {self._failover_after_s:g} s, but no "
                             "standby waits to take over")
        term.set()

    def _cannot_stream(self) -> bool:
        """Whether the stream has failed to reach the source for ``failover_after_s``: this
        host may have lost its route to the source alone, and a waiting standby that can reach
        it should have the slot. If the source itself is down, the standby fails alike and the
        lock comes back after its turn."""
        limit = self._failover_after_s
        # Counted from the term's start too: a term taken back after giving way gets its tries.
        return limit > 0 and min(self._health.down_for("source"),
                                 time.monotonic() - self._term_started) >= limit

    def _give_way(self) -> None:
        event(logging.WARNING, "lock_released", slot=self.slot,
              reason=f"the source unreachable for {self._failover_after_s:g} s; a standby "
                     "that reaches it may take over")
        self._lost = True  # the standby's turn first, as after a partition
        self._close()

    def release(self) -> None:
        """Give the lock up (closing its session) and stop the keeper."""
        keeper, self._keeper = self._keeper, None
        if self._term is not None:
            self._term.set()
        if keeper is not None:
            keeper.join(timeout=self._every + 1)
        self._close()

    def _close(self) -> None:
        self._opened()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

