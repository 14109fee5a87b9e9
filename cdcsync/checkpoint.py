"""The checkpoint: the end LSN of the last source commit the target holds, per slot.

Guarantee: it is written in the same target transaction as the data it covers, and it never moves
backward (the SQL takes the greater of the stored and the new position), so after any crash the
stored position is exactly what the target holds. A transaction applied beside an earlier one
(:mod:`cdcsync.apply.lanes`) names the position that one writes: its statement waits on the row
until the earlier transaction ends, and fails unless it committed that position.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from importlib import resources

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from cdcsync.model import Lsn

_SAVE = """
INSERT INTO cdcsync.checkpoint AS c (slot, lsn, commit_time, updated_at)
VALUES ({slot}, {lsn}::pg_lsn, {commit_time}, now())
ON CONFLICT (slot) DO UPDATE SET
    lsn = {advanced},
    commit_time = CASE WHEN excluded.lsn >= c.lsn
                       THEN coalesce(excluded.commit_time, c.commit_time) ELSE c.commit_time END,
    updated_at = now()
"""
_ADVANCED = "GREATEST(c.lsn, excluded.lsn)"

# The earlier transaction's position is read from the row as it stands once that transaction has
# ended (ON CONFLICT DO UPDATE waits for it, then updates the newest version). Plain SQL has no
# statement that raises, so a failed predecessor fails a cast instead: its text is the message,
# and naming the row keeps the planner from folding it into an error at once.
_ADVANCED_AFTER = """CASE WHEN c.lsn = {after}::pg_lsn THEN GREATEST(c.lsn, excluded.lsn)
               ELSE ('cdcsync: the checkpoint of slot ' || c.slot || ' is ' || c.lsn::text
                     || ', not ' || {after} || ': the transaction before this one did not '
                     || 'commit')::pg_lsn END"""

@dataclass(frozen=True, slots=True)
class Checkpoint:
    lsn: Lsn
    commit_time: dt.datetime | None


def metadata_sql() -> str:
    return resources.files("cdcsync").joinpath("sql/metadata.sql").read_text(encoding="utf-8")


def install_metadata(conn: psycopg.Connection[TupleRow]) -> None:
    """Create or update the ``cdcsync`` schema on the target (idempotent)."""
    conn.execute(metadata_sql().encode())


def load(conn: psycopg.Connection[TupleRow], slot: str) -> Checkpoint | None:
    return from_row(conn.execute(load_query(slot)).fetchone())


def load_query(slot: str) -> sql.Composed:
    """The query :func:`from_row` reads, values included (it can travel with others)."""
    return sql.SQL("SELECT lsn::text, commit_time FROM cdcsync.checkpoint WHERE slot = {}").format(
        slot)


def from_row(row: TupleRow | None) -> Checkpoint | None:
    if row is None:
        return None
    commit_time = row[1] if isinstance(row[1], dt.datetime) else None
    return Checkpoint(Lsn.parse(str(row[0])), commit_time)


def save_statement(slot: str, lsn: Lsn, commit_time: dt.datetime | None, *,
                   after: Lsn | None = None) -> sql.Composed:
    """The statement recording ``lsn``, values included, so that it can travel in one query
    with the COMMIT; ``commit_time`` None keeps the stored one (a position with no commit).
    With ``after``, it fails unless the stored position is ``after`` once every transaction
    writing the row before it has ended."""
    advanced = (sql.SQL(_ADVANCED) if after is None
                else sql.SQL(_ADVANCED_AFTER).format(after=sql.Literal(str(after))))
    return sql.SQL(_SAVE).format(slot=sql.Literal(slot), lsn=sql.Literal(str(lsn)),
                                 commit_time=sql.Literal(commit_time), advanced=advanced)


def save(
    cur: psycopg.Cursor[TupleRow], slot: str, lsn: Lsn, commit_time: dt.datetime | None
) -> None:
    """Record ``lsn``; ``commit_time`` None keeps the stored one (a position with no commit)."""
    cur.execute(save_statement(slot, lsn, commit_time))
