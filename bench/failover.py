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

The struck daemon is started again (``kill9``) or its link restored (``vanish``), and it must
become the next standby by itself. After the rounds, the writer stops and the target must equal
the source (count and sum).

Run: ``python -m bench.failover --rounds 5`` or ``--fault vanish --target-delay-ms 200``.
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


def _members(config: dict[str, Any], workdir: Path,
             spaces: Sequence[netns.Namespace] | None) -> list[Member]:
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
               "target": {"dsn": netns.dsn_from(ns, config["target"]["dsn"])},
               "http": {"listen": f"{ns.address}:{port}"}}
        members.append(Member(Daemon(own, workdir, name=name, prefix=ns.command([])),
                              ns.address, port, ns))
    return members


def _sessions_ended(address: str, admins: Sequence[str], since: float) -> dict[str, float | None]:
    """Seconds from ``since`` until each server had ended every session from ``address``, or
    None when some were left after ``SESSIONS_TIMEOUT_S``."""
    ended: dict[str, float | None] = {}
    for side, dsn in zip(("source", "target"), admins, strict=True):
        try:
            ended[side] = wait_until(partial(lambda d: sessions_from(d, address) == 0, dsn),
                                     timeout=SESSIONS_TIMEOUT_S, what="") - since
        except BenchError:
            ended[side] = None
    return ended


def open_transactions(dsn: str, address: str) -> int:
    row = fetch_one(dsn, "SELECT count(*) FROM pg_stat_activity WHERE host(client_addr) = %s "
                    "AND xact_start IS NOT NULL AND backend_type = 'client backend'", (address,))
    return int(row[0]) if row else 0


def run(rounds: int, workdir: Path, fault: str, target_delay_ms: int) -> dict[str, Any]:
    if fault == "kill9":
        with servers() as srv:
            return _rounds(srv, rounds, workdir, fault, target_delay_ms=target_delay_ms,
                           spaces=None)
    missing = netns.unavailable()
    if missing is not None:
        raise BenchError(f"--fault vanish: {missing}")
    with localpg.local_clusters() as (source, target), netns.namespaces(2) as spaces:
        for cluster in (source, target):
            netns.expose(cluster, spaces)
        return _rounds(Servers(source.dsn(), target.dsn(), local=True), rounds, workdir, fault,
                       target_delay_ms=target_delay_ms, spaces=spaces)


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


def _rounds(srv: Servers, rounds: int, workdir: Path, fault: str, *, target_delay_ms: int,
            spaces: Sequence[netns.Namespace] | None) -> dict[str, Any]:
    recreate_database(srv.source_admin, DB)
    recreate_database(srv.target_admin, DB)
    source, target = srv.source(DB), srv.target(DB)
    execute(source, "CREATE TABLE ticks (id bigserial PRIMARY KEY, v int)")
    config: dict[str, Any] = {
        "tables": ["public.ticks"],
        "source": {"dsn": source, "slot": SLOT, "publication": SLOT},
        "target": {"dsn": target},
        "log": {"format": "json"},
    }
    admin.setup(Settings(**config), create_tables=True)
    if target_delay_ms:
        execute(target, SLOW_TARGET.format(seconds=target_delay_ms / 1000))
    members = _members(config, workdir, spaces)
    figures = Figures()
    try:
        _play(members, rounds, (srv.source_admin, srv.target_admin), source=source, target=target,
              figures=figures)
        wait_until(lambda: fetch_one(source, "SELECT count(*), sum(id) FROM ticks")
                   == fetch_one(target, "SELECT count(*), sum(id) FROM ticks"),
                   timeout=60, what="convergence")
    finally:
        for member in members:
            member.daemon.stop()
    result: dict[str, Any] = {
        "fault": fault, "rounds": rounds,
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


def _play(members: list[Member], rounds: int, admins: tuple[str, str], *, source: str, target: str,
          figures: Figures) -> None:
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
            open_at_cut = open_transactions(admins[1], victim.host) if victim.ns else 0
            took = wait_until(heir.streaming, timeout=120, what="the takeover") - struck
            wait_until(partial(writer.reached, tick), timeout=10, what="a new tick")
            first = wait_until(partial(on_target, target, tick), timeout=120,
                               what="a change after the fault") - struck
            figures.takeovers.append(took)
            figures.first_changes.append(first)
            line = f"round {number + 1}: takeover {took:.2f} s, first change {first:.2f} s"
            if victim.ns is not None:
                figures.open_at_cut.append(open_at_cut)
                line += f", {open_at_cut} target transactions open at the cut"
                for side, seconds in _sessions_ended(victim.host, admins, struck).items():
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
    parser.add_argument("--fault", choices=("kill9", "vanish"), default="kill9",
                        help="kill9: SIGKILL the active daemon; vanish: cut its host off the "
                             "network, every packet lost (needs root)")
    parser.add_argument("--target-delay-ms", type=int, default=0,
                        help="make each batch's insert on the target take this long")
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="cdcsync-failover-") as tmp:
            result = run(args.rounds, Path(tmp), args.fault, args.target_delay_ms)
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
