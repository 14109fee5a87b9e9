"""Range hashing and bisection: from whole tables down to the keys that differ.

Both servers first summarise the whole table at once (count and xor of row hashes): one sequential
scan each, so a table in sync costs one hashing pass on each side and nothing more (no sample, no
ranges). Only a table whose summaries differ is cut into key ranges, whose boundaries the source
picks from a block sample of its pages, in key order. A range whose summaries differ is cut
again, at every n-th key of its larger side, until it is small enough to list its keys with their
row hashes and diff them.

While ``cdcsync run`` holds the slot, a difference may just be a change in flight. Each differing
key is then read again on the source, the target's checkpoint is awaited past the source's WAL
position taken after that read, and the key is read on the target: only keys that still differ,
after ``[verify] rechecks`` such rounds, are reported.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cdcsync.config import VerifySettings
from cdcsync.keyrange import Key
from cdcsync.model import Lsn
from cdcsync.verify import sql as q
from cdcsync.verify.report import Differences, TableResult, classify
from cdcsync.verify.sides import Conn, Sides, fetch, source_lsn
from cdcsync.verify.spec import TableSpec
from cdcsync.verify.sql import KeyRange

LEAF_ROWS = 5_000       # a range this small is compared key by key
FANOUT = 32             # sub-ranges a differing range is cut into
RANGES_PER_QUERY = 8    # first-level ranges summarised by one statement (a progress step)
SAMPLE_PAGES_PER_RANGE = 8  # sampled source pages per first-level range

_ESTIMATE_SQL = """
SELECT c.reltuples::float8, c.relpages FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relname = %s
"""

Progress = Callable[[int, int], None]  # (ranges done, ranges in all)


@dataclass(frozen=True, slots=True)
class Outcome:
    rows: int  # source rows in the compared ranges
    differences: Differences


class TableVerifier:
    """Compares one table's ranges between the two sides."""

    def __init__(self, sides: Sides, spec: TableSpec, conf: VerifySettings) -> None:
        self.sides = sides
        self.spec = spec
        self.conf = conf

    def ranges(self) -> list[KeyRange]:
        """First-level ranges covering every possible key, about ``range_rows`` source rows each."""
        schema, _, name = self.spec.source_name.partition(".")
        row = self.sides.on_source(lambda c: c.execute(_ESTIMATE_SQL, (schema, name)).fetchone())
        # reltuples is -1 until the first VACUUM or ANALYZE: then every page is sampled.
        estimate, pages = (float(row[0]), int(row[1])) if row else (-1.0, 0)
        count = math.ceil(estimate / self.conf.range_rows) if estimate > 0 else 1
        if estimate >= 0 and count <= 1:
            return [KeyRange(None, None)]
        # The sample takes whole pages, whose keys are often neighbours: boundaries land near
        # the quantiles only when each range gets several sampled pages.
        percent = 100.0 if estimate < 0 else min(
            100.0, 100.0 * SAMPLE_PAGES_PER_RANGE * count / max(pages, 1))
        width = 1 if self.spec.bucketed else len(self.spec.key_columns)
        bounds = self.sides.on_source(fetch(q.sample_bounds(
            self.spec.source, percent, count if estimate >= 0 else None, self.conf.range_rows,
            width)))
        return _split(KeyRange(None, None), [tuple(str(v) for v in b) for b in bounds])

    def top(self) -> Key | None:
        """The greatest key on either side, or None when both tables are empty."""
        src, tgt = self.sides.both(fetch(q.last_key(self.spec.source)),
                                   fetch(q.last_key(self.spec.target)))
        keys = [tuple(str(v) for v in rows[0]) for rows in (src, tgt) if rows]
        if len(keys) < 2:
            return keys[0] if keys else None
        ((source_first,),) = self.sides.on_source(fetch(q.precedes(self.spec.source, *keys)))
        return keys[1] if source_first else keys[0]

    def compare_table(self, progress: Progress | None = None) -> Outcome:
        """Compare the whole table down to differing keys (see the module docstring)."""
        whole = KeyRange(None, None)
        ((src_count, src_hash, tgt_count, tgt_hash),) = self._summaries([whole])
        if (src_count, src_hash) == (tgt_count, tgt_hash):
            if progress is not None:
                progress(1, 1)
            return Outcome(src_count, Differences())
        ranges = self.ranges()
        if len(ranges) > 1:
            return self.compare(ranges, progress)
        if progress is not None:
            progress(1, 1)
        found = self._descend(whole, max(src_count, tgt_count), src_count >= tgt_count)
        return Outcome(src_count, self._settled(found))

    def compare(self, ranges: Sequence[KeyRange], progress: Progress | None = None) -> Outcome:
        """Compare ``ranges`` (all of :meth:`ranges`, or some of them) down to differing keys."""
        rows = 0
        found = Differences()
        in_one_scan = self.spec.bucketed and len(ranges) > 1 and ranges[0].lo is None \
            and ranges[-1].hi is None
        step = len(ranges) if in_one_scan else RANGES_PER_QUERY
        for start in range(0, len(ranges), step):
            chunk = ranges[start:start + step]
            summaries = self._buckets(chunk) if in_one_scan else self._summaries(chunk)
            for offset, (key_range, (src_count, src_hash, tgt_count, tgt_hash)) in enumerate(
                    zip(chunk, summaries, strict=True), start=1):
                rows += src_count
                if (src_count, src_hash) != (tgt_count, tgt_hash):
                    found = found + self._descend(key_range, max(src_count, tgt_count),
                                                  src_count >= tgt_count)
                if progress is not None:
                    progress(start + offset, len(ranges))
        return Outcome(rows, self._settled(found))

    def _settled(self, found: Differences) -> Differences:
        """``found`` without the changes that were in flight, if a consumer holds the slot."""
        if found.count and self.sides.streaming():
            return self._settle(found.keys())
        return found

    def recheck(self, keys: Sequence[Key]) -> Differences:
        """Compare exactly ``keys`` again, past changes in flight if a consumer holds the slot."""
        if not keys:
            return Differences()
        if self.sides.streaming():
            return self._settle(list(keys))
        src, tgt = self.sides.both(fetch(q.keys_hashes(self.spec.source, keys)),
                                   fetch(q.keys_hashes(self.spec.target, keys)))
        return classify(_hashes(src), _hashes(tgt))

    def _summaries(self, ranges: Sequence[KeyRange]) -> list[tuple[int, int, int, int]]:
        src, tgt = self.sides.both(fetch(q.summaries(self.spec.source, ranges)),
                                   fetch(q.summaries(self.spec.target, ranges)))
        by_index = {int(r[0]): (int(r[1]), int(r[2])) for r in src}
        target = {int(r[0]): (int(r[1]), int(r[2])) for r in tgt}
        return [(*by_index[i], *target[i]) for i in range(len(ranges))]

    def _buckets(self, ranges: Sequence[KeyRange]) -> list[tuple[int, int, int, int]]:
        """Summaries of contiguous first-level ranges cut on the first key column, from one
        sequential scan per side: the source reads each page of the table once."""
        thresholds = [r.lo[0] for r in ranges[1:] if r.lo is not None]
        src, tgt = self.sides.both(fetch(q.buckets(self.spec.source, thresholds)),
                                   fetch(q.buckets(self.spec.target, thresholds)))
        source = {int(r[0]): (int(r[1]), int(r[2])) for r in src}
        target = {int(r[0]): (int(r[1]), int(r[2])) for r in tgt}
        return [(*source.get(i, (0, 0)), *target.get(i, (0, 0))) for i in range(len(ranges))]

    def _descend(self, key_range: KeyRange, rows: int, source_larger: bool) -> Differences:
        if rows <= LEAF_ROWS:
            return self._leaf(key_range)
        side = self.spec.source if source_larger else self.spec.target
        query = fetch(q.every_nth_key(side, key_range, math.ceil(rows / FANOUT)))
        bounds = self.sides.on_source(query) if source_larger else self.sides.on_target(query)
        parts = _split(key_range, [tuple(str(v) for v in b) for b in bounds])
        found = Differences()
        for part, (src_count, src_hash, tgt_count, tgt_hash) in zip(
                parts, self._summaries(parts), strict=True):
            if (src_count, src_hash) != (tgt_count, tgt_hash):
                found = found + (self._leaf(part) if len(parts) == 1 else self._descend(
                    part, max(src_count, tgt_count), src_count >= tgt_count))
        return found

    def _leaf(self, key_range: KeyRange) -> Differences:
        src, tgt = self.sides.both(fetch(q.key_hashes(self.spec.source, key_range)),
                                   fetch(q.key_hashes(self.spec.target, key_range)))
        return classify(_hashes(src), _hashes(tgt))

    def _settle(self, keys: list[Key]) -> Differences:
        """Re-read differing keys until they agree or the rounds run out (see module docstring)."""
        found = Differences()
        for _ in range(self.conf.rechecks):
            source, lsn = self.sides.on_source(_reader(q.keys_hashes(self.spec.source, keys)))
            self.sides.wait_for_checkpoint(lsn, self.conf.catchup_timeout_s)
            target = _hashes(self.sides.on_target(fetch(q.keys_hashes(self.spec.target, keys))))
            found = classify(source, target)
            keys = found.keys()
            if not keys:
                break
        return found


def verify_table(sides: Sides, spec: TableSpec, conf: VerifySettings,
                 progress: Progress | None = None) -> TableResult:
    started = time.monotonic()
    verifier = TableVerifier(sides, spec, conf)
    outcome = verifier.compare_table(progress)
    return TableResult(
        source_table=spec.source_name, target_table=spec.target_name,
        key_columns=spec.key_columns, key_types=spec.key_types, rows_compared=outcome.rows,
        differences=outcome.differences, seconds=time.monotonic() - started,
    )


def _reader(query: q.Query) -> Callable[[Conn], tuple[dict[Key, int], Lsn]]:
    """Rows of ``query`` as hashes, with the source position at or past everything they saw."""
    def read(conn: Conn) -> tuple[dict[Key, int], Lsn]:
        return _hashes(fetch(query)(conn)), source_lsn(conn)
    return read


def _split(key_range: KeyRange, bounds: Sequence[Key]) -> list[KeyRange]:
    """Cut ``key_range`` at ``bounds`` (in key order, inside the range); a repeated bound would
    make an empty range, so repeats and a bound equal to the range's start are dropped."""
    edges: list[Key] = []
    for bound in bounds:
        if not edges or bound != edges[-1]:
            edges.append(bound)
    if key_range.lo is not None and edges and edges[0] == key_range.lo:
        edges = edges[1:]
    lows: list[Key | None] = [key_range.lo, *edges]
    highs: list[Key | None] = [*edges, key_range.hi]
    closed = [False] * len(edges) + [key_range.closed]
    return [KeyRange(lo, hi, c) for lo, hi, c in zip(lows, highs, closed, strict=True)]


def _hashes(rows: Sequence[tuple[Any, ...]]) -> dict[Key, int]:
    # Keys are read as text and hashes as bigint, so the rows hold str and int already.
    return {r[:-1]: r[-1] for r in rows}
