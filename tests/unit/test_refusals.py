"""Which connection failures are refusals for good, and the fix each names. The texts are the
servers' own (PostgreSQL 15, PgBouncer 1.18, Supabase's Supavisor), as libpq words them."""

from __future__ import annotations

import psycopg
import pytest

from cdcsync.errors import ConnectionLost, PrerequisiteError
from cdcsync.refusals import connection_error

DSN = "host=db.example.com port=6543 dbname=postgres user=postgres password=secret"


def _failed(reason: str) -> psycopg.OperationalError:
    return psycopg.OperationalError(
        f'connection failed: connection to server at "10.0.0.5", port 6543 failed: {reason}')


@pytest.mark.parametrize(("reason", "fix"), [
    ("FATAL:  unsupported startup parameter: options", "reaches a connection pooler"),
    ("FATAL:  Tenant or user not found", "reaches Supabase's pooler (Supavisor)"),
    ("FATAL:  must be superuser or replication role to start walsender",
     'ALTER ROLE "postgres" WITH REPLICATION;'),
    ("FATAL:  password authentication failed for user \"postgres\"",
     "check the user and password"),
    ("SSL error: certificate verify failed", "check sslmode and sslrootcert"),
])
def test_a_refusal_names_its_fix(reason: str, fix: str) -> None:
    error = connection_error(_failed(reason), DSN, "source")
    assert isinstance(error, PrerequisiteError)
    assert fix in str(error) and "secret" not in str(error)


@pytest.mark.parametrize("reason", [
    "Connection refused\n\tIs the server running on that host and accepting TCP/IP connections?",
    "SSL SYSCALL error: EOF detected",
    "FATAL:  the database system is starting up",
    "server closed the connection unexpectedly",
])
def test_a_connection_lost_on_the_way_is_retried(reason: str) -> None:
    assert isinstance(connection_error(_failed(reason), DSN, "source"), ConnectionLost)
