"""pgoutput messages (protocol version 1, values in text) built for tests that feed the reader's
assembler without a source server."""

from __future__ import annotations

import struct

# 2026-01-01 as pgoutput's microseconds since 2000-01-01.
MICROS = 820_000_000_000_000

_INT4, _TEXT, _TIMESTAMPTZ = 23, 25, 1184


def relation(oid: int, schema: bytes, name: bytes,
             columns: tuple[tuple[int, bytes, int], ...]) -> bytes:
    """A Relation message; ``columns`` are (1 if part of the key, name, type OID)."""
    return (b"R" + struct.pack(">I", oid) + schema + b"\0" + name + b"\0d"
            + struct.pack(">h", len(columns))
            + b"".join(struct.pack(">b", flag) + column + b"\0" + struct.pack(">Ii", type_oid, -1)
                       for flag, column, type_oid in columns))


def docs_relation(oid: int = 1) -> bytes:
    """``public.docs (id int PRIMARY KEY, status text, body text, updated_at timestamptz)``."""
    return relation(oid, b"public", b"docs", ((1, b"id", _INT4), (0, b"status", _TEXT),
                                              (0, b"body", _TEXT),
                                              (0, b"updated_at", _TIMESTAMPTZ)))


def _tuple(values: tuple[bytes | None, ...]) -> bytes:
    return struct.pack(">h", len(values)) + b"".join(
        b"n" if v is None else b"t" + struct.pack(">i", len(v)) + v for v in values)


def docs_row(kind: bytes, key: int, status: bytes, oid: int = 1) -> bytes:
    """An Insert (``kind`` b"I") or Update (b"U", no old tuple) of a docs row."""
    return kind + struct.pack(">I", oid) + b"N" + _tuple(
        (str(key).encode(), status, b"body", b"2026-01-01 00:00:00+00"))


def docs_delete(key: int, oid: int = 1) -> bytes:
    return b"D" + struct.pack(">I", oid) + b"K" + _tuple((str(key).encode(), None, None, None))


def begin(final_lsn: int, xid: int) -> bytes:
    return b"B" + struct.pack(">qqI", final_lsn, MICROS, xid)


def commit(lsn: int, end_lsn: int) -> bytes:
    return b"C" + struct.pack(">bqqq", 0, lsn, end_lsn, MICROS)
