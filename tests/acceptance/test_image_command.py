"""The container's exact command (ENTRYPOINT + CMD, its ENV, configuration by environment
variables only, no file) against the real clusters, and its HEALTHCHECK command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cdcsync.localpg import free_port
from tests.conftest import DbPair
from tests.dockerfile import exec_form, stages
from tests.harness import converged, execute, wait_for

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent  # the image puts its venv's bin first on PATH


def _image_env(pair: DbPair, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDCSYNC_")}
    image = stages()[-1].env()
    image.pop("PATH")
    env.update(image)
    env.update({
        "PATH": f"{BIN}:{env.get('PATH', '')}",
        "CDCSYNC_HTTP__LISTEN": f"0.0.0.0:{port}",  # the image's port may be taken here
        "CDCSYNC_TABLES": json.dumps(["public.*"]),
        "CDCSYNC_SOURCE__DSN": pair.source_dsn,
        "CDCSYNC_SOURCE__SLOT": pair.slot,
        "CDCSYNC_SOURCE__PUBLICATION": pair.publication,
        "CDCSYNC_TARGET__DSN": pair.target_dsn,
    })
    return env


def test_image_command_streams(dbpair: DbPair, tmp_path: Path) -> None:
    """`cdcsync setup --create-tables` then `cdcsync run` as the image runs them; the
    HEALTHCHECK passes while it runs; SIGTERM (docker stop) exits 0."""
    runtime = stages()[-1]
    entrypoint = exec_form(runtime.last("ENTRYPOINT"))
    command = exec_form(runtime.last("CMD"))
    check = runtime.last("HEALTHCHECK")
    healthcheck = exec_form(check[check.index("CMD ") + 4:])
    env = _image_env(dbpair, free_port())
    execute(dbpair.source_dsn, "CREATE TABLE c (id int PRIMARY KEY, v text)")
    setup = subprocess.run([*entrypoint, "setup", "--create-tables"], env=env,
                           capture_output=True, text=True, timeout=60, check=False)
    assert setup.returncode == 0, setup.stderr
    log = tmp_path / "container.log"
    with log.open("wb") as sink:
        daemon = subprocess.Popen([*entrypoint, *command], env=env, stdout=sink, stderr=sink)
    try:
        execute(dbpair.source_dsn, "INSERT INTO c SELECT g, 'v' || g FROM generate_series(1, 50) g")
        wait_for(converged(dbpair, ["public.c"]), timeout=60, what="the insert to arrive")
        probe = subprocess.run(healthcheck, env=env, capture_output=True, text=True, timeout=10,
                               check=False)
        assert probe.returncode == 0, probe.stderr
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=10) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
    lines = log.read_text().splitlines()
    assert lines and all(line.startswith("{") for line in lines), "the image logs JSON"
    # The probe fails once nothing listens: a dead container is reported unhealthy.
    down = subprocess.run(healthcheck, env=env, capture_output=True, text=True, timeout=10,
                          check=False)
    assert down.returncode != 0
