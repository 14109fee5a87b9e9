"""``cdcsync demo`` end to end, as a newcomer runs it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

CDCSYNC = Path(sys.executable).parent / "cdcsync"


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in args:
            found.append(args)
    return found


@pytest.mark.slow
def test_demo_syncs_verifies_and_cleans_up() -> None:
    """The demo syncs a live workload and one conflict, verifies, exits 0 and leaves nothing."""
    proc = subprocess.run([str(CDCSYNC), "demo", "--seconds", "4", "--rate", "300"],
                          capture_output=True, text=True, timeout=60, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "result: in sync" in output
    assert "verify: every row equal, except where the conflict rule kept" in output
    assert "conflicts=1" in output
    assert "target's newer row survived" in output
    match = re.search(r"clusters in (\S+):", output)
    assert match, output
    base = match.group(1)
    assert not Path(base).exists()
    assert _processes_mentioning(base) == []
