"""Source and target databases in different encodings: text arrives as the same characters."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from cdcsync import admin
from tests.conftest import DbPair
from tests.harness import converged, execute, running, settings_for, table_rows, wait_for

ROWS = [(1, "façade"), (2, "Ærø, señor"), (3, "déjà vu")]


def _write(dsn: str, statement: str, *params: object) -> None:
    """Text parameters: psycopg encodes them in the database's own encoding."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement, params)


@pytest.fixture
def latin1_source(dbpair: DbPair) -> Iterator[DbPair]:
    """The module's pair with its source swapped for a LATIN1 database on the same server."""
    name = f"{dbpair.source_db}_latin1"
    with psycopg.connect(dbpair.source_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' "
                             "TEMPLATE template0").format(sql.Identifier(name)))
    pair = dataclasses.replace(dbpair, source_dsn=make_conninfo(dbpair.source_dsn, dbname=name),
                               source_db=name)
    try:
        yield pair
    finally:
        admin.teardown(settings_for(pair))
        with psycopg.connect(dbpair.source_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def test_latin1_source_into_utf8_target(latin1_source: DbPair) -> None:
    """Rows copied by the snapshot and rows streamed afterwards hold the source's characters."""
    pair = latin1_source
    execute(pair.source_dsn, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    _write(pair.source_dsn, "INSERT INTO t VALUES (1, %s), (2, %s)", "café", "Ærø, señor")
    settings = settings_for(pair)
    admin.setup(settings, create_tables=True)
    with running(settings) as runner:
        _write(pair.source_dsn, "INSERT INTO t VALUES (3, %s)", "déjà vu")
        _write(pair.source_dsn, "UPDATE t SET v = %s WHERE id = 1", "façade")
        wait_for(converged(pair, ["public.t"]), runner=runner, what="convergence")
    assert table_rows(pair.source_dsn, "public.t") == ROWS
    assert table_rows(pair.target_dsn, "public.t") == ROWS
    with psycopg.connect(pair.target_dsn) as conn:
        encoding = conn.execute("SHOW server_encoding").fetchone()
    assert encoding == ("UTF8",)
