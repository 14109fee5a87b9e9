"""The WAN bench's backlog written while both consumers run and their links stall.

``python -m bench.wan --backlog-during stall``. A backlog builds up in two ways: the consumer was
stopped (``--backlog-during stop``, the default), and drains it after its start; or it runs while
its link stalls (a partition, a stuck router: bytes held, connections kept), and catches up once
the link carries bytes again, with nothing to start. Here both consumers start and stream, both
relays stall (:meth:`bench.relay.Relay.stall`), the backlog is written, and then each relay
resumes in turn (the order alternating between runs). Each consumer is timed from its relay's
resuming until it has applied the backlog, and its CPU seconds per process role are those used
in that time. The other consumer waits, stalled: its walsender blocks on a full socket.

A stall must stay under the servers' replication timeouts (``wal_sender_timeout`` and
``wal_receiver_timeout``, 60 s): the second consumer waits through the write and the first one's
catch-up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

from psycopg import sql

from bench import cpu
from bench import throughput as tp
from bench.common import BenchError, Daemon, Servers, both_streaming, connect, wait_until
from bench.relay import Relay
from cdcsync.model import Lsn


class Running:
    """Both consumers started, streaming, and their relays stalled, until the context exits;
    :meth:`catch_up` resumes one consumer's relay and times its catch-up."""

    def __init__(self, srv: Servers, config: dict[str, Any], workdir: Path,
                 relays: tuple[Relay, Relay], timeout: float) -> None:
        self.srv = srv
        self.timeout = timeout
        self.relays = {"native": relays[0], "cdcsync": relays[1]}
        self.slot = tp.slot_for(config["source"]["decoder"])
        self._port = int(config["http"]["listen"].rsplit(":", 1)[1])
        self._daemon = Daemon(config, workdir)
        self._target_db = tp.database_for(config["source"]["decoder"])
        self._stack = ExitStack()

    def __enter__(self) -> Running:
        with ExitStack() as stack:
            self._source = stack.enter_context(connect(self.srv.source_admin))
            self._native = stack.enter_context(connect(self.srv.target(tp.NATIVE_DB)))
            self._cdcsync = stack.enter_context(connect(self.srv.target(self._target_db)))
            self._subscription("ENABLE")
            stack.callback(self._subscription, "DISABLE")
            self._daemon.start()
            stack.callback(self._stop_daemon)
            # Exits run last in, first out: the relays resume before anything stops.
            for relay in self.relays.values():
                stack.callback(relay.resume)
            wait_until(self._streaming, timeout=self.timeout, what="both consumers to stream")
            for relay in self.relays.values():
                relay.stall()
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def catch_up(self, consumer: str, poller: tp.Poller) -> tp.Drain:
        """Resume ``consumer``'s relay; wait until it has applied the backlog up to the poller's
        marker. Fails if it applied any of it while stalled (the stall did not hold)."""
        position: Callable[[], Lsn]
        alive: Callable[[], None]
        if consumer == "native":
            slot = tp.SUBSCRIPTION
            position = partial(tp.native_position, self._native)
            alive = partial(tp.native_alive, self._native)
        else:
            slot = self.slot
            position = partial(tp.checkpoint_position, self._cdcsync, self.slot)
            alive = self._daemon.ensure_alive
        applied = poller.progress(position)
        pids = self._pids(consumer)
        before = cpu.spent(pids)
        if applied()[0]:
            raise BenchError(f"{consumer} applied part of the backlog while its link stalled")
        started = time.monotonic()
        self.relays[consumer].resume()
        reached = poller.wait(slot, applied, consumer, alive)
        after = cpu.spent(pids)
        peak = None
        if consumer == "cdcsync" and self._daemon.rss is not None:
            self._daemon.rss.sample()  # VmHWM: the peak since the daemon started
            peak = self._daemon.rss.peak_kb / 1024
        seconds = reached.finished - started
        return tp.Drain(seconds, seconds, peak_rss_mb=peak,
                        spent=after.since(before) if after and before else None,
                        first_apply_seconds=reached.first - started)

    def _pids(self, consumer: str) -> dict[str, list[int]]:
        if not self.srv.local:
            return {}
        if consumer == "native":
            return cpu.native_pids(self._source, self._native, tp.SUBSCRIPTION, tp.SUBSCRIPTION)
        return cpu.cdcsync_pids(self._source, self._cdcsync, self._daemon.pid, self.slot)

    def _streaming(self) -> bool:
        tp.native_alive(self._native)
        return both_streaming(self._source, tp.SUBSCRIPTION, self._daemon, self._port)

    def _subscription(self, action: str) -> None:
        self._native.execute(sql.SQL("ALTER SUBSCRIPTION {} {}").format(
            sql.Identifier(tp.SUBSCRIPTION), sql.SQL(action)))

    def _stop_daemon(self) -> None:
        code = self._daemon.stop()
        if code != 0:
            raise BenchError(f"cdcsync run exited with {code} after SIGTERM:\n"
                             f"{self._daemon.log_tail()}")
