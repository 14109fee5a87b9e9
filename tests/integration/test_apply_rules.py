"""End to end: conflict rule, foreign-key order, unique swaps, whole-transaction visibility."""

from __future__ import annotations

import random
import threading
import time

import psycopg
import pytest

from cdcsync import admin
from cdcsync.daemon import DaemonThread
from tests.conftest import DbPair
from tests.harness import (
    BOTH_DECODERS,
    converged,
    execute,
    running,
    settings_for,
    table_rows,
    wait_for,
    writer,
)

SOURCE = """
CREATE TABLE customers (id int PRIMARY KEY, name text, email text UNIQUE,
                        updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE z_parent (id int PRIMARY KEY, label text);
CREATE TABLE a_child (id int PRIMARY KEY, parent_id int NOT NULL REFERENCES z_parent (id));
CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL);
CREATE TABLE husband (id int PRIMARY KEY, wife_id int);
CREATE TABLE wife (id int PRIMARY KEY, husband_id int REFERENCES husband (id));
ALTER TABLE husband ADD FOREIGN KEY (wife_id) REFERENCES wife (id);
"""
# The target is created by hand with the same constraints (unique email, foreign keys) rather
# than by setup, as a real copy would be; they stay active while cdcsync applies.
TARGET = SOURCE
ACCOUNTS = 500
TOTAL = ACCOUNTS * 1000

pytestmark = BOTH_DECODERS


@pytest.fixture(scope="module")
def pair(dbpair: DbPair) -> DbPair:
    execute(dbpair.source_dsn, SOURCE)
    execute(dbpair.target_dsn, TARGET)
    admin.setup(settings_for(dbpair), create_tables=False)
    return dbpair


def test_newer_target_row_survives_and_conflict_is_logged(pair: DbPair) -> None:
    """A target row with a newer updated_at survives an older source update and delete."""
    with running(settings_for(pair)) as runner:
        execute(pair.source_dsn, "INSERT INTO customers VALUES (1, 'ann', 'a@x', now()), "
                                 "(2, 'bob', 'b@x', now())")
        wait_for(converged(pair, ["public.customers"]), runner=runner)
        execute(pair.target_dsn, "UPDATE customers SET name = 'ann (edited on target)', "
                                 "updated_at = now() + interval '1 hour' WHERE id IN (1, 2)")
        execute(pair.source_dsn, "UPDATE customers SET name = 'ann v2', updated_at = now() "
                                 "WHERE id = 1", "DELETE FROM customers WHERE id = 2",
                "INSERT INTO customers VALUES (3, 'cy', 'c@x', now())")
        wait_for(lambda: len(table_rows(pair.target_dsn, "public.customers")) == 3,
                 runner=runner, what="customer 3")
        time.sleep(0.3)
    names = {r[0]: r[1] for r in table_rows(pair.target_dsn, "public.customers")}
    assert names == {1: "ann (edited on target)", 2: "ann (edited on target)", 3: "cy"}
    with psycopg.connect(pair.target_dsn) as conn:
        logged = conn.execute("SELECT table_name, key, operation, source_lsn IS NOT NULL, "
                              "target_value::timestamptz > source_value::timestamptz "
                              "FROM cdcsync.conflicts ORDER BY id").fetchall()
    assert logged == [("public.customers", {"id": 1}, "upsert", True, True),
                      ("public.customers", {"id": 2}, "delete", True, True)]


def test_insert_losing_to_a_newer_target_row_is_logged(pair: DbPair) -> None:
    """An insert-only batch meeting a newer row already on the target logs the conflict."""
    execute(pair.target_dsn, "INSERT INTO customers VALUES (7, 'target', 't@x', "
                             "now() + interval '1 day')")
    with running(settings_for(pair)) as runner:
        execute(pair.source_dsn, "INSERT INTO customers VALUES (7, 'source', 's@x', now()), "
                                 "(8, 'other', 'o@x', now())")
        wait_for(lambda: any(r[0] == 8 for r in table_rows(pair.target_dsn,
                                                             "public.customers")),
                 runner=runner, what="customer 8")
    names = {r[0]: r[1] for r in table_rows(pair.target_dsn, "public.customers")}
    assert (names[7], names[8]) == ("target", "other")
    with psycopg.connect(pair.target_dsn) as conn:
        rows = conn.execute("SELECT operation FROM cdcsync.conflicts "
                            "WHERE key = jsonb_build_object('id', 7)").fetchall()
    assert rows == [("upsert",)]


def _customers_once_there(pair: DbPair, runner: DaemonThread, first: int, last: int
                          ) -> tuple[dict[int, str], list[tuple[str, str]]]:
    """Once customer ``last`` is on the target: the names of customers ``first`` to ``last``
    there, and the conflicts logged for them (key, operation)."""
    wait_for(lambda: any(r[0] == last for r in table_rows(pair.target_dsn, "public.customers")),
             runner=runner, what=f"customer {last}")
    names = {r[0]: r[1] for r in table_rows(pair.target_dsn, "public.customers")
             if first <= r[0] <= last}
    with psycopg.connect(pair.target_dsn) as conn:
        conflicts = conn.execute("SELECT key->>'id', operation FROM cdcsync.conflicts "
                                 "WHERE (key->>'id')::int BETWEEN %s AND %s ORDER BY id",
                                 (first, last)).fetchall()
    return names, conflicts


def test_mixed_batch_inserting_keys_the_target_holds(pair: DbPair) -> None:
    """A batch of inserts, an update and a delete whose plain inserts meet keys already on the
    target (one newer, one older): the merge is redone with the upsert, the newer target row
    wins and is logged, the older one is replaced, and the rest of the batch applies."""
    execute(pair.source_dsn, "INSERT INTO customers VALUES (30, 'keep', 'k30@x', now()), "
                             "(31, 'drop', 'd31@x', now())")
    execute(pair.target_dsn, "INSERT INTO customers VALUES "
                             "(30, 'keep', 'k30@x', now() - interval '1 day'), "
                             "(31, 'drop', 'd31@x', now() - interval '1 day'), "
                             "(32, 'target newer', 't32@x', now() + interval '1 day'), "
                             "(33, 'target older', 't33@x', now() - interval '1 day')")
    with running(settings_for(pair)) as runner:
        execute(pair.source_dsn, """
            BEGIN;
            UPDATE customers SET name = 'kept', updated_at = now() WHERE id = 30;
            DELETE FROM customers WHERE id = 31;
            INSERT INTO customers VALUES (32, 'source', 's32@x', now()),
                                         (33, 'source', 's33@x', now()),
                                         (34, 'new', 'n34@x', now());
            COMMIT;""")
        names, conflicts = _customers_once_there(pair, runner, 30, 34)
    assert names == {30: "kept", 32: "target newer", 33: "source", 34: "new"}
    assert conflicts == [("32", "upsert")]


def test_keys_inserted_then_updated_in_one_batch_meeting_target_rows(pair: DbPair) -> None:
    """Keys the batch inserts then updates are merged as inserts of their last version: one the
    target holds newer still wins and is logged, one it holds older is replaced, a new one gets
    the update's values."""
    execute(pair.target_dsn, "INSERT INTO customers VALUES "
                             "(40, 'target newer', 't40@x', now() + interval '1 day'), "
                             "(41, 'target older', 't41@x', now() - interval '1 day')")
    with running(settings_for(pair)) as runner:
        execute(pair.source_dsn, """
            BEGIN;
            INSERT INTO customers VALUES (40, 'v1', 's40@x', now()), (41, 'v1', 's41@x', now()),
                                         (42, 'v1', 's42@x', now());
            UPDATE customers SET name = 'v2', updated_at = now() WHERE id BETWEEN 40 AND 42;
            COMMIT;""")
        names, conflicts = _customers_once_there(pair, runner, 40, 42)
    assert names == {40: "target newer", 41: "v2", 42: "v2"}
    assert conflicts == [("40", "upsert")]


def test_insert_over_an_older_target_row_replaces_it(pair: DbPair) -> None:
    """An insert-only batch meeting an older row already on the target replaces it (the plain
    insert is refused and the batch goes through the rule), and later batches still apply."""
    execute(pair.target_dsn, "INSERT INTO customers VALUES (20, 'target', 't20@x', "
                             "now() - interval '1 day')")
    with running(settings_for(pair)) as runner:
        execute(pair.source_dsn, "INSERT INTO customers VALUES (20, 'source', 's20@x', now())")
        wait_for(lambda: any(r[:2] == (20, "source") for r in table_rows(
            pair.target_dsn, "public.customers")), runner=runner, what="customer 20 replaced")
        execute(pair.source_dsn, "INSERT INTO customers VALUES (21, 'next', 'n21@x', now())")
        wait_for(lambda: any(r[0] == 21 for r in table_rows(pair.target_dsn,
                                                              "public.customers")),
                 runner=runner, what="customer 21")
    with psycopg.connect(pair.target_dsn) as conn:
        rows = conn.execute("SELECT count(*) FROM cdcsync.conflicts "
                            "WHERE key->>'id' IN ('20', '21')").fetchone()
    assert rows == (0,)


def test_foreign_keys_apply_parents_first_and_children_deleted_first(pair: DbPair) -> None:
    """Parent and child rows inserted and deleted in the same transactions never violate the FK."""
    with running(settings_for(pair)) as runner:
        with psycopg.connect(pair.source_dsn) as conn:
            for i in range(1, 41):
                conn.execute("INSERT INTO z_parent VALUES (%s, 'p')", (i,))
                conn.execute("INSERT INTO a_child VALUES (%s, %s)", (i, i))
                if i % 4 == 0:
                    conn.execute("DELETE FROM a_child WHERE id = %s", (i - 1,))
                    conn.execute("DELETE FROM z_parent WHERE id = %s", (i - 1,))
                if i % 5 == 0:
                    conn.commit()
            conn.commit()
        wait_for(converged(pair, ["public.z_parent", "public.a_child"]), runner=runner,
                 what="parent and child convergence")
    assert len(table_rows(pair.target_dsn, "public.a_child")) == 30


def test_foreign_key_cycle_applies_in_source_order(pair: DbPair) -> None:
    """Tables whose foreign keys form a cycle are applied change by change in source order."""
    with running(settings_for(pair)) as runner:
        execute(pair.source_dsn, """
            BEGIN;
            INSERT INTO husband VALUES (1, NULL);
            INSERT INTO wife VALUES (1, 1);
            UPDATE husband SET wife_id = 1 WHERE id = 1;
            INSERT INTO husband VALUES (2, NULL);
            COMMIT;""", """
            BEGIN;
            UPDATE husband SET wife_id = NULL WHERE id = 1;
            DELETE FROM wife WHERE id = 1;
            DELETE FROM husband WHERE id = 1;
            INSERT INTO wife VALUES (2, 2);
            COMMIT;""")
        wait_for(converged(pair, ["public.husband", "public.wife"]), runner=runner,
                 what="cycle convergence")
    assert table_rows(pair.target_dsn, "public.wife") == [(2, 2)]


def test_unique_value_swapped_within_a_batch(pair: DbPair) -> None:
    """Two rows swapping a unique email in one transaction are replayed in source order."""
    execute(pair.source_dsn, "INSERT INTO customers VALUES (10, 'p', 'p@x', now()), "
                             "(11, 'q', 'q@x', now())")
    def emails() -> dict[int, str]:
        return {r[0]: r[2] for r in table_rows(pair.target_dsn, "public.customers")}

    with running(settings_for(pair)) as runner:
        wait_for(lambda: emails().get(11) == "q@x", runner=runner, what="initial rows")
        execute(pair.source_dsn, """
            BEGIN;
            UPDATE customers SET email = 'tmp', updated_at = now() WHERE id = 10;
            UPDATE customers SET email = 'p@x', updated_at = now() WHERE id = 11;
            UPDATE customers SET email = 'q@x', updated_at = now() WHERE id = 10;
            COMMIT;""")
        wait_for(lambda: emails().get(11) == "p@x", runner=runner, what="swap")
    assert (emails()[10], emails()[11]) == ("q@x", "p@x")


def _transfer(conn: psycopg.Connection[tuple[object, ...]], rng: random.Random) -> None:
    if rng.random() < 0.1:
        # A wide transaction: far more rows than the batch limit, so it is merged in several
        # chunks inside one target transaction.
        width = ACCOUNTS // 2
        conn.execute("UPDATE accounts SET balance = balance - 1 WHERE id > %s", (width,))
        conn.execute("UPDATE accounts SET balance = balance + %s WHERE id = 1", (width,))
    else:
        a, b = rng.sample(range(1, ACCOUNTS + 1), 2)
        amount = rng.randint(1, 50)
        conn.execute("UPDATE accounts SET balance = balance - %s WHERE id = %s", (amount, a))
        conn.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s", (amount, b))
    conn.commit()


def test_reader_never_sees_half_a_transaction(pair: DbPair) -> None:
    """Sums sampled on the target while transfers stream in always equal the constant total."""
    execute(pair.source_dsn, f"INSERT INTO accounts SELECT g, 1000 FROM generate_series(1, "
                             f"{ACCOUNTS}) g")
    settings = settings_for(pair, apply={"max_rows": 50, "max_delay_ms": 20})
    stop = threading.Event()
    with running(settings) as runner:
        wait_for(converged(pair, ["public.accounts"]), runner=runner)
        writers = [writer(pair.source_dsn, stop, seed, _transfer) for seed in range(2)]
        for w in writers:
            w.start()
        sums = []
        with psycopg.connect(pair.target_dsn, autocommit=True) as conn:
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:
                row = conn.execute("SELECT sum(balance), count(*) FROM accounts").fetchone()
                assert row is not None
                sums.append((int(row[0]), int(row[1])))
        stop.set()
        for w in writers:
            w.join()
        wait_for(converged(pair, ["public.accounts"]), runner=runner, what="drain")
    assert len(sums) > 50
    assert set(sums) == {(TOTAL, ACCOUNTS)}
    with psycopg.connect(pair.target_dsn) as conn:
        row = conn.execute("SELECT lsn FROM cdcsync.checkpoint").fetchone()
    assert row is not None
