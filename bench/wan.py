"""Backlog drain across a slow link: cdcsync and native logical replication, each over a relay.

The link a managed target sits behind is stood in for by :mod:`bench.relay`, adding ``--delay-ms``
(default 10) to every byte in each direction. Each consumer crosses it once, where it would in
production:

* cdcsync runs next to the source and reaches the target through the relay (its ``[target] dsn``
  points at the relay);
* the native subscription lives in the target and pulls from the source through the relay (its
  ``CONNECTION`` points at the relay).

Then the same backlog (bench.throughput's ``mix`` scenario: inserts, updates, deletes in
``--txn-rows``-change transactions) is drained by each consumer alone, one after the other, the
order alternating between repetitions; both targets are compared with the source afterwards.
Rates are from starting the consumer (the daemon's startup crosses the link too); the drain
seconds count from the consumer holding its slot. Each run also splits each consumer's time at its
first transaction applied on the target (the checkpoint, or the subscription's replication
origin, moving past where it stood; polled every 50 ms): ``*_first_apply_s`` from its start,
then ``*_after_first_s`` for the rest of the backlog. The relay counts the waits of cdcsync's
applier connection (its busiest one) while the backlog drains (from holding the slot to the last
checkpoint), divided by the batches committed (the checkpoint's updates). With local servers,
each run also records both consumers' CPU seconds, waits (voluntary context switches) and minor
page faults per process role (see :mod:`bench.cpu`), and each records the CPU seconds its relay used
(``*_relay_cpu_s``): the relay runs on the same cores, and a relay that costs one consumer much
more than the other skews the comparison (see :mod:`bench.relay`). Each run records the
daemon's peak RSS too (``cdcsync_peak_rss_mb``): the batches it holds grow with the link's round
trip (``[apply] max_rows = "auto"``).

``--rows`` takes several backlog sizes, each drained ``--repeat`` times and summarised on its
own line: each consumer's start is a fixed cost (cdcsync's is its process loading and checking
both databases, native's a worker launched inside the target), so how they compare depends on how
much backlog follows it.

With ``--backlog-during stall`` both consumers run while the backlog is written, their relays
stalled, and each is timed from its relay's resuming instead of its start: a consumer catching up
after its link stalled, with nothing to start (see :mod:`bench.wan_stall`). The default,
``stop``, writes the backlog with both consumers stopped.

With ``--gc-stats``, each run also reports the garbage collector's collections and milliseconds
per generation inside the daemon, start to exit (``cdcsync_gc``, see :mod:`bench.gcstats`).

Run: ``python -m bench.wan [--rows 100000 [1000000 ...]] [--txn-rows 100] [--delay-ms 10]
[--repeat 1] [--backlog-during stop|stall] [--gc-stats]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from bench import throughput as tp
from bench import wan_stall
from bench.common import BenchError, Servers, connect, execute, median, servers
from bench.relay import Relay


def _via(dsn: str, relay: Relay) -> str:
    return make_conninfo(dsn, host="127.0.0.1", port=relay.port)


def _port(dsn: str) -> int:
    return int(str(conninfo_to_dict(dsn).get("port", 5432)))


def _checkpoint_writes(dsn: str) -> int:
    """Batches (and idle advances) committed: each updates the checkpoint row once. The daemon's
    backends report their statistics as they exit, later on a loaded machine: read until the
    count holds still."""
    seen = -1
    with connect(dsn) as conn:
        for _ in range(20):
            time.sleep(0.5)
            conn.execute("SELECT pg_stat_clear_snapshot()")
            row = conn.execute("SELECT n_tup_upd FROM pg_stat_user_tables "
                               "WHERE relid = 'cdcsync.checkpoint'::regclass").fetchone()
            count = int(row[0]) if row else 0
            if count == seen:
                break
            seen = count
    return seen


def run_once(srv: Servers, args: argparse.Namespace, workdir: Path, relays: tuple[Relay, Relay],
             *, rows: int, repetition: int) -> dict[str, Any]:
    """One backlog of about ``rows`` changes drained by each consumer; ``relays``: to the
    source, to the target."""
    to_source, to_target = relays
    load = tp.workload("mix", rows, args.txn_rows, 0)
    config = tp.cdcsync_config(srv, "info", "pgoutput")
    config["target"]["dsn"] = _via(config["target"]["dsn"], to_target)
    tp.prepare(srv, load, {"pgoutput": config})
    with connect(srv.target(tp.NATIVE_DB)) as conn:
        conn.execute(sql.SQL("ALTER SUBSCRIPTION {} CONNECTION {}").format(
            sql.Identifier(tp.SUBSCRIPTION),
            sql.Literal(_via(srv.source(tp.SOURCE_DB), to_source))))
    source = srv.source(tp.SOURCE_DB)
    order = ["native", "cdcsync"] if repetition % 2 == 0 else ["cdcsync", "native"]
    seconds: dict[str, float] = {}
    drains: dict[str, float] = {}
    firsts: dict[str, float] = {}
    spent: dict[str, Any] = {}
    relayed: dict[str, float] = {}
    waits = 0
    with ExitStack() as stack:
        running = (stack.enter_context(wan_stall.Running(srv, config, workdir, relays,
                                                         args.timeout))
                   if args.backlog_during == "stall" else None)
        tp.log(f"[wan #{repetition + 1}] writing {load.changes:,} changes in "
               f"{len(load.transactions):,} transactions")
        _, marker, _ = tp.generate(source, load)
        expected = tp.fingerprint(source)
        poller = stack.enter_context(closing(tp.Poller(srv, marker, args.timeout)))
        for consumer in order:
            tp.log(f"[wan #{repetition + 1}] draining with {consumer} through the relay")
            relay = to_source if consumer == "native" else to_target
            relay_before = relay.cpu_s()
            started = time.monotonic()
            if running is not None:
                drain = running.catch_up(consumer, poller)
            elif consumer == "native":
                drain = tp.drain_native(srv, poller)
            else:
                drain = tp.drain_cdcsync(srv, poller, config, workdir, None,
                                         gc_stats=args.gc_stats)
            if consumer == "cdcsync":
                if drain.gc is not None:
                    spent["cdcsync_gc"] = drain.gc
                if drain.peak_rss_mb is not None:
                    spent["cdcsync_peak_rss_mb"] = round(drain.peak_rss_mb)
                finished = started + drain.seconds
                waits = max((link.waits_between(finished - drain.drain_seconds, finished)
                             for link in to_target.links), default=0)
            relayed[consumer] = relay.cpu_s() - relay_before
            seconds[consumer] = drain.seconds
            drains[consumer] = drain.drain_seconds
            if drain.first_apply_seconds is not None:
                firsts[consumer] = drain.first_apply_seconds
            used = drain.spent
            spent[f"{consumer}_cpu_by_role"] = used.cpu_s if used else None
            spent[f"{consumer}_waits_by_role"] = used.waits if used else None
            spent[f"{consumer}_faults_by_role"] = used.faults if used else None
    batches = _checkpoint_writes(srv.target(tp.CDCSYNC_DB))
    verified = (tp.fingerprint(srv.target(tp.NATIVE_DB)) == expected
                and tp.fingerprint(srv.target(tp.CDCSYNC_DB)) == expected)
    result = {"changes": load.changes, "transactions": len(load.transactions),
              "backlog_during": args.backlog_during,
              "order": " then ".join(order), "verified": verified,
              "cdcsync_batches": batches, "cdcsync_applier_waits": waits,
              "cdcsync_waits_per_batch": round(waits / max(batches, 1), 2),
              "ratio": round(seconds["native"] / seconds["cdcsync"], 2),
              **{f"{c}_s": round(s, 2) for c, s in seconds.items()},
              **{f"{c}_drain_s": round(s, 2) for c, s in drains.items()},
              **{f"{c}_first_apply_s": round(s, 2) for c, s in firsts.items()},
              **{f"{c}_after_first_s": round(seconds[c] - s, 2) for c, s in firsts.items()},
              **{f"{c}_relay_cpu_s": round(s, 2) for c, s in relayed.items()},
              **{f"{c}_rows_per_s": round(load.changes / s) for c, s in seconds.items()},
              **spent}
    tp.log(json.dumps(result))
    return result


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The medians of one backlog size's runs."""
    summary: dict[str, Any] = {"runs": len(runs), "changes": runs[0]["changes"]}
    for key in ("native_rows_per_s", "cdcsync_rows_per_s", "native_drain_s", "cdcsync_drain_s",
                "native_first_apply_s", "cdcsync_first_apply_s", "native_after_first_s",
                "cdcsync_after_first_s", "ratio", "cdcsync_waits_per_batch"):
        summary[key] = median([r[key] for r in runs])
    summary["cdcsync_ahead"] = sum(r["ratio"] >= 1 for r in runs)
    summary["verified"] = all(r["verified"] for r in runs)
    if any("cdcsync_gc" in r for r in runs):
        summary["cdcsync_gc_ms"] = median([r["cdcsync_gc"]["total_ms"] for r in runs
                                           if "cdcsync_gc" in r])
    return summary


def describe(summary: dict[str, Any], delay_ms: float, backlog_during: str) -> str:
    since = ("from start; from holding the slot: "
             f"native {summary['native_drain_s']:.2f} s, cdcsync {summary['cdcsync_drain_s']:.2f} s"
             if backlog_during == "stop" else "from the stalled link's return")
    line = (f"{summary['changes']:,} changes, {delay_ms:g} ms added each way, backlog written "
            f"with the consumers {'stopped' if backlog_during == 'stop' else 'running, stalled'}, "
            f"median of {summary['runs']} run(s): native {summary['native_rows_per_s']:,.0f} "
            f"rows/s, cdcsync {summary['cdcsync_rows_per_s']:,.0f} rows/s ({since};"
            f" first transaction applied after native {summary['native_first_apply_s']:.2f} s, "
            f"cdcsync {summary['cdcsync_first_apply_s']:.2f} s, the rest of the backlog in "
            f"native {summary['native_after_first_s']:.2f} s, cdcsync "
            f"{summary['cdcsync_after_first_s']:.2f} s), ratio in-run {summary['ratio']:.2f} "
            f"(cdcsync at least as fast in {summary['cdcsync_ahead']} of {summary['runs']}), "
            f"cdcsync's applier waited {summary['cdcsync_waits_per_batch']:.2f} times per "
            f"committed batch, targets equal the source: {summary['verified']}")
    if "cdcsync_gc_ms" in summary:
        line += f", the daemon's garbage collector {summary['cdcsync_gc_ms']:.1f} ms"
    return line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.wan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000],
                        help="backlog sizes (changes), each drained --repeat times")
    parser.add_argument("--txn-rows", type=int, default=100)
    parser.add_argument("--delay-ms", type=float, default=10.0, help="added in each direction")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--backlog-during", choices=("stop", "stall"), default="stop",
                        help="how the backlog builds up: both consumers stopped (each timed "
                             "from its start), or running with their links stalled (each timed "
                             "from its link's return)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--gc-stats", action="store_true",
                        help="time the garbage collector's collections inside the daemon "
                             "(bench.gcstats)")
    args = parser.parse_args(argv)
    if args.txn_rows < 6:
        parser.error("--txn-rows must be >= 6")
    if args.gc_stats and args.backlog_during == "stall":
        parser.error("--gc-stats counts the collector's work from the daemon's start: "
                     "use it with --backlog-during stop")
    if min(args.rows) < args.txn_rows:
        parser.error("every --rows must be at least --txn-rows")
    runs: dict[int, list[dict[str, Any]]] = {rows: [] for rows in args.rows}
    try:
        with servers() as srv, tempfile.TemporaryDirectory(prefix="cdcsync-wan-") as tmp, \
                Relay(_port(srv.source_admin), args.delay_ms / 1000) as to_source, \
                Relay(_port(srv.target_admin), args.delay_ms / 1000) as to_target:
            execute(srv.target_admin, "ALTER SYSTEM SET wal_retrieve_retry_interval = '100ms'",
                    "SELECT pg_reload_conf()")
            try:
                for rows, done in runs.items():
                    for repetition in range(args.repeat):
                        done.append(run_once(srv, args, Path(tmp), (to_source, to_target),
                                             rows=rows, repetition=repetition))
            finally:
                tp.reset(srv)
    except (BenchError, psycopg.Error) as exc:
        tp.log(f"bench failed: {exc}")
        return 1
    summaries = [summarise(done) for done in runs.values()]
    if args.json:
        print(json.dumps({"delay_ms_each_way": args.delay_ms,
                          "backlog_during": args.backlog_during, "summaries": summaries,
                          "runs": [run for done in runs.values() for run in done]}, indent=2))
    else:
        print("\n".join(describe(summary, args.delay_ms, args.backlog_during)
                        for summary in summaries))
    return 0 if all(summary["verified"] for summary in summaries) else 2


if __name__ == "__main__":
    sys.exit(main())
