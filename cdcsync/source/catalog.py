"""Source introspection and management: selected tables, keys, publication, slot, WAL position."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from cdcsync.apply.tables import selected
from cdcsync.errors import PrerequisiteError
from cdcsync.model import Column, Relation

Conn = psycopg.Connection[TupleRow]

_TABLES_SQL = """
SELECT n.nspname, c.relname, c.relreplident,
       EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
       EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident),
       has_any_column_privilege(c.oid, 'SELECT')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'cdcsync')
  AND n.nspname NOT LIKE 'pg\\_%'
ORDER BY 1, 2
"""


# Key columns as pgoutput flags them: those of the replica identity index, else the primary key.
# Generated columns are not streamed (pgoutput leaves them out), so they are not described.
_DESCRIBE_SQL = """
SELECT c.oid, c.relreplident, a.attname, a.atttypid, a.atttypmod,
       coalesce(a.attnum = ANY (i.indkey), false)
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                   AND a.attgenerated = ''
LEFT JOIN pg_index i ON i.indrelid = c.oid
     AND (i.indisreplident OR (c.relreplident <> 'i' AND i.indisprimary))
WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')
ORDER BY a.attnum
"""


@dataclass(frozen=True, slots=True)
class SourceTable:
    schema: str
    name: str
    replica_identity: str
    has_primary_key: bool
    has_identity_index: bool
    # Whether this connection's role may read it, or some of its columns (a grant may leave
    # out the columns `exclude_columns` leaves out): the snapshot, a resync and verify do.
    readable: bool

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def identifier(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    def key_problem(self) -> str | None:
        """Why updates and deletes of this table cannot be replicated, with the fix; or None."""
        usable = (
            (self.replica_identity == "d" and self.has_primary_key)
            or (self.replica_identity == "i" and self.has_identity_index)
            or (self.replica_identity == "f" and self.has_primary_key)
        )
        if usable:
            return None
        quoted = f'"{self.schema}"."{self.name}"'
        if self.has_primary_key:  # replica identity NOTHING
            return (f"table {self.qualified} has REPLICA IDENTITY NOTHING; run: "
                    f"ALTER TABLE {quoted} REPLICA IDENTITY DEFAULT;")
        return (f"table {self.qualified} has no primary key or replica identity; run: "
                f"ALTER TABLE {quoted} ADD PRIMARY KEY (<its unique, not-null columns>);")


def selected_tables(conn: Conn, patterns: tuple[str, ...]) -> list[SourceTable]:
    """The source tables the patterns select; a pattern that selects nothing is an error."""
    rows = conn.execute(_TABLES_SQL).fetchall()
    tables = [SourceTable(str(r[0]), str(r[1]), str(r[2]), bool(r[3]), bool(r[4]), bool(r[5]))
              for r in rows]
    chosen = [t for t in tables if selected(patterns, t.qualified)]
    for pattern in patterns:
        if not any(selected((pattern,), t.qualified) for t in chosen):
            raise PrerequisiteError(
                f"`tables` entry {pattern!r} matches no table on the source",
                fix="create the table on the source or correct the entry in `tables`",
            )
    return chosen


def refuse_unkeyed(tables: list[SourceTable]) -> None:
    problems = [p for p in (t.key_problem() for t in tables) if p]
    if problems:
        raise PrerequisiteError(
            "; ".join(problems),
            fix="cdcsync needs a key to replicate updates and deletes; run the ALTER TABLE above "
                "on the source (or remove the table from `tables`), then run setup again",
        )


def refuse_unreadable(conn: Conn, tables: list[SourceTable]) -> None:
    """Streaming needs only REPLICATION, but the snapshot, a resync and verify read the tables."""
    unreadable = [t.identifier.as_string(conn) for t in tables if not t.readable]
    if unreadable:
        role = sql.Identifier(conn.info.user).as_string(conn)
        raise PrerequisiteError(
            f"the source role {role} may not read {', '.join(unreadable)}, which the snapshot, "
            "a resync and verify copy",
            fix=f"run on the source: GRANT SELECT ON {', '.join(unreadable)} TO {role}; "
                "(sql/source_role.sql)")


def publication_tables(conn: Conn, publication: str) -> set[str] | None:
    exists = conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s",
                          (publication,)).fetchone()
    if exists is None:
        return None
    rows = conn.execute(
        "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = %s",
        (publication,),
    ).fetchall()
    return {str(r[0]) for r in rows}


def sync_publication(conn: Conn, publication: str, tables: list[SourceTable]) -> str:
    """Create the publication or make its table list exactly ``tables``; say what was done."""
    current = publication_tables(conn, publication)
    table_list = sql.SQL(", ").join(t.identifier for t in tables)
    if current is None:
        conn.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
            sql.Identifier(publication), table_list))
        return "created"
    if current == {t.qualified for t in tables}:
        return "unchanged"
    conn.execute(sql.SQL("ALTER PUBLICATION {} SET TABLE {}").format(
        sql.Identifier(publication), table_list))
    return "updated"


@dataclass(frozen=True, slots=True)
class SlotInfo:
    plugin: str
    database: str
    active_pid: int | None
    confirmed_flush: str | None
    restart_lsn: str | None
    wal_status: str | None
    retained_bytes: int | None
    safe_wal_size: int | None


def end_walsender(conn: Conn, slot: str, pid: int) -> bool:
    """End walsender ``pid`` if it still holds ``slot``; whether it was asked to end."""
    row = conn.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                       "WHERE slot_name = %s AND active_pid = %s", (slot, pid)).fetchone()
    return bool(row and row[0])


def consumer(conn: Conn, pid: int) -> str:
    """Who walsender ``pid`` streams for, as the source sees it: for an operator to find."""
    row = conn.execute("SELECT application_name, host(client_addr) FROM pg_stat_activity "
                       "WHERE pid = %s", (pid,)).fetchone()
    if row is None:
        return f"walsender PID {pid} (gone since)"
    name = f"{row[0]!r}" if row[0] else "a consumer without an application_name"
    where = f" from {row[1]}" if row[1] else ""
    return f"{name}{where} (walsender PID {pid})"


def end_exporter(conn: Conn, pid: int) -> bool:
    """End walsender ``pid`` if it is still idle in the transaction of the snapshot it exported;
    whether it was asked to end."""
    row = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = %s "
                       "AND backend_type = 'walsender' AND state = 'idle in transaction'",
                       (pid,)).fetchone()
    return bool(row and row[0])


def refuse_standby(conn: Conn) -> None:
    """The source must be the primary: ``setup`` creates the publication and the slot there, and
    a standby (a read replica, in recovery) is read-only."""
    row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    if row is not None and row[0]:
        raise PrerequisiteError(
            "the source DSN reaches a standby (a read replica, in recovery), which is "
            "read-only: the publication and the slot are made on the primary",
            fix="point the source DSN at the primary server")


def slot_info(conn: Conn, slot: str) -> SlotInfo | None:
    row = conn.execute(
        """
        SELECT plugin, database, active_pid, confirmed_flush_lsn::text, restart_lsn::text,
               wal_status, (pg_current_wal_lsn() - restart_lsn)::bigint, safe_wal_size
        FROM pg_replication_slots WHERE slot_name = %s
        """,
        (slot,),
    ).fetchone()
    if row is None:
        return None
    return SlotInfo(
        plugin=str(row[0]),
        database=str(row[1]),
        active_pid=int(row[2]) if row[2] is not None else None,
        confirmed_flush=row[3],
        restart_lsn=row[4],
        wal_status=row[5],
        retained_bytes=int(row[6]) if row[6] is not None else None,
        safe_wal_size=int(row[7]) if row[7] is not None else None,
    )


def slot_info_until(conn: Conn, slot: str, done: Callable[[SlotInfo | None], bool],
                    within_s: float, every_s: float) -> SlotInfo | None:
    """The slot as last read: read again every ``every_s`` until ``done`` with it or
    ``within_s`` has passed (a walsender takes a moment to let the slot go)."""
    info = slot_info(conn, slot)
    deadline = time.monotonic() + within_s
    while not done(info) and time.monotonic() < deadline:
        time.sleep(every_s)
        info = slot_info(conn, slot)
    return info


def refuse_other_plugin(slot: str, info: SlotInfo, decoder: str) -> None:
    """A slot decodes with the plugin it was created with, whatever START_REPLICATION says."""
    if info.plugin != decoder:
        raise PrerequisiteError(
            f"replication slot {slot!r} was created with the {info.plugin} plugin, but "
            f"[source] decoder is {decoder!r}",
            fix=f'set [source] decoder = "{info.plugin}", or run `cdcsync teardown --yes` and '
                f"`cdcsync setup` to recreate the slot with {decoder} (then re-copy the tables)",
        )


def describe_table(conn: Conn, schema: str, name: str) -> Relation | None:
    """The table as the catalog describes it now: OID, replica identity, columns, key columns."""
    rows = conn.execute(_DESCRIBE_SQL, (schema, name)).fetchall()
    if not rows:
        return None
    columns = tuple(Column(str(r[2]), int(r[3]), int(r[4]), bool(r[5])) for r in rows)
    return Relation(int(rows[0][0]), schema, name, str(rows[0][1]), columns)


def create_slot(conn: Conn, slot: str, plugin: str) -> str:
    """Create the logical slot unless it exists; refuse one made with another plugin."""
    info = slot_info(conn, slot)
    if info is not None:
        refuse_other_plugin(slot, info, plugin)
        dbname = conn.execute("SELECT current_database()").fetchone()
        if dbname is not None and info.database != dbname[0]:
            raise PrerequisiteError(
                f"replication slot {slot!r} belongs to database {info.database!r}",
                fix="configure a different [source] slot for this database",
            )
        return "exists"
    try:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, %s)", (slot, plugin))
    except psycopg.errors.UndefinedFile:
        raise PrerequisiteError(
            f"the source server has no {plugin} output plugin",
            fix=f"install it on the source server (Debian: apt-get install "
                f"postgresql-<version>-{plugin}), or set [source] decoder = \"pgoutput\"",
        ) from None
    return "created"


def drop_slot(conn: Conn, slot: str) -> bool:
    info = slot_info(conn, slot)
    if info is None:
        return False
    if info.active_pid is not None:
        raise PrerequisiteError(
            f"replication slot {slot!r} is in use by process {info.active_pid}",
            fix="stop `cdcsync run` first, then run teardown again",
        )
    conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    return True


def drop_publication(conn: Conn, publication: str) -> bool:
    if publication_tables(conn, publication) is None:
        return False
    conn.execute(sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(publication)))
    return True


def current_wal_lsn(conn: Conn) -> str:
    row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return str(row[0])


def table_definition(conn: Conn, table: SourceTable) -> sql.Composed:
    """``CREATE TABLE`` for the target: the source's columns, types, NOT NULL and primary key."""
    columns = conn.execute(
        """
        SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull
        FROM pg_attribute a
        WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY a.attnum
        """,
        (table.identifier.as_string(conn),),
    ).fetchall()
    key = conn.execute(
        """
        WITH idx AS (
            SELECT indrelid, indkey FROM pg_index
            WHERE indrelid = %s::regclass AND (indisprimary OR indisreplident)
            ORDER BY indisprimary DESC LIMIT 1
        )
        SELECT a.attname FROM idx
        JOIN pg_attribute a ON a.attrelid = idx.indrelid AND a.attnum = ANY (idx.indkey)
        ORDER BY array_position(idx.indkey::int2[], a.attnum)
        """,
        (table.identifier.as_string(conn),),
    ).fetchall()
    parts = [
        # format_type() output is a type name as the catalog spells it, already quoted.
        sql.SQL("{} {}{}").format(sql.Identifier(str(name)), sql.SQL(str(type_name)),
                                 sql.SQL(" NOT NULL") if notnull else sql.SQL(""))
        for name, type_name, notnull in columns
    ]
    key_names = [str(r[0]) for r in key]
    parts.append(sql.SQL("PRIMARY KEY ({})").format(
        sql.SQL(", ").join(sql.Identifier(k) for k in key_names)))
    return sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(
        table.identifier, sql.SQL(", ").join(parts))


# How format_type spells common built-in types without a modifier. Their OIDs and spellings are
# the same on every server, so a relation whose columns all have one is described without asking
# the source: a round trip per table, on the reader's path at every start, where the source is
# far (tests/integration/test_described.py checks each spelling against the server).
BUILTIN_TYPE_NAMES: Final = {
    16: "boolean", 17: "bytea", 18: '"char"', 19: "name", 20: "bigint", 21: "smallint",
    23: "integer", 25: "text", 26: "oid", 114: "json", 650: "cidr", 700: "real",
    701: "double precision", 829: "macaddr", 869: "inet", 1042: "bpchar",
    1043: "character varying", 1082: "date", 1083: "time without time zone",
    1114: "timestamp without time zone", 1184: "timestamp with time zone", 1186: "interval",
    1266: "time with time zone", 1700: "numeric", 2950: "uuid", 3802: "jsonb",
    1000: "boolean[]", 1001: "bytea[]", 1005: "smallint[]", 1007: "integer[]", 1009: "text[]",
    1015: "character varying[]", 1016: "bigint[]", 1021: "real[]", 1022: "double precision[]",
    1182: "date[]", 1115: "timestamp without time zone[]",
    1185: "timestamp with time zone[]", 1231: "numeric[]", 2951: "uuid[]", 3807: "jsonb[]",
}


def builtin_column_types(relation: Relation) -> list[str] | None:
    """:func:`column_types`, spelt here where every column is of a type of
    :data:`BUILTIN_TYPE_NAMES` without a modifier; else None (the source must be asked)."""
    names: list[str] = []
    for column in relation.columns:
        name = BUILTIN_TYPE_NAMES.get(column.type_oid) if column.type_modifier == -1 else None
        if name is None:
            return None
        names.append(name)
    return names


def column_types(conn: Conn, relation: Relation) -> list[str]:
    """The source's ``format_type`` of each column of a Relation message (type OID and modifier),
    spelt as the target's catalog spells the same type."""
    rows = conn.execute(
        "SELECT format_type(t.oid, t.mod) FROM unnest(%s::oid[], %s::int[]) "
        "WITH ORDINALITY AS t(oid, mod, i) ORDER BY t.i",
        ([c.type_oid for c in relation.columns], [c.type_modifier for c in relation.columns]),
    ).fetchall()
    return [str(r[0]) for r in rows]
