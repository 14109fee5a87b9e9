"""A connection pooler between cdcsync and the target that lends its server sessions per
transaction (PgBouncer's ``pool_mode = transaction``, Neon's ``-pooler`` hosts): the slot's lock
is a session's, and such a pooler lends the session holding it to any client, another process's
too, which would then hold the lock as well. A session pool keeps each client's server session
and works.

Only a connection whose backend id (from its start-up) is not its server session's has a pooler
or proxy in between, and only then is the pooler's mode tested.
"""

from __future__ import annotations

import psycopg
from psycopg.rows import TupleRow

from cdcsync.errors import PrerequisiteError

Conn = psycopg.Connection[TupleRow]


def behind_pooler(conn: Conn, server_pid: int) -> bool:
    """Whether ``conn``, whose server session is ``server_pid``, passes through a pooler."""
    return server_pid != conn.info.backend_pid


def lends_sessions(conn: Conn, dsn: str, server_pid: int, *, unlock: int | None = None) -> bool:
    """Whether the pooler ``conn`` passes through lends its server session (``server_pid``, read
    on ``conn`` just now) to other clients between its transactions.

    A second connection opens a transaction, which keeps the server session it gets: that is
    ``conn``'s if the pooler lends it (PgBouncer lends the one used last first); otherwise
    ``conn``'s next statement must still run on its own. With ``unlock``, a lent session's
    advisory lock on that key is released through the second connection, which holds it."""
    with psycopg.connect(dsn) as other:
        row = other.execute("SELECT pg_backend_pid()").fetchone()
        if row is not None and row[0] == server_pid:
            if unlock is not None:
                other.execute("SELECT pg_advisory_unlock(%s)", (unlock,))
            return True
        # Asked while the other's transaction holds the session it got: a pooler that lends per
        # transaction hands conn whichever session is idle, not necessarily its own.
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        return row is None or row[0] != server_pid


def refused() -> PrerequisiteError:
    return PrerequisiteError(
        "the target DSN reaches the server through a pooler that lends its server sessions per "
        "transaction (transaction pooling, as PgBouncer's pool_mode = transaction and Neon's "
        "'-pooler' hosts do): the slot's lock needs a session that stays cdcsync's, or two "
        "processes could stream at once",
        fix="point the target DSN at the server itself (Neon: the host without '-pooler'), or "
            "at a pool in session mode")
