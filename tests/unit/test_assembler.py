"""TransactionAssembler on captured pgoutput bytes: staged COPY rows equal the decoded values."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdcsync.errors import ProtocolError
from cdcsync.model import (
    UNCHANGED,
    ChangeChunk,
    Lsn,
    Relation,
    TableRows,
    TargetTable,
    Truncate,
    TxnEnd,
    TxnStart,
    Value,
)
from cdcsync.source import pgoutput
from cdcsync.source.transactions import TransactionAssembler
from cdcsync.source.tuples import META_COLUMNS, key_of, text_rows

RAW = [bytes.fromhex(m["hex"]) for m in json.loads(
    (Path(__file__).parent / "data" / "pgoutput_capture.json").read_text())]

# A transaction of the capture's first two inserts and a later update of their table.
MIXED = [*RAW[:5], RAW[7], RAW[5]]


def target_for(relation: Relation) -> TargetTable:
    key = tuple(i for i, c in enumerate(relation.columns) if c.is_key)[:1] or (0,)
    return TargetTable(relation.qualified, relation.oid, relation.schema, relation.name,
                       relation.column_names, ("text",) * len(relation.columns),
                       tuple(range(len(relation.columns))), key, key, None, False)


def parse_copy_rows(blob: bytes) -> list[tuple[bytes | None, ...]]:
    """Staged binary COPY rows back into their fields (None for NULL)."""
    rows, off = [], 0
    while off < len(blob):
        (count,) = struct.unpack_from(">h", blob, off)
        off += 2
        fields: list[bytes | None] = []
        for _ in range(count):
            (size,) = struct.unpack_from(">i", blob, off)
            off += 4
            fields.append(None if size < 0 else blob[off:off + size])
            off += max(size, 0)
        rows.append(tuple(fields))
    return rows


def staged(items: list[object]) -> list[tuple[TableRows, tuple[bytes | None, ...]]]:
    return [(t, row) for i in items if isinstance(i, ChangeChunk)
            for t in i.tables for blob in t.rows for row in parse_copy_rows(blob)]


def feed_all(assembler: TransactionAssembler, payloads: list[bytes]) -> list[object]:
    out: list[object] = []
    for payload in payloads:
        out.extend(assembler.feed(payload))
    return out


def expected(values: tuple[Value, ...]) -> tuple[bytes | None, ...]:
    return tuple(None if v is UNCHANGED else v for v in values)


def test_staged_rows_carry_exactly_the_decoded_values() -> None:
    """Every staged row holds the values the full decoder reads from the same message."""
    rows = staged(feed_all(TransactionAssembler(Lsn(0), target_for), RAW))
    decoded = [pgoutput.decode(b) for b in RAW]
    changes = [m for m in decoded if isinstance(m, pgoutput.Insert | pgoutput.Update
                                                  | pgoutput.Delete)]
    flat: list[tuple[bytes, tuple[Value, ...]]] = []
    for m in changes:
        if isinstance(m, pgoutput.Insert):
            flat.append((b"I", m.new))
        elif isinstance(m, pgoutput.Delete):
            flat.append((b"D", m.old))
        else:
            if m.old_kind == "K":
                assert m.old is not None
                flat.append((b"M", m.old))
            flat.append((b"U", m.new))
    meta = len(META_COLUMNS)
    assert [(f[1], f[meta:]) for _, f in rows] == [(op, expected(v)) for op, v in flat]
    seqs = [int.from_bytes(f[0] or b"", "big") for _, f in rows]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    begins = [m.final_lsn for m in decoded if isinstance(m, pgoutput.Begin)]
    assert {int.from_bytes(f[2] or b"", "big") for _, f in rows} <= set(begins)


def test_untouched_toast_column_is_marked_unchanged() -> None:
    """The update that did not touch the TOASTed column stages a mask naming that column."""
    rows = staged(feed_all(TransactionAssembler(Lsn(0), target_for), RAW))
    masks = [(t.relation.name, f[4]) for t, f in rows if b"1" in (f[4] or b"")]
    assert masks == [("items", b"00100000000")]
    assert any(t.unchanged_mask == 0b100 for t, _ in rows)


def test_items_sequence_and_commit_positions() -> None:
    """Begin, chunks, truncate and Commit become items in source order with commit LSNs."""
    items = feed_all(TransactionAssembler(Lsn(0), target_for), RAW)
    kinds = [type(i).__name__ for i in items]
    assert kinds.count("TxnStart") == kinds.count("TxnEnd") == 10
    assert "Truncate" in kinds
    ends = [i.end_lsn for i in items if isinstance(i, TxnEnd)]
    assert ends == sorted(ends)
    truncate = next(i for i in items if isinstance(i, Truncate))
    assert {t.name for t in truncate.tables} == {"items", "events"}


def test_transactions_before_checkpoint_are_skipped() -> None:
    """Transactions whose commit precedes the checkpoint produce nothing."""
    everything = feed_all(TransactionAssembler(Lsn(0), target_for), RAW)
    ends = [i.end_lsn for i in everything if isinstance(i, TxnEnd)]
    assembler = TransactionAssembler(ends[4], target_for)
    items = feed_all(assembler, RAW)
    assert [i.end_lsn for i in items if isinstance(i, TxnEnd)] == ends[5:]
    assert assembler.skipped_transactions == 5


def test_unselected_relations_are_dropped() -> None:
    """A relation the resolver does not select stages no rows."""
    def only_items(relation: Relation) -> TargetTable | None:
        return target_for(relation) if relation.name == "items" else None

    rows = staged(feed_all(TransactionAssembler(Lsn(0), only_items), RAW))
    assert {t.relation.name for t, _ in rows} == {"items"}


def test_large_transactions_are_chunked() -> None:
    """A transaction wider than the chunk limit arrives as several chunks between its ends."""
    items = feed_all(TransactionAssembler(Lsn(0), target_for, chunk_rows=1), RAW[:6])
    assert [type(i) for i in items] == [TxnStart, ChangeChunk, ChangeChunk, TxnEnd]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_damaged_row_messages_raise_protocol_error_only(data: st.DataObject) -> None:
    """Truncated or altered I/U/D messages raise ProtocolError and nothing else."""
    assembler = TransactionAssembler(Lsn(0), target_for)
    feed_all(assembler, RAW[:3])
    victim = bytearray(RAW[data.draw(st.sampled_from([3, 4]))])
    cut = data.draw(st.integers(1, len(victim)))
    del victim[cut:]
    if victim and data.draw(st.booleans()):
        victim[data.draw(st.integers(0, len(victim) - 1))] = data.draw(st.integers(0, 255))
    with contextlib.suppress(ProtocolError):
        assembler.feed(bytes(victim))
        assembler.feed(RAW[5])  # the Commit stages the chunk: conversion errors surface here


def test_row_change_outside_transaction_is_refused() -> None:
    """A row change before any Begin is a protocol error."""
    assembler = TransactionAssembler(Lsn(0), target_for)
    assembler.feed(RAW[2])
    with pytest.raises(ProtocolError, match="outside a transaction"):
        assembler.feed(RAW[3])


def test_keys_name_each_staged_rows_key_once() -> None:
    """A chunk's keys are its staged rows' key fields, each once: as many keys as rows exactly
    when no key repeats (the applier collapses only otherwise)."""
    for table, rows in _chunks(feed_all(TransactionAssembler(Lsn(0), target_for),
                                        [*RAW, *MIXED])):
        assert table.keys is not None
        key = table.target.key[0]
        fields = [f[len(META_COLUMNS) + key] for f in rows]
        assert len(table.keys) == len(set(fields))
        assert {k[5:] for k in table.keys} == set(fields)  # kind byte and length, then the value


def test_chunks_of_inserts_carry_their_text_rows_when_asked() -> None:
    """Asked for texts, a chunk's rows of a table holding inserts alone come as text COPY rows of
    the target's columns (the applier's straight COPY sends them as they are), staged only when
    asked (for a batch that is not copied straight), then exactly as without texts; rows with
    an update or a delete, a table under row-level security, or no asking: staged, no text."""
    def narrowed(relation: Relation) -> TargetTable:
        table = target_for(relation)  # one column left out of the target, where there are two
        return dataclasses.replace(table, positions=table.positions[:1] + table.positions[2:])

    def tables(resolve: Callable[[Relation], TargetTable], *, texts: bool) -> list[TableRows]:
        items = feed_all(TransactionAssembler(Lsn(0), resolve, chunk_rows=2, texts=texts), RAW)
        return [t for i in items if isinstance(i, ChangeChunk) for t in i.tables]

    plain, texted = tables(narrowed, texts=False), tables(narrowed, texts=True)
    assert len(plain) == len(texted)
    inserts_alone = 0
    for staged_rows, table in zip(plain, texted, strict=True):
        if table.inserts and not (table.updates or table.deletes):
            inserts_alone += 1
            assert table.rows == []
            assert table.text == text_rows(staged_rows.rows, len(table.relation.columns),
                                           table.target.positions)
            assert table.text.count(b"\n") == table.inserts
        else:
            assert table.text is None
        assert table.staged() == staged_rows.rows
    assert 0 < inserts_alone < len(texted)

    def secured(relation: Relation) -> TargetTable:
        return dataclasses.replace(target_for(relation), row_security=True)

    for resolve, texts in ((target_for, False), (secured, True)):
        assert all(t.text is None and t.rows for t in tables(resolve, texts=texts))


def test_keys_of_inserts_alone_are_made_when_asked() -> None:
    """Rows of inserts alone made into text rows carry no keys but how to make them (the
    applier needs them only if changes of other kinds join them), and those are the keys of
    the same rows staged without texts; every other chunk carries its keys, those of its
    inserts included."""
    payloads = [*RAW, *MIXED]

    def tables(*, texts: bool) -> list[TableRows]:
        items = feed_all(TransactionAssembler(Lsn(0), target_for, texts=texts), payloads)
        return [t for i in items if isinstance(i, ChangeChunk) for t in i.tables]

    keyed, texted = tables(texts=False), tables(texts=True)
    made = 0
    for plain, table in zip(keyed, texted, strict=True):
        assert plain.keys is not None and plain.keyer is None
        if table.text is not None:
            made += 1
            assert table.keys is None and table.keyer is not None
            assert table.keyer() == plain.keys
        else:
            assert table.keyer is None and table.keys == plain.keys
    assert 0 < made < len(texted)
    assert any(t.inserts and (t.updates or t.deletes) for t in texted)


def _chunks(items: list[object]) -> list[tuple[TableRows, list[tuple[bytes | None, ...]]]]:
    return [(t, [row for blob in t.rows for row in parse_copy_rows(blob)])
            for i in items if isinstance(i, ChangeChunk) for t in i.tables]


def _tuple(*fields: bytes | None) -> bytes:
    out = struct.pack(">h", len(fields))
    for value in fields:
        out += b"n" if value is None else b"t" + struct.pack(">i", len(value)) + value
    return out


@pytest.mark.parametrize(("key", "expected_fields"), [
    ((0,), [b"ab"]),
    ((2,), [b"123"]),
    ((3,), [None]),
    ((0, 2), [b"ab", b"123"]),
    ((2, 0), [b"ab", b"123"]),
])
def test_key_of_is_the_key_columns_raw_fields(key: tuple[int, ...],
                                             expected_fields: list[bytes | None]) -> None:
    buf = b"xyz" + _tuple(b"ab", None, b"123", None, b"tail")
    want = b"".join(b"n" if f is None else b"t" + struct.pack(">i", len(f)) + f
                    for f in expected_fields)
    assert key_of(buf, 3, key) == want
    other = b"xyz" + _tuple(b"ab", None, b"124", None, b"")
    assert (key_of(buf, 3, key) == key_of(other, 3, key)) == (2 not in key)
