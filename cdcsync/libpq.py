"""Waiting on libpq directly, for the few paths that bypass psycopg's own query methods.

psycopg's connections are non-blocking: here a wait is a ``select`` on the socket (which releases
the GIL), and every command is read to libpq's end marker, so the psycopg connection stays
consistent afterwards and its transaction state is libpq's. Errors are psycopg's own exception
classes, built from the server's result (a refused row is an ``IntegrityError``).
"""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg
from psycopg import errors, pq
from psycopg.rows import TupleRow

Conn = psycopg.Connection[TupleRow]

_DONE = (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK, pq.ExecStatus.EMPTY_QUERY)


@dataclass(frozen=True, slots=True)
class ScriptResult:
    """Each statement's affected rows, up to the first that failed; that one's error, if any;
    the seconds from sending the query to its first ``COPY`` starting (a round trip, or longer
    when this process was busy), if any."""

    rowcounts: list[int]
    error: psycopg.Error | None
    copy_wait_s: float | None = None


def run_script(conn: Conn, query: bytes, copies: Sequence[bytes],
               signal: tuple[int, threading.Event] | None = None) -> ScriptResult:
    """Send ``query`` (statements separated by ``;``) as one simple query; hand each COPY FROM
    STDIN in it the next of ``copies``; with ``signal`` (a statement's index, an event), set the
    event as soon as that statement's result arrives. The server stops at the first failing
    statement: the rest of the query is skipped, and the transaction is left to the caller."""
    with conn.lock:
        pgconn = conn.pgconn
        # Timed from before the query leaves: libpq sends it from within send_query, and the
        # daemon's other threads (its reader decoding, the lanes) and processes can hold this
        # thread off long after that. Timed from after the flush, waits 10 ms away each way came
        # out as short as 13 ms in bench.wan (as 0.1 ms beside three busy threads): a round trip
        # taken for shorter than it is. Timed from before, a delay only lengthens one wait, which
        # BatchSize's shortest recent wait leaves out.
        sent = time.perf_counter()
        pgconn.send_query(query)
        flush(pgconn)
        copy_wait_s: float | None = None
        rowcounts: list[int] = []
        error: psycopg.Error | None = None
        pending = iter(copies)
        while (result := next_result(pgconn)) is not None:
            if result.status == pq.ExecStatus.COPY_IN:
                if copy_wait_s is None:
                    copy_wait_s = time.perf_counter() - sent
                put_copy(pgconn, next(pending, b""))
            elif result.status in _DONE:
                rowcounts.append(result.command_tuples or 0)
                if signal is not None and len(rowcounts) > signal[0]:
                    signal[1].set()
            elif error is None:
                error = errors.error_from_result(result, encoding=conn.info.encoding)
        if pgconn.status != pq.ConnStatus.OK:
            raise psycopg.OperationalError("the connection to the target was lost") from error
    return ScriptResult(rowcounts, error, copy_wait_s)


def put_copy(pgconn: pq.abc.PGconn, data: bytes) -> None:
    """Queue ``data`` and CopyDone for a COPY FROM STDIN, and send them."""
    while not pgconn.put_copy_data(data):
        writable(pgconn)
    while not pgconn.put_copy_end(None):
        writable(pgconn)
    flush(pgconn)


def next_result(pgconn: pq.abc.PGconn, timeout: float | None = None) -> pq.abc.PGresult | None:
    """The next result of the current command; None at libpq's end marker."""
    while pgconn.is_busy():
        readable(pgconn, timeout)
        pgconn.consume_input()
    return pgconn.get_result()


def results(pgconn: pq.abc.PGconn, timeout: float | None = None) -> list[pq.abc.PGresult]:
    """Every result of the current command, up to libpq's end marker."""
    collected: list[pq.abc.PGresult] = []
    while (result := next_result(pgconn, timeout)) is not None:
        collected.append(result)
    return collected


def flush(pgconn: pq.abc.PGconn, timeout: float | None = None) -> None:
    while pgconn.flush():
        writable(pgconn, timeout)


def readable(pgconn: pq.abc.PGconn, timeout: float | None = None) -> None:
    if not select.select([pgconn.socket], [], [], timeout)[0]:
        raise psycopg.OperationalError(f"the server sent nothing for {timeout} s")


def writable(pgconn: pq.abc.PGconn, timeout: float | None = None) -> None:
    if not select.select([], [pgconn.socket], [], timeout)[1]:
        raise psycopg.OperationalError(f"the server took nothing for {timeout} s")
