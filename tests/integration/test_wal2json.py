"""wal2json specifics against real servers: a slot made with the other plugin is refused
everywhere, and a restarted daemon handles tables whose first change is an update or delete."""

from __future__ import annotations

import psycopg
import pytest

from cdcsync import admin
from cdcsync.daemon import DaemonThread
from cdcsync.errors import PrerequisiteError
from cdcsync.source import catalog
from tests.conftest import DbPair
from tests.harness import converged, execute, running, settings_for, table_rows, wait_for

SCHEMA = """
CREATE TABLE docs (id int PRIMARY KEY, title text, body text,
                   updated_at timestamptz NOT NULL DEFAULT now());
ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
CREATE TABLE unlisted (id int PRIMARY KEY);
"""
REFUSAL = ("replication slot '{slot}' was created with the pgoutput plugin, but [source] decoder "
           "is 'wal2json' — fix: set [source] decoder = \"pgoutput\", or run `cdcsync teardown "
           "--yes` and `cdcsync setup` to recreate the slot with wal2json (then re-copy the "
           "tables)")


@pytest.fixture(scope="module")
def pair(dbpair: DbPair) -> DbPair:
    execute(dbpair.source_dsn, SCHEMA)
    return dbpair


def test_slot_of_the_other_plugin_is_refused(pair: DbPair) -> None:
    """setup, check and run each refuse a pgoutput slot when configured for wal2json (an
    initial snapshot would re-create the slot, so none is asked for here)."""
    never = {"mode": "never"}
    admin.setup(settings_for(pair, ("public.docs",), snapshot=never), create_tables=True)
    wrong = settings_for(pair, ("public.docs",), source={"decoder": "wal2json"}, snapshot=never)
    expected = REFUSAL.format(slot=pair.slot)
    with pytest.raises(PrerequisiteError) as setup_error:
        admin.setup(wrong, create_tables=False)
    assert str(setup_error.value) == expected
    assert ("FAIL", "slot", expected) in admin.check(wrong).lines
    runner = DaemonThread(wrong)
    runner.start()
    runner.join(30)
    assert isinstance(runner.error, PrerequisiteError)
    assert str(runner.error) == expected
    admin.teardown(settings_for(pair))


def test_first_change_after_restart_is_an_update_or_delete(pair: DbPair) -> None:
    """After a restart the relation comes from the catalog: an update leaving the TOASTed body
    alone keeps it, and a delete losing to a newer target row is refused and logged."""
    settings = settings_for(pair, ("public.docs",), source={"decoder": "wal2json"})
    admin.setup(settings, create_tables=False)
    big = "x" * 5000
    with running(settings) as runner:
        execute(pair.source_dsn, f"INSERT INTO docs VALUES (1, 'a', '{big}'), (2, 'b', 'short')",
                "INSERT INTO unlisted VALUES (1)")
        wait_for(converged(pair, ["public.docs"]), runner=runner, what="first rows")
    execute(pair.target_dsn, "UPDATE docs SET updated_at = now() + interval '1 hour' "
                             "WHERE id = 2")
    with running(settings) as runner:
        execute(pair.source_dsn, "DELETE FROM docs WHERE id = 2",
                "UPDATE docs SET title = 'a2', updated_at = now() WHERE id = 1",
                "INSERT INTO docs VALUES (3, 'c', 'new')")
        wait_for(lambda: len(table_rows(pair.target_dsn, "public.docs")) == 3, runner=runner,
                 what="row 3")
    rows = {r[0]: r[1:3] for r in table_rows(pair.target_dsn, "public.docs")}
    assert rows == {1: ("a2", big), 2: ("b", "short"), 3: ("c", "new")}
    with psycopg.connect(pair.target_dsn) as conn:
        logged = conn.execute("SELECT key, operation FROM cdcsync.conflicts").fetchall()
    assert logged == [({"id": 2}, "delete")]


def test_missing_output_plugin_is_named(pair: DbPair) -> None:
    """Creating a slot with a plugin the server lacks says which and how to install it."""
    with psycopg.connect(pair.source_dsn, autocommit=True) as conn, \
            pytest.raises(PrerequisiteError) as error:
        catalog.create_slot(conn, f"{pair.slot}_x", "nosuchplugin")
    assert str(error.value) == (
        "the source server has no nosuchplugin output plugin — fix: install it on the source "
        "server (Debian: apt-get install postgresql-<version>-nosuchplugin), or set [source] "
        'decoder = "pgoutput"')
