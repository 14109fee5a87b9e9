"""A numpy version of :func:`cdcsync.source.tuples.stage_rows`: the same bytes, mask and errors.

The pure-Python reference walks every column of every row. Here the rows of a chunk are walked
together, one column at a time over all rows at once, and the output is built with a single gather
from one source buffer (the payloads, a per-row metadata block and a NULL field). Any tuple that
does not decode sends the whole chunk back to the reference, so the error raised is the one the
reference would raise for the first bad row, never a second implementation of the messages.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

from cdcsync.errors import ProtocolError
from cdcsync.model import Relation
from cdcsync.source import tuples
from cdcsync.source.tuples import NULL, PendingRow

I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]
Bools = npt.NDArray[np.bool_]

SMALL_CHUNK: Final = 32
"""Below this many rows numpy's fixed cost per call outweighs the reference's cost per row."""

_T, _N, _U = ord("t"), ord("n"), ord("u")
_OPS: Final = np.frombuffer(b"IUDM", dtype=np.uint8)
_KIND_AND_LENGTH: Final = np.arange(5, dtype=np.int64)


class _Malformed(Exception):
    """A tuple of the chunk does not decode: let the reference say which and how."""


def stage_rows(relation: Relation, rows: Sequence[PendingRow]) -> tuple[bytes, int]:
    """Convert ``rows`` into concatenated binary COPY rows for the relation's staging table;
    also return the union of their unchanged-TOAST masks (bit i: column i).

    Same contract as :func:`cdcsync.source.tuples.stage_rows`; a malformed tuple raises
    :class:`ProtocolError`."""
    if len(rows) < SMALL_CHUNK:
        return _reference(relation, rows)
    try:
        return _stage_vectorized(len(relation.columns), rows)
    except (_Malformed, OverflowError):
        # OverflowError: a seq, LSN or commit time out of its range; the reference reports it.
        return _reference(relation, rows)


def _reference(relation: Relation, rows: Sequence[PendingRow]) -> tuple[bytes, int]:
    """The reference, with its IndexError or struct.error on a truncated tuple made a
    ProtocolError (the stream's bytes are at fault, not cdcsync)."""
    try:
        return tuples.stage_rows(relation, rows)
    except (IndexError, struct.error) as exc:
        if _is_truncated(len(relation.columns), rows):
            raise ProtocolError(f"truncated tuple of {relation.qualified}") from exc
        raise


def _is_truncated(width: int, rows: Sequence[PendingRow]) -> bool:
    """Whether some tuple runs past its payload (only called once the reference has failed, so
    the counts and kinds before the failure are known to be valid)."""
    for payload, start, *_ in rows:
        end = len(payload)
        off = start + 2
        if off > end:
            return True
        for _ in range(width):
            if off >= end:
                return True
            if payload[off] == _T:
                if off + 5 > end:
                    return True
                off += 5 + int.from_bytes(payload[off + 1 : off + 5], "big")
            else:
                off += 1
        if off > end:
            return True
    return False


def _stage_vectorized(width: int, rows: Sequence[PendingRow]) -> tuple[bytes, int]:
    """Stage ``rows`` with numpy; raise _Malformed (or OverflowError) for the reference to
    report."""
    payloads, starts, ops, seqs, lsns, times = zip(*rows, strict=True)
    buf = np.frombuffer(b"".join(payloads), dtype=np.uint8)
    ends = np.cumsum(np.fromiter(map(len, payloads), dtype=np.int64, count=len(payloads)))
    offs = ends - np.fromiter(map(len, payloads), dtype=np.int64, count=len(payloads))
    offs += np.array(starts, dtype=np.int64)
    src, length, unchanged = _walk(buf, offs, ends, width)
    op_codes = np.array(ops, dtype=np.uint8)
    if not np.isin(op_codes, _OPS).all():
        raise _Malformed
    meta = _metadata(width, op_codes, seqs, lsns, times, unchanged)
    out = _gather(buf, meta, src, length)
    union = sum(1 << int(i) for i in np.flatnonzero(unchanged.any(axis=0)))
    return out, union


def _walk(buf: U8, offs: I64, ends: I64, width: int) -> tuple[I64, I64, Bools]:
    """Walk the tuples starting at ``offs`` (each ending by ``ends``) one column at a time;
    return each field's source offset and length in ``buf`` (-1 and 4 for a NULL field, filled
    in by :func:`_gather`) and where the value was an unchanged TOAST, all of shape (rows, width).
    """
    n = len(offs)
    top = len(buf) - 1
    if top < 0:
        raise _Malformed
    bad = offs + 2 > ends
    # Clamped reads: a bad offset reads garbage but never outside buf; `bad` discards the chunk.
    head = buf[np.minimum(offs[:, None] + _KIND_AND_LENGTH[:2], top)].copy()
    bad |= head.view(">u2")[:, 0] != width
    src = np.full((n, width), -1, dtype=np.int64)
    length = np.full((n, width), 4, dtype=np.int64)
    kinds = np.empty((n, width), dtype=np.uint8)
    off = offs + 2
    for i in range(width):
        bad |= off >= ends
        field = buf[np.minimum(off[:, None] + _KIND_AND_LENGTH, top)]
        kind = field[:, 0]
        is_text = kind == _T
        # The length is unsigned, as in the reference: a "negative" one runs past the end.
        value_len = field[:, 1:].copy().view(">u4")[:, 0].astype(np.int64)
        value_len[~is_text] = 0
        src[is_text, i] = off[is_text] + 1
        length[is_text, i] = value_len[is_text] + 4
        kinds[:, i] = kind
        off += np.where(is_text, value_len + 5, 1)
    bad |= off > ends
    bad |= ((kinds != _T) & (kinds != _N) & (kinds != _U)).any(axis=1)
    if bad.any():
        raise _Malformed
    return src, length, kinds == _U


def _metadata(width: int, ops: U8, seqs: Sequence[int], lsns: Sequence[int],
              times: Sequence[int], unchanged: Bools) -> U8:
    """The first bytes of every staged row: field count, then seq, op, LSN, commit time and the
    unchanged mask as binary COPY fields (see :data:`cdcsync.source.tuples.META_COLUMNS`)."""
    layout = np.dtype([("count", ">i2"), ("seq_len", ">i4"), ("seq", ">i8"),
                       ("op_len", ">i4"), ("op", "u1"), ("lsn_len", ">i4"), ("lsn", ">u8"),
                       ("time_len", ">i4"), ("time", ">i8"), ("mask_len", ">i4"),
                       ("mask", "u1", (width,))])
    meta = np.empty(len(ops), dtype=layout)
    meta["count"] = width + 5
    meta["seq_len"] = meta["lsn_len"] = meta["time_len"] = 8
    meta["op_len"] = 1
    meta["mask_len"] = width
    meta["seq"] = np.array(seqs, dtype=np.int64)
    meta["op"] = ops
    meta["lsn"] = np.array(lsns, dtype=np.uint64)
    meta["time"] = np.array(times, dtype=np.int64)
    meta["mask"] = unchanged.view(np.uint8) + ord("0")
    return meta.view(np.uint8)


def _gather(buf: U8, meta: U8, src: I64, length: I64) -> bytes:
    """Concatenate, row by row, the row's metadata block and its fields, with one gather.

    Every output byte is a byte of ``buf``, of ``meta`` or of the NULL constant; each row is
    width + 1 segments (start in that source, length), expanded to per-byte indices with a cumsum:
    the index steps by one inside a segment and jumps at the start of the next."""
    n, width = src.shape
    meta_len = meta.size // n
    source = np.concatenate([buf, meta, np.frombuffer(NULL, dtype=np.uint8)])
    starts = np.empty((n, width + 1), dtype=np.int64)
    starts[:, 0] = len(buf) + meta_len * np.arange(n, dtype=np.int64)
    starts[:, 1:] = np.where(src < 0, len(buf) + meta.size, src)
    lengths = np.empty((n, width + 1), dtype=np.int64)
    lengths[:, 0] = meta_len
    lengths[:, 1:] = length
    starts, lengths = starts.ravel(), lengths.ravel()
    bounds = np.cumsum(lengths)
    step = np.ones(int(bounds[-1]), dtype=np.int64)
    # Every segment is at least 4 bytes long, so no two segments start at the same output byte.
    step[0] = starts[0]
    step[bounds[:-1]] = starts[1:] - (starts[:-1] + lengths[:-1]) + 1
    return source[np.cumsum(step)].tobytes()
