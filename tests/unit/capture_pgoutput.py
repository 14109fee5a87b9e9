"""Capture real pgoutput bytes from a throwaway PostgreSQL 15 into data/pgoutput_capture.json.

Run manually, as root, when the fixture needs regenerating (the unit tests only read the JSON):

    /work/main/.venv/bin/python tests/unit/capture_pgoutput.py

It initdb's a cluster in a temporary directory (owned by ``postgres``; wal_level=logical,
fsync=off, a free port, socket in the same directory), creates the tables below, a publication
and a pgoutput slot, runs the changes the decoder tests expect, reads them back with
``pg_logical_slot_get_binary_changes`` (proto_version 1, messages on), writes
``[{"lsn": "0/1A2B", "hex": "42..."}, ...]`` and stops and deletes the cluster.

The ``items.big`` value is 3,000 random hex characters with ``STORAGE EXTERNAL``, so it lives out
of line in TOAST and an update that does not touch it sends it as 'u' (unchanged).
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg

BIN = Path("/usr/lib/postgresql/15/bin")
OUT = Path(__file__).parent / "data" / "pgoutput_capture.json"

SETUP = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE items (
    id int PRIMARY KEY,
    name text,
    big text,
    amount numeric(12, 2),
    flag bool,
    doc jsonb,
    uid uuid,
    blob bytea,
    at timestamptz,
    nums int[],
    feeling mood
);
ALTER TABLE items ALTER COLUMN big SET STORAGE EXTERNAL;
CREATE TABLE events (id bigint, kind text, score int, note text);
ALTER TABLE events REPLICA IDENTITY FULL;
CREATE PUBLICATION pub FOR TABLE items, events;
SELECT pg_create_logical_replication_slot('cap', 'pgoutput');
SELECT pg_replication_origin_create('upstream');
"""

CHANGES = [
    # 1: full row + a row of NULLs
    """INSERT INTO items VALUES
        (42, 'answer', %(big)s, 1234.50, true, '{"a": [1, 2], "b": null}',
         'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\\xdeadbeef', '2024-02-29 12:34:56.789+00',
         '{1,2,3}', 'happy'),
        (7, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)""",
    # 2: update leaving the TOASTed column alone
    "UPDATE items SET name = 'renamed', flag = false WHERE id = 42",
    # 3: primary-key change
    "UPDATE items SET id = 8 WHERE id = 7",
    # 4: REPLICA IDENTITY FULL table
    "INSERT INTO events VALUES (1, 'click', 10, 'first'), (2, 'view', NULL, 'second')",
    "UPDATE events SET score = 11 WHERE id = 1",
    # 6: deletes on both tables
    "DELETE FROM items WHERE id = 8",
    "DELETE FROM events WHERE id = 2",
    # 8: truncate both in one statement
    "TRUNCATE items, events",
    # 9: logical messages
    "SELECT pg_logical_emit_message(true, 'cdcsync', 'hello')",
    "SELECT pg_logical_emit_message(false, 'cdcsync', 'outside')",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def as_postgres(*args: str) -> None:
    subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True)


def big_value() -> str:
    rng = random.Random(20240229)
    return "".join(rng.choice("0123456789abcdef") for _ in range(3000))


def capture(dsn: str) -> list[dict[str, str]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in SETUP.split(";"):
            if statement.strip():
                conn.execute(statement)
        for sql in CHANGES:
            conn.execute(sql, {"big": big_value()} if "%(big)s" in sql else None)
        # A transaction replayed "from" a replication origin produces an Origin message.
        with conn.transaction():
            conn.execute("SELECT pg_replication_origin_session_setup('upstream')")
            conn.execute("SELECT pg_replication_origin_xact_setup('0/ABCDEF', now())")
            conn.execute("INSERT INTO events VALUES (3, 'replayed', 1, 'from upstream')")
        conn.execute("SELECT pg_replication_origin_session_reset()")
        rows = conn.execute(
            "SELECT lsn::text, data FROM pg_logical_slot_get_binary_changes('cap', NULL, NULL,"
            " 'proto_version', '1', 'publication_names', 'pub', 'messages', 'true')"
        ).fetchall()
    return [{"lsn": lsn, "hex": bytes(data).hex()} for lsn, data in rows]


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="cdcsync-capture-"))
    data = tmp / "data"
    shutil.chown(tmp, "postgres", "postgres")
    port = free_port()
    try:
        as_postgres(str(BIN / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres")
        opts = f"-c wal_level=logical -c fsync=off -p {port} -k {tmp} -c listen_addresses=''"
        as_postgres(
            str(BIN / "pg_ctl"), "-D", str(data), "-l", str(tmp / "log"), "-w", "-o", opts, "start"
        )
        try:
            messages = capture(f"host={tmp} port={port} user=postgres dbname=postgres")
        finally:
            as_postgres(str(BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
    finally:
        shutil.rmtree(tmp)
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(messages, indent=1) + "\n")
    print(f"wrote {len(messages)} messages to {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
