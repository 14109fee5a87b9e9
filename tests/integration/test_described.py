"""What a start knows already spares it questions on the reader's path: the checks' catalog rows
of the target tables (cdcsync.prerequisites.check_target) resolve the first stream's tables
without asking the target again, and nothing later does; the source is not asked how it spells
built-in types."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from cdcsync.apply import tables
from cdcsync.model import Column, Relation, TargetTable
from cdcsync.source import catalog
from tests.conftest import DbPair
from tests.harness import converged, execute, running, set_up, settings_for, wait_for

Resolved = list[tuple[str, bool]]


@pytest.fixture(scope="module")
def pair(dbpair: DbPair) -> DbPair:
    return set_up(dbpair, "CREATE TABLE d (id int PRIMARY KEY, v int)",
                  "CREATE TABLE e (id int PRIMARY KEY, s varchar(10))")


@pytest.fixture
def resolved(monkeypatch: pytest.MonkeyPatch) -> Iterator[Resolved]:
    """Each table the daemon resolves, and whether it was given the catalog's rows."""
    calls: Resolved = []
    real = tables.resolve

    def spy(conn: Any, settings: Any, relation: Relation, **kwargs: Any) -> TargetTable:
        calls.append((relation.qualified, kwargs.get("rows") is not None))
        return real(conn, settings, relation, **kwargs)

    monkeypatch.setattr(tables, "resolve", spy)
    yield calls


def _write(pair: DbPair, first: int) -> None:
    execute(pair.source_dsn, f"INSERT INTO d SELECT g, g FROM generate_series({first}, "
                             f"{first + 9}) g", f"UPDATE d SET v = -v WHERE id = {first}")


def test_the_first_stream_resolves_from_the_checks_and_a_reconnect_asks(
        pair: DbPair, resolved: Resolved) -> None:
    settings = settings_for(pair)
    _write(pair, 1)
    with running(settings) as runner:
        # The initial snapshot comes after the checks: the stream behind it asks the target.
        wait_for(converged(pair, ["public.d"]), runner=runner, what="the snapshot")
        _write(pair, 11)
        wait_for(converged(pair, ["public.d"]), runner=runner, what="the first stream")
    assert ("public.d", True) not in resolved
    resolved.clear()
    _write(pair, 21)
    with running(settings) as runner:
        wait_for(converged(pair, ["public.d"]), runner=runner, what="the backlog")
        assert resolved == [("public.d", True)]
        with psycopg.connect(pair.source_dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                         "WHERE slot_name = %s", (pair.slot,))
        _write(pair, 31)
        wait_for(converged(pair, ["public.d"]), runner=runner, timeout=30, what="a reconnect")
    assert resolved == [("public.d", True), ("public.d", False)]


def test_builtin_types_are_spelt_as_the_source_spells_them(pair: DbPair) -> None:
    with psycopg.connect(pair.source_dsn, autocommit=True) as conn:
        for oid, name in catalog.BUILTIN_TYPE_NAMES.items():
            row = conn.execute("SELECT format_type(%s, -1)", (oid,)).fetchone()
            assert row == (name,), f"type {oid}"


def test_only_a_table_with_a_modifier_asks_the_source_for_its_types(
        pair: DbPair, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []
    real = catalog.column_types

    def spy(conn: Any, relation: Relation) -> list[str]:
        asked.append(relation.qualified)
        return real(conn, relation)

    monkeypatch.setattr(catalog, "column_types", spy)
    execute(pair.source_dsn, "INSERT INTO d VALUES (1001, 1)", "INSERT INTO e VALUES (1, 'x')")
    with running(settings_for(pair)) as runner:
        wait_for(converged(pair, ["public.d", "public.e"]), runner=runner, what="both tables")
    assert asked == ["public.e"]
    relation = Relation(1, "public", "f", "d", (Column("s", 1043, 14, False),))
    assert catalog.builtin_column_types(relation) is None
