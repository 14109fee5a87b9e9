"""Metrics, health endpoints, the heartbeat and freshness, against the two real clusters."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cdcsync import admin
from cdcsync.alerts import flush
from cdcsync.localpg import free_port
from tests.conftest import DbPair
from tests.harness import converged, execute, running, set_up, settings_for, wait_for
from tests.sentry_standin import FakeSentry, reset_sentry


@pytest.fixture(scope="module")
def pair(dbpair: DbPair) -> DbPair:
    return set_up(dbpair, "CREATE TABLE t (id int PRIMARY KEY, v int, "
                                     "updated_at timestamptz DEFAULT now())")


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as err:
        return int(err.code), err.read().decode()
    except urllib.error.URLError:
        return 0, ""  # not listening yet


def _samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    _, text = _get(port, "/metrics")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items()
               if n == name and all((k, labels[k]) in ls for k in labels))


def _settings(pair: DbPair, port: int, **sections: Any) -> Any:
    sections["alerts"] = {"check_interval_s": 0.5, **sections.get("alerts", {})}
    # The workload must arrive through the stream, whose metrics these tests watch; an initial
    # snapshot taken while it is written would copy it instead.
    sections.setdefault("snapshot", {"mode": "never"})
    return settings_for(pair, http={"listen": f"127.0.0.1:{port}"}, **sections)


def test_metrics_move_with_the_workload(pair: DbPair) -> None:
    """Applied totals rise, pending bytes fall to ~0 and lag drops under 1 s after the drain."""
    port = free_port()
    with running(_settings(pair, port)) as runner:
        wait_for(lambda: _get(port, "/healthz")[0] == 200, runner=runner, what="healthz")
        before = _value(_samples(port), "cdcsync_applied_changes_total", table="public.t")
        execute(pair.source_dsn, "INSERT INTO t (id, v) SELECT g, g FROM generate_series(1, 500) g",
                "UPDATE t SET v = v + 1 WHERE id <= 100", "DELETE FROM t WHERE id > 450")
        wait_for(converged(pair, ["public.t"]), runner=runner)

        def drained() -> bool:
            s = _samples(port)
            return (_value(s, "cdcsync_applied_changes_total", table="public.t") - before == 650
                    and any(n == "cdcsync_slot_pending_bytes" for n, _ in s)
                    and _value(s, "cdcsync_slot_pending_bytes") < 1024
                    and _value(s, "cdcsync_slot_wal_status", status="reserved") == 1
                    and _value(s, "cdcsync_lag_seconds") < 1.0)

        wait_for(drained, runner=runner, timeout=20, what="metrics after the drain")
        samples = _samples(port)
        report = admin.status(_settings(pair, port))
    assert report["daemon"] == "streaming" and report["ready"] is True
    assert report["applied_since_start"]["public.t"]["insert"] >= 500
    assert report["slot_wal_status"] == "reserved"
    # A target this near answers within a millisecond, but each wait counts from before its
    # query is sent, and the daemon's other threads may hold the applier's off in between: on a
    # loaded machine, after only the few batches of this test, the shortest wait read 11.4 ms.
    # Still short of the 20 ms from which "auto" batches take their cap of 60,000 rows.
    assert 0 < report["target_round_trip_ms"] < 20
    assert 20_000 <= report["batch_rows_limit"] < 60_000
    assert _value(samples, "cdcsync_applied_changes_total", table="public.t", op="insert") >= 500
    assert _value(samples, "cdcsync_applied_transactions_total") >= 3
    assert _value(samples, "cdcsync_checkpoint_lsn") > 0
    assert _value(samples, "cdcsync_up") == 1
    assert _value(samples, "cdcsync_batch_rows_limit") == report["batch_rows_limit"]
    assert 0 < _value(samples, "cdcsync_target_round_trip_seconds") < 0.02
    assert _value(samples, "cdcsync_slot_wal_status", status="reserved") == 1


def test_readyz_follows_the_target(pair: DbPair) -> None:
    """/readyz turns 503 when the target stops and 200 again once it is back and caught up."""
    if pair.target_cluster is None:
        pytest.skip("needs a local target cluster it may stop")
    port = free_port()
    with running(_settings(pair, port)) as runner:
        execute(pair.source_dsn, "INSERT INTO t (id, v) VALUES (1000, 1)")
        wait_for(lambda: _get(port, "/readyz")[0] == 200, runner=runner, what="ready")
        pair.target_cluster.stop("immediate")
        try:
            execute(pair.source_dsn, "INSERT INTO t (id, v) VALUES (1001, 1)")
            wait_for(lambda: _get(port, "/readyz")[0] == 503, runner=runner, what="not ready")
            _, body = _get(port, "/readyz")
            assert json.loads(body)["ready"] is False
            wait_for(lambda: json.loads(_get(port, "/readyz")[1]).get("reason", "")
                     .startswith("target down"), runner=runner, what="the reason")
        finally:
            pair.target_cluster.start()
        wait_for(lambda: _get(port, "/readyz")[0] == 200, runner=runner, timeout=60,
                 what="ready again")
        wait_for(converged(pair, ["public.t"]), runner=runner)


def test_heartbeat_keeps_an_idle_slot_moving(pair: DbPair, dbpair: DbPair) -> None:
    """With only another database writing WAL, the heartbeat bounds retained WAL and
    cdcsync.freshness keeps advancing."""
    other = f"{dbpair.source_db}_noise"
    execute(pair.source_dsn, f"CREATE DATABASE {other}")
    noise_dsn = pair.source_dsn.replace(f"dbname={dbpair.source_db}", f"dbname={other}")
    execute(noise_dsn, "CREATE TABLE noise (id int)")
    port = free_port()
    settings = _settings(pair, port, source={"heartbeat_interval_s": 0.5})
    try:
        with running(settings) as runner:
            with psycopg.connect(pair.target_dsn, autocommit=True) as tgt:
                first = tgt.execute("SELECT source_commit_time FROM cdcsync.freshness"
                                    ).fetchone()
                retained = []
                for _ in range(6):
                    # CHECKPOINT logs the running transactions, which is when PostgreSQL moves a
                    # slot's restart point up to what the consumer has confirmed.
                    execute(noise_dsn, "INSERT INTO noise SELECT generate_series(1, 50000)",
                            "CHECKPOINT")
                    time.sleep(1)
                    retained.append(_value(_samples(port), "cdcsync_slot_retained_wal_bytes"))
                last = tgt.execute("SELECT source_commit_time, staleness FROM cdcsync.freshness"
                                   ).fetchone()
            assert runner.error is None
    finally:
        execute(pair.source_dsn, f"DROP DATABASE {other} WITH (FORCE)")
    assert first is not None and last is not None and last[0] is not None
    assert first[0] is None or last[0] > first[0]
    assert last[1].total_seconds() < 5
    # Six rounds of ~2 MB each were written; an unconfirmed slot would retain all of them.
    assert max(retained[2:]) < 8 * 2**20, retained


def test_lag_alert_reaches_sentry_once_then_recovers(pair: DbPair,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The target stopped: lag crosses the threshold, exactly one alert reaches a Sentry
    endpoint through a real DSN, and one recovery follows once the stream catches up."""
    if pair.target_cluster is None:
        pytest.skip("needs a local target cluster it may stop")
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    sentry = FakeSentry().start()
    settings = _settings(pair, free_port(), source={"heartbeat_interval_s": 0.3},
                         alerts={"sentry_dsn": sentry.dsn, "lag_seconds": 1.5, "grace_s": 0.5,
                                 "check_interval_s": 0.3})

    def lag_events() -> list[dict[str, Any]]:
        flush()
        return [e for e in sentry.events()
                if e.get("tags", {}).get("threshold") == "lag_seconds"]

    try:
        with running(settings) as runner:
            execute(pair.source_dsn, "INSERT INTO t (id, v) VALUES (2000, 1)")
            wait_for(converged(pair, ["public.t"]), runner=runner)
            pair.target_cluster.stop("immediate")
            try:
                wait_for(lambda: len(lag_events()) == 1, runner=runner, timeout=30,
                         what="the lag alert")
                time.sleep(2)  # still over: no second alert
                assert len(lag_events()) == 1
            finally:
                pair.target_cluster.start()
            wait_for(lambda: len(lag_events()) == 2, runner=runner, timeout=60,
                     what="the recovery")
    finally:
        reset_sentry()
        sentry.close()
    alert, recovery = lag_events()
    assert alert["level"] == "error" and recovery["level"] == "info"
    assert alert["tags"]["slot"] == pair.slot
