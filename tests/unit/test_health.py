"""Health probes and the HTTP server: real requests to 127.0.0.1:0, a fake clock, no database."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cdcsync.errors import PrerequisiteError
from cdcsync.health import Health, HttpServer
from cdcsync.metrics import Metrics
from tests.harness import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def health(clock: FakeClock) -> Health:
    return Health(ready_lag_s=30.0, stale_after_s=30.0, clock=clock)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics("s1")


@pytest.fixture
def server(metrics: Metrics, health: Health) -> Iterator[HttpServer]:
    srv = HttpServer("127.0.0.1:0", metrics, health)
    srv.start()
    yield srv
    srv.close()


def get(server: HttpServer, path: str) -> tuple[int, str, bytes]:
    """GET a path; returns status, content type and body, 4xx/5xx included."""
    url = f"http://127.0.0.1:{server.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["Content-Type"], exc.read()


def get_json(server: HttpServer, path: str) -> tuple[int, dict[str, Any]]:
    code, ctype, body = get(server, path)
    assert ctype == "application/json"
    return code, json.loads(body)


def streaming(health: Health, lag: float = 1.0) -> None:
    health.set_state("streaming")
    health.set_lag(lag)
    health.beat()


def test_metrics_endpoint_serves_the_exposition(server: HttpServer, metrics: Metrics) -> None:
    """GET /metrics returns the registry in text format with its content type."""
    metrics.transactions(2)
    code, ctype, body = get(server, "/metrics")
    assert code == 200 and ctype == Metrics.CONTENT_TYPE
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert {"cdcsync_applied_transactions", "cdcsync_up"} <= names
    assert b'cdcsync_applied_transactions_total{slot="s1"} 2.0' in body


def test_unknown_path_is_404(server: HttpServer) -> None:
    """Anything but the three routes is 404."""
    assert get(server, "/nope")[0] == 404


def test_healthz_ok_then_stale(server: HttpServer, health: Health, clock: FakeClock) -> None:
    """/healthz is 200 while the loop beats and 503 once it stops beating for stale_after_s."""
    health.beat()
    clock.now += 29
    assert get_json(server, "/healthz")[1]["alive"] is True
    clock.now += 2
    code, body = get_json(server, "/healthz")
    assert code == 503
    assert body["reason"] == "main loop has not run for 31.0 s (limit 30 s)"
    health.beat()
    assert get_json(server, "/healthz")[0] == 200


def test_healthz_halted(server: HttpServer, health: Health) -> None:
    """/healthz is 503 once halted, naming the error, even while the loop still beats."""
    health.set_state("halted", "target rejected a change")
    health.beat()
    code, body = get_json(server, "/healthz")
    assert (code, body["reason"]) == (503, "halted: target rejected a change")


def test_healthz_alive_while_reconnecting(server: HttpServer, health: Health) -> None:
    """Reconnecting is alive (no restart needed) though not ready."""
    health.set_state("reconnecting", "target down: connection refused")
    assert get_json(server, "/healthz")[0] == 200


def test_the_side_found_down_is_known_while_reconnecting_from_it(
        server: HttpServer, health: Health) -> None:
    """The slot lock's keeper checks its lock at once while the target is down: it asks which
    side is down, not the text of the reason, which the probe shows as it is."""
    health.set_down("target", "connection refused")
    assert (health.state, health.down) == ("reconnecting", "target")
    assert get_json(server, "/readyz")[1]["reason"] == "target down: connection refused"
    health.set_down("source", "walsender terminated")
    assert health.down == "source"
    health.set_state("streaming")
    assert health.down is None
    health.set_state("reconnecting", "during the snapshot: refused")
    assert health.down is None


def test_a_side_is_down_from_its_first_failure_through_every_retry(
        health: Health, clock: FakeClock) -> None:
    """How long the source has been out of reach decides whether the active process gives its
    lock up (SlotLock's failover_after_s): retries do not restart the count, a success does."""
    assert health.down_for("source") == 0.0
    health.set_down("source", "connection refused")
    clock.now += 20
    health.set_down("source", "connection timeout expired")
    clock.now += 25
    assert (health.down_for("source"), health.down_for("target")) == (45.0, 0.0)
    health.set_down("target", "connection refused")
    assert health.down_for("source") == 0.0
    health.set_down("source", "connection refused")
    clock.now += 5
    assert health.down_for("source") == 5.0
    health.set_state("streaming")
    assert health.down_for("source") == 0.0


def test_readyz_streaming_under_threshold(server: HttpServer, health: Health) -> None:
    """/readyz is 200 when streaming with a known lag under ready_lag_s."""
    streaming(health, lag=1.0)
    code, body = get_json(server, "/readyz")
    assert code == 200 and body["ready"] is True and body["state"] == "streaming"


@pytest.mark.parametrize(
    ("state", "reason", "expected"),
    [
        ("starting", None, "starting"),
        ("reconnecting", "target down: connection refused", "target down: connection refused"),
        ("halted", "ApplyError: duplicate key", "halted: ApplyError: duplicate key"),
        ("snapshotting", None, "snapshot in progress"),
        ("stopping", None, "stopping"),
    ],
)
def test_readyz_reason_per_state(
    server: HttpServer, health: Health, state: str, reason: str | None, expected: str
) -> None:
    """/readyz is 503 outside streaming, with a reason naming the state."""
    health.set_lag(0.1)
    health.set_state(state, reason)
    code, body = get_json(server, "/readyz")
    assert (code, body["reason"], body["state"]) == (503, expected, state)


def test_readyz_lag_over_threshold(server: HttpServer, health: Health) -> None:
    """/readyz is 503 when the lag reaches ready_lag_s, saying by how much."""
    streaming(health, lag=42.0)
    code, body = get_json(server, "/readyz")
    assert (code, body["reason"]) == (503, "lag 42.0 s over the 30 s readiness threshold")


def test_readyz_lag_unknown(server: HttpServer, health: Health) -> None:
    """/readyz is 503 while streaming before any lag is known."""
    health.set_state("streaming")
    assert get_json(server, "/readyz") == (
        503, {"ready": False, "status": "unavailable", "state": "streaming", "role": None,
              "lag_seconds": None, "reason": "lag not known yet"})


def test_readyz_lag_ages_when_reports_stop(health: Health, clock: FakeClock) -> None:
    """A lag not reported again grows with the clock, so a stalled apply turns unready."""
    streaming(health, lag=5.0)
    assert health.readyz()[0] == 200
    clock.now += 26
    health.beat()  # the loop runs but nothing is applied or heartbeated
    code, body = health.readyz()
    assert (code, body["reason"]) == (503, "lag 31.0 s over the 30 s readiness threshold")


def test_readyz_fails_when_loop_is_stale(health: Health, clock: FakeClock) -> None:
    """A stalled main loop is not ready even with a fresh lag."""
    streaming(health)
    clock.now += 31
    health.set_lag(0.1)
    code, body = health.readyz()
    assert code == 503 and body["reason"].startswith("main loop has not run")


def test_unknown_state_is_refused(health: Health) -> None:
    """A misspelt state raises instead of leaving the probe unready forever."""
    with pytest.raises(ValueError):
        health.set_state("streamin")


def test_port_in_use() -> None:
    """Binding a used port raises PrerequisiteError naming the address and [http] listen."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        listen = f"127.0.0.1:{busy.getsockname()[1]}"
        srv = HttpServer(listen, Metrics("s1"), Health())
        with pytest.raises(PrerequisiteError) as info:
            srv.start()
    message = str(info.value)
    assert listen in message and "[http] listen" in message
    srv.close()


def test_close_frees_the_port(metrics: Metrics, health: Health) -> None:
    """After close() the same port can be bound again, and close() twice is harmless."""
    srv = HttpServer("127.0.0.1:0", metrics, health)
    srv.start()
    port = srv.port
    srv.close()
    srv.close()
    again = HttpServer(f"127.0.0.1:{port}", metrics, health)
    again.start()
    assert again.port == port
    again.close()
