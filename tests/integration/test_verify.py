"""cdcsync verify against the real clusters: exit codes, exact keys, key types, live streams."""

from __future__ import annotations

import json
import os
import random
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from bench.relay import Relay
from cdcsync import admin, leader
from cdcsync.errors import VerifyError
from cdcsync.link_watch import LinkWatch
from cdcsync.localpg import free_port
from cdcsync.metrics import Metrics
from cdcsync.source import catalog
from cdcsync.verify import sides as sides_module
from cdcsync.verify import sql as q
from cdcsync.verify.command import verify, verify_keys
from cdcsync.verify.compare import TableVerifier
from cdcsync.verify.job import ScheduledVerify
from cdcsync.verify.report import Differences
from cdcsync.verify.sides import Sides, fetch, open_sides
from cdcsync.verify.spec import table_spec
from cdcsync.verify.sql import KeyRange
from tests.conftest import DbPair
from tests.harness import (
    cli,
    converged,
    execute,
    running,
    settings_for,
    wait_for,
    write_config,
    writer,
)

ROWS = 12_000  # more than two leaves (5,000 rows), so differing ranges are cut again

SOURCE = f"""
CREATE TABLE items (id bigint PRIMARY KEY, qty int, label text, price numeric(10, 3),
                    seen timestamptz, note text, updated_at timestamptz NOT NULL DEFAULT now());
INSERT INTO items SELECT g, g % 97, 'item ' || g, g / 7.0, '2024-03-01 12:00+00'::timestamptz
    + g * interval '1 minute', 'private ' || g, now() FROM generate_series(1, {ROWS}) g;
CREATE TABLE pairs (region text, n int, v float8, PRIMARY KEY (region, n));
INSERT INTO pairs SELECT r, g, g / 3.0 FROM unnest(ARRAY['eu', 'us', 'ap']) r,
    generate_series(1, 400) g;
CREATE TABLE words (w text PRIMARY KEY, c int);
INSERT INTO words SELECT md5(g::text), g FROM generate_series(1, 900) g;
CREATE TABLE things (id uuid PRIMARY KEY, body jsonb, tags varchar(10)[], amounts numeric(8, 2)[],
                     born date, ok bool, raw bytea, span interval, doc json, at timestamptz(3));
INSERT INTO things SELECT md5(g::text)::uuid, jsonb_build_object('n', g),
    CASE WHEN g % 5 > 0 THEN ARRAY['t' || g, 'u'] END, ARRAY[g / 3.0, NULL], date '2020-01-01' + g,
    CASE WHEN g % 3 > 0 THEN g % 2 = 0 END, decode(md5(g::text), 'hex'), g * interval '1 hour',
    json_build_object('g', g), '2024-01-01'::timestamptz + g * interval '1.5 second'
    FROM generate_series(1, 900) g;
ANALYZE pairs;
"""
# The target types some columns differently, as a real copy may: a wider integer, a numeric of
# smaller scale (it rounds), no private note column (excluded from replication) and another time
# zone by default.
TARGET = """
CREATE TABLE copy_items (id bigint PRIMARY KEY, qty bigint, label text, price numeric(12, 2),
                         seen timestamptz, updated_at timestamptz NOT NULL);
CREATE TABLE pairs (region text, n int, v float8, PRIMARY KEY (region, n));
CREATE TABLE words (w text PRIMARY KEY, c int);
CREATE TABLE things (id uuid PRIMARY KEY, body jsonb, tags varchar(10)[], amounts numeric(8, 2)[],
                     born date, ok bool, raw bytea, span interval, doc json, at timestamptz(3));
"""
TABLES = ("public.items", "public.pairs", "public.words", "public.things")
OVERRIDES = [{"name": "public.items", "target": "public.copy_items",
              "exclude_columns": ["note"]}]


def _copy(pair: DbPair, source: str, target: str, columns: str = "*") -> None:
    with psycopg.connect(pair.source_dsn) as src, psycopg.connect(pair.target_dsn) as tgt, \
            src.cursor().copy(f"COPY (SELECT {columns} FROM {source}) TO STDOUT") as out, \
            tgt.cursor().copy(f"COPY {target} FROM STDIN") as into:
        for block in out:
            into.write(block)


@pytest.fixture(scope="module")
def pair(dbpair: DbPair) -> DbPair:
    execute(dbpair.source_dsn, SOURCE, "ANALYZE items")
    execute(dbpair.target_dsn, TARGET,
            f"ALTER DATABASE {dbpair.target_db} SET timezone = 'Asia/Kolkata'")
    _copy(dbpair, "items", "copy_items", "id, qty, label, price, seen, updated_at")
    for name in ("pairs", "words", "things"):
        _copy(dbpair, name, name)
    return dbpair


def _config(pair: DbPair, tmp_path: Path, extra: str = "") -> Path:
    overrides = "".join(
        f'[[table]]\nname = "{o["name"]}"\ntarget = "{o["target"]}"\n'
        f'exclude_columns = {json.dumps(o["exclude_columns"])}\n' for o in OVERRIDES)
    return write_config(tmp_path / "cdcsync.toml", pair, TABLES, overrides + extra)


def _keys(report: dict[str, Any], table: str) -> dict[str, list[dict[str, str]]]:
    entry = next(t for t in report["tables"] if t["table"] == table)
    return {kind: entry[kind]["keys"] for kind in
            ("missing_on_target", "extra_on_target", "different")}


def test_in_sync_exits_0(pair: DbPair, tmp_path: Path) -> None:
    """Equal tables, renamed and retyped on the target with a column excluded, verify clean."""
    result = cli("verify", "--json", config=_config(pair, tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["in_sync"] is True
    rows = {t["table"]: t["rows_compared"] for t in report["tables"]}
    assert rows == {"public.items": ROWS, "public.pairs": 1200, "public.words": 900,
                    "public.things": 900}


@pytest.mark.parametrize("extra", ["", "[verify]\nrange_rows = 500\n"])
def test_changed_deleted_added_rows_are_named(pair: DbPair, tmp_path: Path, extra: str) -> None:
    """One row changed, one deleted, one added on the target: exit 1 naming exactly those keys
    (found by cutting one range, or among many ranges summarised in one scan)."""
    execute(pair.target_dsn, "UPDATE copy_items SET price = price + 0.01 WHERE id = 4321",
            "DELETE FROM copy_items WHERE id = 17",
            "INSERT INTO copy_items SELECT 99999, qty, label, price, seen, updated_at "
            "FROM copy_items WHERE id = 1")
    try:
        config = _config(pair, tmp_path, extra)
        result = cli("verify", "--json", "--table", "public.items", config=config)
        assert result.returncode == 1, result.stdout + result.stderr
        assert _keys(json.loads(result.stdout), "public.items") == {
            "missing_on_target": [{"id": "17"}], "extra_on_target": [{"id": "99999"}],
            "different": [{"id": "4321"}]}
        table = cli("verify", "--table", "public.items", config=config)
        assert table.returncode == 1
        assert "public.items: missing on target: 17" in table.stdout
    finally:
        execute(pair.target_dsn, "DELETE FROM copy_items WHERE id IN (99999, 4321, 17)")
        _copy(pair, "items WHERE id IN (4321, 17)", "copy_items",
              "id, qty, label, price, seen, updated_at")


@pytest.mark.parametrize(("change", "keys"), [
    ("UPDATE copy_items SET label = NULL WHERE id = 100", [100]),
    # Alone in its range: an xor of column hashes over the range would not see it.
    ("UPDATE copy_items SET qty = 13 - qty WHERE id IN (200, 201)", [200, 201]),
])
def test_a_null_or_values_swapped_between_rows_are_differences(
        pair: DbPair, change: str, keys: list[int]) -> None:
    """A value turned NULL, or two rows' values swapped, are reported as different rows."""
    execute(pair.target_dsn, change)
    try:
        settings = settings_for(pair, TABLES, table=OVERRIDES)
        result = verify(settings, ["public.items"]).tables[0]
        assert (result.differences.missing, result.differences.extra) == ((), ())
        assert result.differences.differ == tuple((str(k),) for k in keys)
    finally:
        execute(pair.target_dsn, "DELETE FROM copy_items WHERE id IN (100, 200, 201)")
        _copy(pair, "items WHERE id IN (100, 200, 201)", "copy_items",
              "id, qty, label, price, seen, updated_at")


@pytest.mark.parametrize("range_rows", [100, 50_000])
def test_composite_text_and_uuid_keys(pair: DbPair, range_rows: int) -> None:
    """Differences in composite, text and uuid keyed tables are found, in small or whole ranges."""
    uuid_key = "c4ca4238-a0b9-2382-0dcc-509a6f75849b"  # md5('1')
    word = "c81e728d9d4c2f636f067f89cc14862c"  # md5('2')
    execute(pair.target_dsn, "UPDATE pairs SET v = -1 WHERE region = 'us' AND n = 200",
            "DELETE FROM pairs WHERE region = 'eu' AND n = 1",
            f"UPDATE words SET c = -2 WHERE w = '{word}'",
            "INSERT INTO words VALUES ('zzz', 0)",
            f"DELETE FROM things WHERE id = '{uuid_key}'")
    try:
        settings = settings_for(pair, TABLES, table=OVERRIDES, verify={"range_rows": range_rows})
        report = verify(settings, ["public.pairs", "public.words", "public.things"])
        found = {t.source_table: (t.differences.missing, t.differences.extra,
                                  t.differences.differ) for t in report.tables}
        assert found == {
            "public.pairs": ((("eu", "1"),), (), (("us", "200"),)),
            "public.words": ((), (("zzz",),), ((word,),)),
            "public.things": (((uuid_key,),), (), ()),
        }
    finally:
        execute(pair.target_dsn, "TRUNCATE pairs, words, things")
        for name in ("pairs", "words", "things"):
            _copy(pair, name, name)


def test_text_keys_under_different_collations(dbpair_factory: Any) -> None:
    """A text key collated differently on the target is ranged bytewise on both sides."""
    with dbpair_factory("verify_collation") as other:
        execute(other.source_dsn, "CREATE TABLE tags (t text PRIMARY KEY, n int)",
                "INSERT INTO tags SELECT 'tag ' || g, g FROM generate_series(1, 500) g")
        execute(other.target_dsn, 'CREATE TABLE tags (t text COLLATE "POSIX" PRIMARY KEY, n int)',
                "INSERT INTO tags SELECT 'tag ' || g, g FROM generate_series(2, 500) g")
        report = verify(settings_for(other, ("public.tags",), verify={"range_rows": 100}))
        assert report.tables[0].differences == Differences(missing=(("tag 1",),))
        assert report.tables[0].rows_compared == 500


def test_a_change_in_any_column_type_is_found(pair: DbPair) -> None:
    """One changed row per column type (arrays, date, bool, bytea, interval, json, timestamptz(3),
    and a value turned NULL) is reported, and nothing else."""
    changes = {
        2: "tags = ARRAY['t2', 'v']", 3: "amounts = ARRAY[1.01, NULL]", 4: "born = born + 1",
        5: "ok = NOT ok", 6: "raw = raw || '\\x00'", 7: "span = span + interval '1 second'",
        8: "doc = '{\"g\": 8.0}'", 10: "at = at + interval '1 millisecond'", 11: "tags = NULL",
    }
    statements = [f"UPDATE things SET {change} WHERE id = md5('{g}')::uuid"
                  for g, change in changes.items()]
    execute(pair.target_dsn, *statements)
    try:
        report = verify(settings_for(pair, TABLES, table=OVERRIDES), ["public.things"])
        with psycopg.connect(pair.source_dsn) as conn:
            expected = sorted((str(r[0]),) for r in conn.execute(
                "SELECT md5(g::text)::uuid FROM unnest(%s::int[]) g", (list(changes),)))
        assert report.tables[0].differences == Differences(differ=tuple(expected))
    finally:
        execute(pair.target_dsn, "TRUNCATE things")
        _copy(pair, "things", "things")


def test_timestamptz_is_compared_exactly_at_its_extremes(dbpair_factory: Any) -> None:
    """timestamptz values a microsecond apart, infinities swapped, or NULL against infinity
    differ; equal values at both ends of the type's range and before 2000 do not."""
    rows = ("INSERT INTO stamps VALUES (1, '2024-01-01 12:00:00.000001+00'), "
            "(2, '1850-03-04 01:02:03.000001+00'), (3, 'infinity'), (4, '-infinity'), "
            "(5, NULL), (6, '294276-12-31 23:59:59.999999+00'), (7, '4713-11-24 00:00+00 BC')")
    with dbpair_factory("verify_stamps") as other:
        for dsn in (other.source_dsn, other.target_dsn):
            execute(dsn, "CREATE TABLE stamps (id int PRIMARY KEY, at timestamptz)", rows)
        execute(other.target_dsn, f"ALTER DATABASE {other.target_db} SET timezone = 'Asia/Tokyo'",
                "UPDATE stamps SET at = at + interval '1 microsecond' WHERE id = 1",
                "UPDATE stamps SET at = '-infinity' WHERE id = 3",
                "UPDATE stamps SET at = 'infinity' WHERE id = 5")
        report = verify(settings_for(other, ("public.stamps",)))
        assert report.tables[0].differences == Differences(differ=(("1",), ("3",), ("5",)))
        assert report.tables[0].rows_compared == 7


def test_verify_keys_checks_exactly_the_given_keys(pair: DbPair) -> None:
    """verify_keys reports which of the given keys differ, and nothing once they are repaired."""
    settings = settings_for(pair, TABLES, table=OVERRIDES)
    keys = [("31",), ("32",), ("33",), ("99998",)]
    execute(pair.target_dsn, "UPDATE copy_items SET qty = -1 WHERE id = 31",
            "DELETE FROM copy_items WHERE id = 32")
    try:
        assert verify_keys(settings, "public.items", keys) == Differences(
            missing=(("32",),), differ=(("31",),))
    finally:
        execute(pair.target_dsn, "DELETE FROM copy_items WHERE id IN (31, 32)")
        _copy(pair, "items WHERE id IN (31, 32)", "copy_items",
              "id, qty, label, price, seen, updated_at")
    assert verify_keys(settings, "public.items", keys) == Differences()


@contextmanager
def _verifiers(pair: DbPair, range_rows: int) -> Iterator[tuple[Sides, dict[str, TableVerifier]]]:
    settings = settings_for(pair, TABLES, table=OVERRIDES, verify={"range_rows": range_rows})
    with open_sides(settings) as sides:
        tables = catalog.selected_tables(sides.source, settings.tables)
        yield sides, {t.qualified: TableVerifier(
            sides, table_spec(sides.source, sides.target, settings, t), settings.verify)
            for t in tables}


@pytest.mark.parametrize(("table", "width"), [("public.items", 1), ("public.pairs", 1),
                                                ("public.pairs", 2), ("public.words", 1)])
def test_range_bounds_are_the_samples_quantiles(pair: DbPair, table: str, width: int) -> None:
    """The source picks the bounds at positions ``n * i // parts`` of the sampled keys, as the
    whole sample would give them, for every split from one part to more parts than keys; with
    no number of parts, runs of ``range_rows`` sampled keys."""
    with _verifiers(pair, 100) as (sides, verifiers):
        side = verifiers[table].spec.source
        every_key = q.every_nth_key(side, KeyRange(None, None), 1)
        keys = [r[:width] for r in sides.on_source(fetch(every_key))]
        n = len(keys)

        def expected(parts: int) -> list[tuple[Any, ...]]:
            return list(dict.fromkeys(keys[n * i // parts] for i in range(1, parts)))

        def bounds(parts: int | None, range_rows: int) -> list[tuple[Any, ...]]:
            query = q.sample_bounds(side, 100.0, parts, range_rows, width)
            return list(dict.fromkeys(sides.on_source(fetch(query))))

        for parts in (1, 2, 7, 12, n - 1, n, n + 5):
            assert bounds(parts, 100) == expected(parts), (parts, n)
        assert bounds(None, 250) == expected(-(-n // 250))


def test_first_level_ranges_hold_about_range_rows(pair: DbPair) -> None:
    """An analysed table of 12,000 rows in ranges of 1,000: twelve ranges covering every row,
    none more than twice its share."""
    with _verifiers(pair, 1_000) as (sides, verifiers):
        side = verifiers["public.items"].spec.source
        ranges = verifiers["public.items"].ranges()
        counts = [int(r[1]) for r in sides.on_source(fetch(q.summaries(side, ranges)))]
    assert len(ranges) == 12
    assert sum(counts) == ROWS
    assert max(counts) <= 2_000


def test_progress_counts_every_range(pair: DbPair) -> None:
    """A table in sync is one step (one pass over the whole table); a table that differs then
    reports every first-level range done, in order."""
    seen: dict[str, list[tuple[int, int]]] = {}

    def progress(table: str) -> Callable[[int, int], None]:
        return lambda done, total: seen.setdefault(table, []).append((done, total))

    execute(pair.target_dsn, "UPDATE words SET c = -c WHERE c = 7")
    try:
        verify(settings_for(pair, TABLES, table=OVERRIDES, verify={"range_rows": 300}),
               ["public.words", "public.things"], progress)
    finally:
        execute(pair.target_dsn, "UPDATE words SET c = -c WHERE c = -7")
    assert seen["public.things"] == [(1, 1)]
    total = seen["public.words"][-1][1]
    assert total >= 2
    assert seen["public.words"] == [(done, total) for done in range(1, total + 1)]


def test_unknown_table_exits_2(pair: DbPair, tmp_path: Path) -> None:
    """--table naming an unconfigured table is an error (exit 2) that lists the choices."""
    result = cli("verify", "--table", "public.nope", config=_config(pair, tmp_path))
    assert result.returncode == 2
    assert "--table public.nope: not among the configured tables" in result.stderr
    assert "public.items" in result.stderr


def test_missing_target_table_exits_2(pair: DbPair, tmp_path: Path) -> None:
    """A target table that does not exist stops verify with exit 2 (not 1, "differs")."""
    config = write_config(tmp_path / "c.toml", pair, ("public.words",),
                          '[[table]]\nname = "public.words"\ntarget = "public.nowhere"\n')
    result = cli("verify", config=config)
    assert result.returncode == 2
    assert "target table public.nowhere does not exist (source public.words)" in result.stderr


def _workload(conn: psycopg.Connection[Any], rng: random.Random) -> None:
    with conn.transaction():
        key = rng.randint(1, 3000)
        conn.execute("UPDATE live SET v = v + 1, updated_at = now() WHERE id = %s", (key,))
        conn.execute("INSERT INTO live (id, v) VALUES (%s, 0) ON CONFLICT (id) DO UPDATE "
                     "SET v = live.v - 1, updated_at = now()", (rng.randint(3001, 3500),))
        conn.execute("DELETE FROM live WHERE id = %s", (rng.randint(3001, 3500),))


def test_workload_during_verify_reports_nothing(dbpair_factory: Any) -> None:
    """With the daemon streaming a live workload, verify reports no difference."""
    with dbpair_factory("verify_live") as live_pair:
        execute(live_pair.source_dsn, "CREATE TABLE live (id int PRIMARY KEY, v int, "
                                      "updated_at timestamptz NOT NULL DEFAULT now())")
        settings = settings_for(live_pair, ("public.live",), verify={"range_rows": 500})
        admin.setup(settings, create_tables=True)
        stop = threading.Event()
        writers = [writer(live_pair.source_dsn, stop, seed, _workload, pause_s=0.005)
                   for seed in (1, 2)]
        with running(settings) as runner:
            execute(live_pair.source_dsn, "INSERT INTO live (id, v) SELECT g, 0 "
                                          "FROM generate_series(1, 3000) g")
            wait_for(converged(live_pair, ["public.live"]), runner=runner, timeout=60)
            for thread in writers:
                thread.start()
            try:
                reports = [verify(settings) for _ in range(3)]
            finally:
                stop.set()
                for thread in writers:
                    thread.join(10)
        assert [r.tables[0].differences.count for r in reports] == [0, 0, 0]
        assert all(r.tables[0].rows_compared >= 3000 for r in reports)


def test_verify_awaits_a_daemon_that_lost_its_lock_for_a_moment(dbpair_factory: Any) -> None:
    """Its lock's session killed, the daemon stops streaming and holds neither the slot nor the
    lock for a few seconds (a standby's turn) before it takes the lock again. A change written
    meanwhile is not reported: verify finds the daemon answering its probe and awaits the
    checkpoint."""
    with dbpair_factory("verify_probe") as live:
        execute(live.source_dsn, "CREATE TABLE live (id int PRIMARY KEY, v int, "
                                 "updated_at timestamptz NOT NULL DEFAULT now())")
        settings = settings_for(live, ("public.live",),
                                http={"listen": f"127.0.0.1:{free_port()}"})
        admin.setup(settings, create_tables=True)
        with running(settings) as runner:
            execute(live.source_dsn, "INSERT INTO live (id, v) SELECT g, 0 "
                                     "FROM generate_series(1, 100) g")
            wait_for(converged(live, ["public.live"]), runner=runner, timeout=60)
            with psycopg.connect(live.target_dsn, autocommit=True) as conn:
                holder = leader.lock_holder(conn, live.slot)
                assert holder is not None
                conn.execute("SELECT pg_terminate_backend(%s)", (holder.backend_pid,))
            wait_for(lambda: not _slot_held(live), runner=runner, timeout=10,
                     what="the daemon letting the slot go")
            execute(live.source_dsn, "UPDATE live SET v = 1 WHERE id = 7")
            report = verify(settings)
        assert report.tables[0].differences.count == 0, report.tables[0].differences


def _slot_held(pair: DbPair) -> bool:
    with psycopg.connect(pair.source_dsn, autocommit=True) as conn:
        info = catalog.slot_info(conn, pair.slot)
    return info is not None and info.active_pid is not None


def _gauges(metrics: Metrics) -> dict[str, float]:
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name.startswith("cdcsync_verify_"):
                table = sample.labels.get("table")
                found[sample.name + (f"[{table}]" if table else "")] = sample.value
    return found


def test_scheduled_verification_rotates_through_ranges(pair: DbPair) -> None:
    """Each run compares a few ranges; the full pass is stamped once every range was compared."""
    execute(pair.target_dsn, "DELETE FROM words WHERE c = 450")
    try:
        settings = settings_for(pair, ("public.words",),
                                verify={"range_rows": 100, "sample_ranges": 4})
        metrics = Metrics(pair.slot)
        job = ScheduledVerify(settings, metrics, clock=lambda: 1234.0)
        job.run()
        job.run()
        assert "cdcsync_verify_last_full_pass_timestamp_seconds" not in _gauges(metrics)
        job.run()  # 900 rows in 100-row ranges: the third run of four ranges ends the pass
        assert _gauges(metrics) == {
            "cdcsync_verify_differences[public.words]": 1.0,
            "cdcsync_verify_last_full_pass_timestamp_seconds": 1234.0,
        }
    finally:
        _copy(pair, "words WHERE c = 450", "words")


def test_the_daemons_own_verification_awaits_changes_in_flight(dbpair_factory: Any) -> None:
    """The daemon's scheduled verification treats a difference as a change in flight even when
    neither the slot nor its lock is held, as while the daemon reconnects after a target restart:
    it awaits the checkpoint and fails, saying so, rather than report an unapplied change."""
    with dbpair_factory("verify_consuming") as live:
        execute(live.source_dsn, "CREATE TABLE live (id int PRIMARY KEY, v int, "
                                 "updated_at timestamptz NOT NULL DEFAULT now())")
        settings = settings_for(live, ("public.live",), verify={"catchup_timeout_s": 1})
        admin.setup(settings, create_tables=True)
        with running(settings) as runner:
            execute(live.source_dsn, "INSERT INTO live (id, v) SELECT g, 0 "
                                     "FROM generate_series(1, 100) g")
            wait_for(converged(live, ["public.live"]), runner=runner, timeout=60)
        execute(live.source_dsn, "UPDATE live SET v = 1 WHERE id = 7")
        metrics = Metrics(live.slot)
        with pytest.raises(VerifyError, match="did not reach the source position"):
            ScheduledVerify(settings, metrics, consuming=True).run()
        assert "cdcsync_verify_differences[public.live]" not in _gauges(metrics)
        ScheduledVerify(settings, metrics).run()  # nothing streams: the difference stands
        assert _gauges(metrics)["cdcsync_verify_differences[public.live]"] == 1.0


def _full_pass(job: ScheduledVerify, metrics: Metrics) -> tuple[int, float]:
    """Run ``job`` until it stamps a full pass: the runs it took and the differences it shows."""
    stamp = _gauges(metrics).get("cdcsync_verify_last_full_pass_timestamp_seconds")
    for runs in range(1, 20):
        job.run()
        gauges = _gauges(metrics)
        if gauges.get("cdcsync_verify_last_full_pass_timestamp_seconds") != stamp:
            return runs, gauges["cdcsync_verify_differences[public.appended]"]
    raise AssertionError("no full pass in 19 runs")


def test_a_scheduled_pass_ends_at_the_greatest_key_at_its_start(pair: DbPair) -> None:
    """Rows appended during a pass are left to the next pass instead of swelling its last range;
    the greatest key at the start, here a row only the target holds, is compared."""
    table = "CREATE TABLE appended (id bigint PRIMARY KEY, v text)"
    execute(pair.source_dsn, table, "INSERT INTO appended SELECT g, md5(g::text) "
                                    "FROM generate_series(1, 40000) g", "ANALYZE appended")
    execute(pair.target_dsn, table)
    _copy(pair, "appended", "appended")
    execute(pair.target_dsn, "INSERT INTO appended VALUES (50000, 'only on the target')")
    runs = iter(range(1, 100))
    try:
        # 10,000-row ranges are cut again (more than 5,000 rows), the closed one too.
        settings = settings_for(pair, ("public.appended",),
                                verify={"range_rows": 10_000, "sample_ranges": 1})
        metrics = Metrics(pair.slot)
        job = ScheduledVerify(settings, metrics, clock=lambda: float(next(runs)))
        job.run()
        execute(pair.source_dsn, "INSERT INTO appended SELECT g, 'new' "
                                 "FROM generate_series(50001, 60000) g")
        first_runs, first = _full_pass(job, metrics)
        assert (1 + first_runs, first) == (4, 1.0)
        assert _full_pass(job, metrics)[1] == 10_001.0
    finally:
        for dsn in (pair.source_dsn, pair.target_dsn):
            execute(dsn, "DROP TABLE appended")


def test_a_verify_whose_target_link_dies_fails_instead_of_waiting(
        pair: DbPair, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A middlebox stops relaying the target connection but keeps it open: verify's question
    would wait for ever. The link watch verify runs while open finds the target waiting on
    verify and verify on the target, and cuts the connection, so verify fails with the lost
    connection's error instead."""
    monkeypatch.setattr(sides_module, "LinkWatch", partial(LinkWatch, silent_s=1.0))
    port = int(conninfo_to_dict(pair.target_dsn)["port"] or 5432)
    with Relay(port, 0.0) as relay:
        through = make_conninfo(pair.target_dsn, host="127.0.0.1", port=relay.port)
        with open_sides(settings_for(pair, TABLES, target={"dsn": through})) as sides:
            assert sides.on_target(lambda c: c.execute("SELECT 1").fetchone()) == (1,)
            relay.freeze()
            asked = sides._target_thread.submit(lambda: sides.target.execute("SELECT 1"))
            try:
                assert isinstance(asked.exception(timeout=30), psycopg.OperationalError)
            finally:
                if not asked.done():  # uncut, it would keep closing the sides waiting too
                    with socket.socket(fileno=os.dup(sides.target.fileno())) as sock:
                        sock.shutdown(socket.SHUT_RDWR)
    cut = [getattr(r, "cdcsync_fields", {}).get("application") for r in caplog.records
           if r.getMessage() == "link_cut"]
    assert cut == ["cdcsync-verify"]
