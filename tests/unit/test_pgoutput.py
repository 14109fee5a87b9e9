"""The pgoutput decoder on bytes captured from PostgreSQL 15 (see capture_stream.py)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdcsync.errors import ProtocolError
from cdcsync.model import UNCHANGED, Lsn, Relation
from cdcsync.source.pgoutput import (
    Begin,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Message,
    Origin,
    Truncate,
    TypeMsg,
    Update,
    decode,
)

CAPTURE = json.loads((Path(__file__).parent / "data" / "pgoutput_capture.json").read_text())
RAW: list[bytes] = [bytes.fromhex(m["hex"]) for m in CAPTURE]
LSNS: list[Lsn] = [Lsn.parse(m["lsn"]) for m in CAPTURE]
MESSAGES: list[Message] = [decode(b) for b in RAW]

ITEMS_COLUMNS = (
    "id",
    "name",
    "big",
    "amount",
    "flag",
    "doc",
    "uid",
    "blob",
    "at",
    "nums",
    "feeling",
)
ITEM_42 = (
    b"42",
    b"answer",
    None,
    b"1234.50",
    b"t",
    b'{"a": [1, 2], "b": null}',
    b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
    b"\\xdeadbeef",
    b"2024-02-29 12:34:56.789+00",
    b"{1,2,3}",
    b"happy",
)  # "big" is checked separately
NULL_ROW_TAIL = (None,) * 10


T = TypeVar("T")


def of_type(kind: type[T]) -> list[T]:
    return [m for m in MESSAGES if isinstance(m, kind)]


def relation(name: str) -> Relation:
    return next(r for r in of_type(Relation) if r.name == name)


def test_capture_decodes_to_the_expected_sequence() -> None:
    """Every captured message decodes, in the order the capture script produced them."""
    letters = {
        Begin: "B",
        Commit: "C",
        TypeMsg: "Y",
        Relation: "R",
        Insert: "I",
        Update: "U",
        Delete: "D",
        Truncate: "T",
        LogicalMessage: "M",
        Origin: "O",
    }
    kinds = "".join(letters[type(m)] for m in MESSAGES)
    assert kinds == "BYRIICBUCBUCBRIICBUCBDCBDCBYRRTCBMCMBORIC"
    assert len(of_type(TypeMsg)) == 2


def test_begin_and_commit_lsns_agree() -> None:
    """Begin.final_lsn is the Commit's commit_lsn, end_lsn lies after it and is the XLogData LSN."""
    begins, commits = of_type(Begin), of_type(Commit)
    assert len(begins) == len(commits) == 10
    for begin, commit in zip(begins, commits, strict=True):
        assert begin.final_lsn == commit.commit_lsn
        assert commit.end_lsn > commit.commit_lsn
        assert commit.commit_time == begin.commit_time
        assert commit.commit_time.utcoffset() is not None
        assert commit.flags == 0
        assert isinstance(commit.end_lsn, Lsn)
    for lsn, msg in zip(LSNS, MESSAGES, strict=True):
        if isinstance(msg, Commit):
            assert lsn == msg.end_lsn
    assert len({b.xid for b in begins}) == 10


def test_relation_messages_describe_columns_keys_and_replica_identity() -> None:
    """Relation messages carry names, type OIDs, typmods, key flags and the replica identity."""
    items = relation("items")
    assert (items.schema, items.replica_identity) == ("public", "d")
    assert items.column_names == ITEMS_COLUMNS
    assert [c.name for c in items.columns if c.is_key] == ["id"]
    types = {c.name: c.type_oid for c in items.columns}
    assert types["id"] == 23 and types["amount"] == 1700 and types["doc"] == 3802
    assert types["uid"] == 2950 and types["nums"] == 1007 and types["at"] == 1184
    amount = items.columns[3]
    assert amount.type_modifier == ((12 << 16) | 2) + 4  # numeric(12, 2)
    assert items.columns[0].type_modifier == -1
    mood = of_type(TypeMsg)[0]
    assert (mood.schema, mood.name) == ("public", "mood")
    assert types["feeling"] == mood.oid
    events = relation("events")
    assert events.replica_identity == "f"
    assert events.column_names == ("id", "kind", "score", "note")
    assert all(c.is_key for c in events.columns)


def test_insert_carries_text_values_and_nulls() -> None:
    """Inserted values arrive as text bytes, NULL as None, the TOASTed value in full."""
    first, second = of_type(Insert)[:2]
    assert first.relation_oid == relation("items").oid
    assert first.new[:2] + first.new[3:] == ITEM_42[:2] + ITEM_42[3:]
    big = first.new[2]
    assert isinstance(big, bytes) and len(big) == 3000
    assert second.new == (b"7", *NULL_ROW_TAIL)


def test_update_sends_untouched_toast_as_unchanged() -> None:
    """An update not touching the TOASTed column sends it as UNCHANGED and no old tuple."""
    update = of_type(Update)[0]
    assert (update.old, update.old_kind) == (None, None)
    assert update.new[2] is UNCHANGED
    assert update.new[:2] == (b"42", b"renamed")
    assert update.new[4] == b"f"
    assert update.new[3] == b"1234.50" and update.new[9:] == (b"{1,2,3}", b"happy")


def test_primary_key_change_carries_old_key_tuple() -> None:
    """Changing the primary key sends a 'K' old tuple with only the key set."""
    update = of_type(Update)[1]
    assert update.old_kind == "K"
    assert update.old == (b"7", *NULL_ROW_TAIL)
    assert update.new == (b"8", *NULL_ROW_TAIL)


def test_replica_identity_full_sends_whole_old_rows() -> None:
    """On a REPLICA IDENTITY FULL table updates and deletes carry the whole old row ('O')."""
    update = of_type(Update)[2]
    assert update.relation_oid == relation("events").oid
    assert update.old_kind == "O"
    assert update.old == (b"1", b"click", b"10", b"first")
    assert update.new == (b"1", b"click", b"11", b"first")
    delete = of_type(Delete)[1]
    assert (delete.old_kind, delete.old) == ("O", (b"2", b"view", None, b"second"))


def test_delete_with_default_identity_carries_key_only() -> None:
    """A delete on a default-identity table sends a 'K' tuple holding just the key."""
    delete = of_type(Delete)[0]
    assert delete.relation_oid == relation("items").oid
    assert (delete.old_kind, delete.old) == ("K", (b"8", *NULL_ROW_TAIL))


def test_truncate_lists_both_relations() -> None:
    """TRUNCATE of two tables is one message with both OIDs and no options."""
    (truncate,) = of_type(Truncate)
    assert truncate.relation_oids == (relation("items").oid, relation("events").oid)
    assert (truncate.cascade, truncate.restart_identity) == (False, False)


def test_logical_messages() -> None:
    """pg_logical_emit_message arrives with prefix, content and the transactional flag."""
    inside, outside = of_type(LogicalMessage)
    assert (inside.transactional, inside.prefix, inside.content) == (True, "cdcsync", b"hello")
    assert (outside.transactional, outside.prefix, outside.content) == (
        False,
        "cdcsync",
        b"outside",
    )
    assert outside.lsn > inside.lsn


def test_origin() -> None:
    """A transaction replayed under a replication origin starts with an Origin message."""
    (origin,) = of_type(Origin)
    assert origin == Origin(Lsn.parse("0/ABCDEF"), "upstream")


def test_memoryview_input_decodes_the_same() -> None:
    """decode accepts a memoryview (e.g. a slice of the XLogData buffer) with the same result."""
    for raw, msg in zip(RAW, MESSAGES, strict=True):
        assert decode(memoryview(b"xx" + raw)[2:]) == msg


def test_binary_column_values_decode_as_bytes() -> None:
    """A 'b' (binary format) column decodes to its bytes like a text one."""
    data = b"I" + struct.pack(">IcH", 99, b"N", 2) + b"b\0\0\0\x02\x00\x01" + b"u"
    assert decode(data) == Insert(99, (b"\x00\x01", UNCHANGED))


def test_truncate_option_bits() -> None:
    """Truncate option bit 1 is CASCADE and bit 2 is RESTART IDENTITY."""
    data = b"T" + struct.pack(">IBI", 1, 3, 5)
    assert decode(data) == Truncate((5,), cascade=True, restart_identity=True)


@pytest.mark.parametrize("kind", [b"S", b"E", b"c", b"A"])
def test_streaming_messages_are_refused(kind: bytes) -> None:
    """Streamed-transaction messages raise ProtocolError saying streaming is unsupported."""
    with pytest.raises(ProtocolError, match="streaming is not supported"):
        decode(kind + b"\0" * 16)


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (b"", "empty pgoutput message"),
        (b"Z123", "unknown pgoutput message type 'Z'"),
        (b"B\0\0", "pgoutput Begin message is truncated (3 bytes)"),
        (b"Y\0\0\0\1public", "pgoutput Type message is malformed: string at offset 5 has no NUL"),
        (b"Y\0\0\0\1\xff\0x\0", "string at offset 5 is not valid UTF-8"),
        (b"B" + struct.pack(">QqI", 1, 2**62, 3), "timestamp 4611686018427387904 is out of range"),
        (b"T" + struct.pack(">IB", 1000, 0), "1000 relation OIDs do not fit in 0 bytes"),
        (b"I" + struct.pack(">IcH", 1, b"N", 1) + b"t\0\0\0\x09ab", "claims 9 bytes, only 2"),
        (b"I" + struct.pack(">IcH", 1, b"N", 1) + b"x", "column 1 has unknown kind byte 0x78"),
        (b"I" + struct.pack(">IcH", 1, b"X", 0), "expected 'N' before the new tuple, got 0x58"),
        (b"D" + struct.pack(">IcH", 1, b"N", 0), "expected 'K' or 'O'"),
        (b"I" + struct.pack(">IcH", 1, b"N", 2) + b"n", "tuple ends after 1 of 2 columns"),
        (b"I" + struct.pack(">IcH", 1, b"N", 0) + b"!", "has 1 unexpected trailing bytes"),
    ],
)
def test_malformed_input_names_the_problem(data: bytes, text: str) -> None:
    """Malformed input raises ProtocolError whose message names the message type and the fault."""
    with pytest.raises(ProtocolError) as info:
        decode(data)
    assert text in str(info.value)


def test_every_truncation_and_extension_is_rejected() -> None:
    """Every proper prefix and every one-byte extension of a captured message is a ProtocolError."""
    for raw in RAW:
        for cut in range(len(raw)):
            with pytest.raises(ProtocolError):
                decode(raw[:cut])
        with pytest.raises(ProtocolError):
            decode(raw + b"\0")


def check_total(data: bytes) -> None:
    """decode returns a message or raises ProtocolError — nothing else."""
    try:
        decode(data)
    except ProtocolError as exc:
        assert str(exc)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_escape_protocol_error(data: bytes) -> None:
    """Arbitrary bytes either decode or raise ProtocolError."""
    check_total(data)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(b"BCORYIUDTM"), st.binary(max_size=120))
def test_random_bodies_never_escape_protocol_error(kind: int, body: bytes) -> None:
    """A valid type byte followed by arbitrary bytes either decodes or raises ProtocolError."""
    check_total(bytes([kind]) + body)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_byte_flips_never_escape_protocol_error(data: st.DataObject) -> None:
    """Captured messages with random bytes overwritten either decode or raise ProtocolError."""
    raw = bytearray(data.draw(st.sampled_from(RAW)))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    check_total(bytes(raw))
