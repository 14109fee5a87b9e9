"""The initial snapshot as a user meets it: `setup`, then `run` on tables that already hold rows."""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from bench.relay import Relay
from cdcsync import admin
from cdcsync import daemon as cdcsync_daemon
from cdcsync.link_watch import LinkWatch
from tests.conftest import DbPair
from tests.harness import (
    cli,
    converged,
    execute,
    running,
    settings_for,
    start_daemon,
    wait_for,
    write_config,
    writer,
)

pytestmark = pytest.mark.slow

SCHEMA = """
CREATE TABLE items (id int PRIMARY KEY, val int NOT NULL, note text,
                    updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE events (id bigint PRIMARY KEY, item int, payload jsonb);
"""


def _states(dsn: str) -> dict[str, tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT table_name, state, rows_copied, updated_at "
                            "FROM cdcsync.table_state").fetchall()
    return {str(r[0]): tuple(r[1:]) for r in rows}


def _all_ready(dsn: str, tables: list[str]) -> bool:
    states = _states(dsn)
    return all(states.get(t, ("",))[0] == "ready" for t in tables)


def _churn(conn: psycopg.Connection[tuple[object, ...]], rng: random.Random) -> None:
    for _ in range(rng.randint(1, 10)):
        key = rng.randint(1, 160_000)
        roll = rng.random()
        if roll < 0.4:
            conn.execute("UPDATE items SET val = val + 1, updated_at = clock_timestamp() "
                         "WHERE id = %s", (key,))
        elif roll < 0.6:
            conn.execute("INSERT INTO items (id, val) VALUES (%s, 1) ON CONFLICT (id) DO "
                         "UPDATE SET note = 'again'", (key,))
        elif roll < 0.8:
            conn.execute("DELETE FROM items WHERE id = %s", (key,))
        else:
            conn.execute("INSERT INTO events VALUES (%s, %s, '{\"w\": 1}') ON CONFLICT (id) DO "
                         "UPDATE SET payload = '{\"w\": 2}'", (rng.randint(1, 60_000), key))
    conn.commit()


def test_initial_snapshot_during_writes_converges(dbpair: DbPair, tmp_path: Path) -> None:
    """200,000 rows copied while a writer inserts, updates and deletes the same tables."""
    execute(dbpair.source_dsn, SCHEMA,
            "INSERT INTO items SELECT g, g, md5(g::text) FROM generate_series(1, 150000) g",
            "INSERT INTO events SELECT g, g % 1000, jsonb_build_object('n', g) "
            "FROM generate_series(1, 50000) g")
    config = write_config(tmp_path / "cdcsync.toml", dbpair)
    assert cli("setup", "--create-tables", config=config).returncode == 0
    assert {s[0] for s in _states(dbpair.target_dsn).values()} == {"pending"}
    stop = threading.Event()
    writers = [writer(dbpair.source_dsn, stop, seed, _churn) for seed in range(2)]
    for w in writers:
        w.start()
    log = tmp_path / "daemon.log"
    daemon = start_daemon(config, log)
    try:
        tables = ["public.items", "public.events"]
        wait_for(lambda: _all_ready(dbpair.target_dsn, tables), timeout=120,
                 what="the initial snapshot")
        time.sleep(1.0)  # writes go on after the copy, through the stream
        stop.set()
        for w in writers:
            w.join()
        wait_for(converged(dbpair, tables), timeout=120, what="convergence")
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=15) == 0
    finally:
        stop.set()
        if daemon.poll() is None:
            daemon.kill()
    states = _states(dbpair.target_dsn)
    assert states["public.items"][1] > 100_000 and states["public.events"][1] >= 50_000
    text = log.read_text()
    assert '"event":"snapshot_done"' in text and "Traceback" not in text


BIG = """
CREATE TABLE a_small (id int PRIMARY KEY, v text);
CREATE TABLE b_big (id int PRIMARY KEY, v text, updated_at timestamptz DEFAULT now());
INSERT INTO a_small SELECT g, 's' FROM generate_series(1, 1000) g;
INSERT INTO b_big SELECT g, repeat('b', 40) FROM generate_series(1, 400000) g;
"""


def test_kill_during_snapshot_resumes_without_copying_ready_tables_again(
        dbpair_factory: Callable[[str], AbstractContextManager[DbPair]], tmp_path: Path) -> None:
    """kill -9 while the second table copies: the restart copies only that one, online."""
    with dbpair_factory("killsnap") as pair:
        execute(pair.source_dsn, BIG)
        config = write_config(tmp_path / "cdcsync.toml", pair,
                              extra="[snapshot]\nworkers = 1\nchunk_rows = 100000\n")
        assert cli("setup", "--create-tables", config=config).returncode == 0
        log = tmp_path / "daemon.log"
        daemon = start_daemon(config, log)
        try:
            wait_for(lambda: _states(pair.target_dsn).get("public.b_big", ("",))[0] == "copying",
                     timeout=60, what="the big table's copy")
            daemon.kill()
            daemon.wait()
        finally:
            if daemon.poll() is None:
                daemon.kill()
        before = _states(pair.target_dsn)
        assert before["public.a_small"][0] == "ready"
        assert before["public.b_big"][0] == "copying"
        execute(pair.source_dsn, "UPDATE b_big SET v = 'changed', updated_at = now() "
                                 "WHERE id % 1000 = 0", "DELETE FROM b_big WHERE id > 399000")
        daemon = start_daemon(config, log)
        try:
            tables = ["public.a_small", "public.b_big"]
            wait_for(lambda: _all_ready(pair.target_dsn, tables), timeout=120,
                     what="the online copy of b_big")
            wait_for(converged(pair, tables), timeout=60, what="convergence")
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=15) == 0
        finally:
            if daemon.poll() is None:
                daemon.kill()
        after = _states(pair.target_dsn)
        assert after["public.a_small"] == before["public.a_small"], "a_small was copied again"
        with psycopg.connect(pair.target_dsn, autocommit=True) as conn:
            requests = conn.execute("SELECT table_name, purpose, state, chunks "
                                    "FROM cdcsync.resync_requests").fetchall()
        assert requests == [("public.b_big", "snapshot", "done", 4)]


def test_a_table_added_later_is_copied_online_alone(
        dbpair_factory: Callable[[str], AbstractContextManager[DbPair]], tmp_path: Path) -> None:
    """After `setup` adds a table, `run` copies just that one while the others stream."""
    with dbpair_factory("addtable") as pair:
        execute(pair.source_dsn, "CREATE TABLE first (id int PRIMARY KEY, v text)",
                "INSERT INTO first SELECT g, 'f' FROM generate_series(1, 500) g")
        config = write_config(tmp_path / "cdcsync.toml", pair)
        assert cli("setup", "--create-tables", config=config).returncode == 0
        settings = settings_for(pair)
        with running(settings) as runner:
            wait_for(converged(pair, ["public.first"]), runner=runner, what="first copied")
        first = _states(pair.target_dsn)["public.first"]
        execute(pair.source_dsn, "CREATE TABLE second (id int PRIMARY KEY, v text)",
                "INSERT INTO second SELECT g, 's' FROM generate_series(1, 3000) g")
        added = cli("setup", "--create-tables", config=config)
        assert added.returncode == 0, added.stderr
        assert _states(pair.target_dsn)["public.second"][0] == "pending"
        with running(settings) as runner:
            execute(pair.source_dsn, "UPDATE first SET v = 'streamed' WHERE id <= 10",
                    "UPDATE second SET v = 'streamed' WHERE id % 7 = 0")
            tables = ["public.first", "public.second"]
            wait_for(lambda: _all_ready(pair.target_dsn, tables), runner=runner,
                     what="second copied")
            wait_for(converged(pair, tables), runner=runner, what="convergence")
        assert _states(pair.target_dsn)["public.first"] == first
        with psycopg.connect(pair.target_dsn, autocommit=True) as conn:
            requests = conn.execute("SELECT table_name, purpose, state "
                                    "FROM cdcsync.resync_requests").fetchall()
        assert requests == [("public.second", "snapshot", "done")]


def test_a_row_the_target_refuses_during_the_snapshot_becomes_a_dead_letter(
        dbpair_factory: Callable[[str], AbstractContextManager[DbPair]], tmp_path: Path) -> None:
    """With on_error = "dead_letter", the plain COPY's failure falls back to the merge, which
    sets the refused row aside and copies every other one."""
    with dbpair_factory("snapdead") as pair:
        execute(pair.source_dsn, "CREATE TABLE checked (id int PRIMARY KEY, qty int)",
                "INSERT INTO checked SELECT g, g FROM generate_series(1, 2000) g",
                "UPDATE checked SET qty = -1 WHERE id = 777")
        execute(pair.target_dsn, "CREATE TABLE checked (id int PRIMARY KEY, "
                                 "qty int CHECK (qty >= 0))")
        config = write_config(tmp_path / "cdcsync.toml", pair)
        assert cli("setup", config=config).returncode == 0
        with running(settings_for(pair, apply={"on_error": "dead_letter"})) as runner:
            wait_for(lambda: _all_ready(pair.target_dsn, ["public.checked"]), runner=runner,
                     what="the snapshot")
        with psycopg.connect(pair.target_dsn, autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM checked").fetchone() == (1999,)
            letters = conn.execute("SELECT table_name, key, operation "
                                   "FROM cdcsync.dead_letters").fetchall()
        assert letters == [("public.checked", {"id": "777"}, "insert")]


def _snapshot_copying(dsn: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                           "'cdcsync-snapshot' AND state = 'active' AND query LIKE 'COPY%'"
                           ).fetchone()
    return bool(row and row[0])


def test_a_snapshot_copying_through_a_dead_source_link_is_cut_and_copied_again(
        dbpair_factory: Callable[[str], AbstractContextManager[DbPair]],
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A middlebox between the daemon and the source stops relaying mid-copy but keeps the
    connections open. The link watch finds both ends of the copy's pipe waiting on the client
    and cuts them; the table is copied again online. The snapshot's exporting session never
    hears of its close, and would hold the source's vacuum back in its transaction for good:
    the daemon ends it. (A dead target link under a pipe: test_link_watch.py.)"""
    caplog.set_level(logging.INFO, logger="cdcsync")
    monkeypatch.setattr(cdcsync_daemon, "LinkWatch", partial(LinkWatch, silent_s=2.0))
    with dbpair_factory("deadsnap") as pair:
        execute(pair.source_dsn, BIG)
        admin.setup(settings_for(pair), create_tables=True)
        port = int(conninfo_to_dict(pair.source_dsn)["port"] or 5432)
        with Relay(port, 0.0) as relay:
            through = make_conninfo(pair.source_dsn, host="127.0.0.1", port=relay.port)
            settings = settings_for(pair, snapshot={"workers": 1}, source={"dsn": through})
            with running(settings) as runner:
                wait_for(lambda: _snapshot_copying(pair.target_dsn), runner=runner,
                         what="the snapshot's COPY")
                relay.freeze()
                tables = ["public.a_small", "public.b_big"]
                wait_for(lambda: _all_ready(pair.target_dsn, tables), runner=runner,
                         timeout=60, what="the copy done again")
                wait_for(converged(pair, tables), runner=runner, what="convergence")
                with psycopg.connect(pair.source_dsn, autocommit=True) as conn:
                    left = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE "
                                        "backend_type = 'walsender' AND "
                                        "state = 'idle in transaction'").fetchone()
    assert left == (0,)
    fields = [getattr(r, "cdcsync_fields", {}) for r in caplog.records]
    cut = [f.get("application") for r, f in zip(caplog.records, fields, strict=True)
           if r.getMessage() == "link_cut"]
    assert "cdcsync-snapshot" in cut, cut
    ended = [f.get("reason") for r, f in zip(caplog.records, fields, strict=True)
             if r.getMessage() == "walsender_ended"]
    assert ended == ["the exporting session of a snapshot that lost a connection outlived its "
                     "close"]
