"""The stream's questions to the source's catalog on one kept connection, on real servers."""

from __future__ import annotations

import logging
import time
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from bench.relay import Relay
from cdcsync.errors import ConnectionLost
from cdcsync.link_watch import LinkWatch
from cdcsync.source import catalog
from cdcsync.source.catalog_session import CatalogSession
from tests.conftest import DbPair
from tests.harness import converged, execute, running, set_up, settings_for, wait_for

TABLES = ["public.a", "public.b", "public.c"]


@pytest.fixture(scope="module")
def pair(dbpair: DbPair) -> DbPair:
    return set_up(dbpair, *(f"CREATE TABLE {t} (id int PRIMARY KEY, v int)" for t in TABLES))


def _pid(conn: psycopg.Connection[psycopg.rows.TupleRow]) -> int:
    return conn.info.backend_pid


def _server_pid(conn: psycopg.Connection[psycopg.rows.TupleRow]) -> int:
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


def test_questions_share_one_connection_and_a_dead_one_is_replaced(pair: DbPair) -> None:
    session = CatalogSession(pair.source_dsn)
    try:
        first = session.ask(_pid)
        assert session.ask(_pid) == first
        execute(pair.source_dsn, f"SELECT pg_terminate_backend({first})")
        info = session.ask(lambda src: catalog.slot_info(src, pair.slot))
        assert info is not None
        assert session.ask(_pid) != first
    finally:
        session.close()


def test_a_question_stuck_on_a_dead_link_is_asked_again_on_a_new_connection(
        pair: DbPair) -> None:
    """The kept connection's link dies behind a middlebox that keeps it open: the link watch
    cuts it, and the question is answered on a new connection instead of waiting for ever."""
    if pair.source_cluster is None:
        pytest.skip("needs a local source the relay can reach on 127.0.0.1")
    port = int(conninfo_to_dict(pair.source_dsn)["port"] or 5432)
    with Relay(port, 0.0) as relay:
        watch = LinkWatch(pair.slot, silent_s=0.5, check_every_s=0.1)
        session = CatalogSession(make_conninfo(pair.source_dsn, host="127.0.0.1",
                                               port=relay.port), watch)
        try:
            first = session.ask(_server_pid)
            relay.freeze()
            started = time.monotonic()
            assert session.ask(_server_pid) != first
            assert time.monotonic() - started < 5
        finally:
            session.close()
            watch.close()


def test_an_unreachable_source_is_a_lost_connection(pair: DbPair) -> None:
    session = CatalogSession("host=127.0.0.1 port=1 dbname=x connect_timeout=2")
    with pytest.raises(ConnectionLost, match="cannot reach the source"):
        session.ask(_pid)


def test_a_stream_asks_about_its_new_tables_without_connecting_again(
        pair: DbPair, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three tables new to the stream, their first changes in one transaction: their column
    types are asked on the connection the stream already holds (a connection each before)."""
    caplog.set_level(logging.INFO, logger="cdcsync")
    port = str(conninfo_to_dict(pair.source_dsn)["port"])
    opened: list[str] = []
    connect = psycopg.connect

    def counting(conninfo: str = "", **kwargs: Any) -> psycopg.Connection[Any]:
        params = conninfo_to_dict(conninfo)
        if str(params.get("port")) == port and params.get("application_name") == "cdcsync":
            opened.append(conninfo)
        return connect(conninfo, **kwargs)

    monkeypatch.setattr(psycopg, "connect", counting)
    with running(settings_for(pair)) as runner:
        wait_for(lambda: any(r.getMessage() == "streaming" for r in caplog.records),
                 runner=runner, what="the stream after the initial copy")
        before = len(opened)
        with connect(pair.source_dsn, autocommit=True) as src, src.transaction():
            for n, table in enumerate(TABLES):
                src.execute(f"INSERT INTO {table} VALUES ({n + 100}, {n})")
        wait_for(converged(pair, TABLES), runner=runner, what="the three tables' changes")
        assert len(opened) == before
    assert before >= 1, "the stream's own connection to the catalog is counted"
