"""The demo's live terminal view: one frame a refresh, redrawn in place on a terminal."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import TextIO

RATE_WINDOW = 3  # refreshes


@dataclass
class Lag:
    bytes: int | None
    seconds: float | None


def size(n: int | None) -> str:
    if n is None:
        return "-"
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} kB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.1f} MB"


@dataclass
class Frame:
    """One refresh of the live view."""

    tables: tuple[str, ...]
    elapsed: float
    seconds: float
    written_per_s: float
    applied_per_s: float
    lag: Lag
    conflicts: int
    source_counts: list[int]
    target_counts: list[int]

    def lines(self) -> list[str]:
        lag_s = "-" if self.lag.seconds is None else f"{self.lag.seconds:.3f} s"
        rows = zip(self.tables, self.source_counts, self.target_counts, strict=True)
        return [
            f"cdcsync demo  {self.elapsed:5.1f} s of {self.seconds:g} s",
            f"  source writes   {self.written_per_s:8.0f} changes/s",
            f"  target applies  {self.applied_per_s:8.0f} rows/s",
            f"  lag             {size(self.lag.bytes):>8}   {lag_s}",
            f"  conflicts       {self.conflicts:8d}",
            f"  {'table':<18}{'source':>9}{'target':>9}",
            *(f"  {table:<18}{s:>9}{t:>9}" for table, s, t in rows),
        ]

    def plain(self) -> str:
        lag_s = "-" if self.lag.seconds is None else f"{self.lag.seconds:.3f}s"
        counts = " ".join(f"{table.partition('.')[2]}={s}/{t}" for table, s, t in
                          zip(self.tables, self.source_counts, self.target_counts, strict=True))
        return (f"t={self.elapsed:.1f}s written={self.written_per_s:.0f}/s "
                f"applied={self.applied_per_s:.0f}/s lag={size(self.lag.bytes)}/{lag_s} "
                f"conflicts={self.conflicts} {counts} (source/target)")


class Screen:
    """Redraws in place on a terminal; elsewhere (pipes, CI logs) one plain line per refresh."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.drawn = 0
        self.notes: list[str] = []

    def show(self, frame: Frame) -> None:
        if not self.tty:
            print(frame.plain(), file=self.out, flush=True)
            return
        lines = frame.lines() + [f"  {note}" for note in self.notes]
        # Move up over the previous frame and overwrite it, clearing what a longer line left.
        up = f"\x1b[{self.drawn}A\r" if self.drawn else ""
        self.out.write(up + "".join(f"{line}\x1b[K\n" for line in lines))
        self.out.flush()
        self.drawn = len(lines)

    def note(self, text: str) -> None:
        """A message that stays under the view on a terminal; printed once elsewhere."""
        if self.tty:
            self.notes.append(text)
        else:
            print(text, file=self.out, flush=True)


class Meter:
    """Rates of two growing counters over the last few refreshes.

    The applied count comes from table statistics, which a busy backend flushes about once a
    second: a one-second window alternates between 0 and double, a three-second one reads true.
    """

    def __init__(self, written: int, applied: int) -> None:
        self.window: deque[tuple[float, int, int]] = deque(maxlen=RATE_WINDOW + 1)
        self.window.append((time.monotonic(), written, applied))

    def rates(self, written: int, applied: int) -> tuple[float, float]:
        self.window.append((time.monotonic(), written, applied))
        (t0, w0, a0), (t1, w1, a1) = self.window[0], self.window[-1]
        span = max(t1 - t0, 1e-6)
        return (w1 - w0) / span, (a1 - a0) / span
