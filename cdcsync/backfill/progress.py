"""Progress of a long copy: a redrawn line on a terminal, a JSON log line now and then otherwise."""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import TextIO

from cdcsync.logs import event

_LOG_EVERY_S = 5.0
_DRAW_EVERY_S = 0.2


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressLine:
    """Rows done of an estimate, the rate and the time left; safe to update from several
    threads (parallel snapshot workers share one line)."""

    def __init__(self, what: str, total: int | None, *, slot: str,
                 stream: TextIO | None = None, log_only: bool = False) -> None:
        self.what = what
        self.total = total
        self.slot = slot
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = not log_only and self.stream.isatty()
        self.done = 0
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._shown = 0.0

    def add(self, rows: int, *, total: int | None = None) -> None:
        with self._lock:
            self.done += rows
            if total is not None:
                self.total = total
            now = time.monotonic()
            if now - self._shown >= (_DRAW_EVERY_S if self.terminal else _LOG_EVERY_S):
                self._shown = now
                self._show(final=False)

    def close(self) -> None:
        with self._lock:
            self._show(final=True)

    def _show(self, *, final: bool) -> None:
        elapsed = max(time.monotonic() - self._started, 1e-6)
        rate = self.done / elapsed
        total = max(self.total or 0, self.done)
        left = (total - self.done) / rate if rate > 0 and total else None
        if not self.terminal:
            event(logging.INFO, "copy_done" if final else "copy_progress", slot=self.slot,
                  what=self.what, rows=self.done, estimate=total or None,
                  rows_per_s=round(rate), seconds=round(elapsed, 1),
                  eta_s=None if final or left is None else round(left, 1))
            return
        width = 30
        filled = int(width * self.done / total) if total else 0
        bar = "#" * filled + "." * (width - filled)
        eta = "" if final or left is None else f", {_duration(left)} left"
        of = f" of {total:,}" if total else ""
        self.stream.write(f"\r{self.what} [{bar}] {self.done:,}{of} rows, {rate:,.0f} rows/s"
                          f"{eta}\033[K")
        if final:
            self.stream.write(f" in {_duration(elapsed)}\n")
        self.stream.flush()
