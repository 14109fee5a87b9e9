"""The two servers verify talks to: one connection and one thread each, so both hash at once.

Both connections pin the settings that shape a value's text (time zone, date, interval, float and
bytea output), so the same stored value reads the same on either server whatever their defaults.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow

from cdcsync import leader, link_watch, probe
from cdcsync.config import Settings
from cdcsync.dsn import with_session_options
from cdcsync.errors import VerifyError
from cdcsync.link_watch import LinkWatch
from cdcsync.model import Lsn
from cdcsync.refusals import connection_error

Conn = psycopg.Connection[TupleRow]
T = TypeVar("T")
U = TypeVar("U")

# Later -c options win, so these override whatever the DSN's own options say.
PINNED = ("-c TimeZone=UTC -c DateStyle=ISO -c IntervalStyle=postgres -c extra_float_digits=3 "
          "-c bytea_output=hex -c statement_timeout=0 -c jit=off")

_CHECKPOINT_SQL = "SELECT lsn::text FROM cdcsync.checkpoint WHERE slot = %s"
_SLOT_ACTIVE_SQL = "SELECT active FROM pg_replication_slots WHERE slot_name = %s"


def pinned_dsn(dsn: str, application_name: str) -> str:
    params = conninfo_to_dict(with_session_options(dsn, application_name))
    params["options"] = f"{params.get('options') or ''} {PINNED}".strip()
    return make_conninfo(**{k: str(v) for k, v in params.items() if v is not None})


@dataclass
class Sides:
    """Source and target connections. Queries that must run at the same time go through each
    side's own thread; catalog look-ups between comparisons may use the connections directly."""

    source: Conn
    target: Conn
    slot: str
    _source_thread: ThreadPoolExecutor
    _target_thread: ThreadPoolExecutor
    # This process streams the slot (the daemon's own scheduled verification): changes may be
    # in flight even while it reconnects, holding neither the slot nor its lock.
    consuming: bool = False
    # Where the configuration's daemon answers its probes (see streaming), if anywhere.
    daemon: str | None = None

    def both(self, on_source: Callable[[Conn], T], on_target: Callable[[Conn], U]
             ) -> tuple[T, U]:
        """Run one function on each side at the same time; return both results."""
        left = self._source_thread.submit(on_source, self.source)
        right = self._target_thread.submit(on_target, self.target)
        return _result(left), _result(right)

    def on_source(self, work: Callable[[Conn], T]) -> T:
        return _result(self._source_thread.submit(work, self.source))

    def on_target(self, work: Callable[[Conn], T]) -> T:
        return _result(self._target_thread.submit(work, self.target))

    def streaming(self) -> bool:
        """Whether changes may be in flight to the target: a consumer holds the slot, or a
        cdcsync process holds the slot's lock on the target (it may be between two connections
        to the source, reconnecting after a fault), or this process is the consumer. Or the
        daemon of this configuration answers its probe, neither halted nor stopping: it holds
        neither for a few seconds after losing its lock (to a target restart, say), before it
        takes the lock again and applies what it has not yet."""
        if self.consuming:
            return True
        row = self.on_source(lambda c: c.execute(_SLOT_ACTIVE_SQL, (self.slot,)).fetchone())
        if row and row[0]:
            return True
        if self.on_target(lambda c: leader.lock_holder(c, self.slot)) is not None:
            return True
        ready = probe.readiness(self.daemon) if self.daemon is not None else None
        return ready is not None and ready.get("state") not in ("halted", "stopping")

    def wait_for_checkpoint(self, lsn: Lsn, timeout_s: float) -> None:
        """Return once the target holds every source commit up to ``lsn``."""
        deadline = time.monotonic() + timeout_s
        while True:
            row = self.on_target(lambda c: c.execute(_CHECKPOINT_SQL, (self.slot,)).fetchone())
            if row is not None and Lsn.parse(str(row[0])) >= lsn:
                return
            if time.monotonic() >= deadline:
                raise VerifyError(
                    f"the target's checkpoint for slot {self.slot!r} did not reach the source "
                    f"position {lsn} within {timeout_s:g} s, so differences cannot be told "
                    "from changes in flight",
                    fix="let `cdcsync run` catch up (see `cdcsync status`) or raise "
                        "[verify] catchup_timeout_s",
                )
            time.sleep(0.05)


def _result(future: Future[T]) -> T:
    try:
        return future.result()
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VerifyError(f"verify query failed: {first}",
                          fix="check that both tables are readable by the configured roles"
                          ) from exc


def source_lsn(conn: Conn) -> Lsn:
    """The source's WAL insert position: at or past every commit a query just saw."""
    row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert row is not None
    return Lsn.parse(str(row[0]))


@contextmanager
def open_sides(settings: Settings, consuming: bool = False,
               links: LinkWatch | None = None) -> Iterator[Sides]:
    """Both connections, watched by ``links`` (or by a watch of their own while open): each
    only asks and reads whole answers, so one left silent while its server waits on it sits
    behind a dead link, and a comparison of hours would otherwise wait on it for ever."""
    with ExitStack() as stack:
        watch = stack.enter_context(link_watch.watching(links, settings.source.slot))
        conns = []
        for side, dsn in (("source", settings.source.dsn), ("target", settings.target.dsn)):
            secret = dsn.get_secret_value()
            pinned = pinned_dsn(secret, "cdcsync-verify")
            try:
                conn = link_watch.connect(pinned, watch)
            except psycopg.OperationalError as exc:
                raise connection_error(exc, secret, side) from None
            conns.append(stack.enter_context(conn))
        threads = [stack.enter_context(ThreadPoolExecutor(1, f"verify-{n}"))
                   for n in ("source", "target")]
        yield Sides(conns[0], conns[1], settings.source.slot, threads[0], threads[1], consuming,
                    probe.base_url(settings.http.listen))


def fetch(query: tuple[sql.Composed, list[object]]) -> Callable[[Conn], list[tuple[Any, ...]]]:
    """A function running ``query`` on a connection and returning its rows."""
    statement, params = query
    return lambda conn: conn.execute(statement, params).fetchall()
