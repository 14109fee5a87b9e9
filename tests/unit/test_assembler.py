"""TransactionAssembler: whole transactions in bounded chunks, skipping what is checkpointed."""

from __future__ import annotations

import datetime as dt

import pytest

from cdcsync.errors import ProtocolError
from cdcsync.model import (
    ChangeChunk,
    Column,
    Lsn,
    Relation,
    RowChange,
    SourceMessage,
    TxnEnd,
    TxnStart,
)
from cdcsync.source import pgoutput
from cdcsync.source.transactions import TransactionAssembler

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
REL = Relation(16384, "public", "t", "d", (Column("id", 23, -1, True), Column("v", 25, -1, False)))


def _txn(final: int, rows: int) -> list[pgoutput.Message]:
    inserts: list[pgoutput.Message] = [
        pgoutput.Insert(REL.oid, (str(i).encode(), b"x")) for i in range(rows)
    ]
    return [pgoutput.Begin(Lsn(final), T0, 700), *inserts,
            pgoutput.Commit(0, Lsn(final), Lsn(final + 8), T0)]


def _feed(assembler: TransactionAssembler, messages: list[pgoutput.Message]) -> list[object]:
    out: list[object] = []
    for message in [REL, *messages]:
        out.extend(assembler.feed(message, 10))
    return out


def test_whole_transaction_in_order() -> None:
    """Begin, changes, Commit become TxnStart, one chunk with every change, TxnEnd at end LSN."""
    items = _feed(TransactionAssembler(Lsn(0)), _txn(100, 3))
    assert isinstance(items[0], TxnStart) and items[0].final_lsn == 100
    assert isinstance(items[1], ChangeChunk) and len(items[1].changes) == 3
    change = items[1].changes[0]
    assert isinstance(change, RowChange) and change.op == "I" and change.relation == REL
    assert items[2] == TxnEnd(Lsn(108), T0)


def test_large_transaction_is_chunked() -> None:
    """A transaction wider than the chunk limit arrives as several bounded chunks."""
    items = _feed(TransactionAssembler(Lsn(0), chunk_rows=4), _txn(100, 10))
    sizes = [len(i.changes) for i in items if isinstance(i, ChangeChunk)]
    assert sizes == [4, 4, 2]


def test_transactions_before_checkpoint_are_skipped() -> None:
    """A re-delivered transaction whose commit precedes the checkpoint yields nothing."""
    assembler = TransactionAssembler(Lsn(208))
    assert _feed(assembler, _txn(100, 2) + _txn(200, 2)) == []
    assert assembler.skipped_transactions == 2
    items = _feed(assembler, _txn(208, 1))
    assert [type(i) for i in items] == [TxnStart, ChangeChunk, TxnEnd]


def test_non_transactional_message_passes_through() -> None:
    """A logical message outside a transaction becomes a SourceMessage."""
    message = pgoutput.LogicalMessage(False, Lsn(5), "cdcsync", b"hb")
    assert TransactionAssembler(Lsn(0)).feed(message, 10) == [
        SourceMessage(Lsn(5), False, "cdcsync", b"hb")]


def test_change_before_relation_is_a_protocol_error() -> None:
    """A change naming an unknown relation is refused, not guessed."""
    assembler = TransactionAssembler(Lsn(0))
    assembler.feed(pgoutput.Begin(Lsn(1), T0, 1), 1)
    with pytest.raises(ProtocolError, match="before its Relation"):
        assembler.feed(pgoutput.Insert(999, (b"1",)), 1)
