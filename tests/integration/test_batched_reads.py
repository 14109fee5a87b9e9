"""The compiled reader (cdcsync/source/_copybatch.c) on real servers: it reads exactly what
psycopg's one-message-at-a-time path reads, and a walsender that goes away is a lost connection
either way."""

from __future__ import annotations

import importlib.util
import time

import psycopg
import pytest

from cdcsync.errors import ConnectionLost, is_transient
from cdcsync.model import ZERO_LSN
from cdcsync.source import pgoutput, replication
from cdcsync.source.replication import ReplicationStream
from tests.conftest import DbPair
from tests.harness import execute, set_up, wait_for


@pytest.fixture(scope="module")
def pair(dbpair: DbPair) -> DbPair:
    return set_up(dbpair, "CREATE TABLE t (id int PRIMARY KEY, v text)")


TRANSACTIONS = 20


def _backlog(pair: DbPair) -> None:
    """Transactions of small and large rows (a large one spans many TCP segments), updates and
    deletes."""
    with psycopg.connect(pair.source_dsn, autocommit=True) as conn:
        for n in range(TRANSACTIONS):
            with conn.transaction():
                conn.execute("INSERT INTO t SELECT g, repeat(md5(g::text), g %% 50) "
                             "FROM generate_series(%s::int, %s::int) g", (n * 500, n * 500 + 499))
                conn.execute("INSERT INTO t VALUES (%s, repeat('x', 300000))", (-n - 1,))
                conn.execute("UPDATE t SET v = 'u' WHERE id %% 7 = 0 AND id >= %s", (n * 500,))
                conn.execute("DELETE FROM t WHERE id %% 11 = 0 AND id >= %s", (n * 500,))


def _copy_slot(pair: DbPair, name: str) -> None:
    execute(pair.source_dsn, f"SELECT pg_copy_logical_replication_slot('{pair.slot}', '{name}')")


def _read_all(pair: DbPair, slot: str, *, batched: bool) -> list[bytes]:
    """Every payload up to the backlog's last commit."""
    stream = ReplicationStream(pair.source_dsn, slot, batched=batched)
    stream.start(ZERO_LSN, pgoutput.options(pair.publication, binary=True))
    payloads: list[bytes] = []
    deadline = time.monotonic() + 60
    try:
        while sum(p[:1] == b"C" for p in payloads) < TRANSACTIONS:
            assert time.monotonic() < deadline, "the backlog did not arrive within 60 s"
            payloads.extend(stream.read(0.2))
    finally:
        stream.close()
        execute(pair.source_dsn, f"SELECT pg_drop_replication_slot('{slot}')")
    return payloads


def test_the_compiled_reader_reads_what_psycopg_reads(pair: DbPair) -> None:
    if importlib.util.find_spec("cdcsync.source._copybatch") is None:
        pytest.skip("a pure-Python install has no compiled reader")
    _backlog(pair)
    _copy_slot(pair, f"{pair.slot}_one")
    _copy_slot(pair, f"{pair.slot}_batch")
    one = _read_all(pair, f"{pair.slot}_one", batched=False)
    batched = _read_all(pair, f"{pair.slot}_batch", batched=True)
    assert replication.batch_reader() is not None, "the compiled reader found psycopg's libpq"
    assert len(one) > 10_000
    assert batched == one


@pytest.mark.parametrize("batched", [True, False])
def test_a_terminated_walsender_is_a_lost_connection(pair: DbPair, batched: bool) -> None:
    name = f"{pair.slot}_{'batch' if batched else 'one'}_end"
    _copy_slot(pair, name)
    stream = ReplicationStream(pair.source_dsn, name, batched=batched)
    stream.start(ZERO_LSN, pgoutput.options(pair.publication, binary=True))
    try:
        pid = stream.backend_pid
        execute(pair.source_dsn, f"SELECT pg_terminate_backend({pid})")
        with pytest.raises(ConnectionLost) as raised:
            for _ in range(50):
                list(stream.read(0.2))
        assert is_transient(raised.value)
    finally:
        stream.close()
    wait_for(lambda: _inactive(pair, name), timeout=10, what="the slot to be free")
    execute(pair.source_dsn, f"SELECT pg_drop_replication_slot('{name}')")


def _inactive(pair: DbPair, slot: str) -> bool:
    with psycopg.connect(pair.source_dsn, autocommit=True) as conn:
        row = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                           (slot,)).fetchone()
    return row is not None and not row[0]
