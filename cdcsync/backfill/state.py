"""The target's record of copies: each table's state, and the queue of resync requests."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from cdcsync import checkpoint

Conn = psycopg.Connection[TupleRow]
TableStateName = Literal["pending", "copying", "ready", "error"]


@dataclass(frozen=True, slots=True)
class TableState:
    table: str
    state: str
    rows_copied: int
    rows_estimate: int | None
    reason: str | None
    fix: str | None


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    table: str
    where: str | None
    purpose: str
    state: str
    rows_estimate: int | None
    rows_copied: int
    chunks: int
    error: str | None
    finished_at: dt.datetime | None


def register(conn: Conn, slot: str, tables: list[str], state: TableStateName) -> None:
    """Give tables without a state the given one; tables already known keep theirs."""
    conn.execute(_register_query(slot, tables, state))


def _register_query(slot: str, tables: list[str], state: TableStateName) -> sql.Composed:
    return sql.SQL("INSERT INTO cdcsync.table_state (slot, table_name, state) "
                   "SELECT {}, unnest({}::text[]), {} ON CONFLICT DO NOTHING").format(
        slot, tables, state)


def restart(conn: Conn, slot: str) -> None:
    """A new slot: the target holds none of its changes, so every table is to be copied again
    and resyncs queued for the old slot are void."""
    conn.execute("UPDATE cdcsync.table_state SET state = 'pending', rows_copied = 0, "
                 "reason = NULL, fix = NULL, updated_at = now() WHERE slot = %s", (slot,))
    conn.execute("UPDATE cdcsync.resync_requests SET state = 'failed', finished_at = now(), "
                 "error = %s WHERE slot = %s AND state IN ('queued', 'running')",
                 (VOIDED, slot))


def register_and_load(conn: Conn, slot: str, tables: list[str], state: TableStateName
                      ) -> tuple[dict[str, TableState], checkpoint.Checkpoint | None]:
    """:func:`register`, then :func:`load`, and the slot's checkpoint, which the stream starts
    from: one simple query, so in one round trip and one transaction when ``conn`` is in
    autocommit."""
    cur = conn.execute(sql.SQL("{}; {}; {}").format(
        _register_query(slot, tables, state), load_query(slot), checkpoint.load_query(slot)))
    cur.nextset()
    states = from_rows(cur.fetchall())
    cur.nextset()
    return states, checkpoint.from_row(cur.fetchone())


def load_query(slot: str) -> sql.Composed:
    """The query :func:`from_rows` reads, values included (it can travel with others)."""
    return sql.SQL("SELECT table_name, state, rows_copied, rows_estimate, reason, fix "
                   "FROM cdcsync.table_state WHERE slot = {} ORDER BY 1").format(slot)


def from_rows(rows: list[TupleRow]) -> dict[str, TableState]:
    return {str(r[0]): TableState(str(r[0]), str(r[1]), int(r[2]),
                                  int(r[3]) if r[3] is not None else None,
                                  r[4], r[5]) for r in rows}


def load(conn: Conn, slot: str) -> dict[str, TableState]:
    return from_rows(conn.execute(load_query(slot)).fetchall())


def set_state(conn: Conn, slot: str, table: str, state: TableStateName, *,
              rows_copied: int | None = None, rows_estimate: int | None = None,
              reason: str | None = None, fix: str | None = None) -> None:
    conn.execute(
        "INSERT INTO cdcsync.table_state AS s (slot, table_name, state, rows_copied, "
        "rows_estimate, reason, fix) VALUES (%s, %s, %s, coalesce(%s, 0), %s, %s, %s) "
        "ON CONFLICT (slot, table_name) DO UPDATE SET state = excluded.state, "
        "rows_copied = coalesce(%s, s.rows_copied), "
        "rows_estimate = coalesce(excluded.rows_estimate, s.rows_estimate), "
        "reason = excluded.reason, fix = excluded.fix, updated_at = now()",
        (slot, table, state, rows_copied, rows_estimate, reason, fix, rows_copied))


# Why a request queued or running for a slot that was re-created was failed.
VOIDED = "the slot was re-created"
_FAILURES_SHOWN = 20
_REQUEST_COLUMNS = sql.SQL("id, table_name, where_sql, purpose, state, rows_estimate, "
                           "rows_copied, chunks, error, finished_at")


def _request(row: tuple[object, ...]) -> Request:
    return Request(int(str(row[0])), str(row[1]), row[2] if row[2] is None else str(row[2]),
                   str(row[3]), str(row[4]), int(str(row[5])) if row[5] is not None else None,
                   int(str(row[6])), int(str(row[7])), None if row[8] is None else str(row[8]),
                   row[9] if isinstance(row[9], dt.datetime) else None)


def enqueue(conn: Conn, slot: str, table: str, where: str | None, purpose: str) -> int:
    """Queue a resync; a table already queued or running for the same purpose is not queued
    twice (its open request's id is returned)."""
    row = conn.execute(
        "SELECT id FROM cdcsync.resync_requests WHERE slot = %s AND table_name = %s "
        "AND purpose = %s AND where_sql IS NOT DISTINCT FROM %s "
        "AND state IN ('queued', 'running') ORDER BY id LIMIT 1",
        (slot, table, purpose, where)).fetchone()
    if row is not None:
        return int(row[0])
    row = conn.execute("INSERT INTO cdcsync.resync_requests (slot, table_name, where_sql, purpose)"
                       " VALUES (%s, %s, %s, %s) RETURNING id",
                       (slot, table, where, purpose)).fetchone()
    assert row is not None
    return int(row[0])


def claim_next(conn: Conn, slot: str) -> Request | None:
    """The oldest open request of the slot, marked running. A request left running by a process
    that died is claimed again: only the process streaming the slot performs requests."""
    row = conn.execute(sql.SQL(
        "UPDATE cdcsync.resync_requests SET state = 'running', started_at = now(), "
        "rows_copied = 0, chunks = 0 WHERE id = (SELECT id FROM cdcsync.resync_requests "
        "WHERE slot = %s AND state IN ('queued', 'running') ORDER BY id LIMIT 1) "
        "RETURNING {}").format(_REQUEST_COLUMNS), (slot,)).fetchone()
    return _request(row) if row is not None else None


def get(conn: Conn, request_id: int) -> Request | None:
    row = conn.execute(sql.SQL("SELECT {} FROM cdcsync.resync_requests WHERE id = %s").format(
        _REQUEST_COLUMNS), (request_id,)).fetchone()
    return _request(row) if row is not None else None


def estimated(conn: Conn, request_id: int, estimate: int) -> None:
    conn.execute("UPDATE cdcsync.resync_requests SET rows_estimate = %s WHERE id = %s",
                 (estimate, request_id))


def chunk_done(conn: Conn, request_id: int, rows: int) -> None:
    conn.execute("UPDATE cdcsync.resync_requests SET rows_copied = rows_copied + %s, "
                 "chunks = chunks + 1 WHERE id = %s", (rows, request_id))


def finish(conn: Conn, request_id: int, error: str | None) -> None:
    conn.execute("UPDATE cdcsync.resync_requests SET state = %s, error = %s, finished_at = now() "
                 "WHERE id = %s", ("failed" if error else "done", error, request_id))


def unresolved_failures(conn: Conn, slot: str) -> list[Request]:
    """The failed requests no later request of their table has done, newest first: what
    `status` shows until a resync succeeds (voided ones aside: the new slot copies again)."""
    rows = conn.execute(sql.SQL(
        "SELECT {} FROM cdcsync.resync_requests f WHERE slot = %s AND state = 'failed' "
        "AND error IS DISTINCT FROM %s AND NOT EXISTS (SELECT 1 FROM cdcsync.resync_requests d "
        "WHERE d.slot = f.slot AND d.table_name = f.table_name AND d.state = 'done' "
        "AND d.id > f.id) ORDER BY id DESC LIMIT %s").format(_REQUEST_COLUMNS),
        (slot, VOIDED, _FAILURES_SHOWN)).fetchall()
    return [_request(r) for r in rows]


def open_requests(conn: Conn, slot: str) -> list[Request]:
    rows = conn.execute(sql.SQL("SELECT {} FROM cdcsync.resync_requests WHERE slot = %s "
                                "AND state IN ('queued', 'running') ORDER BY id").format(
        _REQUEST_COLUMNS), (slot,)).fetchall()
    return [_request(r) for r in rows]
