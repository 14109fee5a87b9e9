"""A process's start: its imports run with the garbage collector paused, then frozen.

Importing what a command needs (psycopg, pydantic and the models it builds, the daemon's modules)
creates a few hundred thousand objects, none of them garbage, and the collector would walk them
again and again while they are created: about a tenth of the imports' CPU. :func:`pause` stops
it before the first heavy import; :func:`load` imports a command's modules, then moves everything
alive into the permanent generation (``gc.freeze``), which later collections skip too, and turns
the collector back on.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import threading

_paused = False


def pause() -> None:
    """Stop the collector until :func:`load` (a no-op when it is already off)."""
    global _paused  # noqa: PLW0603 (one flag per process, as the collector's state is)
    if gc.isenabled():
        gc.disable()
        _paused = True


def load(*modules: str) -> None:
    """Import ``modules``; then freeze what exists and resume the collector paused here."""
    global _paused  # noqa: PLW0603
    for name in modules:
        importlib.import_module(name)
    if _paused:
        gc.freeze()
        gc.enable()
        _paused = False


def import_ahead(name: str) -> None:
    """Import ``name`` on a thread of its own, while the caller waits on the network; a later
    ``import`` of it waits for that thread (Python's module lock) and fails as it would have."""
    threading.Thread(target=_import_quietly, args=(name,), name=f"cdcsync-import-{name}",
                     daemon=True).start()


def _import_quietly(name: str) -> None:
    # The caller's own import raises the same error, where it is handled.
    with contextlib.suppress(Exception):
        importlib.import_module(name)
