"""verify throughput and its cost to the source: two tables of N rows each, in sync.

Both tables are built on the source with ``generate_series`` and copied to the target directly
(``COPY ... TO STDOUT`` into ``COPY ... FROM STDIN``), not through cdcsync, then vacuumed and
analyzed on both sides. ``orders`` has a bigint key; ``events`` a composite (int, int) key.

Each repetition runs :func:`cdcsync.verify.command.verify` in this process and prints its wall time,
rows compared per second (rows of both tables / time), and the source's buffer accesses to the
two tables during the run (``pg_statio_user_tables``: heap and index blocks, hit or read) against
one sequential read of each table (its heap pages). It also times one bare hashing pass: each
table's count and xor of verify's own row hash over the whole table, on both servers at once,
with the same statement and session settings as verify's first pass over a table: the floor
verify's design aims at, so the ratio of the two says what verify adds to hashing (connections,
catalog look-ups, ranges and bisection), whatever else is running on this machine. Each run also
times the command itself, ``cdcsync verify --json`` as a new process (interpreter start, imports,
configuration), to show what a user waits for. Finally one run with 100 rows changed on the target
shows the cost of finding differences. Medians are over ``--repeat`` runs; the load average
before and after the series tells how busy the machine was.

Before the runs it places each table's first-level ranges once, as the scheduled verification
does at the start of each pass, and prints how many, the seconds and the peak of Python's
allocations meanwhile (``tracemalloc``: the rows psycopg returns and what is built from them;
libpq's own buffers are not counted). A daemon keeps the memory it frees for reuse
(:mod:`cdcsync.allocator`), so that peak is memory a long-running daemon holds.

Last, one pass of the scheduled verification (``[verify] sample_ranges`` 4) over ``orders``,
during which ``--appended`` rows are added above its greatest key on both sides, as a table with
ascending keys grows: the seconds of each of the pass's runs, whose slowest should cost about what
the others do.

Run: ``python -m bench.verify --rows 1000000 --repeat 5 [--appended N] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg

from bench.common import (
    BenchError,
    connect,
    execute,
    median,
    recreate_database,
    servers,
    to_toml,
)
from cdcsync.config import Settings
from cdcsync.metrics import Metrics
from cdcsync.source import catalog
from cdcsync.verify import sql as q
from cdcsync.verify.command import verify
from cdcsync.verify.compare import TableVerifier
from cdcsync.verify.job import ScheduledVerify
from cdcsync.verify.sides import fetch, open_sides
from cdcsync.verify.spec import table_spec
from cdcsync.verify.sql import KeyRange

DB = "cdcsync_bench_verify"
TABLES = ("orders", "events")
SCHEMA = """
CREATE TABLE orders (id bigint PRIMARY KEY, customer int NOT NULL, amount numeric(12, 2),
                     status text, created_at timestamptz, updated_at timestamptz NOT NULL);
CREATE TABLE events (account int, seq int, kind text, detail text, at timestamptz NOT NULL,
                     PRIMARY KEY (account, seq));
"""
FILL = """
INSERT INTO orders SELECT g, g % 5000, (g % 100000) / 100.0,
    (ARRAY['new', 'paid', 'sent'])[g % 3 + 1], '2024-01-01'::timestamptz + g * interval '1 second',
    now() FROM generate_series(1, {rows}) g;
INSERT INTO events SELECT g / 100, g % 100, 'kind ' || g % 7, md5(g::text),
    '2024-01-01'::timestamptz + g * interval '1 second' FROM generate_series(1, {rows}) g;
"""
APPEND = """
INSERT INTO orders SELECT m + g, g % 5000, 1, 'new', '2025-01-01'::timestamptz + g * interval '1 s',
    '2025-01-01' FROM (SELECT max(id) AS m FROM orders) t, generate_series(1, {appended}) g
"""
STATIO = """
SELECT sum(coalesce(heap_blks_read, 0) + coalesce(heap_blks_hit, 0)
           + coalesce(idx_blks_read, 0) + coalesce(idx_blks_hit, 0))::bigint,
       sum(pg_relation_size(relid) / current_setting('block_size')::int)::bigint
FROM pg_statio_user_tables WHERE relname = ANY (%s)
"""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build(source: str, target: str, rows: int) -> None:
    execute(source, SCHEMA, FILL.format(rows=rows))
    execute(target, SCHEMA)
    for table in TABLES:
        with connect(source) as src, connect(target) as tgt, \
                src.cursor().copy(f"COPY {table} TO STDOUT") as out, \
                tgt.cursor().copy(f"COPY {table} FROM STDIN") as into:
            for block in out:
                into.write(block)
    for dsn in (source, target):
        execute(dsn, *(f"VACUUM (FREEZE, ANALYZE) {t}" for t in TABLES))


def source_blocks(source: str) -> tuple[int, int]:
    """(buffer accesses to the tables so far, their heap pages) as the statistics show them."""
    with connect(source) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(STATIO, (list(TABLES),)).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def hashing_pass(settings: Settings) -> float:
    """Seconds for both servers, at once, to hash every row of each table once, with verify's
    own row hash and connections but no ranges: the floor of a comparison."""
    with open_sides(settings) as sides:
        chosen = catalog.selected_tables(sides.source, settings.tables)
        specs = [table_spec(sides.source, sides.target, settings, t) for t in chosen]
        started = time.perf_counter()
        for spec in specs:
            whole = [KeyRange(None, None)]
            sides.both(fetch(q.summaries(spec.source, whole)),
                       fetch(q.summaries(spec.target, whole)))
        return time.perf_counter() - started


def ranges_cost(settings: Settings) -> dict[str, dict[str, float]]:
    """Per table: its first-level ranges, the seconds to place them and Python's peak
    allocation meanwhile, in KiB (see the module docstring)."""
    out: dict[str, dict[str, float]] = {}
    with open_sides(settings) as sides:
        for table in catalog.selected_tables(sides.source, settings.tables):
            verifier = TableVerifier(
                sides, table_spec(sides.source, sides.target, settings, table), settings.verify)
            tracemalloc.start()
            started = time.perf_counter()
            try:
                ranges = verifier.ranges()
                seconds = time.perf_counter() - started
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            out[table.name] = {"ranges": len(ranges), "seconds": round(seconds, 3),
                               "python_peak_kib": round(peak / 1024)}
    return out


def scheduled_pass(settings: Settings, source: str, target: str, appended: int) -> list[float]:
    """Seconds of each run of one scheduled pass over ``orders``, ``appended`` rows being added
    on both sides after its first run."""
    ended: list[float] = []  # the job reads its clock only to stamp a full pass

    def stamp() -> float:
        ended.append(time.time())
        return ended[-1]

    only_orders = settings.model_copy(update={"tables": ("public.orders",)})
    job = ScheduledVerify(only_orders, Metrics("bench_verify"), clock=stamp)
    seconds: list[float] = []
    while not ended:
        started = time.perf_counter()
        job.run()
        seconds.append(time.perf_counter() - started)
        if len(seconds) == 1:
            for dsn in (source, target):
                execute(dsn, APPEND.format(appended=appended))
    return seconds


def command_seconds(config: Path) -> float:
    """Wall time of ``cdcsync verify --json`` as a new process, which must find the tables equal."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cdcsync.cli", "--config", str(config), "verify",
                           "--json"], capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise BenchError(f"cdcsync verify exited {done.returncode}: {done.stderr or done.stdout}")
    return seconds


def run_once(settings: Settings, source: str, target: str,
             config: Path | None = None) -> dict[str, Any]:
    floor = hashing_pass(settings)
    before, pages = source_blocks(source)
    started = time.perf_counter()
    report = verify(settings)
    seconds = time.perf_counter() - started
    # A backend flushes its table statistics when it exits; the verify connections have closed.
    time.sleep(1.2)
    after, _ = source_blocks(source)
    rows = sum(t.rows_compared for t in report.tables)
    return {"seconds": seconds, "rows": rows, "rows_per_s": rows / seconds,
            "hashing_pass_seconds": floor, "verify_per_hashing_pass": seconds / floor,
            "source_blocks": after - before, "one_seq_read_blocks": pages,
            "differences": sum(t.differences.count for t in report.tables),
            **({"command_seconds": command_seconds(config)} if config else {})}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows per table")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--appended", type=int,
                        help="rows added during the scheduled pass (default: half of --rows)")
    parser.add_argument("--source-dsn", help="an existing source server (admin DSN)")
    parser.add_argument("--target-dsn", help="an existing target server (admin DSN)")
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with servers(args.source_dsn, args.target_dsn) as srv:
            recreate_database(srv.source_admin, DB)
            recreate_database(srv.target_admin, DB)
            source, target = srv.source(DB), srv.target(DB)
            log(f"building {len(TABLES)} tables of {args.rows} rows ...")
            build(source, target, args.rows)
            settings = Settings.model_validate({
                "tables": tuple(f"public.{t}" for t in TABLES),
                "source": {"dsn": source, "slot": "bench_verify"}, "target": {"dsn": target}})
            ranges = ranges_cost(settings)
            log(f"first-level ranges: {ranges}")
            load_before = os.getloadavg()[0]
            runs = []
            with tempfile.TemporaryDirectory(prefix="cdcsync-bench-verify-") as workdir:
                config = Path(workdir) / "cdcsync.toml"
                config.write_text(to_toml({"tables": list(settings.tables),
                                           "source": {"dsn": source, "slot": "bench_verify"},
                                           "target": {"dsn": target}}))
                for repetition in range(args.repeat):
                    runs.append(run_once(settings, source, target, config))
                    log(f"run {repetition + 1}: {runs[-1]}")
            load_after = os.getloadavg()[0]
            execute(target, "UPDATE orders SET amount = amount + 1 WHERE id % 10000 = 0")
            differing = run_once(settings, source, target)
            log(f"with {differing['differences']} differences: {differing}")
            execute(target, "UPDATE orders SET amount = amount - 1 WHERE id % 10000 = 0")
            appended = args.rows // 2 if args.appended is None else args.appended
            pass_runs = scheduled_pass(settings, source, target, appended)
            log(f"scheduled pass, {appended} rows appended after its first run: {pass_runs}")
    except (BenchError, psycopg.Error) as exc:
        log(f"bench failed: {exc}")
        return 1
    summary = {
        "rows_per_table": args.rows, "runs": len(runs),
        "median_seconds": median([r["seconds"] for r in runs]),
        "median_rows_per_s": median([r["rows_per_s"] for r in runs]),
        "median_hashing_pass_seconds": median([r["hashing_pass_seconds"] for r in runs]),
        "median_verify_per_hashing_pass": median([r["verify_per_hashing_pass"] for r in runs]),
        "median_source_blocks": median([r["source_blocks"] for r in runs]),
        "median_command_seconds": median([r["command_seconds"] for r in runs]),
        "median_command_rows_per_s": median([r["rows"] / r["command_seconds"] for r in runs]),
        "load_average_before": load_before, "load_average_after": load_after,
        "one_seq_read_blocks": runs[0]["one_seq_read_blocks"],
        "with_100_differences_seconds": differing["seconds"],
        **{f"ranges_{table}": cost for table, cost in ranges.items()},
        "scheduled_pass_runs": len(pass_runs),
        "scheduled_pass_median_run_seconds": median(pass_runs),
        "scheduled_pass_slowest_run_seconds": max(pass_runs),
    }
    summary["source_blocks_per_seq_read"] = (summary["median_source_blocks"]
                                             / summary["one_seq_read_blocks"])
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for key, value in summary.items():
            print(f"{key:30} {value:,.2f}" if isinstance(value, float) else f"{key:30} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
