"""One target transaction at a time: stage, merge, record conflicts, checkpoint, commit.

Guarantee: a target transaction holds whole source transactions followed by the checkpoint of the
last one, so the target never shows part of a source transaction and the checkpoint always names
exactly what the target holds. A source transaction larger than the batch limits is merged in
several flushes inside the same target transaction: memory stays bounded, visibility stays atomic.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql
from psycopg.rows import TupleRow

from cdcsync import checkpoint
from cdcsync.apply import sql as q
from cdcsync.apply import tables, window
from cdcsync.config import Settings
from cdcsync.errors import ApplyError, SchemaMismatch
from cdcsync.keyrange import KeyOrder, Span
from cdcsync.logs import event
from cdcsync.model import (
    ChangeChunk,
    CopiedRows,
    Lsn,
    Relation,
    TableRows,
    TargetTable,
    Truncate,
    TxnEnd,
)
from cdcsync.source.tuples import COPY_HEADER, COPY_TRAILER

Conn = psycopg.Connection[TupleRow]
Cur = psycopg.Cursor[TupleRow]

# Errors a merged batch can raise although replaying its changes in source order would succeed:
# a unique value moving between rows within the batch, or foreign keys between tables in a cycle.
_ORDER_SENSITIVE = (pgerrors.UniqueViolation, pgerrors.ForeignKeyViolation,
                    pgerrors.ExclusionViolation)
# SQLSTATE classes that blame one change (a bad value, a constraint, a trigger raising), which
# [apply] on_error = "dead_letter" sets aside. Anything else (a missing privilege or column)
# would reject every change alike and halts under either policy.
_ROW_ERROR_CLASSES = ("22", "23", "P0")


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


@dataclass(slots=True)
class _Pending:
    """Everything staged for one target table since the last flush."""

    table: TargetTable
    relation: Relation
    stage: str
    rows: list[bytes] = field(default_factory=list)
    only_inserts: bool = True
    inserts: int = 0
    unchanged_mask: int = 0


@dataclass(frozen=True, slots=True)
class _Step:
    """One staged change, as the fallback paths address it."""

    seq: int
    is_delete: bool
    lsn: str
    key: str
    batch: _Pending


class Applier:
    """Applies the stream items of whole source transactions to the target through ``conn``."""

    def __init__(self, conn: Conn, settings: Settings) -> None:
        self.conn = conn
        self.settings = settings
        self.slot = settings.source.slot
        self._orders: dict[frozenset[int], tuple[list[int], set[int]]] = {}
        self._stages: set[str] = set()
        self._added: set[tuple[int, str]] = set()
        self._dirty: set[str] = set()
        self._pending: dict[int, _Pending] = {}
        # Target table oid -> the temp table recording the keys the stream changes while a
        # resync chunk of that table is read (between its low and high watermarks).
        self._windows: dict[int, str] = {}
        self._pending_rows = 0
        self._pending_bytes = 0
        self._in_txn = False
        self._last_end: TxnEnd | None = None
        self.opened_at: float | None = None
        self._transactions = 0
        self._rows = 0
        self._busy_s = 0.0
        self._applied: Counter[tuple[str, str]] = Counter()
        self._conflicts: Counter[str] = Counter()
        self._dead_letters: Counter[str] = Counter()

    @property
    def in_source_transaction(self) -> bool:
        return self._in_txn

    @property
    def has_uncommitted(self) -> bool:
        return self._last_end is not None

    def start(self) -> None:
        if self.opened_at is None:
            self.opened_at = time.monotonic()
        self._in_txn = True

    def add(self, chunk: ChangeChunk) -> None:
        if not self._in_txn:
            raise ApplyError("changes arrived outside a source transaction")
        for rows in chunk.tables:
            self._stage_rows(rows)
        self._pending_rows += chunk.rows
        self._rows += chunk.rows
        self._pending_bytes += chunk.size_bytes
        if self.batch_full():
            self._flush()

    def _stage_rows(self, rows: TableRows) -> None:
        table = rows.target
        pending = self._pending.get(table.oid)
        if pending is not None and pending.relation != rows.relation:
            self._flush()  # the column list changed: rows of each version go to its own stage
            pending = None
        if pending is None:
            stage = q.stage_name(table, rows.relation)
            pending = self._pending[table.oid] = _Pending(table, rows.relation, stage)
        pending.rows.extend(rows.rows)
        pending.only_inserts = pending.only_inserts and not (rows.updates or rows.deletes)
        pending.inserts += rows.inserts
        pending.unchanged_mask |= rows.unchanged_mask
        name = table.source_name
        self._applied[(name, "insert")] += rows.inserts
        self._applied[(name, "update")] += rows.updates
        self._applied[(name, "delete")] += rows.deletes

    def end(self, item: TxnEnd) -> None:
        self._in_txn = False
        self._last_end = item
        self._transactions += 1

    def batch_full(self) -> bool:
        limits = self.settings.apply
        return self._pending_rows >= limits.max_rows or self._pending_bytes >= limits.max_bytes

    def open_window(self, table: TargetTable) -> None:
        """A resync chunk's low watermark: from here on, record every key the stream changes."""
        self._flush()
        name = window.window_name(table)
        with self.conn.cursor() as cur:
            cur.execute(window.create_window(name, table))
            cur.execute(window.clear_window(name))
        self._windows[table.oid] = name

    def apply_copied(self, copied: CopiedRows, order: KeyOrder, span: Span, *, windowed: bool,
                     delete_missing: bool) -> int | None:
        """Merge rows copied from the source with the conflict rule; with ``delete_missing``,
        delete target rows of ``span`` the copy lacks. Windowed (a resync chunk at its high
        watermark), keys the stream changed since the low watermark are left to the stream;
        None means that window was lost (a restart, a TRUNCATE): read the chunk again."""
        table = copied.target
        # Changes still pending belong to the window: record their keys before closing it.
        self._flush()
        name: str | None = None
        if windowed:
            name = self._windows.pop(table.oid, None)
            if name is None:
                return None
        started = time.perf_counter()
        batch = _Pending(table, copied.relation, window.chunk_stage_name(table, copied.relation),
                         [copied.data], inserts=copied.rows)
        with self.conn.cursor() as cur:
            self._copy(cur, batch)
            if name is not None:
                cur.execute(window.drop_changed(batch.stage, name, table))
                batch.inserts -= cur.rowcount
            self._merge_batches(cur, [batch])
            deleted = 0
            if delete_missing:
                cur.execute(window.delete_missing(batch.stage, name, table, order, span))
                deleted = cur.rowcount
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
            cur.execute(q.truncate(list(item.tables)))
        for table in item.tables:
            self._applied[(table.source_name, "truncate")] += 1
            event(logging.INFO, "truncated", slot=self.slot, table=table.source_name)

    def commit(self, *, save_checkpoint: bool = True) -> Committed:
        """Merge what is pending, write the checkpoint, commit; say what was applied.

        Without ``save_checkpoint`` (a retry of dead letters) the checkpoint stays as it is."""
        end = self._last_end
        if end is None or self._in_txn:
            raise ApplyError("commit requested in the middle of a source transaction")
        self._flush()
        started = time.perf_counter()
        if save_checkpoint:
            with self.conn.cursor() as cur:
                checkpoint.save(cur, self.slot, end.end_lsn, end.commit_time)
        self.conn.commit()
        done = Committed(end.end_lsn, end.commit_time, self._transactions, self._rows,
                         self._busy_s + time.perf_counter() - started, self._applied,
                         self._conflicts, self._dead_letters)
        self._reset()
        return done

    def advance(self, lsn: Lsn) -> Lsn:
        """Checkpoint a position that holds no change of ours (nothing may be pending)."""
        if self.has_uncommitted or self._in_txn:
            raise ApplyError("idle advance requested with changes pending")
        with self.conn.cursor() as cur:
            checkpoint.save(cur, self.slot, lsn, None)
        self.conn.commit()
        return lsn

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
        self._conflicts = Counter()
        self._dead_letters = Counter()
        self._dirty.clear()
        self._pending_rows = 0
        self._pending_bytes = 0
        self._in_txn = False
        self._last_end = None
        self.opened_at = None

    def _flush(self) -> None:
        if not self._pending:
            return
        started = time.perf_counter()
        try:
            self._flush_pending()
        finally:
            self._busy_s += time.perf_counter() - started

    def _flush_pending(self) -> None:
        pending, self._pending = self._pending, {}
        self._pending_rows = self._pending_bytes = 0
        order, cyclic = self._order(pending.keys())
        batches = [pending[oid] for oid in order]
        with self.conn.cursor() as cur:
            for batch in batches:
                self._add_columns(cur, batch.table)
                self._copy(cur, batch)
                name = self._windows.get(batch.table.oid)
                if name is not None:
                    cur.execute(window.record_keys(name, batch.stage, batch.table))
            if cyclic & pending.keys():
                self._replay(cur, batches)
                return
            self._merge_batches(cur, batches)

    def _merge_batches(self, cur: Cur, batches: list[_Pending]) -> None:
        """Merge staged batches in one go; if the target refuses, split them in source order."""
        cur.execute("SAVEPOINT cdcsync_flush")
        try:
            self._merge(cur, batches)
        except pgerrors.Error as exc:
            if isinstance(exc, psycopg.OperationalError):
                raise
            # The staged rows are back as they were copied. Merged in ever shorter runs of
            # consecutive changes in source order, an order-sensitive batch succeeds, and any
            # other failure is pinned to the exact change (set aside, or named).
            cur.execute("ROLLBACK TO SAVEPOINT cdcsync_flush")
            event(logging.INFO if isinstance(exc, _ORDER_SENSITIVE) else logging.WARNING,
                  "batch_replayed_in_source_order", slot=self.slot,
                  rows=sum(len(b.rows) for b in batches), reason=str(exc).splitlines()[0])
            self._split(cur, batches)
        else:
            cur.execute("RELEASE SAVEPOINT cdcsync_flush")

    def _order(self, oids: Iterable[int]) -> tuple[list[int], set[int]]:
        key = frozenset(oids)
        if key not in self._orders:
            self._orders[key] = tables.foreign_key_order(self.conn, sorted(key))
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

    def _copy(self, cur: Cur, batch: _Pending) -> None:
        if batch.stage not in self._stages:
            cur.execute(q.create_stage(batch.stage, batch.relation))
            self._stages.add(batch.stage)
        if batch.stage in self._dirty:
            cur.execute(q.truncate_stage(batch.stage))
        self._dirty.add(batch.stage)
        with cur.copy(q.copy_into(batch.stage)) as copy:
            copy.write(b"".join((COPY_HEADER, *batch.rows, COPY_TRAILER)))

    def _merge(self, cur: Cur, batches: list[_Pending]) -> None:
        for batch in batches:
            self._collapse(cur, batch)
        # Parents' rows must exist before children reference them, and children must be gone
        # before their parents are deleted.
        for batch in batches:
            self._upsert(cur, batch)
        for batch in reversed(batches):
            self._delete(cur, batch)

    def _collapse(self, cur: Cur, batch: _Pending) -> None:
        self._fill(cur, batch)
        if not batch.only_inserts:
            cur.execute(q.keep_last_versions(batch.stage, batch.table))

    def _fill(self, cur: Cur, batch: _Pending) -> None:
        relation = batch.relation
        for i, column in enumerate(relation.column_names):
            if batch.unchanged_mask >> i & 1 and column in batch.table.columns:
                cur.execute(q.fill_unchanged(batch.stage, batch.table, relation, column))

    def _upsert(self, cur: Cur, batch: _Pending, where: sql.Composable = q.NO_FILTER,
                params: tuple[int, ...] = ()) -> None:
        table = batch.table
        if table.conflict is None:
            cur.execute(q.upsert(batch.stage, table, where), params)
            if batch.unchanged_mask:
                cur.execute(q.partial_update(batch.stage, table, batch.relation, where), params)
            return
        if batch.only_inserts and not params:
            full, partial = batch.inserts, 0  # no duplicate keys and no TOAST marks to count
        else:
            full, partial, _ = self._candidates(cur, batch, where, params)
        applied = 0
        if full:
            cur.execute(q.upsert(batch.stage, table, where), params)
            applied += cur.rowcount
        if partial:
            cur.execute(q.partial_update(batch.stage, table, batch.relation, where), params)
            applied += cur.rowcount
        if applied < full + partial:
            self._record_conflicts(cur, batch, "upsert", where, params)

    def _delete(self, cur: Cur, batch: _Pending, where: sql.Composable = q.NO_FILTER,
                params: tuple[int, ...] = ()) -> None:
        table = batch.table
        if batch.only_inserts:
            return
        cur.execute(q.delete(batch.stage, table, where), params)
        if table.conflict_is_time and cur.rowcount < self._candidates(cur, batch, where,
                                                                      params)[2]:
            self._record_conflicts(cur, batch, "delete", where, params)

    def _candidates(self, cur: Cur, batch: _Pending, where: sql.Composable,
                    params: tuple[int, ...]) -> tuple[int, int, int]:
        row = cur.execute(q.count_candidates(batch.stage, where), params).fetchone()
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2])

    def _record_conflicts(self, cur: Cur, batch: _Pending, operation: str,
                          where: sql.Composable, params: tuple[int, ...]) -> None:
        cur.execute(q.record_conflicts(batch.stage, batch.table, operation, where), params)
        if cur.rowcount > 0:
            name = batch.table.source_name
            self._conflicts[name] += cur.rowcount
            event(logging.INFO, "conflicts_recorded", slot=self.slot, table=name,
                  operation=operation, rows=cur.rowcount)

    def _steps(self, cur: Cur, batches: list[_Pending]) -> list[_Step]:
        """Every staged change, in source order."""
        steps: list[_Step] = []
        for batch in batches:
            # The fallbacks select staged rows by sequence number: an index, made for them only,
            # turns each into a lookup instead of a scan of the whole stage, while COPY on the
            # normal path stays free of index upkeep.
            cur.execute(q.index_stage(batch.stage))
            staged = cur.execute(q.staged_order(batch.stage, batch.table)).fetchall()
            steps.extend(_Step(int(seq), bool(is_delete), str(lsn), str(key), batch)
                         for seq, is_delete, lsn, key in staged)
        steps.sort(key=lambda step: step.seq)
        return steps

    def _replay(self, cur: Cur, batches: list[_Pending]) -> None:
        """Apply every staged row on its own, in source order, with the same statements."""
        for step in self._steps(cur, batches):
            self._replay_one(cur, step)
        for batch in batches:
            cur.execute(q.drop_stage_index(batch.stage))

    def _split(self, cur: Cur, batches: list[_Pending]) -> None:
        """Merge the batch in runs of consecutive changes, halving a run the target refuses
        until the refusal is pinned to single changes: k bad changes among n cost about
        2k log2(n) merges, where applying each change on its own costs n."""
        steps = self._steps(cur, batches)
        for batch in batches:
            self._fill(cur, batch)
        self._merge_run(cur, batches, steps)
        for batch in batches:
            cur.execute(q.drop_stage_index(batch.stage))

    def _merge_run(self, cur: Cur, batches: list[_Pending], steps: list[_Step]) -> None:
        if len(steps) == 1:
            self._replay_one(cur, steps[0])
            return
        where = q.seq_between("s")
        params = (steps[0].seq, steps[-1].seq)
        involved = [b for b in batches if any(step.batch is b for step in steps)]
        cur.execute("SAVEPOINT cdcsync_run")
        try:
            for batch in involved:
                if not batch.only_inserts:
                    cur.execute(q.keep_last_versions(batch.stage, batch.table,
                                                     where + q.seq_between("later")), params * 2)
            for batch in involved:
                self._upsert(cur, batch, where, params)
            for batch in reversed(involved):
                self._delete(cur, batch, where, params)
        except pgerrors.Error as exc:
            if isinstance(exc, psycopg.OperationalError):
                raise
            cur.execute("ROLLBACK TO SAVEPOINT cdcsync_run")
            middle = len(steps) // 2
            self._merge_run(cur, batches, steps[:middle])
            self._merge_run(cur, batches, steps[middle:])
        cur.execute("RELEASE SAVEPOINT cdcsync_run")

    def _replay_one(self, cur: Cur, step: _Step) -> None:
        """Apply one staged change; a rejection is set aside (dead_letter) or halts."""
        batch, seq, lsn, key = step.batch, step.seq, step.lsn, step.key
        # A savepoint per change costs a round trip, paid only on the fallback paths and only
        # when a rejected change is to be set aside rather than halt the pipeline.
        isolate = self.settings.apply.on_error == "dead_letter"
        if isolate:
            cur.execute("SAVEPOINT cdcsync_change")
        try:
            if step.is_delete:
                self._delete(cur, batch, q.only_seq(), (seq,))
            else:
                self._upsert(cur, batch, q.only_seq(), (seq,))
        except pgerrors.Error as exc:
            if isinstance(exc, psycopg.OperationalError):
                raise
            if not (isolate and (exc.sqlstate or "").startswith(_ROW_ERROR_CLASSES)):
                raise self._apply_error(exc, batch.table, key, lsn) from exc
            cur.execute("ROLLBACK TO SAVEPOINT cdcsync_change")
            self._dead_letter(cur, batch, seq, key=key, lsn=lsn, exc=exc)
        else:
            if isolate:
                cur.execute("RELEASE SAVEPOINT cdcsync_change")

    def _dead_letter(self, cur: Cur, batch: _Pending, seq: int, *, key: str, lsn: str,
                     exc: pgerrors.Error) -> None:
        error = str(exc).strip().replace("\n", " ")
        cur.execute(q.record_dead_letter(batch.stage, batch.table, batch.relation, seq, error))
        name = batch.table.source_name
        self._dead_letters[name] += 1
        event(logging.WARNING, "dead_letter", slot=self.slot, table=name, key=key, lsn=lsn,
              error=error)

    def _apply_error(self, exc: pgerrors.Error, table: TargetTable, key: str,
                     lsn: str) -> ApplyError:
        detail = str(exc).strip().replace("\n", " ")
        return ApplyError(
            f"the target rejected a change to {table.source_name} (key {key}) committed at "
            f"source LSN {lsn}: {detail}",
            fix="correct the target table or the row, then run `cdcsync run` again; "
                "it resumes from the last checkpoint",
        )
