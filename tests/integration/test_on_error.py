"""A change the target rejects: halt naming it, or set it aside as a dead letter; retry, discard,
retention. The tests run in order on one database pair: the rejected change that halts the first
run is the one the second run sets aside."""

from __future__ import annotations

from pathlib import Path

import orjson
import psycopg
import pytest

from cdcsync import admin
from cdcsync.alerts import Alerter, Thresholds
from cdcsync.daemon import DaemonThread
from cdcsync.errors import ApplyError
from cdcsync.health import Health
from cdcsync.jobs import Jobs
from cdcsync.metrics import Metrics
from cdcsync.pipeline import Progress
from tests.conftest import DbPair
from tests.harness import cli, execute, running, settings_for, table_rows, wait_for, write_config

# The rows written before the first run are to arrive through the stream, not a snapshot.
STREAM_ONLY = {"mode": "never"}
TABLE = """CREATE TABLE items (id int PRIMARY KEY, qty int NOT NULL, note text,
                               updated_at timestamptz NOT NULL DEFAULT now())"""


@pytest.fixture(scope="module")
def pair(dbpair: DbPair) -> DbPair:
    execute(dbpair.source_dsn, TABLE)
    # The target refuses what the source accepts: a negative quantity.
    execute(dbpair.target_dsn, TABLE, "ALTER TABLE items ADD CHECK (qty >= 0)")
    admin.setup(settings_for(dbpair), create_tables=False)
    return dbpair


def _one(dsn: str, query: str) -> object:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query.encode()).fetchone()
        return row[0] if row else None


def test_halt_names_table_key_lsn_and_error(pair: DbPair) -> None:
    """on_error = halt (the default) stops at the rejected change and names table, key, LSN and
    the database's error; none of that source transaction reaches the target."""
    execute(pair.source_dsn, "INSERT INTO items VALUES (1, 1, 'a'), (2, 2, 'b')")
    with psycopg.connect(pair.source_dsn, autocommit=True) as conn:
        with conn.transaction():
            conn.execute("INSERT INTO items VALUES (3, -1, 'bad'), (4, 4, 'd')")
            conn.execute("UPDATE items SET qty = 10 WHERE id = 1")
        lsn = str(conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0])  # type: ignore[index]
    runner = DaemonThread(settings_for(pair, snapshot=STREAM_ONLY))
    runner.start()
    wait_for(lambda: runner.error is not None, timeout=60, what="the halt")
    runner.close()
    error = runner.error
    assert isinstance(error, ApplyError)
    message = str(error)
    assert message.startswith("the target rejected a change to public.items (key 3) "
                              "committed at source LSN ")
    assert 'violates check constraint "items_qty_check"' in message
    assert "fix: correct the target table or the row" in message
    failing = message.split("source LSN ")[1].split(":", maxsplit=1)[0]
    with psycopg.connect(pair.target_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT %s::pg_lsn <= %s::pg_lsn", (failing, lsn)).fetchone() == (
            True,)
        assert conn.execute("SELECT lsn < %s::pg_lsn FROM cdcsync.checkpoint",
                            (failing,)).fetchone() == (True,)
        assert conn.execute("SELECT count(*) FROM items WHERE id IN (3, 4)").fetchone() == (0,)


def test_dead_letter_sets_aside_only_the_rejected_change(pair: DbPair) -> None:
    """on_error = dead_letter applies everything but the rejected change, which is recorded with
    table, key, operation, row, error, LSN and time in the same target transaction."""
    settings = settings_for(pair, apply={"on_error": "dead_letter"}, snapshot=STREAM_ONLY)
    with running(settings) as runner:
        wait_for(lambda: _one(pair.target_dsn, "SELECT count(*) FROM items") == 3,
                 runner=runner, what="the good rows")
        # A later update of an applied row rejected too: a partial row, key and error recorded.
        execute(pair.source_dsn, "UPDATE items SET qty = -5, updated_at = now() WHERE id = 2",
                "INSERT INTO items VALUES (5, 5, 'e')")
        wait_for(lambda: _one(pair.target_dsn, "SELECT count(*) FROM items") == 4,
                 runner=runner, what="row 5")
    assert [r[:3] for r in table_rows(pair.target_dsn, "public.items")] == [
        (1, 10, "a"), (2, 2, "b"), (4, 4, "d"), (5, 5, "e")]
    with psycopg.connect(pair.target_dsn, autocommit=True) as conn:
        letters = conn.execute(
            "SELECT table_name, key, operation, row_data - 'updated_at', error, "
            "source_lsn IS NOT NULL, commit_time <= now(), recorded_at <= now() "
            "FROM cdcsync.dead_letters ORDER BY id").fetchall()
    check = 'new row for relation "items" violates check constraint "items_qty_check"'
    assert [letter[:4] for letter in letters] == [
        ("public.items", {"id": "3"}, "insert", {"id": "3", "qty": "-1", "note": "bad"}),
        ("public.items", {"id": "2"}, "update", {"id": "2", "qty": "-5", "note": "b"}),
    ]
    assert all(check in letter[4] and all(letter[5:]) for letter in letters)


def test_list_retry_after_fix_with_the_conflict_rule(pair: DbPair, tmp_path: Path) -> None:
    """Retry before the fix keeps them (exit 1); after it applies them with the conflict rule
    (a newer target row wins and is logged) and the target equals the source."""
    config = write_config(tmp_path / "c.toml", pair)
    listed = cli("dead-letters", "list", "--json", config=config)
    assert listed.returncode == 0, listed.stderr
    ids = [d["id"] for d in orjson.loads(listed.stdout)]
    assert len(ids) == 2
    assert orjson.loads(cli("status", "--json", config=config).stdout)["dead_letters"] == 2
    text = cli("dead-letters", "list", config=config).stdout
    assert f'{ids[0]}  ' in text and 'public.items  insert  key {"id":"3"}' in text

    again = cli("dead-letters", "retry", "--all", config=config)
    assert again.returncode == 1
    assert "retried 2 dead letter(s): 0 applied, 2 rejected again" in again.stdout
    assert _one(pair.target_dsn, "SELECT count(*) FROM cdcsync.dead_letters") == 2

    execute(pair.target_dsn, "ALTER TABLE items DROP CONSTRAINT items_qty_check",
            "UPDATE items SET note = 'edited on target', updated_at = now() + interval '1 day' "
            "WHERE id = 2")
    fixed = cli("dead-letters", "retry", "--all", config=config)
    assert fixed.returncode == 0, fixed.stderr
    assert "retried 2 dead letter(s): 2 applied, 0 rejected again" in fixed.stdout
    assert _one(pair.target_dsn, "SELECT count(*) FROM cdcsync.dead_letters") == 0
    rows = {r[0]: r[1:3] for r in table_rows(pair.target_dsn, "public.items")}
    assert rows[3] == (-1, "bad")
    assert rows[2] == (2, "edited on target")  # newer on the target: the retried update lost
    assert _one(pair.target_dsn, "SELECT key FROM cdcsync.conflicts") == {"id": 2}
    source = {r[0]: r[1:3] for r in table_rows(pair.source_dsn, "public.items")}
    assert {k: v for k, v in rows.items() if k != 2} == {k: v for k, v in source.items()
                                                         if k != 2}


def test_discard_by_id_and_all(pair: DbPair, tmp_path: Path) -> None:
    """discard removes the given ids, --all the rest; without either it refuses."""
    config = write_config(tmp_path / "c.toml", pair)
    execute(pair.target_dsn, *[
        "INSERT INTO cdcsync.dead_letters (table_name, key, operation, row_data, error, "
        f"source_lsn, commit_time) VALUES ('public.items', '{{}}', 'insert', '{{}}', 'e{i}', "
        "'0/1', now())" for i in range(3)])
    first = int(str(_one(pair.target_dsn, "SELECT min(id) FROM cdcsync.dead_letters")))
    refused = cli("dead-letters", "discard", config=config)
    assert refused.returncode == 1 and "give their ids, or --all" in refused.stderr
    one = cli("dead-letters", "discard", str(first), config=config)
    assert one.stdout.strip() == "discarded 1 dead letter(s)"
    rest = cli("dead-letters", "discard", "--all", config=config)
    assert rest.stdout.strip() == "discarded 2 dead letter(s)"


def test_retention_deletes_old_rows_and_exports_counts(pair: DbPair) -> None:
    """The retention job deletes conflicts and dead letters older than their retention and
    exports how many remain."""
    execute(pair.target_dsn, "DELETE FROM cdcsync.conflicts", *[
        "INSERT INTO cdcsync.dead_letters (recorded_at, table_name, key, operation, row_data, "
        f"error, source_lsn, commit_time) VALUES (now() - interval '{age} days', 't', '{{}}', "
        "'insert', '{}', 'e', '0/1', now())" for age in (0, 5, 50)], *[
        "INSERT INTO cdcsync.conflicts (recorded_at, table_name, key, operation) VALUES "
        f"(now() - interval '{age} days', 't', '{{}}', 'upsert')" for age in (1, 8, 9)])
    settings = settings_for(pair, retention={"conflicts_days": 7, "dead_letters_days": 30})
    metrics = Metrics(pair.slot)
    jobs = Jobs(settings, Progress(), metrics, Health(),
                Alerter(Thresholds(), slot=pair.slot, sentry=False))
    jobs.retention()
    assert _one(pair.target_dsn, "SELECT count(*) FROM cdcsync.dead_letters") == 2
    assert _one(pair.target_dsn, "SELECT count(*) FROM cdcsync.conflicts") == 1
    text = metrics.render().decode()
    assert f'cdcsync_stored_rows{{kind="conflicts",slot="{pair.slot}"}} 1.0' in text
    assert f'cdcsync_stored_rows{{kind="dead_letters",slot="{pair.slot}"}} 2.0' in text



def test_split_sets_aside_exactly_the_rejected_changes_of_a_large_transaction(
        pair: DbPair) -> None:
    """One source transaction of 500 changes, six of them rejected: the merged batch is split
    until exactly those six are set aside, and every other change is applied."""
    execute(pair.target_dsn, "DELETE FROM cdcsync.dead_letters",
            "ALTER TABLE items ADD CONSTRAINT items_qty_check CHECK (qty >= 0) NOT VALID")
    bad = (1017, 1150, 1151, 1299)
    with running(settings_for(pair, apply={"on_error": "dead_letter"},
                              snapshot=STREAM_ONLY)) as runner:
        execute(pair.source_dsn, "BEGIN",
                "INSERT INTO items SELECT g, CASE WHEN g IN (1017, 1150, 1151, 1299) THEN -1 "
                "ELSE g END, 'n' FROM generate_series(1000, 1399) g",
                "UPDATE items SET note = 'u' WHERE id BETWEEN 1100 AND 1199", "COMMIT")
        wait_for(lambda: _one(pair.target_dsn, "SELECT count(*) FROM items WHERE id >= 1000")
                 == 396, runner=runner, what="the applied changes")
    with psycopg.connect(pair.target_dsn, autocommit=True) as conn:
        letters = conn.execute("SELECT key ->> 'id', operation FROM cdcsync.dead_letters "
                               "ORDER BY 1, 2").fetchall()
    assert letters == sorted([(str(k), "insert") for k in bad]
                             + [("1150", "update"), ("1151", "update")])
    source = [r for r in table_rows(pair.source_dsn, "public.items") if r[0] not in bad]
    target = table_rows(pair.target_dsn, "public.items")
    assert [r[:3] for r in target if r[0] >= 1000] == [r[:3] for r in source if r[0] >= 1000]
