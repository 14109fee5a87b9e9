"""Standby takeover time: two ``cdcsync run`` with one slot, and the active one struck down.

A writer commits a small transaction every 10 ms on the source. Each round strikes the active
daemon and measures, from the fault:

* takeover: until the standby's ``/readyz`` says ``role: active, state: streaming``;
* first change: until a row committed on the source after the fault is on the target.

The faults (``--fault``):

* ``kill9``: SIGKILL. Its host's kernel closes its connections, and the servers see them end.
* ``vanish``: its host drops off the network, as one that loses power or is partitioned away:
  each daemon runs in a network namespace of its own (``bench/netns.py``, needs root), and the
  fault cuts the namespace's link, so every packet is lost. Only timeouts can find out. The
  round also measures when the source and the target had ended all of its sessions. With
  ``--target-delay-ms`` each batch's insert on the target takes that long, so the cut most
  often comes while one of the daemon's target transactions is open, holding its rows' locks.
* ``partition``: its host loses its route to the source alone. The daemons reach the target
  through its Unix socket, which no namespace's link carries, so the cut leaves the struck
  daemon its lock; it must give the lock up itself (``[source] failover_after_s``, set with
  ``--failover-after-s``; ``--receive-timeout-s`` sets how soon its stream gives up).

The struck daemon is started again (``kill9``) or its link restored, and it must become the
next standby by itself. After the rounds, the writer stops and the target must equal the source
(count and sum).

Run: ``python -m bench.failover --rounds 5``, ``--fault vanish --target-delay-ms 200`` or
``--fault partition --receive-timeout-s 10 --failover-after-s 10``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from psycopg.conninfo import make_conninfo

from bench import netns
from bench.common import (
    BenchError,
    Daemon,
    Servers,
    connect,
    execute,
    fetch_one,
    free_port,
    median,
    readyz,
    recreate_database,
    servers,
    streaming,
    wait_until,
)
from cdcsync import admin, localpg
from cdcsync.config import Settings

DB = "failover"
SLOT = "cdcsync_failover"
# A statement trigger on the target: each batch's insert sleeps this long.
SLOW_TARGET = """
CREATE FUNCTION slow_batch() RETURNS trigger LANGUAGE plpgsql AS
$$ BEGIN PERFORM pg_sleep({seconds}); RETURN NULL; END $$;
CREATE TRIGGER slow_batch AFTER INSERT ON ticks FOR EACH STATEMENT EXECUTE FUNCTION slow_batch()
"""
SESSIONS_TIMEOUT_S = 120


@dataclass
class Member:
    """One of the two daemons: where its ``/readyz`` answers, and its namespace if any."""

    daemon: Daemon
    host: str
    port: int
    ns: netns.Namespace | None = None

    def standby(self) -> bool:
        return readyz(self.port, self.host).get("state") == "standby"

    def streaming(self) -> bool:
        return streaming(self.port, self.host)


class Writer(threading.Thread):
    """One small transaction every 10 ms; remembers the newest id committed."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.stop = threading.Event()
        self.last = 0

    def run(self) -> None:
        with connect(self.dsn, autocommit=True) as conn:
            while not self.stop.wait(0.01):
                row = conn.execute("INSERT INTO ticks (v) VALUES (1) RETURNING id").fetchone()
                assert row is not None
                self.last = int(row[0])

    def reached(self, tick: int) -> bool:
        return self.last >= tick


def on_target(dsn: str, tick: int) -> bool:
    row = fetch_one(dsn, "SELECT count(*) FROM ticks WHERE id >= %s", (tick,))
    return bool(row and row[0])


def sessions_from(dsn: str, address: str) -> int:
    row = fetch_one(dsn, "SELECT count(*) FROM pg_stat_activity WHERE host(client_addr) = %s",
                    (address,))
    return int(row[0]) if row else 0


@dataclass(frozen=True)
class Plan:
    """The fault, and what the daemons are told."""

    fault: str  # kill9, vanish or partition
    target_delay_ms: int = 0
    source: dict[str, float] = field(default_factory=dict)  # more [source] settings

    @property
    def cut_sides(self) -> tuple[str, ...]:
        """The servers a struck namespace loses."""
        return {"vanish": ("source", "target"), "partition": ("source",)}.get(self.fault, ())


def _members(config: dict[str, Any], workdir: Path, spaces: Sequence[netns.Namespace] | None,
             target_socket: str | None) -> list[Member]:
    """The two daemons; in namespaces when ``spaces`` are given, reaching the target through
    ``target_socket`` (a Unix socket's directory, which no namespace's link carries) if set."""
    members = []
    for index, name in enumerate(("a", "b")):
        port = free_port()
        if spaces is None:
            own = {**config, "http": {"listen": f"127.0.0.1:{port}"}}
            members.append(Member(Daemon(own, workdir, name=name), "127.0.0.1", port))
            continue
        ns = spaces[index]
        own = {**config,
               "source": {**config["source"], "dsn": netns.dsn_from(ns, config["source"]["dsn"])},
               "target": {"dsn": make_conninfo(config["target"]["dsn"], host=target_socket)
                          if target_socket else netns.dsn_from(ns, config["target"]["dsn"])},
               "http": {"listen": f"{ns.address}:{port}"}}
        members.append(Member(Daemon(own, workdir, name=name, prefix=ns.command([])),
                              ns.address, port, ns))
    return members


class SessionsWatch(threading.Thread):
    """From the cut on, polls each server every 50 ms for the sessions from ``address``: when
    the last of them was gone, in seconds from ``since``, or None after ``SESSIONS_TIMEOUT_S``."""

    def __init__(self, address: str, admins: dict[str, str], since: float) -> None:
        super().__init__(daemon=True)
        self.address, self.admins, self.since = address, admins, since
        self.ended: dict[str, float | None] = dict.fromkeys(admins)

    def run(self) -> None:
        pending = dict(self.admins)
        while pending and time.monotonic() < self.since + SESSIONS_TIMEOUT_S:
            for side, dsn in list(pending.items()):
                if sessions_from(dsn, self.address) == 0:
                    self.ended[side] = time.monotonic() - self.since
                    del pending[side]
            time.sleep(0.05)


def open_transactions(dsn: str, address: str) -> int:
    row = fetch_one(dsn, "SELECT count(*) FROM pg_stat_activity WHERE host(client_addr) = %s "
                    "AND xact_start IS NOT NULL AND backend_type = 'client backend'", (address,))
    return int(row[0]) if row else 0


def run(rounds: int, workdir: Path, plan: Plan) -> dict[str, Any]:
    if plan.fault == "kill9":
        with servers() as srv:
            return _rounds(srv, rounds, workdir, plan, spaces=None, target_socket=None)
    missing = netns.unavailable()
    if missing is not None:
        raise BenchError(f"--fault {plan.fault}: {missing}")
    with localpg.local_clusters() as (source, target), netns.namespaces(2) as spaces:
        for cluster in (source, target):
            netns.expose(cluster, spaces)
        socket = str(target.socket_dir) if "target" not in plan.cut_sides else None
        return _rounds(Servers(source.dsn(), target.dsn(), local=True), rounds, workdir, plan,
                       spaces=spaces, target_socket=socket)


def _strike(victim: Member) -> float:
    """Strike ``victim``; return the moment it happened."""
    if victim.ns is None:
        assert victim.daemon.proc is not None
        victim.daemon.proc.send_signal(signal.SIGKILL)
        struck = time.monotonic()
        victim.daemon.proc.wait()
        return struck
    victim.ns.cut()
    return time.monotonic()


def _revive(victim: Member) -> None:
    if victim.ns is None:
        victim.daemon.start()
    else:
        victim.ns.restore()
    wait_until(victim.standby, timeout=120, what="the struck daemon to come back as a standby")


def _rounds(srv: Servers, rounds: int, workdir: Path, plan: Plan, *,
            spaces: Sequence[netns.Namespace] | None, target_socket: str | None
            ) -> dict[str, Any]:
    recreate_database(srv.source_admin, DB)
    recreate_database(srv.target_admin, DB)
    source, target = srv.source(DB), srv.target(DB)
    execute(source, "CREATE TABLE ticks (id bigserial PRIMARY KEY, v int)")
    config: dict[str, Any] = {
        "tables": ["public.ticks"],
        "source": {"dsn": source, "slot": SLOT, "publication": SLOT, **plan.source},
        "target": {"dsn": target},
        "log": {"format": "json"},
    }
    admin.setup(Settings(**config), create_tables=True)
    if plan.target_delay_ms:
        execute(target, SLOW_TARGET.format(seconds=plan.target_delay_ms / 1000))
    members = _members(config, workdir, spaces, target_socket)
    figures = Figures()
    try:
        admins = {"source": srv.source_admin, "target": srv.target_admin}
        _play(members, rounds, {side: admins[side] for side in plan.cut_sides}, source=source,
              target=target, figures=figures)
        wait_until(lambda: fetch_one(source, "SELECT count(*), sum(id) FROM ticks")
                   == fetch_one(target, "SELECT count(*), sum(id) FROM ticks"),
                   timeout=60, what="convergence")
    finally:
        for member in members:
            member.daemon.stop()
    result: dict[str, Any] = {
        "fault": plan.fault, "rounds": rounds, **plan.source,
        "takeover_s": [round(t, 2) for t in figures.takeovers],
        "takeover_median_s": round(median(figures.takeovers), 2),
        "first_change_median_s": round(median(figures.first_changes), 2), "converged": True}
    for side, values in figures.ended.items():
        if values:
            result[f"{side}_sessions_ended_s"] = [None if v is None else round(v, 2)
                                                  for v in values]
    if figures.open_at_cut:
        result["target_transactions_open_at_cut"] = figures.open_at_cut
    return result


@dataclass
class Figures:
    takeovers: list[float] = field(default_factory=list)
    first_changes: list[float] = field(default_factory=list)
    ended: dict[str, list[float | None]] = field(
        default_factory=lambda: {"source": [], "target": []})
    open_at_cut: list[int] = field(default_factory=list)


def _play(members: list[Member], rounds: int, admins: dict[str, str], *, source: str,
          target: str, figures: Figures) -> None:
    """The rounds; ``admins`` are the servers the struck daemon loses, by side."""
    members[0].daemon.start()
    wait_until(members[0].streaming, timeout=60, what="the first to stream")
    members[1].daemon.start()
    wait_until(members[1].standby, timeout=60, what="a standby")
    writer = Writer(source)
    writer.start()
    try:
        for number in range(rounds):
            time.sleep(2)
            victim, heir = members
            struck = _strike(victim)
            tick = writer.last + 1
            # A vanished daemon's target transaction holds the locks of the rows its batch wrote,
            # which the heir writes again from the checkpoint.
            watch = SessionsWatch(victim.host, admins, struck)
            watch.start()
            open_at_cut = (open_transactions(admins["target"], victim.host)
                           if "target" in admins else 0)
            took = wait_until(heir.streaming, timeout=120, what="the takeover") - struck
            wait_until(partial(writer.reached, tick), timeout=10, what="a new tick")
            first = wait_until(partial(on_target, target, tick), timeout=120,
                               what="a change after the fault") - struck
            figures.takeovers.append(took)
            figures.first_changes.append(first)
            line = f"round {number + 1}: takeover {took:.2f} s, first change {first:.2f} s"
            if "target" in admins:
                figures.open_at_cut.append(open_at_cut)
                line += f", {open_at_cut} target transactions open at the cut"
            watch.join()
            if victim.ns is not None:
                for side, seconds in watch.ended.items():
                    figures.ended[side].append(seconds)
                    line += (f", {side} sessions ended {seconds:.2f} s" if seconds is not None
                             else f", {side} sessions left after {SESSIONS_TIMEOUT_S} s")
            print(line, file=sys.stderr, flush=True)
            _revive(victim)
            members.reverse()
    finally:
        writer.stop.set()
        writer.join()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--fault", choices=("kill9", "vanish", "partition"), default="kill9",
                        help="kill9: SIGKILL the active daemon; vanish: cut its host off the "
                             "network, every packet lost; partition: cut it off the source "
                             "only (both need root)")
    parser.add_argument("--target-delay-ms", type=int, default=0,
                        help="make each batch's insert on the target take this long")
    parser.add_argument("--receive-timeout-s", type=float,
                        help="the daemons' [source] receive_timeout_s")
    parser.add_argument("--failover-after-s", type=float,
                        help="the daemons' [source] failover_after_s")
    args = parser.parse_args(argv)
    more = {"receive_timeout_s": args.receive_timeout_s, "failover_after_s": args.failover_after_s}
    plan = Plan(args.fault, args.target_delay_ms,
                {key: value for key, value in more.items() if value is not None})
    try:
        with tempfile.TemporaryDirectory(prefix="cdcsync-failover-") as tmp:
            result = run(args.rounds, Path(tmp), plan)
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
