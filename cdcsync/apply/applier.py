"""One target transaction at a time: stage, merge, record conflicts, checkpoint, commit.

Guarantee: a target transaction holds whole source transactions followed by the checkpoint of the
last one, so the target never shows part of a source transaction and the checkpoint always names
exactly what the target holds. A source transaction larger than the batch limits is merged in
several chunks inside the same target transaction: memory stays bounded, visibility stays atomic.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql
from psycopg.rows import TupleRow

from cdcsync import checkpoint
from cdcsync.apply import sql as q
from cdcsync.apply import tables
from cdcsync.apply.batching import Collector, TableBatch, TxnMeta, group_by_mask
from cdcsync.apply.tables import TargetTable
from cdcsync.config import Settings
from cdcsync.errors import ApplyError
from cdcsync.logs import event
from cdcsync.model import ChangeChunk, Lsn, Relation, TruncateChange, TxnEnd, TxnStart

Conn = psycopg.Connection[TupleRow]
Cur = psycopg.Cursor[TupleRow]

# Errors a merged batch can raise although replaying its changes in source order would succeed:
# a unique value moving between rows within the batch, or foreign keys between tables in a cycle.
_ORDER_SENSITIVE = (pgerrors.UniqueViolation, pgerrors.ForeignKeyViolation,
                    pgerrors.ExclusionViolation)


class Applier:
    """Applies the stream items of whole source transactions to the target through ``conn``."""

    def __init__(self, conn: Conn, settings: Settings) -> None:
        self.conn = conn
        self.settings = settings
        self.slot = settings.source.slot
        self._tables: dict[Relation, TargetTable | None] = {}
        self._orders: dict[frozenset[int], tuple[list[int], set[int]]] = {}
        self._stages: set[str] = set()
        self._dirty: set[str] = set()
        self._collector = Collector()
        self._pending_bytes = 0
        self._meta: TxnMeta | None = None
        self._last_end: TxnEnd | None = None
        self.opened_at: float | None = None
        self.transactions_in_batch = 0
        self.applied: Counter[tuple[str, str]] = Counter()
        self.conflicts: Counter[str] = Counter()

    @property
    def in_source_transaction(self) -> bool:
        return self._meta is not None

    @property
    def has_uncommitted(self) -> bool:
        return self._last_end is not None

    @property
    def pending_rows(self) -> int:
        return len(self._collector)

    def start(self, item: TxnStart) -> None:
        if self.opened_at is None:
            self.opened_at = time.monotonic()
        self._meta = TxnMeta(item.commit_time.isoformat().encode(), str(item.final_lsn).encode())

    def add(self, chunk: ChangeChunk) -> None:
        meta = self._meta
        if meta is None:
            raise ApplyError("changes arrived outside a source transaction")
        for change in chunk.changes:
            if isinstance(change, TruncateChange):
                self._truncate(change)
                continue
            table = self._table(change.relation)
            if table is not None:
                self._collector.add(table, change, meta)
        self._pending_bytes += chunk.size_bytes
        limits = self.settings.apply
        if len(self._collector) >= limits.max_rows or self._pending_bytes >= limits.max_bytes:
            self._flush()

    def end(self, item: TxnEnd) -> None:
        self._meta = None
        self._last_end = item
        self.transactions_in_batch += 1

    def batch_full(self) -> bool:
        limits = self.settings.apply
        return len(self._collector) >= limits.max_rows or self._pending_bytes >= limits.max_bytes

    def commit(self) -> Lsn:
        """Merge what is pending, write the checkpoint, commit; return the checkpointed LSN."""
        end = self._last_end
        if end is None or self._meta is not None:
            raise ApplyError("commit requested in the middle of a source transaction")
        self._flush()
        with self.conn.cursor() as cur:
            checkpoint.save(cur, self.slot, end.end_lsn, end.commit_time)
        self.conn.commit()
        self._reset()
        return end.end_lsn

    def advance(self, lsn: Lsn) -> Lsn:
        """Checkpoint a position that holds no change of ours (nothing may be pending)."""
        if self.has_uncommitted or self._meta is not None:
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
        self._collector = Collector()
        self._stages.clear()
        self._reset()

    def _reset(self) -> None:
        self._dirty.clear()
        self._pending_bytes = 0
        self._meta = None
        self._last_end = None
        self.opened_at = None
        self.transactions_in_batch = 0

    def _table(self, relation: Relation) -> TargetTable | None:
        if relation in self._tables:
            return self._tables[relation]
        table: TargetTable | None = None
        if tables.selected(self.settings.tables, relation.qualified):
            table = tables.resolve(self.conn, self.settings, relation)
        else:
            event(logging.WARNING, "table_not_selected", slot=self.slot, table=relation.qualified,
                  hint="it is in the publication but not in `tables`; its changes are ignored")
        self._tables[relation] = table
        return table

    def _truncate(self, change: TruncateChange) -> None:
        self._flush()
        targets = [t for t in (self._table(r) for r in change.relations) if t is not None]
        if not targets or self.settings.apply.truncate == "ignore":
            return
        with self.conn.cursor() as cur:
            cur.execute(q.truncate(targets))
        for table in targets:
            self.applied[(table.source_name, "truncate")] += 1
            event(logging.INFO, "truncated", slot=self.slot, table=table.source_name)

    def _flush(self) -> None:
        collector = self._collector
        if not len(collector):
            return
        self._collector = Collector()
        self._pending_bytes = 0
        with self.conn.cursor() as cur:
            order, cyclic = self._order(collector.tables.keys())
            if cyclic & collector.tables.keys():
                self._replay(cur, collector)
                return
            cur.execute("SAVEPOINT cdcsync_flush")
            try:
                self._merge(cur, [collector.tables[oid] for oid in order])
            except _ORDER_SENSITIVE as exc:
                cur.execute("ROLLBACK TO SAVEPOINT cdcsync_flush")
                # The rollback also undid any staging table created since the savepoint.
                self._dirty.update(self._stages)
                self._stages.clear()
                event(logging.INFO, "batch_replayed_in_source_order", slot=self.slot,
                      rows=len(collector), reason=str(exc).splitlines()[0])
                self._replay(cur, collector)
            except pgerrors.Error as exc:
                if isinstance(exc, psycopg.OperationalError):
                    raise
                raise self._apply_error(exc, collector) from exc
            else:
                cur.execute("RELEASE SAVEPOINT cdcsync_flush")

    def _order(self, oids: Iterable[int]) -> tuple[list[int], set[int]]:
        key = frozenset(oids)
        if key not in self._orders:
            self._orders[key] = tables.foreign_key_order(self.conn, sorted(key))
        return self._orders[key]

    def _merge(self, cur: Cur, batches: Sequence[TableBatch]) -> None:
        # Parents' rows must exist before children reference them, and children must be gone
        # before their parents are deleted.
        for batch in batches:
            if batch.upserts:
                self._upserts(cur, batch)
        for batch in reversed(batches):
            if batch.deletes:
                self._deletes(cur, batch)

    def _upserts(self, cur: Cur, batch: TableBatch) -> None:
        table = batch.table
        stage = self._stage(cur, q.stage_name(table, "u"), q.create_upsert_stage(table))
        for mask, group in group_by_mask(batch.upserts).items():
            self._fill(cur, stage, ((*u.row, u.meta.lsn) for u in group), len(table.columns) + 1)
            if mask:
                cur.execute(q.partial_update(table, [i for i, m in enumerate(mask) if not m]))
            else:
                cur.execute(q.upsert(table))
            self._count_conflicts(cur, table, "upsert", len(group))
        self.applied[(table.source_name, "upsert")] += len(batch.upserts)

    def _deletes(self, cur: Cur, batch: TableBatch) -> None:
        table = batch.table
        stage = self._stage(cur, q.stage_name(table, "d"), q.create_delete_stage(table))
        rows = ((*d.key, d.meta.commit_time, d.meta.lsn) for d in batch.deletes.values())
        self._fill(cur, stage, rows, len(table.key) + 2)
        cur.execute(q.delete(table))
        if table.conflict_is_time:
            self._count_conflicts(cur, table, "delete", len(batch.deletes))
        self.applied[(table.source_name, "delete")] += len(batch.deletes)

    def _count_conflicts(self, cur: Cur, table: TargetTable, operation: str, staged: int) -> None:
        if table.conflict is None or cur.rowcount >= staged:
            return
        cur.execute(q.record_conflicts(table, operation))
        if cur.rowcount > 0:
            self.conflicts[table.source_name] += cur.rowcount
            event(logging.INFO, "conflicts_recorded", slot=self.slot, table=table.source_name,
                  operation=operation, rows=cur.rowcount)

    def _stage(self, cur: Cur, name: str, create: sql.Composed) -> str:
        if name not in self._stages:
            cur.execute(create)
            self._stages.add(name)
        return name

    def _fill(self, cur: Cur, stage: str, rows: Iterable[Sequence[object]], width: int) -> None:
        if stage in self._dirty:
            cur.execute(q.truncate_stage(stage))
        self._dirty.add(stage)
        with cur.copy(q.copy_into(stage)) as copy:
            copy.write(q.encode_copy(rows, width))

    def _replay(self, cur: Cur, collector: Collector) -> None:
        """Apply each change on its own, in source order, with the same merge statements."""
        for step in collector.steps:
            single = Collector()
            if step.row is None:
                single.remove(step.table, step.key, step.meta)
            else:
                single.put(step.table, step.key, step.row, step.meta)
            try:
                self._merge(cur, list(single.tables.values()))
            except pgerrors.Error as exc:
                if isinstance(exc, psycopg.OperationalError):
                    raise
                raise self._apply_error(exc, single) from exc

    def _apply_error(self, exc: pgerrors.Error, collector: Collector) -> ApplyError:
        first = collector.steps[0] if collector.steps else None
        where = ""
        if first is not None:
            key = ", ".join(v.decode() if isinstance(v, bytes) else "NULL" for v in first.key)
            where = (f" on {first.table.source_name} (key {key}, source LSN "
                     f"{first.meta.lsn.decode()}{' and later' if len(collector) > 1 else ''})")
        detail = str(exc).strip().replace("\n", " ")
        return ApplyError(
            f"the target rejected a change{where}: {detail}",
            fix="correct the target table or the row, then run `cdcsync run` again; "
                "it resumes from the last checkpoint",
        )
