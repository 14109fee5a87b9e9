"""``cdcsync demo``: two throwaway clusters, a live workload, the sync and its lag.

Nothing to configure and nothing left behind: it starts a logical source and a target cluster
(:mod:`cdcsync.localpg`), creates ``customers`` and ``orders``, runs ``setup``, streams with the
daemon on a thread while a workload writes small transactions, shows throughput, lag and row
counts once a second, stages one conflict midway, then drains, verifies and tears everything down.
"""

from __future__ import annotations

import random
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TextIO

from psycopg import sql
from pydantic import SecretStr

from cdcsync import admin
from cdcsync.admin import Conn
from cdcsync.config import (
    ApplySettings,
    HttpSettings,
    Settings,
    SourceSettings,
    TargetSettings,
)
from cdcsync.daemon import DaemonThread
from cdcsync.demo_view import Frame, Lag, Meter, Screen, size
from cdcsync.dsn import describe
from cdcsync.errors import CdcsyncError, ConfigError
from cdcsync.localpg import LocalCluster, local_clusters
from cdcsync.model import Lsn
from cdcsync.verify.command import verify
from cdcsync.verify.report import VerifyReport

NAME = "cdcsync_demo"
TABLES = ("public.customers", "public.orders")
SEED_CUSTOMERS = 1_000
SEED_ORDERS = 2_000
# The workload never touches this customer, so the conflict staged on it stays exactly one.
CONFLICT_CUSTOMER = 1
TICK_S = 0.25
TICKS_PER_REFRESH = 4
DRAIN_TIMEOUT_S = 30.0
STOP_BUDGET_S = 15.0

SCHEMA = """
CREATE TABLE customers (
    id bigint PRIMARY KEY, name text, email text, tier text,
    updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE orders (
    id bigint PRIMARY KEY, customer_id bigint NOT NULL REFERENCES customers (id),
    amount numeric(12, 2), status text, updated_at timestamptz NOT NULL DEFAULT now());
"""
STATUSES = ("paid", "packed", "shipped", "delivered")
TIERS = ("bronze", "silver", "gold", "platinum")


def demo_settings(source: LocalCluster, target: LocalCluster) -> Settings:
    return Settings(
        tables=TABLES,
        source=SourceSettings(dsn=SecretStr(source.dsn()), slot=NAME, publication=NAME),
        target=TargetSettings(dsn=SecretStr(target.dsn())),
        apply=ApplySettings(max_delay_ms=50),
        # Any free port: the demo must not collide with a cdcsync already running here.
        http=HttpSettings(listen="127.0.0.1:0"),
    )


def _dsns(settings: Settings) -> tuple[str, str]:
    return settings.source.dsn.get_secret_value(), settings.target.dsn.get_secret_value()


class Workload(threading.Thread):
    """Small source transactions at about ``rate`` changes/s until stopped or ``seconds`` pass."""

    def __init__(self, dsn: str, rate: int, seconds: float) -> None:
        super().__init__(name="cdcsync-demo-workload", daemon=True)
        self.dsn, self.rate, self.seconds = dsn, rate, seconds
        self.stop = threading.Event()
        self.changes = 0
        self.error: BaseException | None = None
        self._rng = random.Random(7)
        self._next_customer = SEED_CUSTOMERS + 1
        self._next_order = SEED_ORDERS + 1

    def run(self) -> None:
        try:
            with admin.connect(self.dsn, "source") as conn:
                self._loop(conn)
        except BaseException as exc:
            self.error = exc

    def _loop(self, conn: Conn) -> None:
        # A few changes per transaction at high rates keeps the commit rate within one
        # connection's reach while transactions stay small.
        per_txn = max(1, min(20, self.rate // 200))
        started = time.monotonic()
        attempted = 0
        while not self.stop.is_set() and time.monotonic() - started < self.seconds:
            with conn.transaction():
                for _ in range(per_txn):
                    self.changes += self._change(conn)
            attempted += per_txn
            # Pace on the running total: per-transaction sleeps would drift below the rate.
            ahead = attempted / self.rate - (time.monotonic() - started)
            if ahead > 0:
                self.stop.wait(ahead)

    def _change(self, conn: Conn) -> int:
        """One row change; returns how many rows it touched (0 when it hit a deleted order)."""
        roll, rng = self._rng.random(), self._rng
        order = rng.randrange(1, self._next_order)
        if roll < 0.35:
            self._next_order += 1
            customer = rng.randrange(1, self._next_customer)
            amount = round(rng.uniform(5, 500), 2)
            cur = conn.execute("INSERT INTO orders (id, customer_id, amount, status) "
                               "VALUES (%s, %s, %s, 'new')",
                               (self._next_order - 1, customer, amount))
        elif roll < 0.65:
            cur = conn.execute("UPDATE orders SET status = %s, amount = amount + 1, "
                               "updated_at = now() WHERE id = %s", (rng.choice(STATUSES), order))
        elif roll < 0.75:
            self._next_customer += 1
            new = self._next_customer - 1
            cur = conn.execute("INSERT INTO customers (id, name, email, tier) "
                               "VALUES (%s, %s, %s, 'bronze')",
                               (new, f"customer {new}", f"customer{new}@example.com"))
        elif roll < 0.90:
            customer = rng.randrange(CONFLICT_CUSTOMER + 1, self._next_customer)
            cur = conn.execute("UPDATE customers SET tier = %s, updated_at = now() "
                               "WHERE id = %s", (rng.choice(TIERS), customer))
        else:
            cur = conn.execute("DELETE FROM orders WHERE id = %s", (order,))
        return max(cur.rowcount, 0)


def _raise_if_dead(runner: DaemonThread, workload: Workload | None) -> None:
    """Background failures end the demo loudly instead of freezing the view."""
    if runner.error is not None:
        if isinstance(runner.error, CdcsyncError):
            raise runner.error
        raise CdcsyncError(f"the daemon failed: {runner.error!r}") from runner.error
    if not runner.is_alive():
        raise CdcsyncError("the daemon stopped although nobody asked it to")
    if workload is not None and workload.error is not None:
        raise CdcsyncError(f"the demo workload failed: {workload.error}") from workload.error


@dataclass
class RunStats:
    """What the live view measured, for the final report."""

    lag_s: list[float] = field(default_factory=list)
    lag_bytes_max: int = 0
    workload_s: float = 0.0
    conflict_staged_at: float | None = None
    interrupted: bool = False

    def record(self, lag: Lag) -> None:
        if lag.seconds is not None:
            self.lag_s.append(lag.seconds)
        self.lag_bytes_max = max(self.lag_bytes_max, lag.bytes or 0)


def measure_lag(src: Conn, tgt: Conn) -> Lag:
    """Bytes: source WAL position minus the checkpoint. Seconds: age of the checkpoint's commit."""
    row = tgt.execute("SELECT lsn::text, extract(epoch FROM clock_timestamp() - commit_time) "
                      "FROM cdcsync.checkpoint WHERE slot = %s", (NAME,)).fetchone()
    if row is None:
        return Lag(None, None)
    current = src.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert current is not None
    behind = max(0, Lsn.parse(str(current[0])) - Lsn.parse(str(row[0])))
    return Lag(behind, float(row[1]) if row[1] is not None else None)


def _counts(conn: Conn) -> list[int]:
    row = conn.execute("SELECT (SELECT count(*) FROM customers), "
                       "(SELECT count(*) FROM orders)").fetchone()
    assert row is not None
    return [int(v) for v in row]


def _applied_rows(tgt: Conn) -> int:
    # Row counts miss updates; the table statistics count every insert, update and delete the
    # applier made (flushed by the server about once a second, good enough for a rate).
    row = tgt.execute("SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0) "
                      "FROM pg_stat_user_tables WHERE schemaname = 'public'").fetchone()
    return int(row[0]) if row else 0


def _conflicts(tgt: Conn) -> int:
    row = tgt.execute("SELECT count(*) FROM cdcsync.conflicts").fetchone()
    return int(row[0]) if row else 0


def stage_conflict(src: Conn, tgt: Conn) -> bool:
    """Edit a customer on the target one hour ahead, then older on the source; False (try again)
    while the seed rows have not reached the target yet."""
    cur = tgt.execute("UPDATE customers SET tier = 'edited on target', "
                      "updated_at = now() + interval '1 hour' WHERE id = %s", (CONFLICT_CUSTOMER,))
    if cur.rowcount != 1:
        return False
    src.execute("UPDATE customers SET tier = 'edited on source', updated_at = now() "
                "WHERE id = %s", (CONFLICT_CUSTOMER,))
    return True


def watch(settings: Settings, runner: DaemonThread, workload: Workload, screen: Screen,
          stats: RunStats) -> None:
    """The live view until the workload ends or Ctrl-C; lag is sampled every tick."""
    source_dsn, target_dsn = _dsns(settings)
    try:
        with admin.connect(source_dsn, "source") as src, \
                admin.connect(target_dsn, "target") as tgt:
            _watch_loop(src, tgt, runner=runner, workload=workload, screen=screen, stats=stats)
    except KeyboardInterrupt:
        stats.interrupted = True
        print("\ninterrupted: stopping the workload", file=screen.out, flush=True)


def _watch_loop(src: Conn, tgt: Conn, *, runner: DaemonThread, workload: Workload,
                screen: Screen, stats: RunStats) -> None:
    started = time.monotonic()
    meter = Meter(workload.changes, _applied_rows(tgt))
    tick = 0
    while workload.is_alive():
        workload.join(TICK_S)
        _raise_if_dead(runner, workload)
        elapsed = time.monotonic() - started
        stats.workload_s = elapsed
        lag = measure_lag(src, tgt)
        stats.record(lag)
        if (stats.conflict_staged_at is None and elapsed >= workload.seconds / 2
                and stage_conflict(src, tgt)):
            stats.conflict_staged_at = elapsed
            screen.note(f"{elapsed:.1f} s: customer {CONFLICT_CUSTOMER} edited on the target "
                        "(+1 hour), then older on the source")
        tick += 1
        if tick % TICKS_PER_REFRESH == 0 or not workload.is_alive():
            written, applied = meter.rates(workload.changes, _applied_rows(tgt))
            screen.show(Frame(TABLES, elapsed, workload.seconds, written, applied, lag,
                              _conflicts(tgt), _counts(src), _counts(tgt)))


@dataclass(frozen=True)
class TableCheck:
    """Count and order-independent row hash of one table on each side, conflicted keys left out."""

    table: str
    source: tuple[int, int]
    target: tuple[int, int]
    excluded: tuple[int, ...]

    @property
    def ok(self) -> bool:
        return self.source == self.target


def _digest(conn: Conn, table: str, excluded: tuple[int, ...]) -> tuple[int, int]:
    schema, _, name = table.partition(".")
    query = sql.SQL("SELECT count(*), coalesce(sum(hashtext(t::text)::bigint), 0) FROM {} t "
                    "WHERE NOT (t.id = ANY (%s))").format(sql.Identifier(schema, name))
    row = conn.execute(query, (list(excluded),)).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def compare(src: Conn, tgt: Conn) -> list[TableCheck]:
    """Both sides per table, leaving out keys in cdcsync.conflicts: there the target legitimately
    kept a newer row than the source's."""
    rows = tgt.execute("SELECT table_name, array_agg(DISTINCT (key->>'id')::bigint) "
                       "FROM cdcsync.conflicts GROUP BY table_name").fetchall()
    conflicted = {str(name): tuple(sorted(int(k) for k in keys)) for name, keys in rows}
    return [TableCheck(table, _digest(src, table, conflicted.get(table, ())),
                       _digest(tgt, table, conflicted.get(table, ())),
                       conflicted.get(table, ())) for table in TABLES]


@dataclass(frozen=True)
class Drained:
    """The last comparison, how long the drain waited, the conflicted customer's target tier."""

    checks: list[TableCheck]
    waited: float
    tier: str | None

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def drain(settings: Settings, runner: DaemonThread) -> Drained:
    """Wait (at most DRAIN_TIMEOUT_S) until both sides compare equal."""
    source_dsn, target_dsn = _dsns(settings)
    with admin.connect(source_dsn, "source") as src, admin.connect(target_dsn, "target") as tgt:
        # Row text feeds the hash: both sides must print timestamptz the same way.
        for conn in (src, tgt):
            conn.execute("SET TimeZone TO 'UTC'")
        started = time.monotonic()
        while True:
            _raise_if_dead(runner, None)
            checks = compare(src, tgt)
            waited = time.monotonic() - started
            if all(c.ok for c in checks) or waited >= DRAIN_TIMEOUT_S:
                break
            time.sleep(0.2)
        row = tgt.execute("SELECT tier FROM customers WHERE id = %s",
                          (CONFLICT_CUSTOMER,)).fetchone()
    return Drained(checks, waited, str(row[0]) if row else None)


def _conflict_verdict(stats: RunStats, tier: str | None) -> tuple[bool, str]:
    if stats.conflict_staged_at is None:
        return True, "conflict rule: not demonstrated (stopped before the midpoint)"
    if tier != "edited on target":
        return False, (f"conflict rule: FAILED, customer {CONFLICT_CUSTOMER} on the target is "
                       f"{tier!r}; the target's newer row should have survived")
    return True, (f"conflict rule: customer {CONFLICT_CUSTOMER} was edited on the target with "
                  "updated_at one hour ahead; the source's later but older-stamped update lost, "
                  "was logged in cdcsync.conflicts, and the target's newer row survived")


def _table_line(check: TableCheck) -> str:
    count = check.source[0]
    if check.ok:
        state = "in sync"
    else:
        state = f"DIFFERENT: source {count} rows, target {check.target[0]} rows"
        if count == check.target[0]:
            state += ", same count but the row hashes differ"
    if check.excluded:
        ids = ", ".join(map(str, check.excluded))
        state += f" (left out: id {ids}, where the target kept its newer row; see conflict rule)"
    return f"  {check.table:<18}{count:>8} rows  {state}"


def report(drained: Drained, stats: RunStats, workload: Workload, out: TextIO) -> bool:
    """Print the verdict; True when every table is in sync and the conflict rule held."""
    for check in drained.checks:
        if not check.ok:
            print(_table_line(check), file=out)
    conflict_ok, verdict = _conflict_verdict(stats, drained.tier)
    print(verdict, file=out)
    if stats.lag_s:
        p50, worst = statistics.median(stats.lag_s), max(stats.lag_s)
        print(f"lag: p50 {p50:.3f} s, max {worst:.3f} s over {len(stats.lag_s)} samples; "
              f"at most {size(stats.lag_bytes_max)} behind", file=out)
    rate = workload.changes / stats.workload_s if stats.workload_s else 0.0
    print(f"changes: {workload.changes} written by the workload in {stats.workload_s:.1f} s "
          f"({rate:.0f}/s), after {SEED_CUSTOMERS + SEED_ORDERS} seed rows"
          + ("; stopped early by Ctrl-C" if stats.interrupted else ""), file=out)
    ok = conflict_ok and drained.ok
    if ok:
        print(f"result: in sync (the target caught up {drained.waited:.1f} s after the workload "
              "stopped)", file=out)
    else:
        print(f"result: NOT in sync after waiting {drained.waited:.1f} s", file=out)
    return ok


def prepare(settings: Settings, out: TextIO) -> None:
    """Sample tables, setup, then the seed rows: inserted after the slot exists, the stream
    carries them to the target, so no initial snapshot is needed."""
    source_dsn, _ = _dsns(settings)
    with admin.connect(source_dsn, "source") as src:
        src.execute(SCHEMA)
    for line in admin.setup(settings, create_tables=True):
        print(f"setup: {line}", file=out)
    with admin.connect(source_dsn, "source") as src, src.transaction():
        src.execute("INSERT INTO customers (id, name, email, tier) "
                    "SELECT g, 'customer ' || g, 'customer' || g || '@example.com', "
                    "(ARRAY['bronze', 'silver', 'gold'])[1 + g %% 3] "
                    "FROM generate_series(1, %s) g", (SEED_CUSTOMERS,))
        src.execute("INSERT INTO orders (id, customer_id, amount, status) "
                    "SELECT g, 1 + g %% %s, round((random() * 500)::numeric, 2), 'new' "
                    "FROM generate_series(1, %s) g", (SEED_CUSTOMERS, SEED_ORDERS))
    print(f"seed: {SEED_CUSTOMERS} customers and {SEED_ORDERS} orders on the source", file=out)


def stream_and_verify(settings: Settings, seconds: float, rate: int, out: TextIO) -> bool:
    """Daemon and workload on threads, the live view, then drain and verify."""
    runner = DaemonThread(settings)
    workload = Workload(_dsns(settings)[0], rate, seconds)
    stats = RunStats()
    runner.start()
    try:
        workload.start()
        watch(settings, runner, workload, Screen(out), stats)
        workload.stop.set()
        workload.join(STOP_BUDGET_S)
        _raise_if_dead(runner, workload)
        print("workload stopped; waiting for the target to catch up", file=out, flush=True)
        drained = drain(settings, runner)
        print("running cdcsync verify on every table", file=out, flush=True)
        verified = verify(settings)
    finally:
        workload.stop.set()
        stopped = runner.close(STOP_BUDGET_S)
    if not stopped:
        print(f"warning: the daemon did not stop within {STOP_BUDGET_S:g} s", file=out)
    verify_ok = _verify_report(verified, drained, out)
    return report(drained, stats, workload, out) and verify_ok


def _verify_report(verified: VerifyReport, drained: Drained, out: TextIO) -> bool:
    """Print what `cdcsync verify` found; True when the only differences are the keys where the
    conflict rule kept the target's newer row."""
    for line in verified.lines():
        print(f"  {line}", file=out)
    kept = {c.table: {(str(k),) for k in c.excluded} for c in drained.checks}
    unexpected = [t.source_table for t in verified.tables
                  if t.differences.missing or t.differences.extra
                  or set(t.differences.differ) - kept.get(t.source_table, set())]
    if unexpected:
        print(f"verify: differences in {', '.join(unexpected)}", file=out)
        return False
    print("verify: every row equal, except where the conflict rule kept the target's newer row",
          file=out)
    return True


def run_demo(*, seconds: float, rate: int, out: TextIO | None = None) -> int:
    """The whole demo; 0 when the target verified equal to the source, else 1."""
    if seconds <= 0 or rate <= 0:
        raise ConfigError(f"--seconds and --rate must be positive (got {seconds:g} and {rate})")
    out = out or sys.stdout
    print("cdcsync demo: starting two throwaway PostgreSQL clusters", file=out, flush=True)
    with local_clusters() as (source, target):
        print(f"clusters in {source.root.parent}: source {describe(source.dsn())} "
              f"(wal_level=logical), target {describe(target.dsn())}", file=out)
        settings = demo_settings(source, target)
        prepare(settings, out)
        ok = stream_and_verify(settings, seconds, rate, out)
        for line in admin.teardown(settings):
            print(f"teardown: {line}", file=out)
    print("clusters stopped and removed", file=out)
    return 0 if ok else 1
