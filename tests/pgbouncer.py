"""A PgBouncer in front of a test server: cdcsync's target reached through a connection pooler,
as a Neon ``-pooler`` host or Supabase's pooler would be."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from cdcsync.localpg import PG_USER, free_port

PoolMode = Literal["session", "transaction"]


def _binary() -> str:
    found = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer"
                                          if Path("/usr/sbin/pgbouncer").exists() else None)
    if found is None:
        pytest.skip("pgbouncer is not installed (make test installs it as root; otherwise "
                    "sudo apt-get install -y pgbouncer)")
    return found


@contextmanager
def pgbouncer(server_dsn: str, workdir: Path, *, pool_mode: PoolMode, ignore_options: bool,
              round_robin: bool = False) -> Iterator[str]:
    """Yield ``server_dsn`` reached through a PgBouncer in ``pool_mode``. PgBouncer refuses a
    client whose start-up packet carries session settings (``options``), as cdcsync's do;
    ``ignore_options`` drops them instead, as some deployments configure. ``round_robin``
    lends the server session idle longest, not the one used last."""
    server = {k: str(v) for k, v in conninfo_to_dict(server_dsn).items() if v is not None}
    user = server.get("user", PG_USER)
    target = " ".join(f"{k}={server[k]}" for k in ("host", "port", "dbname", "user", "password")
                      if k in server)
    port = free_port()
    config = workdir / "pgbouncer.ini"
    (workdir / "users.txt").write_text(f'"{user}" ""\n')
    config.write_text(
        f"[databases]\npooled = {target}\n"
        f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {workdir / 'users.txt'}\npool_mode = {pool_mode}\n"
        "default_pool_size = 4\nmax_client_conn = 200\nlogfile =\npidfile =\n"
        + ("ignore_startup_parameters = options,extra_float_digits\n" if ignore_options else "")
        + f"server_round_robin = {int(round_robin)}\n")
    # PgBouncer refuses to run as root: it reads its files, then switches to PostgreSQL's user.
    command = [_binary(), *(["-u", PG_USER] if os.geteuid() == 0 else []), str(config)]
    log = workdir / "pgbouncer.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=sink)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"pgbouncer did not start:\n{log.read_text()}") from None
                time.sleep(0.05)
        yield make_conninfo("", host="127.0.0.1", port=port, dbname="pooled", user=user,
                            **({"password": server["password"]} if "password" in server else {}))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
