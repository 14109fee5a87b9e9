"""Structured logs: one event per line, JSON when not on a terminal, with stable field names.

Call :func:`event` with an event name and fields (slot, table, lsn, ...). Values that look like DSNs
are redacted before they are written.

The libraries log through loggers of their own: psycopg_pool when it fails to connect or discards
a broken connection, apscheduler. Left alone, their warnings reached Python's last-resort
handler: raw text, an error message or a traceback over several lines, between the JSON lines a
log shipper parses. :func:`configure` sends them through the same format, as one
:data:`LIBRARY_EVENT` each (warnings and above), with the logger's name and the message.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
from typing import Any

import orjson

from cdcsync.dsn import redact

LOGGER = logging.getLogger("cdcsync")
LIBRARY_EVENT = "library_log"
_FIELDS = "cdcsync_fields"
# The handler configure() put on the root logger for the libraries' records, replaced by the next
# call; other handlers there (a test runner's) are left alone.
_library_handler: logging.Handler | None = None


def _ours(record: logging.LogRecord) -> bool:
    return record.name == LOGGER.name or record.name.startswith(LOGGER.name + ".")


def event(level: int, name: str, **fields: Any) -> None:
    """Log one event; ``name`` is a stable snake_case identifier that alerting can match on."""
    if LOGGER.isEnabledFor(level):
        LOGGER.log(level, name, extra={_FIELDS: fields})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "level": record.levelname.lower(),
        }
        if _ours(record):
            payload["event"] = record.getMessage()
        else:
            payload.update(event=LIBRARY_EVENT, logger=record.name, message=record.getMessage())
        for key, value in getattr(record, _FIELDS, {}).items():
            payload[key] = value if isinstance(value, int | float | bool | None) else str(value)
        if record.exc_info:
            payload["traceback"] = self.formatException(record.exc_info)
        return redact(orjson.dumps(payload).decode())


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = dt.datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        fields = " ".join(f"{k}={v}" for k, v in getattr(record, _FIELDS, {}).items())
        message = record.getMessage() if _ours(record) else f"{record.name}: {record.getMessage()}"
        line = f"{stamp} {record.levelname.lower():7} {message} {fields}".rstrip()
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line)


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Send cdcsync's events to stderr in the chosen format (``auto``: text on a terminal), and
    the libraries' warnings and errors too (see the module docstring)."""
    global _library_handler  # noqa: PLW0603 (the process's logging is global too)
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    formatter = JsonFormatter() if use_json else TextFormatter()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    LOGGER.handlers[:] = [handler]
    LOGGER.setLevel(level.upper())
    LOGGER.propagate = False
    root = logging.getLogger()
    if _library_handler is not None:
        root.removeHandler(_library_handler)
    _library_handler = logging.StreamHandler(sys.stderr)
    _library_handler.setFormatter(formatter)
    _library_handler.setLevel(logging.WARNING)
    root.addHandler(_library_handler)
