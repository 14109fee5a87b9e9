"""The link watch on real connections through a relay that can freeze them (a middlebox that
keeps its connections open but relays nothing more on them)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from bench.chaos import children, signal_all
from bench.relay import Relay
from cdcsync import admin, link_watch
from cdcsync.backfill import copy_pipe
from cdcsync.dsn import with_session_options
from cdcsync.link_watch import Cut, LinkWatch
from tests.conftest import DbPair
from tests.harness import execute, wait_for

Conn = psycopg.Connection[Any]


@pytest.fixture(scope="module")
def target(dbpair: DbPair) -> str:
    if dbpair.target_cluster is None:
        pytest.skip("needs a local target the relay can reach on 127.0.0.1")
    execute(dbpair.target_dsn, "CREATE TABLE IF NOT EXISTS link_watch_t (id int PRIMARY KEY)",
            "INSERT INTO link_watch_t VALUES (1) ON CONFLICT DO NOTHING")
    return dbpair.target_dsn


@contextmanager
def _relayed(dsn: str) -> Iterator[tuple[Relay, str]]:
    port = int(conninfo_to_dict(dsn)["port"] or 5432)
    with Relay(port, 0.0) as relay:
        yield relay, with_session_options(
            make_conninfo(dsn, host="127.0.0.1", port=relay.port), "cdcsync-watched")


class _Query(threading.Thread):
    """One query on ``conn`` in a thread of its own: what it returned, or raised."""

    def __init__(self, conn: Conn, query: str) -> None:
        super().__init__(daemon=True)
        self.conn, self.query = conn, query
        self.result: Any = None
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            self.result = self.conn.execute(self.query.encode()).fetchall()
        except Exception as exc:
            self.error = exc


def _checked_until_done(watch: LinkWatch, worker: threading.Thread,
                        timeout: float) -> list[Cut]:
    cuts: list[Cut] = []
    deadline = time.monotonic() + timeout
    while worker.is_alive() and time.monotonic() < deadline:
        cuts += watch.check()
        time.sleep(0.1)
    worker.join(1)
    return cuts


def _session_count(dsn: str, pid: int) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                           (pid,)).fetchone()
    return int(row[0]) if row else -1


def test_a_dead_link_is_cut_and_its_session_with_its_locks_ended(target: str) -> None:
    """A query sent on a connection the middlebox froze, its transaction holding a row lock:
    the watch finds both ends waiting on each other, ends the server's session (the lock
    with it) and cuts the connection, whose thread gets the error of a lost connection. The
    connection's owner is told (a pool replaces its idle connections then)."""
    told = threading.Event()
    with _relayed(target) as (relay, dsn):
        conn = psycopg.connect(dsn)
        watch = LinkWatch("s", silent_s=1.0, check_every_s=3600)
        watch.watch(conn, dsn, told.set)
        pid = conn.info.backend_pid
        conn.execute("SELECT id FROM link_watch_t WHERE id = 1 FOR UPDATE")
        relay.freeze()
        query = _Query(conn, "SELECT 1")
        query.start()
        started = time.monotonic()
        cuts = _checked_until_done(watch, query, timeout=15)
        assert not query.is_alive(), "the waiting thread was not woken"
        assert isinstance(query.error, psycopg.OperationalError)
        assert time.monotonic() - started < 5
        assert [(c.pid, c.server_state) for c in cuts] == [(pid, "idle in transaction, "
                                                                 "waiting on ClientRead")]
        assert cuts[0].silent_s >= 1.0
        assert told.is_set()
        wait_for(lambda: _session_count(target, pid) == 0, timeout=10, what="session ended")
        with psycopg.connect(target, autocommit=True) as other:
            other.execute("SELECT id FROM link_watch_t WHERE id = 1 FOR UPDATE NOWAIT")
        conn.close()


@pytest.mark.parametrize("blocked", [False, True], ids=["long query", "lock wait"])
def test_a_server_at_work_is_left_alone(target: str, blocked: bool) -> None:
    """Silence while the server runs the query, or waits on another session's lock, is not a
    dead link: the watch asks the server, and leaves the connection to finish. It asks again
    only as the silence doubles (at 0.5, 1 and 2 s here, not every 0.1 s)."""
    with _relayed(target) as (relay, dsn), psycopg.connect(target) as holder:
        conn = psycopg.connect(dsn, autocommit=True)
        watch = LinkWatch("s", silent_s=0.5, check_every_s=3600)
        watch.watch(conn, dsn)
        if blocked:
            holder.execute("SELECT id FROM link_watch_t WHERE id = 1 FOR UPDATE")
            query = _Query(conn, "SELECT id FROM link_watch_t WHERE id = 1 FOR UPDATE")
            threading.Timer(2.5, holder.rollback).start()
        else:
            query = _Query(conn, "SELECT pg_sleep(2.5), 1")
        query.start()
        cuts = _checked_until_done(watch, query, timeout=15)
        assert cuts == []
        assert query.error is None and query.result
        assert len(relay.links) == 1 + 3, "the connection, and one fresh one per question"
        conn.close()



def test_a_paused_server_is_not_taken_for_a_dead_link(dbpair: DbPair, target: str) -> None:
    """The target stopped (SIGSTOP) past the silence, the connection's backend resuming half a
    second after the rest: the server answers the watch at once, showing the session as it was
    (idle, the query unread in its socket). The second look, a second later, finds the
    connection answered, and nothing is cut."""
    assert dbpair.target_cluster is not None
    postmaster = dbpair.target_cluster.pid()
    assert postmaster is not None
    with _relayed(target) as (_relay, dsn):
        conn = psycopg.connect(dsn, autocommit=True)
        ours = conn.info.backend_pid
        watch = LinkWatch("s", silent_s=1.0, check_every_s=0.2)
        watch.watch(conn, dsn)
        query = _Query(conn, "SELECT 1")
        others = [pid for pid in (postmaster, *children(postmaster)) if pid != ours]
        signal_all([*others, ours], signal.SIGSTOP)
        try:
            query.start()
            time.sleep(3)
            signal_all(others, signal.SIGCONT)
            time.sleep(0.5)
        finally:
            signal_all([*others, ours], signal.SIGCONT)
            query.join(10)
            watch.close()
        assert query.error is None and query.result == [(1,)]
        conn.close()


def test_after_a_cut_the_same_servers_connections_are_asked_about_sooner(target: str) -> None:
    """Once a connection to the server was cut, another that went silent behind the same
    middlebox later is asked about after a second of silence, not the whole ``silent_s``."""
    with _relayed(target) as (relay, dsn):
        first, second = (psycopg.connect(dsn, autocommit=True) for _ in range(2))
        watch = LinkWatch("s", silent_s=3.0, check_every_s=3600)
        pids = [conn.info.backend_pid for conn in (first, second)]
        for conn in (first, second):
            watch.watch(conn, dsn)
        relay.freeze()
        stuck = _Query(first, "SELECT 1")
        stuck.start()
        cuts = _checked_until_done(watch, stuck, timeout=15)
        assert [c.pid for c in cuts] == pids[:1]
        later = _Query(second, "SELECT 1")
        later.start()
        cuts = _checked_until_done(watch, later, timeout=15)
        assert [c.pid for c in cuts] == pids[1:]
        assert cuts[0].silent_s < 3.0
        for conn in (first, second):
            conn.close()


class _Pipe(threading.Thread):
    """A COPY piped from the source into the target's ``link_watch_pipe``, in a thread."""

    def __init__(self, source: Conn, target: Conn, out: str) -> None:
        super().__init__(daemon=True)
        self.source, self.target, self.out = source, target, out
        self.rows: int | None = None
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            self.rows = copy_pipe.pipe(self.source, self.target, sql.SQL(self.out),
                                       sql.SQL("COPY link_watch_pipe FROM STDIN"), lambda _: None)
        except Exception as exc:
            self.error = exc


@contextmanager
def _piped(dbpair: DbPair, target: str, out: str
           ) -> Iterator[tuple[Relay, LinkWatch, _Pipe, list[int]]]:
    """A pipe from the source into the target through a relay, both ends watched as partners
    with a 0.5 s silence threshold; the target's session pid last."""
    execute(target, "CREATE TABLE IF NOT EXISTS link_watch_pipe (id int)")
    source_dsn = with_session_options(dbpair.source_dsn, "cdcsync-watched")
    with _relayed(target) as (relay, dsn), psycopg.connect(source_dsn) as src, \
            psycopg.connect(dsn) as tgt:
        watch = LinkWatch("s", silent_s=0.5, check_every_s=3600)
        watch.watch(src, source_dsn)
        watch.watch(tgt, dsn)
        watch.pair(src, tgt)
        pipe = _Pipe(src, tgt, out)
        yield relay, watch, pipe, [src.info.backend_pid, tgt.info.backend_pid]


def _copying(dsn: str, pid: int) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT query FROM pg_stat_activity WHERE pid = %s AND state = "
                           "'active'", (pid,)).fetchone()
    return row is not None and str(row[0]).startswith("COPY")


def test_a_pipe_waiting_on_a_slow_source_is_left_alone(dbpair: DbPair, target: str) -> None:
    """The target's end of a piped COPY is silent, its server waiting on the client, while the
    source's query has yet to send its next rows: that end's partner is at work, and nothing
    is cut."""
    # Rows enough to fill the server's 8 kB output buffer, so the COPY starts on both ends;
    # then the source sleeps before the last row.
    out = ("COPY (SELECT g FROM generate_series(1, 5001) g "
           "WHERE g <= 5000 OR (SELECT true FROM pg_sleep(3))) TO STDOUT")
    with _piped(dbpair, target, out) as (_relay, watch, pipe, _pids):
        pipe.start()
        cuts = _checked_until_done(watch, pipe, timeout=15)
    assert (pipe.error, pipe.rows, cuts) == (None, 5001, [])


def test_a_pipe_into_a_dead_link_is_cut(dbpair: DbPair, target: str) -> None:
    """The link to the target dies under a piped COPY: the client's writes to the target stall,
    so it stops reading the source, and both servers wait on the client. The target's end is
    cut (the source's too, when it is found first), and the copy fails with a lost connection's
    error in seconds. The target's end was asked about, and left, while the source slept: once
    the source's end is cut, it is asked about again at once."""
    out = "COPY (SELECT g FROM pg_sleep(1), generate_series(1, 3000000) g) TO STDOUT"
    with _piped(dbpair, target, out) as (relay, watch, pipe, pids):
        pipe.start()
        wait_for(lambda: _copying(target, pids[1]), timeout=10, what="the target's COPY")
        relay.freeze()
        frozen = time.monotonic()
        cuts = _checked_until_done(watch, pipe, timeout=20)
        took = time.monotonic() - frozen
    assert isinstance(pipe.error, psycopg.OperationalError), pipe.error
    assert pids[1] in [c.pid for c in cuts]
    # Not the kernel's TCP_USER_TIMEOUT (10 s, see cdcsync.dsn) giving the target's end up.
    assert took < 8, took


def test_an_operators_command_on_a_dead_link_fails_instead_of_waiting(
        target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`cdcsync status`, `check`, `setup` and the others connect through admin.connect, which
    watches its connection while it is open: a monitor's `cdcsync status` on a link the
    middlebox froze fails with the lost connection's error instead of waiting for ever, and
    leaves no watch behind."""
    monkeypatch.setattr(link_watch, "LinkWatch",
                        partial(LinkWatch, silent_s=1.0, check_every_s=0.2))
    before = set(threading.enumerate())
    with _relayed(target) as (relay, dsn), admin.connect(dsn, "target") as conn:
        pid = conn.info.backend_pid
        conn.execute("SELECT 1")
        relay.freeze()
        query = _Query(conn, "SELECT count(*) FROM link_watch_t")
        started = time.monotonic()
        query.start()
        query.join(30)
        if query.is_alive():  # uncut, it would keep the relay's close waiting too
            with socket.socket(fileno=os.dup(conn.fileno())) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        assert isinstance(query.error, psycopg.OperationalError), "not cut"
        assert time.monotonic() - started < 8
    wait_for(lambda: _session_count(target, pid) == 0, timeout=10, what="session ended")
    assert not [t for t in set(threading.enumerate()) - before
                if t.name == "cdcsync-link-watch"]
