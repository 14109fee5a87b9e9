"""The walsender streaming each slot for the holder of the slot's lock, recorded on the target.

The lock makes one process at a time the slot's rightful consumer; the source knows nothing of it.
A process that lost the lock (its host vanished or was cut off with data in flight) can leave its
walsender holding the slot until ``wal_sender_timeout``, and the next holder may end that
walsender. It may not end any other: a second consumer of the slot (another tool, or a cdcsync
deployment syncing a different target under the same slot name) streams for no one this target's
lock knows of. So each stream's walsender is recorded in ``cdcsync.streams``, in the same
transaction as the stream's first checkpoint, and only the recorded one is ended.
"""

from __future__ import annotations

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from cdcsync.dsn import application_name

Conn = psycopg.Connection[TupleRow]

_RECORD = """
INSERT INTO cdcsync.streams AS s (slot, walsender, process, recorded_at)
VALUES ({slot}, {walsender}, {process}, now())
ON CONFLICT (slot) DO UPDATE SET
    walsender = excluded.walsender, process = excluded.process, recorded_at = now()
"""


def record_statement(slot: str, walsender: int) -> sql.Composed:
    """The statement naming ``walsender`` the stream of ``slot``, for the stream's first commit."""
    return sql.SQL(_RECORD).format(slot=sql.Literal(slot), walsender=sql.Literal(walsender),
                                   process=sql.Literal(application_name()))


def recorded_query(slot: str) -> sql.Composed:
    """The query :func:`from_rows` reads, values included (it can travel with others)."""
    return sql.SQL("SELECT walsender FROM cdcsync.streams WHERE slot = {}").format(
        sql.Literal(slot))


def from_rows(rows: list[TupleRow]) -> int | None:
    return int(rows[0][0]) if rows else None


def recorded(conn: Conn, slot: str) -> int | None:
    """The walsender the last stream of ``slot`` that committed on this target recorded."""
    return from_rows(conn.execute(recorded_query(slot)).fetchall())
