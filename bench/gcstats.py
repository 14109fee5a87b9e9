"""The garbage collector's work inside a daemon the bench starts, from ``gc.callbacks``.

The daemon's own code is left as it is: the bench puts a ``sitecustomize`` module first on the
daemon's ``PYTHONPATH`` (Python imports it at start-up), which times every collection, per
generation, and writes the totals as JSON when the process exits. The figures cover the whole
process: its start (where cdcsync pauses the collector while it imports), the drain and the
shutdown.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ENV = "CDCSYNC_BENCH_GC_STATS"

_SITECUSTOMIZE = '''\
import atexit, gc, json, os, threading, time

_started = {}
_totals = {}


def _collection(phase, info):
    me = threading.get_ident()
    if phase == "start":
        _started[me] = time.perf_counter()
        return
    took = time.perf_counter() - _started.pop(me, time.perf_counter())
    count, seconds = _totals.get(info["generation"], (0, 0.0))
    _totals[info["generation"]] = (count + 1, seconds + took)


def _write():
    with open(os.environ["{ENV}"], "w") as out:
        json.dump({"collections": {g: c for g, (c, _) in sorted(_totals.items())},
                   "ms": {g: round(s * 1000, 2) for g, (_, s) in sorted(_totals.items())},
                   "thresholds_at_exit": gc.get_threshold()}, out)


gc.callbacks.append(_collection)
atexit.register(_write)
'''.replace("{ENV}", ENV)


def environment(workdir: Path, output: Path) -> dict[str, str]:
    """The variables that make a Python process started with them record into ``output``."""
    site = workdir / "gcstats"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, ENV: str(output)}


def read(output: Path) -> dict[str, Any] | None:
    """What the process recorded: collections and milliseconds per generation, and in all."""
    try:
        stats: dict[str, Any] = json.loads(output.read_text())
    except (OSError, ValueError):
        return None
    stats["total_ms"] = round(sum(stats["ms"].values()), 2)
    return stats
