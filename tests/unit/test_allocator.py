"""A cdcsync process serves large blocks from its heap and keeps them once freed.

Each case runs in a fresh interpreter: the thresholds are the process's, and the test runner's
own allocations would blur what glibc's ``mallinfo2`` reports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cdcsync import allocator

# Allocates and frees an 8 MiB block (a batch's COPY data is about that size) and reports, from
# mallinfo2: the bytes in mapped blocks while it lives, the free bytes the heap keeps after.
SCRIPT = """
import ctypes, json, sys
from cdcsync import allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
taken = allocator.keep_freed_memory() if sys.argv[1] == "keep" else None
block = bytearray(8 << 20)
mapped = mallinfo2().hblkhd
del block
print(json.dumps({"taken": taken, "mapped": mapped, "kept_free": mallinfo2().fordblks}))
"""

# A thread allocates a block, then glibc's malloc_stats lists the heaps ("Arena N") on stderr.
THREADS = """
import ctypes, sys, threading
from cdcsync import allocator

if sys.argv[1] == "keep":
    allocator.keep_freed_memory()
threads = [threading.Thread(target=lambda: bytearray(64 << 10)) for _ in range(3)]
for thread in threads:
    thread.start()
    thread.join()
ctypes.CDLL(None).malloc_stats()
"""

EIGHT_MIB = 8 << 20


def _python(script: str, mode: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    return subprocess.run([sys.executable, "-c", script, mode], env={**base, **env},
                          capture_output=True, text=True, timeout=60, check=True)


def _run(mode: str, **env: str) -> dict[str, int | bool | None]:
    result: dict[str, int | bool | None] = json.loads(_python(SCRIPT, mode, env).stdout)
    return result


def _heaps(mode: str) -> int:
    return sum(line.startswith("Arena ") for line in _python(THREADS, mode, {}).stderr.splitlines())


@pytest.fixture(scope="module", autouse=True)
def _glibc() -> None:
    if not hasattr(__import__("ctypes").CDLL(None), "mallinfo2"):
        pytest.skip("glibc 2.33 or later is needed to read the allocator's state")


def test_large_blocks_come_from_the_heap_and_stay_there_once_freed() -> None:
    kept = _run("keep")
    assert kept["taken"] is True
    assert int(kept["mapped"] or 0) < EIGHT_MIB, "the 8 MiB block was mapped on its own"
    assert int(kept["kept_free"] or 0) >= EIGHT_MIB, "the freed block went back to the system"


def test_without_it_the_same_block_is_mapped_and_handed_back() -> None:
    # What keep_freed_memory changes: the defaults map the block, and unmap it on free.
    default = _run("default")
    assert int(default["mapped"] or 0) >= EIGHT_MIB
    assert int(default["kept_free"] or 0) < EIGHT_MIB


def test_threads_share_one_heap() -> None:
    # Each thread would otherwise get a heap of its own, grown to its own high-water mark.
    assert _heaps("default") > 1
    assert _heaps("keep") == 1


@pytest.mark.parametrize("env", [{"MALLOC_TRIM_THRESHOLD_": "131072"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}])
def test_an_operators_allocator_settings_are_left_alone(env: dict[str, str]) -> None:
    assert allocator.operator_tuned(env)
    left = _run("keep", **env)
    assert left["taken"] is False
    assert int(left["mapped"] or 0) >= EIGHT_MIB, "the operator's 128 KiB threshold was overridden"
