"""The reader thread's loop, with a stream and an assembler standing in: every item reaches the
hand-off in order, and a halt stops it while the stream keeps delivering."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence

from cdcsync.model import Lsn, StreamItem
from cdcsync.pipeline import Item, Reader


class Stream:
    """Delivers ``per_read`` payloads per read, numbered, for ever (or up to ``total``)."""

    def __init__(self, per_read: int, total: int | None = None) -> None:
        self.per_read = per_read
        self.total = total
        self.sent = 0
        self.reads = 0
        self.last_start = Lsn(0)
        self.sent_end = Lsn(0)

    def read(self, _timeout_s: float) -> Iterator[bytes]:
        self.reads += 1
        for _ in range(self.per_read):
            if self.total is not None and self.sent >= self.total:
                return
            self.sent += 1
            yield b"%d" % self.sent

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


def test_every_item_reaches_the_handoff_in_stream_order() -> None:
    stream = Stream(per_read=7, total=100)
    items: queue.Queue[Item] = queue.Queue()
    reader = Reader(stream, Assembler(every=3, copies=2), items)  # type: ignore[arg-type]
    reader.start()
    expected = [b"%d" % n for n in range(3, 101, 3) for _ in range(2)]
    got: list[object] = [items.get(timeout=5) for _ in expected]
    reader.halt.set()
    reader.join(timeout=5)
    assert got == expected
    assert reader.error is None


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
