"""The slot lock against a real target: one holder, a standby that sees it, loss detection."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from bench.relay import Relay
from cdcsync.dsn import application_name
from cdcsync.health import Health
from cdcsync.leader import SlotLock, lock_holder, lock_key
from tests.conftest import DbPair


def _acquire_in_thread(lock: SlotLock) -> tuple[threading.Thread, list[threading.Event | None]]:
    got: list[threading.Event | None] = []
    thread = threading.Thread(target=lambda: got.append(lock.acquire()), daemon=True)
    thread.start()
    return thread, got


def test_one_holder_then_handover(dbpair: DbPair) -> None:
    """The second contender waits as a standby naming the holder, takes over within one check
    interval after release, and a killed lock session ends the holder's term."""
    stop = threading.Event()
    first_health, second_health = Health(), Health()
    first = SlotLock(dbpair.target_dsn, dbpair.slot, first_health, stop, check_every_s=0.5)
    second = SlotLock(dbpair.target_dsn, dbpair.slot, second_health, stop, check_every_s=0.5)
    try:
        term = first.acquire()
        assert term is not None and first_health.role == "active"
        thread, got = _acquire_in_thread(second)
        deadline = time.monotonic() + 10
        while second_health.state != "standby" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert second_health.role == "standby"
        assert second_health.reason == f"lock held by {application_name()} from 127.0.0.1"
        with psycopg.connect(dbpair.target_dsn, autocommit=True) as conn:
            holder = lock_holder(conn, dbpair.slot)
        assert holder is not None and holder.application_name == application_name()

        first.release()
        assert term.is_set()
        thread.join(timeout=5)
        (second_term,) = got
        assert second_term is not None and second_health.role == "active"

        with psycopg.connect(dbpair.target_dsn, autocommit=True) as conn:
            holder = lock_holder(conn, dbpair.slot)
            assert holder is not None
            conn.execute("SELECT pg_terminate_backend(%s)", (holder.backend_pid,))
        assert second_term.wait(timeout=3), "a lost lock session must end the term"
    finally:
        stop.set()
        first.release()
        second.release()


def test_a_lock_taken_ahead_is_held_once_acquired_and_one_held_elsewhere_is_waited_for(
        dbpair: DbPair) -> None:
    """Taken where its connection opened ahead: the lock is held before acquire(), which finds
    it held. Held by another session then: the ahead try fails and acquire() waits as a
    standby, as without it."""
    stop = threading.Event()
    health = Health()
    ahead = SlotLock(dbpair.target_dsn, dbpair.slot, health, stop, check_every_s=0.5)
    other = SlotLock(dbpair.target_dsn, dbpair.slot, Health(), stop, check_every_s=0.5)
    try:
        ahead.open_ahead(take=True)
        deadline = time.monotonic() + 10
        with psycopg.connect(dbpair.target_dsn, autocommit=True) as conn:
            while lock_holder(conn, dbpair.slot) is None and time.monotonic() < deadline:
                time.sleep(0.05)
            holder = lock_holder(conn, dbpair.slot)
        assert holder is not None and holder.application_name == application_name()
        term = ahead.acquire()
        assert term is not None and health.role == "active"
        other.open_ahead(take=True)
        thread, got = _acquire_in_thread(other)
        time.sleep(1.0)
        assert not got, "the lock is held: the other waits"
        ahead.release()
        thread.join(timeout=5)
        assert got and got[0] is not None
    finally:
        stop.set()
        ahead.release()
        other.release()


def test_the_lock_is_checked_at_once_while_the_stream_finds_the_target_down(
        dbpair: DbPair) -> None:
    """A target restart ends the lock's session: with the stream reconnecting to a target it
    found down, the keeper checks now, not at its next interval (30 s here), so the term ends
    before the stream could catch up and then let the slot go."""
    stop = threading.Event()
    health = Health()
    lock = SlotLock(dbpair.target_dsn, dbpair.slot, health, stop, check_every_s=30)
    try:
        term = lock.acquire()
        assert term is not None
        health.set_state("streaming")
        with psycopg.connect(dbpair.target_dsn, autocommit=True) as conn:
            holder = lock_holder(conn, dbpair.slot)
            assert holder is not None
            conn.execute("SELECT pg_terminate_backend(%s)", (holder.backend_pid,))
        assert not term.wait(1.0), "the keeper checked before its interval with nothing amiss"
        health.set_down("target", "server closed the connection")
        assert term.wait(2.0), "the keeper did not check while the target was down"
    finally:
        stop.set()
        lock.release()


def test_the_lock_is_given_up_when_the_source_stays_out_of_reach(dbpair: DbPair) -> None:
    """This host may have lost its route to the source alone: once the stream has failed to
    reach it for failover_after_s, the active process gives the lock up to a waiting standby.
    With the source out of reach for less, while streaming, or with no standby, it keeps it."""
    stop = threading.Event()
    health = Health()
    lock = SlotLock(dbpair.target_dsn, dbpair.slot, health, stop, check_every_s=0.5,
                    failover_after_s=1.5)
    standby = SlotLock(dbpair.target_dsn, dbpair.slot, Health(), stop, check_every_s=0.5,
                       failover_after_s=1.5)
    try:
        term = lock.acquire()
        assert term is not None
        health.set_down("source", "connection timeout expired")
        assert not term.wait(2.5), "gave the lock up with no standby to take it"
        health.set_state("streaming")
        thread, taken = _acquire_in_thread(standby)
        assert not term.wait(1.0), "gave the lock up while streaming"
        health.set_down("source", "connection timeout expired")
        assert not term.wait(1.0), "gave the lock up before failover_after_s"
        assert term.wait(1.5), "kept the lock with the source out of reach and a standby waiting"
        thread.join(timeout=5)
        assert taken and taken[0] is not None, "the standby did not take over"
        # The standby lets the lock go, and this process, waiting in turn, takes it back with
        # a term of its own: the source still out of reach, it has failover_after_s of tries
        # before giving way to the next standby. Released before this process's first try
        # (having given way, it waits two check intervals, 1 s, first): it takes the lock
        # without standing by, which would clear the source's being down (a race at 1 s).
        thread, taken = _acquire_in_thread(lock)
        time.sleep(0.2)
        standby.release()
        thread.join(timeout=5)
        term = taken[0]
        assert term is not None
        thread, _ = _acquire_in_thread(standby)
        assert health.down == "source"
        assert not term.wait(1.0), "gave the lock up again at once"
        assert term.wait(2.0)
    finally:
        stop.set()
        lock.release()
        standby.release()


def test_after_a_target_restart_the_lock_is_taken_again_without_the_standbys_turn(
        dbpair: DbPair) -> None:
    """A lock lost any other way (its session terminated here) leaves a waiting standby the
    first try, two check intervals; one lost to a target restart, which ended every session
    alike, is taken again at once."""
    if dbpair.target_cluster is None:
        pytest.skip("needs the throwaway target cluster: the test restarts it")
    stop = threading.Event()
    lock = SlotLock(dbpair.target_dsn, dbpair.slot, Health(), stop, check_every_s=1.0)

    def again() -> tuple[threading.Event | None, float]:
        lock.release()
        started = time.monotonic()
        return lock.acquire(), time.monotonic() - started

    try:
        term = lock.acquire()
        assert term is not None
        with psycopg.connect(dbpair.target_dsn, autocommit=True) as conn:
            holder = lock_holder(conn, dbpair.slot)
            assert holder is not None
            conn.execute("SELECT pg_terminate_backend(%s)", (holder.backend_pid,))
        assert term.wait(3)
        term, seconds = again()
        assert term is not None and seconds >= 2.0
        dbpair.target_cluster.stop("immediate")
        dbpair.target_cluster.start()
        assert term.wait(3)
        term, seconds = again()
        assert term is not None and seconds < 1.0
    finally:
        stop.set()
        lock.release()


def test_a_lock_session_whose_process_is_lost_behind_a_middlebox_is_ended(
        dbpair: DbPair) -> None:
    """The holder's connection goes through a middlebox that stops relaying it but keeps it open,
    and the holder is never heard again (as when killed then): the server ends the session once
    it has been idle for 15 check intervals, and the standby takes the lock."""
    if dbpair.target_cluster is None:
        pytest.skip("needs a local target the relay can reach on 127.0.0.1")
    stop, holder_stop = threading.Event(), threading.Event()
    port = int(conninfo_to_dict(dbpair.target_dsn)["port"] or 5432)
    with Relay(port, 0.0) as relay:
        through = make_conninfo(dbpair.target_dsn, host="127.0.0.1", port=relay.port)
        holder = SlotLock(through, dbpair.slot, Health(), holder_stop, check_every_s=0.2)
        standby = SlotLock(dbpair.target_dsn, dbpair.slot, Health(), stop, check_every_s=0.2)
        try:
            assert holder.acquire() is not None
            relay.freeze()
            frozen = time.monotonic()
            thread, got = _acquire_in_thread(standby)
            thread.join(timeout=20)
            assert got and got[0] is not None, "the standby never took the lock"
            assert 2.5 <= time.monotonic() - frozen < 10.0
        finally:
            stop.set()
            holder_stop.set()
            standby.release()


@pytest.mark.parametrize("process", ["gone", "running"])
def test_a_lock_left_by_a_process_gone_from_this_host_is_taken_at_once(
        dbpair: DbPair, process: str) -> None:
    """A session holds the lock under the name of a process of this host that no longer runs
    (killed while a middlebox kept its connection open, or before the host restarted): a
    process starting ends that session and takes the lock at once, rather than after the
    server's idle timeout. A holder whose process runs is left alone."""
    if process == "gone":
        ended = subprocess.Popen(["true"])
        ended.wait()
        pid = ended.pid
    else:
        pid = os.getpid()
    orphan = psycopg.connect(dbpair.target_dsn, autocommit=True,
                             application_name=application_name(pid))
    orphan.execute("SELECT pg_advisory_lock(%s)", (lock_key(dbpair.slot),))
    stop = threading.Event()
    lock = SlotLock(dbpair.target_dsn, dbpair.slot, Health(), stop, check_every_s=0.2)
    try:
        thread, got = _acquire_in_thread(lock)
        thread.join(timeout=3)
        if process == "gone":
            assert got and got[0] is not None, "the lock was not taken"
            with pytest.raises(psycopg.OperationalError):
                orphan.execute("SELECT 1")
        else:
            assert not got, "a live holder's lock was taken"
            assert orphan.execute("SELECT 1").fetchone() == (1,)
    finally:
        stop.set()
        lock.release()
        orphan.close()
