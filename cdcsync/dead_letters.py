"""``cdcsync dead-letters``: list, retry and discard the changes the target rejected.

A retry goes through the applier exactly as the stream does: the dead letters become staged rows
(rebuilt as the pgoutput tuples they came from), merged with the usual conflict rule, in the order
they were recorded. Applied ones are deleted in the same target transaction; one the target still
rejects is recorded again with its new error, so nothing is lost either way.
"""

from __future__ import annotations

import datetime as dt
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from cdcsync.apply import tables
from cdcsync.apply.applier import Applier
from cdcsync.config import Settings
from cdcsync.errors import CdcsyncError
from cdcsync.model import (
    PG_EPOCH,
    ChangeChunk,
    Column,
    Lsn,
    Relation,
    TableRows,
    TxnEnd,
)
from cdcsync.source.tuples import PendingRow, stage_rows

Conn = psycopg.Connection[TupleRow]

_OPS = {"insert": ord("I"), "update": ord("U"), "delete": ord("D")}
_TEXT_OID = 25
_MICROSECOND = dt.timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    recorded_at: dt.datetime
    table: str
    key: dict[str, Any]
    operation: str
    row: dict[str, str | None]
    error: str
    lsn: Lsn
    commit_time: dt.datetime

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "recorded_at": self.recorded_at.isoformat(), "table": self.table,
                "key": self.key, "operation": self.operation, "row": self.row,
                "error": self.error, "lsn": str(self.lsn),
                "commit_time": self.commit_time.isoformat()}


_SELECT = sql.SQL("SELECT id, recorded_at, table_name, key, operation, row_data, error, "
                  "source_lsn::text, commit_time FROM cdcsync.dead_letters")


def _where(ids: Sequence[int], table: str | None) -> sql.Composed:
    clauses: list[sql.Composable] = [sql.SQL("true")]
    if ids:
        clauses.append(sql.SQL("id = ANY({})").format(sql.Literal(list(ids))))
    if table:
        clauses.append(sql.SQL("table_name = {}").format(sql.Literal(table)))
    return sql.SQL(" WHERE ") + sql.SQL(" AND ").join(clauses)


def fetch(conn: Conn, ids: Sequence[int] = (), table: str | None = None, *,
          lock: bool = False) -> list[DeadLetter]:
    """Dead letters in the order they were recorded, all of them or those selected."""
    query = _SELECT + _where(ids, table) + sql.SQL(" ORDER BY id FOR UPDATE" if lock
                                                    else " ORDER BY id")
    return [DeadLetter(int(r[0]), r[1], str(r[2]), r[3], str(r[4]), r[5], str(r[6]),
                       Lsn.parse(str(r[7])), r[8])
            for r in conn.execute(query).fetchall()]


def discard(conn: Conn, ids: Sequence[int], *, everything: bool) -> int:
    """Delete the given dead letters (or all of them); return how many went."""
    _require_selection(ids, everything)
    statement = sql.SQL("DELETE FROM cdcsync.dead_letters") + _where(ids, None)
    return conn.execute(statement).rowcount


@dataclass(frozen=True, slots=True)
class RetryOutcome:
    retried: int
    failed_again: int


def retry(conn: Conn, settings: Settings, ids: Sequence[int], *,
          everything: bool) -> RetryOutcome:
    """Apply the selected dead letters in one target transaction (``conn`` not autocommit)."""
    _require_selection(ids, everything)
    letters = fetch(conn, ids, lock=True)
    if not letters:
        conn.rollback()
        return RetryOutcome(0, 0)
    # A change rejected again is set aside again, never halting the retry of the others.
    retrying = settings.model_copy(
        update={"apply": settings.apply.model_copy(update={"on_error": "dead_letter"})})
    applier = Applier(conn, retrying)
    applier.start()
    applier.add(_chunk(conn, settings, letters))
    last = letters[-1]
    applier.end(TxnEnd(max(letter.lsn for letter in letters), last.commit_time))
    conn.execute("DELETE FROM cdcsync.dead_letters WHERE id = ANY(%s)",
                 ([letter.id for letter in letters],))
    done = applier.commit(save_checkpoint=False)
    return RetryOutcome(len(letters), sum(done.dead_letters.values()))


def _require_selection(ids: Sequence[int], everything: bool) -> None:
    if not ids and not everything:
        raise CdcsyncError("no dead letters selected", fix="give their ids, or --all")


def _chunk(conn: Conn, settings: Settings, letters: list[DeadLetter]) -> ChangeChunk:
    by_table: dict[str, list[tuple[int, DeadLetter]]] = {}
    for seq, letter in enumerate(letters, start=1):
        by_table.setdefault(letter.table, []).append((seq, letter))
    staged: list[TableRows] = []
    size = 0
    for table_name, entries in by_table.items():
        relation = _relation(table_name, [letter for _, letter in entries])
        target = tables.resolve(conn, settings, relation)
        pending: list[PendingRow] = [
            (_tuple(relation, letter.row), 0, _OPS[letter.operation], seq, letter.lsn,
             (letter.commit_time - PG_EPOCH) // _MICROSECOND)
            for seq, letter in entries]
        blob, unchanged = stage_rows(relation, pending)
        size += len(blob)
        ops = [letter.operation for _, letter in entries]
        staged.append(TableRows(relation, target, [blob], ops.count("insert"),
                                ops.count("update"), ops.count("delete"), unchanged))
    return ChangeChunk(tuple(staged), len(letters), size)


def _relation(qualified: str, letters: list[DeadLetter]) -> Relation:
    """The columns the dead letters carry, as a relation of text columns."""
    names: dict[str, None] = {}
    for letter in letters:
        names.update(dict.fromkeys(letter.row))
    schema, _, name = qualified.partition(".")
    columns = tuple(Column(n, _TEXT_OID, -1, False) for n in names)
    return Relation(0, schema, name, "d", columns)


def _tuple(relation: Relation, row: dict[str, str | None]) -> bytes:
    """The pgoutput tuple the row came from: text values, 'n' for NULL, 'u' for unchanged."""
    parts = [struct.pack(">h", len(relation.columns))]
    for name in relation.column_names:
        if name not in row:
            parts.append(b"u")
        elif (value := row[name]) is None:
            parts.append(b"n")
        else:
            data = value.encode()
            parts.append(b"t" + struct.pack(">I", len(data)) + data)
    return b"".join(parts)
