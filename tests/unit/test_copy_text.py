"""Staged rows as text COPY rows for a COPY straight into the target table."""

from __future__ import annotations

from cdcsync.model import Column, Relation
from cdcsync.source.tuples import stage_values, text_rows

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
