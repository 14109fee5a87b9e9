"""The applier's one-query flush, as strings: what it holds, in which order, what results mean."""

from __future__ import annotations

from psycopg import sql

from cdcsync import checkpoint
from cdcsync.apply import script as plan
from cdcsync.apply import sql as q
from cdcsync.model import Column, Lsn, Relation, TableRows, TargetTable
from cdcsync.source.tuples import COPY_HEADER, COPY_TRAILER, stage_values

RELATION = Relation(1, "public", "items", "d", (
    Column("id", 23, -1, True), Column("qty", 23, -1, False),
    Column("updated_at", 1184, -1, False)))


def _table(oid: int, name: str, *, conflict: int | None = 2) -> TargetTable:
    return TargetTable(f"public.{name}", oid, "public", name, ("id", "qty", "updated_at"),
                       ("integer", "integer", "timestamp with time zone"), (0, 1, 2), (0,),
                       (0,), conflict, conflict is not None)


def _staged(table: TargetTable, *, deletes: int = 0) -> plan.Staged:
    chunks = [TableRows(RELATION, table, [b"row1"]), TableRows(RELATION, table, [b"row2"])]
    return plan.Staged(table, RELATION, q.stage_name(table, RELATION), chunks,
                       only_inserts=False, inserts=1, deletes=deletes)


def _text(statement: sql.Composable | bytes) -> str:
    return statement.decode() if isinstance(statement, bytes) else statement.as_string(None)


def _upserts(*batches: plan.Staged) -> dict[int, list[sql.Composed]]:
    return {b.table.oid: [q.upsert(b.stage, b.table)] for b in batches}


def test_one_table_batch_is_one_query_with_its_copy_in_the_middle() -> None:
    """Stage, COPY, savepoint, marks cleared, upsert, release, gated conflict record,
    checkpoint, COMMIT: the COPY's data is the staged rows framed as binary COPY."""
    batch = _staged(_table(7, "items"))
    script = plan.Script()
    script.add(plan.BEGIN)
    plan.stage(script, batch, create=True, truncate=False, window_name=None)
    plan.merge(script, [batch], _upserts(batch))
    plan.commit(script, checkpoint.save_statement("slot", Lsn(0x10), None))
    texts = [_text(s) for s in script.statements]
    assert [t.split(" ")[0] for t in texts] == [
        "BEGIN", "CREATE", "COPY", "SAVEPOINT", "SELECT", "INSERT", "RELEASE", "INSERT",
        "\nINSERT", "COMMIT"]
    assert texts[2] == f'COPY "{batch.stage}" FROM STDIN (FORMAT binary)'
    assert script.copies == [COPY_HEADER + b"row1row2" + COPY_TRAILER]
    assert texts[4] == "SELECT set_config('cdcsync.lost_7_upsert', 'off', true)"
    assert "ELSE set_config('cdcsync.lost_7_upsert', 'on', true) IS NULL END" in texts[5]
    assert "INTO cdcsync.conflicts" in texts[7]
    assert texts[7].endswith(" AND current_setting('cdcsync.lost_7_upsert', true) = 'on'")
    assert script.conflicts == {7: ("public.items", "upsert")}
    assert [i for i in range(len(texts)) if script.refused(i)] == [4, 5]


def test_without_a_conflict_rule_nothing_is_marked_or_recorded() -> None:
    """A table without a conflict column has no marks to clear and no conflicts to record."""
    batch = _staged(_table(8, "plain", conflict=None))
    script = plan.Script()
    plan.stage(script, batch, create=False, truncate=True, window_name="cdcsync_window_8")
    plan.merge(script, [batch], _upserts(batch))
    texts = [_text(s) for s in script.statements]
    assert [t.split(" ")[0] for t in texts] == [
        "TRUNCATE", "COPY", "INSERT", "SAVEPOINT", "INSERT", "RELEASE"]
    assert texts[2].startswith('INSERT INTO "cdcsync_window_8"')
    assert "set_config" not in texts[4]
    assert script.conflicts == {}
    assert [i for i in range(len(texts)) if script.refused(i)] == [4]


def test_parents_upsert_first_children_delete_first_and_deletes_are_ruled() -> None:
    """Two tables: upserts in the order given, deletes reversed; with a time conflict column a
    delete the rule turns down is marked and recorded on its own."""
    parent = _staged(_table(1, "parent"), deletes=1)
    child = _staged(_table(2, "child"), deletes=1)
    script = plan.Script()
    for batch in (parent, child):
        plan.stage(script, batch, create=False, truncate=False, window_name=None)
    plan.merge(script, [parent, child], _upserts(parent, child))
    texts = [_text(s) for s in script.statements]
    writes = [t for t in texts if t.startswith(('INSERT INTO "public"', 'DELETE FROM "public"'))]
    assert [w.split('"')[3] for w in writes] == ["parent", "child", "child", "parent"]
    assert "set_config('cdcsync.lost_2_delete', 'on', true)" in writes[2]
    assert sorted(script.conflicts.values()) == [
        ("public.child", "delete"), ("public.child", "upsert"),
        ("public.parent", "delete"), ("public.parent", "upsert")]
    assert len(script.copies) == 2


def test_a_batch_copied_straight_sits_in_foreign_key_order_and_records_nothing() -> None:
    """A parent's batch of inserts copied straight into its table comes before the child's
    upsert, inside the savepoint, with its rows as text COPY; it has no marks or records (a key
    already there fails the COPY, and the fallbacks take over)."""
    rows = stage_values(RELATION, [((b"1", b"5", b"2026-12-05 00:00:00+00"), ord("I"), 0, 0x10,
                                    0)])[0]
    parent = plan.Staged(_table(1, "parent"), RELATION, "unused",
                         [TableRows(RELATION, _table(1, "parent"), [rows], 1)], inserts=1,
                         direct=True)
    child = _staged(_table(2, "child"))
    script = plan.Script()
    plan.stage(script, child, create=False, truncate=False, window_name=None)
    plan.merge(script, [parent, child], _upserts(child))
    texts = [_text(s) for s in script.statements]
    assert [t.split(" ")[0] for t in texts] == [
        "COPY", "SAVEPOINT", "SELECT", "COPY", "INSERT", "RELEASE", "INSERT"]
    assert texts[3] == 'COPY "public"."parent" ("id", "qty", "updated_at") FROM STDIN'
    assert len(script.copies) == 1  # the child's stage: the straight rows are added apart
    assert plan.straight_copies([parent, child]) == [b"1\t5\t2026-12-05 00:00:00+00\n"]
    assert "lost_1" not in texts[2]
    assert list(script.conflicts.values()) == [("public.child", "upsert")]
    assert [i for i in range(len(texts)) if script.refused(i)] == [2, 3, 4]


def test_keys_of_inserts_alone_are_made_once_other_changes_join_them() -> None:
    """A batch of inserts alone never makes their keys (nothing to collapse); once a chunk with
    updates or deletes joins it, every chunk's keys count, and a key staged twice across them
    means versions to collapse."""
    table = _table(1, "items")
    made: list[int] = []

    def inserts(*keys: bytes) -> TableRows:
        def keyer() -> set[bytes]:
            made.append(len(keys))
            return set(keys)
        return TableRows(RELATION, table, [], inserts=len(keys), keyer=keyer)

    def batch(*chunks: TableRows) -> plan.Staged:
        staged = plan.Staged(table, RELATION, q.stage_name(table, RELATION))
        for chunk in chunks:
            staged.chunks.append(chunk)
            staged.only_inserts = staged.only_inserts and not (chunk.updates or chunk.deletes)
            staged.add_keys(chunk)
        return staged

    alone = batch(inserts(b"1", b"2"), inserts(b"3"))
    assert made == [] and not alone.repeats
    updated = batch(inserts(b"1", b"2"), TableRows(RELATION, table, [], updates=1, keys={b"2"}))
    assert made == [2] and updated.repeats and updated.keys == {b"1", b"2"}
    distinct = batch(inserts(b"1"), TableRows(RELATION, table, [], deletes=1, keys={b"5"}),
                     inserts(b"6", b"7"))
    assert made == [2, 1, 2] and not distinct.repeats
    assert distinct.keys == {b"1", b"5", b"6", b"7"}
    unknown = batch(inserts(b"1"), TableRows(RELATION, table, [], updates=1))
    assert unknown.keys is None and unknown.repeats
