"""Collapse the changes of consecutive whole transactions into one final state per key.

Pure. Within a batch only the last state of a row matters to the target: an insert then updates
become one upsert, anything then a delete becomes a delete, a delete then an insert becomes an
upsert. A primary-key change is a delete of the old key plus an upsert of the new one. TOASTed
columns an update did not resend are filled from an earlier version in the same batch when there is
one; otherwise they stay :data:`UNCHANGED` and the merge leaves the target's value alone.

The changes are also kept in source order, for the rare batch whose merged form the target refuses
(a unique value swapped between rows within the batch) and that must then be replayed one by one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cdcsync.apply.tables import TargetTable
from cdcsync.model import UNCHANGED, Row, RowChange


@dataclass(frozen=True, slots=True)
class TxnMeta:
    """What every row change of one source transaction records beside its values."""

    commit_time: bytes
    lsn: bytes


@dataclass(slots=True)
class Upsert:
    row: Row
    meta: TxnMeta


@dataclass(slots=True)
class Delete:
    key: Row
    meta: TxnMeta


@dataclass(slots=True)
class TableBatch:
    table: TargetTable
    upserts: dict[Row, Upsert] = field(default_factory=dict)
    deletes: dict[Row, Delete] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Step:
    """One row change in source order, already projected onto the target columns."""

    table: TargetTable
    row: Row | None
    key: Row
    meta: TxnMeta


class Collector:
    """The changes of one flush: per table the final state of each key, plus source order."""

    def __init__(self) -> None:
        self.tables: dict[int, TableBatch] = {}
        self.steps: list[Step] = []

    def __len__(self) -> int:
        return len(self.steps)

    def add(self, table: TargetTable, change: RowChange, meta: TxnMeta) -> None:
        if change.op == "D":
            assert change.old is not None
            self.remove(table, table.key_of_source(change.old), meta)
            return
        assert change.new is not None
        row = table.project(change.new)
        key = table.key_of(row)
        if change.old is not None:
            old_key = table.key_of_source(change.old)
            if old_key != key:
                self.remove(table, old_key, meta)
        self.put(table, key, row, meta)

    def put(self, table: TargetTable, key: Row, row: Row, meta: TxnMeta) -> None:
        batch = self._batch(table)
        previous = batch.upserts.get(key)
        if previous is not None and UNCHANGED in row:
            row = tuple(
                p if v is UNCHANGED else v for v, p in zip(row, previous.row, strict=True)
            )
        batch.deletes.pop(key, None)
        batch.upserts[key] = Upsert(row, meta)
        self.steps.append(Step(table, row, key, meta))

    def remove(self, table: TargetTable, key: Row, meta: TxnMeta) -> None:
        batch = self._batch(table)
        batch.upserts.pop(key, None)
        batch.deletes[key] = Delete(key, meta)
        self.steps.append(Step(table, None, key, meta))

    def _batch(self, table: TargetTable) -> TableBatch:
        batch = self.tables.get(table.oid)
        if batch is None:
            batch = self.tables[table.oid] = TableBatch(table)
        return batch


def unchanged_mask(row: Row) -> tuple[bool, ...]:
    return tuple(v is UNCHANGED for v in row)


def group_by_mask(upserts: dict[Row, Upsert]) -> dict[tuple[bool, ...], list[Upsert]]:
    """Rows with every column present first (key ``()``); partial rows grouped by what they lack."""
    groups: dict[tuple[bool, ...], list[Upsert]] = {}
    for upsert in upserts.values():
        mask = unchanged_mask(upsert.row) if UNCHANGED in upsert.row else ()
        groups.setdefault(mask, []).append(upsert)
    return groups
