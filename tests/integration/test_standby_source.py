"""The source DSN pointed at a read replica (a physical standby) instead of the primary: check,
setup and run each say so, with the fix, and setup changes nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from cdcsync.localpg import create_standby, throwaway_dir
from tests.conftest import DbPair
from tests.harness import cli, set_up, write_config

_STANDBY = "the source DSN reaches a standby (a read replica, in recovery)"
_FIX = "fix: point the source DSN at the primary server"


@pytest.fixture(scope="module")
def replica(dbpair: DbPair) -> Iterator[tuple[DbPair, str]]:
    """The pair, set up on the primary, and the DSN of its source database on a standby."""
    primary = dbpair.source_cluster
    if primary is None:
        pytest.skip("needs the local source cluster to make a standby of")
    set_up(dbpair, "CREATE TABLE t (id int PRIMARY KEY, v int)")
    with throwaway_dir() as base:
        standby = create_standby(primary, base, "replica")
        try:
            yield dbpair, make_conninfo(dbpair.source_dsn, port=standby.port)
        finally:
            standby.destroy()


def test_check_fails_on_a_standby(replica: tuple[DbPair, str], tmp_path: Path) -> None:
    pair, standby = replica
    result = cli("check", config=write_config(tmp_path / "c.toml", pair,
                                              source={"dsn": standby}))
    line = next(line for line in result.stdout.splitlines() if "source is the primary" in line)
    assert line.startswith("FAIL") and _STANDBY in line and _FIX in line


def test_setup_on_a_standby_is_refused_before_any_change(replica: tuple[DbPair, str],
                                                         tmp_path: Path) -> None:
    pair, standby = replica
    config = write_config(tmp_path / "c.toml", pair, source={"dsn": standby,
                                                             "publication": "p_not_made"})
    result = cli("setup", config=config)
    assert result.returncode != 0
    assert _STANDBY in result.stderr and _FIX in result.stderr
    with psycopg.connect(pair.source_dsn) as conn:
        made = conn.execute("SELECT count(*) FROM pg_publication WHERE pubname = 'p_not_made'"
                            ).fetchone()
    assert made == (0,)


def test_run_on_a_standby_names_it(replica: tuple[DbPair, str], tmp_path: Path) -> None:
    """The publication came over from the primary; the slot did not: the fix is the primary,
    not another setup."""
    pair, standby = replica
    result = cli("run", config=write_config(tmp_path / "c.toml", pair, source={"dsn": standby}))
    assert result.returncode != 0
    assert _STANDBY in result.stderr and _FIX in result.stderr
