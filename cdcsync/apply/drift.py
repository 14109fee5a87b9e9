"""Schema drift: how a source relation differs from its target table, and what cdcsync does.

Pure: the caller reads both catalogs. A column new on the source is added on the target
(``[apply] schema_changes = "add_columns"``) or halts (``"halt"``); a dropped column, a changed
type or a changed primary key always halts, with the SQL and command that resolve it, because
guessing would lose or corrupt data. The checkpoint stays before the change, so once the operator
has fixed the target, ``cdcsync run`` resumes with nothing lost.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cdcsync.errors import SchemaMismatch
from cdcsync.model import Relation


@dataclass(frozen=True, slots=True)
class TargetShape:
    """What the target catalog says about the table a relation lands in."""

    name: str
    types: Mapping[str, str]
    primary_key: Sequence[str]


def reconcile(relation: Relation, source_types: Sequence[str], target: TargetShape, *,
              excluded: frozenset[str], previous: Relation | None,
              policy: str) -> tuple[tuple[str, str], ...]:
    """The columns to add on the target, as (name, type); raise :class:`SchemaMismatch` for a
    change that needs the operator."""
    source = relation.qualified
    replicated = [(c.name, t) for c, t in zip(relation.columns, source_types, strict=True)
                  if c.name not in excluded]
    if previous is not None:
        dropped = [c for c in previous.column_names
                   if c not in relation.column_names and c not in excluded and c in target.types]
        if dropped:
            columns = ", ".join(dropped)
            drops = " ".join(f"ALTER TABLE {target.name} DROP COLUMN {c};" for c in dropped)
            raise SchemaMismatch(
                f"column(s) {columns} were dropped from the source table {source}; "
                f"the target {target.name} still has them",
                fix=f"run {drops} on the target (or keep them as nullable target-only columns), "
                    "then `cdcsync run`")
    for name, source_type in replicated:
        target_type = target.types.get(name)
        if target_type is not None and target_type != source_type:
            raise SchemaMismatch(
                f"column {name} of {source} changed type: {source_type} on the source, "
                f"{target_type} on the target {target.name}",
                fix=f"run ALTER TABLE {target.name} ALTER COLUMN {name} TYPE {source_type} "
                    f"USING {name}::{source_type}; on the target, then `cdcsync run` (or "
                    f"`cdcsync resync {source}` if existing values must be copied again)")
    if relation.replica_identity == "d":
        source_key = [c.name for c in relation.columns if c.is_key]
        if source_key and target.primary_key and set(source_key) != set(target.primary_key):
            wanted = ", ".join(source_key)
            raise SchemaMismatch(
                f"the primary key of {source} changed: ({wanted}) on the source, "
                f"({', '.join(target.primary_key)}) on the target {target.name}",
                fix=f"on the target drop the old primary key and run ALTER TABLE {target.name} "
                    f"ADD PRIMARY KEY ({wanted}); then `cdcsync resync {source}`")
    missing = tuple((name, t) for name, t in replicated if name not in target.types)
    if missing and policy == "halt":
        raise missing_columns(source, target.name, missing)
    return missing


def missing_columns(source: str, target: str,
                    missing: Sequence[tuple[str, str]]) -> SchemaMismatch:
    """The error for source columns the target lacks while they are not to be added."""
    adds = " ".join(f"ALTER TABLE {target} ADD COLUMN {n} {t};" for n, t in missing)
    return SchemaMismatch(
        f"column(s) {', '.join(n for n, _ in missing)} of the source table {source} are "
        f"missing on the target {target} (schema_changes = \"halt\")",
        fix=f"run {adds} on the target, or list them in exclude_columns, then `cdcsync run`")
