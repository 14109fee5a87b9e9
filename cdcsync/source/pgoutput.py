"""pgoutput bytes -> typed messages. Pure: no I/O, no state between calls.

:func:`decode` takes one pgoutput payload (the bytes inside an XLogData message, starting with the
message type byte) and returns one message, laid out as in PostgreSQL's "Logical Replication
Message Formats" for protocol version 1. Versions 2 and 3 use the same layouts while streaming
of in-progress transactions is off; streamed and two-phase messages are refused, because their
layouts depend on stream state a stateless decoder does not have.

Guarantee: for any input, :func:`decode` returns a message or raises
:class:`~cdcsync.errors.ProtocolError` whose text reads well after ``"at LSN x: "``. Trailing bytes
after a complete message are rejected, so a misread layout cannot pass unnoticed.

Column values stay as the source sent them: text (or binary) bytes, ``None`` for NULL, and
:data:`~cdcsync.model.UNCHANGED` for a TOASTed column the source did not resend.
"""

from __future__ import annotations

import datetime as dt
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from cdcsync.errors import ProtocolError
from cdcsync.model import UNCHANGED, Column, Lsn, Relation, Row, Value, pg_time

__all__ = [
    "Begin",
    "Commit",
    "Delete",
    "Insert",
    "LogicalMessage",
    "Message",
    "Origin",
    "Truncate",
    "TypeMsg",
    "Update",
    "decode",
    "options",
]


@dataclass(frozen=True, slots=True)
class Begin:
    """'B': a transaction starts; ``final_lsn`` is the LSN of its commit record."""

    final_lsn: Lsn
    commit_time: dt.datetime
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    """'C': the transaction committed; ``end_lsn`` is the position to checkpoint and confirm."""

    flags: int
    commit_lsn: Lsn
    end_lsn: Lsn
    commit_time: dt.datetime


@dataclass(frozen=True, slots=True)
class Origin:
    """'O': the transaction was replayed from replication origin ``name`` (its LSN there)."""

    lsn: Lsn
    name: str


@dataclass(frozen=True, slots=True)
class TypeMsg:
    """'Y': a user-defined type's name, sent before the first relation that uses it."""

    oid: int
    schema: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    """'I': a new row."""

    relation_oid: int
    new: Row


@dataclass(frozen=True, slots=True)
class Update:
    """'U': a changed row; ``old`` is the key ('K') or full ('O') old tuple when one was sent."""

    relation_oid: int
    old: Row | None
    old_kind: str | None
    new: Row


@dataclass(frozen=True, slots=True)
class Delete:
    """'D': a deleted row, identified by its key ('K') or full ('O') old tuple."""

    relation_oid: int
    old: Row
    old_kind: str


@dataclass(frozen=True, slots=True)
class Truncate:
    """'T': one TRUNCATE statement over one or more relations."""

    relation_oids: tuple[int, ...]
    cascade: bool
    restart_identity: bool


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    """'M': a ``pg_logical_emit_message`` record."""

    transactional: bool
    lsn: Lsn
    prefix: str
    content: bytes


Message = (
    Begin
    | Commit
    | Origin
    | Relation
    | TypeMsg
    | Insert
    | Update
    | Delete
    | Truncate
    | LogicalMessage
)


class _Malformed(Exception):
    """Internal: what is wrong with the message; :func:`decode` adds the message name."""


_U8: Final = struct.Struct(">B")
_U16: Final = struct.Struct(">H")
_U32: Final = struct.Struct(">I")
_U64: Final = struct.Struct(">Q")
_BEGIN: Final = struct.Struct(">QqI")  # final LSN, commit time, xid
_COMMIT: Final = struct.Struct(">BQQq")  # flags, commit LSN, end LSN, commit time
_OID_KIND_NCOLS: Final = struct.Struct(">IBH")  # relation OID, tuple kind byte, column count
_KIND_NCOLS: Final = struct.Struct(">BH")
_COLUMN_TAIL: Final = struct.Struct(">Ii")  # type OID, type modifier
_TRUNCATE: Final = struct.Struct(">IB")  # relation count, option bits
_MESSAGE: Final = struct.Struct(">BQ")  # flags, LSN

_N: Final = ord("N")
_K: Final = ord("K")
_O: Final = ord("O")

_STREAMING: Final = frozenset(b"SEcA")
_TWO_PHASE: Final = frozenset(b"bPKrp")


def _string(buf: bytes, pos: int) -> tuple[str, int]:
    """A NUL-terminated UTF-8 string at ``pos``; returns it and the position after the NUL."""
    end = buf.find(b"\0", pos)
    if end < 0:
        raise _Malformed(f"string at offset {pos} has no NUL terminator")
    try:
        return buf[pos:end].decode(), end + 1
    except UnicodeDecodeError as exc:
        raise _Malformed(f"string at offset {pos} is not valid UTF-8") from exc


def _tuple(buf: bytes, pos: int, ncols: int) -> tuple[Row, int]:
    """TupleData's ``ncols`` columns starting at ``pos`` (just after the column count)."""
    # Hot path: one iteration per column, kind bytes as literals ('t' 116, 'b' 98, 'n' 110,
    # 'u' 117), the end of the buffer found by IndexError rather than a test per column.
    size = len(buf)
    unpack_len = _U32.unpack_from
    values: list[Value] = []
    append = values.append
    try:
        for _ in range(ncols):
            kind = buf[pos]
            if kind == 116 or kind == 98:  # noqa: PLR1714
                (length,) = unpack_len(buf, pos + 1)
                pos += 5
                end = pos + length
                if end > size:
                    raise _Malformed(
                        f"column {len(values) + 1} claims {length} bytes, only {size - pos} remain"
                    )
                append(buf[pos:end])
                pos = end
            elif kind == 110:
                append(None)
                pos += 1
            elif kind == 117:
                append(UNCHANGED)
                pos += 1
            else:
                raise _Malformed(f"column {len(values) + 1} has unknown kind byte {kind:#04x}")
    except IndexError:
        raise _Malformed(f"tuple ends after {len(values)} of {ncols} columns") from None
    return tuple(values), pos


def _time(micros: int) -> dt.datetime:
    try:
        return pg_time(micros)
    except OverflowError as exc:
        raise _Malformed(f"timestamp {micros} is out of range") from exc


def _begin(buf: bytes) -> tuple[Begin, int]:
    final_lsn, micros, xid = _BEGIN.unpack_from(buf, 1)
    return Begin(Lsn(final_lsn), _time(micros), xid), 1 + _BEGIN.size


def _commit(buf: bytes) -> tuple[Commit, int]:
    flags, commit_lsn, end_lsn, micros = _COMMIT.unpack_from(buf, 1)
    return Commit(flags, Lsn(commit_lsn), Lsn(end_lsn), _time(micros)), 1 + _COMMIT.size


def _origin(buf: bytes) -> tuple[Origin, int]:
    (lsn,) = _U64.unpack_from(buf, 1)
    name, pos = _string(buf, 9)
    return Origin(Lsn(lsn), name), pos


def _namespace(name: str) -> str:
    # pgoutput sends an empty namespace for pg_catalog.
    return name or "pg_catalog"


def _relation(buf: bytes) -> tuple[Relation, int]:
    (oid,) = _U32.unpack_from(buf, 1)
    schema, pos = _string(buf, 5)
    name, pos = _string(buf, pos)
    identity, ncols = _KIND_NCOLS.unpack_from(buf, pos)
    pos += _KIND_NCOLS.size
    columns = []
    for _ in range(ncols):
        (flags,) = _U8.unpack_from(buf, pos)
        col_name, pos = _string(buf, pos + 1)
        type_oid, typmod = _COLUMN_TAIL.unpack_from(buf, pos)
        pos += _COLUMN_TAIL.size
        columns.append(Column(col_name, type_oid, typmod, bool(flags & 1)))
    if identity not in b"dnfi":
        raise _Malformed(f"unknown replica identity {identity:#04x}")
    rel = Relation(oid, _namespace(schema), name, chr(identity), tuple(columns))
    return rel, pos


def _type(buf: bytes) -> tuple[TypeMsg, int]:
    (oid,) = _U32.unpack_from(buf, 1)
    schema, pos = _string(buf, 5)
    name, pos = _string(buf, pos)
    return TypeMsg(oid, _namespace(schema), name), pos


def _insert(buf: bytes) -> tuple[Insert, int]:
    oid, kind, ncols = _OID_KIND_NCOLS.unpack_from(buf, 1)
    if kind != _N:
        raise _Malformed(f"expected 'N' before the new tuple, got {kind:#04x}")
    new, pos = _tuple(buf, 1 + _OID_KIND_NCOLS.size, ncols)
    return Insert(oid, new), pos


def _update(buf: bytes) -> tuple[Update, int]:
    oid, kind, ncols = _OID_KIND_NCOLS.unpack_from(buf, 1)
    pos = 1 + _OID_KIND_NCOLS.size
    old: Row | None = None
    old_kind: str | None = None
    if kind in (_K, _O):
        old_kind = chr(kind)
        old, pos = _tuple(buf, pos, ncols)
        kind, ncols = _KIND_NCOLS.unpack_from(buf, pos)
        pos += _KIND_NCOLS.size
    if kind != _N:
        raise _Malformed(f"expected 'K', 'O' or 'N' tuple, got {kind:#04x}")
    new, pos = _tuple(buf, pos, ncols)
    return Update(oid, old, old_kind, new), pos


def _delete(buf: bytes) -> tuple[Delete, int]:
    oid, kind, ncols = _OID_KIND_NCOLS.unpack_from(buf, 1)
    if kind not in (_K, _O):
        raise _Malformed(f"expected 'K' or 'O' before the old tuple, got {kind:#04x}")
    old, pos = _tuple(buf, 1 + _OID_KIND_NCOLS.size, ncols)
    return Delete(oid, old, chr(kind)), pos


def _truncate(buf: bytes) -> tuple[Truncate, int]:
    count, options = _TRUNCATE.unpack_from(buf, 1)
    pos = 1 + _TRUNCATE.size
    if pos + 4 * count > len(buf):
        raise _Malformed(f"{count} relation OIDs do not fit in {len(buf) - pos} bytes")
    oids = struct.unpack_from(f">{count}I", buf, pos)
    return Truncate(oids, bool(options & 1), bool(options & 2)), pos + 4 * count


def _message(buf: bytes) -> tuple[LogicalMessage, int]:
    flags, lsn = _MESSAGE.unpack_from(buf, 1)
    prefix, pos = _string(buf, 1 + _MESSAGE.size)
    (length,) = _U32.unpack_from(buf, pos)
    pos += 4
    end = pos + length
    if end > len(buf):
        raise _Malformed(f"content claims {length} bytes, only {len(buf) - pos} remain")
    return LogicalMessage(bool(flags & 1), Lsn(lsn), prefix, buf[pos:end]), end


_Decoder = Callable[[bytes], tuple[Message, int]]

_DECODERS: Final[dict[int, tuple[str, _Decoder]]] = {
    ord("B"): ("Begin", _begin),
    ord("C"): ("Commit", _commit),
    ord("O"): ("Origin", _origin),
    ord("R"): ("Relation", _relation),
    ord("Y"): ("Type", _type),
    ord("I"): ("Insert", _insert),
    ord("U"): ("Update", _update),
    ord("D"): ("Delete", _delete),
    ord("T"): ("Truncate", _truncate),
    ord("M"): ("Message", _message),
}


def decode(data: bytes | memoryview) -> Message:
    """Decode one pgoutput message; raise :class:`ProtocolError` if it does not decode."""
    buf = data if type(data) is bytes else bytes(data)
    if not buf:
        raise ProtocolError("empty pgoutput message")
    entry = _DECODERS.get(buf[0])
    if entry is None:
        raise ProtocolError(_unsupported(buf[0]))
    what, decoder = entry
    try:
        message, end = decoder(buf)
    except struct.error:
        raise ProtocolError(f"pgoutput {what} message is truncated ({len(buf)} bytes)") from None
    except _Malformed as exc:
        raise ProtocolError(f"pgoutput {what} message is malformed: {exc}") from None
    if end != len(buf):
        raise ProtocolError(
            f"pgoutput {what} message has {len(buf) - end} unexpected trailing bytes"
        )
    return message


def _unsupported(kind: int) -> str:
    label = repr(chr(kind)) if 0x20 < kind < 0x7F else f"{kind:#04x}"
    if kind in _STREAMING:
        return (
            f"pgoutput message type {label} belongs to a streamed transaction; "
            "streaming is not supported (start replication without streaming 'on')"
        )
    if kind in _TWO_PHASE:
        return (
            f"pgoutput message type {label} is a two-phase commit message; "
            "two_phase is not supported"
        )
    return f"unknown pgoutput message type {label}"


def options(publication: str, *, binary: bool = False) -> dict[str, str]:
    """START_REPLICATION options asking for ``publication``'s changes in protocol version 1,
    logical messages included; with ``binary``, values in their binary form."""
    chosen = {"proto_version": "1", "publication_names": f'"{publication}"', "messages": "true"}
    if binary:
        chosen["binary"] = "true"
    return chosen
