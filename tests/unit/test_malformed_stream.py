"""A whole captured pgoutput stream with one message damaged, through the assembler as the reader
feeds it: only a ProtocolError naming the LSN ever escapes, and nothing hangs."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdcsync.errors import ProtocolError
from cdcsync.model import Lsn
from cdcsync.source.transactions import TransactionAssembler
from tests.unit.test_assembler import target_for

CAPTURE = json.loads((Path(__file__).parent / "data" / "pgoutput_capture.json").read_text())
STREAM = [(bytes.fromhex(m["hex"]), Lsn.parse(m["lsn"])) for m in CAPTURE]


@contextmanager
def at_most(seconds: float) -> Iterator[None]:
    """Interrupt a hang with TimeoutError, which the tests do not accept."""
    def expired(_signum: int, _frame: FrameType | None) -> None:
        raise TimeoutError(f"still decoding after {seconds}s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def feed(stream: list[tuple[bytes, Lsn]]) -> None:
    assembler = TransactionAssembler(Lsn(0), target_for, chunk_rows=2)
    for payload, lsn in stream:
        assembler.feed(payload, lsn)


def test_the_intact_stream_decodes() -> None:
    """The captured stream itself goes through without error (the baseline of the fuzzing)."""
    feed(STREAM)


def test_protocol_error_names_the_lsn_and_the_fix() -> None:
    """A truncated Insert is refused naming the WAL position of its message."""
    damaged = list(STREAM)
    payload, lsn = damaged[4]
    damaged[4] = (payload[:-3], lsn)
    with pytest.raises(ProtocolError) as info:
        feed(damaged)
    assert str(info.value).startswith(f"at LSN {lsn}: ")
    assert "fix: report it with the server version" in str(info.value)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_damaged_stream_raises_only_protocol_error_naming_the_lsn(data: st.DataObject) -> None:
    """Any one message truncated, overwritten, extended or dropped: the stream either still
    decodes or raises ProtocolError with an LSN of the stream, within two seconds."""
    stream = list(STREAM)
    index = data.draw(st.integers(0, len(stream) - 1))
    payload, lsn = stream[index]
    raw = bytearray(payload)
    damage = data.draw(st.sampled_from(["truncate", "overwrite", "extend", "drop"]))
    if damage == "truncate":
        del raw[data.draw(st.integers(0, len(raw) - 1)):]
    elif damage == "overwrite":
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    elif damage == "extend":
        raw += data.draw(st.binary(min_size=1, max_size=16))
    if damage == "drop":
        del stream[index]
    else:
        stream[index] = (bytes(raw), lsn)
    with at_most(2.0):
        try:
            feed(stream)
        except ProtocolError as exc:
            assert any(str(exc).startswith(f"at LSN {at}: ") for _, at in STREAM), str(exc)
