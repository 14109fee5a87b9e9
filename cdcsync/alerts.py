"""Threshold alerts: one alert when a condition has held for a grace period, one recovery after.

The daemon calls the ``check_*`` methods of :class:`Alerter` periodically with the latest readings.
Guarantee: each threshold sends at most one alert per episode of being over it, and a recovery only
for an episode that alerted; readings that stay over send nothing more (no alert storm). Alerts are
always logged; they also go to Sentry when :func:`init_sentry` turned it on.

Every string Sentry would receive passes through :func:`cdcsync.dsn.redact` first, so a database
password quoted in an exception, a breadcrumb or a tag never leaves the process.
"""

from __future__ import annotations

import enum
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from cdcsync.dsn import redact
from cdcsync.logs import event

__all__ = ["Alerter", "Thresholds", "flush", "init_sentry", "scrub"]

# Threshold names: the ``threshold`` tag in Sentry, the log field, and what ``firing()`` returns.
LAG = "lag_seconds"
RETAINED_WAL_BYTES = "retained_wal_bytes"
RETAINED_WAL_FRACTION = "retained_wal_fraction"
SLOT_LOST = "slot_lost"
APPLY_ERRORS = "apply_errors"


@dataclass(frozen=True)
class Thresholds:
    """Limits that raise an alert once exceeded for ``grace_s`` seconds (slot loss: at once)."""

    lag_seconds: float = 60.0
    retained_wal_bytes: int = 10 * 2**30
    retained_wal_fraction: float = 0.8
    apply_errors: int = 3
    grace_s: float = 60.0


def scrub(value: Any) -> Any:
    """Return ``value`` with every string inside it (keys included) passed through ``redact``."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {scrub(k): scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    if isinstance(value, tuple):
        return tuple(scrub(v) for v in value)
    return value


def _scrub_event(event_: Any, _hint: Any) -> Any:
    return scrub(event_)


def _scrub_breadcrumb(crumb: Any, _hint: Any) -> Any:
    return scrub(crumb)


def init_sentry(dsn: str | None, *, slot: str, release: str) -> bool:
    """Turn Sentry on when ``dsn`` is set; return whether it is on (off: alerts are only logged)."""
    if not dsn:
        return False
    # Imported only here: sentry_sdk (and urllib3 with it) is a fifth of every daemon's start.
    import sentry_sdk  # noqa: PLC0415
    from sentry_sdk.integrations.logging import LoggingIntegration  # noqa: PLC0415

    sentry_sdk.init(
        dsn=dsn,
        release=release,
        before_send=_scrub_event,
        before_breadcrumb=_scrub_breadcrumb,
        # Our own error-level log lines stay breadcrumbs: the Alerter already sends each alert once,
        # and letting the logging integration capture them too would send every alert twice.
        integrations=[LoggingIntegration(event_level=None)],
        # send_default_pii is left unset: unset means no PII on every 2.x release, while setting it
        # (even to False) is deprecated from 2.75 on in favour of data_collection, which 2.0 lacks.
        # Frame locals hold replicated rows (user data) and DSNs, possibly truncated before the
        # "@" that lets redact() recognise the password; neither belongs in Sentry.
        include_local_variables=False,
    )
    # The global scope, not the current one: events from threads started earlier carry it too.
    sentry_sdk.get_global_scope().set_tag("slot", slot)
    return True


def flush(timeout: float = 2.0) -> None:
    """Wait up to ``timeout`` seconds for queued Sentry events to be sent (call at shutdown)."""
    sentry_sdk = sys.modules.get("sentry_sdk")  # never imported: nothing was sent
    if sentry_sdk is not None and sentry_sdk.get_client().is_active():
        sentry_sdk.flush(timeout=timeout)


class _State(enum.Enum):
    OK = "ok"
    PENDING = "pending"
    FIRING = "firing"


Transition = Literal["alert", "recovery"] | None


class _Condition:
    """ok -> pending (over since t) -> firing (alerted once) -> ok (recovered once); pure."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.state = _State.OK
        self.since = 0.0

    def observe(self, over: bool, now: float) -> Transition:
        """Advance with one reading; return what must be sent, if anything."""
        if not over:
            # Going back under while only pending never alerted, so there is nothing to recover.
            was_firing = self.state is _State.FIRING
            self.state = _State.OK
            return "recovery" if was_firing else None
        if self.state is _State.OK:
            self.state, self.since = _State.PENDING, now
        if self.state is _State.PENDING and now - self.since >= self.grace_s:
            self.state = _State.FIRING
            return "alert"
        return None


class Alerter:
    """Turns periodic readings into one alert per episode over a threshold and one recovery.

    Thread-safe: the check methods may be called from different scheduler threads. A reading of
    ``None`` means "unknown" (e.g. no commit seen yet) and leaves that threshold's state unchanged.
    """

    def __init__(
        self,
        thresholds: Thresholds,
        *,
        slot: str,
        sentry: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.thresholds = thresholds
        self.slot = slot
        self.sentry = sentry
        self._clock = clock
        self._lock = threading.Lock()
        grace = thresholds.grace_s
        self._conditions = {
            LAG: _Condition(grace),
            RETAINED_WAL_BYTES: _Condition(grace),
            RETAINED_WAL_FRACTION: _Condition(grace),
            # A lost slot never comes back by waiting: the target must be resynced, so say it now.
            SLOT_LOST: _Condition(0.0),
            APPLY_ERRORS: _Condition(grace),
        }

    def check_lag(self, seconds: float | None) -> None:
        """Replication lag in seconds; over when above ``lag_seconds``."""
        if seconds is not None:
            limit = self.thresholds.lag_seconds
            self._observe(LAG, seconds, limit, seconds > limit)

    def check_retained_wal(self, retained_bytes: int | None, safe_wal_size: int | None) -> None:
        """WAL the slot holds back: bytes and, when ``max_slot_wal_keep_size`` is set, a share.

        ``safe_wal_size`` is ``pg_replication_slots.safe_wal_size`` (None when the setting is -1);
        the share is ``retained / (retained + safe)``, the part of the allowance already used.
        """
        if retained_bytes is None:
            return
        limit = self.thresholds.retained_wal_bytes
        self._observe(RETAINED_WAL_BYTES, retained_bytes, limit, retained_bytes > limit)
        fraction = _used_fraction(retained_bytes, safe_wal_size)
        limit_f = self.thresholds.retained_wal_fraction
        over = fraction is not None and fraction > limit_f
        # No allowance configured means no fraction to exceed: an episode in progress recovers.
        self._observe(RETAINED_WAL_FRACTION, fraction, limit_f, over)

    def check_slot_lost(self, wal_status: str | None) -> None:
        """``pg_replication_slots.wal_status``; "lost" alerts at once, without grace."""
        if wal_status is not None:
            self._observe(SLOT_LOST, wal_status, "lost", wal_status == "lost")

    def check_apply_errors(self, consecutive: int, *, table: str | None = None) -> None:
        """Consecutive failed apply attempts; over when it reaches ``apply_errors``."""
        limit = self.thresholds.apply_errors
        self._observe(APPLY_ERRORS, consecutive, limit, consecutive >= limit, table=table)

    def firing(self) -> list[str]:
        """Names of the thresholds whose alert has been sent and not yet recovered."""
        with self._lock:
            return [n for n, c in self._conditions.items() if c.state is _State.FIRING]

    def _observe(
        self, threshold: str, value: object, limit: object, over: bool, *, table: str | None = None
    ) -> None:
        with self._lock:
            transition = self._conditions[threshold].observe(over, self._clock())
        # Sent outside the lock: a slow Sentry transport must not hold up other checks.
        if transition is not None:
            message = _message(transition, self.slot, threshold, value, limit)
            self._send(transition, threshold, message, value=value, limit=limit, table=table)

    def _send(
        self,
        kind: Literal["alert", "recovery"],
        threshold: str,
        message: str,
        *,
        value: object,
        limit: object,
        table: str | None = None,
    ) -> None:
        alert = kind == "alert"
        level, name = (logging.ERROR, "alert") if alert else (logging.INFO, "alert_recovered")
        fields: dict[str, Any] = {"slot": self.slot, "threshold": threshold}
        fields.update(value=value, limit=limit)
        if table is not None:
            fields["table"] = table
        event(level, name, message=message, **fields)
        if not self.sentry:
            return
        import sentry_sdk  # noqa: PLC0415 (init_sentry imported it already)

        with sentry_sdk.new_scope() as scope:
            for key in ("slot", "threshold", "table"):
                if key in fields:
                    scope.set_tag(key, fields[key])
            scope.set_context("alert", {"kind": kind, "value": value, "limit": limit})
            # One Sentry issue per slot, threshold and kind, whatever value the message quotes; a
            # recovery gets its own issue so that it does not count as a regression of the alert.
            scope.fingerprint = ["cdcsync", kind, self.slot, threshold]
            sentry_sdk.capture_message(message, level="error" if alert else "info")


def _message(kind: str, slot: str, threshold: str, value: object, limit: object) -> str:
    if threshold == SLOT_LOST:
        if kind == "alert":
            return f"cdcsync slot {slot} is lost: the source removed WAL it needed; resync"
        return f"cdcsync slot {slot} is no longer lost (wal_status {value})"
    if kind == "alert":
        return f"cdcsync slot {slot}: {threshold} is {value}, over the limit {limit}"
    return f"cdcsync slot {slot}: {threshold} is back within the limit {limit} (now {value})"


def _used_fraction(retained_bytes: int, safe_wal_size: int | None) -> float | None:
    if safe_wal_size is None:
        return None
    allowance = retained_bytes + max(safe_wal_size, 0)
    return retained_bytes / allowance if allowance > 0 else 1.0
