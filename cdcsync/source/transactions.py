"""Decoded pgoutput messages -> stream items: whole transactions, delivered in bounded chunks.

Pure: no I/O. Transactions whose commit is already covered by the checkpoint are dropped here, so a
restart from an older position (the slot re-delivers what it was never told was flushed) applies
nothing twice.
"""

from __future__ import annotations

from cdcsync.errors import ProtocolError
from cdcsync.model import (
    Change,
    ChangeChunk,
    Lsn,
    Relation,
    RowChange,
    SourceMessage,
    StreamItem,
    TruncateChange,
    TxnEnd,
    TxnStart,
)
from cdcsync.source import pgoutput


class TransactionAssembler:
    """Turns the message sequence Begin, changes..., Commit into TxnStart, ChangeChunk*, TxnEnd."""

    def __init__(self, skip_before: Lsn, *, chunk_rows: int = 5000, chunk_bytes: int = 8 << 20):
        self.skip_before = skip_before
        self._chunk_rows = chunk_rows
        self._chunk_bytes = chunk_bytes
        self._relations: dict[int, Relation] = {}
        self._changes: list[Change] = []
        self._bytes = 0
        self._in_txn = False
        self._skipping = False
        self.skipped_transactions = 0
        self.last_end_lsn = skip_before

    @property
    def in_transaction(self) -> bool:
        return self._in_txn

    def feed(self, message: pgoutput.Message, size: int) -> list[StreamItem]:
        """Consume one decoded message; return the items it completes (often none)."""
        if isinstance(message, Relation):
            self._relations[message.oid] = message
            return []
        if isinstance(message, pgoutput.Begin):
            return self._begin(message)
        if isinstance(message, pgoutput.Commit):
            return self._commit(message)
        if isinstance(message, pgoutput.LogicalMessage):
            return self._message(message)
        if isinstance(message, pgoutput.Origin | pgoutput.TypeMsg):
            return []
        if not self._in_txn:
            raise ProtocolError(f"{type(message).__name__} message outside a transaction")
        if self._skipping:
            return []
        self._changes.append(self._change(message))
        self._bytes += size
        if len(self._changes) >= self._chunk_rows or self._bytes >= self._chunk_bytes:
            return [self._take_chunk()]
        return []

    def _begin(self, message: pgoutput.Begin) -> list[StreamItem]:
        if self._in_txn:
            raise ProtocolError("Begin inside an open transaction")
        self._in_txn = True
        # A commit record before the checkpoint ends before it too: that transaction is applied.
        self._skipping = message.final_lsn < self.skip_before
        if self._skipping:
            self.skipped_transactions += 1
            return []
        return [TxnStart(message.xid, message.final_lsn, message.commit_time)]

    def _commit(self, message: pgoutput.Commit) -> list[StreamItem]:
        if not self._in_txn:
            raise ProtocolError("Commit without Begin")
        self._in_txn = False
        if self._skipping:
            self._skipping = False
            return []
        items: list[StreamItem] = []
        if self._changes:
            items.append(self._take_chunk())
        items.append(TxnEnd(message.end_lsn, message.commit_time))
        self.last_end_lsn = message.end_lsn
        return items

    def _message(self, message: pgoutput.LogicalMessage) -> list[StreamItem]:
        if message.transactional and self._skipping:
            return []
        items: list[StreamItem] = []
        if self._changes:
            items.append(self._take_chunk())
        items.append(
            SourceMessage(message.lsn, message.transactional, message.prefix, message.content)
        )
        return items

    def _change(self, message: pgoutput.Message) -> Change:
        if isinstance(message, pgoutput.Insert):
            return RowChange("I", self._relation(message.relation_oid), message.new, None)
        if isinstance(message, pgoutput.Update):
            return RowChange("U", self._relation(message.relation_oid), message.new, message.old)
        if isinstance(message, pgoutput.Delete):
            return RowChange("D", self._relation(message.relation_oid), None, message.old)
        if isinstance(message, pgoutput.Truncate):
            relations = tuple(self._relation(oid) for oid in message.relation_oids)
            return TruncateChange(relations, message.cascade, message.restart_identity)
        raise ProtocolError(f"unexpected {type(message).__name__} message inside a transaction")

    def _relation(self, oid: int) -> Relation:
        try:
            return self._relations[oid]
        except KeyError:
            raise ProtocolError(f"change for relation {oid} before its Relation message") from None

    def _take_chunk(self) -> ChangeChunk:
        chunk = ChangeChunk(tuple(self._changes), self._bytes)
        self._changes = []
        self._bytes = 0
        return chunk
