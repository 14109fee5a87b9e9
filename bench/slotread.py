"""Reading a real slot: the reader's CPU per message, and the walsender's, with nothing else.

One throwaway source cluster, a backlog of ``--rows`` inserts into the throughput bench's table
in 1,000-row transactions, then copies of its slot read to the backlog's last commit by
:class:`cdcsync.source.replication.ReplicationStream` alone, the messages only counted: taken
one by one through psycopg's ``get_copy_data``, or a batch per call through the compiled reader
(``cdcsync/source/_copybatch.c``), alternating. Each read reports the reading process's CPU
(user + system) per message, and the walsender's CPU seconds and context switches (waits on
its socket or for WAL, and preemptions).

``--busy N`` runs N busy loops (separate processes) during the reads: on a machine with two
cores, the walsender then shares its core, as in the throughput bench where cdcsync's daemon,
the target's backends and the walsender run side by side.

Run: ``python -m bench.slotread [--rows 300000] [--runs 3] [--busy 0]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg

from bench import cpu
from cdcsync import localpg
from cdcsync.model import ZERO_LSN
from cdcsync.source import pgoutput
from cdcsync.source.replication import ReplicationStream

TXN_ROWS = 1000


def _spin() -> None:
    while True:
        pass


def _backlog(dsn: str, rows: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE bench (id bigint PRIMARY KEY, a int, b text, "
                     "updated_at timestamptz)")
        conn.execute("CREATE PUBLICATION slotread FOR TABLE bench")
        conn.execute("SELECT pg_create_logical_replication_slot('slotread', 'pgoutput')")
        for lo in range(1, rows + 1, TXN_ROWS):
            conn.execute("INSERT INTO bench SELECT g, (g %% 1000)::int, md5(g::text), "
                         "clock_timestamp() FROM generate_series(%s::bigint, %s::bigint) g",
                         (lo, min(lo + TXN_ROWS - 1, rows)))


def _context_switches(pid: int) -> dict[str, int]:
    """The walsender's context switches so far: voluntary ones are waits (on its socket, for
    WAL), the others preemptions."""
    counts = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
            counts[f"walsender_{name.split('_')[0]}_switches"] = int(value)
    return counts


def _read(dsn: str, slot: str, *, batched: bool, commits: int) -> dict[str, Any]:
    """Read ``slot`` until ``commits`` Commit messages have come."""
    stream = ReplicationStream(dsn, slot, batched=batched)
    stream.start(ZERO_LSN, pgoutput.options("slotread", binary=True))
    with psycopg.connect(dsn, autocommit=True) as conn:
        sender = cpu.walsender_pid(conn, slot)
    seen = messages = 0
    started, wall = time.process_time(), time.monotonic()
    try:
        while seen < commits:
            for payload in stream.read(0.2):
                messages += 1
                if payload[:1] == b"C":
                    seen += 1
        used = time.process_time() - started
        wall = time.monotonic() - wall
        walsender = cpu.process_seconds(sender) if sender is not None else None
        switches = _context_switches(sender) if sender is not None else {}
    finally:
        stream.close()
    return {"batched": batched, "messages": messages, "wall_s": round(wall, 3),
            "reader_us_per_message": round(used / messages * 1e6, 3),
            "walsender_cpu_s": walsender, **switches}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.slotread", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--runs", type=int, default=3, help="reads of each kind, alternating")
    parser.add_argument("--busy", type=int, default=0, help="busy loops beside the reads")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("cdcsync.source._copybatch") is None:
        print("warning: the compiled reader is not built (make build): both kinds of read "
              "take messages one by one", file=sys.stderr)
    kinds = [False, True] * args.runs
    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.busy)]
    reads: list[dict[str, Any]] = []
    print("starting a throwaway PostgreSQL cluster ...", file=sys.stderr, flush=True)
    with localpg.local_clusters() as (source, _):
        dsn = source.dsn()
        _backlog(dsn, args.rows)
        with psycopg.connect(dsn, autocommit=True) as conn:
            for i in range(len(kinds)):
                conn.execute("SELECT pg_copy_logical_replication_slot('slotread', %s)",
                             (f"slotread_{i}",))
        for spinner in spinners:
            spinner.start()
        try:
            commits = -(-args.rows // TXN_ROWS)
            for i, batched in enumerate(kinds):
                reads.append(_read(dsn, f"slotread_{i}", batched=batched, commits=commits))
                print(json.dumps(reads[-1]), file=sys.stderr, flush=True)
        finally:
            for spinner in spinners:
                spinner.terminate()
    summary = {}
    for batched in (False, True):
        mine = [r for r in reads if r["batched"] == batched]
        summary["batched" if batched else "one_by_one"] = {
            "reader_us_per_message": statistics.median(r["reader_us_per_message"] for r in mine),
            "walsender_cpu_s": statistics.median(r["walsender_cpu_s"] or 0.0 for r in mine),
            "wall_s": statistics.median(r["wall_s"] for r in mine),
            "walsender_preemptions": statistics.median(
                r.get("walsender_nonvoluntary_switches", 0) for r in mine),
            "walsender_waits": statistics.median(
                r.get("walsender_voluntary_switches", 0) for r in mine)}
    if args.json:
        print(json.dumps({"rows": args.rows, "busy": args.busy, "summary": summary,
                          "reads": reads}))
        return 0
    print(f"{args.rows:,} inserts, {args.busy} busy loop(s) beside, median of {args.runs} "
          "reads of each kind:")
    for kind, s in summary.items():
        print(f"  {kind:11s} reader {s['reader_us_per_message']:.2f} µs a message, walsender "
              f"{s['walsender_cpu_s']:.2f} CPU s (preempted {s['walsender_preemptions']:.0f} "
              f"times, waited {s['walsender_waits']:.0f}), {s['wall_s']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
