"""START_REPLICATION waits for its answer on the socket, not in libpq with the interpreter lock
held: while the source takes its time, the daemon's other threads (health, the systemd
watchdog, the lock's keeper, the start's imports) go on. Real servers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cdcsync import admin
from tests.conftest import DbPair
from tests.harness import execute, settings_for

ROOT = Path(__file__).resolve().parents[2]

# Starts the slot's stream through a relay running on a thread of the same process: the relay
# forwards only while the interpreter lock is free.
_THROUGH_RELAY = """
import sys
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from bench.relay import Relay
from cdcsync.model import ZERO_LSN
from cdcsync.source import pgoutput
from cdcsync.source.replication import ReplicationStream

dsn, slot, publication = sys.argv[1:4]
with Relay(int(conninfo_to_dict(dsn)["port"]), 0.0) as relay:
    stream = ReplicationStream(make_conninfo(dsn, host="127.0.0.1", port=relay.port), slot)
    stream.start(ZERO_LSN, pgoutput.options(publication, binary=True))
    print("streaming", stream.backend_pid is not None)
    stream.close()
"""


def test_start_replication_waits_without_the_interpreter_lock(dbpair: DbPair) -> None:
    execute(dbpair.source_dsn, "CREATE TABLE IF NOT EXISTS t (id int PRIMARY KEY)")
    admin.setup(settings_for(dbpair), create_tables=True)
    done = subprocess.run(
        [sys.executable, "-c", _THROUGH_RELAY, dbpair.source_dsn, dbpair.slot,
         dbpair.publication], check=False, cwd=ROOT, capture_output=True, text=True,
        timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "streaming True"
