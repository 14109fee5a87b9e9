"""A connection that failed, as an error naming the side and the fix: either refused for good
(a password, a privilege, a pooler in the way), which needs someone to change something, or
lost, which a retry may get past."""

from __future__ import annotations

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from cdcsync.dsn import describe
from cdcsync.errors import CdcsyncError, ConnectionLost, PrerequisiteError


def _text(exc: psycopg.OperationalError) -> str:
    # libpq puts the reason (refused, timeout, authentication) on the first line and a hint on
    # the next: keep both, on one line.
    return " ".join(line.strip() for line in str(exc).strip().splitlines()) or type(exc).__name__


def refusal(exc: psycopg.OperationalError, dsn: str, side: str) -> PrerequisiteError | None:
    """The error with its fix if the server (or a pooler before it) refused the connection for
    good; None if it may have been lost on the way."""
    text = _text(exc)
    if "password authentication failed" in text or "no password supplied" in text:
        fix = f"check the user and password in the {side} DSN"
    elif "database" in text and "does not exist" in text:
        fix = f"create the database or correct dbname in the {side} DSN"
    elif "role" in text and "does not exist" in text:
        fix = f"create the role or correct the user in the {side} DSN"
    elif "unsupported startup parameter" in text:
        fix = (f"the {side} DSN reaches a connection pooler (PgBouncer, Neon's '-pooler' host, "
               f"Supabase's pooler), which refuses what cdcsync asks for (its session "
               f"settings, or the replication protocol): point it at the server itself (Neon: "
               f"the host without '-pooler'; Supabase: db.<project>.supabase.co, port 5432)")
    elif "Tenant or user not found" in text:
        # Supavisor's answer to a user without the project's ref, which its shared pooler needs.
        fix = (f"the {side} DSN reaches Supabase's pooler (Supavisor), which cannot carry the "
               f"replication protocol or the slot's lock: use the direct connection, "
               f"db.<project>.supabase.co, port 5432, with the plain user name")
    elif "replication role" in text or "start WAL sender" in text:
        user = conninfo_to_dict(dsn).get("user")
        role = sql.Identifier(str(user)).as_string(None) if user else "<user>"
        fix = (f"give the source role the REPLICATION attribute: ALTER ROLE {role} WITH "
               f"REPLICATION; (sql/source_role.sql)")
    elif "certificate" in text or "does not support SSL" in text:
        # Not every error naming SSL: "SSL SYSCALL error" or "SSL connection has been closed
        # unexpectedly" is a connection lost on the way, as a restarting server closes it.
        fix = (f"check sslmode and sslrootcert in the {side} DSN: sslrootcert must be the CA "
               "that signed the server's certificate, and the host its certificate names")
    else:
        return None
    return PrerequisiteError(f"cannot connect to the {side} {describe(dsn)}: {text}", fix=fix)


def connection_error(exc: psycopg.OperationalError, dsn: str, side: str) -> CdcsyncError:
    """:func:`refusal`, or the connection lost, to retry."""
    return refusal(exc, dsn, side) or ConnectionLost(
        f"cannot connect to the {side} {describe(dsn)}: {_text(exc)}",
        fix=f"check host, port and network access for the {side} DSN")
