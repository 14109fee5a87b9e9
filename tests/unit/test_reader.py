"""The reader thread's loop, with a stream and an assembler standing in: every item reaches the
hand-off in order, in groups that wait neither for a full group while the stream pauses nor
beyond the group's size, and a halt stops it while the stream keeps delivering."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from cdcsync import pipeline
from cdcsync.model import ChangeChunk, Lsn, StreamItem
from cdcsync.pipeline import Group, Reader


class Stream:
    """Delivers ``per_read`` payloads per read, numbered, for ever (or up to ``total``)."""

    def __init__(self, per_read: int, total: int | None = None) -> None:
        self.per_read = per_read
        self.total = total
        self.sent = 0
        self.reads = 0
        self.last_start = Lsn(0)
        self.sent_end = Lsn(0)

    def read(self, _timeout_s: float, idle: bytes | None = None) -> Iterator[bytes]:
        self.reads += 1
        for _ in range(self.per_read):
            if self.total is not None and self.sent >= self.total:
                break
            self.sent += 1
            yield b"%d" % self.sent
        if idle is not None:
            yield idle

    def confirm(self, lsn: Lsn) -> None:
        pass

    def send_status_if_due(self) -> None:
        pass


class Assembler:
    """Completes an item for every ``every``-th payload (``copies`` of it), nothing otherwise."""

    skip_before = Lsn(0)
    in_transaction = True
    last_end_lsn = Lsn(0)

    def __init__(self, every: int, copies: int = 1) -> None:
        self.every = every
        self.copies = copies

    def feed(self, payload: bytes, _lsn: Callable[[], Lsn]) -> Sequence[StreamItem]:
        number = int(payload)
        if number % self.every:
            return ()
        return [payload] * self.copies  # type: ignore[list-item]  # any item passes through


def received(groups: queue.Queue[Group], count: int) -> list[list[Any]]:
    """The items of the groups that carry the first ``count`` items (the stand-in assemblers'
    bytes, here)."""
    return [group.items for group in received_groups(groups, count)]


def received_groups(groups: queue.Queue[Group], count: int) -> list[Group]:
    """The groups that carry the first ``count`` items."""
    got: list[Group] = []
    while sum(len(g.items) for g in got) < count:
        got.append(groups.get(timeout=5))
    return got


def test_every_item_reaches_the_handoff_in_stream_order() -> None:
    stream = Stream(per_read=7, total=100)
    groups: queue.Queue[Group] = queue.Queue()
    reader = Reader(stream, Assembler(every=3, copies=2), groups)  # type: ignore[arg-type]
    reader.start()
    expected = [b"%d" % n for n in range(3, 101, 3) for _ in range(2)]
    got = received(groups, len(expected))
    reader.halt.set()
    reader.join(timeout=5)
    assert [item for group in got for item in group] == expected
    assert reader.error is None


def test_what_a_read_completed_is_passed_on_before_the_stream_waits() -> None:
    """Each read of 7 payloads completes 2 items (payloads 3 and 6, or the like): they are
    handed off as the read ends, not held until a group is full."""
    stream = Stream(per_read=7, total=70)
    groups: queue.Queue[Group] = queue.Queue()
    reader = Reader(stream, Assembler(every=3), groups)  # type: ignore[arg-type]
    reader.start()
    got = received(groups, 23)
    reader.halt.set()
    reader.join(timeout=5)
    assert [len(group) for group in got] == [2, 2, 3] * 3 + [2]
    assert got[0] == [b"3", b"6"]


def test_a_stream_that_never_pauses_is_passed_on_in_groups_of_bounded_size() -> None:
    stream = Stream(per_read=10**9)
    groups: queue.Queue[Group] = queue.Queue()
    reader = Reader(stream, Assembler(every=1), groups)  # type: ignore[arg-type]
    reader.start()
    got = received(groups, 3 * pipeline.GROUP_ITEMS)
    reader.halt.set()
    reader.join(timeout=5)
    assert [len(group) for group in got[:3]] == [pipeline.GROUP_ITEMS] * 3
    assert got[1][0] == b"%d" % (pipeline.GROUP_ITEMS + 1)


def test_only_a_group_handed_over_at_a_pause_says_the_stream_is_caught_up() -> None:
    """The applier commits for want of more only on such a group: full ones have more behind."""
    groups: queue.Queue[Group] = queue.Queue()
    reader = Reader(Stream(per_read=200, total=200), Assembler(every=1), groups)  # type: ignore[arg-type]
    reader.start()
    got = received_groups(groups, 200)
    reader.halt.set()
    reader.join(timeout=5)
    assert [(len(g.items), g.caught_up) for g in got] == [
        (pipeline.GROUP_ITEMS, False)] * 3 + [(200 - 3 * pipeline.GROUP_ITEMS, True)]


def test_a_pause_right_after_a_full_group_is_passed_on_once_without_items() -> None:
    """Else the applier would hold its batch open until ``max_delay_ms``."""
    groups: queue.Queue[Group] = queue.Queue()
    stream = Stream(per_read=pipeline.GROUP_ITEMS, total=pipeline.GROUP_ITEMS)
    reader = Reader(stream, Assembler(every=1), groups)  # type: ignore[arg-type]
    reader.start()
    got = received_groups(groups, pipeline.GROUP_ITEMS)
    pause = groups.get(timeout=5)
    while stream.reads < 5:
        threading.Event().wait(0.01)
    reader.halt.set()
    reader.join(timeout=5)
    assert [(len(g.items), g.caught_up) for g in got] == [(pipeline.GROUP_ITEMS, False)]
    assert (pause.items, pause.size, pause.caught_up) == ([], 0, True)
    assert groups.empty()  # the later pauses, with nothing owed, pass nothing on


def test_a_halt_stops_the_reader_while_the_stream_keeps_delivering() -> None:
    stream = Stream(per_read=50)
    reader = Reader(stream, Assembler(every=10**9), queue.Queue())  # type: ignore[arg-type]
    reader.start()
    while stream.reads < 3:
        threading.Event().wait(0.01)
    reader.halt.set()
    reader.join(timeout=5)
    assert not reader.is_alive()
    assert reader.error is None


class FailingAssembler(Assembler):
    """Completes an item per payload, then fails at payload ``at``."""

    def __init__(self, at: int) -> None:
        super().__init__(every=1)
        self.at = at

    def feed(self, payload: bytes, lsn: Callable[[], Lsn]) -> Sequence[StreamItem]:
        if int(payload) == self.at:
            raise ValueError("damaged")
        return super().feed(payload, lsn)


def test_the_items_before_a_failure_are_passed_on_before_it_is_reported() -> None:
    """The applier takes everything before the failing message (schema drift halts once it is
    applied), then finds the error."""
    groups: queue.Queue[Group] = queue.Queue()
    reader = Reader(Stream(per_read=100), FailingAssembler(at=10), groups)  # type: ignore[arg-type]
    reader.run()
    assert isinstance(reader.error, ValueError)
    assert [item for group in received(groups, 9) for item in group] == [
        b"%d" % n for n in range(1, 10)]



class ChunkAssembler(Assembler):
    """Completes a chunk of a third of a group's bytes per payload."""

    def feed(self, payload: bytes, _lsn: Callable[[], Lsn]) -> Sequence[StreamItem]:
        return [ChangeChunk((), 1, pipeline.GROUP_BYTES // 3 + 1)]


def test_large_chunks_are_passed_on_before_the_group_is_full() -> None:
    """A large transaction's chunks are not held back until a group has 64 of them."""
    groups: queue.Queue[Group] = queue.Queue()
    reader = Reader(Stream(per_read=10**9), ChunkAssembler(every=1), groups)  # type: ignore[arg-type]
    reader.start()
    got = received(groups, 9)
    reader.halt.set()
    reader.join(timeout=5)
    assert [len(group) for group in got[:3]] == [3, 3, 3]
