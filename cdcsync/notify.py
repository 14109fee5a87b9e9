"""The systemd notify protocol: readiness, watchdog and status for a ``Type=notify`` unit.

The protocol is one datagram of ``KEY=value`` lines sent to the AF_UNIX socket named by
``NOTIFY_SOCKET`` (a path, or an abstract address when it starts with ``@``). Without that variable
every call does nothing, so the daemon runs unchanged outside systemd. Sending never raises: a
supervisor that stopped listening must not stop the pipeline.

:class:`Notifier` is the socket; :class:`SystemdReporter` turns the daemon's health (state changes
and main-loop beats) into READY=1, WATCHDOG=1, STATUS= and STOPPING=1.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

from cdcsync.logs import event

# How often STATUS= is refreshed when no watchdog is configured.
_STATUS_EVERY_S = 5.0


class Notifier:
    """Sends notify datagrams to ``address``; a None address makes it a no-op."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._failed = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Notifier:
        """What systemd hands the service: NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID."""
        address = environ.get("NOTIFY_SOCKET") or None
        usec: int | None = None
        raw = environ.get("WATCHDOG_USEC", "")
        # WATCHDOG_PID names the process the watchdog is meant for; a child that inherited the
        # environment (``cdcsync`` started from a shell script) must not pet it.
        meant_for = environ.get("WATCHDOG_PID")
        if raw.isdigit() and int(raw) > 0 and (meant_for is None or meant_for == str(os.getpid())):
            usec = int(raw)
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """Half the watchdog timeout, as sd_watchdog_enabled(3) recommends; None: no watchdog."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2e6

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines as one datagram; return whether it was delivered."""
        if self.address is None or not assignments:
            return False
        address = self.address
        if address.startswith("@"):
            address = "\0" + address[1:]  # Linux abstract namespace
        payload = "\n".join(a.replace("\n", " ") for a in assignments).encode()
        try:
            # Non-blocking: a receiver that stops reading fills its queue (10 datagrams by
            # default), and a blocking send would then stall the loop that sends watchdog pings.
            flags = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            with socket.socket(socket.AF_UNIX, flags) as sock:
                sock.connect(address)
                sock.sendall(payload)
        except OSError as exc:
            if not self._failed:  # once: a gone supervisor would otherwise flood the log
                self._failed = True
                event(logging.WARNING, "systemd_notify_failed", socket=self.address,
                      error=str(exc))
            return False
        return True


class SystemdReporter:
    """Watches :class:`~cdcsync.health.Health` and tells systemd what it sees.

    - READY=1 once, when the daemon first streams, snapshots or waits as a standby: each is a
      started service (a standby is healthy and waiting for the lock).
    - WATCHDOG=1 at half the watchdog interval, only from main-loop beats: a loop that hangs stops
      beating and systemd restarts the service.
    - STATUS= on every state change and with each watchdog ping, carrying the lag.
    - STOPPING=1 when the daemon starts its graceful shutdown.
    """

    READY_STATES = frozenset({"streaming", "snapshotting", "standby"})

    def __init__(self, notifier: Notifier, lag: Callable[[], float | None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.notifier = notifier
        self._lag = lag
        self._clock = clock
        self._lock = threading.Lock()
        self._state = "starting"
        self._reason: str | None = None
        self._ready = False
        self._stopping = False
        self._last_ping = -float("inf")

    def state_changed(self, state: str, reason: str | None) -> None:
        lines: list[str] = []
        with self._lock:
            self._state, self._reason = state, reason
            if state in self.READY_STATES and not self._ready:
                self._ready = True
                lines.append("READY=1")
            if state == "stopping" and not self._stopping:
                self._stopping = True
                lines.append("STOPPING=1")
            lines.append(f"STATUS={self._status()}")
        self.notifier.send(*lines)

    def beat(self) -> None:
        interval = self.notifier.watchdog_interval_s
        every = _STATUS_EVERY_S if interval is None else min(interval, _STATUS_EVERY_S)
        now = self._clock()
        with self._lock:
            if now - self._last_ping < every:
                return
            self._last_ping = now
            lines = [f"STATUS={self._status()}"]
        if interval is not None:
            lines.insert(0, "WATCHDOG=1")
        self.notifier.send(*lines)

    def _status(self) -> str:
        text = self._state
        if self._reason:
            text += f": {self._reason}"
        lag = self._lag()
        if lag is not None and self._state == "streaming":
            text += f", lag {lag:.1f} s"
        return text
