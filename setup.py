"""Compiles the modules every replicated row passes through with mypyc; the rest stays Python.

Decoding pgoutput and converting each row into binary COPY is pure Python per column, and it
bounds how fast one daemon drains a backlog (see the README's throughput section). The same typed
source compiled by mypyc (shipped with mypy, already the project's type checker) runs about twice
as fast. ``cdcsync/source/_copybatch.c`` reads the stream's messages out of libpq in batches;
``cdcsync/source/_staged.c`` builds the staged rows of pgoutput tuples and drops the earlier
versions of a key from a batch's staged rows.
Where no C compiler or Python headers are found, or with CDCSYNC_PURE_PYTHON=1, the
package installs as plain Python and behaves the same, only slower.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup

HOT_MODULES = [
    "cdcsync/source/pgoutput.py",
    "cdcsync/source/replication.py",
    "cdcsync/source/tuples.py",
    "cdcsync/source/transactions.py",
    "cdcsync/source/wal2json_assembler.py",
]


def _why_not_compiled() -> str | None:
    if os.environ.get("CDCSYNC_PURE_PYTHON") == "1":
        return "CDCSYNC_PURE_PYTHON=1"
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        return f"no C compiler ({compiler})"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        return "no Python headers (Debian: apt-get install python3-dev)"
    return None


def _ext_modules() -> list[object]:
    reason = _why_not_compiled()
    if reason is not None:
        print(f"cdcsync: installing without compiled modules: {reason}", file=sys.stderr)
        return []
    from mypyc.build import mypycify  # noqa: PLC0415 (only a compiling build has mypy)

    # The build checks only these modules' types; the dependencies they import need not be
    # installed in an isolated build environment (mypy runs over the whole package in CI).
    compiled = mypycify(["--ignore-missing-imports", *HOT_MODULES], group_name="cdcsync._compiled")
    # Reading the replication stream a batch of messages per call (see the file's comment).
    reader = Extension("cdcsync.source._copybatch", ["cdcsync/source/_copybatch.c"])
    # A batch's earlier versions of a key dropped before the COPY (see the file's comment).
    staged = Extension("cdcsync.source._staged", ["cdcsync/source/_staged.c"])
    return [*compiled, reader, staged]


setup(ext_modules=_ext_modules())
