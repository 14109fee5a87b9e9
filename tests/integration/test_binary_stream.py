"""pgoutput's binary mode end to end: built-in types stream in binary and arrive identical; a
table of another type sends the stream back to text, from the checkpoint, losing nothing."""

from __future__ import annotations

import logging
from typing import Any

import psycopg
import pytest

from cdcsync import admin
from tests.conftest import DbPair
from tests.harness import converged, execute, running, set_up, settings_for, table_rows, wait_for

SCHEMA = """
CREATE TABLE kitchen (
    id bigint PRIMARY KEY,
    i int, n numeric(20, 6), t text, v varchar(20), c char(3), b bool, j json, jb jsonb,
    u uuid, ba bytea, d date, tm time, ts timestamp, tstz timestamptz, iv interval,
    arr int[], tarr text[], f8 float8, f4 real, ip inet, big text,
    updated_at timestamptz DEFAULT now()
);
ALTER TABLE kitchen ALTER COLUMN big SET STORAGE EXTERNAL;
CREATE TABLE widened (k int PRIMARY KEY, val bigint, note text);
CREATE TABLE guarded (id int PRIMARY KEY, qty int, updated_at timestamptz);
"""
# A constraint only the target has: it rejects a change the source accepted (a dead letter).
TARGET_SCHEMA = """
CREATE TABLE guarded (id int PRIMARY KEY, qty int CHECK (qty >= 0), updated_at timestamptz);
"""

ROW = """
INSERT INTO kitchen VALUES ({id}, -42, -12345.678901,
  'tab\there "quoted" \\ back\nline\r\n\\N ü', 'v\\.', 'ab', true, '{{"a": [1, 2]}}',
  '{{"b": null, "c": "ü"}}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\\xdeadbeef00',
  '2024-02-29', '23:59:59.999999', '1999-12-31 23:59:59.5', '2024-01-01 12:34:56.789+05:30',
  '-1 year 2 mons 3 days 04:05:06', '{{1,NULL,3}}', '{{"a b","c,d",NULL}}',
  1.0000000000000002, 3.4028235e38, '192.168.0.1/24', repeat(md5('{id}'), 200), now())
"""


def _fields(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [r.__dict__["cdcsync_fields"] for r in caplog.records if r.getMessage() == name]


@pytest.fixture(scope="module")
def pair(dbpair: DbPair) -> DbPair:
    execute(dbpair.target_dsn, TARGET_SCHEMA)
    return set_up(dbpair, SCHEMA)


def test_built_in_types_stream_in_binary_and_arrive_identical(
        pair: DbPair, caplog: pytest.LogCaptureFixture) -> None:
    """Inserts (copied straight in binary), updates (one leaving a TOASTed value unchanged, one
    moving the key of such a row) and deletes (through the typed stage), and NULLs, of every
    built-in type arrive identical."""
    caplog.set_level(logging.INFO, logger="cdcsync")
    with running(settings_for(pair)) as runner:
        execute(pair.source_dsn, *(ROW.format(id=i) for i in range(1, 6)),
                "INSERT INTO kitchen (id) VALUES (100)",
                "INSERT INTO widened SELECT g, g * 10, 'n' || g FROM generate_series(1, 50) g")
        wait_for(converged(pair, ["public.kitchen", "public.widened"]), what="the inserts",
                 runner=runner)
        execute(pair.source_dsn,
                "UPDATE kitchen SET i = i + 1, tstz = tstz + interval '1 day' WHERE id = 2",
                "UPDATE kitchen SET id = 20, n = 0.5 WHERE id = 4",
                "DELETE FROM kitchen WHERE id = 3",
                "UPDATE widened SET val = -val, note = NULL WHERE k <= 10",
                "DELETE FROM widened WHERE k > 40")
        wait_for(converged(pair, ["public.kitchen", "public.widened"]), what="convergence",
                 runner=runner)
    assert [f["values"] for f in _fields(caplog, "streaming")] == ["binary"]
    assert not _fields(caplog, "stream_in_text")
    assert table_rows(pair.source_dsn, "public.kitchen") == table_rows(pair.target_dsn,
                                                                        "public.kitchen")
    target = {r[0]: r for r in table_rows(pair.target_dsn, "public.kitchen")}
    assert target[20][21] == "".join([__import__("hashlib").md5(b"4").hexdigest()] * 200)
    assert target[100][1:22] == (None,) * 21
    assert sorted(table_rows(pair.target_dsn, "public.widened")) == sorted(
        table_rows(pair.source_dsn, "public.widened"))


def test_conflicts_and_dead_letters_keep_their_values_as_text(pair: DbPair) -> None:
    """The records of a change the conflict rule turned down and of a change the target
    rejected hold the values as text, as in text mode."""
    execute(pair.source_dsn, "INSERT INTO guarded VALUES (1, 5, '2026-01-01'), (2, 5, now())")
    settings = settings_for(pair, apply={"on_error": "dead_letter"})
    with running(settings) as runner:
        wait_for(converged(pair, ["public.guarded"]), runner=runner, what="the rows")
        execute(pair.target_dsn, "UPDATE guarded SET updated_at = '2030-01-01' WHERE id = 1")
        execute(pair.source_dsn,
                "UPDATE guarded SET qty = 6, updated_at = '2027-01-01 00:00:00+00' WHERE id = 1",
                "UPDATE guarded SET qty = -1 WHERE id = 2")

        def recorded() -> bool:
            with psycopg.connect(pair.target_dsn) as conn:
                conflicts = conn.execute("SELECT count(*) FROM cdcsync.conflicts").fetchone()
                letters = conn.execute("SELECT count(*) FROM cdcsync.dead_letters").fetchone()
            return conflicts == (1,) and letters == (1,)

        wait_for(recorded, runner=runner, what="the conflict and the dead letter")
    with psycopg.connect(pair.target_dsn) as conn:
        conflict = conn.execute(
            "SELECT source_value::timestamptz = '2027-01-01 00:00:00+00', "
            "target_value::timestamptz = '2030-01-01 00:00:00+00' FROM cdcsync.conflicts"
        ).fetchone()
        letter = conn.execute("SELECT row_data ->> 'qty', key ->> 'id' FROM cdcsync.dead_letters"
                              ).fetchone()
    assert conflict == (True, True)
    assert letter == ("-1", "2")


def test_a_user_defined_type_sends_the_stream_back_to_text(
        pair: DbPair, caplog: pytest.LogCaptureFixture) -> None:
    """A table with an enum column shows up in the binary stream: the stream starts again from
    the checkpoint in text, and every change, before and after, arrives."""
    execute(pair.source_dsn, "CREATE TYPE mood AS ENUM ('sad', 'ok')",
            "CREATE TABLE moods (id int PRIMARY KEY, m mood)")
    execute(pair.target_dsn, "CREATE TYPE mood AS ENUM ('sad', 'ok')",
            "CREATE TABLE moods (id int PRIMARY KEY, m mood)")
    settings = settings_for(pair)
    admin.setup(settings, create_tables=False)
    caplog.set_level(logging.INFO, logger="cdcsync")
    with running(settings) as runner:
        execute(pair.source_dsn, "INSERT INTO widened VALUES (1000, 1, 'before')",
                "BEGIN; INSERT INTO moods VALUES (1, 'ok'); "
                "INSERT INTO widened VALUES (1001, 2, 'with'); COMMIT",
                "INSERT INTO moods VALUES (2, 'sad')")
        wait_for(converged(pair, ["public.moods", "public.widened"]), runner=runner,
                 what="the rows of both tables")
    assert [f["values"] for f in _fields(caplog, "streaming")] == ["binary", "text"]
    assert "mood" in _fields(caplog, "stream_in_text")[0]["reason"]
    assert table_rows(pair.target_dsn, "public.moods") == [(1, "ok"), (2, "sad")]


def test_binary_can_be_turned_off(pair: DbPair, caplog: pytest.LogCaptureFixture) -> None:
    """[source] binary = false streams text from the start."""
    caplog.set_level(logging.INFO, logger="cdcsync")
    with running(settings_for(pair, source={"binary": False})) as runner:
        execute(pair.source_dsn, "INSERT INTO widened VALUES (2000, 3, 'text')")
        wait_for(converged(pair, ["public.widened"]), runner=runner, what="the insert")
    assert [f["values"] for f in _fields(caplog, "streaming")] == ["text"]


def test_a_column_of_another_type_added_mid_stream_sends_it_back_to_text(
        pair: DbPair, caplog: pytest.LogCaptureFixture) -> None:
    """An ALTER TABLE adding an enum column to a table already streamed in binary: the next
    Relation message stops the binary stream; in text the column is added on the target and the
    rows before and after the change arrive."""
    execute(pair.source_dsn, "CREATE TYPE size AS ENUM ('s', 'm', 'l')")
    execute(pair.target_dsn, "CREATE TYPE size AS ENUM ('s', 'm', 'l')")
    settings = settings_for(pair, tables=("public.widened",))
    caplog.set_level(logging.INFO, logger="cdcsync")
    with running(settings) as runner:
        execute(pair.source_dsn, "INSERT INTO widened VALUES (3000, 1, 'binary')")
        wait_for(converged(pair, ["public.widened"]), runner=runner, what="the binary insert")
        execute(pair.source_dsn, "ALTER TABLE widened ADD COLUMN fit size",
                "INSERT INTO widened VALUES (3001, 2, 'text', 'm')",
                "UPDATE widened SET fit = 'l' WHERE k = 3000")
        wait_for(converged(pair, ["public.widened"]), runner=runner, what="the rows after")
    assert [f["values"] for f in _fields(caplog, "streaming")] == ["binary", "text"]
    assert "size" in _fields(caplog, "stream_in_text")[0]["reason"]
    with psycopg.connect(pair.target_dsn) as conn:
        fits = conn.execute("SELECT k, fit::text FROM widened WHERE k >= 3000 ORDER BY k"
                            ).fetchall()
    assert fits == [(3000, "l"), (3001, "m")]
