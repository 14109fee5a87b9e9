"""The CLI as a user runs it: kill -9 at random moments under load, SIGTERM, restart."""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path

import psycopg
import pytest

from cdcsync.model import Lsn
from tests.conftest import DbPair
from tests.harness import (
    BOTH_DECODERS,
    cli,
    converged,
    execute,
    start_daemon,
    wait_for,
    write_config,
    writer,
)

pytestmark = [pytest.mark.slow, BOTH_DECODERS]

SCHEMA = """
CREATE TABLE items (id int PRIMARY KEY, val int NOT NULL, note text,
                    updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE events (id bigint PRIMARY KEY, item int, payload jsonb);
"""


def _transaction(conn: psycopg.Connection[tuple[object, ...]], rng: random.Random) -> None:
    for _ in range(rng.randint(1, 20)):
        key = rng.randint(1, 300)
        roll = rng.random()
        if roll < 0.5:
            conn.execute(
                "INSERT INTO items (id, val, note) VALUES (%s, %s, %s) ON CONFLICT (id) "
                "DO UPDATE SET val = items.val + 1, updated_at = clock_timestamp()",
                (key, rng.randint(0, 9999), "n" * rng.randint(0, 50)))
        elif roll < 0.8:
            conn.execute("INSERT INTO events (id, item, payload) VALUES (%s, %s, %s) "
                         "ON CONFLICT DO NOTHING", (rng.getrandbits(48), key, '{"k": 1}'))
        else:
            conn.execute("DELETE FROM items WHERE id = %s", (key,))
    conn.commit()


class CheckpointWatch(threading.Thread):
    """Samples the target checkpoint; remembers every value it saw, in order."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.seen: list[Lsn] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.stop.is_set():
                row = conn.execute("SELECT lsn::text FROM cdcsync.checkpoint").fetchone()
                if row:
                    self.seen.append(Lsn.parse(row[0]))
                time.sleep(0.02)


def test_kill_minus_nine_under_load_converges(dbpair: DbPair, tmp_path: Path) -> None:
    """Repeated kill -9 during a workload: target equals source; checkpoint never went back."""
    execute(dbpair.source_dsn, SCHEMA)
    config = write_config(tmp_path / "cdcsync.toml", dbpair)
    setup = cli("setup", "--create-tables", config=config)
    assert setup.returncode == 0, setup.stderr
    log = tmp_path / "daemon.log"
    stop = threading.Event()
    writers = [writer(dbpair.source_dsn, stop, seed, _transaction, pause_s=0.002)
               for seed in range(2)]
    watch = CheckpointWatch(dbpair.target_dsn)
    for thread in (*writers, watch):
        thread.start()
    rng = random.Random(7)
    try:
        for _ in range(4):
            daemon = start_daemon(config, log)
            time.sleep(rng.uniform(0.5, 2.5))
            daemon.kill()
            daemon.wait()
    finally:
        stop.set()
        for w in writers:
            w.join()
    daemon = start_daemon(config, log)
    try:
        wait_for(converged(dbpair, ["public.items", "public.events"]), timeout=60,
                 what="convergence after kill -9")
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=10) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
        watch.stop.set()
        watch.join()
    assert len(watch.seen) > 20
    assert watch.seen == sorted(watch.seen), "the checkpoint moved backward"
    assert "Traceback" not in log.read_text()
    with psycopg.connect(dbpair.target_dsn) as conn:
        # Nothing edits the target here: a conflict would mean a re-delivered, already applied
        # transaction was applied again over newer rows.
        assert conn.execute("SELECT count(*) FROM cdcsync.conflicts").fetchone() == (0,)
