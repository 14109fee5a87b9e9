"""What verify compares for one table: the replicated columns, the key, and how each side
spells a value so that both produce the same text for the same stored value.

The target table and its columns are resolved exactly as the applier resolves them
(:func:`cdcsync.apply.tables.resolve`), so renames and ``exclude_columns`` mean the same thing here.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from cdcsync.apply.tables import resolve
from cdcsync.config import Settings
from cdcsync.errors import PrerequisiteError
from cdcsync.model import Column, Relation
from cdcsync.source.catalog import SourceTable

Conn = psycopg.Connection[TupleRow]

_SOURCE_COLUMNS_SQL = """
SELECT c.oid, a.attname, a.atttypid, a.atttypmod, format_type(a.atttypid, a.atttypmod),
       coalesce(a.attnum = ANY (i.indkey), false)
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary
WHERE n.nspname = %s AND c.relname = %s
ORDER BY a.attnum
"""

# The collation a key column sorts by; "default" is spelled out so two servers can be compared.
_KEY_COLLATIONS_SQL = """
SELECT a.attname,
       CASE WHEN a.attcollation = 0 THEN ''
            WHEN co.collname = 'default' THEN (SELECT datcollate FROM pg_database
                                               WHERE datname = current_database())
            ELSE co.collname END
FROM pg_attribute a
LEFT JOIN pg_collation co ON co.oid = a.attcollation
WHERE a.attrelid = %s AND a.attname = ANY (%s)
"""


@dataclass(frozen=True, slots=True)
class Side:
    """One side's view of the table: its name and how to read each compared column."""

    table: sql.Identifier
    hashes: tuple[sql.Composable, ...]     # per-column hashes of the values the target stores
    values: tuple[sql.Composable, ...]     # the other columns' values, hashed as one record
    keys: tuple[sql.Composable, ...]       # key columns as stored, to range over and order by
    key_texts: tuple[sql.Composable, ...]  # key columns as the target spells them
    key_types: tuple[sql.SQL, ...]         # this side's type of each key, to cast parameters


@dataclass(frozen=True, slots=True)
class TableSpec:
    """One table as verify compares it; ``source_name`` is the name the user selects it by."""

    source_name: str
    target_name: str
    columns: tuple[str, ...]
    key_columns: tuple[str, ...]
    key_types: tuple[str, ...]  # the target's types, which is how keys are reported
    source: Side
    target: Side
    # The first key column has a fixed-length type on both sides, which width_bucket() places
    # quickly enough to summarise all first-level ranges in one sequential scan.
    bucketed: bool


def table_spec(src: Conn, tgt: Conn, settings: Settings, table: SourceTable) -> TableSpec:
    """Resolve ``table`` on both sides; raise with the fix when the target cannot be compared."""
    rows = src.execute(_SOURCE_COLUMNS_SQL, (table.schema, table.name)).fetchall()
    if not rows:
        raise PrerequisiteError(f"source table {table.qualified} does not exist",
                                fix="correct --table or `tables` in the configuration")
    relation = Relation(
        oid=int(rows[0][0]), schema=table.schema, name=table.name, replica_identity="d",
        columns=tuple(Column(str(r[1]), int(r[2]), int(r[3]), bool(r[5])) for r in rows),
    )
    source_types = {str(r[1]): str(r[4]) for r in rows}
    target = resolve(tgt, settings, relation)
    keys = tuple(target.columns[i] for i in target.key)
    key_types = tuple(target.types[i] for i in target.key)
    target_types = dict(zip(target.columns, target.types, strict=True))
    collate = _collations(src, relation.oid, keys) != _collations(tgt, target.oid, keys)

    def side(identifier: sql.Identifier, types: dict[str, str]) -> Side:
        def value(column: str) -> sql.Composable:
            if _natively_hashed(target_types[column]):
                return cast(column)
            return sql.SQL("({})::text").format(cast(column))

        def cast(column: str) -> sql.Composable:
            expr: sql.Composable = sql.Identifier(column)
            if types[column] != target_types[column]:
                # format_type() spells a type as the catalog does, already quoted where needed.
                expr = sql.SQL("{}::{}").format(expr, sql.SQL(target_types[column]))
            return expr

        def key(column: str) -> sql.Composable:
            # Stored values, not casts, so that ranges use the primary key index. Keys whose
            # collations differ between the servers are ordered bytewise on both, so that a
            # range holds the same keys on each side.
            expr = sql.Identifier(column)
            return sql.SQL('{} COLLATE "C"').format(expr) if collate and _textual(
                target_types[column]) else expr

        hashes: list[sql.Composable] = []
        values: list[sql.Composable] = []
        for position, column in enumerate(target.columns, start=1):
            call = _hash_call(target_types[column])
            if call is None:
                values.append(value(column))
            else:
                # Distinct seeds per column, so equal values in two columns do not cancel out,
                # and a NULL hashes to a constant of its own (the hash functions are strict).
                hashes.append(sql.SQL("coalesce({}, {})").format(
                    sql.SQL(call).format(cast(column), sql.Literal(position)),
                    sql.Literal(-position)))
        return Side(
            table=identifier,
            hashes=tuple(hashes),
            values=tuple(values),
            keys=tuple(key(c) for c in keys),
            key_texts=tuple(sql.SQL("({})::text").format(cast(c)) for c in keys),
            key_types=tuple(sql.SQL(types[c]) for c in keys),
        )

    return TableSpec(
        source_name=table.qualified,
        target_name=target.qualified,
        columns=target.columns,
        key_columns=keys,
        key_types=key_types,
        source=side(table.identifier, source_types),
        target=side(sql.Identifier(target.schema, target.name), target_types),
        bucketed=_fixed_length(src, source_types[keys[0]])
        and _fixed_length(tgt, target_types[keys[0]]),
    )


# Types whose hash functions tell apart exactly the values whose text differs (the stored value is
# what is hashed, not its text, which is several times cheaper). Others (interval and unconstrained
# numeric, whose equal values may print differently, json, geometric types, ...) are hashed
# through their text. A numeric with a scale stores every value at that scale, so it qualifies.
_NATIVE_HASH = frozenset({
    "smallint", "integer", "bigint", "boolean", "text", "uuid", "date", "bytea", "jsonb", "oid",
    "timestamp without time zone", "timestamp with time zone", "time without time zone",
    "double precision", "real", '"char"',
})


# The extended hash support function of the type's default hash operator class, called on the
# value directly: hashing each column this way is cheaper than building a record to hash.
# timestamptz's function is timestamp's, which hashes microseconds since 2000-01-01. Subtracting
# that instant yields them as an interval, whose hash is the same number's, without the per-row
# time zone conversion of a cast to timestamp (a quarter of the column's cost); infinities, which
# cannot be subtracted, take the cast, exact in the pinned UTC session. Both give the same hash.
_HASH_CALLS = {
    "smallint": "hashint2extended({}, {})", "integer": "hashint4extended({}, {})",
    "bigint": "hashint8extended({}, {})", "text": "hashtextextended({}, {})",
    "uuid": "uuid_hash_extended({}, {})", "jsonb": "jsonb_hash_extended({}, {})",
    "double precision": "hashfloat8extended({}, {})", "real": "hashfloat4extended({}, {})",
    "oid": "hashoidextended({}, {})", "time without time zone": "time_hash_extended({}, {})",
    "timestamp without time zone": "timestamp_hash_extended({}, {})",
    "timestamp with time zone": (
        "CASE WHEN isfinite({0}) THEN "
        "interval_hash_extended(({0}) - '2000-01-01 00:00:00+00'::timestamptz, {1}) "
        "ELSE timestamp_hash_extended(({0})::timestamp, {1}) END"),
}


def _hash_call(type_name: str) -> str | None:
    if type_name.endswith("]"):
        return None
    if type_name.startswith("character varying"):
        return "hashtextextended({}, {})"
    if type_name.startswith("numeric("):
        return "hash_numeric_extended({}, {})"
    return _HASH_CALLS.get(type_name)


def _natively_hashed(type_name: str) -> bool:
    base = type_name.removesuffix("[]")
    return base in _NATIVE_HASH or base.startswith(("character varying", "numeric("))


def _fixed_length(conn: Conn, type_name: str) -> bool:
    row = conn.execute("SELECT typlen > 0 FROM pg_type WHERE oid = %s::regtype",
                       (type_name,)).fetchone()
    return bool(row and row[0])


def _textual(type_name: str) -> bool:
    return type_name in ("text", "name", "citext") or type_name.startswith(
        ("character varying", "character"))


def _collations(conn: Conn, oid: int, keys: tuple[str, ...]) -> dict[str, str]:
    rows = conn.execute(_KEY_COLLATIONS_SQL, (oid, list(keys))).fetchall()
    return {str(r[0]): str(r[1]) for r in rows}
