"""End to end: inserts, updates, deletes and truncates of many types arrive identical."""

from __future__ import annotations

from decimal import Decimal

import psycopg
import pytest

from cdcsync import admin
from tests.conftest import DbPair
from tests.harness import (
    BOTH_DECODERS,
    converged,
    execute,
    running,
    settings_for,
    table_rows,
    wait_for,
)

SCHEMA = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE kitchen (
    id bigint PRIMARY KEY,
    i int, n numeric(20, 6), t text, v varchar(20), b bool, j json, jb jsonb, u uuid,
    ba bytea, d date, ts timestamp, tstz timestamptz, iv interval, arr int[], tarr text[],
    m mood, marr mood[], f8 float8, big text, updated_at timestamptz DEFAULT now(),
    exact numeric, f4 real
);
ALTER TABLE kitchen ALTER COLUMN big SET STORAGE EXTERNAL;
CREATE TABLE other (k text PRIMARY KEY, val int);
"""

ROW = """
INSERT INTO kitchen VALUES ({id}, 42, 12345.678901,
  'tab\there "quoted" \\ back\nline\r\n\\N', 'v\\.', true, '{{"a": [1, 2]}}',
  '{{"b": null, "c": "ü"}}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
  '\\xdeadbeef00', '2024-02-29', '2024-01-01 12:34:56.789', '2024-01-01 12:34:56.789+05:30',
  '1 year 2 mons 3 days 04:05:06', '{{1,NULL,3}}', '{{"a b","c,d",NULL}}', 'happy',
  '{{sad,ok}}', 1.0000000000000002, repeat(md5('{id}'), 200), now(),
  123456789012345678901234567890.000000000000000000001, 3.4028235e38)
"""

pytestmark = BOTH_DECODERS


@pytest.fixture(scope="module")
def pair(dbpair: DbPair) -> DbPair:
    execute(dbpair.source_dsn, SCHEMA)
    execute(dbpair.target_dsn, "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')")
    settings = settings_for(dbpair)
    admin.setup(settings, create_tables=True)
    return dbpair


def test_every_type_round_trips(pair: DbPair) -> None:
    """Inserts (batches of inserts alone: copied straight into the table as text), an update
    leaving a TOASTed column unchanged, deletes and NULLs arrive identical."""
    settings = settings_for(pair)
    with running(settings) as runner:
        execute(pair.source_dsn, *(ROW.format(id=i) for i in range(1, 6)),
                "INSERT INTO kitchen (id) VALUES (100)")
        wait_for(converged(pair, ["public.kitchen"]), what="the inserts", runner=runner)
        execute(pair.source_dsn,
                "UPDATE kitchen SET i = i + 1, tstz = tstz + interval '1 day' WHERE id = 2",
                "DELETE FROM kitchen WHERE id = 3",
                "INSERT INTO other VALUES ('x', 1), ('y', 2)",
                "UPDATE other SET k = 'z' WHERE k = 'y'")
        wait_for(converged(pair, ["public.kitchen", "public.other"]), what="convergence",
                 runner=runner)
    target = {r[0]: r for r in table_rows(pair.target_dsn, "public.kitchen")}
    assert target[2][19] == "".join([__import__("hashlib").md5(b"2").hexdigest()] * 200)
    assert target[100][1:20] == (None,) * 19
    assert target[1][3:5] == ('tab\there "quoted" \\ back\nline\r\n\\N', "v\\.")
    assert target[1][21] == Decimal("123456789012345678901234567890.000000000000000000001")
    with psycopg.connect(pair.source_dsn) as conn:
        plugin = conn.execute("SELECT plugin FROM pg_replication_slots WHERE slot_name = %s",
                              (pair.slot,)).fetchone()
    assert plugin == (pair.decoder,)
    assert 3 not in target


def test_truncate_empties_target(pair: DbPair) -> None:
    """TRUNCATE on the source truncates the target tables too."""
    settings = settings_for(pair)
    with running(settings) as runner:
        execute(pair.source_dsn, "INSERT INTO other VALUES ('t1', 1)")
        wait_for(converged(pair, ["public.other"]), runner=runner)
        execute(pair.source_dsn, "TRUNCATE other, kitchen")
        wait_for(lambda: table_rows(pair.target_dsn, "public.other") == [], runner=runner,
                 what="truncate")
    assert table_rows(pair.target_dsn, "public.kitchen") == []


def test_truncate_can_be_ignored(pair: DbPair) -> None:
    """With [apply] truncate = "ignore", a source TRUNCATE leaves the target rows alone."""
    settings = settings_for(pair, apply={"truncate": "ignore"})
    with running(settings) as runner:
        execute(pair.source_dsn, "INSERT INTO other VALUES ('kept', 1)")
        wait_for(converged(pair, ["public.other"]), runner=runner)
        execute(pair.source_dsn, "TRUNCATE other", "INSERT INTO other VALUES ('after', 2)")
        wait_for(lambda: len(table_rows(pair.target_dsn, "public.other")) == 2, runner=runner,
                 what="the row after the truncate")
    assert [r[0] for r in table_rows(pair.target_dsn, "public.other")] == ["after", "kept"]
