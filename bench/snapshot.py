"""Initial snapshot speed: cdcsync versus a raw ``psql COPY | psql COPY`` pipe, same run.

Four tables (2,000,000 rows in all by default) are created on the source. Each run copies them
into fresh, empty target tables twice: once with one ``psql -c "COPY t TO STDOUT" | psql -c
"COPY t FROM STDIN"`` pipe per table, one table after another, as an operator would by hand;
and once by ``cdcsync run`` with ``[snapshot] mode = "initial"`` (wall time from starting the
daemon until every table is ``ready`` in ``cdcsync.table_state``). Rows are counted on both
targets afterwards. Prints seconds, rows/s, the ratio and cdcsync's peak RSS; medians over runs.

    python -m bench.snapshot [--rows 2000000] [--tables 4] [--workers 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg

from bench.common import (
    BenchError,
    Daemon,
    Servers,
    drop_slot,
    execute,
    fetch_one,
    free_port,
    median,
    recreate_database,
    servers,
    wait_until,
)
from cdcsync import admin, localpg
from cdcsync.config import Settings

SOURCE_DB = "snapshot_source"
RAW_DB = "snapshot_raw"
CDCSYNC_DB = "snapshot_cdcsync"
SLOT = "bench_snapshot"

DDL = """
CREATE TABLE {name} (id bigint PRIMARY KEY, account int NOT NULL, label text,
                     amount numeric(12, 2), created_at timestamptz NOT NULL,
                     updated_at timestamptz NOT NULL)
"""


def _names(tables: int) -> list[str]:
    return [f"snap_{i}" for i in range(tables)]


def prepare_source(srv: Servers, rows: int, tables: int) -> None:
    recreate_database(srv.source_admin, SOURCE_DB)
    per_table = rows // tables
    for name in _names(tables):
        execute(srv.source(SOURCE_DB), DDL.format(name=name),
                f"INSERT INTO {name} SELECT g, g % 5000, md5(g::text), (g % 100000) / 100.0, "
                f"now() - g * interval '1 second', now() FROM generate_series(1, {per_table}) g",
                f"VACUUM ANALYZE {name}")


def fresh_targets(srv: Servers, tables: int) -> None:
    for db in (RAW_DB, CDCSYNC_DB):
        recreate_database(srv.target_admin, db)
        for name in _names(tables):
            execute(srv.target(db), DDL.format(name=name))


def raw_pipe(srv: Servers, tables: int) -> float:
    psql = str(localpg.find_pg_bin() / "psql")
    started = time.monotonic()
    for name in _names(tables):
        out = subprocess.Popen([psql, "-X", "-q", "-d", srv.source(SOURCE_DB), "-c",
                                f"COPY {name} TO STDOUT"], stdout=subprocess.PIPE)
        into = subprocess.run([psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d",
                               srv.target(RAW_DB), "-c", f"COPY {name} FROM STDIN"],
                              stdin=out.stdout, capture_output=True, check=False)
        assert out.stdout is not None
        out.stdout.close()
        if out.wait() != 0 or into.returncode != 0:
            raise BenchError(f"psql pipe of {name} failed: {into.stderr.decode().strip()}")
    return time.monotonic() - started


def cdcsync_snapshot(srv: Servers, tables: int, workers: int, workdir: Path,
                     timeout: float) -> tuple[float, float, float]:
    drop_slot(srv.source_admin, SLOT)
    config: dict[str, Any] = {
        "tables": [f"public.{n}" for n in _names(tables)],
        "source": {"dsn": srv.source(SOURCE_DB), "slot": SLOT, "publication": SLOT},
        "target": {"dsn": srv.target(CDCSYNC_DB)},
        "snapshot": {"mode": "initial", "workers": workers},
        "http": {"listen": f"127.0.0.1:{free_port()}"},
        "log": {"level": "info", "format": "json"},
    }
    admin.setup(Settings(**config), create_tables=False)
    target = srv.target(CDCSYNC_DB)

    def all_ready() -> bool:
        row = fetch_one(target, "SELECT count(*) FILTER (WHERE state = 'ready'), count(*) "
                                "FROM cdcsync.table_state")
        return row is not None and row[0] == row[1] == tables

    with Daemon(config, workdir, name="snapshot") as daemon:
        started = time.monotonic()

        def done() -> bool:
            daemon.ensure_alive()
            return all_ready()

        finished = wait_until(done, timeout=timeout, what="every table ready")
        seconds = finished - started
        daemon.stop()
        copy_s = _copy_seconds(daemon.log_path)
    drop_slot(srv.source_admin, SLOT)
    return seconds, copy_s, daemon.peak_rss_mb


def _copy_seconds(log: Path) -> float:
    """From the daemon's snapshot_started to its snapshot_done event: the copy alone, without
    the process start, the checks and the slot's creation."""
    stamps: dict[str, dt.datetime] = {}
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") in ("snapshot_started", "snapshot_done"):
                stamps[record["event"]] = dt.datetime.fromisoformat(record["ts"])
    if len(stamps) != 2:
        raise BenchError(f"no snapshot_started/snapshot_done pair in {log}")
    return (stamps["snapshot_done"] - stamps["snapshot_started"]).total_seconds()


def count_rows(dsn: str, tables: int) -> int:
    total = 0
    for name in _names(tables):
        row = fetch_one(dsn, f"SELECT count(*) FROM {name}")
        total += int(row[0]) if row else 0
    return total


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.snapshot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows over all tables")
    parser.add_argument("--tables", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="[snapshot] workers")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--source-dsn")
    parser.add_argument("--target-dsn")
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    runs: list[dict[str, float]] = []
    try:
        with servers(args.source_dsn, args.target_dsn) as srv, \
                tempfile.TemporaryDirectory(prefix="cdcsync-bench-") as tmp:
            prepare_source(srv, args.rows, args.tables)
            expected = count_rows(srv.source(SOURCE_DB), args.tables)
            for i in range(args.repeat):
                fresh_targets(srv, args.tables)
                raw_s = raw_pipe(srv, args.tables)
                cdc_s, copy_s, rss = cdcsync_snapshot(srv, args.tables, args.workers,
                                                      Path(tmp), args.timeout)
                copied = (count_rows(srv.target(RAW_DB), args.tables),
                          count_rows(srv.target(CDCSYNC_DB), args.tables))
                if copied != (expected, expected):
                    raise BenchError(f"row counts differ: source {expected}, raw {copied[0]}, "
                                     f"cdcsync {copied[1]}")
                runs.append({"raw_s": raw_s, "cdcsync_s": cdc_s, "copy_s": copy_s,
                             "ratio": raw_s / cdc_s, "copy_ratio": raw_s / copy_s,
                             "peak_rss_mb": rss})
                print(f"run {i + 1}: raw pipe {raw_s:.2f} s, cdcsync {cdc_s:.2f} s (copy "
                      f"{copy_s:.2f} s), ratio {raw_s / cdc_s:.2f} (copy alone "
                      f"{raw_s / copy_s:.2f}), peak RSS {rss:.0f} MB", file=sys.stderr)
    except (BenchError, psycopg.Error) as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    raw = median([r["raw_s"] for r in runs])
    cdc = median([r["cdcsync_s"] for r in runs])
    summary = {"rows": expected, "tables": args.tables, "workers": args.workers,
               "repeats": len(runs), "raw_pipe_s": round(raw, 2),
               "raw_pipe_rows_per_s": round(expected / raw),
               "cdcsync_s": round(cdc, 2), "cdcsync_rows_per_s": round(expected / cdc),
               "ratio": round(median([r["ratio"] for r in runs]), 2),
               "cdcsync_copy_s": round(median([r["copy_s"] for r in runs]), 2),
               "copy_ratio": round(median([r["copy_ratio"] for r in runs]), 2),
               "cdcsync_peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs))}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for key, value in summary.items():
            print(f"{key:22} {value}")
        print("ratio: raw pipe seconds / cdcsync seconds (median of per-run ratios; > 1 means "
              "cdcsync is faster); cdcsync time includes starting the daemon; copy_ratio uses "
              "the copy alone (snapshot_started to snapshot_done in the daemon's log)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
