"""The earlier versions of a key dropped from staged rows before the COPY (_staged.c)."""

from __future__ import annotations

import importlib.util

import pytest

from cdcsync.apply import script as plan
from cdcsync.apply import sql as q
from cdcsync.model import Column, Relation, TableRows, TargetTable
from cdcsync.source.tuples import COPY_HEADER, COPY_TRAILER, META_COLUMNS, stage_values

if importlib.util.find_spec("cdcsync.source._staged") is None:
    pytest.skip("a pure-Python install has no compiled extension", allow_module_level=True)

from cdcsync.source._staged import latest_versions

RELATION = Relation(1, "public", "items", "d", (
    Column("tenant", 25, -1, True), Column("id", 23, -1, True), Column("v", 25, -1, False)))
TENANT, ID = len(META_COLUMNS), len(META_COLUMNS) + 1
Row = tuple[bytes | None, bytes | None, bytes]


def _chunk(*rows: tuple[int, Row], op: str = "U") -> bytes:
    """Staged rows of (sequence number, (tenant, id, v)), all of operation ``op``."""
    return stage_values(RELATION, [(values, ord(op), seq, 0, 0) for seq, values in rows])[0]


def _fields(chunk: bytes) -> list[list[bytes]]:
    """Every row of ``chunk`` as its fields (a NULL as empty), walked with the staged layout."""
    found, off = [], 0
    while off < len(chunk):
        count = int.from_bytes(chunk[off:off + 2], "big")
        off += 2
        row = []
        for _ in range(count):
            size = int.from_bytes(chunk[off:off + 4], "big", signed=True)
            row.append(chunk[off + 4:off + 4 + max(size, 0)])
            off += 4 + max(size, 0)
        found.append(row)
    return found


def _rows(chunks: list[bytes]) -> list[list[int]]:
    """The sequence numbers of the rows of each chunk."""
    return [[int.from_bytes(row[0], "big") for row in _fields(chunk)] for chunk in chunks]


def _ops(chunks: list[bytes]) -> list[str]:
    """The operation of every row of ``chunks``, in order."""
    return [row[1].decode() for chunk in chunks for row in _fields(chunk)]


def _unframed(copy_data: bytes) -> bytes:
    """The rows of a binary COPY's data, without its header and trailer."""
    assert copy_data.startswith(COPY_HEADER) and copy_data.endswith(COPY_TRAILER)
    return copy_data[len(COPY_HEADER):-len(COPY_TRAILER)]


def test_only_the_last_version_of_each_key_stays_across_chunks() -> None:
    first = _chunk((1, (b"t", b"1", b"a")), (2, (b"t", b"2", b"b")), (3, (b"t", b"1", b"c")))
    second = _chunk((4, (b"u", b"1", b"d")), (5, (b"t", b"2", b"e")))
    third = _chunk((6, (b"t", b"3", b"f")))
    kept = latest_versions([first, second, third], [TENANT, ID])
    assert kept is not None
    assert _rows(kept) == [[3], [4, 5], [6]]
    assert kept[2] is third  # a chunk that loses nothing is passed on as it is


def test_a_key_inserted_then_updated_in_the_batch_is_staged_as_an_insert() -> None:
    """Its last version, with the update's values, goes to the plain INSERT; a key updated
    first (on the target before the batch) stays an update, even when inserted again later."""
    first = b"".join((_chunk((1, (b"t", b"1", b"a")), op="I"), _chunk((2, (b"t", b"2", b"b"))),
                      _chunk((3, (b"t", b"1", b"c")))))
    second = b"".join((_chunk((4, (b"t", b"3", b"d")), op="I"), _chunk((5, (b"t", b"2", b"e")),
                                                                     op="D")))
    third = b"".join((_chunk((6, (b"t", b"3", b"f"))), _chunk((7, (b"t", b"2", b"g")), op="I"),
                      _chunk((8, (b"t", b"2", b"h")))))
    kept = latest_versions([first, second, third], [TENANT, ID])
    assert kept is not None
    assert _rows(kept) == [[3], [], [6, 8]]
    assert _ops(kept) == ["I", "I", "U"]
    assert [row[-1] for chunk in kept for row in _fields(chunk)] == [b"c", b"f", b"h"]


def test_a_chunk_whose_rows_are_only_restaged_as_inserts_is_a_new_one() -> None:
    """The insert in one chunk, its update in the next: the second loses no row, but is not
    passed on as it is."""
    first = _chunk((1, (b"t", b"1", b"a")), op="I")
    second = _chunk((2, (b"t", b"1", b"b")), (3, (b"t", b"2", b"c")))
    kept = latest_versions([first, second], [TENANT, ID])
    assert kept is not None
    assert kept[0] == b"" and kept[1] is not second
    assert _rows(kept) == [[], [2, 3]] and _ops(kept) == ["I", "U"]


def test_a_key_inserted_then_deleted_stays_a_delete() -> None:
    chunk = _chunk((1, (b"t", b"1", b"a")), op="I") + _chunk((2, (b"t", b"1", b"a")), op="D")
    kept = latest_versions([chunk], [TENANT, ID])
    assert kept is not None and _ops(kept) == ["D"]


def test_a_key_part_alone_does_not_match() -> None:
    """(t, 1) and (u, 1) are different keys; on the id alone they are one."""
    chunk = _chunk((1, (b"t", b"1", b"a")), (2, (b"u", b"1", b"b")))
    assert latest_versions([chunk], [TENANT, ID]) is None
    kept = latest_versions([chunk], [ID])
    assert kept is not None
    assert _rows(kept) == [[2]]


def test_a_key_with_a_null_part_matches_nothing_as_in_sql() -> None:
    chunk = _chunk((1, (None, b"1", b"a")), (2, (None, b"1", b"b")), (3, (b"t", None, b"c")),
                   (4, (b"t", None, b"d")))
    assert latest_versions([chunk], [TENANT, ID]) is None


def test_fields_are_compared_with_their_lengths() -> None:
    """Two fields "ab" + "c" and "a" + "bc" are side by side the same bytes, not the same key."""
    chunk = _chunk((1, (b"ab", b"c", b"x")), (2, (b"a", b"bc", b"y")))
    assert latest_versions([chunk], [TENANT, ID]) is None


def test_no_rows_or_no_repeats_give_none() -> None:
    assert latest_versions([], [ID]) is None
    assert latest_versions([b""], [ID]) is None
    assert latest_versions([_chunk((1, (b"t", b"1", b"a")))], [ID]) is None


def test_a_truncated_row_or_bad_key_fields_are_refused() -> None:
    chunk = _chunk((1, (b"t", b"1", b"a")), (2, (b"t", b"1", b"b")))
    with pytest.raises(ValueError, match="truncated staged row"):
        latest_versions([chunk[:-1]], [ID])
    with pytest.raises(ValueError, match=f"key field {ID + 5} is past the {ID + 2} fields"):
        latest_versions([chunk], [ID + 5])
    with pytest.raises(ValueError, match="ascend"):
        latest_versions([chunk], [ID, TENANT])
    with pytest.raises(TypeError):
        latest_versions([bytearray(chunk)], [ID])  # type: ignore[list-item]


def test_a_batch_collapsed_before_its_copy_is_not_collapsed_by_the_merge() -> None:
    """The stage gets the last versions only, and the merge has no DELETE of earlier ones;
    staged again whole (for the fallbacks), the merge collapses it."""
    table = TargetTable("public.items", 7, "public", "items", ("tenant", "id", "v"),
                        ("text", "integer", "text"), (0, 1, 2), (0, 1), (0, 1), None, False)
    chunks = [_chunk((1, (b"t", b"1", b"a")), (2, (b"t", b"1", b"b")))]
    batch = plan.Staged(table, RELATION, q.stage_name(table, RELATION),
                        [TableRows(RELATION, table, chunks)], only_inserts=False, repeats=True)
    collapsed = plan.Script()
    plan.stage(collapsed, batch, create=False, truncate=False, window_name=None, collapse=True)
    plan.merge(collapsed, [batch], {})
    assert batch.collapsed
    assert _rows([_unframed(collapsed.copies[0])]) == [[2]]
    assert not any("DELETE" in s.as_string(None) for s in collapsed.statements
                   if not isinstance(s, bytes))
    whole = plan.Script()
    plan.stage(whole, batch, create=False, truncate=True, window_name=None)
    plan.merge(whole, [batch], {})
    assert not batch.collapsed
    assert _rows([_unframed(whole.copies[0])]) == [[1, 2]]
    assert any(s.as_string(None).startswith("DELETE") for s in whole.statements
               if not isinstance(s, bytes))
