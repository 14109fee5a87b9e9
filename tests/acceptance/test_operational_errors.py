"""Operational mistakes through the CLI: each is one line with the fix, a non-zero exit code and
no traceback unless --debug."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import pytest
from psycopg.conninfo import make_conninfo

from cdcsync import admin
from cdcsync.localpg import free_port
from cdcsync.model import ZERO_LSN
from cdcsync.source import pgoutput
from cdcsync.source.replication import ReplicationStream
from tests.conftest import DbPair
from tests.harness import applying_role, cli, execute, settings_for, write_config

pytestmark = pytest.mark.slow

PASSWORD_USER = f"cdc_pw_{secrets.token_hex(3)}"
NO_REPLICATION_USER = f"cdc_norepl_{secrets.token_hex(3)}"
NO_SELECT_USER = f"cdc_noread_{secrets.token_hex(3)}"
READ_ONLY_USER = f"cdc_readonly_{secrets.token_hex(3)}"


@pytest.fixture(scope="module")
def pair(dbpair: DbPair) -> Iterator[DbPair]:
    execute(dbpair.source_dsn,
            "CREATE TABLE orders (id int PRIMARY KEY, total numeric, note text)",
            "CREATE TABLE notarget (id int PRIMARY KEY)",
            "CREATE TABLE narrow (id int PRIMARY KEY, qty int, note text)",
            "CREATE TABLE checked (id int PRIMARY KEY, qty int)",
            "INSERT INTO checked VALUES (1, -1)")
    admin.setup(settings_for(dbpair), create_tables=True)
    execute(dbpair.source_dsn, "CREATE TABLE unpublished (id int PRIMARY KEY)")
    execute(dbpair.target_dsn, "DROP TABLE notarget", "ALTER TABLE narrow DROP COLUMN note",
            "ALTER TABLE checked ADD CHECK (qty >= 0)",
            "CREATE TABLE unpublished (id int PRIMARY KEY)")
    execute(dbpair.source_dsn, f"CREATE ROLE {NO_REPLICATION_USER} LOGIN",
            f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {NO_REPLICATION_USER}",
            f"CREATE ROLE {NO_SELECT_USER} LOGIN REPLICATION")
    # A target role that owns cdcsync's metadata, as sql/target_role.sql makes it, but may only
    # read the replicated tables.
    applying_role(dbpair, READ_ONLY_USER)
    execute(dbpair.target_dsn,
            f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {READ_ONLY_USER}")
    cluster = dbpair.source_cluster
    if cluster is None:
        yield dbpair
        return
    # One role that must give a password, on the source only; trust stays for everyone else.
    hba = cluster.data_dir / "pg_hba.conf"
    original = hba.read_text()
    execute(dbpair.source_dsn, f"CREATE ROLE {PASSWORD_USER} LOGIN PASSWORD 's3cret-right'")
    hba.write_text(f"host all {PASSWORD_USER} 127.0.0.1/32 scram-sha-256\n{original}")
    execute(dbpair.source_dsn, "SELECT pg_reload_conf()")
    try:
        yield dbpair
    finally:
        hba.write_text(original)
        execute(dbpair.source_dsn, "SELECT pg_reload_conf()", f"DROP ROLE {PASSWORD_USER}")


@contextmanager
def _slot_held(pair: DbPair) -> Iterator[None]:
    stream = ReplicationStream(make_conninfo(pair.source_dsn, application_name="other_consumer"),
                               pair.slot)
    stream.start(ZERO_LSN, pgoutput.options(pair.publication))
    try:
        yield
    finally:
        stream.close()


@dataclass(frozen=True)
class Case:
    tables: tuple[str, ...] = ("public.orders",)
    env: Callable[[DbPair], dict[str, str]] = lambda _: {}
    expected: tuple[str, ...] = ()
    command: str = "run"
    around: Callable[[DbPair], AbstractContextManager[None]] = lambda _: nullcontext()
    needs_cluster: bool = False


CASES = {
    "wrong password": Case(
        env=lambda p: {"CDCSYNC_SOURCE__DSN": make_conninfo(p.source_dsn, user=PASSWORD_USER,
                                                            password="s3cret-wrong")},
        expected=("cannot connect to the source", "password authentication failed",
                  "fix: check the user and password in the source DSN"),
        needs_cluster=True),
    "role without REPLICATION": Case(
        env=lambda p: {"CDCSYNC_SOURCE__DSN": make_conninfo(p.source_dsn,
                                                            user=NO_REPLICATION_USER)},
        expected=("must be superuser or replication role",
                  f'fix: give the source role the REPLICATION attribute: ALTER ROLE '
                  f'"{NO_REPLICATION_USER}" WITH REPLICATION;')),
    "role that may not read a table": Case(
        env=lambda p: {"CDCSYNC_SOURCE__DSN": make_conninfo(p.source_dsn, user=NO_SELECT_USER)},
        expected=(f'the source role "{NO_SELECT_USER}" may not read "public"."orders"',
                  f'fix: run on the source: GRANT SELECT ON "public"."orders" TO '
                  f'"{NO_SELECT_USER}";')),
    "role that may not read a table (check)": Case(
        command="check",
        env=lambda p: {"CDCSYNC_SOURCE__DSN": make_conninfo(p.source_dsn, user=NO_SELECT_USER)},
        expected=("FAIL  selected tables readable:", "GRANT SELECT ON")),
    "target role that may not write a table": Case(
        env=lambda p: {"CDCSYNC_TARGET__DSN": make_conninfo(p.target_dsn, user=READ_ONLY_USER)},
        expected=(f'the target role "{READ_ONLY_USER}" may not insert, update, delete, truncate on '
                  "public.orders",
                  f'fix: run on the target: GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON '
                  f'"public"."orders" TO "{READ_ONLY_USER}";')),
    "target role that may not write a table (check)": Case(
        command="check",
        env=lambda p: {"CDCSYNC_TARGET__DSN": make_conninfo(p.target_dsn, user=READ_ONLY_USER)},
        expected=("FAIL  target tables writable:",
                  f'the target role "{READ_ONLY_USER}" may not insert, update, delete, truncate on '
                  "public.orders")),
    "unreachable host": Case(
        env=lambda p: {"CDCSYNC_TARGET__DSN": make_conninfo(p.target_dsn, port=free_port())},
        expected=("cannot connect to the target", "Connection refused",
                  "fix: check host, port and network access for the target DSN")),
    "missing database": Case(
        env=lambda p: {"CDCSYNC_TARGET__DSN": make_conninfo(p.target_dsn,
                                                            dbname="cdc_no_such_db")},
        expected=('database "cdc_no_such_db" does not exist',
                  "fix: create the database or correct dbname in the target DSN")),
    "missing slot": Case(
        env=lambda _: {"CDCSYNC_SOURCE__SLOT": "no_such_slot"},
        expected=("replication slot 'no_such_slot' does not exist on the source",
                  "fix: run `cdcsync setup` first")),
    "slot in use": Case(
        around=_slot_held,
        expected=("is in use by another process: 'other_consumer' from ", "(walsender PID ",
                  "fix: stop the other `cdcsync run` or consumer of this slot")),
    "publication lacks a table": Case(
        tables=("public.orders", "public.unpublished"),
        expected=("does not publish public.unpublished, which `tables` selects",
                  "fix: run `cdcsync setup` to update the publication")),
    "missing target table": Case(
        tables=("public.orders", "public.notarget"),
        expected=("target table public.notarget does not exist (source public.notarget)",
                  "fix: create it, or run `cdcsync setup --create-tables`")),
    "target with fewer columns": Case(
        tables=("public.narrow",),
        env=lambda _: {"CDCSYNC_APPLY__SCHEMA_CHANGES": "halt"},
        expected=("column(s) note of the source table public.narrow are missing on the target "
                  'public.narrow (schema_changes = "halt")',
                  "fix: run ALTER TABLE public.narrow ADD COLUMN note text; on the target")),
    # The initial snapshot copies a row the target refuses: the merge path names it.
    "row the target refuses during the snapshot": Case(
        tables=("public.checked",),
        expected=("cdcsync: the target rejected a change to public.checked (key 1) committed "
                  "at source LSN", 'violates check constraint "checked_qty_check"',
                  "fix: correct the target table or the row, then run `cdcsync run` again")),
    "target with fewer columns (check)": Case(
        tables=("public.narrow",), command="check",
        expected=("FAIL  target tables: missing or incomplete on the target: public.narrow",
                  "run `cdcsync setup --create-tables` or create them")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_one_line_error_with_the_fix(pair: DbPair, tmp_path: Path, name: str) -> None:
    """The mistake exits non-zero with one line naming it and the fix, and no traceback."""
    case = CASES[name]
    if case.needs_cluster and pair.source_cluster is None:
        pytest.skip("needs the local source cluster to require a password")
    config = write_config(tmp_path / "c.toml", pair, tables=case.tables)
    with ExitStack() as stack:
        stack.enter_context(case.around(pair))
        result = cli(case.command, config=config, env=case.env(pair), timeout=90)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    if case.command == "check":
        output = result.stdout
        assert all(part in output for part in case.expected), output
        return
    errors = [line for line in result.stderr.splitlines() if line.startswith("cdcsync: ")]
    assert len(errors) == 1, result.stderr
    assert all(part in errors[0] for part in case.expected), errors[0]
    assert "s3cret" not in result.stderr


def test_debug_shows_the_traceback(pair: DbPair, tmp_path: Path) -> None:
    """--debug adds the traceback to the same one-line error."""
    config = write_config(tmp_path / "c.toml", pair, tables=("public.orders",))
    result = cli("--debug", "run", config=config, env={"CDCSYNC_SOURCE__SLOT": "no_such_slot"})
    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert "cdcsync: replication slot 'no_such_slot' does not exist" in result.stderr
