"""The slot's stream opened while the daemon starts (cdcsync.source.early), on real servers: the
daemon streams from it, and gives it up where it has no use for it."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest

from cdcsync import admin
from cdcsync.config import Settings
from cdcsync.daemon import DaemonThread
from cdcsync.errors import ConnectionLost, is_transient
from cdcsync.leader import lock_key
from cdcsync.model import ZERO_LSN
from cdcsync.source.early import EarlyStream, start_options
from cdcsync.source.replication import ReplicationStream
from tests.conftest import DbPair
from tests.harness import converged, execute, settings_for, wait_for


@pytest.fixture(scope="module")
def pair(dbpair: DbPair) -> DbPair:
    execute(dbpair.source_dsn, "CREATE TABLE t (id int PRIMARY KEY, v int)")
    admin.setup(settings_for(dbpair), create_tables=True)
    return dbpair


def _slot_pid(pair: DbPair) -> int | None:
    with psycopg.connect(pair.source_dsn, autocommit=True) as conn:
        row = conn.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s",
                           (pair.slot,)).fetchone()
    assert row is not None
    return None if row[0] is None else int(row[0])


def _opened(settings: Settings) -> EarlyStream:
    early = EarlyStream.open(settings)
    wait_for(lambda: early.backend_pid is not None, timeout=10, what="the early stream")
    return early


@contextmanager
def _daemon(settings: Settings, early: EarlyStream) -> Iterator[DaemonThread]:
    runner = DaemonThread(settings, early)
    runner.start()
    try:
        yield runner
    finally:
        assert runner.close(), "the daemon did not stop within the budget"
        early.close()
    if runner.error is not None:
        raise runner.error


def _write(pair: DbPair, first: int, transactions: int) -> None:
    with psycopg.connect(pair.source_dsn, autocommit=True) as conn:
        for n in range(transactions):
            start = first + n * 10
            with conn.transaction():
                conn.execute("INSERT INTO t SELECT g, g FROM generate_series(%s::int, %s::int) g",
                             (start, start + 9))
                conn.execute("UPDATE t SET v = -v WHERE id = %s", (start,))
                conn.execute("DELETE FROM t WHERE id = %s", (start + 9,))


def test_the_initial_snapshot_gets_the_slot_from_the_early_stream(pair: DbPair) -> None:
    """Nothing copied yet: the snapshot re-creates the slot, so the early stream is closed
    first; rows written before and after all arrive."""
    settings = settings_for(pair)
    _write(pair, 1, 5)
    early = _opened(settings)
    with _daemon(settings, early) as runner:
        _write(pair, 1001, 5)
        wait_for(converged(pair, ["public.t"]), runner=runner, what="the snapshot and stream")
        assert early.backend_pid is None, "the snapshot's daemon closed the early stream"


def test_the_daemon_streams_from_the_early_stream(pair: DbPair,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A backlog written while no daemon runs is read by the walsender the early stream
    started: the daemon adopts it instead of opening another, and the target converges."""
    caplog.set_level(logging.INFO, logger="cdcsync")
    settings = settings_for(pair)
    _write(pair, 2001, 50)
    early = _opened(settings)
    walsender = early.backend_pid
    assert _slot_pid(pair) == walsender
    with _daemon(settings, early) as runner:
        wait_for(converged(pair, ["public.t"]), runner=runner, what="the backlog")
        assert _slot_pid(pair) == walsender, "the daemon streams on the early walsender"
        streaming = [r for r in caplog.records if r.getMessage() == "streaming"]
        assert [r.__dict__["cdcsync_fields"]["opened_early"] for r in streaming] == [True]
        _write(pair, 3001, 5)
        wait_for(converged(pair, ["public.t"]), runner=runner, what="new changes")
    with psycopg.connect(pair.target_dsn, autocommit=True) as tgt:
        row = tgt.execute("SELECT count(*), sum(v) FROM t").fetchone()
    with psycopg.connect(pair.source_dsn, autocommit=True) as src:
        assert row == src.execute("SELECT count(*), sum(v) FROM t").fetchone()


def test_a_standby_gives_the_early_stream_up(pair: DbPair) -> None:
    """Another process holds the slot's lock: the daemon, its standby, closes the early stream
    at once (the lock's holder needs the slot), then streams once the lock is released."""
    settings = settings_for(pair)
    _write(pair, 4001, 5)
    with psycopg.connect(pair.target_dsn, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (lock_key(pair.slot),))
        early = _opened(settings)
        with _daemon(settings, early) as runner:
            wait_for(lambda: _slot_pid(pair) is None, timeout=10, runner=runner,
                     what="the standby to let the slot go")
            holder.execute("SELECT pg_advisory_unlock(%s)", (lock_key(pair.slot),))
            wait_for(converged(pair, ["public.t"]), runner=runner, what="the takeover")


def test_an_early_stream_that_cannot_start_is_none(pair: DbPair) -> None:
    """A slot that does not exist: nothing to take (the daemon's checks name the fix), and
    closing is safe."""
    early = EarlyStream.open(settings_for(pair, source={"slot": "no_such_slot"}))
    assert early.take() is None
    early.close()


def test_a_slot_taken_since_the_check_is_retried(pair: DbPair) -> None:
    """Another stream holds the slot (a standby's early stream, in the moment the active process
    reconnects): starting a stream fails as a lost connection, which the daemon retries, not as a
    prerequisite that would halt it."""
    settings = settings_for(pair)
    early = _opened(settings)
    try:
        stream = ReplicationStream(pair.source_dsn, pair.slot)
        with pytest.raises(ConnectionLost, match="is in use by another process") as raised:
            stream.start(ZERO_LSN, start_options(settings, binary=True))
        assert is_transient(raised.value)
    finally:
        early.close()
