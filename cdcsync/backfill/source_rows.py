"""Reading a source table for a copy: the relation as the stream describes it, key ranges, and the
rows themselves, either as plain text COPY or already in the stream's staging format.

The staging format (see :mod:`cdcsync.source.tuples`) is produced by the source itself: a binary
``COPY (SELECT ...)`` whose first columns are the metadata and whose other columns are cast to
``text`` has exactly the layout of a staging table. The rows go from one server to the other as
opaque bytes and are never parsed in Python.
"""

from __future__ import annotations

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from cdcsync.backfill import copy_pipe
from cdcsync.errors import PrerequisiteError, ProtocolError
from cdcsync.keyrange import Key, KeyOrder, Span, key_range
from cdcsync.model import Lsn, Relation, TargetTable
from cdcsync.source import catalog
from cdcsync.source.tuples import COPY_HEADER, COPY_TRAILER

Conn = psycopg.Connection[TupleRow]

_KEY_TYPES_SQL = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), coll.collname
FROM pg_attribute a LEFT JOIN pg_collation coll ON coll.oid = a.attcollation
WHERE a.attrelid = %s AND a.attname = ANY (%s)
"""


def relation_of(conn: Conn, qualified: str) -> Relation:
    """The source table as a Relation message would describe it."""
    schema, _, name = qualified.partition(".")
    relation = catalog.describe_table(conn, schema, name)
    if relation is None:
        raise PrerequisiteError(f"source table {qualified} does not exist",
                                fix="correct the table name, or create it on the source")
    return relation


def key_order(source: Conn, target: Conn, relation: Relation, table: TargetTable) -> KeyOrder:
    """The key order both sides agree on, or the reason they do not.

    Ranges are read in the source's key order and deleted by range on the target, so both sides
    must sort keys alike: a collatable key column needs the same collation on both.
    """
    names = tuple(table.columns[i] for i in table.key)
    src = {str(r[0]): (str(r[1]), r[2]) for r in
           source.execute(_KEY_TYPES_SQL, (relation.oid, list(names))).fetchall()}
    tgt = {str(r[0]): (str(r[1]), r[2]) for r in
           target.execute(_KEY_TYPES_SQL, (table.oid, list(names))).fetchall()}
    for column in names:
        if src[column][1] != tgt[column][1]:
            raise PrerequisiteError(
                f"key column {column} of {relation.qualified} sorts by collation "
                f"{src[column][1]!r} on the source but {tgt[column][1]!r} on the target, so key "
                "ranges would differ",
                fix=f'ALTER TABLE {table.qualified} ALTER COLUMN {column} TYPE '
                    f'{tgt[column][0]} COLLATE "{src[column][1]}";',
            )
    return KeyOrder(names, tuple(src[c][0] for c in names), tuple(tgt[c][0] for c in names))


def _where(order: KeyOrder, span: Span, condition: str | None) -> sql.Composable:
    bounds = key_range(None, order, order.source_types, span)
    if condition:
        # An operator-supplied filter (`resync --where`), run only in a read-only transaction.
        return sql.SQL("{} AND ({})").format(bounds, sql.SQL(condition))
    return bounds


def chunk_end(conn: Conn, relation: Relation, order: KeyOrder, after: Key | None,
              condition: str | None, *, rows: int) -> Key | None:
    """The key of the ``rows``-th row after ``after``; None when fewer rows remain."""
    # Qualified: a bare name in ORDER BY would sort by the output column, the key as text.
    keys = sql.SQL(", ").join(sql.Identifier("src", c) for c in order.names)
    query = sql.SQL("SELECT {} FROM {} AS src WHERE {} ORDER BY {} OFFSET {} LIMIT 1").format(
        sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in order.names),
        sql.Identifier(relation.schema, relation.name),
        _where(order, Span(after), condition), keys, sql.Literal(rows - 1))
    row = conn.execute(query).fetchone()
    return tuple(str(v) for v in row) if row is not None else None


def count(conn: Conn, relation: Relation, order: KeyOrder, condition: str | None) -> int:
    query = sql.SQL("SELECT count(*) FROM {} WHERE {}").format(
        sql.Identifier(relation.schema, relation.name),
        _where(order, Span(), condition))
    row = conn.execute(query).fetchone()
    return int(row[0]) if row else 0


def estimate(conn: Conn, relation: Relation) -> int:
    """The planner's row count, good enough for a progress bar; a table never analyzed is
    counted."""
    row = conn.execute("SELECT reltuples::bigint FROM pg_class WHERE oid = %s",
                       (relation.oid,)).fetchone()
    if row is not None and int(row[0]) > 0:
        return int(row[0])
    query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(relation.schema,
                                                                     relation.name))
    counted = conn.execute(query).fetchone()
    return int(counted[0]) if counted else 0


def staged_copy(relation: Relation, table: TargetTable, order: KeyOrder, lsn: Lsn,
                span: Span, *, condition: str | None) -> sql.Composed:
    """``COPY ... TO STDOUT`` of a key range in the staging format, as inserts at ``lsn``."""
    replicated = {relation.columns[p].name for p in table.positions}
    values = [sql.SQL("{}::text").format(sql.Identifier(c.name)) if c.name in replicated
              else sql.SQL("NULL::text") for c in relation.columns]
    keys = sql.SQL(", ").join(sql.Identifier(c) for c in order.names)
    select = sql.SQL(
        "SELECT row_number() OVER (ORDER BY {keys}), 'I'::text, {lsn}::pg_lsn, now(), "
        "{mask}::text, {values} FROM {source} WHERE {where}"
    ).format(keys=keys, lsn=sql.Literal(str(lsn)), mask=sql.Literal("0" * len(relation.columns)),
             values=sql.SQL(", ").join(values), source=sql.Identifier(relation.schema,
                                                                      relation.name),
             where=_where(order, span, condition))
    return sql.SQL("COPY ({}) TO STDOUT (FORMAT binary)").format(select)


def read_staged(conn: Conn, query: sql.Composed) -> tuple[bytes, int]:
    """Run a :func:`staged_copy`; return its rows without the COPY header and trailer."""
    data, rows = copy_pipe.read(conn, query)
    if not data.startswith(COPY_HEADER) or not data.endswith(COPY_TRAILER):
        raise ProtocolError("the source returned an unexpected binary COPY stream")
    return data[len(COPY_HEADER):-len(COPY_TRAILER)], rows


def plain_copy_out(relation: Relation, table: TargetTable, *, binary: bool) -> sql.Composed:
    """The replicated columns of the whole table as COPY (see :mod:`.copy_format` for when
    ``binary`` is safe), for a target known to be empty."""
    columns = [relation.columns[p].name for p in table.positions]
    return sql.SQL("COPY {} ({}) TO STDOUT{}").format(
        sql.Identifier(relation.schema, relation.name),
        sql.SQL(", ").join(sql.Identifier(c) for c in columns), _format(binary))


def plain_copy_in(table: TargetTable, *, binary: bool) -> sql.Composed:
    return sql.SQL("COPY {} ({}) FROM STDIN{}").format(
        sql.Identifier(table.schema, table.name),
        sql.SQL(", ").join(sql.Identifier(c) for c in table.columns), _format(binary))


def _format(binary: bool) -> sql.SQL:
    return sql.SQL(" (FORMAT binary)" if binary else "")

