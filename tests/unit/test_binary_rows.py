"""Binary values (pgoutput's binary mode): staged as they came, copied straight in binary."""

from __future__ import annotations

import struct

import pytest

from cdcsync.errors import ProtocolError
from cdcsync.model import ChangeChunk, Column, Lsn, Relation, TargetTable
from cdcsync.source.transactions import TransactionAssembler
from cdcsync.source.tuples import META_COLUMNS, key_of, payload_binary_rows, stage_rows
from tests.unit.test_assembler import parse_copy_rows

RELATION = Relation(16400, "public", "events", "d", (
    Column("id", 20, -1, True), Column("note", 25, -1, False), Column("at", 1184, -1, False)))
TABLE = TargetTable("public.events", 16400, "public", "events", ("id", "at"),
                    ("bigint", "timestamp with time zone"), (0, 2), (0,), (0,), None, False,
                    binary_types=("bigint", "text", "timestamp with time zone"))


def _tuple(*fields: tuple[bytes, bytes | None]) -> bytes:
    out = struct.pack(">h", len(fields))
    for kind, value in fields:
        out += kind if value is None else kind + struct.pack(">i", len(value)) + value
    return out


def _insert(key: int, note: bytes | None, at: int) -> bytes:
    return (b"I" + struct.pack(">I", RELATION.oid) + b"N"
            + _tuple((b"b", struct.pack(">q", key)), (b"n", None) if note is None else
                     (b"b", note), (b"b", struct.pack(">q", at))))


def test_binary_values_are_staged_as_they_came() -> None:
    """A binary field is the binary COPY field of its type: staged with its kind byte dropped,
    exactly as a text field is."""
    payload = _insert(7, b"hello", 1 << 40)
    staged, mask = stage_rows(RELATION, [(payload, 6, ord("I"), 1, 0x10, 0)])
    row = parse_copy_rows(staged)[0]
    assert row[len(META_COLUMNS):] == (struct.pack(">q", 7), b"hello", struct.pack(">q", 1 << 40))
    assert mask == 0


def test_straight_rows_hold_the_target_columns_in_binary() -> None:
    """The rows copied straight carry the target's columns only (here without `note`), NULLs as
    length -1."""
    rows = [_insert(1, b"x", 5), _insert(2, None, 6)]
    assert parse_copy_rows(payload_binary_rows(RELATION, rows, (0, 2))) == [
        (struct.pack(">q", 1), struct.pack(">q", 5)), (struct.pack(">q", 2), struct.pack(">q", 6))]
    assert parse_copy_rows(payload_binary_rows(RELATION, rows[1:], (1,))) == [(None,)]


def test_a_text_or_unchanged_field_is_refused_in_straight_binary_rows() -> None:
    text = (b"I" + struct.pack(">I", RELATION.oid) + b"N"
            + _tuple((b"t", b"1"), (b"n", None), (b"n", None)))
    with pytest.raises(ProtocolError, match="column kind 't'"):
        payload_binary_rows(RELATION, [text], (0, 2))
    short = _insert(1, b"x", 5)[:-3]
    with pytest.raises(ProtocolError, match="truncated"):
        payload_binary_rows(RELATION, [short], (0, 2))


def test_keys_of_binary_fields_tell_rows_apart() -> None:
    assert key_of(_insert(1, b"a", 5), 6, (0,)) == b"b" + struct.pack(">iq", 8, 1)
    assert key_of(_insert(1, b"a", 5), 6, (0,)) != key_of(_insert(2, b"a", 5), 6, (0,))
    assert key_of(_insert(1, b"ab", 5), 6, (1, 2)) == (
        b"b" + struct.pack(">i", 2) + b"ab" + b"b" + struct.pack(">iq", 8, 5))


def _messages(*changes: bytes) -> list[bytes]:
    relation = (b"R" + struct.pack(">I", RELATION.oid) + b"public\0events\0d"
                + struct.pack(">h", 3) + b"\x01id\0" + struct.pack(">Ii", 20, -1)
                + b"\x00note\0" + struct.pack(">Ii", 25, -1)
                + b"\x00at\0" + struct.pack(">Ii", 1184, -1))
    begin = b"B" + struct.pack(">qqI", 0x200, 0, 9)
    commit = b"C" + struct.pack(">bqqq", 0, 0x200, 0x250, 0)
    return [relation, begin, *changes, commit]


def test_the_assembler_marks_binary_chunks_and_makes_their_straight_rows() -> None:
    """In binary mode a chunk of inserts carries binary COPY rows of the target's columns (no
    staged rows until asked); a chunk with an update is staged, marked binary too."""
    assembler = TransactionAssembler(Lsn(0), lambda r: TABLE, texts=True, binary=True)
    inserts = [c for m in _messages(_insert(1, b"x", 5)) for c in assembler.feed(m)
               if isinstance(c, ChangeChunk)]
    rows = inserts[0].tables[0]
    assert rows.binary and rows.rows == []
    assert parse_copy_rows(rows.text or b"") == [(struct.pack(">q", 1), struct.pack(">q", 5))]
    assert parse_copy_rows(rows.staged()[0])[0][len(META_COLUMNS):] == (
        struct.pack(">q", 1), b"x", struct.pack(">q", 5))
    update = (b"U" + struct.pack(">I", RELATION.oid) + b"N"
              + _tuple((b"b", struct.pack(">q", 1)), (b"b", b"y"), (b"b", struct.pack(">q", 6))))
    mixed = next(c for m in _messages(_insert(2, b"z", 7), update) for c in assembler.feed(m)
                 if isinstance(c, ChangeChunk)).tables[0]
    assert mixed.binary and mixed.text is None and mixed.updates == 1
    assert [r[1] for r in parse_copy_rows(mixed.rows[0])] == [b"I", b"U"]
