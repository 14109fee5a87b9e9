"""The target's first answer, asked on a thread while the daemon still loads.

Before it can apply anything, ``cdcsync run`` connects to the target and asks it, in one round
trip, who holds the slot's lock, to bring the metadata schema up to date and for the tables' copy
states (:func:`target_state`). A target far away pays for each round trip at every start, and
none of this needs the validated settings: only the target's DSN and the slot. So, like the
slot's stream (:mod:`cdcsync.source.early`), it starts as soon as the configuration file is read,
while pydantic and the daemon's modules load, and the checks take the connection and its answer
when the validated settings name the same DSN and slot (else it is closed, and they ask again).

The checks report a failure to connect from here as they would their own; any other error closes
the connection, and the checks ask again (and say what to fix).

The slot lock's own connection (:func:`cdcsync.leader.lock_dsn`) opens ahead too, on a second
thread: the lock is tried on it once the answer says whether to (:meth:`SlotLock.open_ahead`),
but opening it took two of the round trips between the checks and the first stream.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from cdcsync import checkpoint, leader, walsenders
from cdcsync.backfill import state
from cdcsync.config_file import SLOT_NAME_RE, raw_section
from cdcsync.dsn import with_session_options
from cdcsync.errors import PrerequisiteError

Conn = psycopg.Connection[TupleRow]

_NO_SCHEMA = "cdcsync: the target has no cdcsync schema"
_NO_TEMPORARY = "cdcsync: the target role may not create temporary tables"
_NOT_OWNER = "cdcsync: the target role may not maintain the cdcsync schema"
# The apply stages every batch in temporary tables: a role without TEMPORARY on the database (a
# hardened one revokes it from PUBLIC) would pass every other check, then halt at its first.
# The metadata is brought up to date at every start, which takes CREATE on the schema and
# owning its tables and view: a `setup` run as another role leaves them that role's.
_REFUSE_UNREADY = sql.SQL("""
DO $$ BEGIN
    IF to_regclass('cdcsync.checkpoint') IS NULL THEN RAISE EXCEPTION {no_schema}; END IF;
    IF NOT has_database_privilege(current_database(), 'TEMPORARY') THEN
        RAISE EXCEPTION {no_temporary};
    END IF;
    IF NOT has_schema_privilege('cdcsync', 'CREATE') OR EXISTS (
            SELECT 1 FROM pg_class WHERE relnamespace = 'cdcsync'::regnamespace
            AND relkind IN ('r', 'v') AND NOT pg_has_role(relowner, 'USAGE')) THEN
        RAISE EXCEPTION {not_owner};
    END IF;
END $$;
""").format(no_schema=sql.Literal(_NO_SCHEMA), no_temporary=sql.Literal(_NO_TEMPORARY),
            not_owner=sql.Literal(_NOT_OWNER))
# What of the cdcsync schema the role may not maintain: (kind, name, owner).
_UNOWNED_SQL = """
SELECT 'SCHEMA', nspname::text, pg_get_userbyid(nspowner)::text FROM pg_namespace
WHERE nspname = 'cdcsync' AND NOT has_schema_privilege(oid, 'CREATE')
UNION ALL
SELECT CASE relkind WHEN 'v' THEN 'VIEW' ELSE 'TABLE' END, relname::text,
       pg_get_userbyid(relowner)::text
FROM pg_class WHERE relnamespace = to_regnamespace('cdcsync') AND relkind IN ('r', 'v')
AND NOT pg_has_role(relowner, 'USAGE')
ORDER BY 1, 2
"""


@dataclass(frozen=True, slots=True)
class TargetState:
    """What ``run`` needs to know of the target before it streams."""

    standby: bool  # another process holds the slot's lock: this one will wait as its standby
    states: dict[str, state.TableState]
    # The walsender the slot's latest stream recorded (see cdcsync.walsenders): if it still
    # holds the slot, this process ends it once it holds the lock.
    recorded_walsender: int | None = None


def target_state(tgt: Conn, slot: str) -> TargetState:
    """Who holds the slot's lock, then (under the metadata lock, so that an active process and
    its standby starting together do not both install) the metadata schema brought up to date
    and the tables' copy states: one round trip, a single implicit transaction. A target without
    the schema is refused, not given one: that is `cdcsync setup`'s to do."""
    query = sql.Composed([
        sql.SQL("SELECT EXISTS ({});").format(leader.holder_query(slot)),
        _REFUSE_UNREADY,
        sql.SQL("SELECT pg_advisory_xact_lock({});").format(leader.METADATA_LOCK_KEY),
        sql.SQL(checkpoint.metadata_sql()),
        sql.SQL(";"),
        walsenders.recorded_query(slot),
        sql.SQL(";"),
        state.load_query(slot),
    ])
    try:
        cur = tgt.execute(query)
    except psycopg.errors.RaiseException as exc:
        if exc.diag.message_primary == _NO_TEMPORARY:
            raise no_temporary(tgt) from None
        if exc.diag.message_primary == _NOT_OWNER and (refused := unowned_metadata(tgt)):
            raise refused from None
        if exc.diag.message_primary != _NO_SCHEMA:
            raise
        raise PrerequisiteError("the target has no cdcsync schema",
                                fix="run `cdcsync setup`") from None
    answers = []
    while True:
        if cur.description is not None:
            answers.append(cur.fetchall())
        if not cur.nextset():
            break
    holder, *_, recorded, states = answers
    return TargetState(standby=bool(holder and holder[0][0]), states=state.from_rows(states),
                       recorded_walsender=walsenders.from_rows(recorded))


def no_temporary(tgt: Conn) -> PrerequisiteError:
    """The refusal of a target role that may not create the temporary tables the apply stages
    its batches in."""
    role = sql.Identifier(tgt.info.user).as_string(tgt)
    database = sql.Identifier(tgt.info.dbname).as_string(tgt)
    return PrerequisiteError(
        f"the target role {role} may not create temporary tables in database {database}, "
        "where the apply stages each batch",
        fix=f"run on the target: GRANT TEMPORARY ON DATABASE {database} TO {role}; "
            "(sql/target_role.sql)")


def unowned_metadata(tgt: Conn) -> PrerequisiteError | None:
    """The refusal of a target role that may not bring the cdcsync schema up to date (its
    objects belong to the role `setup` ran as), with the statements that hand them over; None
    when it may."""
    unowned = tgt.execute(_UNOWNED_SQL).fetchall()
    if not unowned:
        return None
    role = sql.Identifier(tgt.info.user).as_string(tgt)
    owners = sorted({sql.Identifier(str(owner)).as_string(tgt) for _, _, owner in unowned})
    names = [sql.Identifier(str(name)) if kind == "SCHEMA"
             else sql.Identifier("cdcsync", str(name)) for kind, name, _ in unowned]
    statements = " ".join(f"ALTER {kind} {name.as_string(tgt)} OWNER TO {role};"
                          for (kind, _, _), name in zip(unowned, names, strict=True))
    return PrerequisiteError(
        f"the target role {role} may not bring cdcsync's metadata schema up to date, as every "
        f"start does: {len(unowned)} of its objects belong to {', '.join(owners)} (`cdcsync "
        "setup` ran as another role)",
        fix=f"run on the target as {' or '.join(owners)}: {statements}")


# What the checks may take: the connection, and the target's answer or its refusal.
Answered = tuple[Conn, TargetState | PrerequisiteError]
Asked = Answered | psycopg.OperationalError

T = TypeVar("T")


class _Handover(Generic[T]):
    """What a thread of its own makes: handed over once (:meth:`take`), or given up
    (:meth:`give_up`), then closed at once, or by the thread as soon as it is made."""

    def __init__(self, make: Callable[[], T | None], close: Callable[[T], None],
                 name: str) -> None:
        self._make, self._close = make, close
        self._lock = threading.Lock()
        self._made: T | None = None
        self._given_up = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def take(self) -> T | None:
        """Once made (waits for it): what was made, the first time; else None."""
        self._thread.join()
        with self._lock:
            self._given_up = True
            made, self._made = self._made, None
        return made

    def give_up(self) -> None:
        with self._lock:
            self._given_up = True
            made, self._made = self._made, None
        if made is not None:
            self._close(made)

    def _run(self) -> None:
        made = self._make()
        with self._lock:
            if not self._given_up:
                self._made = made
                return
        if made is not None:
            self._close(made)


def _close_asked(asked: Asked) -> None:
    if isinstance(asked, tuple):
        asked[0].close()


def _close_conn(conn: Conn) -> None:
    conn.close()


class TargetAhead:
    """:func:`target_state` asked on a connection of its own thread, and the slot lock's
    connection opened on another; :meth:`take` and :meth:`lock_connection` hand them over,
    :meth:`close` gives them up. Any may be called at any time, from any thread."""

    def __init__(self, dsn: str, slot: str) -> None:
        self.dsn = dsn
        self.slot = slot
        # The one the connection handed over by take() was opened with.
        self.session_dsn = with_session_options(dsn, "cdcsync-admin")
        self._asked: _Handover[Asked] = _Handover(self._ask, _close_asked,
                                                  "cdcsync-target-ahead")
        self._lock_conn: _Handover[Conn] = _Handover(self._open_lock_connection, _close_conn,
                                                     "cdcsync-lock-ahead")

    @classmethod
    def open_unvalidated(cls, config: Path | None) -> TargetAhead | None:
        """Ask the target the configuration file and the environment name, read as they are
        (:func:`cdcsync.config_file.raw_section`), with the slot they name; None when they do
        not name both plainly."""
        target, source = raw_section(config, "target"), raw_section(config, "source")
        if target is None or source is None:
            return None
        dsn, slot = target.get("dsn"), source.get("slot", "cdcsync")
        if not isinstance(dsn, str) or not isinstance(slot, str) or not SLOT_NAME_RE.match(slot):
            return None
        return cls.open(dsn, slot)

    @classmethod
    def open(cls, dsn: str, slot: str) -> TargetAhead:
        """Ask the target at ``dsn`` about ``slot`` in the background."""
        ahead = cls(dsn, slot)
        ahead._asked.start()
        ahead._lock_conn.start()
        return ahead

    def take(self, dsn: str, slot: str) -> Asked | None:
        """For ``dsn`` and ``slot``, once asked (at most the connection's timeout): the
        connection and the target's answer or refusal (no schema), or the error that stopped
        the connection. For others, at once: None (and the question is given up)."""
        if (dsn, slot) != (self.dsn, self.slot):
            self.close()
            return None
        return self._asked.take()

    def lock_connection(self, dsn: str, slot: str) -> Conn | None:
        """For ``dsn`` and ``slot``, once opened (at most its connect timeout): the slot lock's
        connection, opened ahead; None if it failed to open, was taken already, or is for
        other settings (it is closed then)."""
        if (dsn, slot) != (self.dsn, self.slot):
            self.close()
            return None
        return self._lock_conn.take()

    def close(self) -> None:
        """Give the connections up: closed now where they are open, else by their threads
        once they are (a process failing its configuration does not wait for the target)."""
        self._asked.give_up()
        self._lock_conn.give_up()

    def _open_lock_connection(self) -> Conn | None:
        try:
            return psycopg.connect(leader.lock_dsn(self.dsn), autocommit=True)
        except psycopg.Error:
            return None

    def _ask(self) -> Asked | None:
        try:
            conn = psycopg.connect(self.session_dsn, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as exc:
            return exc
        except psycopg.Error:
            return None
        try:
            answer: TargetState | PrerequisiteError = target_state(conn, self.slot)
        except PrerequisiteError as exc:
            answer = exc
        except psycopg.Error:
            conn.close()
            return None
        return conn, answer
