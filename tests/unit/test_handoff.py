"""The reader-to-applier hand-off: bounded by bytes, in order, never stuck on a big item."""

from __future__ import annotations

import queue
import threading

import pytest

from cdcsync.handoff import Handoff


def sized(max_bytes: int) -> Handoff[bytes]:
    return Handoff(max_bytes, len)


def test_items_come_out_in_the_order_they_went_in() -> None:
    handoff = sized(100)
    for item in (b"a", b"bb", b"ccc"):
        handoff.put(item, timeout=0.1)
    assert [handoff.get(timeout=0.1) for _ in range(3)] == [b"a", b"bb", b"ccc"]
    assert handoff.empty()


def test_many_small_items_fit_where_an_item_count_bound_would_stop() -> None:
    handoff = sized(1000)
    for _ in range(500):
        handoff.put(b"xx", timeout=0.1)
    with pytest.raises(queue.Full):
        handoff.put(b"y", timeout=0.05)


def test_an_item_larger_than_the_bound_passes_alone() -> None:
    handoff = sized(10)
    handoff.put(b"x" * 50, timeout=0.1)
    with pytest.raises(queue.Full):
        handoff.put(b"z", timeout=0.05)
    assert handoff.get(timeout=0.1) == b"x" * 50
    handoff.put(b"z", timeout=0.1)


def test_a_full_handoff_takes_the_item_once_the_applier_makes_room() -> None:
    handoff = sized(4)
    handoff.put(b"abcd", timeout=0.1)
    taken: list[bytes] = []
    consumer = threading.Timer(0.1, lambda: taken.append(handoff.get(timeout=1)))
    consumer.start()
    handoff.put(b"efgh", timeout=2)
    consumer.join()
    assert taken == [b"abcd"]
    assert handoff.get(timeout=0.1) == b"efgh"


def test_get_gives_up_after_its_timeout() -> None:
    with pytest.raises(queue.Empty):
        sized(10).get(timeout=0.05)
