"""The queries verify runs, as ``psycopg.sql`` compositions with their parameters; no I/O here.

Every row is reduced inside the server to a 64-bit hash of its compared columns as the target
stores them (cast to the target's types; types whose equal values can print differently go through
their text under pinned session settings), and a range to ``count(*)`` and ``bit_xor`` of those
hashes: order-independent, so the two servers may scan in any order, and nothing but a few numbers
per range crosses the network.

Keys cross as text (the target's spelling) and go back into queries as parameters cast to each
side's own key types, so key columns are compared as stored and ranges use the primary key index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from psycopg import sql

from cdcsync.keyrange import Key
from cdcsync.verify.spec import Side

Query = tuple[sql.Composed, list[object]]


@dataclass(frozen=True, slots=True)
class KeyRange:
    """Keys ``lo <= key < hi``, or ``lo <= key <= hi`` when ``closed``; ``None`` is unbounded on
    that end. A bound may be a prefix of the key (its first columns): ``(7,)`` then stands for the
    smallest key starting with 7."""

    lo: Key | None
    hi: Key | None
    closed: bool = False


def row_hash(side: Side) -> sql.Composed:
    """One 64-bit hash per row. The column hashes are combined by xor and hashed again, so that
    values swapped between rows of one range change the range's xor."""
    terms = list(side.hashes)
    if side.values:
        terms.append(sql.SQL("hash_record_extended(ROW({}), 0)").format(
            sql.SQL(", ").join(side.values)))
    return sql.SQL("hashint8extended({}, 0)").format(sql.SQL(" # ").join(terms))


def _key_tuple(side: Side, width: int) -> sql.Composed:
    return sql.SQL("({})").format(sql.SQL(", ").join(side.keys[:width]))


def _param_tuple(side: Side, width: int) -> sql.Composed:
    return sql.SQL("({})").format(sql.SQL(", ").join(
        sql.SQL("%s::{}").format(t) for t in side.key_types[:width]))


def condition(side: Side, key_range: KeyRange) -> Query:
    """The WHERE condition selecting ``key_range`` on ``side`` (row comparison, as the index
    orders keys)."""
    parts: list[sql.Composable] = []
    params: list[object] = []
    upper = "<=" if key_range.closed else "<"
    for bound, operator in ((key_range.lo, ">="), (key_range.hi, upper)):
        if bound is not None:
            parts.append(sql.SQL("{} {} {}").format(
                _key_tuple(side, len(bound)), sql.SQL(operator), _param_tuple(side, len(bound))))
            params.extend(bound)
    if not parts:
        return sql.SQL("true").format(), []
    return sql.SQL(" AND ").join(parts), params


def buckets(side: Side, thresholds: Sequence[str]) -> Query:
    """All first-level ranges in one sequential scan: ``(index, count, xor of row hashes)`` per
    non-empty range, ranges cut at ``thresholds`` (values of the first key column, ascending)."""
    query = sql.SQL(
        "SELECT width_bucket({}, %s::text[]::{}[]), count(*), bit_xor({}) FROM {} GROUP BY 1"
    ).format(side.keys[0], side.key_types[0], row_hash(side), side.table)
    return query, [list(thresholds)]


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
        _aliased(side), row_hash(side), side.table, where)
    return query, params


def keys_hashes(side: Side, keys: Sequence[Key]) -> Query:
    """The given keys that exist on ``side``, each with its row hash."""
    columns = list(zip(*keys, strict=True)) if keys else [() for _ in side.keys]
    arrays = sql.SQL(", ").join(sql.SQL("%s::text[]::{}[]").format(t) for t in side.key_types)
    query = sql.SQL("SELECT {}, {} FROM {} WHERE {} IN (SELECT * FROM unnest({}))").format(
        _aliased(side), row_hash(side), side.table, _key_tuple(side, len(side.keys)), arrays)
    return query, [list(c) for c in columns]


def sample_bounds(side: Side, percent: float, parts: int | None, range_rows: int,
                  width: int) -> Query:
    """Keys cutting a block sample of the whole table (a few percent of its pages), in key order,
    into ``parts`` runs of equal row counts, or into runs of ``range_rows`` sampled rows when
    ``parts`` is None. Only the ``parts - 1`` bounds (their first ``width`` key columns) leave
    the server: the sample itself grows with the table, and a client holding it would keep that
    memory for as long as it runs.

    The bound at 0-based position ``j`` of the ``n`` sampled keys is chosen when some ``i`` in
    ``1 .. parts - 1`` has ``j == n * i // parts``: when ``ceil((j + 1) * parts / n)`` exceeds
    both ``ceil(j * parts / n)`` and 1."""
    query = sql.SQL(
        "SELECT {} FROM (SELECT *, coalesce(%s::bigint, ceil(n / %s::numeric)::bigint) AS parts "
        "FROM (SELECT {}, row_number() OVER (ORDER BY {}) AS rn, count(*) OVER () AS n "
        "FROM {} TABLESAMPLE SYSTEM (%s) REPEATABLE (0)) s) t "
        "WHERE (rn * parts + n - 1) / n > greatest(((rn - 1) * parts + n - 1) / n, 1) ORDER BY rn"
    ).format(
        sql.SQL(", ").join(sql.Identifier(f"k{i}") for i in range(width)),
        _aliased(side), sql.SQL(", ").join(side.keys), side.table)
    return query, [parts, range_rows, percent]


def _aliased(side: Side) -> sql.Composed:
    # Aliased, because ORDER BY would take a bare key name for the output (text) column of the
    # same name and sort keys as text.
    return sql.SQL(", ").join(sql.SQL("{} AS {}").format(t, sql.Identifier(f"k{i}"))
                              for i, t in enumerate(side.key_texts))


def last_key(side: Side) -> Query:
    """The greatest key of the table (no row if it is empty), read backwards from the index."""
    query = sql.SQL("SELECT {} FROM {} ORDER BY {} LIMIT 1").format(
        _aliased(side), side.table,
        sql.SQL(", ").join(sql.SQL("{} DESC").format(k) for k in side.keys))
    return query, []


def precedes(side: Side, first: Key, second: Key) -> Query:
    """Whether key ``first`` sorts before key ``second`` on ``side``."""
    query = sql.SQL("SELECT {} < {}").format(_param_tuple(side, len(first)),
                                             _param_tuple(side, len(second)))
    return query, [*first, *second]


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
