"""Schema drift decisions on plain data: what is added, what halts and with which fix."""

from __future__ import annotations

import pytest

from cdcsync.apply.drift import TargetShape, reconcile
from cdcsync.errors import SchemaMismatch
from cdcsync.model import Column, Relation

TARGET = TargetShape("public.t", {"id": "integer", "v": "text"}, ["id"])


def _relation(*columns: tuple[str, bool], identity: str = "d") -> Relation:
    return Relation(1, "public", "t", identity,
                    tuple(Column(name, 25, -1, key) for name, key in columns))


def test_new_column_is_added_with_the_source_type() -> None:
    """add_columns returns the new column with the source's type; nothing else changes."""
    relation = _relation(("id", True), ("v", False), ("w", False))
    added = reconcile(relation, ["integer", "text", "numeric(5,1)"], TARGET,
                      excluded=frozenset(), previous=None, policy="add_columns")
    assert added == (("w", "numeric(5,1)"),)


def test_excluded_new_column_is_neither_added_nor_refused() -> None:
    """An excluded column is not replicated, so its absence on the target is fine."""
    relation = _relation(("id", True), ("v", False), ("w", False))
    assert reconcile(relation, ["integer", "text", "bytea"], TARGET, excluded=frozenset({"w"}),
                     previous=None, policy="halt") == ()


def test_full_replica_identity_is_not_taken_for_a_key_change() -> None:
    """With REPLICA IDENTITY FULL every column is flagged as key; that is not a new key."""
    relation = _relation(("id", True), ("v", True), identity="f")
    assert reconcile(relation, ["integer", "text"], TARGET, excluded=frozenset(),
                     previous=None, policy="add_columns") == ()


@pytest.mark.parametrize(("columns", "types", "previous", "expected"), [
    ((("id", True), ("v", False), ("w", False)), ["integer", "text", "date"], None,
     "column(s) w of the source table public.t are missing on the target public.t"),
    ((("id", True), ("v", False)), ["integer", "varchar(3)"], None,
     "column v of public.t changed type: varchar(3) on the source, text on the target"),
    ((("id", True), ("v", True)), ["integer", "text"], None,
     "the primary key of public.t changed: (id, v) on the source, (id) on the target"),
    ((("id", True),), ["integer"], (("id", True), ("v", False)),
     "column(s) v were dropped from the source table public.t"),
])
def test_changes_that_need_the_operator_halt(columns: tuple[tuple[str, bool], ...],
                                             types: list[str],
                                             previous: tuple[tuple[str, bool], ...] | None,
                                             expected: str) -> None:
    """Under schema_changes = halt each change halts naming the table and the change."""
    before = _relation(*previous) if previous else None
    with pytest.raises(SchemaMismatch, match=expected.replace("(", r"\(").replace(")", r"\)")):
        reconcile(_relation(*columns), types, TARGET, excluded=frozenset(), previous=before,
                  policy="halt")
