"""The libpq-level COPY pipe between two real servers: many blocks, a refused row, a source that
fails mid-stream, a caller that stops it; both connections stay usable every time."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from psycopg import errors, pq, sql
from psycopg.rows import TupleRow

from cdcsync.apply import tables
from cdcsync.backfill import copy_format, copy_pipe, source_rows
from cdcsync.model import Relation, TargetTable
from tests.conftest import DbPair
from tests.harness import execute, settings_for, table_rows

Conn = psycopg.Connection[TupleRow]
ROWS = 40_000  # about 6 MB of text COPY: a dozen blocks


@pytest.fixture(scope="module")
def pair(dbpair: DbPair) -> DbPair:
    execute(dbpair.source_dsn,
            "CREATE TABLE wide (id int PRIMARY KEY, qty int, note text, at timestamptz)",
            "INSERT INTO wide SELECT g, g, repeat(md5(g::text), 4) || E'\\ttab\\nline', "
            "'2024-01-01'::timestamptz + g * interval '1 minute' "
            "FROM generate_series(1, 40000) g",
            "UPDATE wide SET qty = -1 WHERE id = 30000", "UPDATE wide SET note = NULL "
            "WHERE id % 1000 = 0")
    execute(dbpair.target_dsn,
            "CREATE TABLE wide (id int PRIMARY KEY, qty int, note text, at timestamptz)",
            "CREATE TABLE checked (id int PRIMARY KEY, qty int CHECK (qty >= 0), note text, "
            "at timestamptz)")
    return dbpair


@pytest.fixture
def conns(pair: DbPair) -> Iterator[tuple[Conn, Conn]]:
    execute(pair.target_dsn, "TRUNCATE wide")
    with psycopg.connect(pair.source_dsn) as source, psycopg.connect(pair.target_dsn) as target:
        source.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        source.execute("SELECT 1")  # the pipe runs inside a transaction, as the snapshot's does
        target.execute("SAVEPOINT before_copy")
        yield source, target


def _out(query: str = "COPY wide TO STDOUT") -> sql.SQL:
    return sql.SQL(query)


def _usable(source: Conn, target: Conn, table: str) -> None:
    """Neither connection is left inside a COPY: the target rolls back to its savepoint, as the
    snapshot does, and both run queries."""
    target.execute("ROLLBACK TO SAVEPOINT before_copy")
    assert target.execute(sql.SQL("SELECT count(*) FROM {}").format(
        sql.Identifier(table))).fetchone() == (0,)
    target.commit()
    assert source.execute("SELECT count(*) FROM wide").fetchone() == (ROWS,)
    source.rollback()


def test_a_pipe_of_many_blocks_copies_every_row_exactly(pair: DbPair,
                                                         conns: tuple[Conn, Conn]) -> None:
    source, target = conns
    blocks: list[int] = []
    rows = copy_pipe.pipe(source, target, _out(), _out("COPY wide FROM STDIN"), blocks.append)
    target.commit()
    assert rows == ROWS and sum(blocks) == ROWS and len(blocks) >= 8
    assert table_rows(pair.target_dsn, "public.wide") == table_rows(pair.source_dsn, "public.wide")
    assert source.pgconn.transaction_status == pq.TransactionStatus.INTRANS
    assert target.execute("SELECT count(*) FROM wide").fetchone() == (ROWS,)


def test_the_copy_belongs_to_the_callers_transaction(pair: DbPair) -> None:
    """As with psycopg's own copy(), a connection outside autocommit copies inside a
    transaction that the caller ends: rolled back here, nothing stays."""
    execute(pair.target_dsn, "TRUNCATE wide")
    with psycopg.connect(pair.source_dsn) as source, psycopg.connect(pair.target_dsn) as target:
        rows = copy_pipe.pipe(source, target, _out(), _out("COPY wide FROM STDIN"),
                              lambda rows: None)
        assert rows == ROWS
        assert target.pgconn.transaction_status == pq.TransactionStatus.INTRANS
        target.rollback()
        assert target.execute("SELECT count(*) FROM wide").fetchone() == (0,)


def test_a_row_the_target_refuses_raises_its_error_and_leaves_both_usable(
        conns: tuple[Conn, Conn]) -> None:
    source, target = conns
    with pytest.raises(errors.CheckViolation, match='"checked_qty_check"'):
        copy_pipe.pipe(source, target, _out(), _out("COPY checked FROM STDIN"),
                       lambda rows: None)
    assert target.pgconn.transaction_status == pq.TransactionStatus.INERROR
    assert source.pgconn.transaction_status == pq.TransactionStatus.INTRANS
    _usable(source, target, "checked")


def test_a_source_failing_mid_stream_fails_the_target_copy(conns: tuple[Conn, Conn]) -> None:
    source, target = conns
    # Rows in key order from one index scan: a sort, or parallel workers, could compute the
    # failing value before the first block is sent (this failed once in CI).
    source.execute("SET enable_sort = off")
    source.execute("SET max_parallel_workers_per_gather = 0")
    failing = _out("COPY (SELECT id, 1 / (30000 - id), note, at FROM wide ORDER BY id) "
                   "TO STDOUT")
    blocks: list[int] = []
    with pytest.raises(errors.DivisionByZero):
        copy_pipe.pipe(source, target, failing, _out("COPY wide FROM STDIN"), blocks.append)
    assert blocks, "the failure should come after some blocks were already sent"
    assert source.pgconn.transaction_status == pq.TransactionStatus.INERROR
    assert target.pgconn.transaction_status == pq.TransactionStatus.INERROR
    source.rollback()
    _usable(source, target, "wide")


def test_a_source_connection_lost_mid_stream_is_an_operational_error(
        pair: DbPair, conns: tuple[Conn, Conn]) -> None:
    """Lost connections are what snapshot.py and resync.py retry: they must stay
    OperationalError, and the target must be left ready for its rollback."""
    source, target = conns
    pid = source.info.backend_pid

    def kill_source(rows: int) -> None:
        execute(pair.source_dsn, f"SELECT pg_terminate_backend({pid})")

    with pytest.raises(psycopg.OperationalError):
        copy_pipe.pipe(source, target, _out(), _out("COPY wide FROM STDIN"), kill_source)
    assert source.closed
    target.execute("ROLLBACK TO SAVEPOINT before_copy")
    assert target.execute("SELECT count(*) FROM wide").fetchone() == (0,)


class _Stop(Exception):
    pass


def test_a_caller_stopping_mid_stream_abandons_both_copies(conns: tuple[Conn, Conn]) -> None:
    source, target = conns

    seen: list[int] = []

    def stop_at_third(rows: int) -> None:
        seen.append(rows)
        if len(seen) == 3:
            raise _Stop

    # 20 times the table, keys kept distinct: far more than the sockets between the two hold,
    # so the source is still sending when the caller stops (6 MB could all be sent by then on
    # a loaded machine, and a finished COPY has nothing left to cancel).
    many = _out("COPY (SELECT w.id + k * 100000, w.qty, w.note, w.at FROM generate_series(0, 19) "
                "k CROSS JOIN LATERAL (SELECT * FROM wide) w) TO STDOUT")
    with pytest.raises(_Stop):
        copy_pipe.pipe(source, target, many, _out("COPY wide FROM STDIN"), stop_at_third)
    assert len(seen) == 3
    assert source.pgconn.transaction_status == pq.TransactionStatus.INERROR, "not cancelled"
    source.rollback()
    _usable(source, target, "wide")


def test_read_returns_the_whole_copy_and_its_row_count(conns: tuple[Conn, Conn]) -> None:
    source, _ = conns
    data, rows = copy_pipe.read(source, _out("COPY (SELECT id FROM wide ORDER BY id) TO STDOUT"))
    assert rows == ROWS
    assert data == b"".join(b"%d\n" % i for i in range(1, ROWS + 1))


TYPED = """
CREATE TYPE mood AS ENUM ('sad', 'ok');
CREATE TABLE typed (id int8 PRIMARY KEY, b bool, by bytea, c "char", n name, i2 int2, i4 int4,
  t text, j json, cidr cidr, f4 float4, f8 float8, m8 macaddr8, m macaddr, ip inet,
  bp char(3), vc varchar(10), d date, tm time, ts timestamp, tz timestamptz, iv interval,
  ttz timetz, bt bit(4), vb varbit, num numeric(12, 3), u uuid, lsn pg_lsn, jb jsonb,
  ai int4[], at text[], ats timestamptz[], an numeric[], aj jsonb[]);
CREATE TABLE with_enum (id int PRIMARY KEY, m mood);
CREATE TABLE with_regclass (id int PRIMARY KEY, r regclass);
CREATE TABLE widened (id int PRIMARY KEY, v int4);
"""
TYPED_ROWS = """
INSERT INTO typed SELECT g, g % 2 = 0, decode(md5(g::text), 'hex'), 'x', 'nm' || g, g % 30000,
  g, E'tab\\there ' || g, '{"a": [1, 2.5]}', '10.1.0.0/16', g / 3.0, g / 7.0,
  '08:00:2b:01:02:03:04:05', '08:00:2b:01:02:03', '192.168.0.1/24', 'ab', 'v' || g % 1000,
  '2024-02-29'::date + g, '13:45:01.123456', '2024-01-01 00:00:00.5'::timestamp + g * interval
  '1 hour', '2024-06-30 23:59:59.999999+02'::timestamptz - g * interval '1 day',
  make_interval(months => g % 13, days => g % 40, secs => g / 1000.0), '10:00+05:30', B'1010',
  B'101', g * 1.001, md5(g::text)::uuid, '16/B374D848', jsonb_build_object('n', g, 'z', null),
  ARRAY[g, NULL, -g], ARRAY['a', NULL, 'c"d'], ARRAY['2024-01-01 00:00+00'::timestamptz],
  ARRAY[1.5, -0.000001], ARRAY['{"k": 1}'::jsonb]
FROM generate_series(1, 20000) g;
INSERT INTO typed (id) VALUES (0);
INSERT INTO with_enum VALUES (1, 'ok'), (2, NULL);
INSERT INTO with_regclass VALUES (1, 'typed');
INSERT INTO widened VALUES (1, 7);
"""


@pytest.fixture(scope="module")
def typed(pair: DbPair) -> DbPair:
    execute(pair.source_dsn, TYPED, TYPED_ROWS)
    execute(pair.target_dsn, TYPED.replace("widened (id int PRIMARY KEY, v int4)",
                                           "widened (id int PRIMARY KEY, v int8)"))
    return pair


def _shapes(pair: DbPair, conns: tuple[Conn, Conn], name: str) -> tuple[Relation, TargetTable]:
    relation = source_rows.relation_of(conns[0], f"public.{name}")
    return relation, tables.resolve(conns[1], settings_for(pair), relation)


def test_binary_is_chosen_only_for_the_same_built_in_types_on_both_sides(
        typed: DbPair, conns: tuple[Conn, Conn]) -> None:
    chosen = {name: copy_format.binary(conns[1], *_shapes(typed, conns, name))
              for name in ("typed", "with_enum", "with_regclass", "widened")}
    assert chosen == {"typed": True, "with_enum": False, "with_regclass": False,
                      "widened": False}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "text"])
def test_every_binary_safe_type_arrives_exactly_in_either_format(
        typed: DbPair, conns: tuple[Conn, Conn], binary: bool) -> None:
    source, target = conns
    relation, table = _shapes(typed, conns, "typed")
    assert {c.type_oid for c in relation.columns} <= copy_format.BINARY_SAFE
    rows = copy_pipe.pipe(source, target,
                          source_rows.plain_copy_out(relation, table, binary=binary),
                          source_rows.plain_copy_in(table, binary=binary), lambda rows: None)
    assert rows == 20_001
    as_text = "SELECT t::text FROM typed t ORDER BY id"
    assert target.execute(as_text).fetchall() == source.execute(as_text).fetchall()
    target.rollback()
