"""wal2json messages -> the same stream items as pgoutput. Pure: no I/O.

pgoutput describes a relation once (a Relation message); wal2json names the table and lists the
columns on every change, and an update leaves out the TOASTed columns it did not change. So the
relation of a table is kept here: seeded from ``describe`` (the source catalog) the first time a
run meets the table, replaced by an insert's column list when that differs (the table changed),
and extended by any column an update or delete names that it lacks. A column an update leaves out
is unchanged, exactly like pgoutput's 'u'; one a delete leaves out is NULL, like pgoutput's key
tuple. Every new version of a relation goes through the shared :class:`Assembler`, which resolves
it and keeps rows of each version apart.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from cdcsync.errors import ProtocolError
from cdcsync.model import UNCHANGED, ZERO_LSN, Column, Lsn, Relation, StreamItem, Value
from cdcsync.source import pgoutput, wal2json
from cdcsync.source.transactions import Assembler, Resolver
from cdcsync.source.tuples import stage_values

Describer = Callable[[str, str], Relation | None]
"""The source catalog's current description of ``schema, table``, or None if it is gone."""

_I: Final = ord("I")
_U: Final = ord("U")
_D: Final = ord("D")
_M: Final = ord("M")
# wal2json gives no OIDs; tables the catalog no longer knows are numbered above every OID.
_FIRST_LOCAL_ID = 1 << 32


@dataclass(frozen=True, slots=True)
class _Table:
    relation: Relation
    shape: wal2json.Shape
    index: dict[str, int]
    # Shapes met so far that the relation covers, with their columns' positions in it.
    covered: dict[wal2json.Shape, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, relation: Relation) -> _Table:
        shape = tuple((c.name, c.type_oid) for c in relation.columns)
        return cls(relation, shape, {name: i for i, (name, _) in enumerate(shape)})

    def positions(self, shape: wal2json.Shape) -> tuple[int, ...] | None:
        """Where the columns of ``shape`` sit in the relation; None if it lacks one of them."""
        found = self.covered.get(shape)
        if found is None:
            index, mine = self.index, self.shape
            if not all(name in index and mine[index[name]][1] == oid for name, oid in shape):
                return None
            found = self.covered[shape] = tuple(index[name] for name, _ in shape)
        return found

    def place(self, shape: wal2json.Shape, values: tuple[bytes | None, ...],
              absent: Value) -> tuple[Value, ...]:
        """The values in relation order, ``absent`` where ``shape`` has no column."""
        if shape == self.shape:
            return values
        positions = self.positions(shape)
        assert positions is not None  # the relation was extended to cover it
        row: list[Value] = [absent] * len(self.shape)
        for position, value in zip(positions, values, strict=True):
            row[position] = value
        return tuple(row)


class Wal2jsonAssembler(Assembler):
    """The :class:`Assembler` for wal2json ``format-version 2`` messages."""

    def __init__(self, skip_before: Lsn, resolve: Resolver, describe: Describer, *,
                 chunk_rows: int = 5000, chunk_bytes: int = 8 << 20, texts: bool = False) -> None:
        super().__init__(skip_before, resolve, chunk_rows=chunk_rows, chunk_bytes=chunk_bytes,
                         texts=texts)
        self._describe = describe
        self._tables: dict[tuple[str, str], _Table] = {}
        self._next_id = _FIRST_LOCAL_ID
        self._truncating: list[int] = []
        self._truncate_lsn = ZERO_LSN

    def _feed(self, payload: bytes) -> Sequence[StreamItem]:
        message = wal2json.decode(payload)
        if isinstance(message, wal2json.TableTruncate):
            return self._table_truncate(message)
        items = self._end_truncate()
        if isinstance(message, wal2json.RowChange):
            if not self._in_txn:
                raise ProtocolError(f"{chr(message.kind)} message outside a transaction")
            if not self._skipping:
                items.extend(self._row_change(message, len(payload)))
                if self._chunk_full():
                    items.extend(self._opened([self._take_chunk()]))
        elif isinstance(message, pgoutput.Begin):
            items.extend(self._begin(message))
        elif isinstance(message, pgoutput.Commit):
            items.extend(self._commit(message))
        else:
            items.extend(self._message(message))
        return items

    def _row_change(self, change: wal2json.RowChange, size: int) -> list[StreamItem]:
        shape = change.shape if change.kind != _D else change.identity_shape
        table, items = self._table(change, shape, complete=change.kind == _I)
        building = self._building(table.relation.oid, stage_values)
        if building is None:
            return items
        seq = self._seq = self._seq + 1
        lsn, commit_time = self._txn
        if change.kind == _I:
            building.rows.append((table.place(shape, change.values, None), _I, seq, lsn,
                                  commit_time))
            building.inserts += 1
        elif change.kind == _D:
            building.rows.append((table.place(shape, change.identity, None), _D, seq, lsn,
                                  commit_time))
            building.deletes += 1
        else:
            new = table.place(shape, change.values, UNCHANGED)
            if change.identity_shape and _moved(table, change, new, building.table.source_key):
                # The key changed: the old key goes, as a move (a delete) right before the new
                # row, which may take unchanged TOASTed values from it.
                old = table.place(change.identity_shape, change.identity, None)
                building.rows.append((old, _M, seq, lsn, commit_time))
                building.deletes += 1
                seq = self._seq = seq + 1
                self._rows += 1
            building.rows.append((new, _U, seq, lsn, commit_time))
            building.updates += 1
        self._rows += 1
        self._bytes += size
        return items

    def _table(self, change: wal2json.RowChange, shape: wal2json.Shape, *,
               complete: bool) -> tuple[_Table, list[StreamItem]]:
        """The table's relation, updated to cover ``shape`` (``complete``: all its columns)."""
        name = (change.schema, change.table)
        identity = change.identity_shape
        if identity:
            wal2json.check_shape(identity)
        known = self._tables.get(name)
        items: list[StreamItem] = []
        if known is None:
            wal2json.check_shape(shape)
            known, items = self._learn(name, shape)
        if shape == known.shape and (not identity or known.positions(identity) is not None):
            return known, items
        wal2json.check_shape(shape)
        if not complete and known.positions(shape) is not None and (
                not identity or known.positions(identity) is not None):
            return known, items
        types = dict(shape)
        for n, oid in identity:
            if types.get(n, oid) != oid:
                raise ProtocolError(f"column {n!r} of {change.schema}.{change.table} has type OID "
                                    f"{types[n]} in the new row and {oid} in the old key")
        relation = known.relation
        key = wal2json.key_names(change)
        if complete:
            columns = tuple(Column(n, oid, -1, n in key) for n, oid in shape)
        else:
            merged = {c.name: c for c in relation.columns}
            for n, oid in (*shape, *change.identity_shape):
                if n not in merged or merged[n].type_oid != oid:
                    merged[n] = Column(n, oid, -1, n in key)
            columns = tuple(merged.values())
        updated = Relation(relation.oid, relation.schema, relation.name,
                           relation.replica_identity, columns)
        return self._register(name, updated, items)

    def _learn(self, name: tuple[str, str],
               shape: wal2json.Shape) -> tuple[_Table, list[StreamItem]]:
        """A table met for the first time: as the catalog has it, else as the message has it."""
        relation = self._describe(*name)
        if relation is None:
            columns = tuple(Column(n, oid, -1, False) for n, oid in shape)
            relation = Relation(self._next_id, name[0], name[1], "d", columns)
            self._next_id += 1
        return self._register(name, relation, [])

    def _register(self, name: tuple[str, str], relation: Relation,
                  items: list[StreamItem]) -> tuple[_Table, list[StreamItem]]:
        table = self._tables[name] = _Table.of(relation)
        items.extend(self._relation(relation))
        return table, items

    def _table_truncate(self, message: wal2json.TableTruncate) -> list[StreamItem]:
        if not self._in_txn:
            raise ProtocolError("Truncate outside a transaction")
        # One statement's tables arrive one by one at the same LSN and truncate together, so
        # that foreign keys between them do not refuse it on the target.
        items = self._end_truncate() if message.lsn != self._truncate_lsn else []
        name = (message.schema, message.table)
        known = self._tables.get(name)
        if known is None:
            known, learned = self._learn(name, ())
            items.extend(learned)
        self._truncating.append(known.relation.oid)
        self._truncate_lsn = message.lsn
        return items

    def _end_truncate(self) -> list[StreamItem]:
        """The Truncate of the statement whose tables came so far, if any."""
        if not self._truncating:
            return []
        oids, self._truncating = tuple(self._truncating), []
        return self._truncate(pgoutput.Truncate(oids, cascade=False, restart_identity=False))


def _moved(table: _Table, change: wal2json.RowChange, new: tuple[Value, ...],
           key: tuple[int, ...]) -> bool:
    """Whether the update's old identity names another key than its new row."""
    positions = table.positions(change.identity_shape)
    assert positions is not None
    for position, old in zip(positions, change.identity, strict=True):
        if position in key and new[position] != old:
            return True
    return False
