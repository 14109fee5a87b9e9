"""Replication delay under a steady paced load: cdcsync and native logical replication side by side.

A writer applies a steady ``--rate`` rows/s of mixed changes (half inserts, 30 % updates, 20 %
deletes) to the source table ``bench`` for ``--duration`` seconds, in small transactions of
``--txn-rows`` rows, each one statement (a data-modifying CTE) so the pace is not bound by round
trips. Both consumers replicate it at the same time, each into its own target database: cdcsync
(``cdcsync run`` as a subprocess, default ``[apply]`` settings) and a native subscription.

Two measures:

* end-to-end delay of marker rows: every ``--marker-interval-ms`` the writer inserts a row into
  ``markers`` whose ``written_at`` is the source's ``clock_timestamp()`` just before its commit.
  A watcher polls each target database about every 2 ms for markers it has not seen yet and
  stamps them with the target server's ``clock_timestamp()`` of the poll that first returned
  them. Both servers run on this machine, so they share one clock. The delay is
  ``seen - written_at``: it includes commit, decoding, transport, apply, commit on the target and
  becoming visible to another session, plus up to one poll interval (reported as the resolution).
  Stamping on the target with a trigger would be no better: cdcsync copies every column (no
  target-side DEFAULT survives), its apply runs with ``session_replication_role = replica``, and a
  trigger fires before the apply commits, so it would miss the part a reader actually waits for;
* ``cdcsync_lag_seconds`` from the daemon's ``/metrics``, sampled every 100 ms while the writer
  writes (once it stops, the metric grows with the quiet until the next heartbeat).

Every second it also samples what the daemon holds (:mod:`bench.resources`: resident memory, file
descriptors, threads, CPU seconds, its target connections, the WAL its slot retains) and reports
the first and last samples and the resident memory's growth per hour over the second half of the
run. With ``--window-s`` the run is cut into windows of that length, each with its own delays and
the daemon's figures at its end: a soak (``--duration 1800 --window-s 300``) shows whether
anything climbs while the daemon streams for long. ``--jobs-interval-s`` runs the daemon's
periodic jobs that often (the scheduled verification and the retention job, off and every 300 s
by default), so that a soak exercises them too.

At the end both targets must equal the source (count and sums of the table ``bench``).

Run: ``python -m bench.lag [--duration 60] [--rate 5000] [--repeat 1] [--window-s 0]
[--jobs-interval-s 0] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from bench import resources
from bench.common import (
    BenchError,
    Daemon,
    Servers,
    both_streaming,
    connect,
    database_exists,
    drop_slot,
    execute,
    free_port,
    median,
    recreate_database,
    servers,
    wait_until,
)
from cdcsync import admin
from cdcsync.config import Settings

SOURCE_DB = "lag_source"
CDCSYNC_DB = "lag_cdcsync"
NATIVE_DB = "lag_native"
PUBLICATION = "lag_native_pub"
SUBSCRIPTION = "lag_native_sub"
SLOT = "cdcsync_lag"
CDCSYNC_PUBLICATION = "cdcsync_lag"
PRELOAD = 20_000
SCHEMA = (
    "CREATE TABLE bench (id bigint PRIMARY KEY, a int, b text, updated_at timestamptz)",
    "CREATE TABLE markers (id bigint PRIMARY KEY, written_at timestamptz NOT NULL)",
)
CHANGE = """
WITH ins AS (
  INSERT INTO bench SELECT g, (g %% 1000)::int, md5(g::text), clock_timestamp()
  FROM generate_series(%(ins_lo)s::bigint, %(ins_hi)s::bigint) g RETURNING 1),
upd AS (
  UPDATE bench SET a = a + 1, b = md5(b), updated_at = clock_timestamp()
  WHERE id BETWEEN %(upd_lo)s AND %(upd_hi)s RETURNING 1),
del AS (
  DELETE FROM bench WHERE id BETWEEN %(del_lo)s AND %(del_hi)s RETURNING 1)
SELECT (SELECT count(*) FROM ins) + (SELECT count(*) FROM upd) + (SELECT count(*) FROM del)
"""
MARKER = "INSERT INTO markers VALUES (%s, clock_timestamp())"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


class Writer(threading.Thread):
    """Paced mixed changes and periodic markers on one autocommit connection."""

    def __init__(self, dsn: str, rate: int, txn_rows: int, duration: float,
                 marker_interval: float) -> None:
        super().__init__(name="writer", daemon=True)
        self.dsn, self.rate, self.txn_rows = dsn, rate, txn_rows
        self.duration, self.marker_interval = duration, marker_interval
        self.rows = 0
        self.transactions = 0
        self.markers = 0
        self.behind_max = 0.0  # the longest the writer fell behind its schedule
        # time.monotonic() of the first change; marker n is due n - 1 marker intervals later.
        self.started = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._write()
        except BaseException as exc:  # reported by the main thread
            self.error = exc

    def _write(self) -> None:
        inserts = self.txn_rows // 2
        deletes = self.txn_rows // 5
        updates = self.txn_rows - inserts - deletes
        period = self.txn_rows / self.rate
        rng = random.Random(9)
        next_id, low = PRELOAD + 1, 1
        with connect(self.dsn) as conn:
            start = self.started = time.monotonic()
            next_marker = start
            while (now := time.monotonic()) - start < self.duration:
                if now >= next_marker:
                    self.markers += 1
                    conn.execute(MARKER, (self.markers,))
                    next_marker += self.marker_interval
                due = int((now - start) / period)
                if self.transactions >= due:
                    time.sleep(min(period, max(0.0, next_marker - now)))
                    continue
                self.behind_max = max(self.behind_max, now - start - self.transactions * period)
                upd_lo = rng.randint(low + deletes, next_id - updates)
                row = conn.execute(CHANGE, {
                    "ins_lo": next_id, "ins_hi": next_id + inserts - 1,
                    "upd_lo": upd_lo, "upd_hi": upd_lo + updates - 1,
                    "del_lo": low, "del_hi": low + deletes - 1}).fetchone()
                self.rows += int(row[0]) if row else 0
                self.transactions += 1
                next_id += inserts
                low += deletes


class MarkerWatch(threading.Thread):
    """Polls a target database for new markers; records each one's delay in seconds."""

    def __init__(self, dsn: str, name: str, poll_s: float = 0.002) -> None:
        super().__init__(name=f"watch-{name}", daemon=True)
        self.dsn, self.poll_s = dsn, poll_s
        self.delays: dict[int, float] = {}
        self.polls = 0
        self.started = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        last = 0
        with connect(self.dsn) as conn:
            self.started = time.monotonic()
            while not self.stop.is_set():
                rows = conn.execute(
                    "SELECT id, extract(epoch FROM clock_timestamp() - written_at)::float8 "
                    "FROM markers WHERE id > %s", (last,)).fetchall()
                self.polls += 1
                for marker_id, delay in rows:
                    self.delays.setdefault(int(marker_id), float(delay))
                    last = max(last, int(marker_id))
                time.sleep(self.poll_s)

    def resolution_ms(self) -> float:
        """The mean time between polls: a delay is overstated by up to this much."""
        return 1000 * (time.monotonic() - self.started) / max(1, self.polls)


class LagSampler(threading.Thread):
    """Samples ``cdcsync_lag_seconds`` from the daemon's /metrics, each with its
    ``time.monotonic()``."""

    def __init__(self, url: str, interval: float = 0.1) -> None:
        super().__init__(name="lag-sampler", daemon=True)
        self.url, self.interval = url, interval
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    text = response.read().decode()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("cdcsync_lag_seconds"):
                    value = float(line.rsplit(" ", 1)[1])
                    if not math.isnan(value):  # NaN while unknown
                        self.samples.append((time.monotonic(), value))


def prepare(srv: Servers, config: dict[str, Any]) -> None:
    reset(srv)
    recreate_database(srv.source_admin, SOURCE_DB)
    recreate_database(srv.target_admin, CDCSYNC_DB)
    recreate_database(srv.target_admin, NATIVE_DB)
    source = srv.source(SOURCE_DB)
    for dsn in (source, srv.target(CDCSYNC_DB), srv.target(NATIVE_DB)):
        execute(dsn, *SCHEMA)
        execute(dsn, "INSERT INTO bench SELECT g, (g % 1000)::int, md5(g::text), "
                     f"now() - interval '1 day' FROM generate_series(1, {PRELOAD}) g",
                "VACUUM ANALYZE bench")
    execute(source, sql.SQL("CREATE PUBLICATION {} FOR TABLE bench, markers").format(
        sql.Identifier(PUBLICATION)))
    execute(srv.target(NATIVE_DB), sql.SQL(
        "CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION {} WITH (copy_data = false)").format(
        sql.Identifier(SUBSCRIPTION), sql.Literal(source), sql.Identifier(PUBLICATION)))
    admin.setup(Settings(**config), create_tables=False)


def reset(srv: Servers) -> None:
    if database_exists(srv.target_admin, NATIVE_DB):
        with connect(srv.target(NATIVE_DB)) as conn:
            if conn.execute("SELECT 1 FROM pg_subscription WHERE subname = %s",
                            (SUBSCRIPTION,)).fetchone():
                ident = sql.Identifier(SUBSCRIPTION)
                conn.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(ident))
                conn.execute(sql.SQL("ALTER SUBSCRIPTION {} SET (slot_name = NONE)").format(ident))
                conn.execute(sql.SQL("DROP SUBSCRIPTION {}").format(ident))
    for slot in (SUBSCRIPTION, SLOT):
        drop_slot(srv.source_admin, slot)
    for admin_dsn, name in ((srv.source_admin, SOURCE_DB), (srv.target_admin, CDCSYNC_DB),
                            (srv.target_admin, NATIVE_DB)):
        execute(admin_dsn, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


def fingerprint(dsn: str) -> tuple[Any, ...] | None:
    with connect(dsn) as conn:
        row = conn.execute("SELECT count(*), sum(id), sum(a), sum(hashtext(b)::bigint), "
                           "max(updated_at) FROM bench").fetchone()
    return tuple(row) if row else None


def stats(values_s: Sequence[float]) -> dict[str, float]:
    return {"p50_ms": round(1000 * percentile(values_s, 50), 1),
            "p99_ms": round(1000 * percentile(values_s, 99), 1),
            "max_ms": round(1000 * max(values_s, default=float("nan")), 1),
            "samples": len(values_s)}


def rss_growth_mb_per_h(samples: Sequence[resources.Sample]) -> float | None:
    """The resident memory's least-squares slope over the second half of ``samples``, in MB per
    hour: the first half holds the working set's growth (caches, the pool, the jobs' first
    runs), a leak keeps the second half climbing. None with fewer than 10 samples there."""
    half = samples[len(samples) // 2:]
    if len(half) < 10:
        return None
    mean_t = sum(s.at for s in half) / len(half)
    mean_mb = sum(s.rss_mb for s in half) / len(half)
    spread = sum((s.at - mean_t) ** 2 for s in half)
    slope = sum((s.at - mean_t) * (s.rss_mb - mean_mb) for s in half) / spread
    return round(slope * 3600, 1) + 0.0  # + 0.0: no "-0.0" for a flat line


def windows(start: float, duration: float, window_s: float, marker_interval: float, *,
            delays: dict[str, dict[int, float]], lag: Sequence[tuple[float, float]],
            samples: Sequence[resources.Sample]) -> list[dict[str, Any]]:
    """The run cut into windows of about ``window_s`` from ``start`` (the writer's start): in
    each, the delays of the markers due then (marker n is due ``(n - 1) * marker_interval`` in),
    the lag metric sampled then, the daemon's CPU seconds, the most WAL its slot retained, and
    its other figures at the window's end."""
    count = max(1, round(duration / window_s)) if window_s > 0 else 1
    width = duration / count
    out: list[dict[str, Any]] = []
    before: resources.Sample | None = samples[0] if samples else None
    for k in range(count):
        low, high = k * width, (k + 1) * width
        if k == count - 1:
            high = math.inf  # the catch-up after the writer stopped belongs to the last window
        row: dict[str, Any] = {"from_s": round(low), "to_s": round(min(high, duration))}
        for name, seen in delays.items():
            row[f"{name}_marker"] = stats([d for n, d in seen.items()
                                           if low <= (n - 1) * marker_interval < high])
        row["cdcsync_lag_metric"] = stats([v for at, v in lag if low <= at - start < high])
        inside = [s for s in samples if low <= s.at - start < high]
        if inside and before is not None:
            row["daemon"] = {**inside[-1].report(),
                             "cpu_s": round(inside[-1].cpu_s - before.cpu_s, 2),
                             "retained_wal_mb": max(s.retained_wal_mb for s in inside)}
            before = inside[-1]
        out.append(row)
    return out


def run_once(srv: Servers, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    port = free_port()
    config: dict[str, Any] = {
        "tables": ["public.bench", "public.markers"],
        "source": {"dsn": srv.source(SOURCE_DB), "slot": SLOT,
                   "publication": CDCSYNC_PUBLICATION},
        "target": {"dsn": srv.target(CDCSYNC_DB)},
        "http": {"listen": f"127.0.0.1:{port}"},
        "log": {"level": "info", "format": "json"},
        "snapshot": {"mode": "never"},
    }
    if args.jobs_interval_s:
        config["verify"] = {"interval_s": args.jobs_interval_s}
        config["retention"] = {"interval_s": args.jobs_interval_s}
    prepare(srv, config)
    watches = {"cdcsync": MarkerWatch(srv.target(CDCSYNC_DB), "cdcsync"),
               "native": MarkerWatch(srv.target(NATIVE_DB), "native")}
    sampler = LagSampler(f"http://127.0.0.1:{port}/metrics")
    with Daemon(config, workdir, name="lag") as daemon:
        with connect(srv.source_admin) as conn:
            wait_until(partial(both_streaming, conn, SUBSCRIPTION, daemon, port), timeout=60,
                       what="both consumers to stream")
        for watch in watches.values():
            watch.start()
        sampler.start()
        held = resources.ResourceSampler(daemon.pid, srv.source_admin, SLOT,
                                         srv.target(CDCSYNC_DB))
        held.start()
        writer = Writer(srv.source(SOURCE_DB), args.rate, args.txn_rows, args.duration,
                        args.marker_interval_ms / 1000)
        log(f"writing {args.rate:,} rows/s for {args.duration:.0f}s ...")
        writer.start()
        writer.join()
        if writer.error is not None:
            raise BenchError(f"the writer failed: {writer.error}")

        def all_seen() -> bool:
            daemon.ensure_alive()
            return all(len(w.delays) >= writer.markers for w in watches.values())
        wait_until(all_seen, timeout=120, what="every marker on both targets")
        expected = fingerprint(srv.source(SOURCE_DB))
        wait_until(lambda: all(fingerprint(srv.target(db)) == expected
                               for db in (CDCSYNC_DB, NATIVE_DB)),
                   timeout=120, interval=0.5, what="both targets to equal the source")
        sampler.stop.set()
        for watch in watches.values():
            watch.stop.set()
            watch.join()
        sampler.join()
        samples = held.finish()
        code = daemon.stop()
    if code != 0:
        raise BenchError(f"cdcsync run exited with {code}:\n{daemon.log_tail()}")
    # While the writer wrote: after it, the metric measures the quiet (it grows while nothing is
    # applied, until the next heartbeat), not a lag; the last markers' catch-up is in their delays.
    lagged = [(at, v) for at, v in sampler.samples if at - writer.started <= args.duration]
    result = {
        "rows": writer.rows, "transactions": writer.transactions, "markers": writer.markers,
        "rows_per_s": round(writer.rows / args.duration),
        "writer_behind_max_ms": round(1000 * writer.behind_max, 1),
        "poll_resolution_ms": round(max(w.resolution_ms() for w in watches.values()), 2),
        "cdcsync_marker": stats(list(watches["cdcsync"].delays.values())),
        "native_marker": stats(list(watches["native"].delays.values())),
        "cdcsync_lag_metric": stats([v for _, v in lagged]),
        "cdcsync_peak_rss_mb": round(daemon.peak_rss_mb, 1),
        "cdcsync_daemon_first": samples[0].report() if samples else None,
        "cdcsync_daemon_last": samples[-1].report() if samples else None,
        "cdcsync_rss_growth_mb_per_h": rss_growth_mb_per_h(samples),
    }
    if args.window_s:
        result["windows"] = windows(
            writer.started, args.duration, args.window_s, args.marker_interval_ms / 1000,
            delays={name: w.delays for name, w in watches.items()}, lag=lagged,
            samples=samples)
    log(json.dumps(result))
    return result


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": len(runs), "rows_per_s": median([r["rows_per_s"] for r in runs])}
    for key in ("cdcsync_marker", "native_marker", "cdcsync_lag_metric"):
        out[key] = {m: median([r[key][m] for r in runs]) for m in ("p50_ms", "p99_ms", "max_ms")}
    out["poll_resolution_ms"] = median([r["poll_resolution_ms"] for r in runs])
    return out


def table(summary: dict[str, Any], last: dict[str, Any]) -> str:
    """The summary's delays; then, of the ``last`` run, what the daemon held first and last,
    and its windows if it has them."""
    lines = [f"{summary['rows_per_s']:,.0f} rows/s of mixed changes, median of "
             f"{summary['runs']} run(s); marker poll resolution "
             f"{summary['poll_resolution_ms']:.1f} ms",
             f"{'measure':<34}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}"]
    for key, title in (("cdcsync_marker", "cdcsync marker delay"),
                       ("native_marker", "native subscription marker delay"),
                       ("cdcsync_lag_metric", "cdcsync_lag_seconds (sampled)")):
        s = summary[key]
        lines.append(f"{title:<34}{s['p50_ms']:>10.1f}{s['p99_ms']:>10.1f}{s['max_ms']:>10.1f}")
    first, final = last["cdcsync_daemon_first"], last["cdcsync_daemon_last"]
    if first and final:
        lines.append("the daemon in the last run, first and last sample: " + ", ".join(
            f"{key} {first[key]} -> {final[key]}" for key in first if key != "cpu_s"))
        lines.append(f"its resident memory's growth over the run's second half: "
                     f"{last['cdcsync_rss_growth_mb_per_h']} MB per hour")
    if "windows" in last:
        lines.append(f"{'window s':<12}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}{'RSS MB':>8}"
                     f"{'fds':>5}{'threads':>8}{'conns':>6}{'CPU s':>7}{'WAL MB':>8}")
        for w in last["windows"]:
            m, d = w["cdcsync_marker"], w.get("daemon")
            held = (f"{d['rss_mb']:>8.1f}{d['fds']:>5}{d['threads']:>8}"
                    f"{d['target_connections']:>6}{d['cpu_s']:>7.2f}{d['retained_wal_mb']:>8.1f}"
                    if d else "")
            lines.append(f"{w['from_s']:>5}-{w['to_s']:<6}{m['p50_ms']:>8.1f}{m['p99_ms']:>8.1f}"
                         f"{m['max_ms']:>8.1f}{held}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.lag", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--rate", type=int, default=5_000, help="rows changed per second")
    parser.add_argument("--txn-rows", type=int, default=20, help="rows per source transaction")
    parser.add_argument("--marker-interval-ms", type=float, default=50.0)
    parser.add_argument("--repeat", type=int, default=1, help="runs; medians shown")
    parser.add_argument("--window-s", type=float, default=0.0,
                        help="report each window of this many seconds too (0: none)")
    parser.add_argument("--jobs-interval-s", type=float, default=0.0,
                        help="run the scheduled verification and the retention job this often "
                             "(0: the daemon's defaults)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.txn_rows < 5 or args.rate < args.txn_rows or args.duration <= 0:
        parser.error("--txn-rows must be >= 5, --rate >= --txn-rows, --duration > 0")
    if args.window_s < 0 or args.jobs_interval_s < 0:
        parser.error("--window-s and --jobs-interval-s must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    runs: list[dict[str, Any]] = []
    try:
        with servers() as srv, tempfile.TemporaryDirectory(prefix="cdcsync-lag-") as tmp:
            execute(srv.target_admin, "ALTER SYSTEM SET wal_retrieve_retry_interval = '100ms'",
                    "SELECT pg_reload_conf()")
            try:
                for _ in range(args.repeat):
                    runs.append(run_once(srv, args, Path(tmp)))
            finally:
                reset(srv)
    except (BenchError, psycopg.Error) as exc:
        log(f"bench failed: {exc}")
        return 1
    summary = summarise(runs)
    print(json.dumps({"summary": summary, "runs": runs}, indent=2) if args.json
          else table(summary, runs[-1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
