"""`cdcsync resync` while the stream goes on: repairs drift, never regresses a row."""

from __future__ import annotations

import datetime as dt
import random
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import psycopg
import pytest

from tests.conftest import DbPair
from tests.harness import (
    cli,
    converged,
    execute,
    running,
    settings_for,
    table_rows,
    wait_for,
    write_config,
    writer,
)

pytestmark = pytest.mark.slow

SCHEMA = """
CREATE TABLE accounts (id int PRIMARY KEY, owner text NOT NULL, balance int NOT NULL,
                       updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
INSERT INTO accounts (id, owner, balance)
SELECT g, 'owner ' || g, g FROM generate_series(1, 3000) g;
"""

TABLE = "public.accounts"


@pytest.fixture(scope="module")
def pair(dbpair: DbPair) -> Iterator[DbPair]:
    execute(dbpair.source_dsn, SCHEMA)
    assert cli("setup", "--create-tables", config=_config(dbpair)).returncode == 0
    yield dbpair
    _config_path(dbpair).unlink(missing_ok=True)


def _config_path(pair: DbPair) -> Path:
    return Path(tempfile.gettempdir()) / f"cdcsync-resync-{pair.slot}.toml"


def _config(pair: DbPair) -> Path:
    return write_config(_config_path(pair), pair, extra="[snapshot]\nchunk_rows = 700\n")


def _drift(pair: DbPair) -> None:
    """Change, delete and add rows on the target only (not newer than the source's rows)."""
    execute(pair.target_dsn,
            "UPDATE accounts SET balance = -1 WHERE id IN (10, 1500, 2999)",
            "DELETE FROM accounts WHERE id IN (20, 1600)",
            "INSERT INTO accounts VALUES (5000, 'intruder', 0, '2000-01-01'), "
            "(1234567, 'intruder', 0, '2000-01-01')")


def test_resync_with_the_daemon_running_repairs_changed_deleted_and_added_rows(
        pair: DbPair) -> None:
    with running(settings_for(pair, snapshot={"chunk_rows": 700})) as runner:
        wait_for(converged(pair, [TABLE]), runner=runner, what="initial copy")
        _drift(pair)
        assert not converged(pair, [TABLE])()
        done = cli("resync", TABLE, config=_config(pair), timeout=120)
        assert done.returncode == 0, done.stderr
        assert "resynced public.accounts: 3000 rows copied by the running daemon" in done.stdout
        assert converged(pair, [TABLE])()
    with psycopg.connect(pair.target_dsn, autocommit=True) as conn:
        row = conn.execute("SELECT state, chunks, rows_copied FROM cdcsync.resync_requests "
                           "ORDER BY id DESC LIMIT 1").fetchone()
    assert row == ("done", 5, 3000)


def test_resync_where_copies_only_matching_rows_and_dry_run_counts(pair: DbPair) -> None:
    with running(settings_for(pair, snapshot={"chunk_rows": 700})) as runner:
        wait_for(converged(pair, [TABLE]), runner=runner, what="streaming")
        execute(pair.target_dsn, "UPDATE accounts SET balance = -1 WHERE id IN (5, 50)")
        dry = cli("resync", TABLE, "--where", "id <= 10", "--dry-run", config=_config(pair))
        assert dry.returncode == 0 and dry.stdout.strip() == "would copy 10 rows of public.accounts"
        done = cli("resync", TABLE, "--where", "id <= 10", config=_config(pair), timeout=120)
        assert done.returncode == 0, done.stderr
    balances = dict((r[0], r[2]) for r in table_rows(pair.target_dsn, TABLE))
    assert (balances[5], balances[50]) == (5, -1)
    execute(pair.target_dsn, "UPDATE accounts SET balance = 50 WHERE id = 50")


def test_resync_without_a_daemon_performs_it_alone(pair: DbPair) -> None:
    _drift(pair)
    done = cli("resync", TABLE, config=_config(pair), timeout=120)
    assert done.returncode == 0, done.stderr
    assert "copied by this command (no daemon was streaming the slot)" in done.stdout
    assert converged(pair, [TABLE])()


def test_resync_errors_name_the_fix(pair: DbPair) -> None:
    bad = cli("resync", TABLE, "--where", "no_such_column = 1", config=_config(pair))
    assert bad.returncode == 2
    assert "the source refuses --where 'no_such_column = 1'" in bad.stderr
    assert "Traceback" not in bad.stderr
    unknown = cli("resync", "public.nope", config=_config(pair))
    assert unknown.returncode == 1
    assert "source table public.nope does not exist — fix: " in unknown.stderr


def _update(conn: psycopg.Connection[tuple[object, ...]], rng: random.Random) -> None:
    for _ in range(rng.randint(1, 20)):
        conn.execute("UPDATE accounts SET balance = balance + 1, updated_at = clock_timestamp() "
                     "WHERE id = %s", (rng.randint(1, 3000),))
    conn.commit()


class Regressions(threading.Thread):
    """Samples every target row's updated_at; records any row seen going back in time."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.stop = threading.Event()
        self.latest: dict[int, dt.datetime] = {}
        self.regressed: list[tuple[int, dt.datetime, dt.datetime]] = []
        self.samples = 0

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.stop.is_set():
                for key, stamp in conn.execute("SELECT id, updated_at FROM accounts"):
                    seen = self.latest.get(key)
                    if seen is not None and stamp < seen:
                        self.regressed.append((key, seen, stamp))
                    self.latest[key] = max(stamp, seen) if seen else stamp
                self.samples += 1
                time.sleep(0.01)


def test_resync_during_heavy_updates_never_regresses_a_row(pair: DbPair) -> None:
    # Source-wins (no conflict column): only the watermarks keep copied rows from overwriting
    # newer streamed ones.
    settings = settings_for(pair, snapshot={"chunk_rows": 700},
                            table=[{"name": TABLE, "conflict_column": "no_such_column"}])
    with running(settings) as runner:
        wait_for(converged(pair, [TABLE]), runner=runner, what="streaming")
        stop = threading.Event()
        writers = [writer(pair.source_dsn, stop, seed, _update) for seed in range(3)]
        watch = Regressions(pair.target_dsn)
        for thread in (*writers, watch):
            thread.start()
        try:
            done = cli("resync", TABLE, config=_config(pair), timeout=180)
            assert done.returncode == 0, done.stderr
        finally:
            stop.set()
            for w in writers:
                w.join()
        wait_for(converged(pair, [TABLE]), runner=runner, timeout=60, what="convergence")
        watch.stop.set()
        watch.join()
    assert watch.samples > 5
    assert watch.regressed == []


def test_verify_repair_recopies_exactly_the_differing_keys(pair: DbPair) -> None:
    """verify names the drifted keys; --repair makes them equal (deleting the target-only ones)
    through the online resync path while the daemon streams; verify then exits 0."""
    with running(settings_for(pair, snapshot={"chunk_rows": 700})) as runner:
        wait_for(converged(pair, [TABLE]), runner=runner, what="streaming")
        _drift(pair)
        found = cli("verify", "--json", config=_config(pair), timeout=120)
        assert found.returncode == 1, found.stderr
        entry = orjson.loads(found.stdout)["tables"][0]
        assert (entry["missing_on_target"]["count"], entry["extra_on_target"]["count"],
                entry["different"]["count"]) == (2, 2, 3)
        fixed = cli("verify", "--repair", config=_config(pair), timeout=180)
        assert fixed.returncode == 0, fixed.stdout + fixed.stderr
        assert "repaired public.accounts: 7 keys re-copied, in sync" in fixed.stdout
        assert cli("verify", config=_config(pair), timeout=120).returncode == 0
        assert converged(pair, [TABLE])()
    with psycopg.connect(pair.target_dsn, autocommit=True) as conn:
        row = conn.execute("SELECT purpose, state, rows_copied FROM cdcsync.resync_requests "
                           "ORDER BY id DESC LIMIT 1").fetchone()
    assert row == ("repair", "done", 5)
