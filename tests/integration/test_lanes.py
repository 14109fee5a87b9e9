"""Commits applied side by side on two target connections still commit in source order, and one
that fails takes the later ones with it."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool

from cdcsync.apply import tables
from cdcsync.apply.applier import Committed
from cdcsync.apply.lanes import Lanes
from cdcsync.model import ChangeChunk, Lsn, TxnEnd, TxnStart
from cdcsync.source.transactions import TransactionAssembler
from tests import pgoutput_messages as m
from tests.conftest import DbPair
from tests.harness import execute, set_up, settings_for, wait_for

SCHEMA = "CREATE TABLE docs (id int PRIMARY KEY, status text, body text, updated_at timestamptz)"

Conn = psycopg.Connection[TupleRow]


@pytest.fixture(scope="module")
def pair(dbpair: DbPair) -> DbPair:
    return set_up(dbpair, SCHEMA)


class Feed:
    """Two lanes on the pair's target, fed pgoutput messages as the pipeline feeds them."""

    def __init__(self, pair: DbPair, pool: ConnectionPool, conn: Conn) -> None:
        settings = settings_for(pair, apply={"workers": 2})
        self.committed: list[Committed] = []
        self.lanes = Lanes(conn, pool, settings, self.committed.append)
        self.assembler = TransactionAssembler(
            Lsn(0), lambda r: tables.resolve(conn, settings, r), texts=True)

    def transaction(self, *payloads: bytes, commit: bool = True) -> int:
        """Feed one source transaction and (``commit``) commit it; the backend PID of the lane
        that took it."""
        pid = self.lanes.current.conn.info.backend_pid
        for payload in payloads:
            for item in self.assembler.feed(payload):
                lane = self.lanes.current
                if isinstance(item, TxnStart):
                    lane.start()
                elif isinstance(item, ChangeChunk):
                    lane.add(item)
                elif isinstance(item, TxnEnd):
                    lane.end(item)
                    if commit:
                        self.lanes.commit()
        return pid


@pytest.fixture
def feed(pair: DbPair) -> Iterator[Feed]:
    execute(pair.target_dsn, "TRUNCATE docs",
            "INSERT INTO docs SELECT g, 'old', 'body', '2025-01-01' FROM generate_series(1, 4) g",
            "UPDATE cdcsync.checkpoint SET lsn = '0/1000'")
    with ConnectionPool(pair.target_dsn, min_size=1, max_size=3, open=True) as pool:
        conn: Conn = pool.getconn()
        feed = Feed(pair, pool, conn)
        try:
            yield feed
        finally:
            feed.lanes.close(clean=False)
            pool.putconn(conn)


@pytest.fixture
def row_lock(pair: DbPair) -> Iterator[Conn]:
    """A session of the target's users holding docs row 1 locked until it rolls back."""
    with psycopg.connect(pair.target_dsn) as conn:
        conn.execute("SELECT 1 FROM docs WHERE id = 1 FOR UPDATE")
        yield conn
        conn.rollback()


def _state(pair: DbPair) -> tuple[str, list[tuple[int, str]]]:
    with psycopg.connect(pair.target_dsn) as conn:
        row = conn.execute("SELECT lsn::text FROM cdcsync.checkpoint").fetchone()
        docs = conn.execute("SELECT id, status FROM docs ORDER BY id").fetchall()
    assert row is not None
    return str(row[0]), [(int(i), str(s)) for i, s in docs]


def _waits_on(pair: DbPair, pid: int, locktype: str) -> bool:
    with psycopg.connect(pair.target_dsn) as conn:
        row = conn.execute("SELECT count(*) FROM pg_locks WHERE pid = %s AND NOT granted "
                           "AND locktype = %s", (pid, locktype)).fetchone()
    return row is not None and int(row[0]) > 0


BEFORE = [(1, "old"), (2, "old"), (3, "old"), (4, "old")]


def test_disjoint_commits_merge_side_by_side_and_commit_in_order(
        pair: DbPair, feed: Feed, row_lock: Conn) -> None:
    """The first commit waits on a row a user holds; the second, on other keys, merges beside it,
    then waits for it: nothing of the second shows before the first commits."""
    first = feed.transaction(m.begin(0x5000, 700), m.docs_relation(),
                             m.docs_row(b"U", 1, b"first"), m.commit(0x5000, 0x5008))
    second = feed.transaction(m.begin(0x6000, 701), m.docs_row(b"U", 2, b"second"),
                              m.commit(0x6000, 0x6008))
    assert first != second
    wait_for(lambda: _waits_on(pair, first, "transactionid"), timeout=10, what="first blocked")
    # The second merged (a row lock taken) and waits for the first's advisory lock.
    wait_for(lambda: _waits_on(pair, second, "advisory"), timeout=10, what="second waiting")
    assert _state(pair) == ("0/1000", BEFORE)
    row_lock.rollback()
    feed.lanes.settle()
    assert [c.lsn for c in feed.committed] == [Lsn(0x5008), Lsn(0x6008)]
    assert _state(pair) == ("0/6008", [(1, "first"), (2, "second"), (3, "old"), (4, "old")])


def test_a_commit_that_fails_takes_the_later_ones_with_it(
        pair: DbPair, feed: Feed, row_lock: Conn) -> None:
    """The first commit's connection is killed while the second waits for it: the second rolls
    back too, the checkpoint stays, and the failure is raised."""
    first = feed.transaction(m.begin(0x5000, 700), m.docs_relation(),
                             m.docs_row(b"U", 1, b"first"), m.commit(0x5000, 0x5008))
    second = feed.transaction(m.begin(0x6000, 701), m.docs_row(b"U", 2, b"second"),
                              m.commit(0x6000, 0x6008))
    wait_for(lambda: _waits_on(pair, second, "advisory"), timeout=10, what="second waiting")
    execute(pair.target_dsn, f"SELECT pg_terminate_backend({first})")
    with pytest.raises(psycopg.OperationalError):
        feed.lanes.settle()
    assert feed.committed == []
    assert _state(pair) == ("0/1000", BEFORE)


def test_commits_changing_one_key_merge_one_after_the_other(
        pair: DbPair, feed: Feed, row_lock: Conn) -> None:
    """The second commit updates a row the first inserts: it copies its stage, then waits for
    the first before merging (on the lock, not on the row), and the second's version wins."""
    first = feed.transaction(m.begin(0x5000, 700), m.docs_relation(),
                             m.docs_row(b"U", 1, b"first"), m.docs_row(b"I", 10, b"inserted"),
                             m.commit(0x5000, 0x5008))
    second = feed.transaction(m.begin(0x6000, 701), m.docs_row(b"U", 10, b"updated"),
                              m.commit(0x6000, 0x6008))
    wait_for(lambda: _waits_on(pair, first, "transactionid"), timeout=10, what="first blocked")
    wait_for(lambda: _waits_on(pair, second, "advisory"), timeout=10, what="second waiting")
    assert not _waits_on(pair, second, "transactionid")
    row_lock.rollback()
    feed.lanes.settle()
    assert _state(pair) == ("0/6008", [(1, "first"), (2, "old"), (3, "old"), (4, "old"),
                                       (10, "updated")])


def test_a_clean_close_commits_what_the_current_lane_holds(
        pair: DbPair, feed: Feed, row_lock: Conn) -> None:
    """Stopping (SIGTERM) with one commit in flight and whole transactions on the current lane:
    both are committed, in order."""
    feed.transaction(m.begin(0x5000, 700), m.docs_relation(), m.docs_row(b"U", 1, b"first"),
                     m.commit(0x5000, 0x5008))
    feed.transaction(m.begin(0x6000, 701), m.docs_row(b"U", 2, b"second"),
                     m.commit(0x6000, 0x6008), commit=False)
    row_lock.rollback()
    feed.lanes.close(clean=True)
    assert [c.lsn for c in feed.committed] == [Lsn(0x5008), Lsn(0x6008)]
    assert _state(pair) == ("0/6008", [(1, "first"), (2, "second"), (3, "old"), (4, "old")])
