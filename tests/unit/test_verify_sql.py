"""verify's pure pieces: query text, range cutting, classification, the repair condition."""

from __future__ import annotations

from psycopg import sql

from cdcsync.verify.compare import _split
from cdcsync.verify.report import Differences, TableResult, classify
from cdcsync.verify.spec import Side
from cdcsync.verify.sql import KeyRange, condition, keys_hashes, summaries

SIDE = Side(
    table=sql.Identifier("public", "pairs"),
    hashes=(sql.SQL('coalesce(hashtextextended("region", 1), -1)'),
            sql.SQL('coalesce(hashint4extended("n", 2), -2)')),
    values=(sql.SQL('("v")::text'),),
    keys=(sql.Identifier("region"), sql.Identifier("n")),
    key_texts=(sql.SQL('("region")::text'), sql.SQL('("n")::text')),
    key_types=(sql.SQL("text"), sql.SQL("integer")),
)


def test_range_condition_is_a_row_comparison_with_typed_parameters() -> None:
    """Both bounds compare the whole key as a row, parameters cast to the side's key types."""
    where, params = condition(SIDE, KeyRange(("eu", "1"), ("us", "7")))
    assert where.as_string(None) == ('("region", "n") >= (%s::text, %s::integer) AND '
                                     '("region", "n") < (%s::text, %s::integer)')
    assert params == ["eu", "1", "us", "7"]
    assert condition(SIDE, KeyRange(None, None))[0].as_string(None) == "true"


def test_summaries_hash_every_compared_column() -> None:
    """One UNION ALL branch per range: count and xor of row hashes, each the hash of the xor
    of the column hashes and of a record of the columns without a hash function."""
    query, params = summaries(SIDE, [KeyRange(None, ("m", "1")), KeyRange(("m", "1"), None)])
    text = query.as_string(None)
    assert text.count("UNION ALL") == 1
    assert ('SELECT 0::int, count(*), coalesce(bit_xor(hashint8extended('
            'coalesce(hashtextextended("region", 1), -1) # coalesce(hashint4extended("n", 2), -2)'
            ' # hash_record_extended(ROW(("v")::text), 0), 0)), 0) FROM "public"."pairs" '
            'WHERE ("region", "n") < (%s::text, %s::integer)') in text
    assert params == ["m", "1", "m", "1"]


def test_keys_are_looked_up_as_typed_arrays() -> None:
    """Given keys travel as one text array per key column."""
    query, params = keys_hashes(SIDE, [("eu", "1"), ("us", "2")])
    assert 'IN (SELECT * FROM unnest(%s::text[]::text[], %s::text[]::integer[]))' in \
        query.as_string(None)
    assert params == [["eu", "us"], ["1", "2"]]


def test_a_prefix_bound_compares_the_leading_key_columns() -> None:
    """A bound shorter than the key compares only the key's first columns."""
    where, params = condition(SIDE, KeyRange(("eu",), ("us", "3")))
    assert where.as_string(None) == ('("region") >= (%s::text) AND '
                                     '("region", "n") < (%s::text, %s::integer)')
    assert params == ["eu", "us", "3"]


def test_a_closed_range_holds_its_upper_bound() -> None:
    """A closed range compares its upper bound with <=, and only the last of its parts is closed."""
    closed = KeyRange(("eu",), ("us", "3"), closed=True)
    assert condition(SIDE, closed)[0].as_string(None).endswith(
        '("region", "n") <= (%s::text, %s::integer)')
    assert _split(closed, [("fr",)]) == [KeyRange(("eu",), ("fr",)),
                                          KeyRange(("fr",), ("us", "3"), closed=True)]


def test_split_drops_repeated_bounds() -> None:
    """Cutting at repeated bounds, or at the range's own start, makes no empty range."""
    parts = _split(KeyRange(("a",), None), [("a",), ("c",), ("c",), ("f",)])
    assert parts == [KeyRange(("a",), ("c",)), KeyRange(("c",), ("f",)), KeyRange(("f",), None)]
    assert _split(KeyRange(None, None), []) == [KeyRange(None, None)]


def test_classify_and_repair_condition() -> None:
    """Missing, extra and different keys, and a condition selecting exactly them."""
    found = classify({("1",): 10, ("2",): 20, ("3",): 30}, {("2",): 21, ("3",): 30, ("4",): 40})
    assert found == Differences(missing=(("1",),), extra=(("4",),), differ=(("2",),))
    result = TableResult("public.t", "public.t", ("id", "k"), ("bigint", "text"), 3,
                         Differences(missing=(("1", "a'b"),)), 0.1)
    assert result.key_condition().as_string(None) == \
        """("id", "k") IN (('1'::bigint, 'a''b'::text))"""
    assert TableResult("public.t", "public.t", ("id",), ("bigint",), 3, Differences(),
                       0.1).key_condition().as_string(None) == "false"
