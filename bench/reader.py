"""The reader's CPU per row change, without servers: pgoutput messages through the assembler.

Synthesized messages of the throughput bench's table (``bigint`` key, ``int``, ``text``,
``timestamptz``), in 1,000-change transactions, go through
:class:`cdcsync.source.transactions.TransactionAssembler` exactly as the daemon's reader feeds
them, asked for the rows of inserts as ``COPY`` rows as the daemon asks when it may copy them
straight into their tables. Reading the socket and the hand-off to the applier are not counted:
this is the decoding, staging and ``COPY`` row making of :mod:`cdcsync.source.tuples`.

* insert: inserts alone;
* update: updates (no old tuple);
* mix: per 6 changes, 3 inserts, 2 updates, 1 delete.

Prints the median CPU microseconds per row change of ``--runs`` passes, with values in text and
in binary (``--values``), and the garbage collector's collections per pass. Compare builds by
running it with ``PYTHONPATH`` pointing at each (their compiled modules built in place).

Run: ``python -m bench.reader [--changes 300000] [--runs 7] [--values text binary]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import struct
import sys
import time
from collections.abc import Sequence
from typing import Any

from cdcsync.model import Lsn, Relation, TargetTable
from cdcsync.source.transactions import TransactionAssembler
from cdcsync.source.tuples import COMPILED

OID = 16400
TXN_CHANGES = 1000
# The bench table: (column, type oid, is key).
COLUMNS = (("id", 20, True), ("a", 23, False), ("b", 25, False), ("updated_at", 1184, False))
# 2026-12-05 in microseconds since 2000-01-01, the epoch of pgoutput's times.
MICROS = 818_208_000_000_000


def relation_message() -> bytes:
    out = b"R" + struct.pack(">I", OID) + b"public\0bench\0d" + struct.pack(">h", len(COLUMNS))
    for name, type_oid, key in COLUMNS:
        out += struct.pack(">b", int(key)) + name.encode() + b"\0" + struct.pack(">Ii", type_oid,
                                                                                   -1)
    return out


def _values(g: int, binary: bool) -> list[bytes]:
    text = b"%032x" % (g * 2654435761 % (1 << 128))
    if binary:
        return [struct.pack(">q", g), struct.pack(">i", g % 1000), text,
                struct.pack(">q", MICROS + g)]
    return [str(g).encode(), str(g % 1000).encode(), text, b"2026-12-05 11:00:00.123456+00"]


def _tuple(values: Sequence[bytes | None], binary: bool) -> bytes:
    kind = b"b" if binary else b"t"
    return struct.pack(">h", len(values)) + b"".join(
        b"n" if v is None else kind + struct.pack(">i", len(v)) + v for v in values)


def messages(scenario: str, changes: int, binary: bool) -> list[bytes]:
    """The stream of ``changes`` row changes of ``scenario`` in 1,000-change transactions."""
    out = [relation_message()]
    lsn = 1 << 32
    for first in range(0, changes, TXN_CHANGES):
        lsn += 100_000
        out.append(b"B" + struct.pack(">qqI", lsn, MICROS + first, 1000 + first))
        for g in range(first + 1, min(first + TXN_CHANGES, changes) + 1):
            slot = g % 6
            if scenario == "insert" or (scenario == "mix" and slot < 3):
                out.append(b"I" + struct.pack(">I", OID) + b"N" + _tuple(_values(g, binary),
                                                                         binary))
            elif scenario == "update" or slot < 5:
                out.append(b"U" + struct.pack(">I", OID) + b"N" + _tuple(_values(g, binary),
                                                                         binary))
            else:
                key = _values(g, binary)[0]
                out.append(b"D" + struct.pack(">I", OID) + b"K"
                           + _tuple([key, None, None, None], binary))
        out.append(b"C" + struct.pack(">bqqq", 0, lsn, lsn + 50, MICROS + first))
    return out


def target(relation: Relation) -> TargetTable:
    names = tuple(name for name, _, _ in COLUMNS)
    return TargetTable("public.bench", relation.oid, "public", "bench", names,
                       ("bigint", "integer", "text", "timestamp with time zone"),
                       (0, 1, 2, 3), (0,), (0,), 3, True,
                       binary_types=("bigint", "integer", "text", "timestamp with time zone"))


def one_pass(stream: list[bytes], binary: bool) -> tuple[float, int]:
    """CPU seconds to assemble ``stream``, and the garbage collections meanwhile."""
    assembler = TransactionAssembler(Lsn(0), target, texts=True, binary=binary)
    kept: list[Any] = []  # the items live until applied, as in the daemon's hand-off
    feed = assembler.feed
    before = sum(s["collections"] for s in gc.get_stats())
    started = time.process_time()
    for payload in stream:
        items = feed(payload)
        if items:
            kept.extend(items)
    used = time.process_time() - started
    return used, sum(s["collections"] for s in gc.get_stats()) - before


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=300_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--scenario", nargs="+", default=["insert", "update", "mix"],
                        choices=["insert", "update", "mix"])
    parser.add_argument("--values", nargs="+", default=["binary", "text"],
                        choices=["binary", "text"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not COMPILED:
        print("warning: cdcsync.source runs as Python, not compiled (make build)",
              file=sys.stderr)
    results = []
    for scenario in args.scenario:
        for values in args.values:
            binary = values == "binary"
            stream = messages(scenario, args.changes, binary)
            passes = [one_pass(stream, binary) for _ in range(args.runs)]
            per_row = [used / args.changes * 1e6 for used, _ in passes]
            results.append({"scenario": scenario, "values": values,
                            "us_per_change": round(statistics.median(per_row), 3),
                            "each": [round(v, 3) for v in per_row],
                            "gc_collections": statistics.median(n for _, n in passes)})
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"{args.changes:,} changes, median of {args.runs} passes, CPU µs per row change")
    for r in results:
        print(f"{r['scenario']:7s} {r['values']:7s} {r['us_per_change']:6.3f} µs  "
              f"(each {', '.join(f'{v:.2f}' for v in r['each'])}; "
              f"{r['gc_collections']:.0f} collections a pass)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
