"""The C allocator's thresholds: a cdcsync process keeps the memory it frees, to use it again.

Left to its defaults, glibc's ``malloc`` maps large blocks (a batch's ``COPY`` data, libpq's
buffers, the staged rows' arrays) as fresh pages and unmaps them on ``free`` (from 128 KiB, the
bound rising to the largest block freed so far), and trims each heap whenever its free top passes
twice that bound. A backlog's batches allocate and free tens of megabytes each, so batch after
batch faults its buffers in again, and the kernel zeroes each page before handing it over: on
the machines of ``bench/wan.py`` (virtual, two cores) that zeroing was a quarter of the daemon's
CPU samples while a backlog drained. :func:`keep_freed_memory` raises both thresholds so the
blocks come from the heap and stay there once freed; the process then holds on to its
high-water mark instead of handing it back between batches. It also keeps every thread on one
heap, so that the high-water mark is the process's, not each thread's.

An operator who tunes the allocator (``MALLOC_*`` variables, ``GLIBC_TUNABLES``) keeps their
settings: nothing is changed then. On a C library without ``mallopt`` (musl) nothing is either.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping
from typing import Final

# mallopt's parameters (malloc.h).
_M_TRIM_THRESHOLD: Final = -1
_M_TOP_PAD: Final = -2
_M_MMAP_THRESHOLD: Final = -3
_M_ARENA_MAX: Final = -8

# The largest block glibc lets the heap serve (HEAP_MAX_SIZE / 2 on 64 bits): a batch's
# largest buffers stay under it (a 60,000-row batch's COPY data is about 6 MB).
MMAP_THRESHOLD: Final = 32 << 20
# Free memory at the heap's top kept rather than returned: above the daemon's peak (about
# 160 MB draining a backlog across a WAN), so a drain never trims.
TRIM_THRESHOLD: Final = 256 << 20
# Grown by at least this much at a time: fewer calls to extend the heap, whose pages are only
# faulted in as they are used.
TOP_PAD: Final = 16 << 20
# One heap for all threads, not one per thread: a block the reader frees serves a lane's next
# batch, where each thread's own heap would grow to its own high-water mark.
ARENA_MAX: Final = 1

_OPERATOR_VARIABLES: Final = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_",
                              "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_", "MALLOC_ARENA_MAX",
                              "MALLOC_ARENA_TEST")


def operator_tuned(environ: Mapping[str, str]) -> bool:
    """Whether the environment already sets the allocator's thresholds."""
    return (any(name in environ for name in _OPERATOR_VARIABLES)
            or "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""))


def keep_freed_memory(environ: Mapping[str, str] = os.environ) -> bool:
    """Raise the thresholds (see the module docstring); True if the allocator took them."""
    if operator_tuned(environ):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    taken = [mallopt(param, value) == 1
             for param, value in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                  (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD),
                                  (_M_ARENA_MAX, ARENA_MAX))]
    return all(taken)
