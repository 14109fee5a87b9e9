"""Liveness and readiness, and the HTTP server for ``/metrics``, ``/healthz`` and ``/readyz``.

- ``/healthz`` (liveness): the main loop has beaten within ``stale_after_s`` and the daemon has not
  halted. A supervisor restarts the process when it fails.
- ``/readyz`` (readiness): streaming, with a known lag under ``ready_lag_s``. A load balancer
  stops sending readers to the target when it fails; the body's ``reason`` says why.

:class:`Health` holds no I/O and takes an injectable clock, so both answers are unit-tested
without sleeping. :class:`HttpServer` is the only socket here.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal, Protocol, cast

import orjson

from cdcsync.errors import PrerequisiteError
from cdcsync.logs import event
from cdcsync.metrics import Metrics


class State(StrEnum):
    """The daemon's lifecycle; members are plain strings, so ``set_state("streaming")`` works."""

    STARTING = "starting"
    SNAPSHOTTING = "snapshotting"
    STREAMING = "streaming"
    STANDBY = "standby"
    RECONNECTING = "reconnecting"
    HALTED = "halted"
    STOPPING = "stopping"


# What /readyz says for each state that is not ready; a reason given to set_state follows it.
_NOT_READY = {
    State.STARTING: "starting",
    State.SNAPSHOTTING: "snapshot in progress",
    State.STANDBY: "standby",
    State.RECONNECTING: "reconnecting",
    State.HALTED: "halted",
    State.STOPPING: "stopping",
}


Side = Literal["source", "target"]


class HealthObserver(Protocol):
    """Told of every state change and main-loop beat (systemd notify); must not block or raise."""

    def state_changed(self, state: str, reason: str | None) -> None: ...

    def beat(self) -> None: ...


class Health:
    """Thread-safe daemon state for the probes: the main loop writes, HTTP threads read.

    The construction time counts as the first beat, so a start-up that hangs for longer than
    ``stale_after_s`` before the main loop runs is reported too.
    """

    def __init__(
        self,
        ready_lag_s: float = 30.0,
        stale_after_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ready_lag_s = ready_lag_s
        self.stale_after_s = stale_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._state = State.STARTING
        self._reason: str | None = None
        self._down: Side | None = None
        self._down_since = 0.0
        self._lag: tuple[float, float] | None = None  # (seconds, clock() when reported)
        self._last_beat = clock()
        self._role: str | None = None
        self._observers: list[HealthObserver] = []

    def watch(self, observer: HealthObserver) -> None:
        """Call ``observer`` on every later state change and beat."""
        self._observers.append(observer)

    def set_role(self, role: str | None) -> None:
        """"active" (holds the slot's lock), "standby" (waits for it), or None (not contending)."""
        with self._lock:
            self._role = role

    @property
    def role(self) -> str | None:
        return self._role

    def set_state(self, state: str, reason: str | None = None) -> None:
        """Enter ``state``, with ``reason`` for the probes. Reconnecting to a side found down
        is :meth:`set_down`."""
        self._enter(State(state), reason, None)

    def set_down(self, side: Side, reason: str) -> None:
        """Reconnecting because ``side`` failed; the probes say "``side`` down: ``reason``"."""
        self._enter(State.RECONNECTING, f"{side} down: {reason}", side)

    def _enter(self, new: State, reason: str | None, down: Side | None) -> None:
        with self._lock:
            if down is not None and down != self._down:
                self._down_since = self._clock()
            self._state, self._reason, self._down = new, reason, down
        for observer in self._observers:
            observer.state_changed(str(new), reason)

    @property
    def down(self) -> Side | None:
        """The side whose failure the daemon is reconnecting from, if that is its state."""
        return self._down

    def down_for(self, side: Side) -> float:
        """Seconds since ``side`` was first found down, through every retry since; 0 while it
        is not down."""
        with self._lock:
            return self._clock() - self._down_since if self._down == side else 0.0

    def set_lag(self, seconds: float | None) -> None:
        """Lag as measured now (None: unknown). It ages with the clock until the next report."""
        with self._lock:
            self._lag = None if seconds is None else (seconds, self._clock())

    def beat(self) -> None:
        """Called by the main loop on every iteration, including idle ones."""
        with self._lock:
            self._last_beat = self._clock()
        for observer in self._observers:
            observer.beat()

    @property
    def state(self) -> str:
        return str(self._state)

    @property
    def reason(self) -> str | None:
        return self._reason

    @property
    def lag_seconds(self) -> float | None:
        """Now minus the newest applied commit time, or None while unknown."""
        with self._lock:
            lag = self._lag
        # Aging keeps a stalled loop, which stops reporting, from staying "ready" forever.
        return None if lag is None else lag[0] + (self._clock() - lag[1])

    @property
    def beat_age_seconds(self) -> float:
        """Seconds since the main loop last beat."""
        with self._lock:
            return self._clock() - self._last_beat

    def _stale_reason(self) -> str | None:
        age = self.beat_age_seconds
        if age > self.stale_after_s:
            return (f"main loop has not run for {age:.1f} s "
                    f"(limit {self.stale_after_s:g} s)")
        return None

    def healthz(self) -> tuple[int, dict[str, Any]]:
        """200 while the main loop beats and the daemon has not halted; 503 with the reason."""
        with self._lock:
            state, detail = self._state, self._reason
        # Halted first: its reason (the error) says more than the stale beat that follows it.
        if state is State.HALTED:
            return self._answer("alive", state, _not_ready_reason(state, detail))
        return self._answer("alive", state, self._stale_reason())

    def readyz(self) -> tuple[int, dict[str, Any]]:
        """200 only while streaming with a known lag under ``ready_lag_s``; 503 with the reason."""
        with self._lock:
            state, detail = self._state, self._reason
        reason = None if state is State.STREAMING else _not_ready_reason(state, detail)
        if reason is None:
            reason = self._stale_reason()
        lag = self.lag_seconds
        if reason is None and lag is None:
            reason = "lag not known yet"
        elif reason is None and lag is not None and lag >= self.ready_lag_s:
            reason = f"lag {lag:.1f} s over the {self.ready_lag_s:g} s readiness threshold"
        return self._answer("ready", state, reason)

    def _answer(
        self, verdict: str, state: State, reason: str | None
    ) -> tuple[int, dict[str, Any]]:
        """The probe's answer; ``verdict`` ("alive" or "ready") is the boolean key for scripts."""
        lag = self.lag_seconds
        body: dict[str, Any] = {
            verdict: reason is None,
            "status": "ok" if reason is None else "unavailable",
            "state": str(state),  # the state the verdict was made on, not a newer one
            "role": self._role,
            "lag_seconds": None if lag is None else round(lag, 3),
        }
        if reason is not None:
            body["reason"] = reason
        return (200 if reason is None else 503), body


def _not_ready_reason(state: State, detail: str | None) -> str:
    if state is State.RECONNECTING and detail:
        return detail  # already says which side is down: "target down: connection refused"
    prefix = _NOT_READY.get(state, str(state))
    return f"{prefix}: {detail}" if detail else prefix


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Without this a restarted daemon cannot bind while old connections sit in TIME_WAIT.
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], metrics: Metrics, health: Health) -> None:
        self.metrics = metrics
        self.health = health
        super().__init__(address, _Handler)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server_version = "cdcsync"

    def do_GET(self) -> None:
        server = cast(_Server, self.server)
        path = self.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                self._send(200, server.metrics.render(), Metrics.CONTENT_TYPE)
            elif path in ("/healthz", "/readyz"):
                probe = server.health.healthz if path == "/healthz" else server.health.readyz
                code, body = probe()
                self._send(code, orjson.dumps(body), "application/json")
            else:
                self._send(404, orjson.dumps({"error": f"no such path: {path}"}),
                           "application/json")
        except Exception as exc:
            # A failing scrape must be visible, but must never take the daemon down.
            event(logging.ERROR, "http_error", path=path, error=repr(exc))
            self._send(500, orjson.dumps({"error": repr(exc)}), "application/json")

    def _send(self, code: int, payload: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a scrape every 15 s must not write a line to stderr each time."""


class HttpServer:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` on a daemon thread.

    Nothing is bound until :meth:`start`; :meth:`close` stops serving and frees the port.
    """

    def __init__(self, listen: str, metrics: Metrics, health: Health) -> None:
        self.listen = listen
        self._metrics = metrics
        self._health = health
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind ``listen`` and serve; raises PrerequisiteError when the address is unusable."""
        host, port = _split_listen(self.listen)
        server_class = _Server6 if ":" in host else _Server
        try:
            self._server = server_class((host, port), self._metrics, self._health)
        except OSError as exc:
            raise PrerequisiteError(
                f"cannot listen on {self.listen} for /metrics, /healthz and /readyz: "
                f"{exc.strerror or exc}",
                fix="stop whatever uses that address, or set [http] listen "
                    "(CDCSYNC_HTTP__LISTEN) to a free HOST:PORT",
            ) from exc
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
            name="cdcsync-http", daemon=True,
        )
        self._thread.start()
        event(logging.INFO, "http_listening", listen=f"{host}:{self.port}")

    @property
    def port(self) -> int:
        """The bound port (the real one when ``listen`` asked for port 0)."""
        if self._server is None:
            raise RuntimeError("HttpServer.port is known only after start()")
        return int(self._server.server_address[1])

    def close(self) -> None:
        """Stop serving and release the port; safe to call twice or before start()."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()  # returns within poll_interval once serve_forever notices
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None


def _split_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:9187``) into a bindable pair; config validated the form."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)
