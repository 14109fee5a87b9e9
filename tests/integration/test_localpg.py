"""The test harness itself: local clusters, the per-module database pair and its teardown."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import psycopg
from psycopg.rows import TupleRow

from tests.conftest import DbPair, Servers


def test_both_servers_answer_and_source_is_logical(
    clusters: Servers, src: psycopg.Connection[TupleRow], tgt: psycopg.Connection[TupleRow]
) -> None:
    """Both servers accept connections and the source runs with wal_level=logical."""
    for cluster in (clusters.source_cluster, clusters.target_cluster):
        assert cluster is None or cluster.is_running()
    assert src.execute("SHOW wal_level").fetchone() == ("logical",)
    assert tgt.execute("SELECT 1").fetchone() == (1,)


def test_logical_slot_can_be_created_and_dropped(
    dbpair: DbPair, src: psycopg.Connection[TupleRow]
) -> None:
    """A pgoutput slot can be created in the module's source database and dropped again."""
    src.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (dbpair.slot,))
    row = src.execute(
        "SELECT database, plugin FROM pg_replication_slots WHERE slot_name = %s", (dbpair.slot,)
    ).fetchone()
    assert row == (dbpair.source_db, "pgoutput")
    src.execute("SELECT pg_drop_replication_slot(%s)", (dbpair.slot,))


def test_database_pairs_are_distinct_and_dropped_with_their_slots(
    clusters: Servers,
    dbpair: DbPair,
    dbpair_factory: Callable[[str], AbstractContextManager[DbPair]],
) -> None:
    """Another module's pair gets its own databases, slot name and publication name, and teardown
    drops its databases even while a walsender holds its slot."""
    with dbpair_factory("other.module") as other:
        assert other.source_db != dbpair.source_db
        assert (other.slot, other.publication) != (dbpair.slot, dbpair.publication)
        with psycopg.connect(other.source_dsn, autocommit=True) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == (other.source_db,)
        holder = psycopg.connect(other.source_dsn, replication="database", autocommit=True)
        holder.execute(f"CREATE_REPLICATION_SLOT {other.slot} LOGICAL pgoutput")
        start = (
            f"START_REPLICATION SLOT {other.slot} LOGICAL 0/0"
            f" (proto_version '1', publication_names '{other.publication}')"
        )
        holder.pgconn.send_query(start.encode())
        active = "SELECT active FROM pg_replication_slots WHERE slot_name = %s"
        with psycopg.connect(other.source_dsn, autocommit=True) as conn:
            assert conn.execute(active, (other.slot,)).fetchone() == (True,)
    with psycopg.connect(clusters.source_dsn, autocommit=True) as conn:
        names = (other.source_db,)
        dbs = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", names)
        assert dbs.fetchone() is None
        slots = conn.execute("SELECT 1 FROM pg_replication_slots WHERE database = %s", names)
        assert slots.fetchone() is None
    holder.pgconn.finish()
