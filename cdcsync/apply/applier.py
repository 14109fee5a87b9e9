"""One target transaction at a time: stage, merge (:mod:`cdcsync.apply.merge`), checkpoint, commit.

Guarantee: a target transaction holds whole source transactions followed by the checkpoint of the
last one, so the target never shows part of a source transaction and the checkpoint always names
exactly what the target holds. A source transaction larger than the batch limits is merged in
several flushes inside the same target transaction: memory stays bounded, visibility stays atomic.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import psycopg
from psycopg import errors as pgerrors
from psycopg import pq, sql
from psycopg.rows import TupleRow

from cdcsync import checkpoint, roundtrip
from cdcsync.apply import merge, tables, window
from cdcsync.apply import script as plan
from cdcsync.apply import sql as q
from cdcsync.apply.batch_size import BatchSize
from cdcsync.apply.merge import Merger
from cdcsync.apply.script import Script, Staged
from cdcsync.config import Settings
from cdcsync.errors import ApplyError, CopyRefused, SchemaMismatch
from cdcsync.keyrange import KeyOrder, Span
from cdcsync.logs import event
from cdcsync.model import (
    ChangeChunk,
    CopiedRows,
    Lsn,
    TableRows,
    TargetTable,
    Truncate,
    TxnEnd,
)
from cdcsync.source.tuples import COMPILED

Conn = psycopg.Connection[TupleRow]
Cur = psycopg.Cursor[TupleRow]

# Client encodings (Python's names) that never put COPY's delimiters or backslash inside a
# multibyte character: batches of inserts are copied straight into their tables only in these,
# and only where the rows' conversion runs compiled (as Python it costs more than it saves).
_STRAIGHT_ENCODINGS = frozenset({"utf-8", "ascii"})


def copies_straight(conn: Conn) -> bool:
    """Whether batches of inserts may be copied straight into their tables over ``conn``."""
    return COMPILED and conn.info.encoding in _STRAIGHT_ENCODINGS


@dataclass(frozen=True, slots=True)
class Turn:
    """A commit's place among commits applied side by side (see :mod:`cdcsync.apply.lanes`).

    ``take`` runs first and holds a lock until the transaction ends; ``wait`` waits until the
    commit before this one has ended: right before the checkpoint, or ``early``, right after the
    staging copies (before anything locks a row of the target). The checkpoint then expects
    ``after``, the position that one wrote. ``taken`` is set once ``take`` holds its lock (or
    the commit has given up)."""

    take: sql.Composed
    wait: sql.Composed | None
    early: bool
    after: Lsn | None
    taken: threading.Event


@dataclass(slots=True)
class Committed:
    """What one target commit applied; counts cover only what that commit made durable."""

    lsn: Lsn
    commit_time: dt.datetime
    transactions: int
    rows: int
    seconds: float
    applied: Counter[tuple[str, str]]
    conflicts: Counter[str]
    dead_letters: Counter[str]


class Applier:
    """Applies the stream items of whole source transactions to the target through ``conn``."""

    def __init__(self, conn: Conn, settings: Settings,
                 added: set[tuple[int, str]] | None = None,
                 batch_size: BatchSize | None = None) -> None:
        self.conn = conn
        self.settings = settings
        self.slot = settings.source.slot
        # Shared by the lanes of a stream, which all measure the same link.
        self.batch_size = batch_size or BatchSize(settings.apply.max_rows)
        self._orders: dict[frozenset[int], tuple[list[int], set[int]]] = {}
        self._stages: set[str] = set()
        # (table oid, column) added on the target by this stream; shared by the lanes, which
        # wait for the commit adding a column before they touch its table.
        self._added = set() if added is None else added
        self._dirty: set[str] = set()
        self._pending: dict[int, Staged] = {}
        # Target table oid -> the temp table recording the keys the stream changes while a
        # resync chunk of that table is read (between its low and high watermarks).
        self._windows: dict[int, str] = {}
        self._pending_rows = 0
        self._pending_bytes = 0
        # What was pending when the open source transaction began (see _own_batch_full).
        self._carried_rows = 0
        self._in_txn = False
        self._last_end: TxnEnd | None = None
        self.opened_at: float | None = None
        self._transactions = 0
        self._rows = 0
        self._busy_s = 0.0
        self._applied: Counter[tuple[str, str]] = Counter()
        self._merger = Merger(self.slot, settings.apply.on_error, self.batch_size.copy_waited)
        # Called before the target is touched other than by a lane's commit (a flush inside a
        # large transaction, a window, a copied chunk, a TRUNCATE, an idle advance): the lanes
        # settle the commits in flight first (see cdcsync.apply.lanes).
        self.before_flush: Callable[[], None] | None = None
        # Travels with this lane's next checkpoint (see cdcsync.walsenders), once.
        self.stream_record: sql.Composed | None = None

    @property
    def in_source_transaction(self) -> bool:
        return self._in_txn

    @property
    def has_uncommitted(self) -> bool:
        return self._last_end is not None

    @property
    def end_lsn(self) -> Lsn | None:
        """The end of the last source transaction the next commit applies."""
        return None if self._last_end is None else self._last_end.end_lsn

    @property
    def pending(self) -> list[Staged]:
        """What the next flush merges, a batch per table."""
        return list(self._pending.values())

    @property
    def windows_open(self) -> bool:
        return bool(self._windows)

    @property
    def flushed(self) -> bool:
        """Whether the target transaction is open: an earlier flush merged part of it."""
        return self.conn.pgconn.transaction_status != pq.TransactionStatus.IDLE

    def start(self) -> None:
        if self.opened_at is None:
            self.opened_at = time.monotonic()
        self._in_txn = True
        self._carried_rows = self._pending_rows

    def add(self, chunk: ChangeChunk) -> None:
        if not self._in_txn:
            raise ApplyError("changes arrived outside a source transaction")
        for rows in chunk.tables:
            self._stage_rows(rows)
        self._pending_rows += chunk.rows
        self._rows += chunk.rows
        self._pending_bytes += chunk.size_bytes
        if self._own_batch_full():
            self._flush()

    def _stage_rows(self, rows: TableRows) -> None:
        table = rows.target
        pending = self._pending.get(table.oid)
        if pending is not None and (pending.relation != rows.relation
                                    or pending.binary != rows.binary):
            self._flush()  # the column list changed: rows of each version go to its own stage
            pending = None
        if pending is None:
            stage = q.stage_name(table, rows.relation, binary=rows.binary)
            pending = self._pending[table.oid] = Staged(table, rows.relation, stage,
                                                        binary=rows.binary)
        pending.chunks.append(rows)
        pending.only_inserts = pending.only_inserts and not (rows.updates or rows.deletes)
        pending.add_keys(rows)
        pending.inserts += rows.inserts
        pending.deletes += rows.deletes
        pending.unchanged_mask |= rows.unchanged_mask
        name = table.source_name
        self._applied[(name, "insert")] += rows.inserts
        self._applied[(name, "update")] += rows.updates
        self._applied[(name, "delete")] += rows.deletes

    def end(self, item: TxnEnd) -> None:
        self._in_txn = False
        self._last_end = item
        self._transactions += 1

    @property
    def pending_rows(self) -> int:
        """The changes staged since the last commit."""
        return self._pending_rows

    def batch_full(self) -> bool:
        return (self._pending_rows >= self.batch_size.rows()
                or self._pending_bytes >= self.settings.apply.max_bytes)

    def _own_batch_full(self) -> bool:
        """Whether to flush before the open source transaction ends: when it alone fills the
        batch's rows (:attr:`batch_size`), or when the batch reaches ``max_bytes``, the bound on
        memory. A smaller transaction that tips the batch over its rows is merged with it at its
        end, when the pipeline commits the full batch: a flush of its own would cost a wait."""
        return (self._pending_rows - self._carried_rows >= self.batch_size.rows()
                or self._pending_bytes >= self.settings.apply.max_bytes)

    def open_window(self, table: TargetTable) -> None:
        """A resync chunk's low watermark: from here on, record every key the stream changes."""
        self._flush()
        name = window.window_name(table)
        with self.conn.cursor() as cur:
            cur.execute(window.create_window(name, table))
            cur.execute(window.clear_window(name))
        self._windows[table.oid] = name

    def apply_copied(self, copied: CopiedRows, order: KeyOrder, span: Span, *, windowed: bool,
                     delete_missing: bool, condition: str | None = None) -> int | None:
        """Merge rows copied from the source with the conflict rule; with ``delete_missing``,
        delete target rows of ``span`` (and ``condition``) the copy lacks. Windowed (a resync
        chunk at its high watermark), keys the stream changed since the low watermark are left
        to the stream; None means that window was lost (a restart, a TRUNCATE): read the chunk
        again."""
        table = copied.target
        # Changes still pending belong to the window: record their keys before closing it.
        self._flush()
        name: str | None = None
        if windowed:
            name = self._windows.pop(table.oid, None)
            if name is None:
                return None
        started = time.perf_counter()
        batch = Staged(table, copied.relation, window.chunk_stage_name(table, copied.relation),
                       [TableRows(copied.relation, table, [copied.data], copied.rows)],
                       inserts=copied.rows)
        script = self._script([batch], windowed=False)
        dropped = None if name is None else script.add(window.drop_changed(batch.stage, name,
                                                                           table))
        self._merger.add_merge(script, [batch], self.conn)
        missing = (window.delete_missing(batch.stage, name, table, order, span,
                                         condition=condition) if delete_missing else None)
        removed = None if missing is None else script.add(missing)
        try:
            rowcounts, refused = self._merger.run(self.conn, script)
            if dropped is not None:
                batch.inserts -= rowcounts[dropped]
            deleted = 0
            if refused is not None:
                with self.conn.cursor() as cur:
                    self._merger.recover(cur, [batch], refused)
                    if missing is not None:
                        deleted = cur.execute(missing).rowcount
            elif removed is not None:
                deleted = rowcounts[removed]
        except ApplyError as exc:
            raise CopyRefused(exc.message, fix=exc.fix) from exc
        except pgerrors.Error as exc:
            # Outside the merge (the deletion of rows the source lacks, say): not a change to
            # pin down, the copy as a whole is refused.
            if isinstance(exc, psycopg.OperationalError):
                raise
            raise CopyRefused(
                f"the target refused rows copied from the source into {table.source_name}: "
                f"{' '.join(str(exc).split())}",
                fix=merge.refusal_fix(exc, table, self.conn, "")) from exc
        self._busy_s += time.perf_counter() - started
        self._applied[(table.source_name, "copy")] += batch.inserts
        if deleted:
            self._applied[(table.source_name, "delete")] += deleted
        return batch.inserts

    def truncate(self, item: Truncate) -> None:
        self._flush()
        for table in item.tables:
            # Keys recorded before a TRUNCATE no longer say what the stream holds.
            self._windows.pop(table.oid, None)
        if self.settings.apply.truncate == "ignore":
            return
        with self.conn.cursor() as cur:
            try:
                cur.execute(q.truncate(list(item.tables)))
            except pgerrors.InsufficientPrivilege as exc:
                raise self._truncate_refused(exc, item.tables) from exc
        for table in item.tables:
            self._applied[(table.source_name, "truncate")] += 1
            event(logging.INFO, "truncated", slot=self.slot, table=table.source_name)

    def _truncate_refused(self, exc: pgerrors.Error,
                          truncated: tuple[TargetTable, ...]) -> ApplyError:
        """A TRUNCATE the role may not run (the start refuses a role without TRUNCATE, so it
        was revoked since): halts, with the GRANT."""
        denied = next((t for t in truncated if t.name == exc.diag.table_name), truncated[0])
        return ApplyError(
            f"the target refused a source TRUNCATE of "
            f"{', '.join(t.source_name for t in truncated)}: {str(exc).strip()}",
            fix=merge.refusal_fix(exc, denied, self.conn, "", truncates=True))

    def commit(self, *, save_checkpoint: bool = True, turn: Turn | None = None) -> Committed:
        """Merge what is pending, write the checkpoint, commit; say what was applied.

        Without ``save_checkpoint`` (a retry of dead letters) the checkpoint stays as it is. With
        a ``turn``, the commit takes its place among commits on other connections."""
        end = self._last_end
        if end is None or self._in_txn:
            raise ApplyError("commit requested in the middle of a source transaction")
        started = time.perf_counter()
        if save_checkpoint:
            # The checkpoint and the COMMIT travel with the last flush: no round trip of their own.
            save = [checkpoint.save_statement(self.slot, end.end_lsn, end.commit_time,
                                              after=turn.after if turn else None),
                    *self._take_stream_record()]
            if turn is not None and turn.wait is not None and not turn.early:
                save.insert(0, turn.wait)
            self._flush(save, turn)
        else:
            self._flush()
            self.conn.commit()
        conflicts, dead_letters = self._merger.take_counts()
        done = Committed(end.end_lsn, end.commit_time, self._transactions, self._rows,
                         self._busy_s + time.perf_counter() - started, self._applied,
                         conflicts, dead_letters)
        self._reset()
        return done

    def advance(self, lsn: Lsn) -> Lsn:
        """Checkpoint a position that holds no change of ours (nothing may be pending)."""
        if self.has_uncommitted or self._in_txn:
            raise ApplyError("idle advance requested with changes pending")
        self._flush([checkpoint.save_statement(self.slot, lsn, None), *self._take_stream_record()])
        return lsn

    def _take_stream_record(self) -> list[sql.Composed]:
        record, self.stream_record = self.stream_record, None
        return [] if record is None else [record]

    def rollback(self) -> None:
        """Drop the open target transaction; its source transactions will be streamed again."""
        if not self.conn.closed:
            # A lost connection has taken the transaction with it.
            with contextlib.suppress(psycopg.OperationalError):
                self.conn.rollback()
        self._pending = {}
        self._stages.clear()
        self._windows.clear()
        self._added.clear()
        self._reset()

    def _reset(self) -> None:
        self._transactions = self._rows = 0
        self._busy_s = 0.0
        self._applied = Counter()
        self._merger.take_counts()  # what a rolled-back transaction counted never happened
        self._dirty.clear()
        self._pending_rows = self._carried_rows = 0
        self._pending_bytes = 0
        self._in_txn = False
        self._last_end = None
        self.opened_at = None

    def _flush(self, save: list[sql.Composed] | None = None, turn: Turn | None = None) -> None:
        """Merge what is pending; with ``save`` (the checkpoint's statements), then commit with
        it; with a ``turn`` (a lane's commit), taking its lock first. Any other flush first lets
        the commits in flight end (:attr:`before_flush`)."""
        if turn is None and self.before_flush is not None:
            self.before_flush()
        if not self._pending and save is None:
            return
        started = time.perf_counter()
        try:
            self._flush_pending(save, turn)
        finally:
            self._busy_s += time.perf_counter() - started

    def _flush_pending(self, save: list[sql.Composed] | None, turn: Turn | None) -> None:
        """One query for the whole flush (see :mod:`cdcsync.apply.script`); the fallbacks, when
        the target refuses the merged batch, cost round trips of their own."""
        pending, self._pending = self._pending, {}
        self._pending_rows = self._pending_bytes = self._carried_rows = 0
        order, cyclic = self._order(pending.keys()) if pending else ([], set())
        batches = [pending[oid] for oid in order]
        in_order = bool(cyclic & pending.keys())
        with self.conn.cursor() as cur:
            for batch in batches:
                self._add_columns(cur, batch.table)
        if not in_order:
            straight = copies_straight(self.conn)
            for batch in batches:
                batch.direct = straight and self._copies_straight(batch)
        # Tables in a foreign-key cycle are replayed in source order, every version of a key.
        script = self._script(batches, first=turn.take if turn else None, collapse=not in_order)
        if turn is not None and turn.wait is not None and turn.early:
            script.add(turn.wait)
        if batches and not in_order:
            self._merger.add_merge(script, batches, self.conn)
        settled = not in_order
        if save is not None and settled:
            plan.commit(script, *save)
        _, refused = self._merger.run(self.conn, script, turn.taken if turn else None)
        if settled and refused is None:
            return
        with self.conn.cursor() as cur:
            if in_order:
                # Tables in a foreign-key cycle go straight to source order.
                self._merger.replay(cur, batches)
            elif refused is not None:
                self._stage_whole(batches)
                self._merger.recover(cur, batches, refused)
            for statement in save or ():
                cur.execute(statement)
        if save is not None:
            self.conn.commit()

    def _copies_straight(self, batch: Staged) -> bool:
        """Whether to COPY ``batch`` straight into its table (:func:`plan.copy_straight`):
        inserts alone, all values sent, no resync window to record keys in (it reads them from
        the stage), a table that has not lately refused a plain insert, no row-level security
        for the applying role (COPY FROM refuses it), and binary values only where the reader
        made their rows."""
        return (batch.only_inserts and batch.inserts > 0 and not batch.unchanged_mask
                and batch.table.oid not in self._windows
                and self._merger.inserts_plainly(batch.table.oid)
                and not batch.table.row_security
                and (not batch.binary or batch.straight_rows))

    def _stage_whole(self, batches: list[Staged]) -> None:
        """Stage every version of every key of the batches the refused merge copied straight or
        staged collapsed: the fallbacks read the stage, and replay the changes in source order
        (a unique value moving between rows may need the versions in between)."""
        partial = [b for b in batches if b.direct or b.collapsed]
        for batch in partial:
            batch.direct = False
        if partial:
            self._merger.run(self.conn, self._script(partial))

    def _order(self, oids: Iterable[int]) -> tuple[list[int], set[int]]:
        key = frozenset(oids)
        if key not in self._orders:
            # Asked outside a transaction, the question needs no BEGIN of its own: the flush's
            # query opens the transaction (a round trip saved where the target is far).
            idle = self.conn.pgconn.transaction_status == pq.TransactionStatus.IDLE
            with (roundtrip.autocommit(self.conn) if idle
                  else contextlib.nullcontext(self.conn)) as conn:
                self._orders[key] = tables.foreign_key_order(conn, sorted(key))
        return self._orders[key]

    def _add_columns(self, cur: Cur, table: TargetTable) -> None:
        """Add the columns new on the source, in the transaction applying their first rows."""
        for name, type_name in table.add_columns:
            if (table.oid, name) in self._added:
                continue
            try:
                cur.execute(q.add_column(table, name, type_name))
            except pgerrors.Error as exc:
                if isinstance(exc, psycopg.OperationalError):
                    raise
                raise SchemaMismatch(
                    f"cannot add column {name} {type_name} to the target {table.qualified} "
                    f"(new on the source {table.source_name}): "
                    f"{str(exc).strip().splitlines()[0]}",
                    fix=f"run ALTER TABLE {table.qualified} ADD COLUMN {name} {type_name}; as the "
                        "table's owner, then `cdcsync run`") from exc
            self._added.add((table.oid, name))
            event(logging.WARNING, "column_added", slot=self.slot, table=table.source_name,
                  column=name, type=type_name)

    def _script(self, batches: list[Staged], *, windowed: bool = True,
                first: sql.Composed | None = None, collapse: bool = False) -> Script:
        """A script opening the transaction if none is open, running ``first``, then copying
        ``batches`` into their stages (``collapse``: the last version of each key only, see
        :func:`plan.collapses`); ``windowed``, recording their keys in the open windows of
        their tables."""
        script = Script()
        if self.conn.pgconn.transaction_status == pq.TransactionStatus.IDLE:
            script.add(plan.BEGIN)
        if first is not None:
            script.reached = script.add(first)
        for batch in batches:
            if batch.direct:
                continue
            plan.stage(script, batch, create=batch.stage not in self._stages,
                       truncate=batch.stage in self._dirty,
                       window_name=self._windows.get(batch.table.oid) if windowed else None,
                       collapse=collapse)
            self._stages.add(batch.stage)
            self._dirty.add(batch.stage)
        return script
