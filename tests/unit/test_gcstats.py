"""bench.gcstats: a process started with its environment records its own collections."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench import gcstats


def test_a_process_started_with_the_environment_writes_its_collections(tmp_path: Path) -> None:
    output = tmp_path / "gc.json"
    env = {"PATH": "/usr/bin:/bin", **gcstats.environment(tmp_path, output)}
    subprocess.run([sys.executable, "-c", "import gc; gc.collect(0); gc.collect()"], env=env,
                   check=True, timeout=60)
    stats = gcstats.read(output)
    assert stats is not None, "the process wrote no statistics: was sitecustomize imported?"
    assert stats["collections"]["0"] >= 1
    assert stats["collections"]["2"] >= 1
    assert stats["total_ms"] == round(sum(stats["ms"].values()), 2)


def test_nothing_is_read_where_no_process_wrote(tmp_path: Path) -> None:
    assert gcstats.read(tmp_path / "missing.json") is None
