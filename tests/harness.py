"""Test helpers: settings for a database pair, the daemon on a thread, waiting for convergence."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from cdcsync import admin
from cdcsync.config import Settings
from cdcsync.daemon import DaemonThread
from cdcsync.target_ahead import TargetAhead
from tests.conftest import DbPair

DECODERS = ("pgoutput", "wal2json")
BOTH_DECODERS = pytest.mark.parametrize("decoder", DECODERS, indirect=True, scope="module")
"""``pytestmark = BOTH_DECODERS`` runs a module once per decoder, each on its own database pair."""


def settings_for(pair: DbPair, tables: tuple[str, ...] = ("public.*",),
                 **sections: Any) -> Settings:
    """Settings pointing at the pair, with test-friendly batching; ``sections`` override keys."""
    data: dict[str, Any] = {
        "tables": tables,
        "source": {"dsn": pair.source_dsn, "slot": pair.slot, "publication": pair.publication,
                   "decoder": pair.decoder},
        "target": {"dsn": pair.target_dsn},
        "apply": {"max_delay_ms": 50},
        "http": {"listen": "127.0.0.1:0"},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            data[name] = {**data.get(name, {}), **values}
        else:
            data[name] = values
    return Settings(**data)


@contextmanager
def running(settings: Settings, ahead: TargetAhead | None = None) -> Iterator[DaemonThread]:
    runner = DaemonThread(settings, ahead=ahead)
    runner.start()
    try:
        yield runner
    finally:
        assert runner.close(), "the daemon did not stop within the budget"
    if runner.error is not None:
        raise runner.error


def wait_for(predicate: Callable[[], bool], timeout: float = 60, what: str = "condition",
             runner: DaemonThread | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if runner is not None and runner.error is not None:
            raise AssertionError(f"daemon failed while waiting for {what}") from runner.error
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def table_rows(dsn: str, table: str, order_by: str = "1") -> list[tuple[Any, ...]]:
    schema, _, name = table.partition(".")
    with psycopg.connect(dsn, autocommit=True) as conn:
        query = sql.SQL("SELECT * FROM {} ORDER BY {}").format(
            sql.Identifier(schema, name), sql.SQL(order_by))
        return conn.execute(query).fetchall()


def converged(pair: DbPair, tables: list[str]) -> Callable[[], bool]:
    def check() -> bool:
        return all(table_rows(pair.source_dsn, t) == table_rows(pair.target_dsn, t)
                   for t in tables)
    return check


def execute(dsn: str, *statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement.encode())


def applying_role(pair: DbPair, role: str) -> None:
    """Create ``role`` on the target as sql/target_role.sql makes it, owning cdcsync's metadata
    (made by a setup already), without any grant on the replicated tables: each test gives
    those it needs."""
    execute(pair.target_dsn, f"CREATE ROLE {role} LOGIN",
            f"GRANT USAGE ON SCHEMA public TO {role}",
            f"GRANT TEMPORARY ON DATABASE {pair.target_db} TO {role}",
            f"ALTER SCHEMA cdcsync OWNER TO {role}",
            f"ALTER VIEW cdcsync.freshness OWNER TO {role}",
            f"DO $$ DECLARE t text; BEGIN FOR t IN SELECT tablename FROM pg_tables "
            f"WHERE schemaname = 'cdcsync' LOOP EXECUTE format('ALTER TABLE cdcsync.%I "
            f"OWNER TO {role}', t); END LOOP; END $$")


def set_up(pair: DbPair, *source_ddl: str) -> DbPair:
    """A module's pair: ``source_ddl`` run on the source, then ``cdcsync setup`` of every table
    (each created on the target)."""
    execute(pair.source_dsn, *source_ddl)
    admin.setup(settings_for(pair), create_tables=True)
    return pair


def write_config(path: Path, pair: DbPair, tables: tuple[str, ...] = ("public.*",),
                 extra: str = "", source: dict[str, Any] | None = None, *,
                 target_dsn: str | None = None) -> Path:
    """A TOML configuration for the CLI, as a user would write it; ``source`` overrides
    ``[source]`` keys, ``target_dsn`` the target's DSN."""
    keys = {"dsn": pair.source_dsn, "slot": pair.slot, "publication": pair.publication,
            "decoder": pair.decoder, **(source or {})}
    path.write_text(
        f"tables = {list(tables)!r}\n[source]\n"
        + "".join(f"{k} = {v!r}\n" for k, v in keys.items())
        + f"[target]\ndsn = {target_dsn or pair.target_dsn!r}\n"
        f"[apply]\nmax_delay_ms = 50\n[http]\nlisten = \"127.0.0.1:0\"\n"
        f"[log]\nformat = \"json\"\n{extra}",
        encoding="utf-8",
    )
    return path


CLI = str(Path(sys.executable).parent / "cdcsync")


def cli(*args: str, config: Path | None = None, timeout: float = 60,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [CLI, *(["--config", str(config)] if config else []), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, check=False)


def start_daemon(config: Path, log: Path,
                 env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("ab") as sink:
        return subprocess.Popen([CLI, "--config", str(config), "run"], stdout=sink, stderr=sink,
                                env={**os.environ, **(env or {})})


Transaction = Callable[[psycopg.Connection[tuple[Any, ...]], random.Random], None]


def writer(dsn: str, stop: threading.Event, seed: int, transaction: Transaction,
           pause_s: float = 0.0) -> threading.Thread:
    """A thread running ``transaction`` on the source until ``stop``; a deadlock between two
    writers is rolled back (the source stays consistent) and the loop goes on."""
    def loop() -> None:
        rng = random.Random(seed)
        with psycopg.connect(dsn) as conn:
            while not stop.is_set():
                try:
                    transaction(conn, rng)
                except psycopg.errors.DeadlockDetected:
                    conn.rollback()
                time.sleep(pause_s)

    return threading.Thread(target=loop, name=f"writer-{seed}", daemon=True)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now
