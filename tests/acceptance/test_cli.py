"""The operator commands as subprocesses: check, setup, status, teardown, configuration errors."""

from __future__ import annotations

from pathlib import Path

import orjson
import psycopg
import pytest

from tests.conftest import DbPair
from tests.harness import cli, execute, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair(dbpair: DbPair) -> DbPair:
    execute(dbpair.source_dsn,
            "CREATE TABLE orders (id int PRIMARY KEY, total numeric, updated_at timestamptz)",
            "CREATE TABLE nokey (a int, b text)")
    return dbpair


def test_check_before_setup_reports_todo_not_failure(pair: DbPair, tmp_path: Path) -> None:
    """On a fresh pair, check says the slot and publication are for setup, and fails on tables."""
    config = write_config(tmp_path / "c.toml", pair, tables=("public.orders",))
    result = cli("check", config=config)
    out = result.stdout
    assert "ok    source wal_level: logical" in out
    assert f"todo  slot: slot '{pair.slot}' will be created by setup" in out
    assert "todo  publication:" in out
    assert "FAIL  target tables: missing or incomplete on the target: public.orders" in out
    assert "setup --create-tables" in out
    assert result.returncode == 1


def test_setup_refuses_table_without_key(pair: DbPair, tmp_path: Path) -> None:
    """A table without a key is refused with the ALTER TABLE to run; nothing is published."""
    config = write_config(tmp_path / "c.toml", pair, tables=("public.*",))
    result = cli("setup", config=config)
    assert result.returncode == 1
    assert ('ALTER TABLE "public"."nokey" ADD PRIMARY KEY (<its unique, not-null columns>);'
            in result.stderr)
    assert "Traceback" not in result.stderr
    with psycopg.connect(pair.source_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM pg_publication WHERE pubname = %s",
                            (pair.publication,)).fetchone() == (0,)
    check = cli("check", config=config)
    assert check.returncode == 1
    assert "FAIL  selected tables have keys:" in check.stdout
    assert "nokey" in check.stdout


def test_setup_check_status_teardown(pair: DbPair, tmp_path: Path) -> None:
    """setup is idempotent, check then passes, status reports, teardown removes slot and pub."""
    config = write_config(tmp_path / "c.toml", pair, tables=("public.orders",))
    first = cli("setup", "--create-tables", config=config)
    assert first.returncode == 0, first.stderr
    assert f"slot '{pair.slot}' created" in first.stdout
    again = cli("setup", "--create-tables", config=config)
    assert f"slot '{pair.slot}' exists" in again.stdout
    assert "unchanged" in again.stdout
    check = cli("check", config=config)
    assert check.returncode == 0, check.stdout
    status = cli("status", "--json", config=config)
    assert status.returncode == 0, status.stderr
    report = orjson.loads(status.stdout)
    assert report["slot_exists"] is True and report["slot"] == pair.slot
    assert report["tables"]["public.orders"]["state"] == "pending"
    text = cli("status", config=config)
    assert "table public.orders" in text.stdout and "pending, 0 rows copied" in text.stdout
    assert cli("teardown", config=config).returncode == 2
    down = cli("teardown", "--yes", config=config)
    assert down.returncode == 0
    assert f"slot '{pair.slot}' dropped" in down.stdout
    with psycopg.connect(pair.source_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s",
                            (pair.slot,)).fetchone() == (0,)


def test_bad_config_exits_2_with_key_and_no_traceback(tmp_path: Path) -> None:
    """A bad value exits 2, names key and value, and prints no traceback."""
    path = tmp_path / "bad.toml"
    path.write_text('tables = ["public.t"]\n[source]\ndsn = "x"\n[target]\ndsn = "y"\n'
                    '[apply]\nmax_rows = "lots"\n')
    result = cli("check", config=path)
    assert result.returncode == 2
    assert "apply.max_rows" in result.stderr and "'lots'" in result.stderr
    assert "Traceback" not in result.stderr


def test_wrong_password_is_one_line_without_the_password(pair: DbPair, tmp_path: Path) -> None:
    """A refused connection names the side and the fix, never the password."""
    config = write_config(tmp_path / "c.toml", pair, tables=("public.orders",))
    bad = "host=127.0.0.1 port=1 dbname=x user=u password=hunter2"
    result = cli("status", config=config, env={"CDCSYNC_TARGET__DSN": bad})
    assert result.returncode == 1
    assert "cannot connect to the target u@127.0.0.1:1/x" in result.stderr
    assert "hunter2" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_version() -> None:
    """--version prints the package version."""
    result = cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("cdcsync ")
