"""The queries verify runs, as ``psycopg.sql`` compositions with their parameters; no I/O here.

Every row is reduced inside the server to a 64-bit hash of its canonical text (the row constructor's
text output of the compared columns, cast to the target's types under pinned session settings), and
a range to ``count(*)`` and ``bit_xor`` of those hashes: order-independent, so the two servers may
scan in any order, and nothing but a few numbers per range crosses the network.

Keys cross as text (the target's spelling) and go back into queries as parameters cast to each
side's own key types, so key columns are compared as stored and ranges use the primary key index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from psycopg import sql

from cdcsync.verify.spec import Side

Key = tuple[str, ...]
Query = tuple[sql.Composed, list[object]]


@dataclass(frozen=True, slots=True)
class KeyRange:
    """Keys ``lo <= key < hi``; ``None`` is unbounded on that end."""

    lo: Key | None
    hi: Key | None


def row_hash(side: Side) -> sql.Composed:
    return sql.SQL("hashtextextended(ROW({})::text, 0)").format(sql.SQL(", ").join(side.values))


def _key_tuple(side: Side) -> sql.Composed:
    return sql.SQL("({})").format(sql.SQL(", ").join(side.keys))


def _param_tuple(side: Side) -> sql.Composed:
    return sql.SQL("({})").format(sql.SQL(", ").join(
        sql.SQL("%s::{}").format(t) for t in side.key_types))


def condition(side: Side, key_range: KeyRange) -> Query:
    """The WHERE condition selecting ``key_range`` on ``side`` (row comparison, as the index
    orders keys)."""
    parts: list[sql.Composable] = []
    params: list[object] = []
    if key_range.lo is not None:
        parts.append(sql.SQL("{} >= {}").format(_key_tuple(side), _param_tuple(side)))
        params.extend(key_range.lo)
    if key_range.hi is not None:
        parts.append(sql.SQL("{} < {}").format(_key_tuple(side), _param_tuple(side)))
        params.extend(key_range.hi)
    if not parts:
        return sql.SQL("true").format(), []
    return sql.SQL(" AND ").join(parts), params


def summaries(side: Side, ranges: Sequence[KeyRange]) -> Query:
    """One row per range, in order: ``(index, count, xor of row hashes)``."""
    branches: list[sql.Composable] = []
    params: list[object] = []
    for index, key_range in enumerate(ranges):
        where, values = condition(side, key_range)
        branches.append(sql.SQL(
            "SELECT {}::int, count(*), coalesce(bit_xor({}), 0) FROM {} WHERE {}"
        ).format(sql.Literal(index), row_hash(side), side.table, where))
        params.extend(values)
    return sql.SQL(" UNION ALL ").join(branches), params


def key_hashes(side: Side, key_range: KeyRange) -> Query:
    """Every key of the range as text, with its row hash."""
    where, params = condition(side, key_range)
    query = sql.SQL("SELECT {}, {} FROM {} WHERE {}").format(
        sql.SQL(", ").join(side.key_texts), row_hash(side), side.table, where)
    return query, params


def keys_hashes(side: Side, keys: Sequence[Key]) -> Query:
    """The given keys that exist on ``side``, each with its row hash."""
    columns = list(zip(*keys, strict=True)) if keys else [() for _ in side.keys]
    arrays = sql.SQL(", ").join(sql.SQL("%s::text[]::{}[]").format(t) for t in side.key_types)
    query = sql.SQL("SELECT {}, {} FROM {} WHERE {} IN (SELECT * FROM unnest({}))").format(
        sql.SQL(", ").join(side.key_texts), row_hash(side), side.table, _key_tuple(side), arrays)
    return query, [list(c) for c in columns]


def sample_keys(side: Side, percent: float) -> Query:
    """Keys of a block sample of the whole table, in key order (a few percent of its pages)."""
    query = sql.SQL("SELECT {} FROM {} TABLESAMPLE SYSTEM (%s) REPEATABLE (0) ORDER BY {}").format(
        sql.SQL(", ").join(side.key_texts), side.table, sql.SQL(", ").join(side.keys))
    return query, [percent]


def every_nth_key(side: Side, key_range: KeyRange, step: int) -> Query:
    """Every ``step``-th key of the range in key order: boundaries splitting it by row count."""
    where, params = condition(side, key_range)
    aliases = [sql.Identifier(f"k{i}") for i in range(len(side.keys))]
    query = sql.SQL(
        "SELECT {} FROM (SELECT {}, row_number() OVER (ORDER BY {}) AS n FROM {} WHERE {}) s "
        "WHERE mod(n, %s) = 0 ORDER BY n"
    ).format(
        sql.SQL(", ").join(aliases),
        sql.SQL(", ").join(sql.SQL("{} AS {}").format(t, a)
                           for t, a in zip(side.key_texts, aliases, strict=True)),
        sql.SQL(", ").join(side.keys), side.table, where)
    return query, [*params, step]
