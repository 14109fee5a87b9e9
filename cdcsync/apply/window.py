"""SQL for merging rows copied from the source (snapshot and resync chunks). Pure builders.

A resync chunk is read between a low and a high watermark written into the WAL. Every key the
stream changes between the two is recorded in a *window* table; at the high watermark those keys
are dropped from the chunk (the stream already holds a newer version of them), the rest is merged
with the usual conflict rule, and keys of the chunk's range that the target holds but the source
chunk lacks are deleted, except keys the window saw (the stream put them there).
"""

from __future__ import annotations

from psycopg import sql

from cdcsync.apply.sql import stage_name
from cdcsync.keyrange import KeyOrder, Span, key_range
from cdcsync.model import Relation, TargetTable


def _key_columns(table: TargetTable) -> list[str]:
    return [table.columns[i] for i in table.key]


def window_name(table: TargetTable) -> str:
    return f"cdcsync_window_{table.oid}"


def chunk_stage_name(table: TargetTable, relation: Relation) -> str:
    return stage_name(table, relation).replace("_stage_", "_chunk_", 1)


def create_window(name: str, table: TargetTable) -> sql.Composed:
    columns = sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(table.columns[i]),
                                                         sql.SQL(table.types[i]))
                                 for i in table.key)
    # Not ON COMMIT DELETE ROWS: a window can span several target transactions.
    return sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} ({})").format(sql.Identifier(name),
                                                                     columns)


def clear_window(name: str) -> sql.Composed:
    return sql.SQL("TRUNCATE {}").format(sql.Identifier(name))


def record_keys(window: str, stage: str, table: TargetTable) -> sql.Composed:
    """Every key a staged batch touches (old keys of moved rows included) joins the window."""
    names = _key_columns(table)
    return sql.SQL("INSERT INTO {window} ({columns}) SELECT {values} FROM {stage}").format(
        window=sql.Identifier(window),
        columns=sql.SQL(", ").join(sql.Identifier(c) for c in names),
        values=sql.SQL(", ").join(sql.SQL("{}::{}").format(sql.Identifier(table.columns[i]),
                                                           sql.SQL(table.types[i]))
                                  for i in table.key),
        stage=sql.Identifier(stage))


def _typed_match(table: TargetTable, left: str, staged: str) -> sql.Composed:
    return sql.SQL(" AND ").join(
        sql.SQL("{}.{} = {}.{}::{}").format(sql.Identifier(left), sql.Identifier(table.columns[i]),
                                            sql.Identifier(staged),
                                            sql.Identifier(table.columns[i]),
                                            sql.SQL(table.types[i]))
        for i in table.key)


def drop_changed(stage: str, window: str, table: TargetTable) -> sql.Composed:
    """Remove from the chunk every key the stream changed while it was read."""
    return sql.SQL("DELETE FROM {stage} s USING {window} w WHERE {match}").format(
        stage=sql.Identifier(stage), window=sql.Identifier(window),
        match=_typed_match(table, "w", "s"))


def delete_missing(stage: str, window: str | None, table: TargetTable, order: KeyOrder,
                   span: Span, *, condition: str | None = None) -> sql.Composed:
    """Delete target rows of the chunk's key range (narrowed by ``condition``, a condition on
    key columns only) that the source chunk does not hold."""
    target = sql.Identifier(table.schema, table.name)
    statement = sql.SQL(
        "DELETE FROM {target} t WHERE {range} "
        "AND NOT EXISTS (SELECT 1 FROM {stage} s WHERE {match})"
    ).format(target=target, range=key_range("t", order, order.target_types, span),
             stage=sql.Identifier(stage), match=_typed_match(table, "t", "s"))
    if condition is not None:
        statement += sql.SQL(" AND ({})").format(sql.SQL(condition))
    if window is not None:
        same = sql.SQL(" AND ").join(sql.SQL("w.{0} = t.{0}").format(sql.Identifier(c))
                                     for c in _key_columns(table))
        statement += sql.SQL(" AND NOT EXISTS (SELECT 1 FROM {} w WHERE {})").format(
            sql.Identifier(window), same)
    return statement
