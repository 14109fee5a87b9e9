"""Staged rows built in C (_staged.c's stage_rows) are the bytes tuples.py's reference builds."""

from __future__ import annotations

import importlib.util
import random
import struct

import pytest

from cdcsync.errors import ProtocolError
from cdcsync.model import Column, Relation
from cdcsync.source import tuples
from cdcsync.source.tuples import PendingRow, stage_rows

if importlib.util.find_spec("cdcsync.source._staged") is None:
    pytest.skip("a pure-Python install has no compiled extension", allow_module_level=True)

from cdcsync.source._staged import stage_rows as compiled_stage_rows


def _relation(width: int) -> Relation:
    return Relation(16500, "public", "wide", "d",
                    tuple(Column(f"c{i}", 25, -1, i == 0) for i in range(width)))


def _tuple(fields: list[tuple[bytes, bytes | None]]) -> bytes:
    out = struct.pack(">h", len(fields))
    for kind, value in fields:
        out += kind if value is None else kind + struct.pack(">i", len(value)) + value
    return out


def _random_row(rng: random.Random, width: int, seq: int) -> PendingRow:
    fields: list[tuple[bytes, bytes | None]] = []
    for _ in range(width):
        kind = rng.choice([b"t", b"b", b"n", b"u"])
        value = None if kind in (b"n", b"u") else rng.randbytes(rng.choice([0, 1, 7, 300]))
        fields.append((kind, value))
    # An Update with its old key first: the new tuple starts after it, and whatever follows a
    # tuple is not part of it.
    before = b"U" + struct.pack(">I", 16500) + b"K" + _tuple(fields[:1] * width) + b"N"
    payload = before + _tuple(fields) + rng.randbytes(rng.choice([0, 3]))
    lsn = rng.choice([0x10, 0x16B374D8, (1 << 64) - 1])
    commit_time = rng.choice([0, 1 << 50, -(1 << 40)])
    return (payload, len(before), ord(rng.choice("IUDM")), seq, lsn, commit_time)


@pytest.mark.parametrize("width", [1, 3, 8, 70])
def test_the_compiled_rows_equal_the_reference(width: int) -> None:
    rng = random.Random(width)
    rows = [_random_row(rng, width, seq) for seq in range(1, 60)]
    expected = tuples._stage_rows(_relation(width), rows)
    assert compiled_stage_rows(rows, width) == expected
    assert stage_rows(_relation(width), rows) == expected
    assert expected[1] != 0  # some rows left a TOASTed value unchanged, in the mask


def test_a_column_past_the_64th_left_unchanged_is_in_the_mask() -> None:
    fields: list[tuple[bytes, bytes | None]] = [(b"t", b"x")] * 70
    fields[65] = (b"u", None)
    row = (b"I" + struct.pack(">I", 16500) + b"N" + _tuple(fields), 6, ord("I"), 1, 2, 3)
    staged, mask = stage_rows(_relation(70), [row])
    assert mask == 1 << 65
    assert (staged, mask) == tuples._stage_rows(_relation(70), [row])


def test_no_rows_stage_nothing() -> None:
    assert compiled_stage_rows([], 3) == (b"", 0)


@pytest.mark.parametrize(("payload", "message"), [
    (b"I\0\0\0\1N" + struct.pack(">h", 2) + b"t\0\0\0\1x", "has 2 columns, its Relation message 3"),
    (b"I\0\0\0\1N" + struct.pack(">h", 3) + b"t\0\0\0\5x", "truncated tuple"),
    (b"I\0\0\0\1N" + struct.pack(">h", 3) + b"nnx", "unexpected column kind 'x'"),
    (b"I\0\0\0\1N" + struct.pack(">h", 3) + b"nn", "truncated tuple"),
    (b"I\0\0\0\1N\0", "truncated tuple"),
])
def test_a_malformed_row_is_named_by_the_reference(payload: bytes, message: str) -> None:
    """The C walk gives up on a row it cannot read; the reference then says what is wrong."""
    row = (payload, 6, ord("I"), 1, 2, 3)
    assert compiled_stage_rows([row], 3) is None
    with pytest.raises(ProtocolError, match=message):
        stage_rows(_relation(3), [row])


def test_rows_of_the_wrong_shape_are_a_type_error() -> None:
    with pytest.raises(TypeError, match="payload, start, op"):
        compiled_stage_rows([(b"", 6, 1)], 3)  # type: ignore[list-item]
