"""Dropping a batch's earlier versions of a key before the COPY (``cdcsync/source/_staged.c``).

Staged rows of the throughput bench's table (``bigint`` key, ``int``, ``text``,
``timestamptz``, binary values), ``--rows`` of them in 100-row chunks as the applier gets them,
where the last ``--repeated`` rows of each chunk change keys of the chunk before (the mixed
backlog's updates of rows the transaction before inserted). Prints the median wall time per row
of ``--calls`` calls, and how much of the data the call kept.

Run: ``python -m bench.versions [--rows 20000] [--repeated 8] [--calls 30]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import struct
import sys
import time
from collections.abc import Sequence

from cdcsync.model import Column, Relation
from cdcsync.source.tuples import META_COLUMNS, stage_values

CHUNK_ROWS = 100
RELATION = Relation(16400, "public", "bench", "d", (
    Column("id", 20, -1, True), Column("a", 23, -1, False), Column("b", 25, -1, False),
    Column("updated_at", 1184, -1, False)))


def chunks(rows: int, repeated: int) -> list[bytes]:
    out, seq = [], 0
    for first in range(0, rows, CHUNK_ROWS):
        staged = []
        for j in range(min(CHUNK_ROWS, rows - first)):
            seq += 1
            key = first + j
            if first and j >= CHUNK_ROWS - repeated:
                key = first - CHUNK_ROWS + j - (CHUNK_ROWS - repeated)  # the chunk before's
            staged.append(((struct.pack(">q", key), struct.pack(">i", j), b"x" * 32,
                            struct.pack(">q", seq)), ord("U"), seq, 0, 0))
        out.append(stage_values(RELATION, staged)[0])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.versions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--repeated", type=int, default=8, help="of each 100-row chunk")
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args(argv)
    if importlib.util.find_spec("cdcsync.source._staged") is None:
        print("the extension is not built (make build)", file=sys.stderr)
        return 1
    from cdcsync.source._staged import latest_versions  # noqa: PLC0415 (only where built)

    data = chunks(args.rows, args.repeated)
    fields = [len(META_COLUMNS)]
    times, kept = [], None
    for _ in range(args.calls):
        started = time.perf_counter()
        kept = latest_versions(data, fields)
        times.append(time.perf_counter() - started)
    total = sum(map(len, data))
    left = sum(map(len, kept)) if kept is not None else total
    print(f"{args.rows:,} staged rows, {args.repeated} of each {CHUNK_ROWS} earlier versions "
          f"dropped: {statistics.median(times) / args.rows * 1e9:.0f} ns a row (median of "
          f"{args.calls} calls), {left:,} of {total:,} bytes kept")
    return 0


if __name__ == "__main__":
    sys.exit(main())
