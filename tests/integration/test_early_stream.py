"""The slot's stream opened while the daemon starts (cdcsync.source.early), on real servers: the
daemon streams from it, and gives it up where it has no use for it."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from cdcsync import commands
from cdcsync.config import Settings, load_settings
from cdcsync.daemon import DaemonThread
from cdcsync.errors import ConnectionLost, is_transient
from cdcsync.leader import lock_key
from cdcsync.model import ZERO_LSN
from cdcsync.source.early import EarlyStream, start_options
from cdcsync.source.replication import ReplicationStream
from tests.conftest import DbPair
from tests.harness import converged, set_up, settings_for, wait_for


@pytest.fixture(scope="module")
def pair(dbpair: DbPair) -> DbPair:
    return set_up(dbpair, "CREATE TABLE t (id int PRIMARY KEY, v int)")


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


def _config_file(pair: DbPair, path: Path, extra: str = "") -> Path:
    path.write_text(f"""tables = ["public.*"]
[source]
dsn = "{pair.source_dsn}"
slot = "{pair.slot}"
publication = "{pair.publication}"
{extra}
[target]
dsn = "{pair.target_dsn}"
""")
    return path


def test_the_configuration_file_opens_the_stream_before_validation(
        pair: DbPair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``cdcsync run`` opens the stream from the file and the CDCSYNC_SOURCE__ variables as
    they are, before pydantic loads: the same stream the validated settings would open."""
    config = _config_file(pair, tmp_path / "c.toml", 'binary = false\nstatus_interval_s = 20')
    monkeypatch.setenv("CDCSYNC_SOURCE__STATUS_INTERVAL_S", "5")
    early = EarlyStream.open_unvalidated(config)
    assert early is not None
    try:
        wait_for(lambda: early.backend_pid is not None, timeout=10, what="the early stream")
        assert _slot_pid(pair) == early.backend_pid
        settings = load_settings(config)
        assert settings.source.status_interval_s == 5 and not settings.source.binary
        assert early.serves(settings)
        assert not early.serves(settings.model_copy(update={"source": settings.source.model_copy(
            update={"binary": True})}))
    finally:
        early.close()
    wait_for(lambda: _slot_pid(pair) is None, timeout=10, what="the slot to be let go")


@pytest.mark.parametrize("extra", ['decoder = "wal2json"', 'binary = "sometimes"',
                                   'status_interval_s = 0', 'slott = "another"'])
def test_a_configuration_that_is_not_plain_waits_for_validation(
        pair: DbPair, tmp_path: Path, extra: str) -> None:
    """Keys the raw reading cannot vouch for (wal2json's options come from the validated
    tables; a misspelt key might have named another slot): no stream until the settings are
    validated."""
    assert EarlyStream.open_unvalidated(_config_file(pair, tmp_path / "c.toml", extra)) is None


def test_a_slot_name_that_would_need_quoting_opens_nothing(
        pair: DbPair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unvalidated name never reaches START_REPLICATION."""
    monkeypatch.setenv("CDCSYNC_SOURCE__SLOT", 'x" LOGICAL 0/0 (')
    assert EarlyStream.open_unvalidated(_config_file(pair, tmp_path / "c.toml")) is None


def test_run_with_an_invalid_configuration_closes_the_stream_it_opened(
        pair: DbPair, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The stream opened from the file before validation is closed when validation fails: the
    command exits 2 naming the key, and the slot is free."""
    config = _config_file(pair, tmp_path / "c.toml", "[apply]\nmax_rowz = 5")
    assert commands.main(["--config", str(config), "run"]) == 2
    assert "unknown key 'apply.max_rowz'" in capsys.readouterr().err
    wait_for(lambda: _slot_pid(pair) is None, timeout=10, what="the slot to be let go")
