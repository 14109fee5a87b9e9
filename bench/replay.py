"""What the fallback costs when the target refuses a merged batch.

The batch is then merged again in runs of consecutive changes, in source order, each run that
the target refuses halved until the refusal is pinned to single changes. Under ``[apply]
on_error = "dead_letter"`` a single change runs under its own savepoint, so a rejected one can be
set aside. This times one flush of N staged updates on the target:

- merge: no conflict, the batch merges in bulk (the normal path, for scale);
- split (halt): two rows swap a unique value, so the merged batch fails and is split;
- split (dead_letter): the same batch under the dead_letter policy;
- split + 1 dead letter: one change also violates a CHECK constraint and is set aside.

    python -m bench.replay [--rows 2000] [--runs 3] [--target-dsn DSN]

Prints the median of ``--runs`` runs of each, in changes per second.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import struct
import time

import psycopg

from bench.common import execute, median, recreate_database, target_server
from cdcsync import checkpoint
from cdcsync.apply import tables
from cdcsync.apply.applier import Applier
from cdcsync.config import Settings
from cdcsync.model import PG_EPOCH, ChangeChunk, Column, Lsn, Relation, TableRows, TxnEnd
from cdcsync.source.tuples import PendingRow, stage_rows

DB = "cdcsync_bench_replay"
RELATION = Relation(1, "public", "people", "d", tuple(
    Column(name, 25, -1, name == "id") for name in ("id", "email", "age")))


def _tuple(values: tuple[str, ...]) -> bytes:
    parts = [struct.pack(">h", len(values))]
    for value in values:
        data = value.encode()
        parts.append(b"t" + struct.pack(">I", len(data)) + data)
    return b"".join(parts)


def _chunk(conn: psycopg.Connection[tuple[object, ...]], settings: Settings, rows: int,
           swap: bool, bad: bool) -> ChangeChunk:
    now = (dt.datetime.now(dt.UTC) - PG_EPOCH) // dt.timedelta(microseconds=1)
    # A swap as the source must write it: 1 moves aside, 2 takes 1's email, 1 takes 2's.
    versions = [(1, "aside@x")] if swap else []
    versions += [(i, f"p{i}@x") for i in range(2, rows + 1)]
    if swap:
        versions[1] = (2, "p1@x")
    versions.append((1, "p2@x" if swap else "p1@x"))
    pending: list[PendingRow] = [
        (_tuple((str(key), email, "-1" if bad and key == rows // 2 else str(key % 90))), 0,
         ord("U"), seq, 1, now)
        for seq, (key, email) in enumerate(versions, start=1)]
    blob, _ = stage_rows(RELATION, pending)
    target = tables.resolve(conn, settings, RELATION)
    return ChangeChunk((TableRows(RELATION, target, [blob], 0, len(pending), 0, 0),), len(pending),
                       len(blob))


def _flush_seconds(dsn: str, rows: int, policy: str, *, swap: bool, bad: bool) -> float:
    execute(dsn, "TRUNCATE people, cdcsync.dead_letters",
            f"INSERT INTO people SELECT g, 'p' || g || '@x', 1 FROM generate_series(1, {rows}) g")
    settings = Settings.model_validate({
        "tables": ("public.people",), "source": {"dsn": dsn}, "target": {"dsn": dsn},
        "apply": {"on_error": policy, "max_rows": 10**9, "max_bytes": 2**40}})
    with psycopg.connect(dsn) as conn:
        applier = Applier(conn, settings)
        applier.start()
        applier.add(_chunk(conn, settings, rows, swap, bad))
        applier.end(TxnEnd(Lsn(2), dt.datetime.now(dt.UTC)))
        started = time.perf_counter()
        done = applier.commit(save_checkpoint=False)
        elapsed = time.perf_counter() - started
    assert sum(done.dead_letters.values()) == int(bad)
    return elapsed


def main() -> None:
    logging.getLogger("cdcsync").setLevel(logging.ERROR)  # one event per dead letter otherwise
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--target-dsn", help="an existing server (default: a throwaway one)")
    args = parser.parse_args()
    with target_server(args.target_dsn) as admin:
        recreate_database(admin, DB)
        dsn = psycopg.conninfo.make_conninfo(admin, dbname=DB)
        execute(dsn, "CREATE TABLE people (id int PRIMARY KEY, email text UNIQUE, "
                     "age int CHECK (age >= 0))")
        with psycopg.connect(dsn, autocommit=True) as conn:
            checkpoint.install_metadata(conn)
        cases = (("merge", "halt", False, False), ("split (halt)", "halt", True, False),
                 ("split (dead_letter)", "dead_letter", True, False),
                 ("split + 1 dead letter", "dead_letter", True, True))
        for label, policy, swap, bad in cases:
            seconds = median([_flush_seconds(dsn, args.rows, policy, swap=swap, bad=bad)
                              for _ in range(args.runs)])
            print(f"{label:24} {args.rows / seconds:>10,.0f} changes/s "
                  f"(median of {args.runs}, {args.rows} changes)")


if __name__ == "__main__":
    main()
