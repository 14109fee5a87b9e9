"""Shared pieces of cdcsync's benchmarks: servers, the daemon as a subprocess, RSS, polling.

Benchmarks run against two throwaway clusters from :mod:`cdcsync.localpg` unless given the DSNs of
existing servers. The daemon always runs as a separate process (``python -m cdcsync.cli run``)
with a TOML file written to a temporary directory, so its memory and CPU are its own and can be
measured or profiled (py-spy attaches to it by pid).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from bench import gcstats
from bench.cpu import status_number
from cdcsync import localpg


class BenchError(Exception):
    """A benchmark could not complete; the message says what was being waited for or done."""


@dataclass(frozen=True)
class Servers:
    """A source and a target server, each reached through an administrative DSN."""

    source_admin: str
    target_admin: str
    local: bool = False  # throwaway clusters: settings may be changed freely

    def source(self, dbname: str) -> str:
        return make_conninfo(self.source_admin, dbname=dbname)

    def target(self, dbname: str) -> str:
        return make_conninfo(self.target_admin, dbname=dbname)


@contextmanager
def servers(source_dsn: str | None = None, target_dsn: str | None = None) -> Iterator[Servers]:
    """The given servers, or two throwaway local clusters destroyed on exit."""
    if source_dsn or target_dsn:
        if not (source_dsn and target_dsn):
            raise BenchError("give both --source-dsn and --target-dsn, or neither")
        yield Servers(source_dsn, target_dsn)
        return
    print("starting two throwaway PostgreSQL clusters ...", file=sys.stderr, flush=True)
    with localpg.local_clusters() as (source, target):
        yield Servers(source.dsn(), target.dsn(), local=True)


@contextmanager
def target_server(target_dsn: str | None = None) -> Iterator[str]:
    """The given server's DSN, or one throwaway local cluster's (benches that need no source),
    destroyed on exit."""
    if target_dsn:
        yield target_dsn
        return
    print("starting a throwaway PostgreSQL cluster ...", file=sys.stderr, flush=True)
    with localpg.throwaway_clusters(("target", False)) as (cluster,):
        yield cluster.dsn()


def connect(dsn: str, *, autocommit: bool = True) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn, autocommit=autocommit, connect_timeout=10)


def execute(dsn: str, *statements: str | sql.Composed) -> None:
    """Run each statement in autocommit mode (CREATE DATABASE/SUBSCRIPTION need it)."""
    with connect(dsn) as conn:
        for statement in statements:
            conn.execute(statement.encode() if isinstance(statement, str) else statement)


def fetch_one(dsn: str, query: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
    with connect(dsn) as conn:
        row: tuple[Any, ...] | None = conn.execute(query.encode(), params).fetchone()
        return row


def recreate_database(admin_dsn: str, name: str) -> None:
    ident = sql.Identifier(name)
    execute(admin_dsn, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident),
            sql.SQL("CREATE DATABASE {}").format(ident))


def drop_database(admin_dsn: str, name: str) -> None:
    execute(admin_dsn, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
        sql.Identifier(name)))


def database_exists(admin_dsn: str, name: str) -> bool:
    return fetch_one(admin_dsn, "SELECT 1 FROM pg_database WHERE datname = %s", (name,)) \
        is not None


def drop_slot(admin_dsn: str, slot: str) -> None:
    """Drop the slot if it exists, terminating whichever walsender still holds it."""
    with connect(admin_dsn) as conn:
        conn.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                     "WHERE slot_name = %s AND active_pid IS NOT NULL", (slot,))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            row = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                               (slot,)).fetchone()
            if row is None:
                return
            if not row[0]:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                return
            time.sleep(0.1)
    raise BenchError(f"replication slot {slot!r} stayed active; drop it by hand")


def wait_until(predicate: Callable[[], bool], *, timeout: float, what: str,
               interval: float = 0.05) -> float:
    """Poll until ``predicate()``; return the monotonic time it first held."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.monotonic()
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def readyz(port: int, host: str = "127.0.0.1") -> dict[str, Any]:
    """The body of a daemon's ``/readyz`` on ``port`` (ready or not), or {} if none answers."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/readyz", timeout=2) as response:
            return dict(json.loads(response.read()))
    except urllib.error.HTTPError as err:
        return dict(json.loads(err.read()))
    except OSError:
        return {}


def streaming(port: int, host: str = "127.0.0.1") -> bool:
    """Whether the daemon answering on ``port`` is the active one and streams. Not the same as
    its slot being active: the slot's stream opens while the daemon still starts."""
    body = readyz(port, host)
    return body.get("role") == "active" and body.get("state") == "streaming"


def both_streaming(source: psycopg.Connection[Any], subscription: str, daemon: Daemon,
                   port: int) -> bool:
    """Whether the native ``subscription`` holds its slot on ``source`` and ``daemon``
    (answering on ``port``) streams; fails if the daemon has exited. Its slot being active is
    not enough: the daemon's stream opens while it still starts."""
    daemon.ensure_alive()
    row = source.execute("SELECT count(*) FROM pg_replication_slots WHERE active "
                         "AND slot_name = %s", (subscription,)).fetchone()
    return bool(row and row[0] == 1) and streaming(port)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def free_port() -> int:
    return localpg.free_port()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def to_toml(data: Mapping[str, Any]) -> str:
    """Scalars and arrays at the top, then one ``[section]`` per nested mapping."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, Mapping)]
    for key, section in data.items():
        if isinstance(section, Mapping):
            lines.append(f"\n[{key}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in section.items())
    return "\n".join(lines) + "\n"


class RssSampler(threading.Thread):
    """Samples a process's VmRSS every ``interval`` seconds; ``peak_kb`` also folds in VmHWM."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(name=f"rss-{pid}", daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak_kb = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def sample(self) -> None:
        for field in ("VmRSS", "VmHWM"):
            kb = status_number(self.pid, field)
            if kb is not None:
                self.peak_kb = max(self.peak_kb, kb)

    def finish(self) -> float:
        """Stop sampling (call while the process is still alive); return the peak in MB."""
        self.sample()
        self._stop_event.set()
        self.join(timeout=2)
        return self.peak_kb / 1024


class Daemon:
    """``cdcsync run`` as a subprocess: TOML config and JSON log in ``workdir``."""

    def __init__(self, config: Mapping[str, Any], workdir: Path, *, name: str = "cdcsync",
                 py_spy_output: Path | None = None, gc_stats: bool = False,
                 prefix: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.prefix = list(prefix)  # run through, as ``ip netns exec NAME``: it execs, same pid
        self.config_path = workdir / f"{name}.toml"
        self.log_path = workdir / f"{name}.log"
        self.config_path.write_text(to_toml(config))
        self.py_spy_output = py_spy_output
        # Where the daemon writes its collector's work as it exits (see bench.gcstats), if asked.
        self.gc_output = workdir / f"{name}-gc.json" if gc_stats else None
        self.proc: subprocess.Popen[bytes] | None = None
        self.rss: RssSampler | None = None
        self.peak_rss_mb = 0.0
        self._spy: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [*self.prefix, sys.executable, "-m", "cdcsync.cli", "--config",
               str(self.config_path), "run"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.gc_output is not None:
            self.gc_output.unlink(missing_ok=True)
            env.update(gcstats.environment(self.workdir, self.gc_output))
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=env)
        self.rss = RssSampler(self.proc.pid)
        self.rss.start()
        if self.py_spy_output is not None:
            self._start_py_spy(self.py_spy_output)

    def _start_py_spy(self, output: Path) -> None:
        assert self.proc is not None
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(exe).exists():
            raise BenchError("py-spy not found; pip install py-spy into the venv")
        self._spy = subprocess.Popen(
            [exe, "record", "--pid", str(self.proc.pid), "--format", "raw", "--threads",
             "--rate", "200", "--nonblocking", "-o", str(output)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=(self.workdir / "py-spy.log").open("ab"))

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchError("the daemon was not started")
        return self.proc.pid

    def ensure_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"cdcsync run exited with code {self.proc.returncode}:\n"
                             f"{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> int:
        """Stop profiling, record peak RSS, SIGTERM the daemon; return its exit code."""
        if self.proc is None:
            return 0
        if self._spy is not None:
            self._spy.send_signal(signal.SIGINT)
            try:
                self._spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._spy.kill()
            self._spy = None
        if self.rss is not None:
            self.peak_rss_mb = self.rss.finish()
            self.rss = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise BenchError(f"cdcsync run ignored SIGTERM for {timeout:.0f}s; killed it\n"
                                 f"{self.log_tail()}") from None
        return self.proc.returncode

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> Daemon:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with suppress(BenchError):
            self.stop()

