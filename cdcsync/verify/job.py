"""Scheduled verification: every run compares the next ``[verify] sample_ranges`` ranges of each
selected table, so that over successive runs every range is compared (a full pass) at a bounded
cost per run. Ranges are sampled afresh at the start of each table's pass.

A pass that takes more than one run ends at the greatest key either side holds at its start: keys
inserted above it during the pass are left to the next pass, which samples them. Left open, the
last range would collect every row appended since the pass began (a table with ascending keys
appends there), and the run reaching it would cost as much as the pass's whole growth.

``cdcsync_verify_differences{table}`` shows the differences of the table's last full pass, or more
as soon as the pass under way has found more: a known difference is never hidden before a whole
pass has shown it gone. ``cdcsync_verify_last_full_pass_timestamp_seconds`` is set when every
table has finished a pass.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cdcsync.config import Settings
from cdcsync.link_watch import LinkWatch
from cdcsync.logs import event
from cdcsync.metrics import Metrics
from cdcsync.source import catalog
from cdcsync.verify.compare import TableVerifier
from cdcsync.verify.sides import open_sides
from cdcsync.verify.spec import table_spec
from cdcsync.verify.sql import KeyRange


def _pass_ranges(verifier: TableVerifier, per_run: int) -> list[KeyRange]:
    """The table's ranges for a new pass, closed at the greatest key if it spans several runs."""
    ranges = verifier.ranges()
    top = verifier.top() if len(ranges) > per_run else None
    if top is not None:
        ranges[-1] = KeyRange(ranges[-1].lo, top, closed=True)
    return ranges


@dataclass
class _TablePass:
    ranges: list[KeyRange]
    next_range: int = 0
    found: int = 0
    last_full_pass: int | None = None  # differences found by the previous complete pass

    @property
    def done(self) -> bool:
        return self.next_range >= len(self.ranges)


@dataclass
class ScheduledVerify:
    """The job's state between runs; :meth:`run` is what the scheduler calls."""

    settings: Settings
    metrics: Metrics
    clock: Callable[[], float] = time.time
    # Whether this process streams the slot, as the daemon that schedules the job does: a
    # difference is then always awaited past the checkpoint, even while the daemon reconnects.
    consuming: bool = False
    links: LinkWatch | None = None
    _passes: dict[str, _TablePass] = field(default_factory=dict)

    def run(self) -> None:
        slot = self.settings.source.slot
        with open_sides(self.settings, self.consuming, self.links) as sides:
            tables = sides.on_source(lambda c: catalog.selected_tables(c, self.settings.tables))
            for table in tables:
                spec = table_spec(sides.source, sides.target, self.settings, table)
                verifier = TableVerifier(sides, spec, self.settings.verify)
                state = self._passes.get(table.qualified)
                if state is None or state.done:
                    previous = state.found if state is not None else None
                    state = _TablePass(_pass_ranges(verifier, self.settings.verify.sample_ranges),
                                       last_full_pass=previous)
                    self._passes[table.qualified] = state
                chosen = state.ranges[state.next_range:
                                      state.next_range + self.settings.verify.sample_ranges]
                outcome = verifier.compare(chosen)
                state.next_range += len(chosen)
                state.found += outcome.differences.count
                if outcome.differences.count:
                    event(logging.WARNING, "verify_differences", slot=slot, table=table.qualified,
                          count=outcome.differences.count,
                          keys=[list(k) for k in outcome.differences.keys()[:10]])
                shown = state.found if state.done or state.last_full_pass is None \
                    else max(state.found, state.last_full_pass)
                self.metrics.verify_differences(table.qualified, shown)
            current = {t.qualified for t in tables}
            if all(self._passes[name].done for name in current):
                self.metrics.verify_full_pass(self.clock())
                event(logging.INFO, "verify_full_pass", slot=slot, tables=len(current))
