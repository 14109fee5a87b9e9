"""The target reached through a connection pooler: a session pool works; a pool that refuses
cdcsync's session settings, or lends its server sessions per transaction, is refused at the
start with the fix."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import psycopg
import pytest

from cdcsync.errors import PrerequisiteError
from cdcsync.leader import lock_holder
from tests.conftest import DbPair
from tests.harness import (
    cli,
    converged,
    execute,
    running,
    set_up,
    settings_for,
    wait_for,
    write_config,
)
from tests.pgbouncer import PoolMode, pgbouncer


@pytest.fixture(scope="module")
def pair(dbpair: DbPair) -> DbPair:
    return set_up(dbpair, "CREATE TABLE t (id int PRIMARY KEY, v int)")


def _insert(pair: DbPair, first: int, count: int) -> None:
    execute(pair.source_dsn, f"INSERT INTO t SELECT g, g FROM generate_series({first}, "
                             f"{first + count - 1}) g")


def _lock_held(pair: DbPair) -> bool:
    """Whether a session holds the slot's lock, as the target server itself sees it."""
    with psycopg.connect(pair.target_dsn, autocommit=True) as conn:
        return lock_holder(conn, pair.slot) is not None


def test_a_pooler_refusing_session_settings_is_named_with_the_fix(
        pair: DbPair, tmp_path: Path) -> None:
    """PgBouncer as it comes refuses the start-up packet's ``options``: the error says that a
    pooler is in the way and where to point the DSN, not to check the network."""
    with pgbouncer(pair.target_dsn, tmp_path, pool_mode="transaction",
                   ignore_options=False) as pooled:
        config = write_config(tmp_path / "cdcsync.toml", pair, target_dsn=pooled)
        result = cli("run", config=config)
    assert result.returncode != 0
    assert "unsupported startup parameter" in result.stderr
    assert "reaches a connection pooler" in result.stderr
    assert "the host without '-pooler'" in result.stderr
    assert "check host, port and network" not in result.stderr


def test_a_transaction_pooler_is_refused_before_streaming(pair: DbPair, tmp_path: Path) -> None:
    """A pooler that lends its server sessions per transaction (its options dropped rather than
    refused) would lend the session holding the slot's lock to any client, a standby's too:
    the start is refused, the lock released, nothing streamed."""
    _insert(pair, 1, 10)
    with pgbouncer(pair.target_dsn, tmp_path, pool_mode="transaction",
                   ignore_options=True) as pooled:
        with pytest.raises(PrerequisiteError) as refused, \
                running(settings_for(pair, target={"dsn": pooled})) as runner:
            wait_for(lambda: not runner.is_alive(), timeout=30, what="the start refused")
        assert not _lock_held(pair), "the lock taken through the pooler is released"
    message = str(refused.value)
    assert "lends its server sessions per transaction" in message
    assert "point the target DSN at the server itself" in message
    with psycopg.connect(pair.target_dsn) as conn:
        row = conn.execute("SELECT count(*) FROM t").fetchone()
    assert row == (0,), "nothing was applied through the transaction pooler"
    with running(settings_for(pair)) as runner:
        wait_for(converged(pair, ["public.t"]), runner=runner, timeout=30,
                 what="the direct DSN's start, with no lock left behind")


def test_a_session_pooler_is_streamed_through(pair: DbPair, tmp_path: Path) -> None:
    """In session mode each client keeps its server session: the lock is sound, and cdcsync
    streams through the pooler."""
    with pgbouncer(pair.target_dsn, tmp_path, pool_mode="session", ignore_options=True) as pooled, \
            running(settings_for(pair, target={"dsn": pooled})) as runner:
        _insert(pair, 101, 50)
        wait_for(converged(pair, ["public.t"]), runner=runner, timeout=30)
        assert _lock_held(pair)


def test_check_names_a_transaction_pooler(pair: DbPair, tmp_path: Path) -> None:
    """`cdcsync check` tells a transaction pool from a session pool before anything runs."""
    lines: dict[PoolMode, str] = {}
    modes: tuple[PoolMode, ...] = ("transaction", "session")
    for mode in modes:
        with pgbouncer(pair.target_dsn, tmp_path, pool_mode=mode, ignore_options=True) as pooled:
            config = write_config(tmp_path / f"{mode}.toml", pair, target_dsn=pooled)
            result = cli("check", config=config)
        lines[mode] = next(line for line in result.stdout.splitlines() if "target sessions" in line)
    assert "FAIL" in lines["transaction"]
    assert "lends its server sessions per transaction" in lines["transaction"]
    assert "FAIL" not in lines["session"]
    assert "keeps each client's session" in lines["session"]


def test_a_transaction_pooler_lending_another_idle_session_is_named_too(
        pair: DbPair, tmp_path: Path) -> None:
    """A pooler that lends the session idle longest gives the second connection another one
    while several are idle: the lock's connection, asked again meanwhile, gets yet another."""
    with pgbouncer(pair.target_dsn, tmp_path, pool_mode="transaction", ignore_options=True,
                   round_robin=True) as pooled:
        # Three transactions at once take three server sessions, idle again once committed.
        idle = [psycopg.connect(pooled) for _ in range(3)]
        for conn in idle:
            conn.execute("SELECT 1")
        for conn in idle:
            conn.commit()
            conn.close()
        result = cli("check", config=write_config(tmp_path / "cdcsync.toml", pair,
                                                  target_dsn=pooled))
    line = next(line for line in result.stdout.splitlines() if "target sessions" in line)
    assert line.startswith("FAIL") and "lends its server sessions per transaction" in line


def test_a_source_behind_a_pooler_is_refused_and_its_slot_kept(
        dbpair_factory: Callable[[str], AbstractContextManager[DbPair]], tmp_path: Path) -> None:
    """A pooler cannot carry the replication protocol. The first start, which would re-create
    the slot with a snapshot, asks for the replication connection before it drops the slot:
    the slot `setup` made stays (it looked lost, and alerted so, while the daemon retried),
    and the start fails with the fix instead of retrying for ever. `check` says so first."""
    with dbpair_factory("pooled_source") as fresh:
        pair = set_up(fresh, "CREATE TABLE t (id int PRIMARY KEY, v int)")
        with pgbouncer(pair.source_dsn, tmp_path, pool_mode="session",
                       ignore_options=True) as pooled:
            settings = settings_for(pair, source={"dsn": pooled})
            with pytest.raises(PrerequisiteError) as refused, running(settings) as runner:
                wait_for(lambda: not runner.is_alive(), timeout=30, what="the start refused")
            checked = cli("check", config=write_config(tmp_path / "cdcsync.toml", pair,
                                                       source={"dsn": pooled}))
        with psycopg.connect(pair.source_dsn) as conn:
            kept = conn.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s",
                                (pair.slot,)).fetchone()
    assert kept == (1,), "the slot setup made is kept"
    message = str(refused.value)
    assert "unsupported startup parameter: replication" in message
    assert "the replication protocol): point it at the server itself" in message
    line = next(line for line in checked.stdout.splitlines() if "replication connection" in line)
    assert line.startswith("FAIL") and "point it at the server itself" in line
