"""The target's first question asked while the daemon loads (cdcsync.target_ahead), on real
servers: the checks take its connection and answer, or ask again, and fail as they would."""

from __future__ import annotations

import gc
import logging
import socket
import time
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from psycopg.rows import TupleRow

from cdcsync import commands
from cdcsync.daemon import DaemonThread, ask_target
from cdcsync.dsn import application_name
from cdcsync.errors import ConnectionLost, PrerequisiteError
from cdcsync.leader import holder_query, lock_key
from cdcsync.target_ahead import TargetAhead, TargetState
from tests.conftest import DbPair
from tests.harness import (
    converged,
    execute,
    running,
    set_up,
    settings_for,
    wait_for,
    write_config,
)


@pytest.fixture(scope="module")
def pair(dbpair: DbPair) -> DbPair:
    return set_up(dbpair, "CREATE TABLE t (id int PRIMARY KEY, v int)",
                  "INSERT INTO t SELECT g, g FROM generate_series(1, 50) g")


def _admin_pids(pair: DbPair) -> set[int]:
    """The open sessions of cdcsync's admin connections, whatever they are doing: one asked
    ahead is idle once connected, then active while its question runs."""
    with psycopg.connect(pair.target_dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                            "AND application_name = 'cdcsync-admin'").fetchall()
    return {int(row[0]) for row in rows}


def _lock_sessions(pair: DbPair) -> set[int]:
    """The sessions opened with the slot lock's connection settings by this process."""
    with psycopg.connect(pair.target_dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                            "AND application_name = %s", (application_name(),)).fetchall()
    return {int(row[0]) for row in rows}


def test_the_lock_is_taken_on_its_connection_opened_ahead(pair: DbPair) -> None:
    """The slot lock's connection opens while the daemon loads, beside the question: the
    daemon takes the lock on it instead of opening another."""
    ahead = TargetAhead.open(pair.target_dsn, pair.slot)
    wait_for(lambda: len(_lock_sessions(pair)) == 1, timeout=10,
             what="the lock's connection opened ahead")
    (opened,) = _lock_sessions(pair)
    execute(pair.source_dsn, "INSERT INTO t VALUES (3001, 1)")
    with running(settings_for(pair), ahead) as runner:
        wait_for(converged(pair, ["public.t"]), runner=runner, what="the stream")
        with psycopg.connect(pair.target_dsn, autocommit=True) as conn:
            holder = conn.execute(holder_query(pair.slot)).fetchone()
        assert holder is not None and int(holder[1]) == opened
        assert _lock_sessions(pair) == {opened}
    wait_for(lambda: _lock_sessions(pair) == set(), timeout=10, what="the lock released")


def test_a_lock_connection_for_other_settings_is_closed(pair: DbPair) -> None:
    ahead = TargetAhead.open(pair.target_dsn, "another_slot")
    wait_for(lambda: len(_lock_sessions(pair)) == 1, timeout=10,
             what="the lock's connection opened ahead")
    assert ahead.lock_connection(pair.target_dsn, pair.slot) is None
    wait_for(lambda: _lock_sessions(pair) == set() and _admin_pids(pair) == set(), timeout=10,
             what="both connections opened ahead to be closed")


def test_the_configuration_file_asks_the_target_and_the_checks_take_the_answer(
        pair: DbPair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read from the file and the CDCSYNC_TARGET__ variables as they are: the checks get the
    connection opened ahead, with the lock's holder and the copy states already asked."""
    dsn = make_conninfo(pair.target_dsn, connect_timeout=7)
    monkeypatch.setenv("CDCSYNC_TARGET__DSN", dsn)
    ahead = TargetAhead.open_unvalidated(write_config(tmp_path / "c.toml", pair))
    assert ahead is not None and (ahead.dsn, ahead.slot) == (dsn, pair.slot)
    wait_for(lambda: len(_admin_pids(pair)) == 1, timeout=10, what="the question asked ahead")
    (asked,) = _admin_pids(pair)
    with ask_target(settings_for(pair, target={"dsn": dsn}), ahead) as (tgt, known):
        assert tgt.info.backend_pid == asked
        assert isinstance(known, TargetState) and not known.standby
        assert known.states["public.t"].state in ("pending", "ready")
    assert tgt.closed and _admin_pids(pair) == set()
    ahead.close()


def test_an_answer_for_another_target_or_slot_is_closed_and_asked_again(pair: DbPair) -> None:
    settings = settings_for(pair)
    ahead = TargetAhead.open(pair.target_dsn, "another_slot")
    with ask_target(settings, ahead) as (tgt, known):
        assert isinstance(known, TargetState)
        wait_for(lambda: _admin_pids(pair) == {tgt.info.backend_pid}, timeout=10,
                 what="the connection asked ahead to be closed")
    other = TargetAhead.open(make_conninfo(pair.target_dsn, connect_timeout=7), pair.slot)
    assert other.take(pair.target_dsn, pair.slot) is None
    wait_for(lambda: _admin_pids(pair) == set(), timeout=10, what="its connection to close")


def test_a_question_given_up_does_not_wait_for_the_target(pair: DbPair) -> None:
    """A target that does not answer (a paused relay would do; a listening socket that never
    accepts is enough): closing, or taking for other settings, returns at once."""
    with socket.create_server(("127.0.0.1", 0), backlog=0) as silent:
        port = silent.getsockname()[1]
        for give_up in ("close", "take"):
            ahead = TargetAhead.open(f"host=127.0.0.1 port={port} dbname=x", pair.slot)
            started = time.monotonic()
            if give_up == "close":
                ahead.close()
            else:
                assert ahead.take(pair.target_dsn, pair.slot) is None
            assert time.monotonic() - started < 1.0


def _release_and_take_over(pair: DbPair, holder: psycopg.Connection[TupleRow],
                           runner: DaemonThread) -> None:
    holder.execute("SELECT pg_advisory_unlock(%s)", (lock_key(pair.slot),))
    wait_for(converged(pair, ["public.t"]), runner=runner, what="the takeover")


def test_a_standby_is_answered_ahead(pair: DbPair) -> None:
    """Another process holds the slot's lock: the answer says so, and the daemon given it waits
    as the standby, then takes over and streams."""
    with psycopg.connect(pair.target_dsn, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (lock_key(pair.slot),))
        asked = TargetAhead.open(pair.target_dsn, pair.slot)
        taken = asked.take(pair.target_dsn, pair.slot)
        asked.close()
        assert isinstance(taken, tuple) and isinstance(taken[1], TargetState)
        assert taken[1].standby
        taken[0].close()
        execute(pair.source_dsn, "INSERT INTO t VALUES (1001, 1)")
        with running(settings_for(pair), TargetAhead.open(pair.target_dsn, pair.slot)) as runner:
            assert not runner.stop.wait(1.0) and runner.error is None and runner.is_alive()
            assert not converged(pair, ["public.t"])()
            _release_and_take_over(pair, holder, runner)


def _pool_sessions(pair: DbPair) -> int:
    with psycopg.connect(pair.target_dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                           "current_database() AND application_name = 'cdcsync'").fetchone()
    return int(row[0]) if row else -1


def test_a_lock_taken_since_the_answer_leaves_a_standby_without_a_pool(
        pair: DbPair, caplog: pytest.LogCaptureFixture) -> None:
    """Free when the target answered, taken before this process tried it: the pool opened on
    the answer's word is closed as the process stands by, and opened again to take over."""
    caplog.set_level(logging.INFO, logger="cdcsync")
    ahead = TargetAhead.open(pair.target_dsn, pair.slot)
    wait_for(lambda: len(_admin_pids(pair)) == 1, timeout=10, what="the question asked ahead")
    with psycopg.connect(pair.target_dsn, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (lock_key(pair.slot),))
        execute(pair.source_dsn, "INSERT INTO t VALUES (2001, 1)")
        with running(settings_for(pair), ahead) as runner:
            wait_for(lambda: any(r.getMessage() == "standby" for r in caplog.records),
                     timeout=10, runner=runner, what="the standby")
            wait_for(lambda: _pool_sessions(pair) == 0, timeout=10, runner=runner,
                     what="the standby to close its pool")
            _release_and_take_over(pair, holder, runner)


def test_a_stopped_daemon_leaves_no_target_session_open(pair: DbPair) -> None:
    """Once a daemon running in a thread stopped, every connection it opened on the target is
    closed: the pool's (the one given back as the pool closed stayed open), the lock's and the
    question's asked ahead. The garbage collector's thresholds, which streaming raises for the
    whole process, are back as they were."""
    thresholds = gc.get_threshold()
    for row in (4001, 4002):
        execute(pair.source_dsn, f"INSERT INTO t VALUES ({row}, 1)")
        with running(settings_for(pair), TargetAhead.open(pair.target_dsn, pair.slot)) as runner:
            wait_for(converged(pair, ["public.t"]), runner=runner, what="the stream")
            assert gc.get_threshold() != thresholds
        wait_for(lambda: (_pool_sessions(pair), _lock_sessions(pair), _admin_pids(pair))
                 == (0, set(), set()), timeout=3, what="no session left")
        assert gc.get_threshold() == thresholds


def test_a_target_without_the_schema_is_refused_with_the_fix(pair: DbPair) -> None:
    bare = make_conninfo(pair.target_dsn, dbname="postgres")
    asked = TargetAhead.open(bare, pair.slot)
    taken = asked.take(bare, pair.slot)
    asked.close()
    assert isinstance(taken, tuple)
    taken[0].close()
    assert isinstance(taken[1], PrerequisiteError)
    assert str(taken[1]) == "the target has no cdcsync schema — fix: run `cdcsync setup`"


def test_an_unreachable_target_fails_once_as_the_checks_would(pair: DbPair) -> None:
    """The connection refused ahead is reported by the checks, naming the side and the fix,
    without the password and without connecting again."""
    dsn = "host=127.0.0.1 port=1 user=u password=hunter2 dbname=x connect_timeout=2"
    settings = settings_for(pair, target={"dsn": dsn})
    with pytest.raises(ConnectionLost) as raised, ask_target(
            settings, TargetAhead.open(dsn, pair.slot)):
        pass
    assert "cannot connect to the target u@127.0.0.1:1/x" in str(raised.value)
    assert "hunter2" not in str(raised.value)
    assert raised.value.fix == "check host, port and network access for the target DSN"


def test_run_with_an_invalid_configuration_closes_the_connections_it_opened(
        pair: DbPair, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "c.toml", pair, extra="[snapshot]\nchunk_rowz = 5\n")
    assert commands.main(["--config", str(config), "run"]) == 2
    assert "unknown key 'snapshot.chunk_rowz'" in capsys.readouterr().err
    wait_for(lambda: _admin_pids(pair) == set() and _lock_sessions(pair) == set(), timeout=10,
             what="the connections to be closed")
