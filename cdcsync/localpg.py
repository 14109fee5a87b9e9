"""Throwaway local PostgreSQL clusters for tests, benchmarks and ``cdcsync demo``.

A cluster lives entirely in one directory (data, Unix socket, log), listens on 127.0.0.1 with
trust authentication and is tuned for speed, not durability: never point it at data you keep.

PostgreSQL refuses to run as root, so when we are root every ``initdb``/``pg_ctl`` goes through
``runuser -u postgres --`` and the cluster directory is handed to the postgres user.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from psycopg.conninfo import make_conninfo

from cdcsync.errors import PrerequisiteError

INSTALL_FIX = "apt-get update && apt-get install -y postgresql-15 (Debian 12, as root)"
PG_USER = "postgres"

StopMode = Literal["smart", "fast", "immediate"]

_BASE_CONF: dict[str, str] = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    # Synchronous commit stays on: with it off, `pg_ctl stop -m immediate` loses commits the
    # client was told succeeded (the target forgets applied batches and its checkpoint), and the
    # walsender holds back WAL that is not yet flushed. fsync=off keeps commits cheap anyway.
    "full_page_writes": "off",
    "shared_buffers": "128MB",
    "max_connections": "100",
}
_LOGICAL_CONF: dict[str, str] = {
    "wal_level": "logical",
    "max_replication_slots": "20",
    "max_wal_senders": "20",
    "wal_sender_timeout": "60s",
}
# The benchmark runs native subscriptions on the target, which need slots and apply workers there.
_TARGET_CONF: dict[str, str] = {
    "max_replication_slots": "10",
    "max_worker_processes": "16",
    "max_logical_replication_workers": "8",
}
_CONF_FILE = "cdcsync.conf"
_PORT_ATTEMPTS = 3


def find_pg_bin() -> Path:
    """The newest PostgreSQL server bin directory: Debian's layout first, then PATH."""
    candidates = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")]
    numbered = [p for p in candidates if p.parent.name.isdigit()]
    if numbered:
        return max(numbered, key=lambda p: int(p.parent.name))
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    raise PrerequisiteError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found", fix=INSTALL_FIX
    )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now; another process may still take it before we do."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _as_root() -> bool:
    return os.geteuid() == 0


def _alive(pid: int) -> bool:
    # A killed postmaster stays a zombie until reaped, and kill(pid, 0) still succeeds on it.
    if Path("/proc/self/stat").exists():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[-1].split()[0] != "Z"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _give_to_postgres(path: Path) -> None:
    if not _as_root():
        return
    try:
        pw = pwd.getpwnam(PG_USER)
    except KeyError as exc:
        raise PrerequisiteError(
            f"running as root but there is no {PG_USER!r} user to run PostgreSQL as",
            fix=INSTALL_FIX,
        ) from exc
    os.chown(path, pw.pw_uid, pw.pw_gid)  # os.walk skips a plain file
    for dirpath, _dirs, files in os.walk(path):
        os.chown(dirpath, pw.pw_uid, pw.pw_gid)
        for f in files:
            os.chown(os.path.join(dirpath, f), pw.pw_uid, pw.pw_gid)


def _conf_line(key: str, value: str) -> str:
    escaped = value.replace("'", "''")
    return f"{key} = '{escaped}'\n"


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class LocalCluster:
    """One PostgreSQL cluster in ``root``; data in ``root/data``, socket and log in ``root``."""

    name: str
    root: Path
    port: int
    bin_dir: Path
    logical: bool

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root

    @property
    def log_file(self) -> Path:
        return self.root / "postgres.log"

    def dsn(self, dbname: str = "postgres", user: str = PG_USER) -> str:
        """A libpq conninfo over TCP: the path a real deployment takes."""
        return make_conninfo("", host="127.0.0.1", port=self.port, user=user, dbname=dbname)

    def pid(self) -> int | None:
        """The postmaster's pid from ``postmaster.pid``, or None when there is none."""
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first)
        except (OSError, ValueError):
            return None

    def is_running(self) -> bool:
        pid = self.pid()
        return pid is not None and _alive(pid)

    def start(self) -> None:
        self._clear_stale_locks()
        self._pg_ctl("start", "-l", str(self.log_file))

    def stop(self, mode: StopMode = "fast") -> None:
        self._pg_ctl("stop", "-m", mode)

    def restart(self) -> None:
        self._pg_ctl("restart", "-m", "fast", "-l", str(self.log_file))

    def destroy(self) -> None:
        """Stop without a checkpoint and delete everything; safe to call twice."""
        if self.is_running():
            with suppress(PrerequisiteError):
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def write_conf(self, settings: Mapping[str, str]) -> None:
        """Replace our settings file (included from postgresql.conf); takes effect on restart."""
        path = self.data_dir / _CONF_FILE
        path.write_text("".join(_conf_line(k, v) for k, v in settings.items()))
        _give_to_postgres(path)

    def _clear_stale_locks(self) -> None:
        # PostgreSQL removes lock files of a dead postmaster itself, but takes an unreaped zombie
        # (a kill -9 under an init that does not reap) for a live one and refuses to start.
        pid = self.pid()
        if pid is None or _alive(pid):
            return
        for lock in (
            self.data_dir / "postmaster.pid",
            self.socket_dir / f".s.PGSQL.{self.port}.lock",
        ):
            lock.unlink(missing_ok=True)

    def _pg_ctl(self, action: str, *args: str) -> None:
        cmd = [str(self.bin_dir / "pg_ctl"), action, "-D", str(self.data_dir), "-w", "-t", "60"]
        _run([*cmd, *args], f"pg_ctl {action} ({self.name})", cwd=self.root, log=self.log_file)


def _run(cmd: list[str], what: str, *, cwd: Path, log: Path | None = None) -> None:
    if _as_root():
        cmd = ["runuser", "-u", PG_USER, "--", *cmd]
    proc = subprocess.run(
        cmd, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
    )
    if proc.returncode == 0:
        return
    output = (proc.stdout + proc.stderr).strip()
    details = f"{output}\n--- {log} (tail) ---\n{_tail(log)}" if log else output
    raise PrerequisiteError(
        f"{what} failed with exit code {proc.returncode}:\n{details}\n",
        fix=f"read the output above; the cluster is in {cwd}",
    )


@dataclass(frozen=True)
class TlsFiles:
    """A server certificate (PEM, with any intermediates) and its private key."""

    cert: Path
    key: Path


def _install_tls(cluster: LocalCluster, tls: TlsFiles) -> dict[str, str]:
    """Copy the certificate and key into the cluster; the settings that serve them."""
    cert, key = cluster.root / "server.crt", cluster.root / "server.key"
    shutil.copyfile(tls.cert, cert)
    shutil.copyfile(tls.key, key)
    key.chmod(0o600)  # the server refuses a key others can read
    _give_to_postgres(cert)
    _give_to_postgres(key)
    return {"ssl": "on", "ssl_cert_file": str(cert), "ssl_key_file": str(key)}


def create_cluster(
    base_dir: Path,
    name: str,
    *,
    logical: bool,
    extra_conf: Mapping[str, str] | None = None,
    tls: TlsFiles | None = None,
) -> LocalCluster:
    """initdb and start a cluster in ``base_dir/name``; ``base_dir`` must exist. With ``tls``
    the server also accepts TLS connections with that certificate."""
    bin_dir = find_pg_bin()
    root = base_dir / name
    root.mkdir(mode=0o755)
    _give_to_postgres(root)
    cluster = LocalCluster(name=name, root=root, port=free_port(), bin_dir=bin_dir, logical=logical)
    initdb = [
        str(bin_dir / "initdb"),
        *("-D", str(cluster.data_dir), "-U", PG_USER, "--auth=trust"),
        *("--encoding=UTF8", "--locale=C", "--no-sync"),
    ]
    _run(initdb, f"initdb ({name})", cwd=root)
    with (cluster.data_dir / "postgresql.conf").open("a") as f:
        f.write(f"\ninclude '{_CONF_FILE}'\n")

    settings = {
        **_BASE_CONF,
        **(_LOGICAL_CONF if logical else _TARGET_CONF),
        "unix_socket_directories": str(cluster.socket_dir),
    }
    settings.update(extra_conf or {})
    if tls is not None:
        settings.update(_install_tls(cluster, tls))
    for attempt in range(_PORT_ATTEMPTS):
        # free_port() cannot reserve the port; if another process took it meanwhile, pick again.
        cluster.write_conf({**settings, "port": str(cluster.port)})
        try:
            cluster.start()
            return cluster
        except PrerequisiteError:
            lost_race = re.search(r"could not (bind|create any TCP)", _tail(cluster.log_file))
            if not lost_race or attempt == _PORT_ATTEMPTS - 1:
                if cluster.is_running():  # pg_ctl gave up waiting but the server came up late
                    cluster.destroy()
                raise
            cluster.port = free_port()
    raise AssertionError("unreachable")


def create_standby(primary: LocalCluster, base_dir: Path, name: str) -> LocalCluster:
    """A physical standby of ``primary`` (``pg_basebackup -R``, streaming from it), started in
    ``base_dir/name``: a read replica, as a user may point cdcsync at by mistake."""
    root = base_dir / name
    root.mkdir(mode=0o755)
    _give_to_postgres(root)
    standby = LocalCluster(name=name, root=root, port=free_port(), bin_dir=primary.bin_dir,
                           logical=primary.logical)
    _run([str(primary.bin_dir / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(primary.port),
          "-U", PG_USER, "-D", str(standby.data_dir), "-R", "--no-sync", "--checkpoint=fast"],
         f"pg_basebackup ({name})", cwd=root)
    standby.write_conf({**_BASE_CONF, **(_LOGICAL_CONF if primary.logical else _TARGET_CONF),
                        "unix_socket_directories": str(root), "port": str(standby.port)})
    standby.start()
    return standby


@contextmanager
def throwaway_dir(base_dir: Path | None = None) -> Iterator[Path]:
    """Yield ``base_dir`` as it is; without it, a new temporary directory the ``postgres`` user
    can reach, removed on exit (clusters made in it must be destroyed first)."""
    if base_dir is not None:
        yield base_dir
        return
    base = Path(tempfile.mkdtemp(prefix="cdcsync-pg-"))
    try:
        # mkdtemp makes it 0700; the postgres user has to reach the cluster directories inside.
        base.chmod(0o755)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def throwaway_clusters(*specs: tuple[str, bool], base_dir: Path | None = None
                       ) -> Iterator[list[LocalCluster]]:
    """Yield a running cluster per ``(name, logical)`` spec, in order, all destroyed on exit even
    after an error. Without ``base_dir`` a temporary directory is used and removed afterwards.
    """
    with throwaway_dir(base_dir) as base:
        made: list[LocalCluster] = []
        try:
            for name, logical in specs:
                made.append(create_cluster(base, name, logical=logical))
            yield made
        finally:
            for cluster in made:
                cluster.destroy()


@contextmanager
def local_clusters(base_dir: Path | None = None) -> Iterator[tuple[LocalCluster, LocalCluster]]:
    """Yield running ``(source, target)`` clusters, destroyed on exit even after an error.

    Without ``base_dir`` a temporary directory is used and removed afterwards.
    """
    with throwaway_clusters(("source", True), ("target", False), base_dir=base_dir) as made:
        yield made[0], made[1]
