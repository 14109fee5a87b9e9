"""Primary-key ranges, compared alike on both sides: the unit in which tables are copied."""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

Key = tuple[str, ...]
"""A primary key as the text of each of its columns, in key order."""


@dataclass(frozen=True, slots=True)
class KeyOrder:
    """The key columns with their type on each side; ranges are compared with these types."""

    names: tuple[str, ...]
    source_types: tuple[str, ...]
    target_types: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Span:
    """The keys ``after < k <= upto`` (either end open when None)."""

    after: Key | None = None
    upto: Key | None = None


def key_range(alias: str | None, order: KeyOrder, types: tuple[str, ...],
              span: Span) -> sql.Composable:
    """The span as a condition on the given side (its key types); TRUE when unbounded."""
    columns = sql.SQL(", ").join(
        sql.Identifier(alias, c) if alias else sql.Identifier(c) for c in order.names)

    def row(values: Key) -> sql.Composed:
        return sql.SQL(", ").join(sql.SQL("CAST({} AS {})").format(sql.Literal(v), sql.SQL(t))
                                  for v, t in zip(values, types, strict=True))

    parts: list[sql.Composable] = []
    if span.after is not None:
        parts.append(sql.SQL("ROW({}) > ROW({})").format(columns, row(span.after)))
    if span.upto is not None:
        parts.append(sql.SQL("ROW({}) <= ROW({})").format(columns, row(span.upto)))
    return sql.SQL(" AND ").join(parts) if parts else sql.SQL("true")
