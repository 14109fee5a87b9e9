"""Staged rows as text COPY rows for a COPY straight into the target table."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdcsync.errors import ProtocolError
from cdcsync.model import Column, Relation
from cdcsync.source.tuples import payload_text_rows, stage_rows, stage_values, text_rows

RELATION = Relation(1, "public", "notes", "d", (
    Column("id", 23, -1, True), Column("secret", 25, -1, False), Column("body", 25, -1, False),
    Column("tag", 25, -1, False)))


def _staged(*rows: tuple[bytes | None, ...]) -> bytes:
    staged, _ = stage_values(RELATION, [(row, ord("I"), seq, 0x10, 0)
                                        for seq, row in enumerate(rows)])
    return staged


def test_values_are_escaped_nulls_marked_and_excluded_columns_left_out() -> None:
    """COPY's delimiters and backslash inside a value are escaped, NULL is \\N, an empty text
    stays empty, and a column left out of the target (position 1) is skipped."""
    chunk = _staged((b"1", b"hidden", b"a\tb\nc\rd\\e", None),
                    (b"2", None, b"", b"\\N"))
    assert text_rows([chunk], 4, (0, 2, 3)) == (
        b"1\ta\\tb\\nc\\rd\\\\e\t\\N\n"
        b"2\t\t\\\\N\n")


def test_rows_of_several_chunks_follow_each_other() -> None:
    first = _staged((b"1", b"x", b"multi\xc3\xa9byte", b"t"))
    second = _staged((b"2", b"y", b"z" * 3000, None))
    assert text_rows([first, second], 4, (0, 1, 2, 3)) == (
        b"1\tx\tmulti\xc3\xa9byte\tt\n" + b"2\ty\t" + b"z" * 3000 + b"\t\\N\n")


def test_each_byte_to_escape_is_caught_alone_in_its_chunk() -> None:
    """Chunks are first copied unescaped and checked by counting delimiters and backslashes:
    one such byte in one value of a chunk (beside NULLs, whose \\N holds a backslash too) must
    still send that chunk through the escaping, and the plain chunks around it stay as they are."""
    for raw, escaped in ((b"\t", b"\\t"), (b"\n", b"\\n"), (b"\r", b"\\r"), (b"\\", b"\\\\")):
        plain = _staged((b"1", None, b"ok", b"t"))
        special = _staged((b"2", None, b"a" + raw + b"b", None), (b"3", b"s", b"c", b"d"))
        assert text_rows([plain, special, plain], 4, (0, 1, 2, 3)) == (
            b"1\t\\N\tok\tt\n"
            b"2\t\\N\ta" + escaped + b"b\t\\N\n3\ts\tc\td\n"
            b"1\t\\N\tok\tt\n"), raw


def _insert(*values: bytes | None) -> bytes:
    """A pgoutput Insert message of RELATION."""
    out = b"I" + struct.pack(">I", RELATION.oid) + b"N" + struct.pack(">h", len(values))
    for value in values:
        out += b"n" if value is None else b"t" + struct.pack(">i", len(value)) + value
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(*[st.one_of(st.none(), st.binary(max_size=12),
                                      st.sampled_from([b"\t", b"\n", b"\r", b"\\", b"\\N"]))
                            for _ in range(4)]), min_size=1, max_size=6),
       st.sampled_from([(0, 1, 2, 3), (0, 2, 3), (1,)]))
def test_inserts_still_in_their_messages_give_the_same_text(
        values: list[tuple[bytes | None, ...]], positions: tuple[int, ...]) -> None:
    """The reader's text of unstaged inserts equals the text of the same rows staged."""
    payloads = [_insert(*row) for row in values]
    staged, _ = stage_rows(RELATION, [(p, 6, ord("I"), seq, 0x10, 0)
                                      for seq, p in enumerate(payloads)])
    assert payload_text_rows(RELATION, payloads, positions) == text_rows([staged], 4, positions)


def test_an_insert_with_an_unchanged_value_is_refused() -> None:
    """Only an update leaves a value unchanged: in an insert it means a damaged stream."""
    payload = _insert(b"1", b"x", b"y", b"z")[:-6] + b"u"
    with pytest.raises(ProtocolError, match="unexpected column kind 'u'"):
        payload_text_rows(RELATION, [payload], (0, 1, 2, 3))
