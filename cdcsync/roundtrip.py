"""Reads and writes that cost one round trip on a pooled connection.

A pool connection is not in autocommit: psycopg sends BEGIN before its first statement and the
caller a COMMIT after it, each a round trip of its own (a target 10 ms away pays 20 ms for
each). A statement run in autocommit is its own transaction, and several in one simple query
share one implicit transaction: the same guarantees in a single round trip.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg.rows import TupleRow


@contextmanager
def autocommit(conn: psycopg.Connection[TupleRow]) -> Iterator[psycopg.Connection[TupleRow]]:
    """``conn``, idle, in autocommit for the block; as it was afterwards."""
    was = conn.autocommit
    conn.autocommit = True
    try:
        yield conn
    finally:
        if not conn.closed:
            conn.autocommit = was
