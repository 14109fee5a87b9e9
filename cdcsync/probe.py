"""The daemon's HTTP probes as another command reads them (``cdcsync status``, ``verify``)."""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any

import orjson


def base_url(listen: str) -> str | None:
    """Where a daemon configured with ``[http] listen`` answers, or None for port 0 (any)."""
    host, _, port = listen.rpartition(":")
    if port == "0":
        return None
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"


def readiness(base: str) -> dict[str, Any] | None:
    """The body of ``/readyz`` whatever its status (503 says why not ready), or None when
    nothing answers there."""
    try:
        with urllib.request.urlopen(f"{base}/readyz", timeout=2) as response:
            body = response.read()
    except urllib.error.HTTPError as err:
        body = err.read()
    except OSError:
        return None
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return answer if isinstance(answer, dict) else None
