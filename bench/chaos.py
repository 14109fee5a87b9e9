"""Faults at random moments under a continuous workload; after each, catch-up time and verify.

A mixed workload (inserts, multi-row updates, deletes, multi-statement transactions on three
tables, one of them without a conflict column) runs on the source the whole time, from writer
threads that reconnect when the source goes away. ``cdcsync run`` runs as a subprocess. Faults,
in a shuffled order, each after a random pause:

* ``kill9``: SIGKILL the daemon, start it again;
* ``target_restart``: ``pg_ctl stop -m immediate`` on the target, then start it;
* ``source_restart``: the same on the source;
* ``walsender``: ``pg_terminate_backend`` of the walsender holding the slot;
* ``target_hang``: SIGSTOP the target postmaster and all its backends for ``hang_s`` seconds,
  then SIGCONT: the target's sockets stay open and silent, so only timeouts can notice;
* ``source_stall``: the link between the daemon and the source stops carrying bytes for
  ``hang_s`` seconds, its connections kept (the daemon reaches the source through a relay,
  :mod:`bench.relay`, which stalls): the source itself goes on, its writers too. The daemon's
  ``[source] receive_timeout_s`` is half the stall, so it must notice the silence, give the
  connection up and stream again once the link returns.
* ``target_link_dead``: the link between the daemon and the target (through a relay too)
  stops carrying bytes on every connection it has, for good, while new connections pass: a
  middlebox that lost track of its connections but keeps them open, its kernel acknowledging
  every packet, so TCP's timeouts never fire. The daemon's link watch
  (:mod:`cdcsync.link_watch`) must find the connections dead, end their sessions on the
  target and stream again on new ones.

After each fault the source's WAL insert position is read as soon as the fault is over (servers
answering, daemon restarted); "caught up" is the target checkpoint reaching it, and the recovery
time runs from injecting the fault to that moment. Then ``cdcsync verify`` compares every table
while the writers go on. Keys it reports are checked again with the writers paused and the target
caught up: a key still different then is a real divergence ("persisting"); one that agrees was a
change in flight (verify's live rechecks only run while a consumer holds the slot, and the daemon
briefly releases it while it reconnects after a fault). Once the workload stops, a last verify
must find no difference at all. If the daemon exits on its own,
it is started again, as its service manager would, and the exit is reported; a fault after which
it does not catch up within ``catchup_timeout_s`` is reported as needing a human.

The bounded version runs in the test suite (tests/acceptance/test_chaos.py).
Run: ``python -m bench.chaos [--per-kind 10] [--hang-s 15] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from bench.common import to_toml
from bench.relay import Relay
from cdcsync import admin, localpg
from cdcsync.config import Settings
from cdcsync.keyrange import Key
from cdcsync.verify.command import verify, verify_keys

KINDS = ("kill9", "target_restart", "source_restart", "walsender", "target_hang", "source_stall",
         "target_link_dead")
TABLES = ("public.accounts", "public.orders", "public.events")
SCHEMA = """
CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL, note text,
                       updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE orders (id bigint PRIMARY KEY, account int NOT NULL, amount numeric(12, 2),
                     status text NOT NULL,
                     updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE events (id bigint PRIMARY KEY, kind text NOT NULL, payload jsonb);
"""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the workload ---------------------------------------------------------------------------------

def _transaction(conn: psycopg.Connection[Any], rng: random.Random) -> None:
    for _ in range(rng.randint(1, 8)):
        roll = rng.random()
        key = rng.randint(1, 400)
        if roll < 0.3:
            conn.execute("INSERT INTO accounts (id, balance, note) VALUES (%s, %s, %s) "
                         "ON CONFLICT (id) DO UPDATE SET balance = accounts.balance + 1, "
                         "updated_at = clock_timestamp()",
                         (key, rng.randint(0, 10_000), "x" * rng.randint(0, 40)))
        elif roll < 0.45:
            conn.execute("UPDATE accounts SET balance = balance - 1, updated_at = clock_timestamp()"
                         " WHERE id BETWEEN %s AND %s", (key, key + rng.randint(0, 5)))
        elif roll < 0.65:
            conn.execute("INSERT INTO orders (id, account, amount, status) VALUES (%s, %s, %s, "
                         "'new') ON CONFLICT DO NOTHING",
                         (rng.randint(1, 3000), key, rng.randint(1, 99_999) / 100))
        elif roll < 0.75:
            conn.execute("UPDATE orders SET status = 'paid', updated_at = clock_timestamp() "
                         "WHERE account = %s", (key,))
        elif roll < 0.85:
            conn.execute("DELETE FROM orders WHERE id BETWEEN %s AND %s",
                         (key * 7, key * 7 + rng.randint(0, 3)))
        elif roll < 0.95:
            conn.execute("INSERT INTO events (id, kind, payload) VALUES (%s, %s, %s) "
                         "ON CONFLICT (id) DO UPDATE SET payload = excluded.payload",
                         (rng.randint(1, 5000), rng.choice("abc"), json.dumps({"k": key})))
        else:
            conn.execute("DELETE FROM accounts WHERE id = %s", (key,))
    conn.commit()


class Workload:
    """Writer threads that keep going across source restarts (they reconnect)."""

    def __init__(self, dsn: str, writers: int = 2, pause_s: float = 0.005) -> None:
        self.dsn, self.pause_s = dsn, pause_s
        self.stop = threading.Event()
        self.paused = threading.Event()
        self.committed = 0
        self.threads = [threading.Thread(target=self._loop, args=(seed,), daemon=True,
                                         name=f"chaos-writer-{seed}") for seed in range(writers)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)

    def _loop(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            try:
                with psycopg.connect(self.dsn, connect_timeout=5) as conn:
                    while not self.stop.is_set():
                        if self.paused.is_set():
                            time.sleep(0.05)
                            continue
                        try:
                            _transaction(conn, rng)
                            self.committed += 1
                        except psycopg.errors.DeadlockDetected:
                            conn.rollback()
                        time.sleep(self.pause_s)
            except psycopg.OperationalError:
                time.sleep(0.2)  # the source is restarting


# --- the daemon -----------------------------------------------------------------------------------

class DaemonProcess:
    """``cdcsync run`` as a subprocess that can be killed, and restarted like a service."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config, self.log_path = config, log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as sink:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cdcsync.cli", "--config", str(self.config), "run"],
                stdin=subprocess.DEVNULL, stdout=sink, stderr=sink,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def log_tail(self, lines: int = 10) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


# --- faults ---------------------------------------------------------------------------------------

def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # The command name in parentheses may hold spaces: the ppid follows the last ')'.
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def signal_all(pids: Sequence[int], sig: signal.Signals) -> None:
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, sig)


@contextmanager
def paused(postmaster: int) -> Iterator[None]:
    """The server stopped (SIGSTOP, the postmaster and every backend) until the block ends: its
    sockets stay open and silent."""
    pids = [postmaster, *children(postmaster)]
    signal_all(pids, signal.SIGSTOP)
    try:
        yield
    finally:
        signal_all(pids, signal.SIGCONT)


@dataclass
class Fault:
    kind: str
    at_s: float  # since the run started
    recovery_s: float | None = None  # from injecting to caught up; None: never caught up
    rows_compared: int = 0
    differences: int = 0  # keys the live verify reported
    persisting: int = 0  # of those, keys still different once the writers paused
    found: list[str] = field(default_factory=list)  # what verify reported, table by table
    slot_held: bool = True  # whether the daemon held the slot both before and after verify
    daemon_exits: list[str] = field(default_factory=list)


@dataclass
class ChaosReport:
    faults: list[Fault] = field(default_factory=list)
    transactions: int = 0
    seconds: float = 0.0
    final: Fault | None = None  # the check once the workload stopped and the target caught up

    def survived(self) -> dict[str, int]:
        return {k: sum(1 for f in self.faults if f.kind == k and f.recovery_s is not None
                       and f.persisting == 0) for k in KINDS}

    def needed_human(self) -> list[Fault]:
        return [f for f in self.faults if f.recovery_s is None]

    def summary(self) -> dict[str, Any]:
        recoveries = [f.recovery_s for f in self.faults if f.recovery_s is not None]
        return {
            "faults": {k: sum(1 for f in self.faults if f.kind == k) for k in KINDS},
            "survived": self.survived(),
            "source_transactions": self.transactions,
            "seconds": round(self.seconds, 1),
            "verify_runs": len(self.faults),
            "rows_compared": sum(f.rows_compared for f in self.faults),
            "differences_live": sum(f.differences for f in self.faults),
            "differences_persisting": sum(f.persisting for f in self.faults),
            "differences_found": [f"after {f.kind} at {f.at_s}s: {x}" for f in self.faults
                                  for x in f.found],
            "final_rows_compared": self.final.rows_compared if self.final else None,
            "final_differences": self.final.differences if self.final else None,
            "final_found": self.final.found if self.final else None,
            "longest_recovery_s": round(max(recoveries, default=0.0), 2),
            "longest_recovery_by_kind_s": {
                k: round(max((f.recovery_s for f in self.faults
                              if f.kind == k and f.recovery_s is not None), default=0.0), 2)
                for k in KINDS},
            "daemon_exits": [e for f in self.faults for e in f.daemon_exits],
            "needed_human": [asdict(f) for f in self.needed_human()],
        }


class Chaos:
    """Injects faults into one source/target cluster pair replicated by one daemon."""

    def __init__(self, settings: Settings, daemon: DaemonProcess, source: localpg.LocalCluster,
                 target: localpg.LocalCluster, source_link: Relay, *,
                 target_link: Relay, hang_s: float, catchup_timeout_s: float = 120.0,
                 gap_s: tuple[float, float] = (0.3, 1.5), seed: int = 9) -> None:
        self.settings, self.daemon = settings, daemon
        self.source_link, self.target_link = source_link, target_link
        self.source, self.target = source, target
        self.hang_s, self.catchup_timeout_s, self.gap_s = hang_s, catchup_timeout_s, gap_s
        self.rng = random.Random(seed)
        self._injected = time.monotonic()
        self.source_dsn = settings.source.dsn.get_secret_value()
        self.target_dsn = settings.target.dsn.get_secret_value()

    def run(self, per_kind: int, workload: Workload, kinds: Sequence[str] = KINDS,
            progress: Callable[[Fault], None] = lambda fault: None) -> ChaosReport:
        plan = [kind for kind in kinds for _ in range(per_kind)]
        self.rng.shuffle(plan)
        report = ChaosReport()
        self._injected = time.monotonic()
        if not self.catch_up(Fault("start", 0.0)):
            raise RuntimeError(f"cdcsync did not catch up before the first fault:\n"
                               f"{self.daemon.log_tail()}")
        started = time.monotonic()
        for kind in plan:
            time.sleep(self.rng.uniform(*self.gap_s))
            fault = Fault(kind, round(time.monotonic() - started, 2))
            report.faults.append(fault)
            self.inject(kind)
            if not self.catch_up(fault):
                break
            self.verify(fault, workload)
            progress(fault)
        report.seconds = time.monotonic() - started
        workload.close()
        report.transactions = workload.committed
        final = Fault("final", round(time.monotonic() - started, 2))
        self._injected = time.monotonic()
        if self.catch_up(final):
            self.verify(final)
        report.final = final
        return report

    def verify(self, fault: Fault, workload: Workload | None = None) -> None:
        """``cdcsync verify`` live; keys it reports are checked again with the writers paused."""
        held = self._slot_held()
        result = verify(self.settings)
        fault.slot_held = held and self._slot_held()
        fault.rows_compared = sum(t.rows_compared for t in result.tables)
        fault.differences = sum(t.differences.count for t in result.tables)
        fault.found = [f"{t.source_table}: missing {list(d.missing)[:5]}, extra "
                       f"{list(d.extra)[:5]}, different {list(d.differ)[:5]}"
                       for t in result.tables if (d := t.differences).count]
        if not fault.differences or workload is None:
            return
        # A key that no longer differs once nothing writes, and whose source row did not change
        # since verify reported it, was never lost: the target had it, verify's live reads raced
        # it. One that still differs is a real divergence.
        reported = time.time()
        workload.paused.set()
        try:
            self._injected = time.monotonic()
            self.catch_up(Fault("pause", 0.0))
            for table in result.tables:
                if table.differences.count:
                    still, note = self._classify(table.source_table, table.keys(), reported)
                    fault.persisting += still
                    fault.found.append(note)
        finally:
            workload.paused.clear()

    def _slot_held(self) -> bool:
        with psycopg.connect(self.source_dsn, autocommit=True) as conn:
            row = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                               (self.settings.source.slot,)).fetchone()
        return bool(row and row[0])

    def _classify(self, table: str, keys: Sequence[Key], reported: float) -> tuple[int, str]:
        still = verify_keys(self.settings, table, keys)
        changed = []
        if table != "public.events":
            with psycopg.connect(self.source_dsn, autocommit=True) as conn:
                for key in keys:
                    row = conn.execute(
                        sql.SQL("SELECT extract(epoch FROM updated_at) FROM {} WHERE id = %s")
                        .format(sql.Identifier(*table.split("."))), (key[0],)).fetchone()
                    if row is None or float(row[0]) >= reported:
                        changed.append(key)  # deleted, or written again
        return still.count, (f"{table}: with the writers paused, still different: "
                             f"{still.keys()}; source rows written or deleted since the report: "
                             f"{changed}")

    def inject(self, kind: str) -> None:
        self._injected = time.monotonic()
        if kind == "kill9":
            self.daemon.kill()
            self.daemon.start()
        elif kind == "target_restart":
            self.target.stop("immediate")
            self.target.start()
        elif kind == "source_restart":
            self.source.stop("immediate")
            self.source.start()
        elif kind == "walsender":
            self._terminate_walsender()
        elif kind == "target_hang":
            postmaster = self.target.pid()
            assert postmaster is not None, "the target is not running"
            with paused(postmaster):
                time.sleep(self.hang_s)
        elif kind == "source_stall":
            self.source_link.stall()
            try:
                time.sleep(self.hang_s)
            finally:
                self.source_link.resume()
        elif kind == "target_link_dead":
            self.target_link.freeze()
        else:
            raise ValueError(kind)

    def _terminate_walsender(self) -> None:
        slot = self.settings.source.slot
        deadline = time.monotonic() + self.catchup_timeout_s
        with psycopg.connect(self.source_dsn, autocommit=True) as conn:
            while time.monotonic() < deadline:
                row = conn.execute("SELECT pg_terminate_backend(active_pid) FROM "
                                   "pg_replication_slots WHERE slot_name = %s AND active",
                                   (slot,)).fetchone()
                if row and row[0]:
                    return
                time.sleep(0.05)

    def catch_up(self, fault: Fault) -> bool:
        """Wait until the target checkpoint passes the source position after the fault."""
        deadline = self._injected + self.catchup_timeout_s
        position = self._source_position(deadline)
        slot = self.settings.source.slot
        while time.monotonic() < deadline:
            code = self.daemon.exited()
            if code is not None:
                fault.daemon_exits.append(f"after {fault.kind} at {fault.at_s}s: exit {code}: "
                                          f"{self.daemon.log_tail(3)}")
                self.daemon.start()
            try:
                with psycopg.connect(self.target_dsn, autocommit=True, connect_timeout=5) as conn:
                    while time.monotonic() < deadline:
                        # The checkpoint moves to the slot's start before an initial copy is
                        # committed: caught up also needs every table copied.
                        row = conn.execute(
                            "SELECT lsn >= %s::pg_lsn AND NOT EXISTS (SELECT FROM "
                            "cdcsync.table_state s WHERE s.slot = c.slot AND state <> 'ready') "
                            "FROM cdcsync.checkpoint c WHERE slot = %s", (position, slot)
                        ).fetchone()
                        if row and row[0]:
                            fault.recovery_s = round(time.monotonic() - self._injected, 3)
                            return True
                        if self.daemon.exited() is not None:
                            break
                        time.sleep(0.05)
            except psycopg.OperationalError:
                time.sleep(0.2)
        return False

    def _source_position(self, deadline: float) -> str:
        while True:
            try:
                with psycopg.connect(self.source_dsn, autocommit=True, connect_timeout=5) as conn:
                    row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
                    assert row is not None
                    return str(row[0])
            except psycopg.OperationalError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)


# --- the benchmark --------------------------------------------------------------------------------

def daemon_source(dsn: str, link: Relay, hang_s: float) -> dict[str, Any]:
    """The daemon's ``[source]`` DSN and receive timeout: through ``link`` (see source_stall)."""
    return {"dsn": make_conninfo(dsn, host="127.0.0.1", port=link.port),
            "receive_timeout_s": hang_s / 2}


def daemon_target(dsn: str, link: Relay) -> str:
    """The daemon's target DSN: through ``link`` (see target_link_dead)."""
    return make_conninfo(dsn, host="127.0.0.1", port=link.port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-kind", type=int, default=10, help="faults of each kind")
    parser.add_argument("--hang-s", type=float, default=15.0,
                        help="how long the target stays stopped (SIGSTOP) per target_hang, "
                             "and the link to the source per source_stall")
    parser.add_argument("--catchup-timeout", type=float, default=180.0)
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--workdir", help="where the configuration and the daemon's log go "
                        "(default: a new temporary directory, kept)")
    args = parser.parse_args(argv)
    tmp = args.workdir or tempfile.mkdtemp(prefix="cdcsync-chaos-")
    Path(tmp).mkdir(parents=True, exist_ok=True)
    with localpg.local_clusters() as (source, target), Relay(source.port, 0.0) as link, \
            Relay(target.port, 0.0) as target_link:
        for cluster, dbname in ((source, "chaos"), (target, "chaos")):
            with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE {dbname}".encode())
        with psycopg.connect(source.dsn("chaos"), autocommit=True) as conn:
            conn.execute(SCHEMA.encode())
        config: dict[str, Any] = {
            "tables": list(TABLES),
            "source": {**daemon_source(source.dsn("chaos"), link, args.hang_s), "slot": "chaos",
                       "publication": "chaos"},
            "target": {"dsn": daemon_target(target.dsn("chaos"), target_link)},
            "http": {"listen": "127.0.0.1:0"},
            "log": {"format": "json"},
        }
        # The bench itself (setup, verify, catching up) reaches both servers directly.
        settings = Settings(**{**config, "source": {**config["source"],
                                                     "dsn": source.dsn("chaos")},
                               "target": {"dsn": target.dsn("chaos")}})
        admin.setup(settings, create_tables=True)
        config_path = Path(tmp) / "cdcsync.toml"
        config_path.write_text(to_toml(config))
        daemon = DaemonProcess(config_path, Path(tmp) / "cdcsync.log")
        workload = Workload(source.dsn("chaos"))
        workload.start()
        daemon.start()
        chaos = Chaos(settings, daemon, source, target, link, target_link=target_link,
                      hang_s=args.hang_s, catchup_timeout_s=args.catchup_timeout,
                      gap_s=(0.5, 3.0), seed=args.seed)
        try:
            report = chaos.run(args.per_kind, workload, args.kinds,
                               progress=lambda f: log(json.dumps(asdict(f))))
        finally:
            workload.close()
            daemon.stop()
            log(f"the daemon's log: {daemon.log_path}")
    summary = report.summary()
    print(json.dumps(summary, indent=2) if args.json else "\n".join(
        f"{key}: {value}" for key, value in summary.items()))
    ok = not summary["needed_human"] and summary["differences_persisting"] == 0 \
        and summary["final_differences"] == 0
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
