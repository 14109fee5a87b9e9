"""What each merge statement costs the target per row, and an alternative to the upsert.

One target cluster (throwaway, or ``--target-dsn``), the throughput bench's table preloaded with
``--rows`` rows, and the applier's staging table for it (binary values: the source's types). Each
round stages ``--batch-rows`` rows for each statement below, with keys no earlier round touched,
and times the statement alone in its own transaction (the commit not counted); the statements take
turns in a rotating order, and the table is vacuumed before each, so none inherits another's dead
rows. The statements are cdcsync's own (:mod:`cdcsync.apply.sql`), with the conflict rule on
``updated_at`` as ``cdcsync run`` builds it, except the last, an alternative measured here:

* ``insert``: a plain ``INSERT … SELECT`` of new keys (a key a batch inserts, even if the batch
  updates it afterwards);
* ``upsert new``: the upsert of new keys, what such a key cost before it was staged as an insert;
* ``upsert existing``: the upsert of keys the table holds (an update);
* ``delete``: the delete of keys the table holds;
* ``update, then insert the missed``: an ``UPDATE … FROM`` the stage (an index probe and the update,
  no speculative insertion and no row lock first), whose ``RETURNING`` feeds an insert of the keys
  it did not find (``ON CONFLICT DO NOTHING``, as a row the rule kept may be there).

Prints the median and fastest microseconds per row of each, over ``--rounds`` rounds.

Run: ``python -m bench.merge_sql [--rows 300000] [--batch-rows 5000] [--rounds 12]
[--target-dsn DSN]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from bench.common import (
    BenchError,
    connect,
    drop_database,
    execute,
    recreate_database,
    target_server,
)
from bench.throughput import TABLE_DDL
from cdcsync.apply import sql as q
from cdcsync.model import Column, Relation, TargetTable
from cdcsync.source.tuples import META_COLUMNS

DATABASE = "cdcsync_merge_bench"
STAGE = "cdcsync_stage_bench"
COLUMNS = ("id", "a", "b", "updated_at")
SOURCE_TYPES = ("bigint", "integer", "text", "timestamptz")
RELATION = Relation(0, "public", "bench", "d", (
    Column("id", 20, -1, True), Column("a", 23, -1, False), Column("b", 25, -1, False),
    Column("updated_at", 1184, -1, False)))

Builder = Callable[[TargetTable], sql.Composed]


def _update_then_insert_missed(table: TargetTable) -> sql.Composed:
    """The alternative to the upsert: update the keys found, insert the others."""
    ident = sql.Identifier
    stage, target = ident(STAGE), sql.SQL("{}.{}").format(ident(table.schema), ident(table.name))
    seq, op, unchanged = (ident(c) for c in (META_COLUMNS[0], META_COLUMNS[1], META_COLUMNS[4]))
    mark = sql.Literal(q.lost_mark(table, "upsert"))
    values = sql.SQL(", ").join(sql.SQL("s.{}").format(ident(c)) for c in COLUMNS)
    return sql.SQL(
        "WITH found AS (UPDATE {target} AS t SET {sets} FROM {stage} s "
        "WHERE s.{op} = 'U' AND strpos(s.{u}, '1') = 0 AND t.id = s.id AND "
        "CASE WHEN t.updated_at IS NULL OR t.updated_at <= s.updated_at THEN true "
        "ELSE (set_config({mark}, 'on', true) IS NULL) END RETURNING s.{seq}) "
        "INSERT INTO {target} ({columns}) SELECT {values} FROM {stage} s "
        "WHERE s.{op} = 'U' AND strpos(s.{u}, '1') = 0 "
        "AND s.{seq} NOT IN (SELECT {seq} FROM found) "
        "ON CONFLICT (id) DO NOTHING"
    ).format(target=target, stage=stage, op=op, u=unchanged, seq=seq, mark=mark, values=values,
             columns=sql.SQL(", ").join(ident(c) for c in COLUMNS),
             sets=sql.SQL(", ").join(sql.SQL("{0} = s.{0}").format(ident(c)) for c in COLUMNS[1:]))


ALTERNATIVE = "update, then insert the missed"
# Each statement: what it runs, the operation its staged rows carry, whether their keys exist.
STATEMENTS: dict[str, tuple[Builder, str, bool]] = {
    "insert": (lambda t: q.insert(STAGE, t, q.op_is("I")), "I", False),
    "upsert new": (lambda t: q.upsert(STAGE, t, q.op_is("U")), "U", False),
    "upsert existing": (lambda t: q.upsert(STAGE, t, q.op_is("U")), "U", True),
    "delete": (lambda t: q.delete(STAGE, t), "D", True),
    ALTERNATIVE: (_update_then_insert_missed, "U", True),
}


def _table(conn: psycopg.Connection[Any]) -> TargetTable:
    row = conn.execute("SELECT 'public.bench'::regclass::oid").fetchone()
    assert row is not None
    return TargetTable("public.bench", int(row[0]), "public", "bench", COLUMNS,
                       ("bigint", "integer", "text", "timestamp with time zone"), (0, 1, 2, 3),
                       (0,), (0,), 3, True, binary_types=SOURCE_TYPES)


def _stage_rows(conn: psycopg.Connection[Any], op: str, first_key: int, rows: int) -> None:
    """Stage ``rows`` rows of ``op`` for keys from ``first_key``, newer than the table's."""
    conn.execute(sql.SQL(
        "INSERT INTO {} SELECT g, %s, '0/0'::pg_lsn, now(), '0000', g, g %% 1000, md5(g::text), "
        "now() FROM generate_series(%s::bigint, %s::bigint) g").format(sql.Identifier(STAGE)),
        (op, first_key, first_key + rows - 1))
    conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(STAGE)))


def measure(dsn: str, args: argparse.Namespace) -> dict[str, list[float]]:
    """Seconds per row of each statement, one value per round."""
    execute(dsn, TABLE_DDL, "ALTER TABLE bench SET (autovacuum_enabled = off)",
            f"INSERT INTO bench SELECT g, g % 1000, md5(g::text), now() - interval '1 day' "
            f"FROM generate_series(1, {args.rows}) g", "VACUUM ANALYZE bench")
    names = list(STATEMENTS)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    existing, new = 1, args.rows + 1
    with connect(dsn) as conn:
        table = _table(conn)
        conn.execute(q.create_stage(STAGE, RELATION, SOURCE_TYPES))
        statements = {name: build(table) for name, (build, _, _) in STATEMENTS.items()}
        for round_ in range(args.rounds):
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                _, op, exists = STATEMENTS[name]
                if exists:
                    first, existing = existing, existing + args.batch_rows
                else:
                    first, new = new, new + args.batch_rows
                conn.execute("VACUUM bench")
                # The stage empties at each commit (as the applier's does), so it is filled in
                # the statement's transaction.
                with conn.transaction():
                    _stage_rows(conn, op, first, args.batch_rows)
                    started = time.perf_counter()
                    done = conn.execute(statements[name]).rowcount
                    seconds[name].append((time.perf_counter() - started) / args.batch_rows)
                # The alternative's rowcount is its insert's: none missed.
                expected = 0 if name == ALTERNATIVE else args.batch_rows
                if done != expected:
                    raise BenchError(f"{name} changed {done} rows, not {expected}")
    return seconds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.merge_sql", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=300_000, help="rows preloaded")
    parser.add_argument("--batch-rows", type=int, default=5_000, help="rows staged per statement")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--target-dsn", help="use this server (a database is created on it)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    # Three of the statements consume existing keys each round, none twice.
    if args.rows < 3 * args.rounds * args.batch_rows:
        parser.error("--rows must be at least 3 * --rounds * --batch-rows")
    try:
        with target_server(args.target_dsn) as admin:
            recreate_database(admin, DATABASE)
            try:
                seconds = measure(make_conninfo(admin, dbname=DATABASE), args)
            finally:
                drop_database(admin, DATABASE)
    except (BenchError, psycopg.Error) as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    summary = {name: {"median_us": round(statistics.median(v) * 1e6, 2),
                      "fastest_us": round(min(v) * 1e6, 2)} for name, v in seconds.items()}
    if args.json:
        print(json.dumps({"rows": args.rows, "batch_rows": args.batch_rows,
                          "rounds": args.rounds, "per_row": summary}, indent=2))
        return 0
    print(f"{args.batch_rows:,} staged rows per statement into a {args.rows:,}-row table, "
          f"{args.rounds} rounds, microseconds per row:")
    width = max(map(len, summary))
    for name, figures in summary.items():
        print(f"  {name:<{width}}  median {figures['median_us']:6.2f}  "
              f"fastest {figures['fastest_us']:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
