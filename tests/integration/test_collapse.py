"""Several versions of a key inside one batch: the target ends with the source's final state."""

from __future__ import annotations

import logging

import psycopg
import pytest

from cdcsync.apply import tables
from cdcsync.apply.applier import Applier
from cdcsync.model import ChangeChunk, Lsn, TxnEnd, TxnStart
from cdcsync.source.transactions import TransactionAssembler
from tests import pgoutput_messages as m
from tests.conftest import DbPair
from tests.harness import converged, execute, running, set_up, settings_for, wait_for

SCHEMA = """
CREATE TABLE docs (id int PRIMARY KEY, status text, body text, updated_at timestamptz);
ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
CREATE TABLE full_ident (id int PRIMARY KEY, v text, body text);
ALTER TABLE full_ident REPLICA IDENTITY FULL;
ALTER TABLE full_ident ALTER COLUMN body SET STORAGE EXTERNAL;
"""
BIG = "repeat(md5(random()::text), 100)"


@pytest.fixture(scope="module")
def pair(dbpair: DbPair) -> DbPair:
    return set_up(dbpair, SCHEMA)


def _sync(pair: DbPair, *statements: str) -> None:
    with running(settings_for(pair)) as runner:
        execute(pair.source_dsn, *statements)
        wait_for(converged(pair, ["public.docs", "public.full_ident"]), runner=runner,
                 what="convergence")


def test_versions_of_one_key_in_one_transaction(pair: DbPair) -> None:
    """Insert, updates, delete and re-insert of keys in one transaction end as on the source."""
    _sync(pair, f"""
        INSERT INTO docs VALUES (3, 'old', {BIG}, now());
        BEGIN;
        INSERT INTO docs VALUES (1, 'a', {BIG}, now());
        UPDATE docs SET status = 'b' WHERE id = 1;
        UPDATE docs SET status = 'c' WHERE id = 1;
        INSERT INTO docs VALUES (2, 'gone', 'x', now());
        DELETE FROM docs WHERE id = 2;
        DELETE FROM docs WHERE id = 3;
        INSERT INTO docs VALUES (3, 'again', 'y', now());
        COMMIT;""")


def test_unchanged_toast_filled_from_an_earlier_version_in_the_batch(pair: DbPair) -> None:
    """A TOASTed value inserted and then left unchanged by updates in the same batch arrives."""
    _sync(pair, f"""
        BEGIN;
        INSERT INTO docs VALUES (10, 'new', {BIG}, now());
        UPDATE docs SET status = 'edited' WHERE id = 10;
        UPDATE docs SET status = 'edited twice', body = {BIG} WHERE id = 10;
        UPDATE docs SET status = 'final' WHERE id = 10;
        COMMIT;""")


def test_primary_key_changes_within_a_batch(pair: DbPair) -> None:
    """Keys moved (one with an untouched TOASTed value) and an old key reused."""
    _sync(pair, "INSERT INTO docs VALUES (20, 'x', 'small', now())",
          f"INSERT INTO docs VALUES (30, 'toasted', {BIG}, now())",
          """BEGIN;
             UPDATE docs SET id = 21 WHERE id = 20;
             INSERT INTO docs VALUES (20, 'reused', 'small', now());
             COMMIT;""",
          "UPDATE docs SET id = 31 WHERE id = 30")


def test_replica_identity_full_updates_and_deletes(pair: DbPair) -> None:
    """A REPLICA IDENTITY FULL table: updates, a key change and deletes arrive."""
    _sync(pair, f"INSERT INTO full_ident SELECT g, 'v', {BIG} FROM generate_series(1, 5) g",
          "UPDATE full_ident SET v = 'w' WHERE id <= 2",
          "UPDATE full_ident SET id = 50 WHERE id = 3",
          "DELETE FROM full_ident WHERE id = 4")


def test_keys_changed_twice_are_collapsed_not_replayed(pair: DbPair,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """The reader tells the applier which keys a batch changes more than once, and only then is
    the batch collapsed: keys changed twice in one transaction and across two are merged in
    bulk (without the collapse the upsert meets one key twice and the batch is replayed in
    source order)."""
    _sync(pair, "INSERT INTO docs VALUES (1020, 'first', 'x', now())")
    caplog.set_level(logging.INFO, logger="cdcsync")
    _sync(pair, """
        BEGIN;
        UPDATE docs SET status = 'b' WHERE id = 1020;
        UPDATE docs SET status = 'c' WHERE id = 1020;
        INSERT INTO docs VALUES (1021, 'new', 'y', now());
        COMMIT;
        UPDATE docs SET status = 'd' WHERE id = 1021;""")
    replays = [r for r in caplog.records if r.getMessage() == "batch_replayed_in_source_order"]
    assert not replays


def test_inserts_alone_then_changed_in_one_batch(pair: DbPair,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A transaction of inserts alone, whose keys the reader leaves to the applier, then one
    updating one of them and deleting the other, in one target transaction: merged in bulk
    (no replay) to the source's final state, both transactions committed with it."""
    stream = [m.begin(0x5000, 700), m.docs_relation(), m.docs_row(b"I", 1040, b"new"),
              m.docs_row(b"I", 1041, b"new"), m.commit(0x5000, 0x5008),
              m.begin(0x6000, 701), m.docs_row(b"U", 1041, b"e"), m.docs_delete(1040),
              m.commit(0x6000, 0x6008)]
    settings = settings_for(pair)
    caplog.set_level(logging.INFO, logger="cdcsync")
    with psycopg.connect(pair.target_dsn) as conn:
        applier = Applier(conn, settings)
        assembler = TransactionAssembler(
            Lsn(0), lambda r: tables.resolve(conn, settings, r), texts=True)
        chunks = []
        for payload in stream:
            for item in assembler.feed(payload):
                if isinstance(item, TxnStart):
                    applier.start()
                elif isinstance(item, ChangeChunk):
                    chunks.append(item)
                    applier.add(item)
                elif isinstance(item, TxnEnd):
                    applier.end(item)
        assert chunks[0].tables[0].keyer is not None  # the inserts' keys were left to make
        assert applier.commit().transactions == 2
    assert not [r for r in caplog.records if r.getMessage() == "batch_replayed_in_source_order"]
    with psycopg.connect(pair.target_dsn) as check:
        assert check.execute("SELECT id, status FROM docs WHERE id >= 1040 ORDER BY id"
                             ).fetchall() == [(1041, "e")]
