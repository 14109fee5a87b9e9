"""Target transactions applied side by side on several connections, committed in source order.

One connection is one backend on the target, and one backend merges on one core: while a backlog
drains, the merges queue behind each other and the target's other cores stay idle. Each lane is
an :class:`Applier` with a connection of its own; the pipeline fills one lane while the commits of
the others run on their threads.

Order: each commit's first statement takes an advisory lock of its own, held until its
transaction ends, and the next commit is sent only once that lock is held. Right before its
checkpoint, a commit waits for the lock of the one before it, then expects the position that one
wrote (:func:`cdcsync.checkpoint.save_statement`'s ``after``) and fails otherwise. So no target
transaction commits before every earlier one has, and one that fails takes every later one with
it: they are rolled back, and the stream starts again from the checkpoint as after any failure.

The merges run side by side only when the batches cannot meet: no key in common (merges of one
key would wait on each other, or each on the other), and no table that takes part in a foreign
key (a child's check does not see the parent another lane has not committed yet, and would
refuse it). Otherwise the commit waits for the one before it right after copying its stages,
before its merge locks any row: only the copies and the round trips overlap. Before anything
else touches the target (a flush inside a large transaction, a column added, a TRUNCATE, a
resync's window, an idle advance), the commits in flight are waited for first (:meth:`settle`).
"""

from __future__ import annotations

import random
import threading
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool

from cdcsync import roundtrip
from cdcsync.apply import tables
from cdcsync.apply.applier import Applier, Committed, Turn
from cdcsync.apply.batch_size import BatchSize
from cdcsync.apply.script import Staged
from cdcsync.config import Settings
from cdcsync.model import Lsn

Conn = psycopg.Connection[TupleRow]


@dataclass(frozen=True, slots=True)
class _Footprint:
    """What a commit's batch touches: per table, whether it holds inserts alone, and its keys
    (None where the reader left them unmade or unknown)."""

    tables: dict[int, tuple[bool, set[bytes] | None]]

    @staticmethod
    def of(batches: list[Staged]) -> _Footprint:
        # The sets themselves, not copies: a batch no longer changes once it is committed.
        return _Footprint({b.table.oid: (b.only_inserts, None if b.unkeyed else b.keys)
                           for b in batches})

    def meets(self, other: _Footprint) -> bool:
        """Whether the two batches may change one row. Inserts alone never do: two consecutive
        source transactions cannot insert one key without a delete between them."""
        for oid, (inserts, keys) in self.tables.items():
            theirs = other.tables.get(oid)
            if theirs is None or (inserts and theirs[0]):
                continue
            if keys is None or theirs[1] is None or not keys.isdisjoint(theirs[1]):
                return True
        return False


@dataclass(frozen=True, slots=True)
class _InFlight:
    applier: Applier
    future: Future[Committed]
    end: Lsn
    footprint: _Footprint
    number: int
    taken: threading.Event


def _lock(function: str, space: int, number: int) -> sql.Composed:
    return sql.SQL("SELECT {}({}, {})").format(sql.Identifier(function), sql.Literal(space),
                                                sql.Literal(number))


def _commit(applier: Applier, turn: Turn) -> Committed:
    try:
        return applier.commit(turn=turn)
    finally:
        turn.taken.set()  # a commit that failed before its lock must not hold up the next


class Lanes:
    """Up to ``[apply] workers`` appliers; :attr:`current` takes the stream's items, and
    :meth:`commit` sends its batch to the target on the lane's thread. Each commit that ends
    reaches ``on_committed``, in source order, on the caller's thread."""

    def __init__(self, conn: Conn, pool: ConnectionPool, settings: Settings,
                 on_committed: Callable[[Committed], None],
                 batch_size: BatchSize | None = None) -> None:
        self._pool = pool
        self._settings = settings
        self.batch_size = batch_size or BatchSize(settings.apply.max_rows)
        self._workers = settings.apply.workers
        self._on_committed = on_committed
        self._borrowed: list[Conn] = []
        self._added: set[tuple[int, str]] = set()
        self._free: deque[Applier] = deque([self._lane(conn)])
        self._current: Applier | None = None
        self._flight: deque[_InFlight] = deque()
        self._linked: dict[int, bool] = {}
        # The advisory locks' key space: one per slot, so daemons of other slots applying to the
        # same target never wait on these; numbers start anywhere, so a lock from an earlier
        # stream that a connection has not released yet is never waited for.
        self._space = zlib.crc32(settings.source.slot.encode()) & 0x7FFFFFFF
        self._number = random.randrange(1 << 30)
        self._threads = (ThreadPoolExecutor(self._workers, thread_name_prefix="cdcsync-apply")
                         if self._workers > 1 else None)

    @property
    def current(self) -> Applier:
        """The lane taking the stream's items: an idle one, a new one while fewer than
        ``workers`` are open, or else the oldest in flight once its commit has ended."""
        if self._current is None:
            if self._free:
                self._current = self._free.popleft()
            elif len(self._borrowed) + 1 < self._workers:
                conn: Conn = self._pool.getconn()
                self._borrowed.append(conn)
                self._current = self._lane(conn)
            else:
                self._current = self._finish_oldest()
        return self._current

    def commit(self, *, wait: bool = False) -> None:
        """Commit the current lane's batch: on its thread if there are workers, else here; with
        ``wait``, here once the commits in flight have ended (nothing would fill another lane
        meanwhile, and a thread's turn for the interpreter lock costs a quiet stream latency)."""
        applier = self.current
        end = applier.end_lsn
        if wait or self._threads is None or end is None or applier.windows_open:
            # A resync's window is a temp table of this lane's connection: until it closes, the
            # stream stays on this lane, one commit after the other.
            self.settle()
            self._on_committed(applier.commit())
            return
        footprint = _Footprint.of(applier.pending)
        if self._flight and not self._may_overlap(applier):
            self.settle()
        self._number = (self._number + 1) & 0x7FFFFFFF
        before = self._flight[-1] if self._flight else None
        if before is not None:
            # This commit waits for the lock of the one before: that one must hold it first.
            before.taken.wait()
        turn = Turn(_lock("pg_advisory_xact_lock", self._space, self._number),
                    None if before is None else _lock("pg_advisory_xact_lock_shared",
                                                      self._space, before.number),
                    before is not None and not self._beside(applier, footprint),
                    None if before is None else before.end, threading.Event())
        future = self._threads.submit(_commit, applier, turn)
        self._flight.append(_InFlight(applier, future, end, footprint, self._number,
                                      turn.taken))
        self._current = None

    def settle(self) -> None:
        """Wait for every commit in flight, in order."""
        while self._flight:
            self._free.append(self._finish_oldest())

    def close(self, *, clean: bool) -> None:
        """End the lanes. Clean, the current lane's whole source transactions are committed (a
        source transaction it holds part of is rolled back) and the commits in flight waited
        for; otherwise every lane whose commit has not ended is rolled back (a commit that
        ended is reported). Connections borrowed from the pool go back to it."""
        try:
            lane = self._current
            if not clean:
                self._abandon()
            elif lane is not None and lane.in_source_transaction:
                lane.rollback()
                self.settle()
            elif lane is not None and lane.has_uncommitted:
                self.commit(wait=True)
            else:
                self.settle()
        finally:
            if self._threads is not None:
                self._threads.shutdown(wait=True)
            for conn in self._borrowed:
                self._pool.putconn(conn)
            self._borrowed.clear()

    def _lane(self, conn: Conn) -> Applier:
        applier = Applier(conn, self._settings, self._added, self.batch_size)
        applier.before_flush = self.settle
        return applier

    @staticmethod
    def _may_overlap(applier: Applier) -> bool:
        """Whether ``applier``'s commit may start before the commits in flight end: not if its
        transaction already holds locks (an earlier flush) or may add a column (a lock on the
        whole table)."""
        return not (applier.flushed or any(b.table.add_columns for b in applier.pending))

    def _beside(self, applier: Applier, footprint: _Footprint) -> bool:
        """Whether ``applier``'s batch may be merged while the commits in flight run."""
        unknown = [oid for oid in footprint.tables if oid not in self._linked]
        if unknown:
            with roundtrip.autocommit(applier.conn) as conn:
                linked = tables.linked(conn, unknown)
            self._linked.update((oid, oid in linked) for oid in unknown)
        if any(self._linked[oid] for oid in footprint.tables):
            return False
        return not any(footprint.meets(f.footprint) for f in self._flight)

    def _finish_oldest(self) -> Applier:
        """Wait for the oldest commit in flight and report it. If it failed, every later one
        fails too (its checkpoint names this one's): all are rolled back, and the error
        raised."""
        oldest = self._flight.popleft()
        try:
            done = oldest.future.result()
        except BaseException:
            oldest.applier.rollback()
            self._abandon()
            raise
        self._on_committed(done)
        return oldest.applier

    def _abandon(self) -> None:
        """Roll back the current lane and every commit in flight that fails; report those that
        committed (they ended before the failure that got here)."""
        if self._current is not None:
            self._current.rollback()
        while self._flight:
            lane = self._flight.popleft()
            try:
                done = lane.future.result()
            except BaseException:
                lane.applier.rollback()
                continue
            self._on_committed(done)
            self._free.append(lane.applier)
