"""wal2json ``format-version 2`` JSON -> typed messages. Pure: no I/O, no state between calls.

:func:`options` names what cdcsync asks of the plugin; :func:`decode` takes one message (one JSON
object per transaction boundary, change, truncated table or logical message) and returns the same
Begin, Commit and LogicalMessage as :mod:`cdcsync.source.pgoutput`, or a :class:`RowChange` or
:class:`TableTruncate`, which name their table instead of pointing at a Relation message.

What wal2json 2.5 (PostgreSQL 15) sends, as observed:

* B and C carry ``lsn`` (the commit record's LSN) and ``nextlsn`` (the commit's end LSN, which is
  also the XLogData position of C): the same positions as pgoutput's Begin and Commit.
* An update omits the TOASTed columns it left unchanged; ``identity`` holds the old replica
  identity (the old key, or the whole old row with REPLICA IDENTITY FULL); a delete has only
  ``identity``. Changes of a table without a key are dropped by the plugin with a server warning.
* A TRUNCATE of several tables is one T message per table, all at the same LSN.
* Numbers (integer, float and numeric types) are bare JSON numbers in the source's text form;
  NaN and infinities arrive as ``null`` (the plugin loses them). bytea loses its ``\\x`` prefix.
* Message content is the raw bytes, which need not be UTF-8.

Values become the source's text representation as bytes, as pgoutput's text columns are. A bare
number is re-read exactly: messages with a numeric column are parsed by the standard library with
floats kept as their text, everything else by orjson, whose floats hold the float4/float8 values
exactly (PostgreSQL prints the shortest text that round-trips, which ``repr`` reproduces).

Guarantee: for any input, :func:`decode` returns a message or raises
:class:`~cdcsync.errors.ProtocolError`.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import orjson

from cdcsync.errors import ProtocolError
from cdcsync.model import Lsn
from cdcsync.source.pgoutput import Begin, Commit, LogicalMessage

BYTEA_OID: Final = 17
_NUMERIC_COLUMN: Final = b'"typeoid":1700,'
_I, _U, _D = ord("I"), ord("U"), ord("D")

Shape = tuple[tuple[str, int], ...]
"""Column names and type OIDs, in the order the message lists them."""


@dataclass(frozen=True, slots=True)
class RowChange:
    """An insert, update or delete (``kind`` is ``ord`` of I, U or D) of ``schema.table``.

    ``shape``/``values`` are the new row (absent for a delete; an update leaves out unchanged
    TOASTed columns); ``identity_shape``/``identity`` the old key or row when sent; ``pk`` the
    primary key's columns as sent (read by :func:`key_names` when a relation is rebuilt)."""

    kind: int
    schema: str
    table: str
    shape: Shape
    values: tuple[bytes | None, ...]
    identity_shape: Shape
    identity: tuple[bytes | None, ...]
    pk: object


@dataclass(frozen=True, slots=True)
class TableTruncate:
    """One table of a TRUNCATE statement; the statement's tables share ``lsn``."""

    lsn: Lsn
    schema: str
    table: str


Message = Begin | Commit | LogicalMessage | RowChange | TableTruncate


def options(patterns: tuple[str, ...]) -> dict[str, str]:
    """START_REPLICATION options for the configured table patterns."""
    chosen = {
        "format-version": "2",
        "include-transaction": "1",
        "include-xids": "1",
        "include-timestamp": "1",
        "include-lsn": "1",
        "include-pk": "1",
        "include-type-oids": "1",
    }
    tables = add_tables(patterns)
    if tables is not None:
        chosen["add-tables"] = tables
    return chosen


def add_tables(patterns: tuple[str, ...]) -> str | None:
    """wal2json's ``add-tables`` filter covering ``patterns``, or None for every table.

    wal2json knows ``*`` only as a whole schema or table name, so a part holding any glob is
    widened to ``*``; the exact selection is still made by cdcsync, as for a publication."""
    entries: list[str] = []
    for pattern in patterns:
        schema, _, table = pattern.partition(".")
        parts = ["*" if any(ch in part for ch in "*?[") else part for part in (schema, table)]
        if parts == ["*", "*"]:
            return None
        entry = ".".join(parts)
        if entry not in entries:
            entries.append(entry)
    return ",".join(entries)


class _Malformed(Exception):
    """Internal: what is wrong with the message."""


def decode(payload: bytes) -> Message:
    """Decode one wal2json message; raise :class:`ProtocolError` if it does not decode."""
    try:
        data = _load(payload)
        if type(data) is not dict:
            raise _Malformed("not a JSON object")
        action = data["action"]
        handler = _HANDLERS.get(action) if type(action) is str else None
        if handler is None:
            raise _Malformed(f"unknown action {action!r:.20}")
        return handler(data)
    except _Malformed as exc:
        raise ProtocolError(f"wal2json message is malformed: {exc}") from None
    except (KeyError, TypeError, ValueError, UnicodeError, RecursionError) as exc:
        raise ProtocolError(f"wal2json message is malformed: {type(exc).__name__}: "
                            f"{str(exc)[:120]}") from None


def _load(payload: bytes) -> Any:
    if _NUMERIC_COLUMN not in payload:
        try:
            return orjson.loads(payload)
        except orjson.JSONDecodeError:
            pass  # not UTF-8 (message content is raw bytes); the exact parser copes
    return json.loads(payload.decode("utf-8", "surrogateescape"), parse_float=str)


def _lsn(value: object) -> Lsn:
    if type(value) is not str:
        raise _Malformed(f"LSN {value!r:.30} is not a string")
    return Lsn.parse(value)


def _time(value: object) -> dt.datetime:
    if type(value) is not str:
        raise _Malformed(f"timestamp {value!r:.40} is not a string")
    stamp = dt.datetime.fromisoformat(value)
    if stamp.tzinfo is None:
        raise _Malformed(f"timestamp {value!r:.40} has no time zone")
    return stamp


def _begin(data: dict[str, Any]) -> Begin:
    xid = data["xid"]
    if type(xid) is not int:
        raise _Malformed(f"xid {xid!r:.30} is not an integer")
    return Begin(_lsn(data["lsn"]), _time(data["timestamp"]), xid)


def _commit(data: dict[str, Any]) -> Commit:
    return Commit(0, _lsn(data["lsn"]), _lsn(data["nextlsn"]), _time(data["timestamp"]))


def _message(data: dict[str, Any]) -> LogicalMessage:
    transactional, prefix, content = data["transactional"], data["prefix"], data["content"]
    if type(transactional) is not bool or type(prefix) is not str or type(content) is not str:
        raise _Malformed("transactional, prefix or content has the wrong type")
    return LogicalMessage(transactional, _lsn(data["lsn"]), prefix,
                          content.encode("utf-8", "surrogateescape"))


def _text(value: object, type_oid: int) -> bytes | None:
    """A JSON value other than a string as the source's text representation."""
    kind = type(value)
    if value is None:
        return None
    if kind is int:
        return str(value).encode()
    if kind is bool:
        return b"t" if value else b"f"
    if kind is float:
        return repr(value).encode()
    if kind is str and type_oid == BYTEA_OID:
        return b"\\x" + str(value).encode()
    raise _Malformed(f"unexpected value {value!r:.40}")


def _columns(items: object) -> tuple[Shape, tuple[bytes | None, ...]]:
    """Names, type OIDs and values; the assembler checks names and OIDs when it meets a new
    shape, so the common case (the shape it already knows) costs one tuple comparison."""
    if type(items) is not list:
        raise _Malformed("columns are not a list")
    shape: list[tuple[str, int]] = []
    values: list[bytes | None] = []
    add_column, add_value = shape.append, values.append
    for column in items:
        type_oid, value = column["typeoid"], column["value"]
        add_column((column["name"], type_oid))
        kind = type(value)
        if kind is str and type_oid != BYTEA_OID:
            add_value(value.encode())
        elif kind is int:
            add_value(str(value).encode())
        else:
            add_value(_text(value, type_oid))
    return tuple(shape), tuple(values)


def check_shape(shape: Shape) -> None:
    """Raise :class:`ProtocolError` unless every column has a string name and an integer OID."""
    for name, type_oid in shape:
        if type(name) is not str or type(type_oid) is not int:
            raise ProtocolError(f"wal2json message is malformed: column {name!r:.40} has no "
                                "name or type OID")


def key_names(change: RowChange) -> set[str]:
    """The primary key's column names; raise :class:`ProtocolError` if ``pk`` is malformed."""
    items = change.pk
    if type(items) is not list or not all(type(i) is dict and type(i.get("name")) is str
                                          for i in items):
        raise ProtocolError("wal2json message is malformed: pk is not a list of named columns")
    return {i["name"] for i in items}


def _table(data: dict[str, Any]) -> tuple[str, str]:
    schema, table = data["schema"], data["table"]
    if type(schema) is not str or type(table) is not str:
        raise _Malformed("schema or table is not a string")
    return schema, table


def _change(kind: int) -> Callable[[dict[str, Any]], RowChange]:
    def decode_change(data: dict[str, Any]) -> RowChange:
        schema, table = _table(data)
        shape, values = _columns(data["columns"]) if kind != _D else ((), ())
        identity_shape, identity = _columns(data["identity"]) if kind == _D or \
            "identity" in data else ((), ())
        return RowChange(kind, schema, table, shape, values, identity_shape, identity,
                         data.get("pk", []))
    return decode_change


def _truncate(data: dict[str, Any]) -> TableTruncate:
    schema, table = _table(data)
    return TableTruncate(_lsn(data["lsn"]), schema, table)


_HANDLERS: Final[dict[str, Callable[[dict[str, Any]], Message]]] = {
    "B": _begin,
    "C": _commit,
    "M": _message,
    "I": _change(_I),
    "U": _change(_U),
    "D": _change(_D),
    "T": _truncate,
}
