"""SQL for the target: staging tables, COPY, merge, delete, conflict capture. Pure builders.

Staging tables hold every value as ``text`` (the source's output representation) and the merge
casts to the target column types, so the target's own input functions do the parsing and
user-defined types need no OID mapping. Type names come from the target's ``format_type()``, which
returns them already quoted, so they are spliced as SQL; every name from elsewhere is an Identifier.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Sequence

from psycopg import sql

from cdcsync.apply.tables import TargetTable

LSN_COLUMN = "_cdcsync_lsn"
COMMIT_TIME_COLUMN = "_cdcsync_commit_time"

_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_COPY_TRAILER = struct.pack(">h", -1)
_NULL = struct.pack(">i", -1)
_INT32 = struct.Struct(">i").pack
_INT16 = struct.Struct(">h").pack


def _ident(*parts: str) -> sql.Identifier:
    return sql.Identifier(*parts)


def _target(table: TargetTable) -> sql.Identifier:
    return sql.Identifier(table.schema, table.name)


def _cast(alias: str, column: str, type_name: str) -> sql.Composed:
    return sql.SQL("{}.{}::{}").format(_ident(alias), _ident(column), sql.SQL(type_name))


def stage_name(table: TargetTable, kind: str) -> str:
    """A temp table name unique to the table's oid and replicated column list."""
    digest = zlib.crc32("\0".join(table.columns).encode()) & 0xFFFFFFFF
    return f"cdcsync_{kind}_{table.oid}_{digest:08x}"


def create_upsert_stage(table: TargetTable) -> sql.Composed:
    columns = [*table.columns, LSN_COLUMN]
    return sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} ({}) ON COMMIT DELETE ROWS").format(
        _ident(stage_name(table, "u")),
        sql.SQL(", ").join(sql.SQL("{} text").format(_ident(c)) for c in columns),
    )


def create_delete_stage(table: TargetTable) -> sql.Composed:
    columns = [*(table.columns[i] for i in table.key), COMMIT_TIME_COLUMN, LSN_COLUMN]
    return sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} ({}) ON COMMIT DELETE ROWS").format(
        _ident(stage_name(table, "d")),
        sql.SQL(", ").join(sql.SQL("{} text").format(_ident(c)) for c in columns),
    )


def truncate_stage(name: str) -> sql.Composed:
    return sql.SQL("TRUNCATE {}").format(_ident(name))


def copy_into(name: str) -> sql.Composed:
    return sql.SQL("COPY {} FROM STDIN (FORMAT binary)").format(_ident(name))


def encode_copy(rows: Iterable[Sequence[bytes | object | None]], width: int) -> bytes:
    """Binary COPY of text-typed columns: each field is its length and its bytes, no escaping.

    Anything that is not ``bytes`` (``None`` or ``UNCHANGED``) is sent as NULL.
    """
    parts = [_COPY_HEADER]
    append = parts.append
    field_count = _INT16(width)
    for row in rows:
        append(field_count)
        for value in row:
            if isinstance(value, bytes):
                append(_INT32(len(value)))
                append(value)
            else:
                append(_NULL)
    append(_COPY_TRAILER)
    return b"".join(parts)


def _key_match(table: TargetTable, target_alias: str, stage_alias: str) -> sql.Composed:
    return sql.SQL(" AND ").join(
        sql.SQL("{}.{} = {}").format(
            _ident(target_alias),
            _ident(table.columns[i]),
            _cast(stage_alias, table.columns[i], table.types[i]),
        )
        for i in table.key
    )


def _newer_or_equal(table: TargetTable, incoming: sql.Composable) -> sql.Composed:
    """The conflict rule: the incoming change wins when its value is >= the target's (ties too)."""
    assert table.conflict is not None
    current = sql.SQL("t.{}").format(_ident(table.columns[table.conflict]))
    return sql.SQL("({current} IS NULL OR {current} <= {incoming})").format(
        current=current, incoming=incoming
    )


def upsert(table: TargetTable) -> sql.Composed:
    """Insert every staged row, or update the existing one when the conflict rule allows."""
    stage = _ident(stage_name(table, "u"))
    selects = sql.SQL(", ").join(
        _cast("s", c, t) for c, t in zip(table.columns, table.types, strict=True)
    )
    keys = sql.SQL(", ").join(_ident(table.columns[i]) for i in table.key)
    non_key = [c for i, c in enumerate(table.columns) if i not in table.key]
    statement = sql.SQL("INSERT INTO {target} AS t ({columns}) SELECT {selects} FROM {stage} s "
                        "ON CONFLICT ({keys}) ").format(
        target=_target(table),
        columns=sql.SQL(", ").join(_ident(c) for c in table.columns),
        selects=selects,
        stage=stage,
        keys=keys,
    )
    if not non_key:
        return statement + sql.SQL("DO NOTHING")
    sets = sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(_ident(c)) for c in non_key)
    statement += sql.SQL("DO UPDATE SET {}").format(sets)
    if table.conflict is not None:
        incoming = sql.SQL("EXCLUDED.{}").format(_ident(table.columns[table.conflict]))
        statement += sql.SQL(" WHERE {}").format(_newer_or_equal(table, incoming))
    return statement


def partial_update(table: TargetTable, present: Sequence[int]) -> sql.Composed:
    """Update only the columns the source sent; a row absent from the target stays absent."""
    sets = sql.SQL(", ").join(
        sql.SQL("{} = {}").format(_ident(table.columns[i]),
                                  _cast("s", table.columns[i], table.types[i]))
        for i in present
        if i not in table.key
    )
    statement = sql.SQL("UPDATE {target} AS t SET {sets} FROM {stage} s WHERE {match}").format(
        target=_target(table), sets=sets, stage=_ident(stage_name(table, "u")),
        match=_key_match(table, "t", "s"),
    )
    if table.conflict is not None:
        c = table.conflict
        incoming = _cast("s", table.columns[c], table.types[c])
        statement += sql.SQL(" AND {}").format(_newer_or_equal(table, incoming))
    return statement


def delete(table: TargetTable) -> sql.Composed:
    """Delete staged keys; with a time conflict column, only rows not newer than the commit."""
    statement = sql.SQL("DELETE FROM {target} AS t USING {stage} s WHERE {match}").format(
        target=_target(table), stage=_ident(stage_name(table, "d")),
        match=_key_match(table, "t", "s"),
    )
    if table.conflict is not None and table.conflict_is_time:
        incoming = sql.SQL("s.{}::timestamptz").format(_ident(COMMIT_TIME_COLUMN))
        statement += sql.SQL(" AND {}").format(_newer_or_equal(table, incoming))
    return statement


def _key_json(table: TargetTable) -> sql.Composed:
    return sql.SQL("jsonb_build_object({})").format(
        sql.SQL(", ").join(
            sql.SQL("{}, t.{}").format(sql.Literal(table.columns[i]), _ident(table.columns[i]))
            for i in table.key
        )
    )


def record_conflicts(table: TargetTable, operation: str) -> sql.Composed:
    """Log the staged changes that lost to a newer target row into ``cdcsync.conflicts``.

    Runs after the merge: a row that still holds a strictly newer value than the incoming one is
    exactly a row the merge refused.
    """
    assert table.conflict is not None
    column = _ident(table.columns[table.conflict])
    if operation == "delete":
        stage_kind, incoming = "d", sql.SQL("s.{}::timestamptz").format(_ident(COMMIT_TIME_COLUMN))
        incoming_text = sql.SQL("s.{}").format(_ident(COMMIT_TIME_COLUMN))
    else:
        c = table.conflict
        stage_kind = "u"
        incoming = _cast("s", table.columns[c], table.types[c])
        incoming_text = sql.SQL("s.{}").format(column)
    return sql.SQL(
        "INSERT INTO cdcsync.conflicts "
        "(table_name, key, operation, source_value, target_value, source_lsn) "
        "SELECT {name}, {key}, {operation}, {incoming_text}, t.{column}::text, s.{lsn}::pg_lsn "
        "FROM {stage} s JOIN {target} t ON {match} WHERE t.{column} > {incoming}"
    ).format(
        name=sql.Literal(table.source_name),
        key=_key_json(table),
        operation=sql.Literal(operation),
        incoming_text=incoming_text,
        column=column,
        lsn=_ident(LSN_COLUMN),
        stage=_ident(stage_name(table, stage_kind)),
        target=_target(table),
        match=_key_match(table, "t", "s"),
        incoming=incoming,
    )


def truncate(tables: Sequence[TargetTable]) -> sql.Composed:
    return sql.SQL("TRUNCATE {}").format(sql.SQL(", ").join(_target(t) for t in tables))

