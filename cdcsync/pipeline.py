"""The streaming loop: slot, decode, whole transactions, apply, checkpoint, feedback.

Two threads overlap the work. The reader owns the replication connection: it reads, decodes and
assembles transactions into a bounded queue, and it alone talks to the walsender (keepalive replies
and status updates). The applier, on the caller's thread, batches whole transactions into target
transactions; after each commit it hands the checkpointed position to the reader, which reports it
to the source as flushed. Any failure tears both down; transient ones are retried from the
checkpoint with jittered exponential backoff.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import gc
import logging
import queue
import random
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool

from cdcsync import checkpoint, roundtrip, walsenders
from cdcsync.apply import tables
from cdcsync.apply.applier import Applier, Committed, copies_straight
from cdcsync.apply.batch_size import BatchSize
from cdcsync.apply.lanes import Lanes
from cdcsync.config import Settings
from cdcsync.dsn import with_session_options
from cdcsync.errors import (
    CdcsyncError,
    ConnectionLost,
    PrerequisiteError,
    SchemaMismatch,
    SlotBusy,
    TextNeeded,
    is_transient,
)
from cdcsync.handoff import Handoff
from cdcsync.health import Health, Side
from cdcsync.link_watch import LinkWatch
from cdcsync.logs import event
from cdcsync.metrics import Metrics
from cdcsync.model import (
    ZERO_LSN,
    ChangeChunk,
    Lsn,
    Relation,
    SourceMessage,
    StreamItem,
    TargetTable,
    Truncate,
    TxnEnd,
    TxnStart,
)
from cdcsync.source import catalog
from cdcsync.source.catalog_session import CatalogSession
from cdcsync.source.early import EarlyStream, start_options
from cdcsync.source.replication import ReplicationStream
from cdcsync.source.transactions import Assembler, Resolver, TransactionAssembler
from cdcsync.source.tuples import BINARY_TYPES
from cdcsync.source.wal2json_assembler import Wal2jsonAssembler

# What the reader may run ahead of the applier, in bytes of changes (ChangeChunk.size_bytes):
# about two batches of the mixed backlog. While a backlog drains, a reader held back here leaves
# the walsender's socket full, and the walsender then sends in large writes, not a message at a
# time: 0.70 CPU seconds per 300,000 changes against 0.93 with 16 MiB, and the target's merges
# get the cores the walsender no longer spends. Not much smaller: the applier would wait for
# the reader (1 MiB drained slower than 16 MiB).
HANDOFF_BYTES = 4 << 20
# What an item without rows (a transaction's start or end, a message) counts for.
_ITEM_BYTES = 64
# Items the reader passes on at once: each hand-off takes and wakes on a lock, and a transaction
# makes at least three items. A group goes sooner when the stream has nothing more to read, or
# once its changes reach GROUP_BYTES (a large transaction's chunks are not held back).
GROUP_ITEMS = 64
GROUP_BYTES = 1 << 20
# What the stream yields before it waits on its socket (see ReplicationStream.read): told apart
# from payloads by identity.
_IDLE = b"the stream waits"
# The collector's thresholds while streaming. The reader and the applier make and drop tens of
# containers per source transaction (items, rows, key sets), nearly all freed by their reference
# counts: a drain of 30,000 ten-row transactions left 61 objects in cycles. A young collection
# still walks what the queue and the open batches hold: at the default 700, about 350 of them
# per such drain; at 10,000, 14 to 16, which took 120 to 170 ms (a tenth of the daemon's CPU).
# At 100,000 none ran while draining, nor during 60 s of the steady lag bench, and peak RSS did
# not move (54 MB there, 74 MB for a million-row transaction).
_GC_THRESHOLDS = (100_000, 10, 10)
# A batch closed because the stream paused is committed on its lane's thread from this many
# changes on (see Pipeline._apply_item); a steady stream's batches hold far fewer.
CATCH_UP_ROWS = 1000
_IDLE_ADVANCE_EVERY_S = 1.0
_CHECK_AFTER_S = 1.0
_SLOT_BUSY_RETRY_S = 1.0


@dataclass(frozen=True, slots=True)
class IdleAdvance:
    """Nothing of ours is pending up to ``lsn``: checkpoint it so the slot can release the WAL."""

    lsn: Lsn


Item = StreamItem | IdleAdvance
MessageHandler = Callable[[SourceMessage, Applier], None]
"""Called in stream order for each logical message (resync watermarks), with the applier."""


def _item_bytes(item: Item) -> int:
    return item.size_bytes if isinstance(item, ChangeChunk) else _ITEM_BYTES


@dataclass(slots=True)
class Group:
    """Items the reader hands over at once, in stream order, and their ``size`` in bytes.

    ``caught_up``: handed over because the stream had nothing more to read, not because the
    group was full. Only then does the applier commit for want of more: a full group has more
    items right behind it, and committing whenever the hand-off is empty for a moment would cut
    a backlog into small batches, each paying its round trips on the target."""

    items: list[Item]
    size: int
    caught_up: bool


def _group_size(group: Group) -> int:
    return group.size


class _RecentUse:
    """A pool's check on lending a connection: one opened or given back within the last
    :data:`_CHECK_AFTER_S` is lent as it is; an older one is checked with a round trip (an
    empty query) and replaced if it is gone. Checking every time cost the start three round
    trips on its path (before the copies' states are registered, the checkpoint read and the
    first table resolved), 60 ms with a target 10 ms away. A connection that broke since is met
    by its user as any lost connection is: the stream starts again."""

    def __init__(self) -> None:
        self._last: weakref.WeakKeyDictionary[psycopg.Connection[TupleRow], float] = (
            weakref.WeakKeyDictionary())

    def used(self, conn: psycopg.Connection[TupleRow]) -> None:
        self._last[conn] = time.monotonic()

    def check(self, conn: psycopg.Connection[TupleRow]) -> None:
        last = self._last.get(conn)
        if last is None or time.monotonic() - last >= _CHECK_AFTER_S:
            ConnectionPool.check_connection(conn)


class _TargetPool(ConnectionPool[psycopg.Connection[TupleRow]]):
    """A pool whose connections given back are marked used (:class:`_RecentUse`) on the thread
    giving them back. Marked by psycopg_pool's ``reset`` callback, they went back through a
    worker task, which a closed pool drops: the connection given back right before the pool
    closed stayed open, one per stop of a daemon running in a thread (tests, the demo), until
    the garbage collector found it. Each new connection is given to ``links`` to watch; once
    one is cut, the others, idle here, are replaced."""

    def __init__(self, conninfo: str, checker: _RecentUse, links: LinkWatch | None,
                 **kwargs: Any) -> None:
        self._checker = checker
        self._links = links
        self._dsn = conninfo
        super().__init__(conninfo, check=checker.check, configure=self._configure, **kwargs)

    def _configure(self, conn: psycopg.Connection[TupleRow]) -> None:
        self._checker.used(conn)
        if self._links is not None:
            self._links.watch(conn, self._dsn, self._replace_idle)

    def _replace_idle(self) -> None:
        if not self.closed:
            self.drain()

    def putconn(self, conn: psycopg.Connection[TupleRow]) -> None:
        self._checker.used(conn)
        super().putconn(conn)


# A process killed while a middlebox kept its connection open (see cdcsync.link_watch) may
# leave its batch's transaction open on the target, for as long as the middlebox keeps the
# connection, with row locks that block the next process's batches. No live process leaves a
# transaction idle for minutes: the server ends such a session, and its locks with it.
ORPHAN_TRANSACTION_OPTIONS = "-c idle_in_transaction_session_timeout=300000"


def open_target_pool(settings: Settings, links: LinkWatch | None = None) -> ConnectionPool:
    """The target pool shared by the applier and every other user of the target, its
    connections watched by ``links``.

    As many connections from the start, opened side by side, as the stream takes as it starts:
    the copies' queue (the resyncer), the applier's workers and the reader's resolver of the
    first table. Each opened later would cost the first batch a connection's round trips."""
    return _TargetPool(
        with_session_options(settings.target.dsn.get_secret_value(), "cdcsync",
                             ORPHAN_TRANSACTION_OPTIONS),
        _RecentUse(),
        links,
        min_size=min(settings.target.pool_size, settings.apply.workers + 2),
        max_size=settings.target.pool_size,
        name="cdcsync-target",
        open=True,
        timeout=10.0,
    )


def binary_types(table: TargetTable, relation: Relation,
                 source_types: list[str]) -> TargetTable:
    """``table`` for a stream of binary values, whose staging table takes the source's types. A
    column of a type whose binary form is not the same everywhere (see :data:`BINARY_TYPES`)
    stops the stream (TextNeeded): it starts again in text."""
    for column, type_name in zip(relation.columns, source_types, strict=True):
        if column.type_oid not in BINARY_TYPES:
            raise TextNeeded(f"column {column.name} of {relation.qualified} is of type "
                             f"{type_name}, whose values cdcsync streams as text")
    return dataclasses.replace(table, binary_types=tuple(source_types))


@dataclass
class Progress:
    """Where the pipeline stands; read by the periodic jobs."""

    checkpoint: Lsn = ZERO_LSN
    commit_time: dt.datetime | None = None
    commits: int = 0
    consecutive_failures: int = 0


class Reader(threading.Thread):
    """Reads the slot into ``items``, in groups of items in stream order (up to
    :data:`GROUP_ITEMS` and :data:`GROUP_BYTES`, or what was read before the stream waits for
    more); reports ``applied`` back to the server as flushed."""

    def __init__(self, stream: ReplicationStream, assembler: Assembler,
                 items: Handoff[Group], *, record_owed: bool = False) -> None:
        super().__init__(name="cdcsync-reader", daemon=True)
        self.stream = stream
        self.assembler = assembler
        self.items = items
        self.applied = assembler.skip_before
        # The stream's walsender is recorded with its first checkpoint. On a quiet source that
        # is an idle advance with nothing new to confirm: without it a successor would find
        # the walsender unrecorded and wait out wal_sender_timeout if this host vanished.
        # Not before the first keepalive, which the walsender sends once it has caught up: a
        # backlog's first commit records it without a round trip of its own.
        self.record_owed = record_owed
        self.halt = threading.Event()
        self.error: BaseException | None = None
        # The commit LSN of the open transaction when a Relation message in it showed schema
        # drift that needs the operator.
        self.drift_at: Lsn | None = None
        self._open_txn: Lsn | None = None
        self._last_idle_advance = 0.0
        # A full group went last: the applier waits for more, so a pause of the stream is
        # passed on even with nothing read since.
        self._owe_pause = False

    def run(self) -> None:
        # Bound once: this loop runs for every message of the stream.
        halted, read, feed, last_start = (self.halt.is_set, self.stream.read,
                                          self.assembler.feed, self._last_start)
        group: list[Item] = []
        size = 0
        try:
            # Most messages complete no item: the loop costs them a call and a test. A halt is
            # seen after each hand-off (a wait there gives up on it) and after each read, which
            # returns after at most one wait on the socket.
            while not halted():
                for payload in read(0.2, _IDLE):
                    if payload is not _IDLE:
                        items = feed(payload, last_start)
                        if not items:
                            continue
                        for item in items:
                            if isinstance(item, TxnStart):
                                self._open_txn = item.final_lsn
                            size += _item_bytes(item)
                        group.extend(items)
                        if len(group) < GROUP_ITEMS and size < GROUP_BYTES:
                            continue
                        self._put(Group(group, size, caught_up=False))
                    elif group or self._owe_pause:
                        self._put(Group(group, size, caught_up=True))
                    else:
                        continue
                    group, size = [], 0
                    if halted():
                        return
                self._advance_when_idle()
                self._feedback()
        except BaseException as exc:
            # What came before the failure goes on first, as it would have one item at a time:
            # schema drift halts once everything before the drifted transaction is applied.
            if group:
                self._put(Group(group, size, caught_up=True))
            if isinstance(exc, SchemaMismatch):
                self.drift_at = self._open_txn
            self.error = exc

    def _last_start(self) -> Lsn:
        return self.stream.last_start

    def _advance_when_idle(self) -> None:
        # WAL written to tables we do not publish (or other databases) carries nothing for us,
        # but an idle slot retains it until confirmed. Once everything received is applied, the
        # keepalive's send position is checkpointed like a commit and then confirmed.
        now = time.monotonic()
        if ((self.stream.sent_end > self.applied or (self.record_owed and self.stream.sent_end))
                and not self.assembler.in_transaction
                and self.applied >= self.assembler.last_end_lsn
                and self.items.empty()
                and now - self._last_idle_advance >= _IDLE_ADVANCE_EVERY_S):
            self._last_idle_advance = now
            self.record_owed = False
            self._put(Group([IdleAdvance(max(self.stream.sent_end, self.applied))], _ITEM_BYTES,
                            caught_up=True))

    def _put(self, group: Group) -> None:
        while not self.halt.is_set():
            try:
                self.items.put(group, timeout=1.0)
                self._owe_pause = not group.caught_up
                return
            except queue.Full:
                self._feedback()

    def _feedback(self) -> None:
        self.stream.confirm(self.applied)
        self.stream.send_status_if_due()


class Pipeline:
    """Streams the configured slot into the target until ``stop`` is set."""

    def __init__(self, settings: Settings, pool: ConnectionPool, stop: threading.Event,
                 metrics: Metrics, health: Health, *, progress: Progress | None = None,
                 links: LinkWatch | None = None,
                 on_message: MessageHandler | None = None,
                 early: EarlyStream | None = None,
                 saved: checkpoint.Checkpoint | None = None,
                 described: dict[str, tables.ColumnRows] | None = None) -> None:
        self.settings = settings
        self.pool = pool
        self.stop = stop
        self.metrics = metrics
        self.health = health
        self.progress = progress or Progress()
        self.on_message = on_message
        # The last Relation message per source table, kept across reconnects: a column missing
        # from the next one was dropped on the source.
        self._relations: dict[int, Relation] = {}
        # Schema drift halts only once every transaction before the drifted one is applied, so
        # that after the operator's fix the stream resumes exactly at the new schema: the first
        # attempt notes where, a second one applies up to there and then halts.
        self._halt_at: tuple[Lsn, SchemaMismatch] | None = None
        self._drained = False
        # pgoutput's binary mode, until a relation turns up whose values must travel as text
        # (see binary_types): the stream then starts again from the checkpoint, in text.
        self._binary = settings.source.binary and settings.source.decoder == "pgoutput"
        # A stream of the slot opened while the daemon started (it asked for the same values).
        self._early = early
        # The checkpoint as the term started (read with the copy states): the first stream
        # starts from it instead of asking again.
        self._saved = saved
        # The target's catalog rows of each target table, read by the checks a moment before:
        # the first stream resolves each table's first Relation message from them, a round trip
        # fewer per table on the way to its first batch. Not behind a snapshot taken since the
        # checks (the term then read no checkpoint before it, ``saved`` is None).
        self._described = described if described and saved is not None else {}
        # Where the slot stands and each new table's column types, asked on one connection a
        # stream (closed as the stream ends).
        self._catalog = CatalogSession(settings.source.dsn.get_secret_value(), links)
        # The walsender of the last stream this process closed. Closed on a dead link (given up
        # for its silence), it may still hold the slot: the close reached no one.
        self._closed_walsender: int | None = None
        # The rows a batch merges, learnt from the link to the target: kept across reconnects.
        self._batch_size = BatchSize(settings.apply.max_rows)
        self._logged_limit = self._batch_size.rows()

    def run(self) -> None:
        """Stream until stopped; retry transient failures, raise everything else."""
        # The thresholds are the whole process's: those set before come back once the stream
        # ends, for a process that runs the daemon beside other work (the tests, the demo).
        before = gc.get_threshold()
        gc.set_threshold(*_GC_THRESHOLDS)
        try:
            self._run_retrying()
        finally:
            gc.set_threshold(*before)

    def _run_retrying(self) -> None:
        attempt = 0
        while not self.stop.is_set():
            commits_before = self.progress.commits
            try:
                self._stream_once()
                return
            except Exception as exc:
                if self._halt_at is not None and not self._drained:
                    self._drained = True
                    continue
                if isinstance(exc, TextNeeded) and self._binary:
                    self._binary = False
                    event(logging.INFO, "stream_in_text", slot=self.settings.source.slot,
                          reason=exc.message)
                    continue
                self.metrics.set_up(False)
                self.metrics.error(type(exc).__name__)
                self.progress.consecutive_failures += 1
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                if not is_transient(exc):
                    self.health.set_state("halted", reason)
                    raise
                attempt = 0 if self.progress.commits > commits_before else attempt + 1
                delay = min(30.0, 0.5 * 2 ** min(attempt, 6)) * random.uniform(0.5, 1.0)
                if isinstance(exc, SlotBusy):
                    # Only a walsender stands in the way, which _resume_position has just
                    # ended; backing off to 30 s would add up to that much to a takeover, for a
                    # cheap question. The source answers: a standby could do no better (see
                    # SlotLock's failover_after_s).
                    delay = min(delay, _SLOT_BUSY_RETRY_S)
                    self.health.set_state("reconnecting", f"slot busy: {reason}")
                else:
                    # ConnectionLost comes from the source side; every other transient error
                    # from the target's connections.
                    side: Side = "source" if isinstance(exc, ConnectionLost) else "target"
                    self.health.set_down(side, reason)
                event(logging.WARNING, "reconnecting", slot=self.settings.source.slot,
                      attempt=attempt, delay_s=round(delay, 2), error=str(exc).splitlines()[0])
                self._pause(delay)

    def _pause(self, seconds: float) -> None:
        """Wait out a backoff, beating: a loop that waits on purpose is alive (liveness probe,
        systemd watchdog); readiness already says it is reconnecting."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and not self.stop.wait(min(left, 0.5)):
            self.health.beat()

    def _stream_once(self) -> None:
        slot = self.settings.source.slot
        # The stream opened while the daemon started serves the first stream only.
        early, self._early = self._early, None
        saved, self._saved = self._saved, None
        described, self._described = self._described, {}
        adopted = early.take() if early is not None else None
        stream = adopted or ReplicationStream(
            self.settings.source.dsn.get_secret_value(), slot,
            status_interval_s=self.settings.source.status_interval_s)
        stream.receive_timeout_s = self.settings.source.receive_timeout_s
        walsender = stream.backend_pid
        try:
            with self.pool.connection() as conn:
                if saved is None:
                    with roundtrip.autocommit(conn):
                        saved = checkpoint.load(conn, slot)
                start = self._resume_position(saved, conn, ours=walsender)
                self.progress.checkpoint = start
                binary = self._binary
                assembler = self._assembler(start, texts=copies_straight(conn), binary=binary,
                                            described=described)
                if adopted is None:
                    stream.start(start, start_options(self.settings, binary=binary))
                    walsender = stream.backend_pid
                else:
                    # It streams from the slot's confirmed position, at or before the
                    # checkpoint: the assembler skips what the target already has.
                    stream.confirm(start)
                self._stream_from(stream, assembler, conn, start, binary,
                                  opened_early=adopted is not None)
        finally:
            # libpq forgets the pid of a connection it found broken: the one read once the
            # stream started stands in.
            self._closed_walsender = stream.backend_pid or walsender
            stream.close()
            self._catalog.close()

    def _stream_from(self, stream: ReplicationStream, assembler: Assembler,
                     conn: psycopg.Connection[TupleRow], start: Lsn, binary: bool, *,
                     opened_early: bool) -> None:
        slot = self.settings.source.slot
        items: Handoff[Group] = Handoff(HANDOFF_BYTES, _group_size)
        reader = Reader(stream, assembler, items, record_owed=stream.backend_pid is not None)
        reader.start()
        lanes = Lanes(conn, self.pool, self.settings, functools.partial(self._record, reader),
                      self._batch_size)
        if stream.backend_pid is not None:
            lanes.current.stream_record = walsenders.record_statement(slot, stream.backend_pid)
        self.health.set_state("streaming")
        self.metrics.set_up(True)
        self.metrics.batch_limit(self._batch_size.rows(), self._batch_size.round_trip_s)
        event(logging.INFO, "streaming", slot=slot, lsn=str(start),
              values="binary" if binary else "text", opened_early=opened_early)
        clean = False
        try:
            self._apply_loop(reader, lanes, items)
            clean = True
        finally:
            reader.halt.set()
            reader.join(timeout=5)
            lanes.close(clean=clean)
            if clean and reader.error is None:
                stream.confirm(reader.applied)
                stream.send_status()
            # Transactions re-sent below the checkpoint: nonzero after a crash, never applied.
            event(logging.INFO, "stream_closed", slot=slot, lsn=str(self.progress.checkpoint),
                  skipped_transactions=assembler.skipped_transactions)

    def _assembler(self, start: Lsn, *, texts: bool, binary: bool,
                   described: dict[str, tables.ColumnRows]) -> Assembler:
        chunk_rows = min(5000, self._batch_size.rows())
        chunk_bytes = min(8 << 20, self.settings.apply.max_bytes)
        if self.settings.source.decoder == "wal2json":
            return Wal2jsonAssembler(start, self._resolver(False, described), self._describe,
                                     chunk_rows=chunk_rows, chunk_bytes=chunk_bytes, texts=texts)
        return TransactionAssembler(start, self._resolver(binary, described), chunk_rows=chunk_rows,
                                    chunk_bytes=chunk_bytes, texts=texts, binary=binary)

    def _describe(self, schema: str, name: str) -> Relation | None:
        """The source catalog's description of a table wal2json names (once per table and run)."""
        return self._catalog.ask(lambda src: catalog.describe_table(src, schema, name))

    def _resolver(self, binary: bool, described: dict[str, tables.ColumnRows]) -> Resolver:
        """Relation -> target table, on a pool connection of its own (called by the reader);
        ``binary``, with the types its values stream in (see :func:`binary_types`). A table
        whose catalog rows are ``described`` is resolved from them, once."""
        warned: set[str] = set()

        def resolve(relation: Relation) -> TargetTable | None:
            if not tables.selected(self.settings.tables, relation.qualified):
                if relation.qualified not in warned:
                    warned.add(relation.qualified)
                    where = ("the wal2json add-tables filter"
                             if self.settings.source.decoder == "wal2json" else "the publication")
                    event(logging.WARNING, "table_not_selected", slot=self.settings.source.slot,
                          table=relation.qualified,
                          hint=f"it is in {where} but not in `tables`; ignored")
                return None
            source_types = (catalog.builtin_column_types(relation)
                            or self._catalog.ask(lambda src: catalog.column_types(src, relation)))
            previous = self._relations.get(relation.oid)
            rows = described.pop(tables.target_of(self.settings, relation), None)
            if rows is not None:
                table = tables.resolve(None, self.settings, relation, source_types=source_types,
                                       previous=previous, rows=rows)
            else:
                # In autocommit: reads need no BEGIN and COMMIT of their own (see roundtrip).
                with self.pool.connection() as pooled, roundtrip.autocommit(pooled) as conn:
                    table = tables.resolve(conn, self.settings, relation,
                                           source_types=source_types, previous=previous)
            self._relations[relation.oid] = relation
            return binary_types(table, relation, source_types) if binary else table

        return resolve

    def _resume_position(self, saved: checkpoint.Checkpoint | None,
                         conn: psycopg.Connection[TupleRow], *, ours: int | None) -> Lsn:
        """The checkpoint, once it is known to cover everything the slot has released; the slot
        may be active for ``ours`` only (the walsender of a stream this process opened)."""
        slot = self.settings.source.slot
        if saved is None:
            raise PrerequisiteError(f"the target holds no checkpoint for slot {slot!r}",
                                    fix="run `cdcsync setup`")
        info = self._catalog.ask(lambda src: catalog.slot_info(src, slot))
        if info is None:
            raise PrerequisiteError(
                f"replication slot {slot!r} does not exist on the source",
                fix="run `cdcsync setup`; the next run then re-copies every table")
        catalog.refuse_other_plugin(slot, info, self.settings.source.decoder)
        pid = info.active_pid
        if pid is not None and pid != ours and not self.stop.is_set():
            whose = self._whose_walsender(conn, slot, pid)
            if whose is None:
                consumer = self._catalog.ask(lambda src: catalog.consumer(src, pid))
                raise SlotBusy(
                    f"replication slot {slot!r} is streamed by {consumer}, a walsender that no "
                    "process syncing this target recorded as its stream",
                    fix="stop that consumer: it confirms changes this target may not have "
                        "applied (deployments syncing different targets need a slot each: "
                        "[source] slot, then `cdcsync setup`). The stream of a cdcsync that "
                        "stopped before its first commit ends by wal_sender_timeout")
            if self._catalog.ask(lambda src: catalog.end_walsender(src, slot, pid)):
                event(logging.WARNING, "walsender_ended", slot=slot, pid=pid,
                      reason=f"the walsender of {whose} still held the slot")
                # Streaming as soon as the walsender lets the slot go saves a retry's backoff.
                info = self._catalog.ask(lambda src: catalog.slot_info_until(
                    src, slot, lambda now: now is None or now.active_pid != pid,
                    _SLOT_BUSY_RETRY_S, 0.05)) or info
        if info.active_pid is not None and info.active_pid != ours:
            raise SlotBusy(
                f"replication slot {slot!r} is still in use by PID {info.active_pid}",
                fix="wait for the previous cdcsync's stream to close, or stop the other "
                    "consumer of this slot")
        confirmed = Lsn.parse(info.confirmed_flush) if info.confirmed_flush else ZERO_LSN
        if confirmed > saved.lsn:
            # The slot only ever confirms what the checkpoint held, so the target has lost
            # applied changes (restored from a backup, or it crashed without synchronous
            # commit), or another consumer of the slot confirmed them.
            raise PrerequisiteError(
                f"the target's checkpoint {saved.lsn} is behind slot {slot!r}, which the source "
                f"has already released up to {confirmed}: changes in between are missing on "
                "the target",
                fix="re-copy the tables from the source: `cdcsync teardown --yes`, "
                    "`cdcsync setup`, then `cdcsync run` copies every table again. If another "
                    "consumer streams this slot (a deployment syncing another target), give "
                    "each its own [source] slot first",
            )
        return saved.lsn

    def _whose_walsender(self, conn: psycopg.Connection[TupleRow], slot: str,
                         pid: int) -> str | None:
        """Whose stream walsender ``pid``, found holding the slot, serves, if it is this lock's
        to end (the lock makes this process the slot's only rightful consumer): a stream this
        process closed on a link that died behind a middlebox keeping it open (the close reached
        no one), or the stream a process that lost the lock recorded (its host vanished or lost
        the target, with data in flight: see dsn.PACED_PEER_OPTIONS). Either would hold the
        slot until wal_sender_timeout (60 s by default). None for any other consumer."""
        if pid == self._closed_walsender:
            return "a stream this process closed"
        with roundtrip.autocommit(conn):
            if walsenders.recorded(conn, slot) == pid:
                return "a process that no longer holds the slot's lock"
        return None

    def _apply_loop(self, reader: Reader, lanes: Lanes, items: Handoff[Group]) -> None:
        max_delay = self.settings.apply.max_delay_ms / 1000
        while not self.stop.is_set():
            self.health.beat()
            applier = lanes.current
            wait = 0.2
            if applier.opened_at is not None:
                wait = max(0.0, min(wait, applier.opened_at + max_delay - time.monotonic()))
            try:
                group = items.get(timeout=wait)
            except queue.Empty:
                if reader.error is not None:
                    if reader.drift_at is not None and isinstance(reader.error, SchemaMismatch):
                        self._halt_at = (reader.drift_at, reader.error)
                    raise reader.error from None
                if not reader.is_alive():
                    raise CdcsyncError("the replication reader stopped without an error") from None
                self._commit_quiet(lanes, applier)
                continue
            if not group.items:
                self._commit_quiet(lanes, applier)
                continue
            last = len(group.items) - 1
            for position, item in enumerate(group.items):
                self._apply_item(reader, lanes, item, max_delay,
                                 more=position < last or not group.caught_up
                                 or not items.empty())

    @staticmethod
    def _commit_quiet(lanes: Lanes, applier: Applier) -> None:
        """Nothing more is coming for now: commit what the current lane holds, else wait for
        the commits in flight."""
        if applier.has_uncommitted and not applier.in_source_transaction:
            lanes.commit(wait=True)
        else:
            lanes.settle()

    def _apply_item(self, reader: Reader, lanes: Lanes, item: Item, max_delay: float, *,
                    more: bool) -> None:
        """Hand ``item`` to the current lane, committing a batch open ``max_delay`` seconds;
        ``more``: another item is waiting, or follows soon (its group was full)."""
        applier = lanes.current
        if isinstance(item, TxnStart):
            if self._halt_at is not None and item.final_lsn >= self._halt_at[0]:
                if applier.has_uncommitted:
                    lanes.commit(wait=True)
                lanes.settle()
                raise self._halt_at[1]
            applier.start()
        elif isinstance(item, ChangeChunk):
            applier.add(item)
        elif isinstance(item, TxnEnd):
            applier.end(item)
            overdue = (applier.opened_at is not None
                       and time.monotonic() - applier.opened_at >= max_delay)
            if applier.batch_full() or overdue or not more:
                # With nothing queued, a small batch is committed here and now: nothing would
                # fill another lane meanwhile, and a lane's thread would cost a quiet stream a
                # turn at the interpreter lock. A large one is a backlog's, whose reader caught
                # up with the walsender for a moment: more follows within milliseconds, and a
                # merge committed here (a quarter of a second for 60,000 rows) would hold up the
                # next batch, so it goes to its lane's thread.
                lanes.commit(wait=not more and applier.pending_rows < CATCH_UP_ROWS)
        elif isinstance(item, IdleAdvance):
            if not applier.has_uncommitted and not applier.in_source_transaction:
                self._checkpointed(reader, applier.advance(item.lsn))
        elif isinstance(item, Truncate):
            applier.truncate(item)
        elif isinstance(item, SourceMessage):
            event(logging.DEBUG, "source_message", slot=self.settings.source.slot,
                  prefix=item.prefix, lsn=str(item.lsn))
            if self.on_message is not None:
                self.on_message(item, applier)

    def _record(self, reader: Reader, done: Committed) -> None:
        """A target commit ended: report its position to the slot, count what it applied."""
        self._checkpointed(reader, done.lsn)
        self.progress.commit_time = done.commit_time
        self.progress.consecutive_failures = 0
        metrics = self.metrics
        metrics.transactions(done.transactions)
        metrics.batch(done.seconds, done.rows)
        self._batch_limit(done.lsn)
        for (table, op), count in done.applied.items():
            metrics.applied(table, op, count)
        for table, count in done.conflicts.items():
            metrics.conflicts(table, count)
        for table, count in done.dead_letters.items():
            metrics.dead_letters(table, count)
        lag = max(0.0, (dt.datetime.now(dt.UTC) - done.commit_time).total_seconds())
        metrics.lag(lag)
        self.health.set_lag(lag)

    def _batch_limit(self, lsn: Lsn) -> None:
        """Export the batches' row limit; log it when it has moved by a tenth or more since it
        was last logged (with "auto" it follows the target's round trip, batch by batch)."""
        rows, round_trip = self._batch_size.rows(), self._batch_size.round_trip_s
        self.metrics.batch_limit(rows, round_trip)
        if abs(rows - self._logged_limit) * 10 >= self._logged_limit:
            self._logged_limit = rows
            event(logging.INFO, "batch_limit", slot=self.settings.source.slot, lsn=str(lsn),
                  rows=rows, round_trip_ms=None if round_trip is None
                  else round(round_trip * 1000, 3))

    def _checkpointed(self, reader: Reader, lsn: Lsn) -> None:
        reader.applied = lsn
        reader.record_owed = False
        self.progress.checkpoint = lsn
        self.progress.commits += 1
        self.metrics.checkpoint(lsn)

