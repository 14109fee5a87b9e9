"""The target refusing to apply for a reason no single row causes: privileges granted on columns
rather than the table, a privilege revoked while cdcsync runs, a statement trigger. cdcsync
applies what it may, and otherwise halts (or fails the resync) naming the table and the fix,
never with a traceback or a command left waiting. The tests run in order on one database pair."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import orjson
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from cdcsync import admin
from cdcsync.backfill import operator, resync
from cdcsync.config import Settings
from cdcsync.daemon import DaemonThread
from cdcsync.errors import ApplyError, CdcsyncError
from tests.conftest import DbPair
from tests.harness import (
    applying_role,
    cli,
    execute,
    running,
    settings_for,
    start_daemon,
    wait_for,
    write_config,
)

ROLE = f"cdc_cols_{secrets.token_hex(3)}"
COLUMNS = "id, qty, note"
GRANT = f'GRANT SELECT, INSERT, UPDATE, DELETE ON "public"."items" TO "{ROLE}";'


@pytest.fixture(scope="module")
def pair(dbpair: DbPair) -> DbPair:
    execute(dbpair.source_dsn, "CREATE TABLE items (id int PRIMARY KEY, qty int, note text)",
            "INSERT INTO items SELECT g, g, 'first' FROM generate_series(1, 50) g")
    admin.setup(settings_for(dbpair), create_tables=True)
    applying_role(dbpair, ROLE)
    # A column of the target's own, which the role may not touch: the apply never writes it.
    execute(dbpair.target_dsn, "ALTER TABLE items ADD COLUMN audit text DEFAULT 'kept'",
            f"GRANT SELECT ({COLUMNS}), INSERT ({COLUMNS}), UPDATE ({COLUMNS}) ON items "
            f"TO {ROLE}", f"GRANT DELETE ON items TO {ROLE}")
    return dbpair


def test_a_role_that_may_not_truncate_is_refused_unless_truncates_are_ignored(
        pair: DbPair, tmp_path: Path) -> None:
    """A source TRUNCATE is applied by default: a role without TRUNCATE is refused at the start,
    not months later at the first one, with the GRANT or the setting that does without it."""
    config = write_config(tmp_path / "cdcsync.toml", pair, target_dsn=_as_role(pair))
    checked = cli("check", config=config)
    assert (f'FAIL  target tables writable: the target role "{ROLE}" may not truncate on '
            "public.items, which the apply does — fix: run on the target: GRANT SELECT, INSERT, "
            f'UPDATE, DELETE, TRUNCATE ON "public"."items" TO "{ROLE}"; (sql/target_role.sql) '
            '(or set [apply] truncate = "ignore" to leave source TRUNCATEs unapplied)'
            ) in checked.stdout, checked.stdout
    ignoring = cli("check", config=config, env={"CDCSYNC_APPLY__TRUNCATE": "ignore"})
    assert "ok    target tables writable" in ignoring.stdout, ignoring.stdout
    execute(pair.target_dsn, f"GRANT TRUNCATE ON items TO {ROLE}")


def _as_role(pair: DbPair) -> str:
    return make_conninfo(pair.target_dsn, user=ROLE)


def _rows(dsn: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(f"SELECT {COLUMNS} FROM items ORDER BY id".encode()).fetchall()


def _same(pair: DbPair) -> Callable[[], bool]:
    return lambda: _rows(pair.source_dsn) == _rows(pair.target_dsn)


def _halt(settings: Settings, meanwhile: Callable[[DaemonThread], None] = lambda _: None) -> str:
    """Run the daemon, do ``meanwhile`` while it runs, and return the message of the apply
    error it halts on."""
    runner = DaemonThread(settings)
    runner.start()
    try:
        meanwhile(runner)
        wait_for(lambda: runner.error is not None, what="the halt")
    finally:
        runner.close()
    assert isinstance(runner.error, ApplyError), runner.error
    return str(runner.error)


def test_a_role_that_may_not_create_temporary_tables_is_refused(
        pair: DbPair, tmp_path: Path) -> None:
    """TEMPORARY revoked from PUBLIC on the target database (as hardened setups do) and not
    granted to the role: the apply could stage no batch. `check` and the start of `run` say so,
    with the GRANT; `run` used to start and halt at its first batch."""
    config = write_config(tmp_path / "cdcsync.toml", pair, target_dsn=_as_role(pair))
    database = pair.target_db
    execute(pair.target_dsn, f"REVOKE TEMPORARY ON DATABASE {database} FROM PUBLIC, {ROLE}")
    try:
        checked = cli("check", config=config)
        started = cli("run", config=config, timeout=30)
    finally:
        execute(pair.target_dsn, f"GRANT TEMPORARY ON DATABASE {database} TO PUBLIC, {ROLE}")
    refusal = (f'the target role "{ROLE}" may not create temporary tables in database '
               f'"{database}", where the apply stages each batch — fix: run on the target: '
               f'GRANT TEMPORARY ON DATABASE "{database}" TO "{ROLE}"; (sql/target_role.sql)')
    assert f"FAIL  target tables writable: {refusal}" in checked.stdout, checked.stdout
    assert started.returncode == 1, started.stdout + started.stderr
    assert started.stderr.strip().splitlines()[-1] == f"cdcsync: {refusal}", started.stderr


def test_a_role_that_does_not_own_the_metadata_is_refused_with_the_statements_to_run(
        pair: DbPair, tmp_path: Path) -> None:
    """`setup` ran as one role (here the metadata belongs to ROLE) and `run` uses another,
    granted everything but the metadata's ownership: every start brings the metadata up to
    date, which it may not. `check`, `setup` and `run` refuse with the ALTER ... OWNER
    statements; run as given, they let `check` pass (it used to pass before them, and `run`
    ended with `the database refused: permission denied for schema cdcsync`)."""
    other = f"cdc_other_{secrets.token_hex(3)}"
    execute(pair.target_dsn, f"CREATE ROLE {other} LOGIN",
            f"GRANT USAGE ON SCHEMA public, cdcsync TO {other}",
            f"GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON items TO {other}",
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA cdcsync TO {other}")
    config = write_config(tmp_path / "cdcsync.toml", pair,
                          target_dsn=make_conninfo(pair.target_dsn, user=other))
    checked, set_up, started = (cli("check", config=config), cli("setup", config=config),
                                cli("run", config=config, timeout=30))
    refusal = (f'the target role "{other}" may not bring cdcsync\'s metadata schema up to date, '
               f'as every start does: 8 of its objects belong to "{ROLE}" (`cdcsync setup` ran as '
               f'another role) — fix: run on the target as "{ROLE}": ALTER SCHEMA "cdcsync" '
               f'OWNER TO "{other}"; ALTER TABLE "cdcsync"."checkpoint" OWNER TO "{other}"; ')
    assert f"FAIL  target metadata: {refusal}" in checked.stdout, checked.stdout
    for refused in (set_up, started):
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert refused.stderr.strip().splitlines()[-1].startswith(f"cdcsync: {refusal}"), (
            refused.stderr)
    statements = started.stderr.strip().splitlines()[-1].split(f'as "{ROLE}": ')[1]
    assert f'ALTER VIEW "cdcsync"."freshness" OWNER TO "{other}";' in statements
    execute(pair.target_dsn, statements)
    try:
        passed = cli("check", config=config)
        assert f"ok    target metadata: schema cdcsync present, role {other} may bring it up to " \
               "date" in passed.stdout, passed.stdout
    finally:
        execute(pair.target_dsn, statements.replace(f'"{other}"', f'"{ROLE}"'))


def test_grants_on_the_replicated_columns_are_enough(pair: DbPair, tmp_path: Path) -> None:
    """A role granted SELECT, INSERT and UPDATE on each replicated column (not on the table)
    and DELETE passes `check` and applies: the snapshot, inserts, updates, deletes."""
    config = write_config(tmp_path / "cdcsync.toml", pair, target_dsn=_as_role(pair))
    checked = cli("check", config=config)
    assert f"ok    target tables writable: role {ROLE} may apply to all 1" in checked.stdout, (
        checked.stdout + checked.stderr)
    with running(settings_for(pair, target={"dsn": _as_role(pair)})) as runner:
        wait_for(_same(pair), runner=runner, what="the snapshot")
        execute(pair.source_dsn, "INSERT INTO items VALUES (51, 51, 'new')",
                "UPDATE items SET qty = -qty WHERE id <= 10", "DELETE FROM items WHERE id > 45")
        wait_for(_same(pair), runner=runner, what="the stream's changes")
    with psycopg.connect(pair.target_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*), min(audit), max(audit) FROM items").fetchone() == (
            45, "kept", "kept")


def test_a_privilege_revoked_while_streaming_halts_with_the_grant(pair: DbPair) -> None:
    """INSERT revoked while the daemon streams: the change it may not apply halts it, and the
    fix is the GRANT to run; nothing of that change's transaction reaches the target."""
    def revoke(runner: DaemonThread) -> None:
        execute(pair.source_dsn, "UPDATE items SET note = 'streaming' WHERE id = 1")
        wait_for(_same(pair), runner=runner, what="the stream")
        execute(pair.target_dsn, f"REVOKE INSERT ({COLUMNS}) ON items FROM {ROLE}")
        execute(pair.source_dsn, "INSERT INTO items VALUES (100, 1, 'refused')")

    try:
        message = _halt(settings_for(pair, target={"dsn": _as_role(pair)}), revoke)
    finally:
        execute(pair.target_dsn, f"GRANT INSERT ({COLUMNS}) ON items TO {ROLE}")
    assert message.startswith("the target rejected a change to public.items (key 100) "), message
    assert "permission denied for table items" in message
    assert f"fix: run on the target: {GRANT} (sql/target_role.sql), then run `cdcsync run` " \
           "again" in message
    assert [r[0] for r in _rows(pair.target_dsn)][-1] == 45


def test_a_resync_the_target_role_may_not_apply_is_refused_before_it_is_queued(
        pair: DbPair, tmp_path: Path) -> None:
    """UPDATE revoked while the daemon streams: `cdcsync resync` refuses with the GRANT before
    queueing, and the daemon streams on (it would halt on the chunk)."""
    config = write_config(tmp_path / "cdcsync.toml", pair, target_dsn=_as_role(pair))
    daemon = _streaming(config, tmp_path / "daemon.log")
    try:
        execute(pair.target_dsn, f"REVOKE UPDATE ({COLUMNS}) ON items FROM {ROLE}")
        refused = cli("resync", "public.items", config=config)
        assert daemon.poll() is None, "the daemon stopped"
    finally:
        execute(pair.target_dsn, f"GRANT UPDATE ({COLUMNS}) ON items TO {ROLE}")
        daemon.terminate()
        assert daemon.wait(timeout=30) == 0
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        f'cdcsync: the target role "{ROLE}" may not update on public.items, which the apply '
        f'does — fix: run on the target: GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON '
        f'"public"."items" TO "{ROLE}"; (sql/target_role.sql)'), refused.stderr
    assert _requests(pair) == []


@pytest.mark.parametrize(("operation", "refusal", "fix"), [
    ("UPDATE", "the target rejected a change to public.items (key ",
     "correct the target table or the row"),
    ("DELETE", "the target refused rows copied from the source into public.items: ",
     "correct the target table"),
], ids=["merge", "deletion"])
def test_a_resync_the_target_refuses_fails_and_its_command_says_why(
        pair: DbPair, tmp_path: Path, operation: str, refusal: str, fix: str) -> None:
    """A statement trigger that raises on UPDATE (the chunk's merge) or DELETE (of the target
    rows the source lacks), then `cdcsync resync`: the chunk is refused, the daemon halts, the
    request is failed, and the command ends at once with the error and its fix (it used to wait
    for the halted daemon for ever)."""
    config = write_config(tmp_path / "cdcsync.toml", pair, target_dsn=_as_role(pair))
    trigger = f"refuse_{operation.lower()}"
    daemon = _streaming(config, tmp_path / "daemon.log")
    try:
        execute(pair.target_dsn,
                f"CREATE FUNCTION {trigger}() RETURNS trigger LANGUAGE plpgsql AS "
                f"$$BEGIN RAISE EXCEPTION 'items takes no {operation}'; END$$",
                f"CREATE TRIGGER {trigger} BEFORE {operation} ON items "
                f"FOR EACH STATEMENT EXECUTE FUNCTION {trigger}()")
        done = cli("resync", "public.items", config=config, timeout=60)
        assert daemon.wait(timeout=30) == 1
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        execute(pair.target_dsn, f"DROP TRIGGER IF EXISTS {trigger} ON items",
                f"DROP FUNCTION IF EXISTS {trigger}()")
    assert done.returncode == 1, done.stdout + done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith(f"cdcsync: resync of public.items failed: {refusal}"), error
    assert f"items takes no {operation}" in error
    assert error.endswith(f"fix: {fix}, then run `cdcsync run` again; it resumes from the last "
                          "checkpoint; then `cdcsync resync public.items` again"), error
    status = orjson.loads(cli("status", "--json", config=config).stdout)
    newest = status["failed_resyncs"][0]
    assert (newest["table"], newest["purpose"]) == ("public.items", "resync")
    assert newest["error"].startswith(refusal)
    assert status["open_resyncs"] == []


def test_a_resync_command_stops_waiting_for_a_daemon_that_is_gone(
        pair: DbPair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon streaming the slot is killed before it takes the request up: the command
    waiting for it ends once the lock and the slot have stayed free for `GONE_S`, saying what
    resumes the request."""
    monkeypatch.setattr(resync, "GONE_S", 2.0)
    config = write_config(tmp_path / "cdcsync.toml", pair, target_dsn=_as_role(pair))
    daemon = _streaming(config, tmp_path / "daemon.log")
    outcome: list[BaseException | object] = []
    waiting = threading.Thread(target=lambda: outcome.append(_resync(pair)))
    try:
        os.kill(daemon.pid, signal.SIGSTOP)
        waiting.start()
        wait_for(lambda: _requests(pair) == ["queued"], what="the request")
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.wait()
        waiting.join(timeout=30)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        execute(pair.target_dsn, "DELETE FROM cdcsync.resync_requests WHERE state = 'queued'")
    assert not waiting.is_alive(), "the command still waits"
    assert isinstance(outcome[0], CdcsyncError), outcome
    assert str(outcome[0]).startswith(
        "resync of public.items stopped before it finished: the daemon performing it stopped "
        "(request "), outcome
    assert str(outcome[0]).endswith("is queued) — fix: see the daemon's log for why, then "
                                    "`cdcsync run`: it resumes the request")


def test_a_resync_done_later_clears_the_failure_from_status(pair: DbPair, tmp_path: Path) -> None:
    """Once the privileges are back, a resync of the table (performed by the command itself,
    no daemon running) succeeds, and `status` no longer shows the failed one."""
    config = write_config(tmp_path / "cdcsync.toml", pair, target_dsn=_as_role(pair))
    before = orjson.loads(cli("status", "--json", config=config).stdout)["failed_resyncs"]
    assert [r["table"] for r in before] == ["public.items", "public.items"]
    done = cli("resync", "public.items", config=config, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    after = orjson.loads(cli("status", "--json", config=config).stdout)
    assert after["failed_resyncs"] == [], after["failed_resyncs"]
    assert _same(pair)()


def test_a_truncate_revoked_while_streaming_halts_with_the_grant(pair: DbPair) -> None:
    """TRUNCATE revoked while the daemon streams, then a source TRUNCATE: the halt names the
    tables and gives the GRANT, or the setting that leaves TRUNCATEs unapplied. Last on this
    pair: the source is left empty."""
    before: list[tuple[object, ...]] = []

    def revoke(runner: DaemonThread) -> None:
        execute(pair.source_dsn, "UPDATE items SET note = 'before the truncate' WHERE id = 2")
        wait_for(_same(pair), runner=runner, what="the stream")
        before.extend(_rows(pair.target_dsn))
        execute(pair.target_dsn, f"REVOKE TRUNCATE ON items FROM {ROLE}")
        execute(pair.source_dsn, "TRUNCATE items")

    message = _halt(settings_for(pair, target={"dsn": _as_role(pair)}), revoke)
    assert message.startswith("the target refused a source TRUNCATE of public.items: permission "
                              "denied for table items — fix: run on the target: GRANT SELECT, "
                              f'INSERT, UPDATE, DELETE, TRUNCATE ON "public"."items" TO "{ROLE}"; '
                              '(sql/target_role.sql) (or set [apply] truncate = "ignore" to leave '
                              "source TRUNCATEs unapplied), then run `cdcsync run` again"), message
    assert len(before) > 40
    assert _rows(pair.target_dsn) == before


def _resync(pair: DbPair) -> BaseException | object:
    try:
        return operator.resync_table(settings_for(pair, target={"dsn": _as_role(pair)}),
                                     "public.items", None, dry_run=False)
    except CdcsyncError as exc:
        return exc


def _streaming(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """`cdcsync run` started, once it streams: past its start checks, holding lock and slot."""
    daemon = start_daemon(config, log)
    try:
        wait_for(lambda: b'"event":"streaming"' in log.read_bytes(), what="the daemon's stream")
    except AssertionError:
        daemon.kill()
        daemon.wait()
        raise
    return daemon


def _requests(pair: DbPair) -> list[str]:
    with psycopg.connect(pair.target_dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT state FROM cdcsync.resync_requests WHERE state <> 'failed' "
                            "ORDER BY id").fetchall()
    return [str(r[0]) for r in rows]


def test_a_copy_refused_with_no_row_to_blame_halts_naming_the_table(
        dbpair_factory: Callable[[str], AbstractContextManager[DbPair]]) -> None:
    """An empty table whose target refuses every insert statement (a statement trigger): the
    snapshot's COPY and then its merge of no rows are refused. The halt names the table and
    the trigger's error (it used to be an IndexError from the merge's fallback)."""
    with dbpair_factory("refused_empty") as pair:
        execute(pair.source_dsn, "CREATE TABLE empty (id int PRIMARY KEY, qty int)")
        admin.setup(settings_for(pair), create_tables=True)
        execute(pair.target_dsn,
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
                "$$BEGIN RAISE EXCEPTION 'this table takes no writes'; END$$",
                "CREATE TRIGGER refuse BEFORE INSERT ON empty "
                "FOR EACH STATEMENT EXECUTE FUNCTION refuse()")
        message = _halt(settings_for(pair))
    assert message.startswith("the target refused to apply to public.empty: this table takes "
                              "no writes"), message
    assert message.endswith("fix: correct the target table, then run `cdcsync run` again; it "
                            "resumes from the last checkpoint"), message
