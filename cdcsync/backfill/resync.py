"""Online resync: re-copy a table, or the rows matching a condition, while the stream goes on.

The watermark method (Netflix's DBLog): the table is read in key-ordered chunks. Each chunk is read
after a low watermark and before a high watermark, both written into the WAL with
``pg_logical_emit_message``. When the stream reaches the low watermark, the applier starts
recording every key the stream changes in the table; at the high watermark those keys are dropped
from the chunk (the stream holds a version at least as new), the rest is merged with the conflict
rule, and the chunk's key range loses the target rows the source no longer holds. So no copied row
ever overwrites a newer streamed change, and the source only ever runs plain SELECTs.

The process that streams the slot performs the requests queued in ``cdcsync.resync_requests``: its
worker thread reads chunks and writes watermarks, its apply loop merges them. A chunk is done once
the checkpoint has passed its high watermark, that is, once the target committed it.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson
import psycopg
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool

from cdcsync import link_watch
from cdcsync.apply import tables
from cdcsync.apply.applier import Applier
from cdcsync.backfill import source_rows, state
from cdcsync.backfill.progress import ProgressLine
from cdcsync.config import Settings
from cdcsync.dsn import with_session_options
from cdcsync.errors import CdcsyncError, CopyRefused
from cdcsync.keyrange import Key, KeyOrder, Span
from cdcsync.link_watch import LinkWatch
from cdcsync.logs import event
from cdcsync.model import CopiedRows, Lsn, Relation, SourceMessage, TargetTable

Conn = psycopg.Connection[TupleRow]

PREFIX = "cdcsync.resync"
_POLL_S = 1.0
_MAX_RETRIES = 10
# How long `cdcsync resync` waits for a daemon that stopped performing its request to come back:
# longer than a supervisor takes to restart one (systemd/cdcsync.service: 5 s) and start it.
GONE_S = 15.0
_ALIVE_EVERY_S = 1.0


class ResyncStopped(CdcsyncError):
    """The process is stopping; the request stays open and is resumed by the next one."""


@dataclass
class _Chunk:
    """One chunk between its watermarks: what the worker read and what the apply loop did."""

    request: int
    number: int
    table: TargetTable
    order: KeyOrder
    delete_missing: bool
    condition: str | None = None
    copied: CopiedRows | None = None
    span: Span = field(default_factory=Span)
    applied: int | None = None
    # Why the apply loop halted on this chunk's rows.
    refused: CopyRefused | None = None


@dataclass(frozen=True, slots=True)
class _Job:
    request: state.Request
    relation: Relation
    table: TargetTable
    order: KeyOrder
    line: ProgressLine


class Resyncer:
    """Performs the slot's resync requests beside the stream (see the module docstring)."""

    def __init__(self, settings: Settings, pool: ConnectionPool, position: Callable[[], Lsn],
                 stop: threading.Event, links: LinkWatch | None = None) -> None:
        self.settings = settings
        self.links = links
        self.slot = settings.source.slot
        self.pool = pool
        self.position = position
        self.stop = stop
        # Markers of another process (an earlier run, another slot on the same database) are
        # not ours: this process only acts on chunks it registered itself.
        self.token = uuid.uuid4().hex
        self._chunks: dict[tuple[int, int], _Chunk] = {}
        self._thread = threading.Thread(target=self._run, name="cdcsync-resync", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread.ident is not None:
            self._thread.join(timeout)

    def on_message(self, message: SourceMessage, applier: Applier) -> None:
        """Called by the apply loop, in stream order, for every logical message."""
        if message.prefix != PREFIX:
            return
        try:
            marker = orjson.loads(message.content)
            key = (int(marker["request"]), int(marker["chunk"]))
            ours = marker.get("token") == self.token and marker.get("slot") == self.slot
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return
        chunk = self._chunks.get(key) if ours else None
        if chunk is None:
            return
        if marker.get("mark") == "low":
            applier.open_window(chunk.table)
        elif marker.get("mark") == "high" and chunk.copied is not None:
            try:
                chunk.applied = applier.apply_copied(chunk.copied, chunk.order, chunk.span,
                                                     windowed=True,
                                                     delete_missing=chunk.delete_missing,
                                                     condition=chunk.condition)
            except CopyRefused as exc:
                # The stream halts on it; the worker, waiting for this chunk, fails the request
                # so that whoever waits for it hears why (and a restart does not run it again).
                chunk.refused = exc
                raise

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                with self.pool.connection() as conn:
                    request = state.claim_next(conn, self.slot)
                if request is None:
                    self.stop.wait(_POLL_S)
                    continue
                self._perform(request)
            except ResyncStopped:
                return
            except Exception as exc:
                # The stream's own reconnect logic handles lost connections; the worker just
                # tries again later.
                event(logging.WARNING, "resync_retry", slot=self.slot, error=str(exc))
                self.stop.wait(5 * _POLL_S)

    def _perform(self, request: state.Request) -> None:
        slot = self.slot
        source_dsn = with_session_options(self.settings.source.dsn.get_secret_value(),
                                          "cdcsync-resync")
        target_dsn = with_session_options(self.settings.target.dsn.get_secret_value(),
                                          "cdcsync-resync")
        # Both only ask and read answers (a chunk is read whole before it is merged), so a
        # silent one waiting on its server is a dead link, as for the stream's own.
        with link_watch.connect(source_dsn, self.links) as src, \
                link_watch.connect(target_dsn, self.links) as tgt:
            try:
                relation = source_rows.relation_of(src, request.table)
                table = tables.resolve(tgt, self.settings, relation)
                order = source_rows.key_order(src, tgt, relation, table)
                estimate = (source_rows.count(src, relation, order, request.where)
                            if request.where else source_rows.estimate(src, relation))
            except CdcsyncError as exc:
                self._fail(tgt, request, str(exc))
                return
            if request.purpose == "snapshot":
                state.set_state(tgt, slot, request.table, "copying", rows_copied=0,
                                rows_estimate=estimate)
            state.estimated(tgt, request.id, estimate)
            event(logging.INFO, "resync_started", slot=slot, table=request.table,
                  request=request.id, where=request.where, estimate=estimate)
            # `cdcsync resync` draws the bar from the request's progress; the daemon logs.
            line = ProgressLine(f"resync {request.table}", estimate, slot=slot, log_only=True)
            try:
                copied = self._chunks_of(src, tgt, _Job(request, relation, table, order, line))
            except psycopg.Error as exc:
                if isinstance(exc, psycopg.OperationalError):
                    raise
                # A condition or table the source refuses: retrying would not help.
                self._fail(tgt, request, str(exc).strip().splitlines()[0])
                return
            except CopyRefused as exc:
                self._fail(tgt, request, str(exc))
                return
            finally:
                line.close()
            state.finish(tgt, request.id, None)
            if request.purpose == "snapshot":
                state.set_state(tgt, slot, request.table, "ready", rows_copied=copied)
        event(logging.INFO, "resync_done", slot=slot, table=request.table, request=request.id,
              rows=copied)

    def _fail(self, tgt: Conn, request: state.Request, reason: str) -> None:
        state.finish(tgt, request.id, reason)
        if request.purpose == "snapshot":
            state.set_state(tgt, self.slot, request.table, "error", reason=reason,
                            fix="correct the cause, then `cdcsync resync "
                                f"{request.table}`")
        event(logging.ERROR, "resync_failed", slot=self.slot, table=request.table,
              request=request.id, error=reason)

    def _chunks_of(self, src: Conn, tgt: Conn, job: _Job) -> int:
        request, relation, table, order = job.request, job.relation, job.table, job.order
        after: Key | None = None
        number = 0
        copied = 0
        retries = 0
        while True:
            # A repair (verify --repair) names exactly the keys to make equal, so target rows
            # among them that the source lacks are deleted too; a --where resync deletes nothing.
            repair = request.purpose == "repair"
            chunk = _Chunk(request.id, number, table, order,
                           delete_missing=request.where is None or repair,
                           condition=request.where if repair else None)
            upto, rows = self._chunk(src, chunk, relation, after, request.where)
            if chunk.applied is None:
                retries += 1
                if retries > _MAX_RETRIES:
                    raise CdcsyncError(f"chunk {number} of {request.table} could not be applied "
                                       f"after {_MAX_RETRIES} attempts")
                event(logging.INFO, "resync_chunk_again", slot=self.slot, table=request.table,
                      chunk=number)
                number += 1
                continue
            retries = 0
            copied += chunk.applied
            job.line.add(rows)
            state.chunk_done(tgt, request.id, rows)
            if upto is None:
                return copied
            after = upto
            number += 1

    def _chunk(self, src: Conn, chunk: _Chunk, relation: Relation, after: Key | None,
               where: str | None) -> tuple[Key | None, int]:
        """Read one chunk between its watermarks and wait until the target committed it."""
        key = (chunk.request, chunk.number)
        self._chunks[key] = chunk
        try:
            started = time.monotonic()
            low = self._mark(src, chunk, "low")
            with src.transaction():
                src.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                upto = source_rows.chunk_end(src, relation, chunk.order, after, where,
                                             rows=self.settings.snapshot.chunk_rows)
                span = Span(after, upto)
                data, rows = source_rows.read_staged(src, source_rows.staged_copy(
                    relation, chunk.table, chunk.order, low, span, condition=where))
            chunk.span = span
            chunk.copied = CopiedRows(relation, chunk.table, data, rows)
            high = self._mark(src, chunk, "high")
            read_s = time.monotonic() - started
            while self.position() <= high:
                if self.stop.wait(0.05):
                    if chunk.refused is not None:
                        raise chunk.refused
                    raise ResyncStopped("stopping")
            event(logging.DEBUG, "resync_chunk", slot=self.slot, table=relation.qualified,
                  chunk=chunk.number, rows=rows, read_s=round(read_s, 3),
                  apply_s=round(time.monotonic() - started - read_s, 3), lsn=str(high))
            return upto, rows
        finally:
            del self._chunks[key]

    def _mark(self, src: Conn, chunk: _Chunk, mark: str) -> Lsn:
        content = orjson.dumps({"slot": self.slot, "token": self.token,
                                "request": chunk.request, "chunk": chunk.number, "mark": mark})
        row = src.execute("SELECT pg_logical_emit_message(true, %s, %s::text)::text",
                          (PREFIX, content.decode())).fetchone()
        assert row is not None
        return Lsn.parse(str(row[0]))


def wait_for(conn: Conn, request_id: int, *, slot: str, stop: threading.Event | None = None,
             timeout_s: float | None = None,
             alive: Callable[[], bool] | None = None) -> state.Request:
    """Follow a request until it is done or failed, showing its progress; or until ``alive``
    (asked every :data:`_ALIVE_EVERY_S`) has said no for :data:`GONE_S`: the daemon performing
    it stopped, and no supervisor brought it back."""
    line: ProgressLine | None = None
    shown = 0
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    asked = seen = time.monotonic()
    while True:
        request = state.get(conn, request_id)
        if request is None:
            raise CdcsyncError(f"resync request {request_id} disappeared")
        if request.state == "running" and line is None:
            line = ProgressLine(f"resync {request.table}", request.rows_estimate, slot=slot)
        if line is not None and request.rows_copied > shown:
            line.add(request.rows_copied - shown, total=request.rows_estimate)
            shown = request.rows_copied
        if request.state in ("done", "failed"):
            if line is not None:
                line.close()
            return request
        if stop is not None and stop.is_set():
            return request
        now = time.monotonic()
        if deadline is not None and now > deadline:
            return request
        if alive is not None and now - asked >= _ALIVE_EVERY_S:
            asked = now
            if alive():
                seen = now
            elif now - seen > GONE_S:
                return request
        time.sleep(0.2)
