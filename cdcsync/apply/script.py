"""A flush of the applier as one simple query, so a batch costs the target two round trips. Pure.

``BEGIN; [CREATE TEMP stage | TRUNCATE stage;] COPY stage FROM STDIN; [window keys;] SAVEPOINT;
merge statements; RELEASE; conflict records; [checkpoint; COMMIT]`` travels at once: the server
answers up to the COPY (one wait), takes the staged rows, runs the rest (the second wait). Each
further table's COPY costs one more wait. A batch of inserts alone skips the stage: it is copied
straight into its table inside the merge (:func:`copy_straight`). Nothing in the script needs an
answer to an earlier statement: the conflict rule marks a change it turns down
(:func:`cdcsync.apply.sql.lost_mark`), and the statement recording conflicts runs only where a mark
is set. The server stops at the first failing statement; :meth:`Script.refused` tells whether that
was the merge (the batch goes to the fallbacks, from the savepoint) or anything else (the error
stands).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from cdcsync.apply import sql as q
from cdcsync.apply import window
from cdcsync.model import Relation, TableRows, TargetTable
from cdcsync.source.tuples import (
    COPY_HEADER,
    COPY_TRAILER,
    META_COLUMNS,
    staged_extension,
    text_rows,
)

LatestVersions = Callable[[Sequence[bytes], Sequence[int]], list[bytes] | None]


_STAGED: Final = staged_extension()
# None without the compiled extension: the merge collapses the stage then.
LATEST_VERSIONS: Final[LatestVersions | None] = (None if _STAGED is None
                                                 else _STAGED.latest_versions)
BEGIN = sql.SQL("BEGIN")
COMMIT = sql.SQL("COMMIT")
SAVEPOINT = sql.SQL("SAVEPOINT cdcsync_flush")
RELEASE = sql.SQL("RELEASE SAVEPOINT cdcsync_flush")
ROLLBACK_TO = sql.SQL("ROLLBACK TO SAVEPOINT cdcsync_flush")


@dataclass(slots=True)
class Staged:
    """Everything staged for one target table since the last flush."""

    table: TargetTable
    relation: Relation
    stage: str
    # The chunks' rows of this table, in source order.
    chunks: list[TableRows] = field(default_factory=list)
    only_inserts: bool = True
    inserts: int = 0
    deletes: int = 0
    unchanged_mask: int = 0
    # The keys staged so far while every chunk said which (TableRows.keys), else None; and
    # whether some key was staged twice: without that, the collapse has nothing to drop.
    keys: set[bytes] | None = field(default_factory=set)
    repeats: bool = False
    # Chunks of inserts alone whose keys are made only if a change of another kind joins them.
    unkeyed: list[TableRows] = field(default_factory=list)
    # Copied straight into the target table in the merge, not staged (see copy_straight).
    direct: bool = False
    # Whether the values are binary: the stage has the source's types (TargetTable.binary_types)
    # and a straight COPY is in binary format.
    binary: bool = False
    # Whether the stage holds each key's last version only, the others dropped before the COPY
    # (see stage): the merge then has nothing to collapse.
    collapsed: bool = False

    def add_keys(self, rows: TableRows) -> None:
        """Count the keys of ``rows``, a chunk just added, towards :attr:`repeats`."""
        if self.keys is None:
            return
        if rows.keys is None and rows.keyer is None:
            self.keys = None
            self.repeats = True
            return
        if rows.keyer is not None and self.only_inserts:
            self.unkeyed.append(rows)
            return
        for chunk in (*self.unkeyed, rows):
            keys = chunk.keyer() if chunk.keyer is not None else chunk.keys or set()
            staged = len(self.keys) + chunk.inserts + chunk.updates + chunk.deletes
            self.keys |= keys
            self.repeats = self.repeats or len(self.keys) < staged
        self.unkeyed.clear()

    @property
    def changes(self) -> int:
        return sum(c.inserts + c.updates + c.deletes for c in self.chunks)

    def staged_rows(self) -> list[bytes]:
        """The staged rows of every chunk (see :mod:`cdcsync.source.tuples`)."""
        return [rows for chunk in self.chunks for rows in chunk.staged()]

    @property
    def straight_rows(self) -> bool:
        """Whether the reader made the COPY rows of every chunk (binary values are copied
        straight only then)."""
        return all(chunk.text is not None for chunk in self.chunks)

    def straight_data(self) -> bytes:
        """The COPY data of the rows (inserts alone) for the target's columns: as the reader
        made them (binary ones with the header and trailer of binary COPY), or, text ones,
        converted from the staged rows where it did not."""
        texts = [chunk.text for chunk in self.chunks if chunk.text is not None]
        if self.binary:
            return b"".join((COPY_HEADER, *texts, COPY_TRAILER))
        if len(texts) == len(self.chunks):
            return b"".join(texts)
        return text_rows(self.staged_rows(), len(self.relation.columns), self.table.positions)


@dataclass(slots=True)
class Script:
    """Statements to send as one query, the data of each COPY in it, and what their results
    mean."""

    # Statements still to render, or rendered already (a merge reused, see Rendered).
    statements: list[sql.Composable | bytes] = field(default_factory=list)
    copies: list[bytes] = field(default_factory=list)
    # Statement index -> (source table name, operation) of each conflict-recording statement.
    conflicts: dict[int, tuple[str, str]] = field(default_factory=dict)
    # Indexes of the statements inside the merge's savepoint.
    merge: range = range(0)
    # The statement whose end Merger.run reports (a lane's lock taken), if any.
    reached: int | None = None

    def add(self, statement: sql.Composable) -> int:
        self.statements.append(statement)
        return len(self.statements) - 1

    def rendered(self, conn: psycopg.Connection[TupleRow]) -> Rendered:
        """This script's statements as bytes, with what their results mean, to splice into
        later scripts."""
        return Rendered(tuple(self._bytes(s, conn) for s in self.statements), self.merge,
                        dict(self.conflicts))

    def splice(self, part: Rendered) -> None:
        """Append ``part``'s statements; its merge and conflict records become this script's."""
        first = len(self.statements)
        self.statements.extend(part.statements)
        self.merge = range(first + part.merge.start, first + part.merge.stop)
        self.conflicts.update({first + i: what for i, what in part.conflicts.items()})

    def refused(self, failed: int) -> bool:
        """Whether the statement at ``failed`` is part of the merge: the target refused the
        merged batch, and rolling back to the savepoint undoes just that."""
        return failed in self.merge

    def render(self, conn: psycopg.Connection[TupleRow]) -> bytes:
        return b"; ".join(self._bytes(s, conn) for s in self.statements)

    @staticmethod
    def _bytes(statement: sql.Composable | bytes, conn: psycopg.Connection[TupleRow]) -> bytes:
        return statement if isinstance(statement, bytes) else statement.as_bytes(conn)


@dataclass(frozen=True, slots=True)
class Rendered:
    """A merge rendered once: building and rendering the statements of a flush cost about a
    millisecond, paid at every commit of a steady stream, where a flush's shape repeats."""

    statements: tuple[bytes, ...]
    merge: range
    conflicts: dict[int, tuple[str, str]]


def stage(script: Script, batch: Staged, *, create: bool, truncate: bool,
          window_name: str | None, collapse: bool = False) -> None:
    """Copy ``batch`` into its stage (made or emptied first); record its keys in the window of
    a resync chunk being read. With ``collapse``, a key staged more than once is staged in its
    last version only, where nothing needs the earlier ones (see :func:`collapses`)."""
    if create:
        script.add(q.create_stage(batch.stage, batch.relation,
                                  batch.table.binary_types if batch.binary else None))
    if truncate:
        script.add(q.truncate_stage(batch.stage))
    script.add(q.copy_into(batch.stage))
    rows = batch.staged_rows()
    latest = LATEST_VERSIONS if collapse and collapses(batch) else None
    batch.collapsed = latest is not None
    if latest is not None:
        rows = latest(rows, sorted(len(META_COLUMNS) + k for k in batch.table.source_key)) or rows
    script.copies.append(b"".join((COPY_HEADER, *rows, COPY_TRAILER)))
    if window_name is not None:
        script.add(window.record_keys(window_name, batch.stage, batch.table))


def collapses(batch: Staged) -> bool:
    """Whether the earlier versions of a key ``batch`` stages twice are dropped before its COPY
    (:data:`LATEST_VERSIONS`) rather than by the merge: the target then neither stores them nor
    scans the stage twice and hashes every key to find them, and they do not cross the link.
    Not where a TOASTed value left unchanged is taken from an earlier version (the fills read
    them from the stage), and only with the compiled extension: walking the rows in Python
    costs the applier more than the target saves."""
    return (LATEST_VERSIONS is not None and batch.repeats and not batch.only_inserts
            and not batch.unchanged_mask)


def merge(script: Script, batches: list[Staged], upserts: dict[int, list[sql.Composed]]) -> None:
    """The bulk merge of ``batches`` (in foreign-key order) in a savepoint: marks cleared, TOAST
    values filled, every version of a key but the last dropped, then the batches copied straight
    and ``upserts`` (per table oid) parents first, and deletes children first (parents' rows
    must exist before children reference them, children must be gone before their parents are
    deleted). After it, the changes the conflict rule turned down are recorded, for the tables
    where it marked one."""
    first = script.add(SAVEPOINT)
    marks = [q.lost_mark(b.table, op) for b in batches for op in _ruled(b)]
    if marks:
        # Marks set earlier in this transaction (a fallback, an earlier flush) say nothing here.
        script.add(sql.SQL("SELECT {}").format(sql.SQL(", ").join(
            sql.SQL("set_config({}, 'off', true)").format(sql.Literal(m)) for m in marks)))
    for batch in batches:
        for statement in fills(batch):
            script.add(statement)
        if batch.repeats and not batch.only_inserts and not batch.collapsed:
            script.add(q.keep_last_versions(batch.stage, batch.table))
    for batch in batches:
        if batch.direct:
            copy_straight(script, batch)
        for statement in upserts.get(batch.table.oid, ()):
            script.add(statement)
    for batch in reversed(batches):
        if batch.deletes:
            script.add(q.delete(batch.stage, batch.table))
    script.merge = range(first + 1, script.add(RELEASE))
    for batch in batches:
        for operation in _ruled(batch):
            index = script.add(q.record_conflicts(batch.stage, batch.table, operation,
                                                  q.lost_marked(batch.table, operation)))
            script.conflicts[index] = (batch.table.source_name, operation)


def copy_straight(script: Script, batch: Staged) -> None:
    """COPY the batch's rows (inserts only) into the target table itself, in text format: about
    40% cheaper for the target than the staging COPY and an INSERT ... SELECT casting every value.
    Like the plain insert it stands for, it fails if a key is already there; the merge's
    savepoint then undoes it and the batch is staged for the fallbacks. The rows are the
    script's to add (:func:`straight_copies`): the statement is reused, the rows are not."""
    script.add(q.copy_straight_into(batch.table, binary=batch.binary))


def straight_copies(batches: list[Staged]) -> list[bytes]:
    """The data of the merge's COPY statements straight into tables, in their order."""
    return [b.straight_data() for b in batches if b.direct]


def _ruled(batch: Staged) -> list[str]:
    """The operations of ``batch`` the conflict rule can turn down."""
    table = batch.table
    if table.conflict is None or batch.direct:
        return []
    return ["upsert", "delete"] if batch.deletes and table.conflict_is_time else ["upsert"]


def fills(batch: Staged) -> list[sql.Composed]:
    """The statements giving rows that left TOASTed columns unchanged their values."""
    relation = batch.relation
    types = batch.table.binary_types if batch.binary else None
    return [q.fill_unchanged(batch.stage, batch.table, relation, column,
                             types[i] if types else "text")
            for i, column in enumerate(relation.column_names)
            if batch.unchanged_mask >> i & 1 and column in batch.table.columns]


def commit(script: Script, *save: sql.Composable) -> None:
    """End the script with ``save`` (the checkpoint's statements) and the COMMIT."""
    for statement in save:
        script.add(statement)
    script.add(COMMIT)
