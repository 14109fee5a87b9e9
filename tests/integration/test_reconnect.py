"""Connection loss on either side: the daemon retries with backoff, resumes from the checkpoint."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from bench.relay import Relay
from cdcsync import admin, daemon, pipeline
from cdcsync import dsn as dsn_module
from cdcsync.backfill import resync, snapshot, state
from cdcsync.config import Settings
from cdcsync.daemon import DaemonThread
from cdcsync.dsn import with_session_options
from cdcsync.errors import ConnectionLost, PrerequisiteError
from cdcsync.link_watch import LinkWatch
from cdcsync.model import Lsn
from cdcsync.source.early import start_options
from cdcsync.source.replication import ReplicationStream
from tests.conftest import DbPair
from tests.harness import converged, execute, running, set_up, settings_for, wait_for


@pytest.fixture(scope="module")
def pair(dbpair: DbPair) -> DbPair:
    if dbpair.source_cluster is None or dbpair.target_cluster is None:
        pytest.skip("needs local clusters it may stop and start")
    return set_up(dbpair, "CREATE TABLE t (id int PRIMARY KEY, v int)")


# The link watch's silence threshold in these tests: the server's answer, not the threshold,
# keeps live connections from being cut, and the default 10 s would only make them slower.
_SILENT_S = 2.0


def _insert(dsn: str, first: int, count: int) -> None:
    execute(dsn, f"INSERT INTO t SELECT g, g FROM generate_series({first}, "
                 f"{first + count - 1}) g")


def test_target_restart_is_survived(pair: DbPair, caplog: pytest.LogCaptureFixture) -> None:
    """The target stopped (immediate) while changes flow: the daemon reconnects and converges."""
    assert pair.target_cluster is not None
    with running(settings_for(pair)) as runner:
        _insert(pair.source_dsn, 1, 100)
        wait_for(converged(pair, ["public.t"]), runner=runner)
        pair.target_cluster.stop("immediate")
        _insert(pair.source_dsn, 101, 100)
        time.sleep(1.5)
        pair.target_cluster.start()
        _insert(pair.source_dsn, 201, 100)
        wait_for(converged(pair, ["public.t"]), runner=runner, timeout=60, what="reconnect")
    # The stream notices first (reconnecting) or the slot lock's keeper does (lock_lost).
    attempts = [r for r in caplog.records if r.getMessage() in ("reconnecting", "lock_lost")]
    assert attempts, "the outage and each reconnect attempt are logged"


def test_source_restart_is_survived(pair: DbPair) -> None:
    """The source stopped (immediate) and started: streaming resumes and nothing is lost."""
    assert pair.source_cluster is not None
    with running(settings_for(pair)) as runner:
        _insert(pair.source_dsn, 1001, 100)
        wait_for(converged(pair, ["public.t"]), runner=runner)
        pair.source_cluster.stop("immediate")
        time.sleep(1.0)
        pair.source_cluster.start()
        _insert(pair.source_dsn, 1101, 100)
        wait_for(converged(pair, ["public.t"]), runner=runner, timeout=60, what="reconnect")


def test_walsender_terminated_is_survived(pair: DbPair) -> None:
    """pg_terminate_backend on the walsender: the daemon reconnects at once."""
    with running(settings_for(pair)) as runner:
        _insert(pair.source_dsn, 2001, 10)
        wait_for(converged(pair, ["public.t"]), runner=runner)
        with psycopg.connect(pair.source_dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                         "WHERE slot_name = %s", (pair.slot,))
        _insert(pair.source_dsn, 2011, 10)
        wait_for(converged(pair, ["public.t"]), runner=runner, timeout=30, what="reconnect")


def _take_the_slot_from(pair: DbPair, settings: Settings, *,
                        recorded: bool) -> ReplicationStream:
    """The daemon's walsender ended and the slot streamed by another consumer before the daemon
    reconnects: ``recorded`` in the target's cdcsync.streams, a process of this deployment that
    lost the lock, as the daemon sees it; otherwise a consumer of its own."""
    for _ in range(5):
        execute(pair.source_dsn, f"SELECT pg_terminate_backend(active_pid) "
                                 f"FROM pg_replication_slots WHERE slot_name = '{pair.slot}'")
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            other = ReplicationStream(make_conninfo(pair.source_dsn,
                                                    application_name="other_consumer"), pair.slot)
            try:
                other.start(Lsn(0), start_options(settings, binary=False))
            except ConnectionLost:  # the ended walsender still holds it, or the daemon again
                other.close()
                continue
            if recorded:
                execute(pair.target_dsn, f"UPDATE cdcsync.streams SET walsender = "
                                         f"{other.backend_pid} WHERE slot = '{pair.slot}'")
            return other
    raise AssertionError("the daemon took the slot back first every time")


def _recorded_walsender(pair: DbPair) -> tuple[int | None, int | None]:
    """The walsender the target's cdcsync.streams names, and the one holding the slot."""
    with psycopg.connect(pair.target_dsn) as conn:
        row = conn.execute("SELECT walsender FROM cdcsync.streams WHERE slot = %s",
                           (pair.slot,)).fetchone()
    with psycopg.connect(pair.source_dsn) as conn:
        active = conn.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s",
                              (pair.slot,)).fetchone()
    return (row[0] if row else None), (active[0] if active else None)


_LOST_PROCESS = ("the walsender of a process that no longer holds the slot's lock still held "
                 "the slot")


def _ended_walsenders(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    """Each walsender_ended event's pid and reason, in order."""
    fields = [getattr(r, "cdcsync_fields", {}) for r in caplog.records
              if r.getMessage() == "walsender_ended"]
    return [(f["pid"], f["reason"]) for f in fields]


def test_a_walsender_of_a_process_without_the_lock_is_ended(
        pair: DbPair, caplog: pytest.LogCaptureFixture) -> None:
    """This process holds the slot's lock, so a walsender that holds the slot, recorded as the
    stream of a process syncing this target, streams for a process that lost the lock: its host
    vanished with data in flight, say, which the source would notice only at wal_sender_timeout
    (60 s). The daemon ends it and streams."""
    caplog.set_level(logging.INFO, logger="cdcsync")
    settings = settings_for(pair)
    with running(settings) as runner:
        _insert(pair.source_dsn, 600_001, 10)
        wait_for(converged(pair, ["public.t"]), runner=runner)
        recorded, active = _recorded_walsender(pair)
        assert recorded == active is not None, "the stream's first commit records its walsender"
        other = _take_the_slot_from(pair, settings, recorded=True)
        pid = other.backend_pid
        try:
            _insert(pair.source_dsn, 600_011, 10)
            wait_for(converged(pair, ["public.t"]), runner=runner, timeout=20,
                     what="streaming again before wal_sender_timeout")
        finally:
            other.close()
    assert _ended_walsenders(caplog) == [(pid, _LOST_PROCESS)]
    # The slot is taken as soon as the walsender lets it go, without a retry's backoff.
    names = [r.getMessage() for r in caplog.records]
    assert "reconnecting" not in names[names.index("walsender_ended"):]


def test_a_start_ends_the_walsender_its_predecessor_recorded(
        pair: DbPair, caplog: pytest.LogCaptureFixture) -> None:
    """A process started (not as a standby: no one holds the lock) while the slot is still held
    by the walsender its predecessor recorded, whose host vanished with data in flight, say:
    its checks let it start, and it ends that walsender once it holds the lock, instead of
    failing its start until wal_sender_timeout."""
    caplog.set_level(logging.INFO, logger="cdcsync")
    settings = settings_for(pair)
    with running(settings) as runner:
        _insert(pair.source_dsn, 620_001, 10)
        wait_for(converged(pair, ["public.t"]), runner=runner)
    other = _take_the_slot_from(pair, settings, recorded=True)
    pid = other.backend_pid
    try:
        _insert(pair.source_dsn, 620_011, 10)
        with running(settings) as runner:
            wait_for(converged(pair, ["public.t"]), runner=runner, timeout=20,
                     what="streaming before wal_sender_timeout")
    finally:
        other.close()
    assert _ended_walsenders(caplog) == [(pid, _LOST_PROCESS)]


def _confirmed_to_wal_end(pair: DbPair) -> bool:
    with psycopg.connect(pair.source_dsn, autocommit=True) as conn:
        row = conn.execute("SELECT confirmed_flush_lsn >= pg_current_wal_lsn() "
                           "FROM pg_replication_slots WHERE slot_name = %s",
                           (pair.slot,)).fetchone()
    return bool(row and row[0])


def test_a_stream_on_a_quiet_source_records_its_walsender(pair: DbPair) -> None:
    """A stream started with nothing to apply or confirm records its walsender too, at once: if
    its host vanished while the source is quiet, its successor ends that walsender instead of
    waiting for the source's wal_sender_timeout."""
    settings = settings_for(pair)
    with running(settings) as runner:
        _insert(pair.source_dsn, 630_001, 10)
        wait_for(converged(pair, ["public.t"]), runner=runner)
        wait_for(lambda: _confirmed_to_wal_end(pair), runner=runner, timeout=20,
                 what="the slot confirmed up to the source's WAL end")
    execute(pair.target_dsn, f"DELETE FROM cdcsync.streams WHERE slot = '{pair.slot}'")
    with running(settings) as runner:
        def recorded() -> bool:
            walsender, active = _recorded_walsender(pair)
            return walsender == active is not None

        wait_for(recorded, runner=runner, timeout=10, what="the quiet stream's walsender recorded")
        assert _confirmed_to_wal_end(pair), "the source wrote WAL: the stream was not quiet"


def test_a_consumer_of_the_slot_this_target_did_not_record_is_left_alone(
        pair: DbPair, caplog: pytest.LogCaptureFixture) -> None:
    """Another consumer streams the slot (a tool, or a deployment syncing another target under
    the same slot name): not this lock's to end. The daemon waits, names it and what to do, and
    streams once it has gone."""
    caplog.set_level(logging.INFO, logger="cdcsync")
    settings = settings_for(pair)
    with running(settings) as runner:
        _insert(pair.source_dsn, 610_001, 10)
        wait_for(converged(pair, ["public.t"]), runner=runner)
        other = _take_the_slot_from(pair, settings, recorded=False)
        pid = other.backend_pid
        try:
            _insert(pair.source_dsn, 610_011, 10)
            wait_for(lambda: any(r.getMessage() == "reconnecting"
                                 and "is streamed by 'other_consumer'"
                                 in getattr(r, "cdcsync_fields", {}).get("error", "")
                                 for r in caplog.records),
                     runner=runner, timeout=20, what="the slot reported busy")
            assert _recorded_walsender(pair)[1] == pid, "the other consumer still streams"
            seen = admin.status(settings)
            assert seen["slot_active_pid"] == pid and seen["slot_consumer_recorded"] is False
        finally:
            other.close()
        wait_for(converged(pair, ["public.t"]), runner=runner, timeout=20,
                 what="streaming once the other consumer has gone")
    assert _ended_walsenders(caplog) == []
    events = [(r.getMessage(), getattr(r, "cdcsync_fields", {})) for r in caplog.records]
    busy = next(f["error"] for name, f in events
                if name == "reconnecting" and "is streamed by" in f["error"])
    assert f"(walsender PID {pid}), a walsender that no process syncing this target" in busy


@contextmanager
def _source_through_relay(pair: DbPair, **sections: Any
                          ) -> Iterator[tuple[Relay, DaemonThread]]:
    """A daemon reaching the source through a relay, giving a silent stream up after 2 s."""
    port = int(conninfo_to_dict(pair.source_dsn)["port"] or 5432)
    with Relay(port, 0.0) as relay:
        through = make_conninfo(pair.source_dsn, host="127.0.0.1", port=relay.port)
        settings = settings_for(pair, source={"dsn": through, "receive_timeout_s": 2,
                                              "heartbeat_interval_s": 0}, **sections)
        with running(settings) as runner:
            yield relay, runner


def test_a_silent_source_connection_is_given_up(pair: DbPair,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """The link to the source stalls with its connections kept (no reset, as when a host or a
    NAT's entry vanishes): past [source] receive_timeout_s without a byte, the walsender having
    been asked to answer, the daemon gives the connection up and streams again once it can. An
    idle stream on a live link is kept: the walsender answers the question."""

    def given_up() -> bool:
        return any("the source sent nothing for 2 s" in str(
            getattr(r, "cdcsync_fields", {}).get("error")) for r in caplog.records)

    with _source_through_relay(pair) as (relay, runner):
        _insert(pair.source_dsn, 2501, 10)
        wait_for(converged(pair, ["public.t"]), runner=runner)
        time.sleep(5)  # idle, nothing to stream: two and a half timeouts
        assert not given_up()
        relay.stall()
        try:
            wait_for(given_up, timeout=20, what="the silent connection given up",
                     runner=runner)
        finally:
            relay.resume()
        _insert(pair.source_dsn, 2511, 10)
        wait_for(converged(pair, ["public.t"]), runner=runner, timeout=60, what="reconnect")


def test_a_walsender_left_behind_a_dead_link_is_ended(
        pair: DbPair, caplog: pytest.LogCaptureFixture) -> None:
    """The link to the source dies behind a middlebox that keeps it open: the daemon gives the
    silent stream up, but the source never hears of it, and its walsender would hold the slot
    until wal_sender_timeout (60 s). The daemon ends that walsender, its own, and streams again
    through a new connection in seconds."""
    caplog.set_level(logging.INFO, logger="cdcsync")
    with _source_through_relay(pair) as (relay, runner):
        wait_for(lambda: any(r.getMessage() == "streaming" for r in caplog.records),
                 runner=runner, what="the stream through the relay")
        _insert(pair.source_dsn, 7001, 10)
        wait_for(converged(pair, ["public.t"]), runner=runner)
        relay.freeze()
        _insert(pair.source_dsn, 7011, 10)
        wait_for(converged(pair, ["public.t"]), runner=runner, timeout=20,
                 what="streaming again before wal_sender_timeout")
    assert any(r.getMessage() == "walsender_ended" for r in caplog.records)

def test_a_stream_held_back_by_a_slow_target_keeps_its_walsender(
        pair: DbPair, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch waits on a target lock while the source writes on: the daemon stops reading the
    stream, and the walsender's socket finds the daemon's window closed for as long as the lock
    is held. Linux ends such a connection after its tcp_user_timeout, every probe answered, so
    the stream must not carry the one the other sessions do (2 s here, 10 s in production):
    the daemon catches up on the same stream once the lock goes."""
    if str(conninfo_to_dict(pair.source_dsn).get("host") or "").startswith("/"):
        pytest.skip("TCP's user timeout; the source is reached over a Unix socket")
    monkeypatch.setattr(dsn_module, "PEER_TIMEOUT_OPTIONS",
                        f"{dsn_module.PEER_KEEPALIVE_OPTIONS} -c tcp_user_timeout=2000")
    caplog.set_level(logging.INFO, logger="cdcsync")
    with running(settings_for(pair)) as runner:
        _insert(pair.source_dsn, 100_001, 10)
        wait_for(converged(pair, ["public.t"]), runner=runner)
        with psycopg.connect(pair.target_dsn) as blocker:
            blocker.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
            # More than the reader's queue and both ends' socket buffers hold.
            _insert(pair.source_dsn, 100_011, 400_000)
            time.sleep(5)
            blocker.rollback()
        wait_for(converged(pair, ["public.t"]), runner=runner, timeout=60)
        # The later tests copy the table, in small chunks.
        execute(pair.source_dsn, "TRUNCATE t")
        wait_for(converged(pair, ["public.t"]), runner=runner)
    lost = [getattr(r, "cdcsync_fields", {}).get("error") for r in caplog.records
            if r.getMessage() == "reconnecting"]
    assert not lost, lost


def test_a_resync_whose_source_link_dies_is_performed_again(
        pair: DbPair, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The link to the source dies behind a middlebox while the daemon performs a resync: the
    worker's connection, waiting on a chunk's answer that never comes, is cut by the link
    watch, and the request is claimed again and done through a new connection."""
    caplog.set_level(logging.INFO, logger="cdcsync")
    monkeypatch.setattr(daemon, "LinkWatch", partial(LinkWatch, silent_s=_SILENT_S))
    _insert(pair.source_dsn, 8001, 3000)
    with _source_through_relay(pair, snapshot={"chunk_rows": 100}) as (relay, runner):
        wait_for(converged(pair, ["public.t"]), runner=runner)
        execute(pair.target_dsn, "DELETE FROM t WHERE id = 9000")
        with psycopg.connect(pair.target_dsn, autocommit=True) as conn:
            request = state.enqueue(conn, pair.slot, "public.t", None, "resync")

            def copying() -> bool:
                got = state.get(conn, request)
                return got is not None and got.rows_copied > 0

            wait_for(copying, runner=runner, what="the resync's first chunk")
            relay.freeze()
            done = resync.wait_for(conn, request, slot=pair.slot, timeout_s=60)
        assert (done.state, done.error) == ("done", None)
        assert converged(pair, ["public.t"])()
    cut = [getattr(r, "cdcsync_fields", {}).get("application") for r in caplog.records
           if r.getMessage() == "link_cut"]
    assert "cdcsync-resync" in cut, cut


def _sessions(dsn: str) -> set[int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name LIKE "
                            "'cdcsync%' AND state = 'idle in transaction'").fetchall()
    return {int(row[0]) for row in rows}


def test_a_dead_link_to_the_target_kept_by_a_middlebox_is_cut(
        pair: DbPair, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A middlebox between the daemon and the target stops relaying the connections it has but
    keeps them open, so TCP's timeouts never fire. The link watch finds the daemon and the
    target waiting on each other, ends the target's sessions and cuts the connections: the
    daemon streams again on new ones, and no session is left holding a transaction open."""
    monkeypatch.setattr(daemon, "LinkWatch", partial(LinkWatch, silent_s=_SILENT_S))
    port = int(conninfo_to_dict(pair.target_dsn)["port"] or 5432)
    with Relay(port, 0.0) as relay:
        through = make_conninfo(pair.target_dsn, host="127.0.0.1", port=relay.port)
        with running(settings_for(pair, target={"dsn": through})) as runner:
            _insert(pair.source_dsn, 6001, 10)
            wait_for(converged(pair, ["public.t"]), runner=runner)
            relay.freeze()
            frozen = time.monotonic()
            _insert(pair.source_dsn, 6011, 10)
            wait_for(converged(pair, ["public.t"]), runner=runner, timeout=90,
                     what="streaming past the dead link")
            took = time.monotonic() - frozen
            cuts = [r for r in caplog.records if r.getMessage() == "link_cut"]
            assert cuts, "the dead connections were cut"
            assert took < 60, took
            _insert(pair.source_dsn, 6021, 10)
            wait_for(converged(pair, ["public.t"]), runner=runner, timeout=30)
            assert not _sessions(pair.target_dsn)


def test_target_that_lost_applied_changes_is_refused(pair: DbPair) -> None:
    """A target whose checkpoint went back (restored from a backup) halts with the fix."""
    with running(settings_for(pair)) as runner:
        _insert(pair.source_dsn, 3001, 10)
        wait_for(converged(pair, ["public.t"]), runner=runner)
        # Let the slot confirm the position; the status update follows a commit within a second.
        time.sleep(2.5)
    with psycopg.connect(pair.target_dsn, autocommit=True) as conn:
        saved = conn.execute("SELECT lsn FROM cdcsync.checkpoint").fetchone()
        conn.execute("UPDATE cdcsync.checkpoint SET lsn = '0/1'")
        try:
            with pytest.raises(PrerequisiteError, match=r"checkpoint 0/1 is behind slot") as err:
                daemon.run(settings_for(pair), threading.Event())
        finally:
            conn.execute("UPDATE cdcsync.checkpoint SET lsn = %s", saved)
    assert "re-copy the tables" in str(err.value)


def test_idle_slot_is_confirmed_past_unrelated_wal(pair: DbPair) -> None:
    """WAL of unpublished tables is checkpointed and confirmed, so an idle slot retains little."""
    execute(pair.source_dsn, "CREATE SCHEMA IF NOT EXISTS noise",
            "CREATE TABLE IF NOT EXISTS noise.n (id int)")
    with running(settings_for(pair)) as runner:
        execute(pair.source_dsn, "INSERT INTO noise.n SELECT generate_series(1, 20000)")
        with psycopg.connect(pair.source_dsn, autocommit=True) as conn:
            row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
            assert row is not None
            written = Lsn.parse(row[0])

            def confirmed() -> bool:
                got = conn.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots "
                                   "WHERE slot_name = %s", (pair.slot,)).fetchone()
                return got is not None and Lsn.parse(got[0]) >= written

            wait_for(confirmed, runner=runner, timeout=20, what="the slot to pass idle WAL")
    with psycopg.connect(pair.target_dsn) as conn:
        row = conn.execute("SELECT lsn::text FROM cdcsync.checkpoint").fetchone()
    assert row is not None and Lsn.parse(row[0]) >= written


def _socket_option(conn: psycopg.Connection[Any], level: int, option: int) -> int:
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        return sock.getsockopt(level, option)


def test_every_connection_times_out_a_vanished_peer_at_both_ends(dbpair: DbPair) -> None:
    """A host that vanishes answers nothing: the server must end its sessions (a walsender
    holding the slot, a transaction holding row locks) in seconds, not the system's hours, and
    cdcsync must give up its own waits. A session whose reading cdcsync holds back (the slot's
    stream) keeps the keepalives without the user timeout, under which the server would end it
    while the target is slow. The user's DSN still wins."""
    if str(conninfo_to_dict(dbpair.source_dsn).get("host") or "").startswith("/"):
        pytest.skip("TCP settings; the given servers are reached over a Unix socket")
    ours = with_session_options(dbpair.source_dsn, "cdcsync-test")
    paced = with_session_options(dbpair.source_dsn, "cdcsync-test", paced=True)
    with psycopg.connect(ours, autocommit=True) as conn, \
            psycopg.connect(paced, autocommit=True, replication="database") as walsender:
        for session, user_timeout in ((conn, "10000"), (walsender, "0")):
            settings = [session.execute(f"SHOW {name}").fetchone()
                        for name in ("tcp_keepalives_idle", "tcp_keepalives_interval",
                                     "tcp_keepalives_count", "tcp_user_timeout")]
            assert settings == [("5",), ("3",), ("3",), (user_timeout,)]
        assert _socket_option(walsender, socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 10000
        # The snapshot's source COPY is read as fast as the target takes its rows.
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        exported = conn.execute("SELECT pg_export_snapshot()").fetchone()
        assert exported is not None
        with snapshot._source(settings_for(dbpair), exported[0], None) as copying:
            assert copying.execute("SHOW tcp_user_timeout").fetchone() == ("0",)
            assert copying.execute("SHOW tcp_keepalives_idle").fetchone() == ("5",)
        conn.execute("COMMIT")
        assert _socket_option(conn, socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert _socket_option(conn, socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 5
        assert _socket_option(conn, socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 10000
    theirs = make_conninfo(dbpair.source_dsn, keepalives_idle="30",
                           options="-c tcp_user_timeout=0")
    with psycopg.connect(with_session_options(theirs, "cdcsync-test"), autocommit=True) as conn:
        assert conn.execute("SHOW tcp_user_timeout").fetchone() == ("0",)
        assert conn.execute("SHOW tcp_keepalives_idle").fetchone() == ("5",)
        assert _socket_option(conn, socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30


def test_the_target_ends_a_pool_session_left_idle_in_a_transaction(dbpair: DbPair) -> None:
    """A process killed behind a middlebox that keeps its connection open may leave a batch's
    transaction open, its row locks with it: the target pool's sessions ask the server to end
    them after 5 minutes idle in a transaction. The user's options still win."""
    with pipeline.open_target_pool(settings_for(dbpair)) as pool, pool.connection() as conn:
        assert conn.execute("SHOW idle_in_transaction_session_timeout").fetchone() == ("5min",)
    theirs = make_conninfo(dbpair.target_dsn,
                           options="-c idle_in_transaction_session_timeout=0")
    with pipeline.open_target_pool(settings_for(dbpair, target={"dsn": theirs})) as pool, \
            pool.connection() as conn:
        assert conn.execute("SHOW idle_in_transaction_session_timeout").fetchone() == ("0",)
