"""Schema drift on the source: new columns added on the target, or a halt naming the change and
its fix; after the operator's fix the next run resumes from the checkpoint with nothing lost.

The tests share one slot and run in order: each leaves the target equal to the source."""

from __future__ import annotations

import logging
import time

import psycopg
import pytest

from cdcsync.config import Settings
from cdcsync.daemon import DaemonThread
from cdcsync.errors import SchemaMismatch
from tests.conftest import DbPair
from tests.harness import converged, execute, running, set_up, settings_for, wait_for

T = ["public.t"]


@pytest.fixture(scope="module")
def pair(dbpair: DbPair) -> DbPair:
    # Both tables are published, only public.t is in `tables`.
    return set_up(dbpair, "CREATE TABLE t (id int PRIMARY KEY, v int, note text)",
                  "CREATE TABLE other (id int PRIMARY KEY)")


def _settings(pair: DbPair, **apply: str) -> Settings:
    return settings_for(pair, tables=("public.t",), apply=apply)


def _halts(settings: Settings) -> str:
    """Run until the daemon stops on its own; return its error."""
    runner = DaemonThread(settings)
    runner.start()
    wait_for(lambda: runner.error is not None, timeout=60, what="the halt")
    runner.close()
    assert isinstance(runner.error, SchemaMismatch), runner.error
    return str(runner.error)


def _target_type(pair: DbPair, column: str) -> str:
    with psycopg.connect(pair.target_dsn) as conn:
        row = conn.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                           "WHERE attrelid = 't'::regclass AND attname = %s",
                           (column,)).fetchone()
    return str(row[0]) if row else "(missing)"


def test_new_columns_are_added_and_unselected_table_warned_once(
        pair: DbPair, caplog: pytest.LogCaptureFixture) -> None:
    """add_columns (the default) adds a new source column on the target with the same type and
    goes on; a published table outside `tables` is ignored with one warning."""
    caplog.set_level(logging.WARNING, logger="cdcsync")
    with running(_settings(pair)) as runner:
        execute(pair.source_dsn, "INSERT INTO t VALUES (1, 1, 'a')",
                "INSERT INTO other VALUES (1)")
        wait_for(converged(pair, T), runner=runner)
        execute(pair.source_dsn,
                "ALTER TABLE t ADD COLUMN price numeric(10,2), ADD COLUMN tags varchar(8)[]",
                "INSERT INTO t VALUES (2, 2, 'b', 9.5, '{x,y}')",
                "UPDATE t SET price = 1.25 WHERE id = 1", "INSERT INTO other VALUES (2)")
        wait_for(converged(pair, T), runner=runner, what="the new columns")
    assert _target_type(pair, "price") == "numeric(10,2)"
    assert _target_type(pair, "tags") == "character varying(8)[]"
    added = [r for r in caplog.records if r.getMessage() == "column_added"]
    assert len(added) == 2
    warned = [r for r in caplog.records if r.getMessage() == "table_not_selected"]
    assert len(warned) == 1
    assert warned[0].__dict__["cdcsync_fields"]["table"] == "public.other"


def test_new_column_halts_then_resumes_after_the_fix(pair: DbPair) -> None:
    """schema_changes = halt stops at the Relation message naming table and column; once the
    column exists on the target the next run applies the waiting rows."""
    runner = DaemonThread(_settings(pair, schema_changes="halt"))
    runner.start()
    execute(pair.source_dsn, "UPDATE t SET v = 10 WHERE id = 1")
    wait_for(converged(pair, T), runner=runner, what="streaming")
    execute(pair.source_dsn, "ALTER TABLE t ADD COLUMN late text",
            "INSERT INTO t (id, v, late) VALUES (3, 3, 'late')")
    changed = time.monotonic()
    wait_for(lambda: runner.error is not None, timeout=60, what="the halt")
    # The process ends with its term: its resync worker does not keep it 5 s.
    assert time.monotonic() - changed < 4.5
    runner.close()
    assert isinstance(runner.error, SchemaMismatch)
    message = str(runner.error)
    assert message.startswith("column(s) late of the source table public.t are missing on the "
                              'target public.t (schema_changes = "halt")')
    assert "fix: run ALTER TABLE public.t ADD COLUMN late text; on the target" in message
    execute(pair.target_dsn, "ALTER TABLE t ADD COLUMN late text")
    with running(_settings(pair, schema_changes="halt")) as runner:
        wait_for(converged(pair, T), runner=runner, what="row 3")


def test_changed_type_halts_then_resumes_after_the_fix(pair: DbPair) -> None:
    """A changed column type halts with the ALTER TABLE to run; after it nothing is lost."""
    execute(pair.source_dsn, "ALTER TABLE t ALTER COLUMN v TYPE bigint",
            "INSERT INTO t (id, v) VALUES (4, 1099511627776)")
    message = _halts(_settings(pair))
    assert message.startswith("column v of public.t changed type: bigint on the source, "
                              "integer on the target public.t")
    assert ("fix: run ALTER TABLE public.t ALTER COLUMN v TYPE bigint USING v::bigint; "
            "on the target, then `cdcsync run` (or `cdcsync resync public.t`") in message
    execute(pair.target_dsn, "ALTER TABLE t ALTER COLUMN v TYPE bigint USING v::bigint")
    with running(_settings(pair)) as runner:
        wait_for(converged(pair, T), runner=runner, what="row 4")


def test_dropped_column_halts_then_resumes_after_the_fix(pair: DbPair) -> None:
    """A column dropped on the source while streaming halts naming it and the fix."""
    runner = DaemonThread(_settings(pair))
    runner.start()
    execute(pair.source_dsn, "INSERT INTO t (id, v) VALUES (5, 5)")
    wait_for(converged(pair, T), runner=runner, what="row 5")
    execute(pair.source_dsn, "ALTER TABLE t DROP COLUMN note", "INSERT INTO t VALUES (6, 6)")
    wait_for(lambda: runner.error is not None, timeout=60, what="the halt")
    runner.close()
    message = str(runner.error)
    assert message.startswith("column(s) note were dropped from the source table public.t; "
                              "the target public.t still has them")
    assert "fix: run ALTER TABLE public.t DROP COLUMN note; on the target" in message
    execute(pair.target_dsn, "ALTER TABLE t DROP COLUMN note")
    with running(_settings(pair)) as runner:
        wait_for(converged(pair, T), runner=runner, what="row 6")


def test_changed_primary_key_halts_then_resumes_after_the_fix(pair: DbPair) -> None:
    """A new primary key on the source halts naming both keys and the resync command."""
    execute(pair.source_dsn, "UPDATE t SET late = 'k' WHERE late IS NULL",
            "ALTER TABLE t ALTER COLUMN late SET NOT NULL",
            "ALTER TABLE t DROP CONSTRAINT t_pkey, ADD PRIMARY KEY (id, late)",
            "INSERT INTO t (id, v, late) VALUES (7, 7, 'k')")
    message = _halts(_settings(pair))
    assert message.startswith("the primary key of public.t changed: (id, late) on the source, "
                              "(id) on the target public.t")
    assert "ADD PRIMARY KEY (id, late); then `cdcsync resync public.t`" in message
    execute(pair.target_dsn, "UPDATE t SET late = 'k' WHERE late IS NULL",
            "ALTER TABLE t ALTER COLUMN late SET NOT NULL",
            "ALTER TABLE t DROP CONSTRAINT t_pkey, ADD PRIMARY KEY (id, late)")
    with running(_settings(pair)) as runner:
        wait_for(converged(pair, T), runner=runner, what="row 7")
