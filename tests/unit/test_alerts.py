"""Alerts: one alert per episode over a limit, one recovery, Sentry via a real DSN, scrubbed.

A local HTTP server stands in for Sentry and records the envelopes the SDK's real transport posts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import sentry_sdk

from cdcsync.alerts import Alerter, Thresholds, flush, init_sentry
from tests.harness import FakeClock
from tests.sentry_standin import FakeSentry, reset_sentry

SLOT = "test_slot"
GRACE = 30.0




@pytest.fixture
def fake_sentry(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSentry]:
    """Sentry stand-in on 127.0.0.1 with the SDK initialised against it through a real DSN."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)  # 127.0.0.1 must be reached directly
    fake = FakeSentry()
    fake.thread.start()
    try:
        assert init_sentry(f"http://public@127.0.0.1:{fake.port}/1", slot=SLOT, release="t@1")
        yield fake
    finally:
        reset_sentry()
        fake.server.shutdown()
        fake.server.server_close()


def _alerter(clock: FakeClock, sentry: bool = True) -> Alerter:
    thresholds = Thresholds(lag_seconds=60.0, grace_s=GRACE)
    return Alerter(thresholds, slot=SLOT, sentry=sentry, clock=clock)


def _sent(fake: FakeSentry) -> list[dict[str, Any]]:
    flush()
    return fake.events()


def test_lag_alert_once_then_recovery(fake_sentry: FakeSentry) -> None:
    """Lag over the limit past the grace: one tagged alert, no repeats, then one recovery."""
    clock = FakeClock()
    alerter = _alerter(clock)
    alerter.check_lag(10.0)
    alerter.check_lag(None)
    alerter.check_lag(90.0)
    clock.now += GRACE - 1
    alerter.check_lag(95.0)
    assert _sent(fake_sentry) == []
    clock.now += 1
    alerter.check_lag(100.0)
    for _ in range(5):
        clock.now += GRACE
        alerter.check_lag(120.0)
    (alert,) = _sent(fake_sentry)
    assert alert["level"] == "error"
    assert alert["tags"]["slot"] == SLOT
    assert alert["tags"]["threshold"] == "lag_seconds"
    assert alerter.firing() == ["lag_seconds"]
    alerter.check_lag(5.0)
    alerter.check_lag(4.0)
    alert_again, recovery = _sent(fake_sentry)
    assert alert_again == alert
    assert recovery["level"] == "info"
    assert recovery["tags"]["threshold"] == "lag_seconds"
    assert alerter.firing() == []


def test_back_under_while_pending_sends_nothing(fake_sentry: FakeSentry) -> None:
    """A crossing shorter than the grace sends neither alert nor recovery; the next one restarts."""
    clock = FakeClock()
    alerter = _alerter(clock)
    alerter.check_lag(90.0)
    clock.now += GRACE - 1
    alerter.check_lag(10.0)
    alerter.check_lag(90.0)
    clock.now += GRACE - 1
    alerter.check_lag(90.0)
    assert _sent(fake_sentry) == []


def test_no_dsn_logs_only(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a Sentry DSN an alert is an error-level log line and nothing else."""
    assert init_sentry(None, slot=SLOT, release="t@1") is False
    assert not sentry_sdk.get_client().is_active()
    logger = logging.getLogger("cdcsync")
    # Attached directly, root left out: logs.configure() elsewhere may have turned propagation off,
    # and with it on the records would otherwise arrive twice.
    monkeypatch.setattr(logger, "propagate", False)
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="cdcsync"):
            clock = FakeClock()
            alerter = _alerter(clock, sentry=False)
            alerter.check_lag(90.0)
            clock.now += GRACE
            alerter.check_lag(90.0)
            alerter.check_lag(1.0)
    finally:
        logger.removeHandler(caplog.handler)
    records = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert records == [(logging.ERROR, "alert"), (logging.INFO, "alert_recovered")]
    fields = caplog.records[0].__dict__["cdcsync_fields"]
    assert fields["slot"] == SLOT and fields["threshold"] == "lag_seconds"
    assert (fields["value"], fields["limit"]) == (90.0, 60.0)


def test_slot_lost_alerts_at_once(fake_sentry: FakeSentry) -> None:
    """A lost slot alerts on the first reading, with no grace period."""
    alerter = _alerter(FakeClock())
    alerter.check_slot_lost("reserved")
    alerter.check_slot_lost("lost")
    alerter.check_slot_lost("lost")
    (alert,) = _sent(fake_sentry)
    assert alert["tags"]["threshold"] == "slot_lost"
    assert alerter.firing() == ["slot_lost"]


def test_retained_wal_fraction_and_bytes(fake_sentry: FakeSentry) -> None:
    """Retained WAL alerts on its share of max_slot_wal_keep_size and, separately, on bytes."""
    clock = FakeClock()
    alerter = Alerter(
        Thresholds(retained_wal_bytes=1000, retained_wal_fraction=0.8, grace_s=GRACE),
        slot=SLOT,
        sentry=True,
        clock=clock,
    )
    alerter.check_retained_wal(700, 300)  # 70 % used, under both limits
    for _ in range(3):
        alerter.check_retained_wal(900, 100)  # 90 % used, bytes still under
        clock.now += GRACE
    assert alerter.firing() == ["retained_wal_fraction"]
    alerter.check_retained_wal(2000, None)  # no allowance set: the share no longer applies
    clock.now += GRACE
    alerter.check_retained_wal(2000, None)
    assert alerter.firing() == ["retained_wal_bytes"]
    kinds = [(e["level"], e["tags"]["threshold"]) for e in _sent(fake_sentry)]
    assert kinds == [
        ("error", "retained_wal_fraction"),
        ("info", "retained_wal_fraction"),
        ("error", "retained_wal_bytes"),
    ]


def test_apply_errors_with_table(fake_sentry: FakeSentry) -> None:
    """Consecutive apply errors alert once they reach the limit for the grace, tagged with table."""
    clock = FakeClock()
    alerter = _alerter(clock)
    for count in range(1, 5):
        alerter.check_apply_errors(count, table="public.orders")
        clock.now += GRACE
    alerter.check_apply_errors(0)
    alert, recovery = _sent(fake_sentry)
    assert alert["tags"]["threshold"] == "apply_errors"
    assert alert["tags"]["table"] == "public.orders"
    assert recovery["level"] == "info"


def test_exception_passwords_scrubbed(fake_sentry: FakeSentry) -> None:
    """A captured exception quoting DSN passwords reaches Sentry without them anywhere."""
    # Built at run time: the event carries this file's source lines, which must not hold the secret.
    secret = "".join(["hun", "ter2"])
    dsn = f"postgresql://u:{secret}@h/db"
    sentry_sdk.add_breadcrumb(message=f"connecting to {dsn}")
    sentry_sdk.get_isolation_scope().set_extra("dsn", f"host=h password={secret}")
    try:
        raise RuntimeError(f"cannot connect to {dsn} (password={secret})")
    except RuntimeError as exc:
        sentry_sdk.capture_exception(exc)
    (sent,) = _sent(fake_sentry)
    assert secret not in json.dumps(sent)
    assert sent["exception"]["values"][0]["value"] == (
        "cannot connect to postgresql://u:***@h/db (password=***"
    )
    assert sent["breadcrumbs"]["values"][-1]["message"] == "connecting to postgresql://u:***@h/db"
    assert sent["extra"]["dsn"] == "host=h password=***"
