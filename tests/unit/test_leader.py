"""The slot lock's key and the name its session carries (pure, no database)."""

from __future__ import annotations

from psycopg.conninfo import conninfo_to_dict

from cdcsync.dsn import application_name
from cdcsync.health import Health
from cdcsync.leader import (
    METADATA_LOCK_KEY,
    _key_halves,
    lock_dsn,
    lock_key,
)


def test_lock_key_is_stable_and_fits_bigint() -> None:
    """The same slot gives the same key on every host and run; different slots differ."""
    assert lock_key("cdcsync") == lock_key("cdcsync") == -2752350664414913010
    assert lock_key("orders") != lock_key("cdcsync") != METADATA_LOCK_KEY
    assert all(-(2**63) <= lock_key(s) < 2**63 for s in ("a", "b", "x" * 63))


def test_key_halves_match_pg_locks() -> None:
    """pg_locks shows a bigint key as classid (high 32 bits) and objid (low 32 bits), unsigned."""
    assert _key_halves(-1) == (0xFFFFFFFF, 0xFFFFFFFF)
    assert _key_halves((5 << 32) | 7) == (5, 7)


def test_application_name_fits_postgres() -> None:
    """``cdcsync PID@HOST`` is cut to the 63 bytes PostgreSQL keeps, pid first."""
    assert application_name(42, "db-1") == "cdcsync 42@db-1"
    assert len(application_name(42, "h" * 100).encode()) == 63


def test_readyz_of_a_standby() -> None:
    """A standby is alive but not ready, and says who holds the lock."""
    health = Health()
    health.set_role("standby")
    health.set_state("standby", "lock held by cdcsync 42@db-1")
    code, body = health.readyz()
    assert (code, body["role"], body["reason"]) == (
        503, "standby", "standby: lock held by cdcsync 42@db-1")
    assert health.healthz()[0] == 200


def test_lock_connection_detects_a_vanished_peer() -> None:
    """The lock connection asks both ends for TCP keepalives (the server releases the lock of a
    lost host in about 15 s) and keeps the user's own options, last so that they win."""
    params = conninfo_to_dict(lock_dsn("host=db dbname=app options='-c search_path=x'"))
    options = str(params["options"])
    assert options.endswith(" -c search_path=x")
    assert "-c tcp_keepalives_idle=5" in options
    assert (params["keepalives"], params["tcp_user_timeout"]) == ("1", "10000")
    assert params["application_name"] == application_name()
