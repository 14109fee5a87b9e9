"""Metrics: the contract's names and labels in the text exposition, no database."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from cdcsync.metrics import Metrics

CONTRACT = {
    "cdcsync_lag_seconds": "gauge",
    "cdcsync_slot_pending_bytes": "gauge",
    "cdcsync_slot_retained_wal_bytes": "gauge",
    "cdcsync_slot_wal_status": "gauge",
    "cdcsync_slot_safe_wal_size_bytes": "gauge",
    "cdcsync_applied_changes": "counter",
    "cdcsync_applied_transactions": "counter",
    "cdcsync_conflicts": "counter",
    "cdcsync_dead_letters": "counter",
    "cdcsync_stored_rows": "gauge",
    "cdcsync_batch_seconds": "histogram",
    "cdcsync_batch_rows": "histogram",
    "cdcsync_batch_rows_limit": "gauge",
    "cdcsync_target_round_trip_seconds": "gauge",
    "cdcsync_checkpoint_lsn": "gauge",
    "cdcsync_errors": "counter",
    "cdcsync_up": "gauge",
    "cdcsync_standby": "gauge",
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the exposition, keyed by name and label set."""
    text = metrics.render().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, frozenset({"slot": "s1", **labels}.items())))


def exercised() -> Metrics:
    m = Metrics("s1", clock=FakeClock())
    m.applied("public.orders", "insert", 3)
    m.transactions(1)
    m.conflicts("public.orders", 1)
    m.batch(0.02, 3)
    m.batch_limit(20_000, 0.0004)
    m.checkpoint(0x16_B374D848)
    m.error("ConnectionLost")
    m.set_up(True)
    m.lag(1.5)
    m.slot(100, 2048, "reserved", 4096)
    m.dead_letters("public.orders", 2)
    m.stored_rows(5, 2)
    return m


def test_every_contract_metric_is_exposed_with_its_type() -> None:
    """After one of each call, every contract metric appears with the expected type."""
    text = exercised().render().decode()
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    for name, kind in CONTRACT.items():
        assert families.get(name) == kind, name


def test_every_sample_carries_the_slot_label() -> None:
    """Each series has slot="s1", so pipelines scraped together stay apart."""
    for (name, labels), _ in samples(exercised()).items():
        assert ("slot", "s1") in labels, name


def test_label_names_per_metric() -> None:
    """applied has table and op, conflicts and dead letters have table, errors has kind,
    wal_status has status, stored_rows has kind."""
    m = exercised()
    assert value(m, "cdcsync_applied_changes_total", table="public.orders", op="insert") == 3
    assert value(m, "cdcsync_conflicts_total", table="public.orders") == 1
    assert value(m, "cdcsync_errors_total", kind="ConnectionLost") == 1
    assert value(m, "cdcsync_slot_wal_status", status="reserved") == 1
    assert value(m, "cdcsync_dead_letters_total", table="public.orders") == 2
    assert value(m, "cdcsync_stored_rows", kind="conflicts") == 5
    assert value(m, "cdcsync_stored_rows", kind="dead_letters") == 2


def test_counters_increase() -> None:
    """Repeated calls add up in the counters and the histograms' counts and sums."""
    m = Metrics("s1")
    for _ in range(3):
        m.applied("public.t", "update", 2)
        m.transactions(4)
        m.conflicts("public.t", 1)
        m.error("ApplyError")
        m.batch(0.5, 10)
    assert value(m, "cdcsync_applied_changes_total", table="public.t", op="update") == 6
    assert value(m, "cdcsync_applied_transactions_total") == 12
    assert value(m, "cdcsync_conflicts_total", table="public.t") == 3
    assert value(m, "cdcsync_errors_total", kind="ApplyError") == 3
    assert value(m, "cdcsync_batch_seconds_count") == 3
    assert value(m, "cdcsync_batch_rows_sum") == 30


def test_fresh_metrics_start_at_zero() -> None:
    """Before any event, up is 0 and the slot-only counters exist at 0 for increase()."""
    m = Metrics("s1")
    assert value(m, "cdcsync_up") == 0
    assert value(m, "cdcsync_applied_transactions_total") == 0
    assert value(m, "cdcsync_batch_rows_count") == 0
    assert value(m, "cdcsync_lag_seconds") is None  # unknown until the first report


def test_unknown_op_is_refused() -> None:
    """A free-form op would grow label cardinality; it raises instead."""
    with pytest.raises(ValueError, match="op must be one of"):
        Metrics("s1").applied("public.t", "upsert", 1)


def test_histogram_buckets_span_batches() -> None:
    """Seconds buckets run from 1 ms to 30 s and rows buckets from 1 to 100,000."""
    m = Metrics("s1")
    secs = {float(dict(k[1])["le"]) for k in samples(m) if k[0] == "cdcsync_batch_seconds_bucket"}
    rows = {float(dict(k[1])["le"]) for k in samples(m) if k[0] == "cdcsync_batch_rows_bucket"}
    assert min(secs) == 0.001 and max(secs - {math.inf}) == 30
    assert min(rows) == 1 and max(rows - {math.inf}) == 100_000


def test_wal_status_flips() -> None:
    """Exactly one status is 1; moving to lost flips reserved to 0."""
    m = Metrics("s1")
    m.slot(0, 0, "reserved", None)
    m.slot(0, 0, "lost", None)
    got = {s: value(m, "cdcsync_slot_wal_status", status=s)
           for s in ("reserved", "extended", "unreserved", "lost")}
    assert got == {"reserved": 0, "extended": 0, "unreserved": 0, "lost": 1}


def test_none_removes_slot_series() -> None:
    """None removes a series (absent, not NaN); a later value brings it back."""
    m = Metrics("s1")
    m.slot(10, 20, "extended", 30)
    m.slot(None, None, None, None)
    names = {k[0] for k in samples(m)}
    assert not names & {"cdcsync_slot_pending_bytes", "cdcsync_slot_retained_wal_bytes",
                        "cdcsync_slot_safe_wal_size_bytes", "cdcsync_slot_wal_status"}
    m.slot(11, 21, "reserved", None)
    assert value(m, "cdcsync_slot_pending_bytes") == 11
    assert value(m, "cdcsync_slot_retained_wal_bytes") == 21
    assert value(m, "cdcsync_slot_safe_wal_size_bytes") is None


def test_unknown_wal_status_gets_its_own_series() -> None:
    """A status a newer PostgreSQL may add is exported as 1, the known ones as 0."""
    m = Metrics("s1")
    m.slot(0, 0, "someday", None)
    assert value(m, "cdcsync_slot_wal_status", status="someday") == 1
    assert value(m, "cdcsync_slot_wal_status", status="reserved") == 0


def test_lag_ages_between_reports() -> None:
    """The exported lag is the last report plus the time since, so a stall shows."""
    clock = FakeClock()
    m = Metrics("s1", clock=clock)
    m.lag(2.0)
    clock.now += 10
    assert value(m, "cdcsync_lag_seconds") == pytest.approx(12.0)
    m.lag(0.5)
    assert value(m, "cdcsync_lag_seconds") == pytest.approx(0.5)


def test_checkpoint_and_up() -> None:
    """The checkpoint LSN is exported as its number; up follows set_up."""
    m = Metrics("s1")
    m.checkpoint(0x16_B374D848)
    m.set_up(True)
    assert value(m, "cdcsync_checkpoint_lsn") == 0x16_B374D848
    assert value(m, "cdcsync_up") == 1
    m.set_up(False)
    assert value(m, "cdcsync_up") == 0


def test_injected_registry_and_private_default() -> None:
    """An injected registry is used; default registries are private, so two never collide."""
    registry = CollectorRegistry()
    m = Metrics("s1", registry)
    assert m.registry is registry
    m.transactions(1)
    assert b'cdcsync_applied_transactions_total{slot="s1"} 1.0' in m.render()
    # Two private registries never collide, which is why the default is not the global one.
    Metrics("s2").transactions(1)
    Metrics("s2").transactions(1)


def test_content_type_is_text_format() -> None:
    """CONTENT_TYPE names the text format that render() writes."""
    assert Metrics.CONTENT_TYPE.startswith("text/plain; version=0.0.4")


def test_standby_makes_the_lag_unknown() -> None:
    """A process turning standby exports cdcsync_standby 1 and stops aging its lag (NaN)."""
    clock = FakeClock()
    m = Metrics("s1", clock=clock)
    m.lag(2.0)
    clock.now += 100
    assert value(m, "cdcsync_lag_seconds") == 102.0
    m.set_standby(True)
    clock.now += 100
    assert value(m, "cdcsync_standby") == 1.0
    lag = value(m, "cdcsync_lag_seconds")
    assert lag is not None and math.isnan(lag)
    m.set_standby(False)
    m.lag(0.5)
    assert (value(m, "cdcsync_standby"), value(m, "cdcsync_lag_seconds")) == (0.0, 0.5)
