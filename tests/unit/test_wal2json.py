"""The wal2json decoder on JSON captured from PostgreSQL 15 (see capture_stream.py): it yields the
same stream items, down to the staged bytes, as pgoutput does for the same changes."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdcsync.errors import ProtocolError
from cdcsync.model import (
    ChangeChunk,
    Lsn,
    Relation,
    SourceMessage,
    StreamItem,
    Truncate,
    TxnEnd,
    TxnStart,
)
from cdcsync.pipeline import Group, Reader
from cdcsync.source import pgoutput, wal2json
from cdcsync.source.transactions import TransactionAssembler
from cdcsync.source.wal2json_assembler import Wal2jsonAssembler
from tests.unit.test_assembler import RAW, feed_all, parse_copy_rows, target_for

CAPTURED = json.loads((Path(__file__).parent / "data" / "wal2json_capture.json").read_text())
JSON = [m["json"].encode() for m in CAPTURED]
RELATIONS = {(r.schema, r.name): r for r in map(pgoutput.decode, RAW) if isinstance(r, Relation)}


def catalog(schema: str, name: str) -> Relation | None:
    """The catalog as the pgoutput capture's Relation messages describe it."""
    return RELATIONS.get((schema, name))


def wal2json_items(describe: object = catalog, **limits: int) -> list[StreamItem]:
    assembler = Wal2jsonAssembler(Lsn(0), target_for, describe, **limits)  # type: ignore[arg-type]
    return [i for payload in JSON for i in assembler.feed(payload)]


def comparable(items: list[object]) -> list[tuple[object, ...]]:
    """Items as plain data."""
    out: list[tuple[object, ...]] = []
    for item in items:
        if isinstance(item, TxnStart):
            out.append(("start", item.xid, item.final_lsn, item.commit_time))
        elif isinstance(item, TxnEnd):
            out.append(("end", item.end_lsn, item.commit_time))
        elif isinstance(item, ChangeChunk):
            out.extend(("rows", t.relation.qualified, t.inserts, t.updates, t.deletes,
                        t.unchanged_mask, parse_copy_rows(b"".join(t.rows)))
                       for t in item.tables)
        elif isinstance(item, Truncate):
            out.append(("truncate", tuple(t.qualified for t in item.tables)))
        elif isinstance(item, SourceMessage):
            out.append(("message", item.lsn, item.transactional, item.prefix, item.content))
    return out


def test_same_items_and_staged_bytes_as_pgoutput() -> None:
    """Both decoders turn the same WAL into equal items: positions, commit times, staged rows
    (values, operations, key moves, unchanged-TOAST masks), truncates and messages."""
    expected = comparable(feed_all(TransactionAssembler(Lsn(0), target_for), RAW))
    assert comparable(list(wal2json_items())) == expected
    assert len(expected) > 20


def test_without_catalog_the_messages_define_the_relation() -> None:
    """With no catalog row, the columns the changes name make the relation; an update's missing
    TOASTed column is still marked unchanged once an insert has named it."""
    items = wal2json_items(describe=lambda schema, name: None)
    rows = [r for i in items if isinstance(i, ChangeChunk) for t in i.tables
            for r in parse_copy_rows(b"".join(t.rows))]
    assert [r[1] for r in rows] == [b"I", b"I", b"U", b"M", b"U", b"I", b"I", b"U", b"D", b"D",
                                    b"I"]
    assert rows[2][4] == b"00100000000" and rows[2][5:7] == (b"42", b"renamed")


def test_checkpoint_skips_what_it_covers() -> None:
    """Transactions ending at or before the checkpoint produce nothing; the rest are kept."""
    ends = [i.end_lsn for i in wal2json_items() if isinstance(i, TxnEnd)]
    assembler = Wal2jsonAssembler(ends[4], target_for, catalog)
    items = [i for payload in JSON for i in assembler.feed(payload)]
    assert [i.end_lsn for i in items if isinstance(i, TxnEnd)] == ends[5:]
    begins = [orjson.loads(m) for m in JSON if m.startswith(b'{"action":"B"')]
    assert assembler.skipped_transactions == sum(Lsn.parse(b["lsn"]) < ends[4] for b in begins)


def test_truncate_of_several_tables_is_one_item() -> None:
    """One TRUNCATE statement's per-table messages become one Truncate of all its tables."""
    truncates = [i for i in wal2json_items() if isinstance(i, Truncate)]
    assert [tuple(t.name for t in i.tables) for i in truncates] == [("items", "events")]


def test_chunking_keeps_transaction_bounds() -> None:
    """A transaction wider than the chunk limit arrives as several chunks between its ends."""
    kinds = [type(i).__name__ for i in wal2json_items(chunk_rows=1)][:4]
    assert kinds == ["TxnStart", "ChangeChunk", "ChangeChunk", "TxnEnd"]


def test_transactions_without_changes_are_dropped() -> None:
    """wal2json's Begin and Commit of a transaction with no change cdcsync applies (here the
    first captured one) produce no item, as pgoutput sends none."""
    assert JSON[0].startswith(b'{"action":"B"') and JSON[1].startswith(b'{"action":"C"')
    assembler = Wal2jsonAssembler(Lsn(0), target_for, catalog)
    assert assembler.feed(JSON[0]) == [] and assembler.feed(JSON[1]) == []
    assert not assembler.in_transaction and assembler.last_end_lsn == Lsn(0)


def _change(columns: list[tuple[str, int, object]], action: str = "I") -> bytes:
    return orjson.dumps({
        "action": action, "xid": 1, "lsn": "0/10", "schema": "public", "table": "t",
        "columns": [{"name": n, "type": "x", "typeoid": oid, "value": v} for n, oid, v in columns],
        "pk": [{"name": "id", "type": "integer", "typeoid": 23}]})


def test_values_keep_their_exact_text() -> None:
    """Numerics keep every digit, floats round-trip, booleans and bytea read as PostgreSQL
    prints them."""
    raw = _change([("id", 23, 1), ("b", 16, True), ("f", 701, 0.1), ("ba", 17, "dead")])
    raw = raw.replace(b'"pk"', b'"n":{"x":0},"pk"')
    exact = (b'{"action":"I","xid":1,"lsn":"0/10","schema":"s","table":"t","columns":['
             b'{"name":"n","type":"numeric","typeoid":1700,"value":'
             b'123456789012345678901234567890.000000000000000000001},'
             b'{"name":"i","type":"numeric","typeoid":1700,"value":-12345678901234567890123}]}')
    change = wal2json.decode(raw)
    assert isinstance(change, wal2json.RowChange)
    assert change.values == (b"1", b"t", b"0.1", b"\\xdead")
    numeric = wal2json.decode(exact)
    assert isinstance(numeric, wal2json.RowChange)
    assert numeric.values == (b"123456789012345678901234567890.000000000000000000001",
                              b"-12345678901234567890123")


def test_message_content_need_not_be_utf8() -> None:
    """A logical message's content comes back as the bytes that were emitted."""
    raw = (b'{"action":"M","xid":null,"timestamp":null,"lsn":"0/AB","transactional":false,'
           b'"prefix":"p","content":"\xff\xfe ok"}')
    message = wal2json.decode(raw)
    assert message == pgoutput.LogicalMessage(False, Lsn(0xAB), "p", b"\xff\xfe ok")


@pytest.mark.parametrize(("patterns", "expected"), [
    (("public.*",), "public.*"),
    (("public.orders", "sales.*"), "public.orders,sales.*"),
    (("*.orders", "public.ord?r", "public.items"), "*.orders,public.*,public.items"),
    (("public.*", "*.*"), None),
])
def test_add_tables_covers_the_patterns(patterns: tuple[str, ...], expected: str | None) -> None:
    """Patterns become wal2json's add-tables filter; partial globs widen to the whole part."""
    assert wal2json.add_tables(patterns) == expected
    assert ("add-tables" in wal2json.options(patterns)) is (expected is not None)


class CapturedStream:
    """The replication stream's reading side, replaying captured payloads (no server)."""

    def __init__(self, payloads: list[tuple[Lsn, bytes]]) -> None:
        self.payloads = payloads
        self.halt = threading.Event()
        self.last_start = Lsn(0)
        self.sent_end = Lsn(0)

    def read(self, timeout_s: float, idle: bytes | None = None) -> Iterator[bytes]:
        for lsn, payload in self.payloads:
            self.last_start = lsn
            yield payload
        if idle is not None:
            yield idle
        self.halt.set()

    def confirm(self, lsn: Lsn) -> None:
        pass

    def send_status_if_due(self) -> None:
        pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_damaged_messages_raise_protocol_error_naming_the_lsn(data: st.DataObject) -> None:
    """Truncated or altered messages stop the reader with a ProtocolError, and nothing else,
    naming the LSN of the damaged message."""
    index = data.draw(st.integers(2, len(JSON) - 1))
    victim = bytearray(JSON[index])
    del victim[data.draw(st.integers(0, len(victim))):]
    for _ in range(data.draw(st.integers(0, 3))):
        if victim:
            victim[data.draw(st.integers(0, len(victim) - 1))] = data.draw(st.integers(0, 255))
    assert_reader_refuses(index, bytes(victim))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=6)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_well_formed_json_of_the_wrong_shape_raises_protocol_error(data: st.DataObject) -> None:
    """Any field of a captured message replaced by any JSON value (a column's name, type OID or
    value included) is a ProtocolError naming the LSN, or still a valid message."""
    index = data.draw(st.integers(2, len(JSON) - 1))
    message = orjson.loads(JSON[index])
    target = message
    if "columns" in message and data.draw(st.booleans()):
        target = data.draw(st.sampled_from(message["columns"]))
    target[data.draw(st.sampled_from(sorted(target)))] = data.draw(JSON_VALUES)
    assert_reader_refuses(index, json.dumps(message).encode())


def test_update_whose_new_row_and_old_key_disagree_on_a_type_is_refused() -> None:
    """Found by the test above: the new row's first column with type OID 0, the old key's not."""
    index, message = next((i, m) for i, m in enumerate(map(orjson.loads, JSON))
                          if m["action"] == "U" and m.get("identity"))
    message["columns"][0]["typeoid"] = 0
    error = assert_reader_refuses(index, json.dumps(message).encode())
    assert error is not None
    key_type = message["identity"][0]["typeoid"]
    assert f"type OID 0 in the new row and {key_type} in the old key" in str(error)


def assert_reader_refuses(index: int, damaged: bytes) -> BaseException | None:
    """Feed the capture up to ``index`` with ``damaged`` in its place through the reader;
    return the reader's error, which must be a ProtocolError naming the LSN."""
    lsns = [Lsn.parse(m["lsn"]) for m in CAPTURED]
    payloads = [(lsns[i], JSON[i]) for i in range(index)] + [(lsns[index], damaged)]
    stream = CapturedStream(payloads)
    items: queue.Queue[Group] = queue.Queue()
    reader = Reader(stream, Wal2jsonAssembler(Lsn(0), target_for, catalog), items)  # type: ignore[arg-type]
    stream.halt = reader.halt
    reader.run()
    if reader.error is not None:
        assert isinstance(reader.error, ProtocolError), repr(reader.error)
        assert str(reader.error).startswith(f"at LSN {lsns[index]}: ")
    return reader.error
