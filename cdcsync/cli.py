"""The ``cdcsync`` entry point: set the allocator's thresholds (:mod:`cdcsync.allocator`), pause
the garbage collector, then run :mod:`cdcsync.commands`.

Nothing heavy is imported here, so that every import of a command (psycopg, pydantic, the
daemon) runs with the collector paused; :mod:`cdcsync.commands` resumes it once the command's
modules are in (see :mod:`cdcsync.coldstart`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from cdcsync import allocator, coldstart


def main(argv: Sequence[str] | None = None) -> int:
    allocator.keep_freed_memory()
    coldstart.pause()
    try:
        from cdcsync import commands  # noqa: PLC0415 (after the pause: see the module docstring)

        return commands.main(argv)
    finally:
        coldstart.load()  # the collector back on where the command never got to it (--help)


if __name__ == "__main__":
    sys.exit(main())
