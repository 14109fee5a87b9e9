"""How often the applier waits for the target, counted by the WAN bench's relay: a batch of one
table is one query with its COPY in the middle, so it costs two waits, conflicts included."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool

from bench.relay import Link, Relay
from cdcsync import checkpoint, libpq, pipeline, roundtrip
from cdcsync.apply import batch_size, tables
from cdcsync.apply import script as plan
from cdcsync.apply import sql as q
from cdcsync.apply.applier import Applier, Committed
from cdcsync.apply.lanes import Lanes
from cdcsync.apply.merge import Merger
from cdcsync.apply.script import Script, Staged
from cdcsync.backfill import snapshot
from cdcsync.health import Health
from cdcsync.metrics import Metrics
from cdcsync.model import ChangeChunk, Column, Lsn, Relation, TableRows, TargetTable, TxnEnd
from cdcsync.source import tuples
from cdcsync.source.tuples import stage_values
from tests.conftest import DbPair
from tests.harness import execute, settings_for

TABLE = "CREATE TABLE items (id int PRIMARY KEY, qty int NOT NULL, updated_at timestamptz)"
RELATION = Relation(16384, "public", "items", "d", (
    Column("id", 23, -1, True), Column("qty", 23, -1, False),
    Column("updated_at", 1184, -1, False)))
EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def relayed(dbpair: DbPair) -> Iterator[tuple[psycopg.Connection[TupleRow], Link]]:
    """A target connection through the relay, and the relay's count of its waits."""
    execute(dbpair.target_dsn, TABLE)
    with psycopg.connect(dbpair.target_dsn, autocommit=True) as conn:
        checkpoint.install_metadata(conn)
    port = int(str(conninfo_to_dict(dbpair.target_dsn)["port"]))
    with Relay(port, 0.0) as relay, psycopg.connect(make_conninfo(
            dbpair.target_dsn, host="127.0.0.1", port=relay.port)) as conn:
        yield conn, relay.links[0]


def _chunk(applier: Applier, rows: list[tuple[int, int, str]], lsn: int,
           relation: Relation = RELATION, target: TargetTable | None = None) -> ChangeChunk:
    """Inserts then updates of ``(id, qty, op)``, all stamped now; the target table resolved on
    the applier's connection unless given."""
    target = target or tables.resolve(applier.conn, applier.settings, relation)
    micros = (NOW - EPOCH) // dt.timedelta(microseconds=1)
    staged, _ = stage_values(relation, [
        ((str(key).encode(), str(qty).encode(), NOW.isoformat().encode()), ord(op), seq, lsn,
         micros) for seq, (key, qty, op) in enumerate(rows)])
    table_rows = TableRows(relation, target, [staged], inserts=sum(op == "I" for *_, op in rows),
                           updates=sum(op == "U" for *_, op in rows))
    return ChangeChunk((table_rows,), len(rows), len(staged))


def _batch(applier: Applier, rows: list[tuple[int, int, str]], lsn: int,
           relation: Relation = RELATION) -> None:
    applier.start()
    applier.add(_chunk(applier, rows, lsn, relation))
    applier.end(TxnEnd(Lsn(lsn), NOW))


def test_one_table_batch_costs_two_waits(
        dbpair: DbPair, relayed: tuple[psycopg.Connection[TupleRow], Link]) -> None:
    """A one-table batch of inserts and updates, one of which loses to a newer target row, costs
    2 waits with its conflict recorded and checkpoint committed; an idle advance costs 1."""
    conn, link = relayed
    applier = Applier(conn, settings_for(dbpair))
    _batch(applier, [(1, 1, "I"), (2, 2, "I"), (3, 3, "I")], 0x1000)
    applier.commit()  # the first batch also reads the table's foreign keys, once
    execute(dbpair.target_dsn, "UPDATE items SET updated_at = now() + interval '1 day' "
                               "WHERE id = 3")
    _batch(applier, [(1, 10, "U"), (3, 30, "U"), (4, 4, "I")], 0x2000)
    before = link.waits
    done = applier.commit()
    assert link.waits - before <= 2
    assert done.conflicts == {"public.items": 1}
    before = link.waits
    applier.advance(Lsn(0x3000))
    assert link.waits - before == 1
    with psycopg.connect(dbpair.target_dsn) as check:
        assert check.execute("SELECT id, qty FROM items ORDER BY id").fetchall() == [
            (1, 10), (2, 2), (3, 3), (4, 4)]
        assert check.execute("SELECT lsn::text FROM cdcsync.checkpoint").fetchall() == [
            ("0/3000",)]
        assert check.execute("SELECT count(*) FROM cdcsync.conflicts").fetchone() == (1,)


def test_a_first_batch_asks_for_foreign_keys_only_among_tables_and_without_a_begin(
        dbpair: DbPair, relayed: tuple[psycopg.Connection[TupleRow], Link]) -> None:
    """A new applier's first batch of one table has no foreign-key order to ask for: 2 waits,
    where the question cost 3. Of two tables, it asks in autocommit and the batch's query opens
    the transaction: 4 waits (one more for the second table's rows), where a BEGIN cost 5."""
    conn, link = relayed
    settings = settings_for(dbpair)
    execute(dbpair.target_dsn, TABLE.replace("items", "notes"))
    notes = Relation(16390, "public", "notes", "d", RELATION.columns)
    with psycopg.connect(dbpair.target_dsn) as direct:
        target = tables.resolve(direct, settings, RELATION)
        notes_target = tables.resolve(direct, settings, notes)
    # Negative keys: the other tests count the rows from 1 up.
    for lsn, relations, waits in ((0x3800, [(RELATION, target)], 2),
                                  (0x3900, [(RELATION, target), (notes, notes_target)], 4)):
        applier = Applier(conn, settings)
        applier.start()
        for relation, resolved in relations:
            applier.add(_chunk(applier, [(-lsn, 1, "I"), (-lsn - 1, 1, "I")], lsn, relation,
                               target=resolved))
        applier.end(TxnEnd(Lsn(lsn), NOW))
        before = link.waits
        applier.commit()
        assert link.waits - before == waits
    with psycopg.connect(dbpair.target_dsn) as check:
        assert check.execute("SELECT count(*) FROM items WHERE id < 0").fetchone() == (4,)
        assert check.execute("SELECT count(*) FROM notes WHERE id < 0").fetchone() == (2,)


def test_a_table_is_resolved_in_one_round_trip(
        dbpair: DbPair, relayed: tuple[psycopg.Connection[TupleRow], Link]) -> None:
    """Columns, types and the primary key, here of two columns in the key's order (not the
    table's), come in one query: the first batch waits for it."""
    conn, link = relayed
    execute(dbpair.target_dsn, "CREATE TABLE pairs (a int, b int, v text, PRIMARY KEY (b, a))")
    relation = Relation(16385, "public", "pairs", "d", (
        Column("a", 23, -1, True), Column("b", 23, -1, True), Column("v", 25, -1, False)))
    with roundtrip.autocommit(conn):
        before = link.waits
        table = tables.resolve(conn, settings_for(dbpair), relation)
        assert link.waits - before == 1
    assert (table.columns, table.types, table.key, table.source_key) == (
        ("a", "b", "v"), ("integer", "integer", "text"), (1, 0), (1, 0))


def test_the_checks_describe_every_table_in_one_round_trip_and_resolve_takes_their_rows(
        dbpair: DbPair, relayed: tuple[psycopg.Connection[TupleRow], Link]) -> None:
    """What the checks read of all target tables at once resolves a table as its own query
    would, without a round trip; a table that does not exist is absent from it."""
    conn, link = relayed
    execute(dbpair.target_dsn, "CREATE TABLE twins (a int, b int, v text, PRIMARY KEY (b, a))")
    relation = Relation(16386, "public", "twins", "d", (
        Column("a", 23, -1, True), Column("b", 23, -1, True), Column("v", 25, -1, False)))
    settings = settings_for(dbpair)
    with roundtrip.autocommit(conn):
        before = link.waits
        found = tables.described(conn, ["public.twins", "public.items", "public.absent"])
        assert link.waits - before == 1
        assert set(found) == {"public.twins", "public.items"}
        before = link.waits
        hinted = tables.resolve(None, settings, relation, rows=found["public.twins"])
        assert link.waits == before
        assert hinted == tables.resolve(conn, settings, relation)
    assert (hinted.columns, hinted.key) == (("a", "b", "v"), (1, 0))


def test_the_pool_checks_a_connection_only_after_a_second_unused(
        dbpair: DbPair, monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection opened or given back less than a second ago is lent without a round trip;
    an older one is checked first, and one whose server process is gone is replaced."""
    port = int(str(conninfo_to_dict(dbpair.target_dsn)["port"]))
    with Relay(port, 0.0) as relay:
        relayed = make_conninfo(dbpair.target_dsn, host="127.0.0.1", port=relay.port)
        pool = pipeline.open_target_pool(settings_for(dbpair, target={"dsn": relayed}))
        try:
            pool.wait(timeout=10)
            with pool.connection() as conn:
                conn.execute("SELECT 1")
            # All opened (the pool's minimum, which wait() waits for): none is opened later.
            links = relay.links
            assert len(links) == 4
            before = sum(link.waits for link in links)
            with pool.connection():
                pass
            assert sum(link.waits for link in links) == before
            monkeypatch.setattr(pipeline, "_CHECK_AFTER_S", 0.0)
            with pool.connection():
                pass
            assert sum(link.waits for link in links) == before + 1
            execute(dbpair.target_dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                       "WHERE application_name = 'cdcsync' "
                                       "AND datname = current_database()")
            for _ in range(3):
                with pool.connection() as conn:
                    assert conn.execute("SELECT 1").fetchone() == (1,)
        finally:
            pool.close()


def test_a_transaction_crossing_max_rows_joins_the_batch_max_bytes_flushes(
        dbpair: DbPair, relayed: tuple[psycopg.Connection[TupleRow], Link]) -> None:
    """A small transaction that tips the batch over ``max_rows`` is merged with it at commit
    (no flush of its own while it is added); one that tips it over ``max_bytes`` is flushed
    right away, though it alone fills neither limit: staged memory stays bounded."""
    conn, link = relayed
    by_rows = Applier(conn, settings_for(dbpair, apply={"max_rows": 4}))
    _batch(by_rows, [(11, 1, "I"), (12, 1, "I"), (13, 1, "I")], 0x4000)
    crossing = _chunk(by_rows, [(14, 1, "I"), (15, 1, "I")], 0x5000)
    by_rows.start()
    before = link.waits
    by_rows.add(crossing)
    assert link.waits == before
    by_rows.end(TxnEnd(Lsn(0x5000), NOW))
    assert by_rows.batch_full()
    by_rows.commit()

    by_bytes = Applier(conn, settings_for(dbpair, apply={"max_bytes": 1024}))
    first = _chunk(by_bytes, [(20 + i, 1, "I") for i in range(6)], 0x6000)
    second = _chunk(by_bytes, [(40 + i, 1, "I") for i in range(6)], 0x7000)
    assert first.size_bytes < 1024 and second.size_bytes < 1024
    assert first.size_bytes + second.size_bytes >= 1024
    by_bytes.start()
    by_bytes.add(first)
    by_bytes.end(TxnEnd(Lsn(0x6000), NOW))
    by_bytes.start()
    before = link.waits
    by_bytes.add(second)
    assert link.waits > before
    by_bytes.end(TxnEnd(Lsn(0x7000), NOW))
    by_bytes.commit()
    with psycopg.connect(dbpair.target_dsn) as check:
        assert check.execute("SELECT count(*) FROM items WHERE id >= 11").fetchone() == (17,)
        assert check.execute("SELECT lsn::text FROM cdcsync.checkpoint").fetchall() == [
            ("0/7000",)]


def test_a_batch_of_inserts_is_copied_straight_into_its_table(
        dbpair: DbPair, relayed: tuple[psycopg.Connection[TupleRow], Link]) -> None:
    """Inserts alone skip the stage (none is created) in two waits; when one meets a newer row
    already on the target, the batch is staged after all and goes through the rule. As Python
    (no compiled modules) they are staged: converting them would cost more than it saves."""
    execute(dbpair.target_dsn, "CREATE TABLE straight (id int PRIMARY KEY, qty int NOT NULL, "
                               "updated_at timestamptz)")
    relation = Relation(16385, "public", "straight", "d", RELATION.columns)
    conn, link = relayed
    applier = Applier(conn, settings_for(dbpair))
    stage = q.stage_name(tables.resolve(conn, applier.settings, relation), relation)

    def staged_tables() -> int:
        with psycopg.connect(dbpair.target_dsn) as check:
            row = check.execute("SELECT count(*) FROM pg_class WHERE relname = %s",
                                (stage,)).fetchone()
        assert row is not None
        return int(row[0])

    _batch(applier, [(1, 1, "I"), (2, 2, "I")], 0x8000, relation)
    applier.commit()
    _batch(applier, [(3, 3, "I"), (4, 4, "I")], 0x9000, relation)
    before = link.waits
    applier.commit()
    assert link.waits - before <= 2
    assert staged_tables() == (0 if tuples.COMPILED else 1)
    execute(dbpair.target_dsn, "INSERT INTO straight VALUES (6, 60, now() + interval '1 day')")
    _batch(applier, [(5, 5, "I"), (6, 6, "I")], 0xA000, relation)
    done = applier.commit()
    assert done.conflicts == {"public.straight": 1}
    assert staged_tables() == 1
    with psycopg.connect(dbpair.target_dsn) as check:
        assert check.execute("SELECT id, qty FROM straight ORDER BY id").fetchall() == [
            (1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 60)]
        assert check.execute("SELECT lsn::text FROM cdcsync.checkpoint").fetchall() == [
            ("0/A000",)]


def test_a_merge_is_rendered_once_per_shape_of_flush(
        dbpair: DbPair, relayed: tuple[psycopg.Connection[TupleRow], Link]) -> None:
    """Flushes of one shape reuse the rendered merge, wherever it lands in the script (its
    savepoint and conflict records follow); another shape gets its own statements."""
    conn, _ = relayed
    merger = Merger("slot", "halt")
    table = tables.resolve(conn, settings_for(dbpair), RELATION)

    def script_for(*, begin: bool, deletes: int) -> Script:
        batch = Staged(table, RELATION, q.stage_name(table, RELATION),
                       [TableRows(RELATION, table, [b""])], only_inserts=False, inserts=1,
                       deletes=deletes)
        script = Script()
        if begin:
            script.add(plan.BEGIN)
        merger.add_merge(script, [batch], conn)
        return script

    first = script_for(begin=True, deletes=0)
    again = script_for(begin=False, deletes=0)
    other = script_for(begin=True, deletes=1)
    assert all(a is b for a, b in zip(again.statements, first.statements[1:], strict=True))
    assert first.merge == range(again.merge.start + 1, again.merge.stop + 1)
    assert first.conflicts == {i + 1: what for i, what in again.conflicts.items()}
    assert first.conflicts  # the table has a conflict column: its records are indexed
    assert b'DELETE FROM "public"."items"' in other.render(conn)
    assert b'DELETE FROM "public"."items"' not in first.render(conn)


def test_a_target_key_generated_always_as_identity_takes_the_source_values(
        dbpair: DbPair, relayed: tuple[psycopg.Connection[TupleRow], Link]) -> None:
    """A target made from the source's schema dump keeps ``GENERATED ALWAYS AS IDENTITY``, which
    refuses a plain INSERT of a value: inserts, the upsert of a mixed batch and a key already
    there all apply the source's keys."""
    execute(dbpair.target_dsn, "CREATE TABLE dumped (id int GENERATED ALWAYS AS IDENTITY "
                               "PRIMARY KEY, qty int NOT NULL, updated_at timestamptz)",
            "INSERT INTO dumped (qty, updated_at) VALUES (70, now() - interval '1 day')")
    relation = Relation(16387, "public", "dumped", "d", RELATION.columns)
    conn, _ = relayed
    applier = Applier(conn, settings_for(dbpair))
    _batch(applier, [(5, 5, "I"), (6, 6, "I")], 0xD000, relation)
    applier.commit()
    _batch(applier, [(7, 7, "I"), (5, 50, "U"), (1, 10, "I")], 0xE000, relation)
    applier.commit()
    with psycopg.connect(dbpair.target_dsn) as check:
        assert check.execute("SELECT id, qty FROM dumped ORDER BY id").fetchall() == [
            (1, 10), (5, 50), (6, 6), (7, 7)]


@pytest.mark.usefixtures("relayed")  # it installs the metadata schema
def test_a_table_under_row_level_security_is_not_copied_straight(
        dbpair: DbPair, caplog: pytest.LogCaptureFixture) -> None:
    """COPY FROM refuses a table whose row-level security applies to the role, even where its
    policies let INSERT through: such a table's inserts are staged from the start, never
    refused and replayed."""
    execute(dbpair.target_dsn,
            "CREATE TABLE secured (id int PRIMARY KEY, qty int NOT NULL, updated_at timestamptz)",
            "CREATE ROLE rls_apply LOGIN PASSWORD 'rls-apply'",
            "GRANT SELECT, INSERT, UPDATE, DELETE ON secured TO rls_apply",
            "GRANT USAGE ON SCHEMA cdcsync TO rls_apply",
            "GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA cdcsync TO rls_apply",
            "ALTER TABLE secured ENABLE ROW LEVEL SECURITY",
            "CREATE POLICY apply_all ON secured TO rls_apply USING (true) WITH CHECK (true)")
    relation = Relation(16388, "public", "secured", "d", RELATION.columns)
    try:
        with psycopg.connect(make_conninfo(dbpair.target_dsn, user="rls_apply",
                                           password="rls-apply")) as conn:
            applier = Applier(conn, settings_for(dbpair))
            _batch(applier, [(1, 1, "I"), (2, 2, "I")], 0xF000, relation)
            applier.commit()
        with psycopg.connect(dbpair.target_dsn) as check:
            assert check.execute("SELECT id, qty FROM secured ORDER BY id").fetchall() == [
                (1, 1), (2, 2)]
        assert "batch_replayed_in_source_order" not in caplog.text
    finally:
        execute(dbpair.target_dsn, "DROP TABLE secured", "DROP OWNED BY rls_apply",
                "DROP ROLE rls_apply")


def test_the_stream_starts_from_the_checkpoint_read_with_the_copy_states(dbpair: DbPair) -> None:
    """Before streaming, the copy states are registered and read with the checkpoint in one
    round trip (its table copied already, no snapshot moves the checkpoint): the stream starts
    from that checkpoint without asking again."""
    execute(dbpair.source_dsn, TABLE.replace("items", "copied"))
    with psycopg.connect(dbpair.target_dsn, autocommit=True) as conn:
        checkpoint.install_metadata(conn)
        conn.execute("INSERT INTO cdcsync.checkpoint (slot, lsn) VALUES (%s, '0/4000') "
                     "ON CONFLICT DO NOTHING", (dbpair.slot,))
        conn.execute("INSERT INTO cdcsync.table_state (slot, table_name, state) "
                     "VALUES (%s, 'public.copied', 'ready')", (dbpair.slot,))
    port = int(str(conninfo_to_dict(dbpair.target_dsn)["port"]))
    with Relay(port, 0.0) as relay, ConnectionPool(make_conninfo(
            dbpair.target_dsn, host="127.0.0.1", port=relay.port), min_size=1) as pool:
        pool.wait()
        (link,) = relay.links
        before = link.waits
        saved = snapshot.prepare(settings_for(dbpair, ("public.copied",)), pool,
                                 threading.Event(),
                                 snapshot.Hooks(started=lambda: None, alive=lambda: None))
        assert link.waits - before == 1
    with psycopg.connect(dbpair.target_dsn) as direct:
        assert saved is not None and saved == checkpoint.load(direct, dbpair.slot)


def test_auto_batches_grow_with_the_round_trip_their_copies_waited(
        dbpair: DbPair, relayed: tuple[psycopg.Connection[TupleRow], Link]) -> None:
    """With ``max_rows = "auto"`` a batch holds 20,000 rows until one has measured the round
    trip. Near the target, its COPY waits under 10 ms and the limit stays near there; 10 ms
    away each way, the COPY waits about 20 ms and later batches hold about 60,000 rows. A
    fixed ``max_rows`` measures the same wait and stays as configured."""
    near_conn, _ = relayed
    near = Applier(near_conn, settings_for(dbpair))
    assert near.batch_size.rows() == batch_size.FLOOR and near.batch_size.round_trip_s is None
    _batch(near, [(1001, 1, "I")], 0x10000)
    near.commit()
    # Well under 7 ms on an idle machine, when the limit stays at its floor; under 10 ms on a
    # loaded one.
    near_wait = near.batch_size.round_trip_s
    assert near_wait is not None and near_wait < 0.01
    assert near.batch_size.rows() == batch_size.rows_for(near_wait) < 30_000
    port = int(str(conninfo_to_dict(dbpair.target_dsn)["port"]))
    with Relay(port, 0.01) as relay, psycopg.connect(make_conninfo(
            dbpair.target_dsn, host="127.0.0.1", port=relay.port)) as far_conn:
        far = Applier(far_conn, settings_for(dbpair))
        _batch(far, [(1002, 1, "I"), (1003, 1, "I")], 0x11000)
        far.commit()
        waited = far.batch_size.round_trip_s
        assert waited is not None and waited >= 0.019
        assert far.batch_size.rows() == batch_size.rows_for(waited) > 50_000
        fixed = Applier(far_conn, settings_for(dbpair, apply={"max_rows": 20000}))
        _batch(fixed, [(1004, 1, "I")], 0x12000)
        fixed.commit()
        assert fixed.batch_size.round_trip_s is not None
        assert fixed.batch_size.round_trip_s >= 0.019
        assert fixed.batch_size.rows() == 20000
    with psycopg.connect(dbpair.target_dsn) as check:
        assert check.execute("SELECT count(*) FROM items WHERE id > 1000").fetchone() == (4,)



def test_a_busy_process_does_not_shorten_the_measured_round_trip(dbpair: DbPair) -> None:
    """The daemon's other threads keep the interpreter and the cores busy while the applier sends
    a batch, and may hold its thread off just after its query has left. Beside three threads
    spinning, through a relay 10 ms away each way (in a process of its own, which they do not
    slow down), no COPY is measured as waiting less than the 20 ms round trip. Timed from after
    sending, some of these waits came out at 0.1 ms: a limit of 20,000 rows instead of 60,000."""
    port = str(conninfo_to_dict(dbpair.target_dsn)["port"])
    done = threading.Event()

    def spin() -> None:
        while not done.is_set():
            sum(range(1000))

    spinners = [threading.Thread(target=spin) for _ in range(3)]
    with subprocess.Popen([sys.executable, "-m", "bench.relay", port, "--delay-ms", "10"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                          cwd=Path(__file__).parents[2]) as relay:
        assert relay.stdout is not None and relay.stdin is not None
        relayed = int(relay.stdout.readline())
        try:
            with psycopg.connect(make_conninfo(dbpair.target_dsn, host="127.0.0.1",
                                               port=relayed), autocommit=True) as conn:
                conn.execute("CREATE TEMP TABLE waits (n int)")
                for spinner in spinners:
                    spinner.start()
                waits = []
                for n in range(24):
                    result = libpq.run_script(conn, b"SELECT 1; COPY waits FROM STDIN",
                                              [b"%d\n" % n])
                    assert result.error is None and result.copy_wait_s is not None
                    waits.append(result.copy_wait_s)
                assert conn.execute("SELECT count(*) FROM waits").fetchone() == (24,)
        finally:
            done.set()
            for spinner in spinners:
                if spinner.is_alive():
                    spinner.join()
            relay.stdin.close()
    assert min(waits) >= 0.019, sorted(waits)


def test_a_large_batch_closed_by_a_pause_commits_on_its_lanes_thread(
        dbpair: DbPair, relayed: tuple[psycopg.Connection[TupleRow], Link]) -> None:
    """When a backlog's reader catches up with the walsender for a moment, the batch it closes
    holds CATCH_UP_ROWS changes or more: it goes to its lane's thread, leaving the applier free
    to fill the other lane. A smaller one, a steady stream's, commits on the applier's thread
    before the pipeline goes on."""
    settings = settings_for(dbpair)
    committed: list[Committed] = []
    pipe = pipeline.Pipeline(settings, pool := ConnectionPool(dbpair.target_dsn, min_size=1,
                                                               max_size=3, open=True),
                             threading.Event(), Metrics(settings.source.slot), Health())
    try:
        with pool.connection() as conn:
            lanes = Lanes(conn, pool, settings, committed.append)
            # Not read for a transaction's end; the pipeline's reader needs a stream.
            reader = cast(pipeline.Reader, None)

            def paused_batch(first: int, count: int, lsn: int) -> None:
                applier = lanes.current
                applier.start()
                applier.add(_chunk(applier, [(k, 1, "I") for k in range(first, first + count)],
                                   lsn))
                pipe._apply_item(reader, lanes, TxnEnd(Lsn(lsn), NOW), 1.0, more=False)

            paused_batch(20_000, pipeline.CATCH_UP_ROWS - 1, 0x20000)
            assert len(committed) == 1 and not lanes._flight  # committed before going on
            paused_batch(30_000, pipeline.CATCH_UP_ROWS, 0x21000)
            assert len(committed) == 1 and len(lanes._flight) == 1  # on its lane's thread
            lanes.settle()
            assert len(committed) == 2
            lanes.close(clean=True)
    finally:
        pool.close()
    with psycopg.connect(dbpair.target_dsn) as check:
        assert check.execute("SELECT count(*) FROM items WHERE id >= 20000").fetchone() == (
            2 * pipeline.CATCH_UP_ROWS - 1,)
