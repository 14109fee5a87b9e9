"""``cdcsync run``: the pipeline under signal handling, with a bounded graceful shutdown."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from cdcsync import checkpoint
from cdcsync.admin import connect
from cdcsync.config import Settings
from cdcsync.errors import PrerequisiteError
from cdcsync.logs import event
from cdcsync.pipeline import Pipeline, open_target_pool
from cdcsync.source import catalog


def preflight(settings: Settings) -> None:
    """Fail fast, with the fix, on what no retry would cure."""
    with connect(settings.source.dsn.get_secret_value(), "source") as src:
        if catalog.slot_info(src, settings.source.slot) is None:
            raise PrerequisiteError(
                f"replication slot {settings.source.slot!r} does not exist on the source",
                fix="run `cdcsync setup` first",
            )
    with connect(settings.target.dsn.get_secret_value(), "target") as tgt:
        row = tgt.execute("SELECT to_regclass('cdcsync.checkpoint') IS NOT NULL").fetchone()
        if not row or not row[0]:
            raise PrerequisiteError("the target has no cdcsync schema", fix="run `cdcsync setup`")
        checkpoint.install_metadata(tgt)


def run(settings: Settings, stop: threading.Event | None = None) -> None:
    """Stream until SIGTERM/SIGINT (or ``stop``); return normally after a clean shutdown."""
    stop = stop or threading.Event()
    preflight(settings)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        event(logging.INFO, "stopping", slot=settings.source.slot,
              signal=signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    pool = open_target_pool(settings)
    try:
        Pipeline(settings, pool, stop).run()
    finally:
        pool.close(timeout=2)
    event(logging.INFO, "stopped", slot=settings.source.slot)
