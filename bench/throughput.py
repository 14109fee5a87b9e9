"""Backlog drain throughput: native PostgreSQL logical replication against cdcsync.

For each scenario a backlog of changes is written on the source while both consumers are stopped,
then each consumer drains it alone (one after the other, never concurrently) on the same two
servers:

* native: ``CREATE SUBSCRIPTION ... WITH (enabled = false, create_slot = true, copy_data = false)``
  in the target database ``native`` before the backlog, ``ALTER SUBSCRIPTION ... ENABLE`` after it;
* cdcsync: ``cdcsync setup`` (slot and publication) before the backlog, ``cdcsync run`` as a
  subprocess after it, into the target database ``cdcsync``; with ``--decoder pgoutput wal2json``
  once per decoder, each with its own slot (created at the same position) and target database
  (``cdcsync_wal2json``), one after the other in the same run.

Drained means the consumer has applied the backlog's last transaction: its commit end LSN is past
``pg_current_wal_insert_lsn()`` taken inside that transaction just before COMMIT, and every applied
position (the native subscription's replication origin, cdcsync's checkpoint) is the end LSN of a
commit. Times are wall clock from starting the consumer; "drain" counts from the moment the
consumer holds its slot on the source (cdcsync's walsender starts while the daemon still loads,
see cdcsync.source.early, so its drain includes the rest of its start). After each drain both
targets are compared with the source on ``count(*)``, sums of ``id``, ``a`` and ``hashtext(b)``
and ``max(updated_at)``.

Scenarios (``--rows`` N, ``--txn-rows`` changes per source transaction):

* insert: N new rows;
* update: N rows loaded on all three databases before the slots exist, then each updated once;
* mix: N/2 rows preloaded; then N changes, per transaction half inserts, a third updates (a quarter
  of them hitting rows inserted by the previous transaction) and a sixth deletes;
* bigtxn: one transaction inserting ``--bigtxn-rows`` rows; cdcsync's peak RSS matters here.

Run: ``python -m bench.throughput --rows 50000 --repeat 3 [--decoder pgoutput wal2json]
[--json] [--py-spy DIR]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from bench import cpu, gcstats
from bench.common import (
    BenchError,
    Daemon,
    Servers,
    connect,
    database_exists,
    drop_database,
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
from cdcsync.model import ZERO_LSN, Lsn

SCENARIOS = ("insert", "update", "mix", "bigtxn")
SOURCE_DB = "bench"
NATIVE_DB = "native"
CDCSYNC_DB = "cdcsync"
PUBLICATION = "p"
SUBSCRIPTION = "native_sub"  # its slot on the source has the same name
CDCSYNC_SLOT = "cdcsync_bench"
DECODERS = ("pgoutput", "wal2json")
CDCSYNC_PUBLICATION = "cdcsync_bench"
TABLE_DDL = "CREATE TABLE bench (id bigint PRIMARY KEY, a int, b text, updated_at timestamptz)"
FINGERPRINT = ("SELECT count(*), coalesce(sum(id), 0), coalesce(sum(a), 0), "
               "coalesce(sum(hashtext(b)::bigint), 0), max(updated_at) FROM bench")

Statement = tuple[str, tuple[Any, ...]]


@dataclass
class Drain:
    """One consumer draining one backlog."""

    seconds: float  # from starting the consumer to drained
    drain_seconds: float  # from the consumer holding its slot to drained
    peak_rss_mb: float | None = None
    verified: bool = False
    spent: cpu.Spent | None = None  # per process role (local servers only)
    # From starting the consumer to its first transaction applied (within the 50 ms polls).
    first_apply_seconds: float | None = None
    gc: dict[str, Any] | None = None  # the daemon's collector's work (bench.gcstats), if asked

    @property
    def cpu_total(self) -> float | None:
        return None if self.spent is None else sum(self.spent.cpu_s.values())


@dataclass
class RunResult:
    scenario: str
    repetition: int
    changes: int
    transactions: int
    backlog_wal_mb: float
    generate_seconds: float
    order: str
    native: Drain
    cdcsync: dict[str, Drain]  # by decoder

    def ratio(self, decoder: str) -> float:
        """cdcsync rows/s divided by native rows/s: 1.0 is parity, 0.5 half as fast."""
        return self.native.seconds / self.cdcsync[decoder].seconds


@dataclass
class Workload:
    preload: int  # rows with ids 1..preload present everywhere before the slots exist
    changes: int
    transactions: list[list[Statement]] = field(default_factory=list)


def _insert(lo: int, hi: int) -> Statement:
    return ("INSERT INTO bench SELECT g, (g %% 1000)::int, md5(g::text), clock_timestamp() "
            "FROM generate_series(%s::bigint, %s::bigint) g", (lo, hi))


def _update(lo: int, hi: int) -> Statement:
    return ("UPDATE bench SET a = a + 1, b = md5(b), updated_at = clock_timestamp() "
            "WHERE id BETWEEN %s AND %s", (lo, hi))


def _delete(lo: int, hi: int) -> Statement:
    return ("DELETE FROM bench WHERE id BETWEEN %s AND %s", (lo, hi))


def workload(scenario: str, rows: int, txn_rows: int, bigtxn_rows: int) -> Workload:
    if scenario == "insert":
        txns = [[_insert(lo, min(lo + txn_rows - 1, rows))] for lo in range(1, rows + 1, txn_rows)]
        return Workload(0, rows, txns)
    if scenario == "update":
        txns = [[_update(lo, min(lo + txn_rows - 1, rows))] for lo in range(1, rows + 1, txn_rows)]
        return Workload(rows, rows, txns)
    if scenario == "bigtxn":
        return Workload(0, bigtxn_rows, [[_insert(1, bigtxn_rows)]])
    if scenario == "mix":
        return _mix(rows, txn_rows)
    raise ValueError(scenario)


def _mix(rows: int, txn_rows: int) -> Workload:
    count = max(1, rows // txn_rows)
    inserts, deletes = txn_rows // 2, txn_rows // 6
    updates = txn_rows - inserts - deletes
    fresh_updates = updates // 4  # rows the previous transaction inserted
    old_updates = updates - fresh_updates
    # Preloaded ids: updated ones in [1, count*old_updates], deleted ones right above them.
    preload = count * (old_updates + deletes)
    txns: list[list[Statement]] = []
    for k in range(count):
        new_lo = preload + k * inserts + 1
        upd_lo = k * old_updates + 1
        del_lo = count * old_updates + k * deletes + 1
        txn = [_insert(new_lo, new_lo + inserts - 1), _update(upd_lo, upd_lo + old_updates - 1)]
        if k > 0:
            prev_lo = new_lo - inserts
            txn.append(_update(prev_lo, prev_lo + fresh_updates - 1))
        txn.append(_delete(del_lo, del_lo + deletes - 1))
        txns.append(txn)
    changes = count * txn_rows - fresh_updates  # the first transaction has no fresh updates
    return Workload(preload, changes, txns)


# --- preparing the databases ----------------------------------------------------------------------

def reset(srv: Servers) -> None:
    """Remove what an earlier run left: the subscription, both slots, the three databases."""
    if database_exists(srv.target_admin, NATIVE_DB):
        with connect(srv.target(NATIVE_DB)) as conn:
            row = conn.execute("SELECT 1 FROM pg_subscription WHERE subname = %s",
                               (SUBSCRIPTION,)).fetchone()
            if row is not None:
                ident = sql.Identifier(SUBSCRIPTION)
                # Detach the remote slot so the drop works even if the source is gone.
                conn.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(ident))
                conn.execute(sql.SQL("ALTER SUBSCRIPTION {} SET (slot_name = NONE)").format(ident))
                conn.execute(sql.SQL("DROP SUBSCRIPTION {}").format(ident))
    for slot in (SUBSCRIPTION, *(slot_for(d) for d in DECODERS)):
        drop_slot(srv.source_admin, slot)
    drop_database(srv.target_admin, NATIVE_DB)
    for decoder in DECODERS:
        drop_database(srv.target_admin, database_for(decoder))
    drop_database(srv.source_admin, SOURCE_DB)


def slot_for(decoder: str) -> str:
    return CDCSYNC_SLOT if decoder == "pgoutput" else f"{CDCSYNC_SLOT}_{decoder}"


def database_for(decoder: str) -> str:
    return CDCSYNC_DB if decoder == "pgoutput" else f"{CDCSYNC_DB}_{decoder}"


def copy_table(source_dsn: str, target_dsn: str) -> None:
    with connect(source_dsn) as src, connect(target_dsn, autocommit=False) as tgt:
        with src.cursor().copy("COPY bench TO STDOUT (FORMAT binary)") as out, \
                tgt.cursor().copy("COPY bench FROM STDIN (FORMAT binary)") as into:
            for data in out:
                into.write(data)
        tgt.commit()


def cdcsync_config(srv: Servers, log_level: str, decoder: str) -> dict[str, Any]:
    return {
        "tables": ["public.bench"],
        "source": {"dsn": srv.source(SOURCE_DB), "slot": slot_for(decoder),
                   "publication": CDCSYNC_PUBLICATION, "decoder": decoder},
        "target": {"dsn": srv.target(database_for(decoder))},
        "http": {"listen": f"127.0.0.1:{free_port()}"},
        "log": {"level": log_level, "format": "json"},
        # Both consumers start from the same slot position over the same preloaded rows.
        "snapshot": {"mode": "never"},
    }


def prepare(srv: Servers, load: Workload, configs: dict[str, dict[str, Any]]) -> None:
    """Fresh databases, the table everywhere, the preload everywhere, then every slot."""
    reset(srv)
    recreate_database(srv.source_admin, SOURCE_DB)
    recreate_database(srv.target_admin, NATIVE_DB)
    for decoder in configs:
        recreate_database(srv.target_admin, database_for(decoder))
    source = srv.source(SOURCE_DB)
    targets = (srv.target(NATIVE_DB), *(srv.target(database_for(d)) for d in configs))
    for dsn in (source, *targets):
        execute(dsn, TABLE_DDL)
    if load.preload:
        execute(source, "INSERT INTO bench SELECT g, (g % 1000)::int, md5(g::text), "
                        f"now() - interval '1 day' FROM generate_series(1, {load.preload}) g")
        for dsn in targets:
            copy_table(source, dsn)
    for dsn in (source, *targets):
        execute(dsn, "VACUUM ANALYZE bench")
    execute(source, sql.SQL("CREATE PUBLICATION {} FOR TABLE bench").format(
        sql.Identifier(PUBLICATION)))
    execute(targets[0], sql.SQL(
        "CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION {} "
        "WITH (create_slot = true, copy_data = false, enabled = false)").format(
        sql.Identifier(SUBSCRIPTION), sql.Literal(source), sql.Identifier(PUBLICATION)))
    for config in configs.values():
        admin.setup(Settings(**config), create_tables=False)


def generate(source_dsn: str, load: Workload) -> tuple[str, str, float]:
    """Write the backlog; return (start LSN, marker LSN inside the last transaction, seconds)."""
    started = time.monotonic()
    with connect(source_dsn, autocommit=False) as conn:
        start = _insert_lsn(conn)
        conn.commit()
        marker = ""
        for i, txn in enumerate(load.transactions):
            for query, params in txn:
                conn.execute(query.encode(), params)
            if i == len(load.transactions) - 1:
                marker = _insert_lsn(conn)
            conn.commit()
    return start, marker, time.monotonic() - started


def _insert_lsn(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()
    assert row is not None
    return str(row[0])


def wal_mb(source_dsn: str, start: str, end: str) -> float:
    with connect(source_dsn) as conn:
        row = conn.execute("SELECT %s::pg_lsn - %s::pg_lsn", (end, start)).fetchone()
    return float(row[0]) / 2**20 if row else 0.0


# --- the two consumers ----------------------------------------------------------------------------

class Poller:
    """Cheap position checks on persistent connections, every 50 ms."""

    def __init__(self, srv: Servers, marker: str, timeout: float) -> None:
        self.source = connect(srv.source_admin)
        self.marker = marker
        self.timeout = timeout

    def close(self) -> None:
        self.source.close()

    def slot_active(self, slot: str) -> bool:
        row = self.source.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                                  (slot,)).fetchone()
        return bool(row and row[0])

    def progress(self, position: Callable[[], Lsn]) -> Callable[[], tuple[bool, bool]]:
        """What :meth:`wait` asks: whether the consumer's ``position`` has passed the one it
        has now, and the marker."""
        start, marker = position(), Lsn.parse(self.marker)

        def applied() -> tuple[bool, bool]:
            now = position()
            return now > start, now > marker
        return applied

    def wait(self, slot: str, applied: Callable[[], tuple[bool, bool]], what: str,
             alive: Callable[[], None]) -> Reached:
        """When the slot became active, when the consumer first applied a transaction and when
        it applied the whole backlog; ``applied()`` says whether it has passed its starting
        position, and the marker."""
        held: list[float] = []
        first: list[float] = []

        def connected() -> bool:
            alive()
            if not held and self.slot_active(slot):
                held.append(time.monotonic())
            return bool(held)

        def done() -> bool:
            connected()
            progressed, finished = applied()
            if progressed and not first:
                first.append(time.monotonic())
            return finished

        wait_until(connected, timeout=self.timeout, what=f"{what} to take slot {slot!r}")
        finished = wait_until(done, timeout=self.timeout,
                              what=f"{what} to apply the backlog up to LSN {self.marker}")
        return Reached(held[0], first[0] if first else finished, finished)


@dataclass(frozen=True)
class Reached:
    """Monotonic times: the consumer's slot active, its first transaction applied, the backlog
    applied."""

    held: float
    first: float
    finished: float


def native_position(conn: psycopg.Connection[Any]) -> Lsn:
    """How far the native subscription has applied (its replication origin), on ``conn`` to its
    target database."""
    row = conn.execute(
        "SELECT coalesce(s.remote_lsn, '0/0')::text FROM pg_replication_origin_status s "
        "JOIN pg_subscription sub ON s.external_id = 'pg_' || sub.oid "
        "WHERE sub.subname = %s", (SUBSCRIPTION,)).fetchone()
    return Lsn.parse(str(row[0])) if row else ZERO_LSN


def native_alive(conn: psycopg.Connection[Any]) -> None:
    """Fail if the native apply worker has failed (it would retry forever)."""
    row = conn.execute("SELECT apply_error_count FROM pg_stat_subscription_stats "
                       "WHERE subname = %s", (SUBSCRIPTION,)).fetchone()
    if row and row[0]:
        raise BenchError(f"the native apply worker failed {row[0]} times; "
                         "see the target server log")


def checkpoint_position(conn: psycopg.Connection[Any], slot: str) -> Lsn:
    """cdcsync's checkpoint for ``slot``, on ``conn`` to its target database."""
    row = conn.execute("SELECT lsn::text FROM cdcsync.checkpoint WHERE slot = %s",
                       (slot,)).fetchone()
    return Lsn.parse(str(row[0])) if row else ZERO_LSN


def drain_native(srv: Servers, poller: Poller) -> Drain:
    native = srv.target(NATIVE_DB)
    ident = sql.Identifier(SUBSCRIPTION)
    with connect(native) as conn:
        applied = poller.progress(lambda: native_position(conn))
        started = time.monotonic()
        conn.execute(sql.SQL("ALTER SUBSCRIPTION {} ENABLE").format(ident))
        try:
            reached = poller.wait(SUBSCRIPTION, applied, "the native subscription",
                                  lambda: native_alive(conn))
            pids = (cpu.native_pids(poller.source, conn, SUBSCRIPTION, SUBSCRIPTION)
                    if srv.local else None)
        finally:
            conn.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(ident))
    return Drain(reached.finished - started, reached.finished - reached.held,
                 spent=cpu.spent(pids),
                 first_apply_seconds=reached.first - started)


def drain_cdcsync(srv: Servers, poller: Poller, config: dict[str, Any], workdir: Path,
                  py_spy: Path | None, *, gc_stats: bool = False) -> Drain:
    decoder = config["source"]["decoder"]
    slot = slot_for(decoder)
    with connect(srv.target(database_for(decoder))) as conn:
        applied = poller.progress(lambda: checkpoint_position(conn, slot))
        daemon = Daemon(config, workdir, py_spy_output=py_spy, gc_stats=gc_stats)
        started = time.monotonic()
        with daemon:
            reached = poller.wait(slot, applied, f"cdcsync run ({decoder})", daemon.ensure_alive)
            pids = cpu.cdcsync_pids(poller.source, conn, daemon.pid, slot) if srv.local else None
            spent = cpu.spent(pids)
            code = daemon.stop()
        if code != 0:
            raise BenchError(f"cdcsync run exited with {code} after SIGTERM:\n{daemon.log_tail()}")
    gc = gcstats.read(daemon.gc_output) if daemon.gc_output is not None else None
    return Drain(reached.finished - started, reached.finished - reached.held,
                 peak_rss_mb=daemon.peak_rss_mb, spent=spent, gc=gc,
                 first_apply_seconds=reached.first - started)


def fingerprint(dsn: str) -> tuple[Any, ...]:
    with connect(dsn) as conn:
        row = conn.execute(FINGERPRINT).fetchone()
    assert row is not None
    return tuple(row)


def run_once(srv: Servers, scenario: str, repetition: int, args: argparse.Namespace,
             workdir: Path) -> RunResult:
    load = workload(scenario, args.rows, args.txn_rows, args.bigtxn_rows)
    configs = {d: cdcsync_config(srv, args.log_level, d) for d in args.decoder}
    log(f"[{scenario} #{repetition + 1}] preparing (preload {load.preload:,} rows)")
    prepare(srv, load, configs)
    source = srv.source(SOURCE_DB)
    log(f"[{scenario} #{repetition + 1}] writing the backlog: {load.changes:,} changes in "
        f"{len(load.transactions):,} transactions")
    start, marker, gen_s = generate(source, load)
    expected = fingerprint(source)
    for dsn in (source, srv.target(NATIVE_DB), *(srv.target(database_for(d)) for d in configs)):
        execute(dsn, "CHECKPOINT")
    # Alternate the order between repetitions, so neither consumer always drains a warm cache.
    native_first = repetition % 2 == 0
    decoders = list(configs) if native_first else list(reversed(configs))
    order = ["native", *decoders] if native_first else [*decoders, "native"]
    poller = Poller(srv, marker, args.timeout)
    drains: dict[str, Drain] = {}
    try:
        for consumer in order:
            log(f"[{scenario} #{repetition + 1}] draining with {consumer}")
            if consumer == "native":
                drains[consumer] = drain_native(srv, poller)
            else:
                py_spy = (Path(args.py_spy) / f"{scenario}-{consumer}-{repetition + 1}.txt"
                          if args.py_spy else None)
                drains[consumer] = drain_cdcsync(srv, poller, configs[consumer], workdir, py_spy)
    finally:
        poller.close()
    for consumer in order:
        got = fingerprint(srv.target(NATIVE_DB if consumer == "native" else
                                     database_for(consumer)))
        drains[consumer].verified = got == expected
        if got != expected:
            log(f"[{scenario} #{repetition + 1}] MISMATCH on {consumer}: source {expected}, "
                f"target {got}")
    result = RunResult(scenario, repetition + 1, load.changes, len(load.transactions),
                       round(wal_mb(source, start, marker), 1), round(gen_s, 2),
                       " then ".join(order), drains["native"],
                       {d: drains[d] for d in configs})
    log(f"[{scenario} #{repetition + 1}] native {result.native.seconds:.2f}s, " + ", ".join(
        f"cdcsync ({d}) {drain.seconds:.2f}s (peak RSS {drain.peak_rss_mb or 0:.0f} MB)"
        for d, drain in result.cdcsync.items()))
    return result


# --- reporting ------------------------------------------------------------------------------------

def summarise(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for scenario, decoder in dict.fromkeys((r.scenario, d) for r in results for d in r.cdcsync):
        runs = [r for r in results if r.scenario == scenario and decoder in r.cdcsync]
        changes = runs[0].changes
        native_s = median([r.native.seconds for r in runs])
        cdc_s = median([r.cdcsync[decoder].seconds for r in runs])
        rows.append({
            "scenario": scenario,
            "decoder": decoder,
            "rows": changes,
            "repeats": len(runs),
            "native_s": round(native_s, 3),
            "native_drain_s": round(median([r.native.drain_seconds for r in runs]), 3),
            "native_rows_per_s": round(changes / native_s),
            "cdcsync_s": round(cdc_s, 3),
            "cdcsync_drain_s": round(median([r.cdcsync[decoder].drain_seconds for r in runs]), 3),
            "cdcsync_rows_per_s": round(changes / cdc_s),
            "ratio": round(median([r.ratio(decoder) for r in runs]), 3),
            "cdcsync_peak_rss_mb": round(max(r.cdcsync[decoder].peak_rss_mb or 0.0
                                             for r in runs), 1),
            "verified": all(r.native.verified and r.cdcsync[decoder].verified for r in runs),
            **_cpu_columns("native", [r.native for r in runs]),
            **_cpu_columns("cdcsync", [r.cdcsync[decoder] for r in runs]),
        })
    return rows


def _cpu_columns(consumer: str, drains: Sequence[Drain]) -> dict[str, Any]:
    """Median CPU seconds of the drains, in all and per process role, and the median waits
    (voluntary context switches) per role."""
    measured = [d.spent.cpu_s for d in drains if d.spent is not None]
    if not measured:
        return {f"{consumer}_cpu_s": None, f"{consumer}_cpu_by_role": None,
                f"{consumer}_waits_by_role": None}
    waited = [d.spent.waits for d in drains if d.spent is not None]
    return {f"{consumer}_cpu_s": round(median([sum(m.values()) for m in measured]), 2),
            f"{consumer}_cpu_by_role": {role: round(median([m.get(role, 0.0) for m in measured]), 2)
                                        for role in measured[0]},
            f"{consumer}_waits_by_role": {role: round(median([w.get(role, 0) for w in waited]))
                                          for role in waited[0]} if waited else None}


COLUMNS = (
    ("scenario", "scenario", "{}"),
    ("decoder", "decoder", "{}"),
    ("rows", "rows", "{:,}"),
    ("native_s", "native s", "{:.2f}"),
    ("native_drain_s", "(drain)", "{:.2f}"),
    ("native_rows_per_s", "native rows/s", "{:,}"),
    ("cdcsync_s", "cdcsync s", "{:.2f}"),
    ("cdcsync_drain_s", "(drain)", "{:.2f}"),
    ("cdcsync_rows_per_s", "cdcsync rows/s", "{:,}"),
    ("ratio", "ratio", "{:.2f}"),
    ("native_cpu_s", "native CPU s", "{}"),
    ("cdcsync_cpu_s", "cdcsync CPU s", "{}"),
    ("cdcsync_peak_rss_mb", "peak RSS MB", "{:.0f}"),
    ("verified", "verified", "{}"),
)


def table(rows: Sequence[dict[str, Any]]) -> str:
    cells = [[title for _, title, _ in COLUMNS]]
    cells += [[fmt.format(row[key]) for key, _, fmt in COLUMNS] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                       enumerate(zip(r, widths, strict=True))) for r in cells]
    lines.insert(1, "-" * len(lines[0]))
    notes = ("s: wall time from starting the consumer to drained; (drain): from the consumer "
             "holding its slot; rows/s from the wall time; ratio: cdcsync rows/s / native rows/s "
             "(median of the per-run ratios); CPU s: CPU seconds of the consumer's processes "
             "(native: apply worker and walsender; cdcsync: daemon, its target connections and "
             "walsender), local servers only; peak RSS: the cdcsync process (max over runs)")
    return "\n".join(lines) + "\n" + notes


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=(*SCENARIOS, "all"), default="all")
    parser.add_argument("--rows", type=int, default=500_000, help="changes per backlog")
    parser.add_argument("--txn-rows", type=int, default=1_000, help="changes per transaction")
    parser.add_argument("--bigtxn-rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=1, help="runs per scenario; medians shown")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per wait")
    parser.add_argument("--source-dsn", help="use this server as the source (needs wal_level "
                        "logical); databases bench is dropped and recreated")
    parser.add_argument("--target-dsn", help="use this server as the target; databases native and "
                        "cdcsync are dropped and recreated")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--py-spy", metavar="DIR", help="profile the daemon with py-spy (raw "
                        "folded stacks, one file per run, written to DIR)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning"))
    parser.add_argument("--decoder", nargs="+", choices=DECODERS, default=["pgoutput"],
                        help="cdcsync's [source] decoder; several are drained one after the "
                        "other from the same backlog, each with its own slot")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.txn_rows < 6 or args.bigtxn_rows < 1 or args.repeat < 1:
        parser.error("--rows, --bigtxn-rows and --repeat must be positive, --txn-rows >= 6")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    scenarios = SCENARIOS if args.scenario == "all" else (args.scenario,)
    if args.py_spy:
        Path(args.py_spy).mkdir(parents=True, exist_ok=True)
    results: list[RunResult] = []
    try:
        with servers(args.source_dsn, args.target_dsn) as srv, \
                tempfile.TemporaryDirectory(prefix="cdcsync-bench-") as tmp:
            if srv.local:
                # The launcher starts an enabled subscription's worker at most once per
                # wal_retrieve_retry_interval (5 s): startup latency, not drain speed.
                execute(srv.target_admin,
                        "ALTER SYSTEM SET wal_retrieve_retry_interval = '100ms'",
                        "SELECT pg_reload_conf()")
            try:
                for scenario in scenarios:
                    for repetition in range(args.repeat):
                        results.append(run_once(srv, scenario, repetition, args, Path(tmp)))
            finally:
                reset(srv)
    except (BenchError, psycopg.Error) as exc:
        log(f"bench failed: {exc}")
        if results:
            log(table(summarise(results)))
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    summary = summarise(results)
    if args.json:
        print(json.dumps({"summary": summary, "runs": [
            {**asdict(r), "ratio": {d: round(r.ratio(d), 3) for d in r.cdcsync}}
            for r in results]}, indent=2))
    else:
        print(table(summary))
    return 0 if all(row["verified"] for row in summary) else 2


if __name__ == "__main__":
    sys.exit(main())
