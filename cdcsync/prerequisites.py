"""What ``cdcsync run`` verifies before streaming, each failure one error with its fix.

Everything here is something no retry would cure: a slot held by another consumer, a publication
that does not carry a configured table (its changes would silently never arrive), a target table
that is missing or lacks columns while schema changes are not to be added automatically.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from cdcsync.apply import drift
from cdcsync.apply.tables import (
    OR_IGNORE_TRUNCATES,
    ColumnRows,
    described,
    grant_fix,
    lacking_privileges,
)
from cdcsync.config import Settings
from cdcsync.errors import PrerequisiteError
from cdcsync.source import catalog

Conn = psycopg.Connection[TupleRow]

# A cdcsync killed a moment ago leaves its walsender for as long as the server takes to notice.
SLOT_RELEASE_WAIT_S = 5.0

# The columns of several tables in one round trip; a table that does not exist has none.
_COLUMNS_SQL = """
SELECT t.name, a.attname::text, format_type(a.atttypid, a.atttypmod)
FROM unnest(%s::text[]) t(name)
JOIN pg_attribute a ON a.attrelid = to_regclass(t.name) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY t.name, a.attnum
"""
def table_columns(conn: Conn, tables: list[str]) -> dict[str, list[tuple[str, str]]]:
    """Each table's columns (name, type) in order, by quoted name; absent when it has none."""
    columns: dict[str, list[tuple[str, str]]] = {}
    for name, column, type_ in conn.execute(_COLUMNS_SQL, (tables,)).fetchall():
        columns.setdefault(str(name), []).append((str(column), str(type_)))
    return columns


@dataclass(frozen=True, slots=True)
class Selected:
    """A configured source table, where it lands and the columns it replicates (name, type)."""

    source: str
    target: str
    columns: tuple[tuple[str, str], ...]


def check_source(src: Conn, settings: Settings, *, standby: bool = False,
                 ours: int | None = None, recorded: int | None = None
                 ) -> tuple[list[Selected], catalog.SlotInfo | None]:
    """The slot, if it exists (the initial snapshot may create it), is free, and the publication
    carries every configured table; return those, and the slot as last read (None: missing). A
    process that will wait as the standby of a running cdcsync (``standby``) expects the slot in
    use; one that streams it already expects it active for ``ours`` (that stream's
    walsender), or for the walsender the target ``recorded`` as the slot's latest stream's,
    which no process holding the lock streams (else this one would be a standby): it ends that
    walsender once it holds the lock (see Pipeline._resume_position)."""
    slot, publication = settings.source.slot, settings.source.publication

    def taken(info: catalog.SlotInfo | None) -> bool:
        return info is not None and info.active_pid not in (None, ours, recorded)

    info = catalog.slot_info_until(src, slot, lambda info: standby or not taken(info),
                                   SLOT_RELEASE_WAIT_S, 0.2)
    if not standby and info is not None and info.active_pid is not None and taken(info):
        raise PrerequisiteError(
            f"replication slot {slot!r} is in use by another process: "
            f"{catalog.consumer(src, info.active_pid)}",
            fix="stop the other `cdcsync run` or consumer of this slot, or configure a "
                "different [source] slot")
    chosen = catalog.selected_tables(src, settings.tables)
    catalog.refuse_unreadable(src, chosen)
    published = catalog.publication_tables(src, publication)
    if published is None or info is None:
        # A standby would refuse the setup a missing publication or slot asks for: that is the
        # fix to give.
        catalog.refuse_standby(src)
    if published is None:
        raise PrerequisiteError(f"publication {publication!r} does not exist on the source",
                                fix="run `cdcsync setup` to create it")
    missing = [t.qualified for t in chosen
               if t.qualified not in published and not _published_in_parts(src, publication, t)]
    if missing:
        raise PrerequisiteError(
            f"publication {publication!r} does not publish {', '.join(missing)}, which "
            "`tables` selects: their changes would never arrive",
            fix="run `cdcsync setup` to update the publication")
    quoted = [t.identifier.as_string(src) for t in chosen]
    found = table_columns(src, quoted)
    selected = []
    for table, name in zip(chosen, quoted, strict=True):
        override = settings.override_for(table.qualified)
        columns = found.get(name, [])
        selected.append(Selected(table.qualified, override.target or table.qualified,
                                 tuple(c for c in columns
                                       if c[0] not in override.exclude_columns)))
    return selected, info


def _published_in_parts(src: Conn, publication: str, table: catalog.SourceTable) -> bool:
    """A partitioned table is listed by its partitions unless published via its root."""
    row = src.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_partition_tree(%s::regclass) t "
        "JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "JOIN pg_publication_tables p ON p.schemaname = n.nspname AND p.tablename = c.relname "
        "WHERE p.pubname = %s)", (table.identifier.as_string(src), publication)).fetchone()
    return bool(row and row[0])


def check_target(tgt: Conn, settings: Settings, selected: list[Selected]
                 ) -> dict[str, ColumnRows]:
    """Every target table exists; under ``schema_changes = "halt"`` it has every column too.
    Return what the target's catalog said of each, by target name: the stream that follows
    resolves its tables from it, without asking again (:func:`cdcsync.apply.tables.resolve`)."""
    found = described(tgt, [t.target for t in selected])
    for table in selected:
        columns = {str(row[1]) for row in found.get(table.target, [])}
        if not columns:
            raise PrerequisiteError(
                f"target table {table.target} does not exist (source {table.source})",
                fix="create it, or run `cdcsync setup --create-tables`")
        lacking = [c for c in table.columns if c[0] not in columns]
        if lacking and settings.apply.schema_changes == "halt":
            raise drift.missing_columns(table.source, table.target, lacking)
        refuse_unwritable(tgt, settings, table.target, found[table.target],
                          [c[0] for c in table.columns])
    return found


def refuse_unwritable(tgt: Conn, settings: Settings, target: str, rows: ColumnRows,
                      columns: Iterable[str] | None = None) -> None:
    """The apply reads (the conflict rule), inserts, updates and deletes on each target table,
    on the ``columns`` it writes, and truncates it as the source does unless told to ignore
    that: a role lacking any of it is refused with the GRANT to run. Refused at the start, not
    at the first TRUNCATE, which may come months later."""
    truncates = settings.apply.truncate == "apply"
    if denied := lacking_privileges(rows, columns, truncates=truncates):
        role = sql.Identifier(tgt.info.user).as_string(tgt)
        fix = grant_fix(tgt, target, truncates=truncates)
        if "TRUNCATE" in denied:
            fix += OR_IGNORE_TRUNCATES
        raise PrerequisiteError(
            f"the target role {role} may not {', '.join(p.lower() for p in denied)} on "
            f"{target}, which the apply does", fix=fix)
