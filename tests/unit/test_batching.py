"""Collector: the final state per key, TOAST fill-in, key changes, source order kept."""

from __future__ import annotations

from cdcsync.apply.batching import Collector, TxnMeta, group_by_mask
from cdcsync.apply.tables import TargetTable
from cdcsync.model import UNCHANGED, Column, Relation, RowChange

REL = Relation(1, "public", "t", "d", (Column("id", 23, -1, True), Column("big", 25, -1, False),
                                       Column("n", 23, -1, False)))
TABLE = TargetTable("public.t", 50, "public", "t", ("id", "big", "n"), ("int", "text", "int"),
                    (0, 1, 2), True, (0,), (0,), None, False)
META = TxnMeta(b"2026-01-01T00:00:00+00:00", b"0/10")


def _ins(*row: bytes | None) -> RowChange:
    return RowChange("I", REL, row, None)


def test_insert_then_updates_collapse_to_last_version() -> None:
    """Several versions of one key in a batch become one upsert of the last version."""
    c = Collector()
    c.add(TABLE, _ins(b"1", b"big", b"1"), META)
    c.add(TABLE, RowChange("U", REL, (b"1", UNCHANGED, b"2"), None), META)
    batch = c.tables[TABLE.oid]
    assert {k: u.row for k, u in batch.upserts.items()} == {(b"1",): (b"1", b"big", b"2")}
    assert len(c) == 2


def test_unchanged_toast_without_earlier_version_stays_unchanged() -> None:
    """An update lacking a TOASTed value it cannot fill in is grouped as a partial update."""
    c = Collector()
    c.add(TABLE, RowChange("U", REL, (b"1", UNCHANGED, b"2"), None), META)
    c.add(TABLE, _ins(b"2", b"b", b"3"), META)
    groups = group_by_mask(c.tables[TABLE.oid].upserts)
    assert set(groups) == {(), (False, True, False)}


def test_delete_wins_over_earlier_upsert_and_insert_after_delete_wins() -> None:
    """Anything then a delete is a delete; a delete then an insert is an upsert."""
    c = Collector()
    c.add(TABLE, _ins(b"1", b"a", b"1"), META)
    c.add(TABLE, RowChange("D", REL, None, (b"1", None, None)), META)
    c.add(TABLE, RowChange("D", REL, None, (b"2", None, None)), META)
    c.add(TABLE, _ins(b"2", b"b", b"2"), META)
    batch = c.tables[TABLE.oid]
    assert list(batch.deletes) == [(b"1",)]
    assert list(batch.upserts) == [(b"2",)]


def test_primary_key_change_deletes_old_key() -> None:
    """An update with an old-key tuple naming another key deletes that key and upserts the new."""
    c = Collector()
    c.add(TABLE, RowChange("U", REL, (b"9", b"a", b"1"), (b"7", None, None)), META)
    batch = c.tables[TABLE.oid]
    assert list(batch.deletes) == [(b"7",)]
    assert list(batch.upserts) == [(b"9",)]
    assert [s.row is None for s in c.steps] == [True, False]
