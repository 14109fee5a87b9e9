"""Shared fixtures: two PostgreSQL servers per session, a fresh database pair per test module.

By default the servers are throwaway local clusters (:mod:`cdcsync.localpg`). Set both
``CDCSYNC_TEST_SOURCE_DSN`` and ``CDCSYNC_TEST_TARGET_DSN`` to run against existing servers
instead; the source must have ``wal_level=logical`` and the user must be allowed to create
databases and replication slots.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.rows import TupleRow

import cdcsync
from cdcsync.localpg import LocalCluster, local_clusters

SOURCE_DSN_ENV = "CDCSYNC_TEST_SOURCE_DSN"
TARGET_DSN_ENV = "CDCSYNC_TEST_TARGET_DSN"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to test old code: a module compiled in place (setup.py) shadows its source, so
    an edit to the source runs only once it is compiled again."""
    package = Path(cdcsync.__file__).parent
    stale = [str(compiled.relative_to(package.parent))
             for compiled in package.rglob("*.so")
             for suffix in (".py", ".c")
             if (source := compiled.with_name(compiled.name.split(".")[0] + suffix)).exists()
             and source.stat().st_mtime > compiled.stat().st_mtime]
    if stale:
        pytest.exit(f"compiled modules older than their sources: {', '.join(stale)}; "
                    "run `make build`",
                    returncode=2)


@dataclass(frozen=True)
class Servers:
    """The two servers of a test session; the clusters are None when external DSNs are used."""

    source_dsn: str
    target_dsn: str
    source_cluster: LocalCluster | None = None
    target_cluster: LocalCluster | None = None


@dataclass(frozen=True)
class DbPair:
    """One database on each server, plus slot and publication names nobody else uses."""

    source_dsn: str
    target_dsn: str
    source_db: str
    target_db: str
    slot: str
    publication: str
    source_cluster: LocalCluster | None
    target_cluster: LocalCluster | None
    decoder: str = "pgoutput"


@pytest.fixture(scope="session")
def clusters() -> Iterator[Servers]:
    """Start a logical source and a target cluster, or use the servers named in the environment."""
    source_dsn, target_dsn = os.environ.get(SOURCE_DSN_ENV), os.environ.get(TARGET_DSN_ENV)
    if source_dsn and target_dsn:
        yield Servers(source_dsn=source_dsn, target_dsn=target_dsn)
        return
    if source_dsn or target_dsn:
        pytest.fail(f"set both {SOURCE_DSN_ENV} and {TARGET_DSN_ENV}, or neither")
    with local_clusters() as (source, target):
        yield Servers(source.dsn(), target.dsn(), source_cluster=source, target_cluster=target)


def _ensure_running(cluster: LocalCluster | None) -> None:
    # A test that stops a server to exercise reconnects must not break every module after it.
    if cluster is not None and not cluster.is_running():
        cluster.start()


def _drop_slots(source_dsn: str, dbname: str) -> None:
    """Drop every slot of ``dbname``, terminating walsenders first: DROP DATABASE refuses slots."""
    query = "SELECT slot_name, active_pid FROM pg_replication_slots WHERE database = %s"
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        deadline = time.monotonic() + 10
        while rows := conn.execute(query, (dbname,)).fetchall():
            for slot, pid in rows:
                if pid is not None:
                    conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
                    continue
                # The slot can turn active again between the query and the drop: retry.
                with suppress(psycopg.errors.ObjectInUse):
                    conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            if time.monotonic() > deadline:
                raise RuntimeError(f"replication slots of {dbname} still present: {rows}")
            time.sleep(0.05)


def _drop_subscriptions(target_dsn: str) -> None:
    # A subscription makes DROP DATABASE fail; detach it from its slot, which _drop_slots removes.
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        names = conn.execute(
            "SELECT subname FROM pg_subscription"
            " WHERE subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchall()
        for (name,) in names:
            ident = sql.Identifier(name)
            conn.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(ident))
            conn.execute(sql.SQL("ALTER SUBSCRIPTION {} SET (slot_name = NONE)").format(ident))
            conn.execute(sql.SQL("DROP SUBSCRIPTION {}").format(ident))


def _create_db(server_dsn: str, name: str) -> str:
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return make_conninfo(server_dsn, dbname=name)


def _drop_db(server_dsn: str, name: str) -> None:
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        query = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        conn.execute(query)


@contextmanager
def open_dbpair(servers: Servers, label: str, decoder: str = "pgoutput") -> Iterator[DbPair]:
    """Create a database pair named after ``label``; drop its slots and databases on exit."""
    tag = secrets.token_hex(3)
    clean = re.sub(r"[^a-z0-9_]+", "_", label.lower()).strip("_")
    name = f"cdc_{clean[:40]}_{tag}"
    source_dsn = _create_db(servers.source_dsn, name)
    try:
        target_dsn = _create_db(servers.target_dsn, name)
    except BaseException:
        _drop_db(servers.source_dsn, name)
        raise
    pair = DbPair(
        source_dsn=source_dsn,
        target_dsn=target_dsn,
        source_db=name,
        target_db=name,
        slot=f"s_{secrets.token_hex(4)}",
        publication=f"p_{secrets.token_hex(4)}",
        source_cluster=servers.source_cluster,
        target_cluster=servers.target_cluster,
        decoder=decoder,
    )
    try:
        yield pair
    finally:
        _ensure_running(servers.source_cluster)
        _ensure_running(servers.target_cluster)
        _drop_subscriptions(target_dsn)
        _drop_slots(servers.source_dsn, name)
        _drop_db(servers.source_dsn, name)
        _drop_db(servers.target_dsn, name)


@pytest.fixture(scope="module")
def decoder(request: pytest.FixtureRequest) -> str:
    """The output plugin of this module's slot: pgoutput, or each of DECODERS in a module marked
    with ``tests.harness.BOTH_DECODERS``."""
    return str(getattr(request, "param", "pgoutput"))


@pytest.fixture(scope="module")
def dbpair(clusters: Servers, decoder: str, request: pytest.FixtureRequest) -> Iterator[DbPair]:
    """A fresh source/target database pair for this test module (and decoder)."""
    module_name = request.module.__name__.rsplit(".", 1)[-1]
    with open_dbpair(clusters, f"{module_name}_{decoder}", decoder) as pair:
        yield pair


@pytest.fixture(scope="session")
def dbpair_factory(
    clusters: Servers,
) -> Callable[[str], AbstractContextManager[DbPair]]:
    """Make extra database pairs inside a test: ``with dbpair_factory("label") as pair:``."""
    return lambda label: open_dbpair(clusters, label)


@pytest.fixture
def src(dbpair: DbPair) -> Iterator[psycopg.Connection[TupleRow]]:
    """An autocommit connection to this module's source database."""
    with psycopg.connect(dbpair.source_dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def tgt(dbpair: DbPair) -> Iterator[psycopg.Connection[TupleRow]]:
    """An autocommit connection to this module's target database."""
    with psycopg.connect(dbpair.target_dsn, autocommit=True) as conn:
        yield conn
