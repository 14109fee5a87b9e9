"""DSNs: the session settings every cdcsync connection needs, and redaction for printing."""

from __future__ import annotations

import os
import re
import socket

from psycopg.conninfo import conninfo_to_dict, make_conninfo

# Text values cross from the source's output functions to the target's input functions; both ends
# must agree on the ambiguous formats, as PostgreSQL's own subscriber arranges for itself.
# wal2json cuts the first two characters off every bytea value, which only hex output survives.
# Text passes through cdcsync as bytes, never decoded: with UTF8 on every connection each server
# converts from and to its own encoding, so databases in different encodings work.
SESSION_OPTIONS = ("-c datestyle=ISO -c intervalstyle=postgres -c extra_float_digits=3 "
                   "-c bytea_output=hex -c client_encoding=UTF8")

# A peer that vanished without closing the connection (its host lost power or was partitioned
# away) answers nothing, and only timeouts find out; the system defaults take hours. Each server
# ends the session after 5 + 3 * 3 s of silence when idle, or 10 s of unacknowledged sending: a
# target backend, which would keep an open transaction's row locks, is gone before a standby
# needs it. The client side does the same for cdcsync's own waits.
PEER_KEEPALIVE_OPTIONS = ("-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=3 "
                          "-c tcp_keepalives_count=3")
PEER_TIMEOUT_OPTIONS = f"{PEER_KEEPALIVE_OPTIONS} -c tcp_user_timeout=10000"
# Linux (since 5.11) also ends a connection once its peer's receive window has stayed closed
# for the user timeout, though every probe is answered: a live client that holds back its
# reading. cdcsync holds back reading the slot's stream, and a snapshot's source COPY, for as
# long as the target is slow (a batch waiting on a lock, a target paused), so their servers
# keep the keepalives only. A walsender left by a host that vanished with data in flight then
# stays until wal_sender_timeout, unless the next holder of the slot's lock ends it first.
PACED_PEER_OPTIONS = f"{PEER_KEEPALIVE_OPTIONS} -c tcp_user_timeout=0"
CLIENT_KEEPALIVES = {"keepalives": "1", "keepalives_idle": "5", "keepalives_interval": "3",
                     "keepalives_count": "3", "tcp_user_timeout": "10000"}

_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]*(?=@)", re.IGNORECASE)
_KV_PASSWORD = re.compile(r"(?P<head>password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def application_name(pid: int | None = None, host: str | None = None) -> str:
    """``cdcsync PID@HOST``, cut to PostgreSQL's 63 bytes: the name of the sessions that stand
    for this process (the slot lock's, the slot's stream), which status shows."""
    name = f"cdcsync {pid or os.getpid()}@{host or socket.gethostname()}"
    return name.encode()[:63].decode(errors="ignore")


def redact(text: str) -> str:
    """Replace every password in ``text`` (URL or key=value form) with ``***``."""
    text = _URL_PASSWORD.sub(r"\g<head>***", text)
    return _KV_PASSWORD.sub(r"\g<head>***", text)


def with_session_options(dsn: str, application_name: str, extra: str = "", *,
                         paced: bool = False) -> str:
    """Add cdcsync's session settings, dead-peer timeouts and ``extra`` startup options to a
    DSN; ``paced`` for a connection whose reading cdcsync holds back (see
    PACED_PEER_OPTIONS). The user's own options come last, so their ``-c`` settings win, and
    their libpq keepalive parameters are kept."""
    params = conninfo_to_dict(dsn)
    user_options = str(params.get("options") or "")
    peer = PACED_PEER_OPTIONS if paced else PEER_TIMEOUT_OPTIONS
    params["options"] = " ".join(
        o for o in (SESSION_OPTIONS, peer, extra, user_options) if o)
    params.setdefault("application_name", application_name)
    for name, value in CLIENT_KEEPALIVES.items():
        params.setdefault(name, value)
    return make_conninfo(**{k: str(v) for k, v in params.items() if v is not None})


def describe(dsn: str) -> str:
    """A short, password-free description of where a DSN points: ``user@host:port/dbname``."""
    try:
        params = conninfo_to_dict(dsn)
    except Exception:
        return redact(dsn)
    host = params.get("host") or params.get("hostaddr") or "localhost"
    port = params.get("port") or "5432"
    user = params.get("user") or "(default user)"
    return f"{user}@{host}:{port}/{params.get('dbname') or '(default db)'}"
