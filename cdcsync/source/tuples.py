"""Row changes -> binary COPY rows for the target's staging tables. Pure, and hot.

Two row sources share one staged layout: pgoutput messages (:func:`stage_rows`, straight from the
payload bytes) and rows already split into values (:func:`stage_values`, for wal2json).

A pgoutput text column is a kind byte followed by a 4-byte length and the text; a binary COPY
field of a ``text`` column is that same length and text. Converting a row is therefore dropping one
byte per column, and no value is ever parsed in Python: the target's input functions do it. In
pgoutput's binary mode a column is a kind byte, a length and the type's binary form: the binary
COPY field of a column of that type, so staging it is the same byte dropped (the staging table
then has the source's types, see :data:`BINARY_TYPES`).

Every staged row starts with the columns of :data:`META_COLUMNS`, followed by the relation's
columns in order: a sequence number (bigint), the operation (text), the commit LSN (pg_lsn) and
commit time (timestamptz) in their binary forms, and a mask with one character per column, '1'
where the source left a TOASTed value unchanged (text). The
operation is I, U or D, or M for the old key of an update that changed the key: a delete whose
row still holds the values the update left unchanged.
"""

from __future__ import annotations

import importlib
import struct
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Final

from cdcsync.errors import ProtocolError
from cdcsync.model import Relation, Value

# Whether this module runs compiled (mypyc builds it into a shared object): the text COPY rows
# of text_rows cost about 1 µs a row compiled and 13 µs as Python, where a COPY straight into
# the target saves the target about 3.5 µs a row.
COMPILED: Final = not __file__.endswith(".py")
META_COLUMNS: Final = ("_cdcsync_seq", "_cdcsync_op", "_cdcsync_lsn", "_cdcsync_commit_time",
                       "_cdcsync_unchanged")
NULL: Final = b"\xff\xff\xff\xff"
COPY_HEADER: Final = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
COPY_TRAILER: Final = struct.pack(">h", -1)

_I16: Final = struct.Struct(">h")
_I32: Final = struct.Struct(">i")
# Field count, then the sequence number, operation, LSN and commit time fields.
_META: Final = struct.Struct(">h" "iq" "iB" "iQ" "iq")
# The same split where _stage_rows writes it: what precedes the sequence number, the number,
# and what follows it, which is the same for every row of one operation in a transaction.
_META_HEAD: Final = struct.Struct(">hi")
_SEQ: Final = struct.Struct(">q")
_META_TAIL: Final = struct.Struct(">iB" "iQ" "iq")
_T: Final = ord("t")
_B: Final = ord("b")
_N: Final = ord("n")
_U: Final = ord("u")
_BACKSLASH: Final = ord("\\")
_TAB: Final = ord("\t")
_LF: Final = ord("\n")
_CR: Final = ord("\r")
_TAB_BYTE: Final = b"\t"
_LF_BYTE: Final = b"\n"
_CR_BYTE: Final = b"\r"
_BACKSLASH_BYTE: Final = b"\\"
_ESCAPES: Final = {_BACKSLASH: b"\\\\", _TAB: b"\\t", _LF: b"\\n", _CR: b"\\r"}


def text_field(value: bytes) -> bytes:
    return _I32.pack(len(value)) + value


# Built-in types (OIDs, equal on every server) whose binary form holds no OID and no setting of
# the server, and their arrays (whose binary form names the element type, built in too): only
# relations whose every column has one of them are streamed in binary. Enums, domains,
# composites and other user-defined types carry OIDs that differ between databases.
BINARY_TYPES: Final = frozenset({
    16, 17, 18, 19, 20, 21, 23, 25, 26, 114, 650, 700, 701, 829, 869, 1042, 1043, 1082, 1083,
    1114, 1184, 1186, 1266, 1700, 2950, 3802,
    1000, 1001, 1002, 1003, 1005, 1007, 1009, 1014, 1015, 1016, 1021, 1022, 1028, 199, 651,
    1040, 1041, 1115, 1182, 1183, 1185, 1187, 1231, 1270, 2951, 3807,
})

# Where the tuple of an Insert message starts: after "I", the relation's OID and "N".
INSERT_TUPLE: Final = 6

PendingRow = tuple[bytes, int, int, int, int, int]
"""One row change as the reader keeps it until its chunk is staged: the message payload, the
offset of the tuple in it, the operation (``ord`` of I, U, D or M), the sequence number, and the
transaction's commit LSN and commit time (microseconds since 2000-01-01 UTC)."""


StageRows = Callable[[Sequence[PendingRow], int], tuple[bytes, int] | None]


def staged_extension() -> ModuleType | None:
    """``cdcsync.source._staged`` (see ``cdcsync/source/_staged.c``), or None where the
    extension is not compiled (a pure-Python install)."""
    try:
        return importlib.import_module("cdcsync.source._staged")
    except ImportError:
        return None


_STAGED: Final = staged_extension()
_STAGE_ROWS: Final[StageRows | None] = None if _STAGED is None else _STAGED.stage_rows


def stage_rows(relation: Relation, rows: Sequence[PendingRow]) -> tuple[bytes, int]:
    """Convert ``rows`` into concatenated binary COPY rows for the relation's staging table;
    also return the union of their unchanged-TOAST masks (bit i: column i)."""
    if _STAGE_ROWS is not None:
        staged = _STAGE_ROWS(rows, len(relation.columns))
        if staged is not None:
            return staged
    try:
        return _stage_rows(relation, rows)
    except (IndexError, struct.error) as exc:
        raise ProtocolError(f"truncated tuple of {relation.qualified} ({exc})") from None


def _stage_rows(relation: Relation, rows: Sequence[PendingRow]) -> tuple[bytes, int]:
    # The reference for _staged.c's stage_rows, which does the same in C: this one runs without
    # the extension, and where a row is malformed, to say what is wrong with it. Compiled by
    # mypyc (see setup.py): lengths are read with byte shifts, which compile
    # to native operations where a struct call stays a Python call (2x the time of the whole
    # loop); the row is appended to one growing bytearray field by field (a list of small bytes
    # joined at the end costs 40% more); the rare row with TOAST marks has its mask field
    # overwritten in place (same length).
    width = len(relation.columns)
    head = _META_HEAD.pack(width + 5, 8)
    zero_mask = text_field(b"0" * width)
    out = bytearray()
    pack_seq = _SEQ.pack
    # One struct call of nine values per row cost a fifth of this loop; the tail after the
    # sequence number is packed once per operation and transaction instead.
    tails: dict[int, bytes] = {}
    tails_of = (-1, -1)
    text, binary, null, unchanged = _T, _B, _N, _U
    union = 0
    for payload, start, op, seq, lsn, commit_time in rows:
        if payload[start] << 8 | payload[start + 1] != width:
            raise _width_error(relation, payload, start)
        if tails_of != (lsn, commit_time):
            tails = {}
            tails_of = (lsn, commit_time)
        tail = tails.get(op)
        if tail is None:
            tail = tails[op] = _META_TAIL.pack(1, op, 8, lsn, 8, commit_time)
        out += head
        out += pack_seq(seq)
        out += tail
        mask_at = len(out) + 4
        out += zero_mask
        off = start + 2
        mask = 0
        for i in range(width):
            kind = payload[off]
            if kind in (text, binary):
                end = off + 5 + (payload[off + 1] << 24 | payload[off + 2] << 16
                                 | payload[off + 3] << 8 | payload[off + 4])
                out += payload[off + 1 : end]
                off = end
            elif kind == null:
                out += NULL
                off += 1
            elif kind == unchanged:
                out += NULL
                mask |= 1 << i
                off += 1
            else:
                raise ProtocolError(f"unexpected column kind {chr(kind)!r} in a tuple of "
                                    f"{relation.qualified}")
        if off > len(payload):
            raise ProtocolError(f"truncated tuple of {relation.qualified}")
        if mask:
            out[mask_at : mask_at + width] = _mask_text(mask, width)
            union |= mask
    return bytes(out), union


ValueRow = tuple[Sequence[Value], int, int, int, int]
"""One row change split into values (see :mod:`cdcsync.model`): the values in the relation's
column order, the operation, the sequence number, the commit LSN and commit time."""


def stage_values(relation: Relation, rows: Sequence[ValueRow]) -> tuple[bytes, int]:
    """:func:`stage_rows` for rows already split into values."""
    width = len(relation.columns)
    fields = width + 5
    zero_mask = text_field(b"0" * width)
    out = bytearray()
    pack_meta = _META.pack
    pack_length = _I32.pack
    union = 0
    for values, op, seq, lsn, commit_time in rows:
        if len(values) != width:
            raise ProtocolError(f"row of {relation.qualified} has {len(values)} values, "
                                f"its relation {width} columns")
        out += pack_meta(fields, 8, seq, 1, op, 8, lsn, 8, commit_time)
        mask_at = len(out) + 4
        out += zero_mask
        mask = 0
        for i, value in enumerate(values):
            if type(value) is bytes:
                out += pack_length(len(value))
                out += value
            elif value is None:
                out += NULL
            else:
                out += NULL
                mask |= 1 << i
        if mask:
            out[mask_at : mask_at + width] = _mask_text(mask, width)
            union |= mask
    return bytes(out), union


def text_rows(chunks: Sequence[bytes], width: int, positions: Sequence[int]) -> bytes:
    """The staged rows in ``chunks`` (of a relation of ``width`` columns, none marked unchanged)
    as text COPY rows of the columns at ``positions`` (ascending): what a COPY straight into the
    target table takes, which spares the target the staging table and the cast of every value.

    Values are the source's text output already, so only COPY's delimiters and backslash are
    escaped; NULL is ``\\N``. Valid where the client encoding never uses those bytes inside a
    multibyte character (UTF-8 and the single-byte encodings)."""
    wanted = _wanted(width, positions)
    out = bytearray()
    for chunk in chunks:
        start = len(out)
        rows, nulls = _text_chunk(out, chunk, width, wanted, escape=False)
        if not _unescaped_is_right(out, start, rows, len(positions), nulls):
            del out[start:]
            _text_chunk(out, chunk, width, wanted, escape=True)
    return bytes(out)


def payload_text_rows(relation: Relation, payloads: Sequence[bytes],
                      positions: Sequence[int]) -> bytes:
    """:func:`text_rows` of inserts still in their pgoutput messages (``payloads``), which the
    reader converts without staging them first (see TableRows.text)."""
    width = len(relation.columns)
    wanted = _wanted(width, positions)
    out = bytearray()
    try:
        count, nulls = _text_payloads(out, relation, payloads, wanted, escape=False)
        if not _unescaped_is_right(out, 0, count, len(positions), nulls):
            out = bytearray()
            _text_payloads(out, relation, payloads, wanted, escape=True)
    except (IndexError, struct.error) as exc:
        raise ProtocolError(f"truncated tuple of {relation.qualified} ({exc})") from None
    return bytes(out)


def payload_binary_rows(relation: Relation, payloads: Sequence[bytes],
                        positions: Sequence[int]) -> bytes:
    """Binary COPY rows (no header) of the columns at ``positions`` of inserts still in their
    pgoutput messages (``payloads``), in binary mode: each field is the message's own, its kind
    byte dropped."""
    try:
        return _binary_payloads(relation, payloads, _wanted(len(relation.columns), positions),
                                len(positions))
    except (IndexError, struct.error) as exc:
        raise ProtocolError(f"truncated tuple of {relation.qualified} ({exc})") from None


def _binary_payloads(relation: Relation, payloads: Sequence[bytes], wanted: bytes,
                     fields: int) -> bytes:
    # The walk of _text_payloads, written out again: a walker shared by both, calling back per
    # field, would cost a call per value in the reader's hottest loop.
    width = len(relation.columns)
    head = _I16.pack(fields)
    binary, null = _B, _N
    start = INSERT_TUPLE
    out = bytearray()
    for payload in payloads:
        if payload[start] << 8 | payload[start + 1] != width:
            raise _width_error(relation, payload, start)
        off = start + 2
        out += head
        for i in range(width):
            kind = payload[off]
            if kind == binary:
                end = off + 5 + (payload[off + 1] << 24 | payload[off + 2] << 16
                                 | payload[off + 3] << 8 | payload[off + 4])
                if wanted[i]:
                    out += payload[off + 1 : end]
                off = end
            elif kind == null:
                if wanted[i]:
                    out += NULL
                off += 1
            else:
                raise ProtocolError(f"unexpected column kind {chr(kind)!r} in an insert into "
                                    f"{relation.qualified}")
        if off > len(payload):
            raise ProtocolError(f"truncated tuple of {relation.qualified}")
    return bytes(out)


def _wanted(width: int, positions: Sequence[int]) -> bytes:
    """A flag per column: 1 where it is among ``positions``. As bytes, as compiled indexing of
    bytes is native where that of a bytearray boxes the index and the value."""
    wanted = bytearray(width)
    for position in positions:
        wanted[position] = 1
    return bytes(wanted)


def _unescaped_is_right(out: bytearray, start: int, rows: int, fields: int, nulls: int) -> bool:
    # Values rarely hold a delimiter or a backslash, so rows are first written with values as
    # they are. Then they hold exactly one tab between fields, one newline per row, no CR, and a
    # backslash only in each NULL's \\N: counted by C scans of the output, that proves no value
    # needed escaping; otherwise the rows are written again, escaping byte by byte.
    return (out.count(_TAB_BYTE, start) == rows * (fields - 1)
            and out.count(_LF_BYTE, start) == rows and out.find(_CR_BYTE, start) < 0
            and out.count(_BACKSLASH_BYTE, start) == nulls)


def _text_chunk(out: bytearray, chunk: bytes, width: int, wanted: bytes, *,
                escape: bool) -> tuple[int, int]:
    """Append the staged rows of ``chunk`` to ``out``; count its rows and NULLs."""
    meta = _META.size + 4 + width
    off = 0
    size = len(chunk)
    rows = nulls = 0
    while off < size:
        off += meta
        for i in range(width):
            length = (chunk[off] << 24 | chunk[off + 1] << 16 | chunk[off + 2] << 8
                      | chunk[off + 3])
            off += 4
            if length == 0xFFFFFFFF:
                if wanted[i]:
                    out += b"\\N\t"
                    nulls += 1
                continue
            end = off + length
            if wanted[i]:
                _put_value(out, chunk, off, end, escape)
            off = end
        out[-1] = _LF  # the row's last tab
        rows += 1
    if off != size:
        raise ProtocolError("a staged row runs past the end of its chunk")
    return rows, nulls


def _text_payloads(out: bytearray, relation: Relation, payloads: Sequence[bytes],
                   wanted: bytes, *, escape: bool) -> tuple[int, int]:
    """Append the tuples of the Insert messages ``payloads`` to ``out``; count the rows and
    NULLs."""
    width = len(relation.columns)
    text, null = _T, _N
    start = INSERT_TUPLE
    nulls = 0
    for payload in payloads:
        if payload[start] << 8 | payload[start + 1] != width:
            raise _width_error(relation, payload, start)
        off = start + 2
        for i in range(width):
            kind = payload[off]
            if kind == text:
                end = off + 5 + (payload[off + 1] << 24 | payload[off + 2] << 16
                                 | payload[off + 3] << 8 | payload[off + 4])
                if wanted[i]:
                    _put_value(out, payload, off + 5, end, escape)
                off = end
            elif kind == null:
                if wanted[i]:
                    out += b"\\N\t"
                    nulls += 1
                off += 1
            else:
                raise ProtocolError(f"unexpected column kind {chr(kind)!r} in an insert into "
                                    f"{relation.qualified}")
        if off > len(payload):
            raise ProtocolError(f"truncated tuple of {relation.qualified}")
        out[-1] = _LF
    return len(payloads), nulls


def _put_value(out: bytearray, buf: bytes, off: int, end: int, escape: bool) -> None:
    """Append ``buf[off:end]`` and a tab; with ``escape``, COPY's delimiters and backslash in it
    escaped."""
    run = off
    if escape:
        # Most values hold none of the four bytes: a native scan, then one slice.
        for j in range(off, end):
            c = buf[j]
            if (c <= _CR or c == _BACKSLASH) and c in (_BACKSLASH, _TAB, _LF, _CR):
                out += buf[run:j]
                out += _ESCAPES[c]
                run = j + 1
    out += buf[run:end]
    out += b"\t"


def _width_error(relation: Relation, payload: bytes, start: int) -> ProtocolError:
    return ProtocolError(f"tuple of {relation.qualified} has "
                         f"{_I16.unpack_from(payload, start)[0]} columns, "
                         f"its Relation message {len(relation.columns)}")


def _mask_text(mask: int, width: int) -> bytes:
    return "".join("1" if mask >> i & 1 else "0" for i in range(width)).encode()


def key_of(buf: bytes, off: int, key: tuple[int, ...]) -> bytes:
    """The ``key`` columns of the tuple at ``buf[off]``, their raw fields side by side: equal
    exactly when the keys are, since every field carries its kind and length."""
    off += 2
    if len(key) == 1:
        # Every row of a batch passes here: a one-column key is one slice, with no search.
        for _ in range(key[0]):
            off = _field_end(buf, off)
        return buf[off : _field_end(buf, off)]
    found = b""
    for i in range(max(key) + 1):
        end = _field_end(buf, off)
        if i in key:
            found += buf[off:end]
        off = end
    return found


def _field_end(buf: bytes, off: int) -> int:
    if buf[off] in (_T, _B):
        return off + 5 + (buf[off + 1] << 24 | buf[off + 2] << 16 | buf[off + 3] << 8
                          | buf[off + 4])
    return off + 1
