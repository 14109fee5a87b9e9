"""Staged rows as text COPY rows for a COPY straight into the target table."""

from __future__ import annotations

import struct

from cdcsync.model import Column, Relation
from cdcsync.source.tuples import split_inserts, stage_values, text_rows

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


def test_split_sends_inserts_of_keys_changed_once_straight_and_stages_the_rest() -> None:
    """Inserts of keys not in ``repeated`` become text rows; a repeated key's insert, updates
    and deletes stay staged rows, byte for byte and in order."""
    rows = [(b"1", b"s", b"one", None), (b"2", b"s", b"two", None),
            (b"3", b"s", b"three", b"t"), (b"4", b"s", b"four", None)]
    ops = [ord("I"), ord("U"), ord("I"), ord("I")]
    chunk, _ = stage_values(RELATION, [(row, op, seq, 0x10, 0)
                                       for seq, (row, op) in enumerate(zip(rows, ops,
                                                                           strict=True))])
    singles = [stage_values(RELATION, [(row, op, seq, 0x10, 0)])[0]
               for seq, (row, op) in enumerate(zip(rows, ops, strict=True))]
    repeated = {b"t" + struct.pack(">i", 1) + b"3"}
    text, rest, inserts = split_inserts([chunk], 4, (0, 2, 3), (0,), repeated)
    assert text == b"1\tone\t\\N\n4\tfour\t\\N\n"
    assert rest == singles[1] + singles[2]
    assert inserts == 2


def test_split_keys_of_several_columns_are_their_fields_in_column_order() -> None:
    chunk, _ = stage_values(RELATION, [((b"1", b"a", b"x", b"k"), ord("I"), 0, 0x10, 0),
                                       ((b"1", b"b", b"y", b"k"), ord("I"), 1, 0x10, 0)])
    key = b"t" + struct.pack(">i", 1) + b"1" + b"t" + struct.pack(">i", 1) + b"k"
    text, rest, inserts = split_inserts([chunk], 4, (0, 1, 2, 3), (3, 0), {key})
    assert (text, inserts) == (b"", 0)
    assert rest == chunk
