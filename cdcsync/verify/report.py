"""What verify found, per table: plain data first, then its two renderings (table and JSON).

:class:`TableResult` is also the input of a repair: :meth:`TableResult.keys` lists every key whose
row must be copied again from the source (re-copying a key missing on the source deletes it on the
target), and :meth:`TableResult.key_condition` selects exactly those rows of the source table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from psycopg import sql

from cdcsync.keyrange import Key

KEYS_SHOWN = 100  # keys listed per kind of difference in the JSON report; the count is exact


@dataclass(frozen=True, slots=True)
class Differences:
    """Keys, as the target spells them, classified by what the target has wrong."""

    missing: tuple[Key, ...] = ()  # on the source, not on the target
    extra: tuple[Key, ...] = ()    # on the target, not on the source
    differ: tuple[Key, ...] = ()   # on both, with different column values

    @property
    def count(self) -> int:
        return len(self.missing) + len(self.extra) + len(self.differ)

    def keys(self) -> list[Key]:
        return sorted({*self.missing, *self.extra, *self.differ})

    def __add__(self, other: Differences) -> Differences:
        return Differences(self.missing + other.missing, self.extra + other.extra,
                           self.differ + other.differ)


def classify(source: dict[Key, int], target: dict[Key, int]) -> Differences:
    """Compare two ``key -> row hash`` maps."""
    return Differences(
        missing=tuple(sorted(source.keys() - target.keys())),
        extra=tuple(sorted(target.keys() - source.keys())),
        differ=tuple(sorted(k for k in source.keys() & target.keys() if source[k] != target[k])),
    )


@dataclass(frozen=True, slots=True)
class TableResult:
    source_table: str
    target_table: str
    key_columns: tuple[str, ...]
    key_types: tuple[str, ...]
    rows_compared: int
    differences: Differences
    seconds: float

    @property
    def in_sync(self) -> bool:
        return self.differences.count == 0

    def keys(self) -> list[Key]:
        """Every differing key (missing, extra or changed), sorted, as text tuples."""
        return self.differences.keys()

    def key_condition(self, keys: Sequence[Key] | None = None) -> sql.Composed:
        """A WHERE condition matching ``keys`` (default: every differing key) on either table:
        ``(k1, k2) IN ((lit::type, lit::type), ...)``; ``false`` when there are none."""
        chosen = self.keys() if keys is None else list(keys)
        if not chosen:
            return sql.SQL("false").format()
        columns = sql.SQL(", ").join(sql.Identifier(c) for c in self.key_columns)
        rows = sql.SQL(", ").join(
            sql.SQL("({})").format(sql.SQL(", ").join(
                sql.SQL("{}::{}").format(sql.Literal(v), sql.SQL(t))
                for v, t in zip(key, self.key_types, strict=True)))
            for key in chosen)
        return sql.SQL("({}) IN ({})").format(columns, rows)

    def as_json(self) -> dict[str, Any]:
        def listing(keys: tuple[Key, ...]) -> dict[str, Any]:
            return {"count": len(keys),
                    "keys": [dict(zip(self.key_columns, k, strict=True))
                             for k in keys[:KEYS_SHOWN]]}

        return {
            "table": self.source_table,
            "target_table": self.target_table,
            "in_sync": self.in_sync,
            "rows_compared": self.rows_compared,
            "missing_on_target": listing(self.differences.missing),
            "extra_on_target": listing(self.differences.extra),
            "different": listing(self.differences.differ),
            "seconds": round(self.seconds, 3),
        }


@dataclass
class VerifyReport:
    tables: list[TableResult] = field(default_factory=list)

    @property
    def in_sync(self) -> bool:
        return all(t.in_sync for t in self.tables)

    def as_json(self) -> dict[str, Any]:
        return {"in_sync": self.in_sync, "tables": [t.as_json() for t in self.tables]}

    def lines(self) -> list[str]:
        """The terminal table, then up to a few keys of each differing table."""
        head = ("table", "rows", "missing", "extra", "differ", "seconds", "")
        rows = [(t.source_table, str(t.rows_compared), str(len(t.differences.missing)),
                 str(len(t.differences.extra)), str(len(t.differences.differ)),
                 f"{t.seconds:.2f}", "ok" if t.in_sync else "DIFFERS") for t in self.tables]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        out = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) if i < 6 else c
                         for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
               for r in [head, *rows]]
        for t in self.tables:
            for kind, keys in (("missing on target", t.differences.missing),
                               ("extra on target", t.differences.extra),
                               ("different", t.differences.differ)):
                shown = ", ".join(_key_text(t.key_columns, k) for k in keys[:10])
                more = f" (and {len(keys) - 10} more)" if len(keys) > 10 else ""
                if keys:
                    out.append(f"{t.source_table}: {kind}: {shown}{more}")
        return out


def _key_text(columns: tuple[str, ...], key: Key) -> str:
    if len(columns) == 1:
        return key[0]
    return "(" + ", ".join(f"{c}={v}" for c, v in zip(columns, key, strict=True)) + ")"
