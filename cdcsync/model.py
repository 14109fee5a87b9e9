"""The change model every stage shares: positions, relations, row changes and transactions.

Plain frozen data, no I/O. Values travel as the source's text representation (``bytes``), ``None``
for SQL NULL, or :data:`UNCHANGED` for a TOASTed column the source did not resend: the target casts
text with its own input functions, so user-defined types round-trip without type OIDs.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Final

_LSN_RE: Final = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")

PG_EPOCH: Final = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)


class Lsn(int):
    """A WAL position; prints as PostgreSQL does (``16/B374D848``)."""

    __slots__ = ()

    @classmethod
    def parse(cls, text: str) -> Lsn:
        match = _LSN_RE.match(text.strip())
        if match is None:
            raise ValueError(f"not an LSN: {text!r} (expected the form 16/B374D848)")
        return cls((int(match.group(1), 16) << 32) | int(match.group(2), 16))

    def __str__(self) -> str:
        return f"{self >> 32:X}/{self & 0xFFFFFFFF:X}"

    def __repr__(self) -> str:
        return f"Lsn('{self}')"


ZERO_LSN: Final = Lsn(0)


class Unchanged(Enum):
    """Marks a TOASTed column an update did not carry: the target keeps its value."""

    TOKEN = "unchanged"

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = Unchanged.TOKEN

Value = bytes | None | Unchanged
Row = tuple[Value, ...]


def pg_time(micros: int) -> dt.datetime:
    """Convert PostgreSQL's microseconds since 2000-01-01 UTC into an aware datetime."""
    return PG_EPOCH + dt.timedelta(microseconds=micros)


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type_oid: int
    type_modifier: int
    is_key: bool


@dataclass(frozen=True, slots=True)
class Relation:
    """A source table as the stream last described it: a pgoutput Relation message, or what
    wal2json's changes and the source catalog tell (:mod:`cdcsync.source.wal2json_assembler`)."""

    oid: int
    schema: str
    name: str
    replica_identity: str
    columns: tuple[Column, ...]

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)


@dataclass(frozen=True, slots=True)
class TargetTable:
    """Where a source relation lands: the replicated columns (names as on the source and the
    target), their target types, their positions in the source row, the key and conflict column."""

    source_name: str
    oid: int
    schema: str
    name: str
    columns: tuple[str, ...]
    types: tuple[str, ...]
    positions: tuple[int, ...]
    key: tuple[int, ...]
    source_key: tuple[int, ...]
    conflict: int | None
    conflict_is_time: bool
    # Columns new on the source, as (name, type): the applier adds them to the target table in
    # the target transaction that first applies rows of this relation.
    add_columns: tuple[tuple[str, str], ...] = ()
    # Whether row-level security applies to the applying role there: COPY FROM refuses such a
    # table even where INSERT passes its policies.
    row_security: bool = False
    # Where the stream carries this relation's values in binary (pgoutput's binary mode): the
    # source's type of every relation column, which its staging table takes; else None. A
    # replicated column has the same type on the target (a differing one halts: schema drift),
    # so binary rows of inserts go straight into the target table too.
    binary_types: tuple[str, ...] | None = None

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True, slots=True)
class Truncate:
    """A source TRUNCATE of one or more tables, in the transaction's order of changes."""

    tables: tuple[TargetTable, ...]
    cascade: bool
    restart_identity: bool


@dataclass(frozen=True, slots=True)
class TxnStart:
    """A source transaction begins; ``final_lsn`` is its commit record's LSN."""

    xid: int
    final_lsn: Lsn
    commit_time: dt.datetime


@dataclass(slots=True)
class TableRows:
    """Staged rows of one relation (see :mod:`cdcsync.source.tuples`), in source order; the
    counts and the union of unchanged-TOAST masks let the applier skip work it does not need."""

    relation: Relation
    target: TargetTable
    rows: list[bytes] = field(default_factory=list)
    inserts: int = 0
    updates: int = 0
    deletes: int = 0
    unchanged_mask: int = 0
    # The distinct keys the rows change, as raw fields, or None when the decoder does not say:
    # fewer keys than rows means some key changes more than once and versions need collapsing.
    keys: set[bytes] | None = None
    # Rows of inserts alone as COPY rows of the target's columns (text, or binary where the
    # values are), made by the reader, so that a batch copied straight into its table costs the
    # applier no conversion; else None.
    text: bytes | None = None
    # Whether the values are in their binary form (see TargetTable.binary_types).
    binary: bool = False
    # Where the reader made the text instead of staging the rows, how to stage them, for the
    # batches that are not copied straight after all (see staged); rows is empty until then.
    unstaged: Callable[[], tuple[bytes, int]] | None = None
    # Where the rows are inserts alone and keys is None, how to make their keys: the applier
    # needs them only when changes of other kinds join them in a batch.
    keyer: Callable[[], set[bytes]] | None = None

    def staged(self) -> list[bytes]:
        """The staged rows, staged now if the reader only made their text."""
        if self.unstaged is not None:
            self.rows.append(self.unstaged()[0])
            self.unstaged = None
        return self.rows


@dataclass(frozen=True, slots=True)
class ChangeChunk:
    """Consecutive changes of the open transaction, bounded in size so memory stays bounded."""

    tables: tuple[TableRows, ...]
    rows: int
    size_bytes: int


@dataclass(frozen=True, slots=True)
class TxnEnd:
    """The transaction committed; ``end_lsn`` is the position to checkpoint and confirm."""

    end_lsn: Lsn
    commit_time: dt.datetime


@dataclass(frozen=True, slots=True)
class SourceMessage:
    """A ``pg_logical_emit_message`` record (heartbeats and resync watermarks use these)."""

    lsn: Lsn
    transactional: bool
    prefix: str
    content: bytes


@dataclass(frozen=True, slots=True)
class CopiedRows:
    """Rows read from a source table by a snapshot or resync, in the staging format of
    :mod:`cdcsync.source.tuples` (concatenated binary COPY rows, inserts)."""

    relation: Relation
    target: TargetTable
    data: bytes
    rows: int


StreamItem = TxnStart | ChangeChunk | Truncate | TxnEnd | SourceMessage
