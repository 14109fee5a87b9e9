"""Structured logs: one event per line, JSON when not on a terminal, with stable field names.

Call :func:`event` with an event name and fields (slot, table, lsn, ...). Values that look like DSNs
are redacted before they are written.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
from typing import Any

import orjson

from cdcsync.dsn import redact

LOGGER = logging.getLogger("cdcsync")
_FIELDS = "cdcsync_fields"


def event(level: int, name: str, **fields: Any) -> None:
    """Log one event; ``name`` is a stable snake_case identifier that alerting can match on."""
    if LOGGER.isEnabledFor(level):
        LOGGER.log(level, name, extra={_FIELDS: fields})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        for key, value in getattr(record, _FIELDS, {}).items():
            payload[key] = value if isinstance(value, int | float | bool | None) else str(value)
        if record.exc_info:
            payload["traceback"] = self.formatException(record.exc_info)
        return redact(orjson.dumps(payload).decode())


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = dt.datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        fields = " ".join(f"{k}={v}" for k, v in getattr(record, _FIELDS, {}).items())
        line = f"{stamp} {record.levelname.lower():7} {record.getMessage()} {fields}".rstrip()
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line)


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Send cdcsync's events to stderr in the chosen format (``auto``: text on a terminal)."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    LOGGER.handlers[:] = [handler]
    LOGGER.setLevel(level.upper())
    LOGGER.propagate = False
