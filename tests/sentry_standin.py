"""A local HTTP server standing in for Sentry: it records the envelopes it receives."""

from __future__ import annotations

import gzip
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import sentry_sdk


class FakeSentry:
    """Records the items of every envelope posted to it, as Sentry's ingest endpoints would."""

    def __init__(self) -> None:
        self.items: list[tuple[dict[str, Any], Any]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path.startswith("/api/1/envelope/"):
                    fake.record(envelope_items(body))
                elif self.path.startswith("/api/1/store/"):
                    fake.record([({"type": "event"}, json.loads(body))])
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep the test output free of access-log lines

        return Handler

    def record(self, items: list[tuple[dict[str, Any], Any]]) -> None:
        with self.lock:
            self.items.extend(items)

    @property
    def dsn(self) -> str:
        return f"http://public@127.0.0.1:{self.port}/1"

    def start(self) -> FakeSentry:
        self.thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def events(self) -> list[dict[str, Any]]:
        """Error/message events received so far (client reports and sessions left out)."""
        with self.lock:
            return [payload for header, payload in self.items if header.get("type") == "event"]


def envelope_items(body: bytes) -> list[tuple[dict[str, Any], Any]]:
    """Split an envelope: a header line, then item headers each followed by their payload."""
    _, _, rest = body.partition(b"\n")
    items = []
    while rest.strip():
        header_line, _, rest = rest.partition(b"\n")
        header = json.loads(header_line)
        if "length" in header:
            payload, rest = rest[: header["length"]], rest[header["length"] :].lstrip(b"\n")
        else:
            payload, _, rest = rest.partition(b"\n")
        items.append((header, json.loads(payload) if payload.strip() else None))
    return items


def reset_sentry() -> None:
    """Close the client and leave the SDK as if never initialised, so other tests are unaffected."""
    sentry_sdk.get_client().close(timeout=2.0)
    sentry_sdk.get_global_scope().set_client(None)
    sentry_sdk.get_global_scope().remove_tag("slot")
