"""How many rows a batch merges: ``[apply] max_rows``, or with ``"auto"`` what the link needs.

Every batch waits on the target twice whatever its size: for its ``COPY`` to start, then for its
commit. With the target a millisecond away those waits cost nothing; across a WAN they bound the
drain of a backlog, and only larger batches (fewer waits per row) make up for them. Larger
batches also cost: memory for the rows staged (two batches in flight), and a batch the target
refuses is replayed in source order in longer runs. So with ``"auto"`` (the default) a batch
holds up to :data:`FLOOR` rows, as a fixed ``max_rows`` of 20,000 did, while the target answers
within a few milliseconds, and more as its round trip grows: :data:`ROWS_PER_MS` per
millisecond, up to :data:`CAP` (from 20 ms on). Measured with ``bench.wan`` (the figures in
``bench/HISTORY.md``): across 10 ms each way, 60,000-row batches drained a million changes about
a tenth faster than 20,000-row ones; across 40 ms each way, the rest of a backlog after the
first batch in half the time.

The round trip is read from the batches themselves: the shortest wait for a ``COPY`` to start
among the last :data:`RECENT` batches (the statements before it usually take the server well
under a millisecond). Each wait counts from before its query is sent (see
:func:`cdcsync.libpq.run_script`), so a busy process only ever lengthens it, and the shortest
wait leaves out the moments it was busy; after only a few batches on a loaded machine, a local
target's shortest wait still read 11 ms (a batch of 34,000 rows). Until a first batch has
measured it, a batch holds :data:`FLOOR` rows, so the first one of a start reaches the target as
soon as it did.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Final, Literal

FLOOR: Final = 20_000
CAP: Final = 60_000
ROWS_PER_MS: Final = 3_000
RECENT: Final = 16


class BatchSize:
    """The rows a batch merges at most; thread-safe (the lanes' threads report their waits)."""

    def __init__(self, configured: int | Literal["auto"]) -> None:
        self._auto = configured == "auto"
        self._rows = FLOOR if configured == "auto" else configured
        self._waits: deque[float] = deque(maxlen=RECENT)
        self._lock = threading.Lock()

    def rows(self) -> int:
        return self._rows

    @property
    def round_trip_s(self) -> float | None:
        """The target's round trip as the batches measured it (None before the first)."""
        with self._lock:
            return min(self._waits) if self._waits else None

    def copy_waited(self, seconds: float) -> None:
        """A batch waited ``seconds`` from sending its query to its ``COPY`` starting."""
        with self._lock:
            self._waits.append(seconds)
            if self._auto:
                self._rows = rows_for(min(self._waits))


def rows_for(round_trip_s: float) -> int:
    """The ``"auto"`` limit for a target ``round_trip_s`` away."""
    return max(FLOOR, min(CAP, round(round_trip_s * 1000 * ROWS_PER_MS)))
