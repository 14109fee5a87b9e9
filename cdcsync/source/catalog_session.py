"""One connection to the source for a stream's catalog questions: where the slot stands, and the
column types of each table new to the stream.

A question asked on a connection of its own pays for connecting: a round trip or two, several
more with TLS, and a backend started on the source. At a stream's start every table's first
change asks one, on the reader's path. So the session opens its connection at the first question
and keeps it until the stream ends. A kept connection may have died since (an idle timeout, a
restart): a question that fails on it is asked once more on a new one. One whose link died while
a question waited is cut by the link watch (:mod:`cdcsync.link_watch`), if given.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import psycopg
from psycopg.rows import TupleRow

from cdcsync import link_watch
from cdcsync.dsn import with_session_options
from cdcsync.errors import ConnectionLost, is_transient
from cdcsync.link_watch import LinkWatch

Conn = psycopg.Connection[TupleRow]
T = TypeVar("T")


class CatalogSession:
    """Asks questions of the source's catalog on one kept autocommit connection; safe to share
    between threads (one question at a time)."""

    def __init__(self, dsn: str, links: LinkWatch | None = None) -> None:
        self._dsn = with_session_options(dsn, "cdcsync")
        self._links = links
        self._lock = threading.Lock()
        self._conn: Conn | None = None

    def ask(self, question: Callable[[Conn], T]) -> T:
        """``question`` answered on the kept connection, or on a new one when there is none or
        it failed; failing to reach the source is transient (ConnectionLost)."""
        with self._lock:
            if self._conn is not None and not self._conn.closed:
                try:
                    return question(self._conn)
                except psycopg.OperationalError:
                    # Kept since an earlier question, it may have died while idle.
                    self._drop()
            self._conn = self._connect()
            try:
                return question(self._conn)
            except psycopg.OperationalError as exc:
                self._drop()
                if not is_transient(exc):
                    raise
                raise ConnectionLost(f"lost the source: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _connect(self) -> Conn:
        try:
            return link_watch.connect(self._dsn, self._links)
        except psycopg.OperationalError as exc:
            raise ConnectionLost(f"cannot reach the source: {exc}") from exc

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
