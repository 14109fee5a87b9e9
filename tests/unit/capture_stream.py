"""Capture what pgoutput and wal2json send for the same changes, from a throwaway PostgreSQL
cluster, into data/pgoutput_capture.json and data/wal2json_capture.json.

Run manually when the fixtures need regenerating (the unit tests only read the JSON):

    /work/main/.venv/bin/python tests/unit/capture_stream.py

It starts a throwaway cluster with wal_level=logical
(:func:`cdcsync.localpg.throwaway_clusters`), creates the tables below, a publication, a pgoutput
slot and a wal2json slot at the same position, runs the changes the decoder tests expect, reads
them back with ``pg_logical_slot_get_binary_changes`` (pgoutput: proto_version 1, messages on;
wal2json: the options the daemon uses), writes ``[{"lsn": "0/1A2B", "hex": "42..."}, ...]`` for
pgoutput and ``[{"lsn": ..., "json": "{...}"}, ...]`` for wal2json, and removes the cluster.

The ``items.big`` value is 3,000 random hex characters with ``STORAGE EXTERNAL``, so it lives out
of line in TOAST and an update that does not touch it sends it as 'u' (unchanged) in pgoutput and
is left out by wal2json.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import psycopg

from cdcsync.localpg import throwaway_clusters
from cdcsync.source import wal2json

DATA = Path(__file__).parent / "data"
OUT = DATA / "pgoutput_capture.json"
OUT_WAL2JSON = DATA / "wal2json_capture.json"

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
SELECT pg_create_logical_replication_slot('capj', 'wal2json');
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


def big_value() -> str:
    rng = random.Random(20240229)
    return "".join(rng.choice("0123456789abcdef") for _ in range(3000))


def capture(dsn: str) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
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
        flat = [x for pair in wal2json.options(("public.*",)).items() for x in pair]
        json_rows = conn.execute(
            "SELECT lsn::text, data FROM pg_logical_slot_get_binary_changes('capj', NULL, NULL"
            + ", %s" * len(flat) + ")", flat).fetchall()
    return ([{"lsn": lsn, "hex": bytes(data).hex()} for lsn, data in rows],
            [{"lsn": lsn, "json": bytes(data).decode()} for lsn, data in json_rows])


def main() -> None:
    with throwaway_clusters(("capture", True)) as (cluster,):
        messages, json_messages = capture(cluster.dsn())
    DATA.mkdir(exist_ok=True)
    for path, captured in ((OUT, messages), (OUT_WAL2JSON, json_messages)):
        path.write_text(json.dumps(captured, indent=1) + "\n")
        print(f"wrote {len(captured)} messages to {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
