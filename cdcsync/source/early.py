"""The slot's stream, started while the daemon still loads, checks the databases and takes its lock.

Decoding a backlog keeps the source's walsender busy on a core of its own for as long as the
daemon takes to apply it. Started only once the daemon is ready (imports, checks, lock, the
checkpoint: about half a second), the walsender would idle through all of that while the daemon
used one core. ``cdcsync run`` therefore opens the stream as soon as it has read the configuration
file, before pydantic and the settings' models load (:meth:`EarlyStream.open_unvalidated`; once
the settings are validated, a stream they would not open is replaced by one they would): a thread
lets libpq take whatever arrives into its buffer, without reading a single message (up to
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
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import psycopg

from cdcsync.config_file import NAME_RE, SLOT_NAME_RE, raw_section
from cdcsync.errors import ConnectionLost, PrerequisiteError
from cdcsync.logs import event
from cdcsync.model import ZERO_LSN
from cdcsync.source import pgoutput, wal2json
from cdcsync.source.replication import ReplicationStream

if TYPE_CHECKING:
    from cdcsync.config import Settings

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


# What a stream is opened with: the DSN, the slot, the START_REPLICATION options, the status
# interval.
_Spec = tuple[str, str, dict[str, str], float]


def _spec(settings: Settings) -> _Spec:
    source = settings.source
    return (source.dsn.get_secret_value(), source.slot,
            start_options(settings, binary=source.binary), source.status_interval_s)


# The keys of cdcsync.config.SourceSettings. Another key (a misspelt "slot") could mean another
# slot than the default this reading would assume, so it opens nothing; a key added there and not
# here only delays the stream until the settings are validated.
_SOURCE_KEYS: Final = frozenset({"dsn", "slot", "publication", "decoder", "binary",
                                 "status_interval_s", "heartbeat_interval_s",
                                 "receive_timeout_s", "failover_after_s"})


def _unvalidated_spec(source: dict[str, Any]) -> _Spec | None:
    """The stream ``[source]`` describes when its keys are plainly valid (known keys, pgoutput,
    the names' own rules, the defaults of :class:`cdcsync.config.SourceSettings`), else None.
    wal2json's options come from the validated table list."""
    if not source.keys() <= _SOURCE_KEYS:
        return None
    dsn, slot = source.get("dsn"), source.get("slot", "cdcsync")
    publication = source.get("publication", "cdcsync")
    binary = _flag(source.get("binary", True))
    interval = _seconds(source.get("status_interval_s", 10.0))
    if (not isinstance(dsn, str) or source.get("decoder", "pgoutput") != "pgoutput"
            or not isinstance(slot, str) or not SLOT_NAME_RE.match(slot)
            or not isinstance(publication, str) or not NAME_RE.match(publication)
            or binary is None or interval is None):
        return None
    return dsn, slot, pgoutput.options(publication, binary=binary), interval


def _flag(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    return {"true": True, "false": False}.get(str(value).lower())


def _seconds(value: Any) -> float | None:
    try:
        seconds = float(value)  # a TOML number, or a variable's text
    except (TypeError, ValueError):
        return None
    return seconds if 0 < seconds <= 60 else None


class EarlyStream:
    """A stream of the configured slot opened on a thread of its own; :meth:`take` hands it
    over, :meth:`close` gives it up. Either may be called at any time, from any thread."""

    def __init__(self, spec: _Spec) -> None:
        self._spec = spec
        dsn, slot, self._options, interval = spec
        self._stream = ReplicationStream(dsn, slot, status_interval_s=interval)
        self._lock = threading.Lock()
        self._open = False  # started, and neither failed nor closed since
        self._given_up = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cdcsync-early", daemon=True)

    @classmethod
    def open(cls, settings: Settings) -> EarlyStream:
        """Start streaming ``settings``' slot in the background."""
        return cls._started(_spec(settings))

    @classmethod
    def open_unvalidated(cls, config: Path | None) -> EarlyStream | None:
        """Start streaming the slot the configuration file and the environment name, read as
        they are (:func:`cdcsync.config_file.raw_section`), before the settings are validated;
        None when they do not name it plainly. The caller checks it with :meth:`serves`."""
        source = raw_section(config, "source")
        spec = None if source is None else _unvalidated_spec(source)
        return None if spec is None else cls._started(spec)

    @classmethod
    def _started(cls, spec: _Spec) -> EarlyStream:
        early = cls(spec)
        early._thread.start()
        return early

    def serves(self, settings: Settings) -> bool:
        """Whether this is the stream ``settings`` would open."""
        return self._spec == _spec(settings)

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
