"""The slot's stream, started while the daemon still loads, checks the databases and takes its lock.

Decoding a backlog keeps the source's walsender busy on a core of its own for as long as the
daemon takes to apply it. Started only once the daemon is ready (imports, checks, lock, the
checkpoint: about half a second), the walsender would idle through all of that while the daemon
used one core. ``cdcsync run`` therefore opens the stream as soon as its settings are known: a
thread lets libpq take whatever arrives into its buffer, without reading a single message (up to
:data:`MAX_BYTES`; TCP then holds the walsender back), and the first stream of the daemon's first
term adopts the connection and reads those messages first.

Nothing changes in what is applied or confirmed. The stream starts at the slot's confirmed
position, which never passes the target's checkpoint, so the assembler skips whatever the target
already holds; nothing is confirmed before the checkpoint holds it. The daemon closes it where it
has no use for it: when it starts as a standby or finds the lock taken at its first try (the
lock's holder needs the slot), before an initial snapshot (which re-creates the slot), and when it
fails or stops before its first stream.
"""

from __future__ import annotations

import logging
import threading
from typing import Final

import psycopg

from cdcsync.config import Settings
from cdcsync.errors import ConnectionLost, PrerequisiteError
from cdcsync.logs import event
from cdcsync.model import ZERO_LSN
from cdcsync.source import pgoutput, wal2json
from cdcsync.source.replication import ReplicationStream

# What libpq may hold before the daemon adopts the stream: about a second of the walsender's work
# on a narrow table, more than the half second the daemon takes to start.
MAX_BYTES: Final = 32 << 20
# How often the buffering thread empties the socket into libpq's buffer. Not on every arrival:
# a thread waiting on the socket is woken by each message the walsender sends, which slows the
# walsender down (about 12 us a message instead of 5, measured) and takes turns at the
# interpreter lock from the daemon's start; the socket holds what arrives in between.
_POLL_S: Final = 0.01


def start_options(settings: Settings, *, binary: bool) -> dict[str, str]:
    """START_REPLICATION options of the configured decoder; pgoutput's values in binary form
    with ``binary`` (wal2json's are text)."""
    if settings.source.decoder == "wal2json":
        return wal2json.options(settings.tables)
    return pgoutput.options(settings.source.publication, binary=binary)


class EarlyStream:
    """A stream of the configured slot opened on a thread of its own; :meth:`take` hands it
    over, :meth:`close` gives it up. Either may be called at any time, from any thread."""

    def __init__(self, settings: Settings) -> None:
        source = settings.source
        self._stream = ReplicationStream(source.dsn.get_secret_value(), source.slot,
                                         status_interval_s=source.status_interval_s)
        self._options = start_options(settings, binary=source.binary)
        self._lock = threading.Lock()
        self._open = False  # started, and neither failed nor closed since
        self._given_up = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cdcsync-early", daemon=True)

    @classmethod
    def open(cls, settings: Settings) -> EarlyStream:
        """Start streaming ``settings``' slot in the background."""
        early = cls(settings)
        early._thread.start()
        return early

    @property
    def backend_pid(self) -> int | None:
        """The walsender's process id while this stream is open: the slot is active for it,
        and that is not another consumer."""
        with self._lock:
            return self._stream.backend_pid if self._open else None

    def take(self) -> ReplicationStream | None:
        """The stream, once its start has ended (at most the connection's timeout), if it
        started and has not failed; else None."""
        self._stop.set()
        self._thread.join()
        with self._lock:
            if self._open and not self._given_up:
                self._given_up = True  # handed over: close() leaves it alone
                return self._stream
        return None

    def close(self) -> None:
        """Give the stream up: closed now if it started, else by its thread once it has."""
        with self._lock:
            if self._given_up:
                return
            self._given_up = True
            started = self._open
        self._stop.set()
        if started:
            self._thread.join()
            self._end()

    def _end(self) -> None:
        with self._lock:
            self._open = False
        self._stream.close()

    def _run(self) -> None:
        try:
            self._stream.start(ZERO_LSN, self._options)
        except (ConnectionLost, PrerequisiteError, psycopg.Error) as exc:
            # The daemon's own checks and stream say what is wrong, with the fix.
            event(logging.DEBUG, "early_stream_failed", slot=self._stream.slot,
                  error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return
        with self._lock:
            self._open = not self._given_up
        if not self._open:
            self._stream.close()
            return
        held = 0
        try:
            while held < MAX_BYTES and not self._stop.wait(_POLL_S):
                held += self._stream.buffer(0)
        except ConnectionLost:
            self._end()
            return
        # Enough is buffered: TCP holds the walsender back until the stream is taken.
        self._stop.wait()
