"""COPY data moved at the libpq level, a block at a time instead of a row at a time.

A ``COPY ... TO STDOUT`` arrives as one CopyData message per row. psycopg's Copy objects spend
a Python generator step, a wait and a buffer append on each of them, and the snapshot's copy
threads share one GIL, so at a few hundred thousand rows a second Python, not PostgreSQL, set
the pace. Here the messages are taken straight from libpq, gathered into blocks of about
:data:`BLOCK_BYTES` and handed to the target as one message each. Waiting is done in
``select`` on the sockets (psycopg's connections are non-blocking), which releases the GIL.

Both COPYs are always ended at the protocol level (CopyDone or CopyFail, then every result
read), so the psycopg connections stay consistent: the caller commits or rolls back as usual.
Errors are psycopg's own exception classes, so a refused row is an ``IntegrityError`` and a
lost connection an ``OperationalError``, as with psycopg's Copy objects.
"""

from __future__ import annotations

import select
from collections.abc import Callable
from contextlib import suppress

import psycopg
from psycopg import errors, pq, sql
from psycopg.rows import TupleRow

from cdcsync import libpq

Conn = psycopg.Connection[TupleRow]

BLOCK_BYTES = 512 * 1024
# Cleaning up after a failure must not hang on a server that stopped answering.
_ABANDON_TIMEOUT_S = 30.0


def pipe(source: Conn, target: Conn, out: sql.Composable, into: sql.Composable,
         on_block: Callable[[int], None]) -> int:
    """Run ``out`` (a COPY TO STDOUT) on ``source`` into ``into`` (a COPY FROM STDIN) on
    ``target``; return the rows the target stored. ``on_block`` gets the number of messages
    (rows) in each block handed to the target; an exception it raises abandons both COPYs."""
    _begin(source)
    _begin(target)
    with source.lock, target.lock:
        _start(source, out, pq.ExecStatus.COPY_OUT)
        try:
            _start(target, into, pq.ExecStatus.COPY_IN)
        except BaseException:
            _abandon_out(source)
            raise
        try:
            _transfer(source.pgconn, target.pgconn, on_block)
            failed = _error_of(source, libpq.results(source.pgconn, None))
        except BaseException:
            _abandon_in(target, b"cdcsync abandoned the copy")
            _abandon_out(source)
            raise
        if failed is not None:
            _abandon_in(target, b"the source COPY failed")
            raise failed
        ended = _end_in(target)
    return ended.command_tuples or 0


def read(conn: Conn, query: sql.Composable) -> tuple[bytes, int]:
    """Run ``query`` (a COPY TO STDOUT); return everything it sent and the rows it counted."""
    _begin(conn)
    with conn.lock:
        _start(conn, query, pq.ExecStatus.COPY_OUT)
        pgconn = conn.pgconn
        received = bytearray()
        try:
            while True:
                size, data = pgconn.get_copy_data(1)
                if size > 0:
                    received += data
                elif size == 0:
                    libpq.readable(pgconn)
                    pgconn.consume_input()
                else:
                    break
        except BaseException:
            _abandon_out(conn)
            raise
        results = libpq.results(pgconn, None)
        failed = _error_of(conn, results)
        if failed is not None:
            raise failed
    return bytes(received), results[0].command_tuples or 0


def _transfer(src: pq.abc.PGconn, tgt: pq.abc.PGconn, on_block: Callable[[int], None]) -> None:
    # Appending each message to a bytearray takes about half the CPU of listing them to join:
    # libpq's copy of the message is freed at once, while still in the cache.
    block = bytearray()
    rows = 0
    unsent = False  # the target's output buffer still holds part of the last block
    while True:
        nbytes, data = src.get_copy_data(1)
        if nbytes > 0:
            block += data
            rows += 1
            if len(block) >= BLOCK_BYTES:
                _put(tgt, block, finish=unsent)
                unsent = bool(tgt.flush())
                on_block(rows)
                block = bytearray()
                rows = 0
        elif nbytes == 0:
            # Nothing whole in libpq's buffer: wait for the source, and meanwhile let the
            # target take what is still queued for it.
            readable, writable, _ = select.select([src.socket], [tgt.socket] if unsent else [],
                                                  [])
            if writable:
                unsent = bool(tgt.flush())
            if readable:
                src.consume_input()
        else:
            break
    if block:
        _put(tgt, block, finish=unsent)
        on_block(rows)


def _put(tgt: pq.abc.PGconn, block: bytearray, *, finish: bool) -> None:
    """Queue ``block``; libpq's buffer holds at most one block besides it."""
    if finish:
        libpq.flush(tgt)
    while not tgt.put_copy_data(block):
        libpq.writable(tgt)



def _begin(conn: Conn) -> None:
    """Open the transaction psycopg would open for a statement of its own: commands sent
    through libpq directly bypass that, and would otherwise commit on their own."""
    if not conn.autocommit and conn.pgconn.transaction_status == pq.TransactionStatus.IDLE:
        conn.execute("SELECT 1")


def _start(conn: Conn, query: sql.Composable, expected: pq.ExecStatus) -> None:
    pgconn = conn.pgconn
    pgconn.send_query(query.as_bytes(conn))
    libpq.flush(pgconn)
    result = libpq.next_result(pgconn)
    if result is None:
        raise psycopg.OperationalError("the server sent no result for a COPY")
    if result.status != expected:
        rest = libpq.results(pgconn, None)
        raise _error_of(conn, [result, *rest]) or psycopg.ProgrammingError(
            f"expected {expected.name} from a COPY, got {pq.ExecStatus(result.status).name}")


def _end_in(conn: Conn) -> pq.abc.PGresult:
    pgconn = conn.pgconn
    while not pgconn.put_copy_end(None):
        libpq.writable(pgconn)
    libpq.flush(pgconn)
    results = libpq.results(pgconn, None)
    failed = _error_of(conn, results)
    if failed is not None:
        raise failed
    return results[0]


def _abandon_in(conn: Conn, reason: bytes) -> None:
    """End a COPY FROM STDIN with CopyFail; the target rolls the statement back."""
    pgconn = conn.pgconn
    if pgconn.status != pq.ConnStatus.OK or (
            pgconn.transaction_status != pq.TransactionStatus.ACTIVE):
        return
    with suppress(psycopg.Error):
        while not pgconn.put_copy_end(reason):
            libpq.writable(pgconn, _ABANDON_TIMEOUT_S)
        libpq.flush(pgconn, _ABANDON_TIMEOUT_S)
        libpq.results(pgconn, _ABANDON_TIMEOUT_S)


def _abandon_out(conn: Conn) -> None:
    """Cancel a COPY TO STDOUT and read what was already on the way, up to its error."""
    pgconn = conn.pgconn
    if pgconn.status != pq.ConnStatus.OK or (
            pgconn.transaction_status != pq.TransactionStatus.ACTIVE):
        return
    with suppress(psycopg.Error):
        conn.cancel_safe(timeout=_ABANDON_TIMEOUT_S)
        while (nbytes := pgconn.get_copy_data(1)[0]) >= 0:
            if nbytes == 0:
                libpq.readable(pgconn, _ABANDON_TIMEOUT_S)
                pgconn.consume_input()
        libpq.results(pgconn, _ABANDON_TIMEOUT_S)


def _error_of(conn: Conn, results: list[pq.abc.PGresult]) -> psycopg.Error | None:
    for result in results:
        if result.status != pq.ExecStatus.COMMAND_OK:
            return errors.error_from_result(result, encoding=conn.info.encoding)
    if not results:
        return psycopg.OperationalError("the server sent no result for a COPY")
    return None

