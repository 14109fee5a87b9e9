"""The whole pipeline as the least-privilege roles of sql/, not as a superuser: an administrator
runs the role scripts (with psql, as documented) and the publication and slot part of setup;
everything else runs as the two roles."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from cdcsync import admin
from cdcsync.localpg import find_pg_bin
from tests.conftest import DbPair
from tests.harness import converged, execute, running, settings_for, wait_for

SQL_DIR = Path(__file__).parents[2] / "sql"
SOURCE_ROLE, TARGET_ROLE = "cdcsync_replicator", "cdcsync_apply"
TABLES = """
CREATE TABLE customers (id int PRIMARY KEY, name text, updated_at timestamptz DEFAULT now());
CREATE TABLE orders (id bigint PRIMARY KEY, customer_id int REFERENCES customers (id),
                     total numeric(12,2), updated_at timestamptz DEFAULT now());
"""


def _psql(dsn: str, script: str) -> None:
    command = [str(find_pg_bin() / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
               "-v", "password='not-a-superuser'", "-v", "schema=public",
               "-f", str(SQL_DIR / script), "-d", dsn]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def _as(dsn: str, role: str) -> str:
    return make_conninfo(dsn, user=role, password="not-a-superuser")


@pytest.fixture(scope="module")
def pair(dbpair: DbPair) -> Iterator[DbPair]:
    execute(dbpair.source_dsn, TABLES)
    execute(dbpair.target_dsn, TABLES)
    _psql(dbpair.source_dsn, "source_role.sql")
    _psql(dbpair.target_dsn, "target_role.sql")
    try:
        yield dbpair
    finally:
        # Roles are cluster-wide: drop what they own or were granted, then the roles.
        execute(dbpair.source_dsn, f"DROP OWNED BY {SOURCE_ROLE}")
        execute(dbpair.target_dsn, f"DROP OWNED BY {TARGET_ROLE}")
        for dsn, role in ((dbpair.source_dsn, SOURCE_ROLE), (dbpair.target_dsn, TARGET_ROLE)):
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE usename = %s", (role,))
            execute(dsn, f"DROP ROLE {role}")


def test_pipeline_runs_as_the_least_privilege_roles(
        pair: DbPair, caplog: pytest.LogCaptureFixture) -> None:
    """Setup (publication and slot by the administrator, the cdcsync schema by the apply role),
    then run as the two roles: the target equals the source, jobs included."""
    source_dsn, target_dsn = _as(pair.source_dsn, SOURCE_ROLE), _as(pair.target_dsn, TARGET_ROLE)
    with psycopg.connect(source_dsn) as conn:
        assert conn.execute("SELECT rolsuper, rolreplication FROM pg_roles "
                            "WHERE rolname = current_user").fetchone() == (False, True)
    admin.setup(settings_for(pair, target={"dsn": target_dsn}), create_tables=False)
    settings = settings_for(pair, source={"dsn": source_dsn, "heartbeat_interval_s": 0.5},
                            target={"dsn": target_dsn}, alerts={"check_interval_s": 0.5},
                            apply={"on_error": "dead_letter"})
    caplog.set_level(logging.WARNING, logger="cdcsync")
    tables = ["public.customers", "public.orders"]
    with running(settings) as runner:
        execute(pair.source_dsn,
                "INSERT INTO customers SELECT g, 'c' || g FROM generate_series(1, 50) g",
                "INSERT INTO orders SELECT g, 1 + g % 50, g * 1.5 FROM generate_series(1, 200) g",
                "UPDATE orders SET total = 0 WHERE id % 7 = 0",
                "DELETE FROM orders WHERE customer_id = 3", "DELETE FROM customers WHERE id = 3",
                "TRUNCATE orders")
        execute(pair.source_dsn,
                "INSERT INTO orders SELECT g, 1 + g % 2, g FROM generate_series(1, 20) g")
        wait_for(converged(pair, tables), runner=runner, timeout=60)

        def walsender_users() -> set[str]:
            with psycopg.connect(pair.source_dsn) as conn:
                return {str(r[0]) for r in conn.execute(
                    "SELECT usename FROM pg_stat_activity WHERE backend_type = 'walsender'")}

        # Sampled until seen: a loaded machine may catch the stream between two connections.
        wait_for(lambda: SOURCE_ROLE in walsender_users(), runner=runner,
                 what="the walsender of the source role")
        # Only a heartbeat, written by the source role, can move the checkpoint past this.
        written = _one(pair.source_dsn, "SELECT now()::text")
        wait_for(lambda: _one(pair.target_dsn, f"SELECT commit_time > '{written}'::timestamptz "
                                               "FROM cdcsync.checkpoint") is True,
                 runner=runner, what="a heartbeat applied")
    assert not [r for r in caplog.records if r.getMessage() == "job_failed"]
    assert _one(pair.target_dsn, "SELECT count(*) FROM cdcsync.dead_letters") == 0


def _one(dsn: str, query: str) -> object:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query.encode()).fetchone()
        return row[0] if row else None
