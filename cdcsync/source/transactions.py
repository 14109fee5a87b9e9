"""Decoded messages -> stream items: whole transactions, delivered in bounded chunks.

Pure: no I/O. :class:`Assembler` holds what every decoder shares (transaction boundaries, the
checkpoint skip, chunking, relations, truncates, messages); :class:`TransactionAssembler` feeds it
pgoutput, whose row changes take the fast path of :mod:`cdcsync.source.tuples` (no per-row
objects). Transactions whose commit the checkpoint already covers are dropped here, so a restart
from an older position applies nothing twice.
"""

from __future__ import annotations

import datetime as dt
import struct
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Final

from cdcsync.errors import ProtocolError
from cdcsync.model import (
    PG_EPOCH,
    ChangeChunk,
    Lsn,
    Relation,
    SourceMessage,
    StreamItem,
    TableRows,
    TargetTable,
    Truncate,
    TxnEnd,
    TxnStart,
)
from cdcsync.source import pgoutput
from cdcsync.source.tuples import (
    INSERT_TUPLE,
    PendingRow,
    key_of,
    payload_binary_rows,
    payload_text_rows,
    stage_rows,
    text_rows,
)

Resolver = Callable[[Relation], TargetTable | None]
Stager = Callable[[Relation, Sequence[Any]], tuple[bytes, int]]
# Insert messages, unstaged, as COPY rows (text, or binary) of the columns at the given positions.
Texter = Callable[[Relation, Sequence[bytes], Sequence[int]], bytes]

_OID: Final = struct.Struct(">I")
# What most messages complete: shared, where a new empty list per row change is measurable.
_NOTHING: Final[tuple[StreamItem, ...]] = ()
_MICROSECOND: Final = dt.timedelta(microseconds=1)
_I: Final = ord("I")
_U: Final = ord("U")
_D: Final = ord("D")
_M: Final = ord("M")
_K: Final = ord("K")
_O: Final = ord("O")
_N: Final = ord("N")


class Assembler(ABC):
    """Turns Begin, changes..., Commit into TxnStart, ChangeChunk*/Truncate*, TxnEnd.

    ``resolve`` maps a relation onto its target table, or None for a relation that is not
    selected (its changes are dropped); it is called once per new or changed relation.
    Subclasses decode one plugin's messages in :meth:`feed` and report them to the methods below.
    """

    def __init__(self, skip_before: Lsn, resolve: Resolver, *, chunk_rows: int = 5000,
                 chunk_bytes: int = 8 << 20, texts: bool = False, binary: bool = False) -> None:
        self.skip_before = skip_before
        self._resolve = resolve
        # Whether chunks of inserts also carry their text COPY rows (TableRows.text): only where
        # the applier may copy them straight into their tables (see Applier), as converting
        # them is most of the work of that copy.
        self._texts = texts
        # Whether the stream carries values in binary (pgoutput's binary mode); the resolver
        # has then made sure every relation's types allow it (TargetTable.binary_types).
        self._binary = binary
        self._chunk_rows = chunk_rows
        self._chunk_bytes = chunk_bytes
        self._relations: dict[int, tuple[Relation, TargetTable | None]] = {}
        self._pending: dict[int, _Building] = {}
        self._rows = 0
        self._bytes = 0
        self._in_txn = False
        self._skipping = False
        self._seq = 0
        self._txn = (0, 0)
        self._start: TxnStart | None = None
        self.skipped_transactions = 0
        self.last_end_lsn = skip_before

    @property
    def in_transaction(self) -> bool:
        return self._in_txn

    def feed(self, payload: bytes, lsn: Lsn | Callable[[], Lsn] | None = None
             ) -> Sequence[StreamItem]:
        """Consume one message; return the items it completes (often none).

        ``lsn`` is where the message starts in the WAL, or how to find it (decoding it for
        every message is measurable on the hot path): a :class:`ProtocolError` names it."""
        try:
            return self._feed(payload)
        except ProtocolError as exc:
            if lsn is None:
                raise
            where = lsn() if callable(lsn) else lsn
            raise ProtocolError(f"at LSN {where}: {exc.message}",
                                fix="report it with the server version; the checkpoint has not "
                                    "moved past it") from exc

    @abstractmethod
    def _feed(self, payload: bytes) -> Sequence[StreamItem]:
        """Decode one message of the plugin (errors without the LSN: :meth:`feed` adds it)."""

    def _building(self, oid: int, stager: Stager, texter: Texter | None = None, *,
                  keyed: bool = True) -> _Building | None:
        """Where the open chunk collects rows of relation ``oid``; None when not selected."""
        building = self._pending.get(oid)
        if building is None:
            relation, table = self._relations[oid]
            if table is None:
                return None
            building = self._pending[oid] = _Building(relation, table, stager, texter,
                                                      self._binary, keyed=keyed)
        return building

    def _chunk_full(self) -> bool:
        return self._rows >= self._chunk_rows or self._bytes >= self._chunk_bytes

    def _opened(self, items: list[StreamItem]) -> list[StreamItem]:
        """``items``, preceded by the transaction's TxnStart if they are its first.

        A transaction that yields nothing (only unselected tables: wal2json sends Begin and
        Commit for every transaction) is dropped whole, as pgoutput drops empty ones: no empty
        target commits; the idle advance moves the checkpoint past them."""
        if self._start is not None and items:
            items.insert(0, self._start)
            self._start = None
        return items

    def _relation(self, relation: Relation) -> list[StreamItem]:
        known = self._relations.get(relation.oid)
        items: list[StreamItem] = []
        if known is not None and known[0] != relation and relation.oid in self._pending:
            # Rows staged under the old column list must be applied before rows of the new one.
            items.append(self._take_chunk())
        self._relations[relation.oid] = (relation, self._resolve(relation))
        return self._opened(items)

    def _begin(self, message: pgoutput.Begin) -> list[StreamItem]:
        if self._in_txn:
            raise ProtocolError("Begin inside an open transaction")
        self._in_txn = True
        # A commit record before the checkpoint ends before it too: that transaction is applied.
        self._skipping = message.final_lsn < self.skip_before
        if self._skipping:
            self.skipped_transactions += 1
            return []
        self._txn = (message.final_lsn, (message.commit_time - PG_EPOCH) // _MICROSECOND)
        self._start = TxnStart(message.xid, message.final_lsn, message.commit_time)
        return []

    def _commit(self, message: pgoutput.Commit) -> list[StreamItem]:
        if not self._in_txn:
            raise ProtocolError("Commit without Begin")
        self._in_txn = False
        if self._skipping:
            self._skipping = False
            return []
        items = self._opened([self._take_chunk()] if self._pending else [])
        if self._start is not None:
            self._start = None
            return []
        items.append(TxnEnd(message.end_lsn, message.commit_time))
        self.last_end_lsn = message.end_lsn
        return items

    def _truncate(self, message: pgoutput.Truncate) -> list[StreamItem]:
        if not self._in_txn:
            raise ProtocolError("Truncate outside a transaction")
        if self._skipping:
            return []
        try:
            known = [self._relations[oid][1] for oid in message.relation_oids]
        except KeyError:
            raise ProtocolError("Truncate of a relation before its Relation message") from None
        items: list[StreamItem] = [self._take_chunk()] if self._pending else []
        tables = tuple(t for t in known if t is not None)
        if tables:
            items.append(Truncate(tables, message.cascade, message.restart_identity))
        return self._opened(items)

    def _message(self, message: pgoutput.LogicalMessage) -> list[StreamItem]:
        if message.transactional and self._skipping:
            return []
        items: list[StreamItem] = [self._take_chunk()] if self._pending else []
        items.append(
            SourceMessage(message.lsn, message.transactional, message.prefix, message.content))
        return self._opened(items)

    def _take_chunk(self) -> ChangeChunk:
        tables = tuple(b.staged(self._texts) for b in self._pending.values())
        size = self._bytes
        for rows in tables:
            if rows.text is not None:
                size += len(rows.text)
        chunk = ChangeChunk(tables, self._rows, size)
        self._pending = {}
        self._rows = 0
        self._bytes = 0
        return chunk


class TransactionAssembler(Assembler):
    """The :class:`Assembler` for pgoutput messages."""

    def __init__(self, skip_before: Lsn, resolve: Resolver, *, chunk_rows: int = 5000,
                 chunk_bytes: int = 8 << 20, texts: bool = False, binary: bool = False) -> None:
        super().__init__(skip_before, resolve, chunk_rows=chunk_rows, chunk_bytes=chunk_bytes,
                         texts=texts, binary=binary)
        # Chosen once: every row change passes it on.
        self._texter: Texter = payload_binary_rows if binary else payload_text_rows

    def _feed(self, payload: bytes) -> Sequence[StreamItem]:
        kind = payload[0] if payload else -1
        if kind in (_I, _U, _D):
            if not self._in_txn:
                raise ProtocolError(f"{chr(kind)} message outside a transaction")
            if self._skipping:
                return _NOTHING
            try:
                self._row_change(kind, payload)
            except (IndexError, struct.error, KeyError, ValueError) as exc:
                raise ProtocolError(f"malformed {chr(kind)} message: {exc!r}") from None
            if self._chunk_full():
                return self._opened([self._take_chunk()])
            return _NOTHING
        message = pgoutput.decode(payload)
        if isinstance(message, Relation):
            return self._relation(message)
        if isinstance(message, pgoutput.Begin):
            return self._begin(message)
        if isinstance(message, pgoutput.Commit):
            return self._commit(message)
        if isinstance(message, pgoutput.Truncate):
            return self._truncate(message)
        if isinstance(message, pgoutput.LogicalMessage):
            return self._message(message)
        return []  # Origin and Type carry nothing cdcsync needs

    def _row_change(self, kind: int, payload: bytes) -> None:
        # Byte shifts compile to native operations (see setup.py); a struct call would not.
        oid = payload[1] << 24 | payload[2] << 16 | payload[3] << 8 | payload[4]
        building = self._building(oid, stage_rows, self._texter, keyed=False)
        if building is None:
            return
        seq = self._seq = self._seq + 1
        lsn, commit_time = self._txn
        key = building.table.source_key
        rows, keys = building.rows, building.keys
        if kind != _I and not building.keyed:
            building.key_inserts()
        if kind == _I:
            if building.keyed:
                rows.append((payload, INSERT_TUPLE, _I, seq, lsn, commit_time))
                keys.add(key_of(payload, INSERT_TUPLE, key))
            else:
                building.payloads.append(payload)
                building.seqs.append(seq)
                building.txn = self._txn
            building.inserts += 1
        elif kind == _D:
            rows.append((payload, 6, _D, seq, lsn, commit_time))
            keys.add(key_of(payload, 6, key))
            building.deletes += 1
        else:
            marker = payload[5]
            off = 6
            if marker in (_K, _O):
                off = _skip_tuple(payload, 6) + 1
                old = key_of(payload, 6, key)
                if marker == _K or old != key_of(payload, off, key):
                    # The key changed: the old key goes, as a move (a delete) right before the
                    # new row, which may take unchanged TOASTed values from it.
                    rows.append((payload, 6, _M, seq, lsn, commit_time))
                    keys.add(old)
                    building.deletes += 1
                    seq = self._seq = seq + 1
                    self._rows += 1
            elif marker != _N:
                raise ProtocolError(f"unexpected tuple marker {chr(marker)!r} in an Update")
            rows.append((payload, off, _U, seq, lsn, commit_time))
            keys.add(key_of(payload, off, key))
            building.updates += 1
        self._rows += 1
        self._bytes += len(payload)


class _Building:
    """Row changes of one relation in the chunk being built, not yet converted.

    A plain class, not a dataclass: mypyc compiles this ``__init__``, where a dataclass's
    generated one runs as Python (with a list and a set made by factories), once per table of
    every source transaction."""

    def __init__(self, relation: Relation, table: TargetTable, stager: Stager,
                 texter: Texter | None, binary: bool = False, *, keyed: bool = True) -> None:
        self.relation = relation
        self.table = table
        self.stager = stager
        # Makes the text of rows of inserts without staging them, where the decoder has one.
        self.texter = texter
        # Whether the values are binary (the texter then makes binary COPY rows).
        self.binary = binary
        self.rows: list[Any] = []
        self.inserts = 0
        self.updates = 0
        self.deletes = 0
        # The keys the rows change (see TableRows.keys); wal2json's assembler leaves it empty.
        self.keys: set[bytes] = set()
        # False while the chunk holds pgoutput's inserts alone: they are kept as their messages
        # and sequence numbers (a row tuple each, kept until the batch is applied, cost the
        # garbage collector a young-generation pass per 700 rows: 16% of the reader's CPU on
        # inserts), and their keys are not made, as inserts alone have nothing to collapse. Once
        # a change of another kind comes (key_inserts), or where the applier needs them
        # (TableRows.keyer and unstaged), they become rows with keys like the others.
        self.keyed = keyed
        self.payloads: list[bytes] = []
        self.seqs: list[int] = []
        # The transaction's commit LSN and time (see PendingRow), for the rows of the inserts.
        self.txn: tuple[int, int] = (0, 0)

    def key_inserts(self) -> None:
        """Turn the inserts so far into rows with their keys; from now on every row comes so."""
        self.rows.extend(_insert_rows(self.payloads, self.seqs, self.txn))
        self.keys |= _insert_keys(self.payloads, self.table.source_key)
        self.payloads, self.seqs, self.keyed = [], [], True

    def staged(self, texts: bool) -> TableRows:
        relation, table = self.relation, self.table
        binary = self.binary
        straight = texts and self.inserts and not (self.updates or self.deletes
                                                   or table.row_security)
        if straight and self.texter is not None:
            # Most such rows are copied straight into their table: staging them as well would
            # double the reader's work; the applier stages the others (TableRows), and makes
            # their keys only where it needs them.
            payloads, seqs = self.payloads, self.seqs
            text = self.texter(relation, payloads, table.positions)
            return TableRows(relation, table, [], self.inserts, text=text, binary=binary,
                             unstaged=partial(_stage_inserts, self.stager, relation, payloads,
                                              seqs, self.txn),
                             keyer=partial(_insert_keys, payloads, table.source_key))
        if self.keyed:
            rows, keys = self.rows, self.keys
            blob, unchanged = self.stager(relation, rows)
        else:
            blob, unchanged = self.stager(relation, _insert_rows(self.payloads, self.seqs,
                                                                 self.txn))
            # Of rows the stager has found whole.
            keys = _insert_keys(self.payloads, table.source_key)
        if straight and not binary:
            return TableRows(relation, table, [blob], self.inserts, keys=keys or None,
                             text=text_rows((blob,), len(relation.columns), table.positions))
        return TableRows(relation, table, [blob], self.inserts, self.updates, self.deletes,
                         unchanged, keys or None, binary=binary)


def _insert_rows(payloads: list[bytes], seqs: list[int], txn: tuple[int, int]
                 ) -> list[PendingRow]:
    """The row changes of Insert messages (see TransactionAssembler._row_change)."""
    lsn, commit_time = txn
    return [(payload, INSERT_TUPLE, _I, seq, lsn, commit_time)
            for payload, seq in zip(payloads, seqs, strict=True)]


def _insert_keys(payloads: list[bytes], key: tuple[int, ...]) -> set[bytes]:
    """The keys of Insert messages."""
    return {key_of(payload, INSERT_TUPLE, key) for payload in payloads}


def _stage_inserts(stager: Stager, relation: Relation, payloads: list[bytes], seqs: list[int],
                   txn: tuple[int, int]) -> tuple[bytes, int]:
    """Stage Insert messages kept as such (see _Building.keyed)."""
    return stager(relation, _insert_rows(payloads, seqs, txn))


def _skip_tuple(buf: bytes, off: int) -> int:
    """The offset just past the tuple starting at ``buf[off]``."""
    (count,) = struct.unpack_from(">h", buf, off)
    off += 2
    for _ in range(count):
        if buf[off] in (ord("t"), ord("b")):
            off += 5 + _OID.unpack_from(buf, off + 1)[0]
        else:
            off += 1
    return off
