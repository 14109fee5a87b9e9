"""Start-up time of ``cdcsync run``: from the process's start until it streams and can apply.

Two throwaway clusters (or the given servers), a small table on both sides, ``cdcsync setup`` and
one start that takes the initial snapshot (not timed). Then ``--starts`` starts of
``cdcsync run`` as a new process each, for each ``--delay-ms`` (the target is reached through
:mod:`bench.relay`, which adds that delay to every byte in each direction, so a round trip costs
twice as much). Each start is timed from ``Popen`` until:

* ``slot``: the slot is active in ``pg_replication_slots`` (polled every 5 ms on the source);
* ``streaming``: the daemon logged its ``streaming`` event (the JSON log's timestamp), written
  once the applier holds its target connection and the reader runs: it can apply;
* ``applied``: the one source transaction written before the start (an update of one row) is
  on the target (polled every 5 ms, directly, not through the relay): what follows
  ``streaming`` (resolving the table, the first batch's round trips) is counted here.

Also per start: the target round trips the relay counted until ``streaming`` (connecting and
authenticating count too), and the process's CPU seconds (user + system) at that moment. The
process is then stopped with SIGTERM and must exit 0; the next start waits for the slot to be
free. Medians are printed.

``--baseline DIR`` also starts the cdcsync of another source tree (a checkout of an earlier
commit, its compiled modules built or copied in), alternating with this one, so that before and
after are compared in the same run on a shared machine.

Run: ``python -m bench.startup [--starts 7] [--delay-ms 0 10] [--baseline DIR]``, alone on the
machine (the figures are wall-clock times).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from bench.common import (
    BenchError,
    Servers,
    connect,
    execute,
    free_port,
    median,
    recreate_database,
    servers,
    to_toml,
    wait_until,
)
from bench.relay import Relay
from cdcsync import admin
from cdcsync.config import Settings

SOURCE_DB = "startup_src"
TARGET_DB = "startup_tgt"
SLOT = "startup"
PUBLICATION = "startup"
TABLE_DDL = ("CREATE TABLE item (id bigint PRIMARY KEY, qty int NOT NULL, note text, "
             "updated_at timestamptz NOT NULL DEFAULT now())")
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Start:
    tree: str
    delay_ms: float
    slot_s: float
    streaming_s: float
    applied_s: float
    round_trips: int
    cpu_s: float


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _streaming_at(log: Path) -> float | None:
    """The wall-clock time of the ``streaming`` event in the JSON log, if written yet."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        if '"streaming"' in line:
            record = json.loads(line)
            if record.get("event") == "streaming":
                return dt.datetime.fromisoformat(record["ts"]).timestamp()
    return None


def _slot_active(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                       (SLOT,)).fetchone()
    return bool(row and row[0])


def config(srv: Servers, target_port: int) -> dict[str, Any]:
    return {
        "tables": ["public.item"],
        "source": {"dsn": srv.source(SOURCE_DB), "slot": SLOT, "publication": PUBLICATION},
        "target": {"dsn": make_conninfo(srv.target(TARGET_DB), host="127.0.0.1",
                                        port=target_port)},
        "http": {"listen": f"127.0.0.1:{free_port()}"},
        "log": {"level": "info", "format": "json"},
    }


def prepare(srv: Servers) -> None:
    """Fresh databases, a 1,000-row table on the source, an empty one on the target, setup."""
    with connect(srv.source_admin) as conn:
        conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                     "WHERE slot_name = %s", (SLOT,))
    recreate_database(srv.source_admin, SOURCE_DB)
    recreate_database(srv.target_admin, TARGET_DB)
    source = srv.source(SOURCE_DB)
    execute(source, TABLE_DDL, "INSERT INTO item SELECT g, g % 7, md5(g::text) "
            "FROM generate_series(1, 1000) g",
            sql.SQL("CREATE PUBLICATION {} FOR TABLE item").format(sql.Identifier(PUBLICATION)))
    execute(srv.target(TARGET_DB), TABLE_DDL)
    admin.setup(Settings(**config(srv, _port(srv.target_admin))), create_tables=False)


def _port(dsn: str) -> int:
    return int(str(conninfo_to_dict(dsn).get("port", 5432)))


def start_once(srv: Servers, relay: Relay, workdir: Path, timeout: float,
               tree: Path | None = None) -> Start:
    """One ``cdcsync run`` (of ``tree``'s cdcsync if given) from its start until it streams;
    then stopped."""
    path = workdir / "startup.toml"
    path.write_text(to_toml(config(srv, relay.port)))
    log = workdir / f"run-{time.monotonic_ns()}.log"
    with connect(srv.source(SOURCE_DB)) as src, connect(srv.target(TARGET_DB)) as tgt:
        wait_until(lambda: not _slot_active(src), timeout=timeout, what="the slot to be free")
        row = src.execute("UPDATE item SET qty = qty + 1 WHERE id = 1 RETURNING qty").fetchone()
        assert row is not None
        marker = row[0]
        trips_before = relay.round_trips
        cmd = [sys.executable, "-m", "cdcsync.cli", "--config", str(path), "run"]
        env = {**os.environ, "PYTHONPATH": str(tree)} if tree else None
        with log.open("wb") as out:
            began = time.time()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    env=env, cwd=tree)
        try:
            held: list[float] = []

            def streaming() -> bool:
                if proc.poll() is not None:
                    raise BenchError(f"cdcsync run exited with {proc.returncode}:\n"
                                     f"{log.read_text(errors='replace')[-2000:]}")
                if not held and _slot_active(src):
                    held.append(time.time())
                return _streaming_at(log) is not None

            wait_until(streaming, timeout=timeout, what="cdcsync run to stream", interval=0.005)
            cpu, trips = _cpu_s(proc.pid), relay.round_trips - trips_before
            at = _streaming_at(log)
            assert at is not None
            if not held:
                wait_until(lambda: _slot_active(src), timeout=timeout, what="the slot",
                           interval=0.005)
                held.append(time.time())

            def applied() -> bool:
                got = tgt.execute("SELECT qty FROM item WHERE id = 1").fetchone()
                return got is not None and got[0] == marker

            wait_until(applied, timeout=timeout, what="the first change on the target",
                       interval=0.005)
            applied_at = time.time()
        finally:
            proc.terminate()
            code = proc.wait(timeout=30)
    if code != 0:
        raise BenchError(f"cdcsync run exited with {code} after SIGTERM:\n"
                         f"{log.read_text(errors='replace')[-2000:]}")
    return Start(str(tree or "this tree"), relay.delay_s * 1000, held[0] - began, at - began,
                 applied_at - began, trips, cpu)


def summarise(starts: Sequence[Start]) -> list[dict[str, Any]]:
    rows = []
    for tree, delay in sorted({(s.tree, s.delay_ms) for s in starts}):
        group = [s for s in starts if s.delay_ms == delay and s.tree == tree]
        rows.append({"tree": tree, "delay_ms": delay, "starts": len(group),
                     "streaming_s": round(median([s.streaming_s for s in group]), 3),
                     "applied_s": round(median([s.applied_s for s in group]), 3),
                     "slot_s": round(median([s.slot_s for s in group]), 3),
                     "round_trips": median([s.round_trips for s in group]),
                     "cpu_s": round(median([s.cpu_s for s in group]), 3),
                     "streaming_each": [round(s.streaming_s, 3) for s in group]})
    return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| cdcsync | delay to target (each way) | starts | streaming s (median) | "
             "first change applied s | slot active s | target round trips | CPU s | "
             "each start, streaming s |",
             "|---" * 9 + "|"]
    lines += [f"| {r['tree']} | {r['delay_ms']:g} ms | {r['starts']} | {r['streaming_s']:.3f} | "
              f"{r['applied_s']:.3f} | {r['slot_s']:.3f} | {r['round_trips']:g} | "
              f"{r['cpu_s']:.2f} | "
              f"{', '.join(f'{v:.2f}' for v in r['streaming_each'])} |" for r in rows]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--starts", type=int, default=7, help="timed starts per delay")
    parser.add_argument("--delay-ms", type=float, nargs="+", default=[0.0, 10.0],
                        help="delay added to the target's link, each way")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per wait")
    parser.add_argument("--source-dsn", help="use this server as the source (wal_level logical)")
    parser.add_argument("--target-dsn", help="use this server as the target")
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help="also time the cdcsync of this source tree, alternating")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.starts < 1:
        parser.error("--starts must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    starts: list[Start] = []
    try:
        with servers(args.source_dsn, args.target_dsn) as srv, \
                tempfile.TemporaryDirectory(prefix="cdcsync-startup-") as tmp:
            prepare(srv)
            relays = [Relay(_port(srv.target_admin), d / 1000) for d in args.delay_ms]
            for relay in relays:
                relay.__enter__()
            try:
                # The first start takes the initial snapshot; later ones find the table ready.
                start_once(srv, relays[0], Path(tmp), args.timeout)
                # Interleaved, so that a noisy moment on the shared machine hits every series.
                trees = [None, args.baseline] if args.baseline else [None]
                for _ in range(args.starts):
                    for relay in relays:
                        for tree in trees:
                            starts.append(start_once(srv, relay, Path(tmp), args.timeout, tree))
                            print(json.dumps(asdict(starts[-1])), file=sys.stderr, flush=True)
            finally:
                for relay in relays:
                    relay.__exit__()
    except (BenchError, psycopg.Error) as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    rows = summarise(starts)
    print(json.dumps(rows, indent=2) if args.json else table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
