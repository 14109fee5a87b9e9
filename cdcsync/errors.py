"""Every error cdcsync raises on purpose, with what to do about it.

    CdcsyncError                 root; ``str()`` is one line: what happened, then the fix
    ├── ConfigError              the configuration is wrong (exit code 2)
    ├── PrerequisiteError        a database is not ready: missing key, wal_level, privileges, ...
    ├── SchemaMismatch           source and target tables disagree in a way cdcsync will not guess
    ├── ProtocolError            the replication stream carried bytes that do not decode
    ├── ApplyError               the target rejected a change
    │   └── CopyRefused          ... copied from the source (a snapshot's or resync's rows)
    ├── ConnectionLost           a connection dropped or could not be opened; the daemon retries
    └── VerifyError              verify could not tell whether the tables agree (exit code 2)

Whether the daemon retries or halts is decided in one place, :func:`is_transient`.
"""

from __future__ import annotations

import psycopg
from psycopg_pool import PoolTimeout


class CdcsyncError(Exception):
    """cdcsync stopped."""

    exit_code = 1

    def __init__(self, message: str | None = None, *, fix: str | None = None) -> None:
        self.message = message or (self.__doc__ or "").strip()
        self.fix = fix
        super().__init__(self.message)

    def __str__(self) -> str:
        return f"{self.message} — fix: {self.fix}" if self.fix else self.message


class ConfigError(CdcsyncError):
    """The configuration is invalid."""

    exit_code = 2


class PrerequisiteError(CdcsyncError):
    """A database is not ready for cdcsync."""


class SchemaMismatch(CdcsyncError):
    """Source and target tables differ."""


class ProtocolError(CdcsyncError):
    """The replication stream carried a message that does not decode."""


class ApplyError(CdcsyncError):
    """The target rejected a change."""


class CopyRefused(ApplyError):
    """The target rejected rows copied from the source: a resync that meets it has failed."""


class ConnectionLost(CdcsyncError):
    """A database connection was lost."""


class SlotBusy(ConnectionLost):
    """Another walsender still streams the slot: most often the previous holder's, which the
    process holding the slot's lock ends (see Pipeline._resume_position)."""


class TextNeeded(CdcsyncError):
    """A relation of the binary stream has a column whose values must travel as text."""


class VerifyError(CdcsyncError):
    """verify could not finish the comparison."""

    exit_code = 2


def is_transient(exc: BaseException) -> bool:
    """True when retrying after a pause may succeed without anyone changing anything."""
    if isinstance(exc, ConnectionLost | PoolTimeout):
        return True
    if isinstance(exc, psycopg.OperationalError):
        # Server shutdown, admin termination and network failures; not bad credentials. A
        # transaction chosen as a deadlock's victim (one of the applier's own lanes, or a
        # session of the target's users) or failing serialization goes again.
        sqlstate = getattr(exc, "sqlstate", None)
        return (sqlstate is None or sqlstate.startswith(("08", "57P"))
                or sqlstate in ("40001", "40P01"))
    return False
