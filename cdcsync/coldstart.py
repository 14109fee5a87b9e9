"""A process's start: its imports run with the garbage collector paused, then frozen.

Importing what a command needs (psycopg, pydantic and the models it builds, the daemon's modules)
creates a few hundred thousand objects, none of them garbage, and the collector would walk them
again and again while they are created: about a tenth of the imports' CPU. :func:`pause` stops
it before the first heavy import; :func:`load` imports a command's modules, then moves everything
alive into the permanent generation (``gc.freeze``), which later collections skip too, and turns
the collector back on.
"""

from __future__ import annotations

import gc
import importlib

_paused = False


def pause() -> None:
    """Stop the collector until :func:`load` (a no-op when it is already off)."""
    global _paused  # noqa: PLW0603 (one flag per process, as the collector's state is)
    if gc.isenabled():
        gc.disable()
        _paused = True


def load(*modules: str, resume: bool = True) -> None:
    """Import ``modules``; then freeze what exists and resume the collector paused here (not
    with ``resume`` false: more of the command's modules follow)."""
    global _paused  # noqa: PLW0603
    for name in modules:
        importlib.import_module(name)
    if _paused and resume:
        gc.freeze()
        gc.enable()
        _paused = False
