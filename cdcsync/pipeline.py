"""The streaming loop: slot, decode, whole transactions, apply, checkpoint, feedback.

Two threads overlap the work. The reader owns the replication connection: it reads, decodes and
assembles transactions into a bounded queue, and it alone talks to the walsender (keepalive replies
and status updates). The applier, on the caller's thread, batches whole transactions into target
transactions; after each commit it hands the checkpointed position to the reader, which reports it
to the source as flushed. Any failure tears both down; transient ones are retried from the
checkpoint with jittered exponential backoff.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field

from psycopg_pool import ConnectionPool

from cdcsync import checkpoint
from cdcsync.apply.applier import Applier
from cdcsync.config import Settings
from cdcsync.dsn import with_session_options
from cdcsync.errors import CdcsyncError, ProtocolError, is_transient
from cdcsync.logs import event
from cdcsync.model import ZERO_LSN, ChangeChunk, Lsn, SourceMessage, StreamItem, TxnEnd, TxnStart
from cdcsync.source import pgoutput
from cdcsync.source.replication import ReplicationStream
from cdcsync.source.transactions import TransactionAssembler

QUEUE_ITEMS = 64


def pgoutput_options(publication: str) -> dict[str, str]:
    return {"proto_version": "1", "publication_names": f'"{publication}"', "messages": "true"}


def open_target_pool(settings: Settings) -> ConnectionPool:
    """The target pool shared by the applier and every other user of the target."""
    return ConnectionPool(
        with_session_options(settings.target.dsn.get_secret_value(), "cdcsync"),
        min_size=1,
        max_size=settings.target.pool_size,
        check=ConnectionPool.check_connection,
        name="cdcsync-target",
        open=True,
        timeout=10.0,
    )


@dataclass
class Progress:
    """What the pipeline has done; read by status reporting and metrics."""

    checkpoint: Lsn = ZERO_LSN
    transactions: int = 0
    commits: int = 0
    last_commit_monotonic: float = field(default_factory=time.monotonic)
    state: str = "starting"


class Reader(threading.Thread):
    """Reads the slot into ``items``; reports ``applied`` back to the server as flushed."""

    def __init__(self, stream: ReplicationStream, assembler: TransactionAssembler,
                 items: queue.Queue[StreamItem]) -> None:
        super().__init__(name="cdcsync-reader", daemon=True)
        self.stream = stream
        self.assembler = assembler
        self.items = items
        self.applied = assembler.skip_before
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                for xlog in self.stream.read(0.2):
                    try:
                        message = pgoutput.decode(xlog.payload)
                    except ProtocolError as exc:
                        raise ProtocolError(f"at LSN {xlog.start}: {exc.message}",
                                            fix="report it with the server version") from exc
                    for item in self.assembler.feed(message, len(xlog.payload)):
                        self._put(item)
                    self._update_caught_up()
                    if self.halt.is_set():
                        return
                self._update_caught_up()
                self._feedback()
        except BaseException as exc:
            self.error = exc

    def _update_caught_up(self) -> None:
        self.stream.caught_up = (not self.assembler.in_transaction
                                 and self.applied >= self.assembler.last_end_lsn)

    def _put(self, item: StreamItem) -> None:
        while not self.halt.is_set():
            try:
                self.items.put(item, timeout=1.0)
                return
            except queue.Full:
                self._feedback()

    def _feedback(self) -> None:
        self.stream.confirm(self.applied)
        self.stream.send_status_if_due()


class Pipeline:
    """Streams the configured slot into the target until ``stop`` is set."""

    def __init__(self, settings: Settings, pool: ConnectionPool, stop: threading.Event) -> None:
        self.settings = settings
        self.pool = pool
        self.stop = stop
        self.progress = Progress()

    def run(self) -> None:
        """Stream until stopped; retry transient failures, raise everything else."""
        attempt = 0
        while not self.stop.is_set():
            commits_before = self.progress.commits
            try:
                self._stream_once()
                return
            except Exception as exc:
                if not is_transient(exc):
                    self.progress.state = "halted"
                    raise
                attempt = 0 if self.progress.commits > commits_before else attempt + 1
                delay = min(30.0, 0.5 * 2 ** min(attempt, 6)) * random.uniform(0.5, 1.0)
                self.progress.state = "reconnecting"
                event(logging.WARNING, "reconnecting", slot=self.settings.source.slot,
                      attempt=attempt, delay_s=round(delay, 2), error=str(exc).splitlines()[0])
                self.stop.wait(delay)

    def _stream_once(self) -> None:
        slot = self.settings.source.slot
        with self.pool.connection() as conn:
            saved = checkpoint.load(conn, slot)
            conn.commit()
            start = saved.lsn if saved else Lsn(0)
            self.progress.checkpoint = start
            stream = ReplicationStream(self.settings.source.dsn.get_secret_value(), slot,
                                       status_interval_s=self.settings.source.status_interval_s)
            stream.start(start, pgoutput_options(self.settings.source.publication))
            items: queue.Queue[StreamItem] = queue.Queue(maxsize=QUEUE_ITEMS)
            assembler = TransactionAssembler(
                start, chunk_rows=min(5000, self.settings.apply.max_rows),
                chunk_bytes=min(8 << 20, self.settings.apply.max_bytes))
            reader = Reader(stream, assembler, items)
            reader.start()
            applier = Applier(conn, self.settings)
            self.progress.state = "streaming"
            event(logging.INFO, "streaming", slot=slot, lsn=str(start))
            clean = False
            try:
                self._apply_loop(reader, applier, items)
                clean = True
            finally:
                reader.halt.set()
                reader.join(timeout=5)
                if applier.in_source_transaction or not clean:
                    applier.rollback()
                elif applier.has_uncommitted:
                    self._commit(applier, reader)
                if clean and reader.error is None:
                    stream.confirm(reader.applied)
                    stream.send_status()
                stream.close()
                event(logging.INFO, "stream_closed", slot=slot, lsn=str(self.progress.checkpoint))

    def _apply_loop(self, reader: Reader, applier: Applier,
                    items: queue.Queue[StreamItem]) -> None:
        max_delay = self.settings.apply.max_delay_ms / 1000
        while not self.stop.is_set():
            wait = 0.2
            if applier.opened_at is not None:
                wait = max(0.0, min(wait, applier.opened_at + max_delay - time.monotonic()))
            try:
                item = items.get(timeout=wait)
            except queue.Empty:
                if reader.error is not None:
                    raise reader.error from None
                if not reader.is_alive():
                    raise CdcsyncError("the replication reader stopped without an error") from None
                if applier.has_uncommitted and not applier.in_source_transaction:
                    self._commit(applier, reader)
                continue
            if isinstance(item, TxnStart):
                applier.start(item)
            elif isinstance(item, ChangeChunk):
                applier.add(item)
            elif isinstance(item, TxnEnd):
                applier.end(item)
                self.progress.transactions += 1
                overdue = (applier.opened_at is not None
                           and time.monotonic() - applier.opened_at >= max_delay)
                if applier.batch_full() or overdue or items.empty():
                    self._commit(applier, reader)
            elif isinstance(item, SourceMessage):
                event(logging.DEBUG, "source_message", slot=self.settings.source.slot,
                      prefix=item.prefix, lsn=str(item.lsn))

    def _commit(self, applier: Applier, reader: Reader) -> None:
        lsn = applier.commit()
        reader.applied = lsn
        self.progress.checkpoint = lsn
        self.progress.commits += 1
        self.progress.last_commit_monotonic = time.monotonic()

