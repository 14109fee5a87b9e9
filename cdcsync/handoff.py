"""The hand-off between the reader and the applier: a FIFO bounded by the bytes it holds.

A bound on the number of items would cap a backlog's batches at a few dozen small transactions
(each is at least three items), so over a slow link every target commit, with its round trips,
would carry only a couple of thousand rows. Bounded by bytes, the reader keeps filling the next
batch while a commit crosses the link, and memory stays bounded all the same.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Handoff(Generic[T]):
    """A thread-safe FIFO holding at most ``max_bytes`` of items, as ``size`` measures them.

    An item larger than the whole bound is still taken when nothing else is queued, so no item
    can block the reader for ever."""

    def __init__(self, max_bytes: int, size: Callable[[T], int]) -> None:
        self.max_bytes = max_bytes
        self._size = size
        self._items: deque[tuple[T, int]] = deque()
        self._bytes = 0
        self._changed = threading.Condition()

    def put(self, item: T, timeout: float) -> None:
        """Queue ``item``; raise :class:`queue.Full` if there is still no room after ``timeout``."""
        size = self._size(item)
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._items and self._bytes + size > self.max_bytes:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise queue.Full
                self._changed.wait(left)
            self._items.append((item, size))
            self._bytes += size
            self._changed.notify_all()

    def get(self, timeout: float) -> T:
        """The oldest item; raise :class:`queue.Empty` if none arrives within ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not self._items:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise queue.Empty
                self._changed.wait(left)
            item, size = self._items.popleft()
            self._bytes -= size
            self._changed.notify_all()
            return item

    def empty(self) -> bool:
        with self._changed:
            return not self._items
