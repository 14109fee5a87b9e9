"""How a source relation lands on the target: columns, key, conflict column, foreign-key order.

Resolved once per Relation message from the target's catalog and the configuration, then cached; the
hot path only indexes tuples.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from cdcsync.apply import drift
from cdcsync.config import Settings
from cdcsync.errors import PrerequisiteError, SchemaMismatch
from cdcsync.model import Relation, TargetTable

_TIME_TYPES = ("timestamp with time zone", "timestamp without time zone")

# The table's columns, each row also carrying its primary key's columns in key order and the
# privileges the apply lacks on the column (DELETE and TRUNCATE: on the table), which a grant on
# the table or on the column gives: one round trip for a table (two cost the start 20 ms more
# with a target 10 ms away).
_COLUMN_ROWS = """
SELECT c.oid, a.attname, format_type(a.atttypid, a.atttypmod), row_security_active(c.oid),
       ARRAY(SELECT k.attname::text
             FROM pg_index i
             JOIN pg_attribute k ON k.attrelid = i.indrelid AND k.attnum = ANY (i.indkey)
             WHERE i.indrelid = c.oid AND i.indisprimary
             ORDER BY array_position(i.indkey::int2[], k.attnum)),
       ARRAY(SELECT p FROM unnest(ARRAY['SELECT', 'INSERT', 'UPDATE']) AS p
             WHERE NOT has_column_privilege(c.oid, a.attnum, p)
             UNION ALL
             SELECT p FROM unnest(ARRAY['DELETE', 'TRUNCATE']) AS p
             WHERE NOT has_table_privilege(c.oid, p))"""
_COLUMNS_SQL = _COLUMN_ROWS + """
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')
ORDER BY a.attnum
"""
# The same rows for several tables at once, each after its position in the list given.
_COLUMNS_OF_SQL = _COLUMN_ROWS + """, t.i
FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS t(nspname, relname, i)
JOIN pg_namespace n ON n.nspname = t.nspname
JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.relname AND c.relkind IN ('r', 'p')
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY t.i, a.attnum
"""

# A table's rows of the query above, as :func:`resolve` reads them.
ColumnRows = list[tuple[Any, ...]]


_APPLIED = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE")
# What a role without TRUNCATE may do instead of the GRANT.
OR_IGNORE_TRUNCATES = ' (or set [apply] truncate = "ignore" to leave source TRUNCATEs unapplied)'


def lacking_privileges(rows: ColumnRows, columns: Iterable[str] | None = None, *,
                       truncates: bool = False) -> list[str]:
    """What the apply may not do on the table these rows describe, on ``columns`` (those it
    writes; all when not given): it reads (the conflict rule), inserts, updates and deletes,
    and it ``truncates`` where the source does (`[apply] truncate = "apply"`)."""
    wanted = None if columns is None else set(columns)
    lacking = {str(p) for row in rows if wanted is None or row[1] in wanted for p in row[5]}
    return [p for p in _APPLIED if p in lacking and (truncates or p != "TRUNCATE")]


def grant_fix(conn: psycopg.Connection[TupleRow], target: str, *,
              truncates: bool = False) -> str:
    """The fix for a target role that may not apply to ``target`` (schema.table): the GRANT,
    with TRUNCATE where the apply ``truncates``."""
    schema, _, name = target.partition(".")
    quoted = sql.Identifier(schema, name).as_string(conn)
    role = sql.Identifier(conn.info.user).as_string(conn)
    privileges = ", ".join(_APPLIED if truncates else _APPLIED[:-1])
    return f"run on the target: GRANT {privileges} ON {quoted} TO {role}; (sql/target_role.sql)"


_FOREIGN_KEYS_SQL = """
SELECT conrelid::oid, confrelid::oid FROM pg_constraint
WHERE contype = 'f' AND conrelid = ANY (%s) AND confrelid = ANY (%s) AND conrelid <> confrelid
"""


_LINKED_SQL = """
SELECT o FROM unnest(%s::oid[]) AS o
WHERE EXISTS (SELECT FROM pg_constraint WHERE contype = 'f' AND (conrelid = o OR confrelid = o))
"""


def selected(patterns: Iterable[str], qualified: str) -> bool:
    return any(fnmatch.fnmatchcase(qualified, pattern) for pattern in patterns)


def target_of(settings: Settings, relation: Relation) -> str:
    """The qualified name of the target table ``relation`` lands in."""
    return settings.override_for(relation.qualified).target or relation.qualified


def described(conn: psycopg.Connection[TupleRow], names: Sequence[str]) -> dict[str, ColumnRows]:
    """The catalog rows :func:`resolve` reads for each of the target tables ``names``
    (qualified), in one round trip; a table that does not exist (or is not a table) is absent."""
    parts = [name.partition(".") for name in names]
    found: dict[str, ColumnRows] = {}
    for *row, position in conn.execute(_COLUMNS_OF_SQL, ([p[0] for p in parts],
                                                         [p[2] for p in parts])).fetchall():
        found.setdefault(names[int(position) - 1], []).append(tuple(row))
    return found


def resolve(conn: psycopg.Connection[TupleRow] | None, settings: Settings, relation: Relation,
            *, source_types: Sequence[str] | None = None, previous: Relation | None = None,
            rows: ColumnRows | None = None) -> TargetTable:
    """Map ``relation`` onto its target table, or say exactly what is missing on the target.

    With ``source_types`` (the source's ``format_type`` of each column) the relation is also
    checked for schema drift against the target and against ``previous``, the last Relation
    message seen for the same table (see :mod:`cdcsync.apply.drift`). The target's catalog is
    asked on ``conn`` unless its ``rows`` are given (:func:`described`, read a moment ago)."""
    override = settings.override_for(relation.qualified)
    target_name = target_of(settings, relation)
    schema, _, name = target_name.partition(".")
    if rows is None:
        if conn is None:
            raise ValueError("resolve needs a connection or the table's rows")
        rows = conn.execute(_COLUMNS_SQL, (schema, name)).fetchall()
    if not rows:
        raise PrerequisiteError(
            f"target table {target_name} does not exist (source {relation.qualified})",
            fix="create it, or run `cdcsync setup --create-tables`",
        )
    oid = int(str(rows[0][0]))
    if not relation.columns:
        # wal2json named a truncated table the source catalog no longer has: truncating needs
        # the target table alone.
        return TargetTable(relation.qualified, oid, schema, name, (), (), (), (), (), None, False)
    target_types = {str(r[1]): str(r[2]) for r in rows}
    excluded = set(override.exclude_columns)
    positions = tuple(i for i, c in enumerate(relation.columns) if c.name not in excluded)
    columns = tuple(relation.columns[i].name for i in positions)
    primary_key = [str(k) for k in rows[0][4]]
    added: tuple[tuple[str, str], ...] = ()
    if source_types is not None:
        added = drift.reconcile(
            relation, source_types, drift.TargetShape(target_name, target_types, primary_key),
            excluded=frozenset(excluded), previous=previous,
            policy=settings.apply.schema_changes)
        target_types.update(added)
    missing = [c for c in columns if c not in target_types]
    if missing:
        raise SchemaMismatch(
            f"target table {target_name} lacks column(s) {', '.join(missing)} "
            f"that the source {relation.qualified} has",
            fix=f"add them on the target (ALTER TABLE {target_name} ADD COLUMN ...) "
            f"or list them in exclude_columns for {relation.qualified}",
        )
    if not primary_key:
        source_key = ", ".join(c.name for c in relation.columns if c.is_key) or "id"
        raise PrerequisiteError(
            f"target table {target_name} has no primary key",
            fix=f"ALTER TABLE {target_name} ADD PRIMARY KEY ({source_key});",
        )
    absent = [k for k in primary_key if k not in columns]
    if absent:
        raise SchemaMismatch(
            f"primary key column(s) {', '.join(absent)} of {target_name} are not replicated",
            fix=f"do not exclude key columns of {relation.qualified}",
        )
    key = tuple(columns.index(k) for k in primary_key)
    conflict_name = override.conflict_column or settings.apply.conflict_column
    conflict = columns.index(conflict_name) if conflict_name in columns else None
    types = tuple(target_types[c] for c in columns)
    return TargetTable(
        source_name=relation.qualified,
        oid=oid,
        schema=schema,
        name=name,
        columns=columns,
        types=types,
        positions=positions,
        key=key,
        source_key=tuple(positions[i] for i in key),
        conflict=conflict,
        conflict_is_time=conflict is not None and types[conflict] in _TIME_TYPES,
        add_columns=added,
        row_security=bool(rows[0][3]),
    )


def parents_of(conn: psycopg.Connection[TupleRow], oids: Sequence[int]) -> dict[int, set[int]]:
    """For each table, the tables among ``oids`` its foreign keys reference."""
    edges = conn.execute(_FOREIGN_KEYS_SQL, (list(oids), list(oids))).fetchall()
    parents: dict[int, set[int]] = {oid: set() for oid in oids}
    for child, parent in edges:
        parents[int(str(child))].add(int(str(parent)))
    return parents


def foreign_key_order(
    conn: psycopg.Connection[TupleRow], oids: Sequence[int]
) -> tuple[list[int], set[int]]:
    """Parents before children; the second value holds the tables caught in a cycle."""
    if len(oids) < 2:
        # A table referencing itself orders nothing: no question (a round trip at a far target).
        return list(oids), set()
    parents = parents_of(conn, oids)
    order: list[int] = []
    placed: set[int] = set()
    remaining = set(oids)
    while remaining:
        ready = sorted(o for o in remaining if parents[o] <= placed)
        if not ready:
            return order + sorted(remaining), remaining
        order.extend(ready)
        placed.update(ready)
        remaining.difference_update(ready)
    return order, set()


def linked(conn: psycopg.Connection[TupleRow], oids: Sequence[int]) -> set[int]:
    """The tables among ``oids`` that take part in a foreign key on the target, either side."""
    return {int(str(row[0])) for row in conn.execute(_LINKED_SQL, (list(oids),)).fetchall()}
