"""Standby takeover time: two ``cdcsync run`` with one configuration, kill -9 of the active one.

A writer commits a small transaction every 10 ms on the source. Each round kills the active
daemon with SIGKILL and measures, from the kill:

* takeover: until the standby's ``/readyz`` says ``role: active, state: streaming``;
* first change: until a row committed on the source after the kill is on the target.

The killed daemon is started again and becomes the next standby. After the rounds, the writer
stops and the target must equal the source (count and sum).

Run: ``python -m bench.failover --rounds 5``.
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
from functools import partial
from pathlib import Path
from typing import Any

from bench.common import (
    BenchError,
    Daemon,
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
from cdcsync import admin
from cdcsync.config import Settings

DB = "failover"
SLOT = "cdcsync_failover"


def standby(port: int) -> bool:
    return readyz(port).get("state") == "standby"


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


def run(rounds: int, workdir: Path) -> dict[str, Any]:
    with servers() as srv:
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
        daemons: list[tuple[Daemon, int]] = []
        for name in ("a", "b"):
            port = free_port()
            daemons.append((Daemon({**config, "http": {"listen": f"127.0.0.1:{port}"}},
                                   workdir, name=name), port))
        writer = Writer(source)
        takeovers: list[float] = []
        first_changes: list[float] = []
        try:
            daemons[0][0].start()
            wait_until(lambda: streaming(daemons[0][1]), timeout=60, what="the first to stream")
            daemons[1][0].start()
            wait_until(lambda: standby(daemons[1][1]), timeout=60, what="a standby")
            writer.start()
            for number in range(rounds):
                time.sleep(2)
                (victim, _), (_, heir_port) = daemons
                assert victim.proc is not None
                victim.proc.send_signal(signal.SIGKILL)
                killed = time.monotonic()
                victim.proc.wait()
                tick = writer.last + 1
                took = wait_until(partial(streaming, heir_port), timeout=60,
                                  what="the takeover") - killed
                wait_until(partial(writer.reached, tick), timeout=10, what="a new tick")
                first = wait_until(partial(on_target, target, tick), timeout=60,
                                   what="a change after the kill") - killed
                takeovers.append(took)
                first_changes.append(first)
                print(f"round {number + 1}: takeover {took:.2f} s, first change "
                      f"{first:.2f} s", file=sys.stderr, flush=True)
                victim.start()
                wait_until(lambda p=daemons[0][1]: standby(p), timeout=60,  # type: ignore[misc]
                           what="the killed daemon to come back as a standby")
                daemons.reverse()
        finally:
            writer.stop.set()
            writer.join()
        try:
            wait_until(lambda: fetch_one(source, "SELECT count(*), sum(id) FROM ticks")
                       == fetch_one(target, "SELECT count(*), sum(id) FROM ticks"),
                       timeout=60, what="convergence")
        finally:
            for daemon, _ in daemons:
                daemon.stop()
        return {"rounds": rounds, "takeover_s": [round(t, 2) for t in takeovers],
                "takeover_median_s": round(median(takeovers), 2),
                "first_change_median_s": round(median(first_changes), 2),
                "converged": True}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="cdcsync-failover-") as tmp:
            result = run(args.rounds, Path(tmp))
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
