"""One very large source transaction: cdcsync's peak memory, time to apply, and atomicity.

``cdcsync run`` streams from a fresh slot while one source transaction inserts ``--rows`` rows
(default 1,000,000) of a 10-column table. Measured:

* time to apply: from the source COMMIT returning to the first moment a reader on the target
  sees the rows (``count(*)`` polled on its own connection);
* the daemon's peak RSS (VmRSS sampled every 100 ms, and VmHWM);
* atomicity: the reader keeps sampling ``count(*)`` on the target from before the commit until the
  rows are there; every sample must be 0 or ``--rows``: anything else means a reader saw part of
  the transaction.

Run: ``python -m bench.bigtxn [--rows 1000000] [--repeat 1] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg

from bench.common import (
    BenchError,
    Daemon,
    Servers,
    connect,
    drop_database,
    drop_slot,
    execute,
    free_port,
    median,
    recreate_database,
    servers,
    streaming,
    wait_until,
)
from cdcsync import admin
from cdcsync.config import Settings

SOURCE_DB = "bigtxn_source"
TARGET_DB = "bigtxn_target"
SLOT = "cdcsync_bigtxn"
TABLE_DDL = ("CREATE TABLE wide (id bigint PRIMARY KEY, c1 int, c2 int, c3 bigint, c4 text, "
             "c5 text, c6 numeric, c7 boolean, c8 date, updated_at timestamptz)")
INSERT = ("INSERT INTO wide SELECT g, g % 1000, g % 7, g * 3, md5(g::text), 'row ' || g, "
          "g / 7.0, g % 2 = 0, date '2024-01-01' + (g % 365)::int, clock_timestamp() "
          "FROM generate_series(1, {rows}) g")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class CountWatch(threading.Thread):
    """Samples ``count(*)`` on the target; stops once it sees ``rows``."""

    def __init__(self, dsn: str, rows: int) -> None:
        super().__init__(name="count-watch", daemon=True)
        self.dsn, self.rows = dsn, rows
        self.counts: list[int] = []
        self.full_at: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        with connect(self.dsn) as conn:
            while not self.stop.is_set():
                row = conn.execute("SELECT count(*) FROM wide").fetchone()
                count = int(row[0]) if row else -1
                self.counts.append(count)
                if count == self.rows:
                    self.full_at = time.monotonic()
                    return
                time.sleep(0.02)


def run_once(srv: Servers, rows: int, workdir: Path) -> dict[str, Any]:
    drop_slot(srv.source_admin, SLOT)
    recreate_database(srv.source_admin, SOURCE_DB)
    recreate_database(srv.target_admin, TARGET_DB)
    execute(srv.source(SOURCE_DB), TABLE_DDL)
    execute(srv.target(TARGET_DB), TABLE_DDL)
    port = free_port()
    config: dict[str, Any] = {
        "tables": ["public.wide"],
        "source": {"dsn": srv.source(SOURCE_DB), "slot": SLOT, "publication": SLOT},
        "target": {"dsn": srv.target(TARGET_DB)},
        "http": {"listen": f"127.0.0.1:{port}"},
        "log": {"level": "info", "format": "json"},
        "snapshot": {"mode": "never"},
    }
    admin.setup(Settings(**config), create_tables=False)
    watch = CountWatch(srv.target(TARGET_DB), rows)
    with Daemon(config, workdir, name="bigtxn") as daemon:
        def ready() -> bool:
            daemon.ensure_alive()
            return streaming(port)
        # Not its slot being active: the slot's stream opens while the daemon still starts.
        wait_until(ready, timeout=60, what="cdcsync to stream")
        watch.start()
        log(f"inserting {rows:,} rows in one transaction ...")
        started = time.monotonic()
        with connect(srv.source(SOURCE_DB), autocommit=False) as conn:
            conn.execute(INSERT.format(rows=int(rows)).encode())
            conn.commit()
        committed = time.monotonic()

        def applied() -> bool:
            daemon.ensure_alive()
            return watch.full_at is not None
        wait_until(applied, timeout=900, interval=0.1, what=f"{rows:,} rows on the target")
        code = daemon.stop()
    watch.stop.set()
    watch.join()
    if code != 0:
        raise BenchError(f"cdcsync run exited with {code}:\n{daemon.log_tail()}")
    assert watch.full_at is not None
    partial = sorted({c for c in watch.counts if c not in (0, rows)})
    result = {
        "rows": rows,
        "source_write_s": round(committed - started, 2),
        "apply_s": round(watch.full_at - committed, 2),
        "rows_per_s_after_commit": round(rows / (watch.full_at - committed)),
        "peak_rss_mb": round(daemon.peak_rss_mb, 1),
        "target_samples": len(watch.counts),
        "partial_counts_seen": partial,
    }
    log(json.dumps(result))
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.bigtxn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=1, help="runs; medians shown")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.repeat < 1:
        parser.error("--rows and --repeat must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    runs: list[dict[str, Any]] = []
    try:
        with servers() as srv, tempfile.TemporaryDirectory(prefix="cdcsync-bigtxn-") as tmp:
            try:
                for _ in range(args.repeat):
                    runs.append(run_once(srv, args.rows, Path(tmp)))
            finally:
                drop_slot(srv.source_admin, SLOT)
                drop_database(srv.source_admin, SOURCE_DB)
                drop_database(srv.target_admin, TARGET_DB)
    except (BenchError, psycopg.Error) as exc:
        log(f"bench failed: {exc}")
        return 1
    summary = {
        "runs": len(runs), "rows": args.rows,
        "apply_s": median([r["apply_s"] for r in runs]),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "partial_counts_seen": sorted({c for r in runs for c in r["partial_counts_seen"]}),
    }
    if args.json:
        print(json.dumps({"summary": summary, "runs": runs}, indent=2))
    else:
        print(f"{args.rows:,} rows in one transaction, {len(runs)} run(s): time to apply after "
              f"COMMIT {summary['apply_s']:.2f} s (median), peak RSS {summary['peak_rss_mb']:.0f} "
              f"MB (max), partial states seen on the target: "
              f"{summary['partial_counts_seen'] or 'none'}")
    return 0 if not summary["partial_counts_seen"] else 2


if __name__ == "__main__":
    sys.exit(main())
