"""The collector stays paused through every import of a command's start, and only then resumes."""

from __future__ import annotations

import gc

from cdcsync import coldstart


def test_the_collector_resumes_after_the_last_load_only() -> None:
    was_enabled = gc.isenabled()
    gc.unfreeze()
    gc.enable()
    try:
        coldstart.pause()
        assert not gc.isenabled()
        coldstart.load("json", resume=False)  # `cdcsync run`: the settings, then the early stream
        assert not gc.isenabled() and gc.get_freeze_count() == 0
        coldstart.load("json")
        assert gc.isenabled() and gc.get_freeze_count() > 0
        coldstart.load("json")  # nothing paused: nothing to resume or freeze
        assert gc.isenabled()
    finally:
        gc.unfreeze()
        if not was_enabled:
            gc.disable()
