"""Which batches the applier's lanes merge side by side; which failures start the stream again."""

from __future__ import annotations

from psycopg import errors as pgerrors

from cdcsync.apply import script as plan
from cdcsync.apply.lanes import _Footprint
from cdcsync.errors import is_transient
from cdcsync.model import Column, Relation, TableRows, TargetTable

RELATION = Relation(1, "public", "items", "d", (Column("id", 23, -1, True),))


def _table(oid: int) -> TargetTable:
    return TargetTable(f"public.t{oid}", oid, "public", f"t{oid}", ("id",), ("integer",), (0,),
                       (0,), (0,), None, False)


def _batch(oid: int, keys: set[bytes] | None, *, inserts_alone: bool = False) -> plan.Staged:
    batch = plan.Staged(_table(oid), RELATION, f"s{oid}")
    rows = TableRows(RELATION, batch.table, [b"row"], inserts=1)
    if inserts_alone:
        rows.keyer = lambda: keys or set()
        batch.add_keys(rows)
    else:
        batch.only_inserts = False
        rows.keys = keys
        batch.add_keys(rows)
    return batch


def _meets(first: list[plan.Staged], second: list[plan.Staged]) -> bool:
    return _Footprint.of(second).meets(_Footprint.of(first))


def test_batches_meet_on_a_common_key_of_one_table_only() -> None:
    assert _meets([_batch(1, {b"1", b"2"})], [_batch(1, {b"2"})])
    assert not _meets([_batch(1, {b"1"})], [_batch(1, {b"2"})])
    assert not _meets([_batch(1, {b"1"})], [_batch(2, {b"1"})])


def test_inserts_alone_never_meet_but_meet_anything_else_on_their_table() -> None:
    """Two consecutive source transactions cannot insert one key; an update beside inserts
    whose keys the reader left unmade might hit one of them."""
    assert not _meets([_batch(1, {b"1"}, inserts_alone=True)],
                      [_batch(1, {b"1"}, inserts_alone=True)])
    assert _meets([_batch(1, {b"1"}, inserts_alone=True)], [_batch(1, {b"9"})])
    assert _meets([_batch(1, {b"9"})], [_batch(1, {b"1"}, inserts_alone=True)])
    assert not _meets([_batch(1, {b"1"}, inserts_alone=True)], [_batch(2, {b"1"})])


def test_unknown_keys_meet() -> None:
    assert _meets([_batch(1, None)], [_batch(1, {b"1"})])


def test_a_deadlock_victim_goes_again_a_bad_value_does_not() -> None:
    assert is_transient(pgerrors.DeadlockDetected("deadlock detected"))
    assert is_transient(pgerrors.SerializationFailure("could not serialize"))
    assert not is_transient(pgerrors.InvalidTextRepresentation("invalid input syntax"))
    assert not is_transient(pgerrors.InsufficientPrivilege("permission denied"))
