"""check, setup, status and teardown: what an operator runs around the daemon."""

from __future__ import annotations

import datetime as dt
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql
from psycopg.rows import TupleRow

from cdcsync import checkpoint, leader, link_watch, pooler, prerequisites, probe, walsenders
from cdcsync.apply.tables import described
from cdcsync.backfill import state
from cdcsync.config import Settings
from cdcsync.dsn import describe, with_session_options
from cdcsync.errors import CdcsyncError, PrerequisiteError
from cdcsync.link_watch import LinkWatch
from cdcsync.model import Lsn
from cdcsync.refusals import connection_error
from cdcsync.source import catalog
from cdcsync.target_ahead import no_temporary, unowned_metadata

Conn = psycopg.Connection[TupleRow]


@contextmanager
def connect(dsn: str, side: str, links: LinkWatch | None = None) -> Iterator[Conn]:
    """An autocommit connection whose failure names the side and the fix, never the password,
    watched by ``links`` (or by a watch of its own while open): an operator's command, or a
    monitor's `cdcsync status`, on a link that went dead behind a middlebox fails with the lost
    connection's error instead of waiting for ever."""
    with link_watch.watching(links, None) as watch:
        try:
            conn = link_watch.connect(with_session_options(dsn, "cdcsync-admin"), watch)
        except psycopg.OperationalError as exc:
            raise connection_error(exc, dsn, side) from None
        with conn:
            yield conn


@dataclass
class CheckReport:
    lines: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, status: str, what: str, detail: str = "") -> None:
        self.lines.append((status, what, detail))

    @property
    def ok(self) -> bool:
        return all(status != "FAIL" for status, _, _ in self.lines)


def _check_step(report: CheckReport, what: str, step: Callable[[], str]) -> bool:
    try:
        detail = step()
    except CdcsyncError as exc:
        report.add("FAIL", what, str(exc))
        return False
    except psycopg.Error as exc:
        report.add("FAIL", what, str(exc).strip().splitlines()[0])
        return False
    status, _, detail = detail.partition("|") if "|" in detail else ("ok", "", detail)
    report.add(status, what, detail)
    return status != "FAIL"


def check(settings: Settings) -> CheckReport:
    """Every prerequisite, one line each; nothing is changed."""
    report = CheckReport()
    source_dsn = settings.source.dsn.get_secret_value()
    target_dsn = settings.target.dsn.get_secret_value()
    try:
        with connect(source_dsn, "source") as src:
            report.add("ok", "source reachable", describe(source_dsn))
            _source_checks(report, settings, src)
    except CdcsyncError as exc:
        report.add("FAIL", "source reachable", str(exc))
    try:
        with connect(target_dsn, "target") as tgt:
            report.add("ok", "target reachable", describe(target_dsn))
            _target_checks(report, settings, tgt, source_dsn)
    except CdcsyncError as exc:
        report.add("FAIL", "target reachable", str(exc))
    return report


def _setting(conn: Conn, name: str) -> str:
    row = conn.execute("SELECT current_setting(%s)", (name,)).fetchone()
    return str(row[0]) if row else ""


def _source_checks(report: CheckReport, settings: Settings, src: Conn) -> None:
    def primary() -> str:
        catalog.refuse_standby(src)
        return "not in recovery"

    def wal_level() -> str:
        level = _setting(src, "wal_level")
        if level != "logical":
            return (f"FAIL|wal_level is {level}; run ALTER SYSTEM SET wal_level = logical; "
                    "then restart the server (Supabase and Neon: enable logical replication)")
        return "logical"

    def capacity() -> str:
        row = src.execute(
            "SELECT current_setting('max_replication_slots')::int"
            " - (SELECT count(*) FROM pg_replication_slots),"
            " current_setting('max_wal_senders')::int"
            " - (SELECT count(*) FROM pg_stat_replication),"
            " EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = %s)",
            (settings.source.slot,),
        ).fetchone()
        assert row is not None
        free_slots, free_senders, exists = int(row[0]), int(row[1]), bool(row[2])
        if free_slots < 1 and not exists:
            return "FAIL|no free replication slot; raise max_replication_slots and restart"
        if free_senders < 1:
            return "FAIL|no free WAL sender; raise max_wal_senders and restart"
        return f"{free_slots} free slots, {free_senders} free WAL senders"

    def may_replicate() -> str:
        row = src.execute("SELECT rolreplication OR rolsuper, current_user FROM pg_roles "
                          "WHERE rolname = current_user").fetchone()
        if row is None or not row[0]:
            user = row[1] if row else "this role"
            return f"FAIL|role {user} lacks REPLICATION; run ALTER ROLE {user} WITH REPLICATION;"
        return f"role {row[1]} has REPLICATION"

    def replication_connection() -> str:
        dsn = with_session_options(settings.source.dsn.get_secret_value(), "cdcsync-admin")
        try:
            with psycopg.connect(dsn, replication="database", autocommit=True,
                                 connect_timeout=10) as conn:
                conn.execute("IDENTIFY_SYSTEM")
        except psycopg.OperationalError as exc:
            raise connection_error(exc, dsn, "source") from None
        return "opens"

    def tables() -> str:
        chosen = catalog.selected_tables(src, settings.tables)
        catalog.refuse_unkeyed(chosen)
        return ", ".join(t.qualified for t in chosen)

    def readable() -> str:
        chosen = catalog.selected_tables(src, settings.tables)
        catalog.refuse_unreadable(src, chosen)
        return f"role {src.info.user} may read all {len(chosen)}"

    def publication() -> str:
        current = catalog.publication_tables(src, settings.source.publication)
        wanted = {t.qualified for t in catalog.selected_tables(src, settings.tables)}
        if current is None:
            return f"todo|publication {settings.source.publication!r} will be created by setup"
        if current != wanted:
            return (f"todo|publication {settings.source.publication!r} differs from `tables`; "
                    "setup will update it")
        return f"{settings.source.publication!r} publishes {len(current)} tables"

    def slot() -> str:
        info = catalog.slot_info(src, settings.source.slot)
        if info is None:
            return f"todo|slot {settings.source.slot!r} will be created by setup"
        catalog.refuse_other_plugin(settings.source.slot, info, settings.source.decoder)
        state = f"active (pid {info.active_pid})" if info.active_pid else "inactive"
        return f"{settings.source.slot!r} exists, {state}, retains {info.retained_bytes} bytes"

    for what, step in (("source is the primary", primary),
                       ("source wal_level", wal_level), ("replication capacity", capacity),
                       ("replication privilege", may_replicate),
                       ("replication connection", replication_connection),
                       ("selected tables have keys", tables),
                       ("selected tables readable", readable), ("publication", publication),
                       ("slot", slot)):
        _check_step(report, what, step)


def _target_checks(report: CheckReport, settings: Settings, tgt: Conn, source_dsn: str) -> None:
    def metadata() -> str:
        row = tgt.execute("SELECT to_regclass('cdcsync.checkpoint') IS NOT NULL").fetchone()
        if not row or not row[0]:
            return "todo|schema cdcsync will be created by setup"
        if refused := unowned_metadata(tgt):
            raise refused
        return f"schema cdcsync present, role {tgt.info.user} may bring it up to date"

    # Each present target table and the columns the apply writes there.
    targets: dict[str, set[str]] = {}

    def tables() -> str:
        with connect(source_dsn, "source") as src:
            chosen = catalog.selected_tables(src, settings.tables)
            needed = {t: _target_needs(tgt, settings, src, t) for t in chosen}
        missing = [t for t, columns in needed.items() if columns is None]
        targets.update((settings.override_for(t.qualified).target or t.qualified, columns)
                       for t, columns in needed.items() if columns is not None)
        if missing:
            names = ", ".join(t.qualified for t in missing)
            return (f"FAIL|missing or incomplete on the target: {names}; "
                    "run `cdcsync setup --create-tables` or create them")
        return f"{len(chosen)} tables present with their columns"

    def sessions() -> str:
        row = tgt.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        if not pooler.behind_pooler(tgt, row[0]):
            return "direct to the server"
        if pooler.lends_sessions(tgt, with_session_options(settings.target.dsn.get_secret_value(),
                                                           "cdcsync-admin"), row[0]):
            raise pooler.refused()
        return "through a pooler that keeps each client's session"

    def writable() -> str:
        row = tgt.execute("SELECT has_database_privilege(current_database(), 'TEMPORARY')"
                          ).fetchone()
        if not (row and row[0]):
            raise no_temporary(tgt)
        found = described(tgt, list(targets))
        for name, columns in targets.items():
            prerequisites.refuse_unwritable(tgt, settings, name, found.get(name, []),
                                            columns)
        return f"role {tgt.info.user} may apply to all {len(targets)}"

    _check_step(report, "target sessions", sessions)
    _check_step(report, "target metadata", metadata)
    _check_step(report, "target tables", tables)
    _check_step(report, "target tables writable", writable)


def _target_needs(tgt: Conn, settings: Settings, src: Conn,
                  table: catalog.SourceTable) -> set[str] | None:
    """The columns the apply writes in ``table``'s target table; None if it lacks any of them
    (or the table)."""
    override = settings.override_for(table.qualified)
    schema, _, name = (override.target or table.qualified).partition(".")
    query = ("SELECT array_agg(a.attname::text) FROM pg_attribute a JOIN pg_class c ON "
             "c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace WHERE "
             "n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped")
    target_row = tgt.execute(query, (schema, name)).fetchone()
    source_row = src.execute(query, (table.schema, table.name)).fetchone()
    target_cols = set(target_row[0] or []) if target_row else set()
    source_cols = set(source_row[0] or []) if source_row else set()
    needed = source_cols - set(override.exclude_columns)
    return needed if target_cols and needed <= target_cols else None


def setup(settings: Settings, *, create_tables: bool) -> list[str]:
    """Idempotently prepare both sides; return what was done, one line per step."""
    done: list[str] = []
    with connect(settings.source.dsn.get_secret_value(), "source") as src:
        catalog.refuse_standby(src)
        chosen = catalog.selected_tables(src, settings.tables)
        # Refuse before touching the publication: publishing updates of a table without a key
        # breaks UPDATE and DELETE on the source itself.
        catalog.refuse_unkeyed(chosen)
        outcome = catalog.sync_publication(src, settings.source.publication, chosen)
        done.append(f"publication {settings.source.publication!r} {outcome}: "
                    f"{', '.join(t.qualified for t in chosen)}")
        outcome = catalog.create_slot(src, settings.source.slot, settings.source.decoder)
        done.append(f"slot {settings.source.slot!r} {outcome}")
        slot = catalog.slot_info(src, settings.source.slot)
        assert slot is not None and slot.confirmed_flush is not None
        slot_start = Lsn.parse(slot.confirmed_flush)
        definitions = [(t, catalog.table_definition(src, t)) for t in chosen] if create_tables \
            else []
    with connect(settings.target.dsn.get_secret_value(), "target") as tgt:
        if refused := unowned_metadata(tgt):
            raise refused
        checkpoint.install_metadata(tgt)
        done.append("target schema cdcsync ready")
        initial = settings.snapshot.mode == "initial"
        if outcome == "created" and initial:
            state.restart(tgt, settings.source.slot)
        state.register(tgt, settings.source.slot, [t.qualified for t in chosen],
                       "pending" if initial else "ready")
        done.extend(_initial_checkpoint(tgt, settings.source.slot, slot_start, outcome))
        for table, source_definition in definitions:
            target_schema, _, target_name = (
                settings.override_for(table.qualified).target or table.qualified).partition(".")
            definition = _retarget(source_definition, table, target_schema, target_name)
            tgt.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
                sql.Identifier(target_schema)))
            try:
                tgt.execute(definition)
            except psycopg.errors.UndefinedObject as exc:
                raise PrerequisiteError(
                    f"cannot create {table.qualified} on the target: {exc}",
                    fix="create the missing type (for example the enum) on the target first",
                ) from None
            done.append(f"target table for {table.qualified} ready")
    return done


def _initial_checkpoint(tgt: Conn, slot: str, slot_start: Lsn, outcome: str) -> list[str]:
    """Start the checkpoint where a new slot starts, so the daemon can tell a target that lost
    applied changes (its checkpoint behind the slot) from one that never had any."""
    saved = checkpoint.load(tgt, slot)
    if saved is not None and outcome == "exists":
        return [f"checkpoint for slot {slot!r} at {saved.lsn}"]
    with tgt.transaction(), tgt.cursor() as cur:
        cur.execute("DELETE FROM cdcsync.checkpoint WHERE slot = %s", (slot,))
        # A walsender recorded for the slot this one replaces streamed another slot: its PID,
        # taken since, must not name a stream of this one.
        cur.execute("DELETE FROM cdcsync.streams WHERE slot = %s", (slot,))
        checkpoint.save(cur, slot, slot_start, None)
    lines = [f"checkpoint for slot {slot!r} starts at {slot_start}"]
    if saved is not None or outcome == "exists":
        lines.append(f"warning: the target holds no changes of slot {slot!r} before "
                     f"{slot_start}; with [snapshot] mode = \"initial\" the next `cdcsync run` "
                     "copies every table again")
    return lines


def _retarget(definition: sql.Composed, table: catalog.SourceTable, schema: str,
              name: str) -> sql.Composed:
    parts = list(definition)
    return sql.Composed([sql.Identifier(schema, name) if p == table.identifier else p
                         for p in parts])


def status(settings: Settings) -> dict[str, Any]:
    """Where the pipeline stands, as plain data for printing or JSON."""
    result: dict[str, Any] = {"slot": settings.source.slot}
    with connect(settings.target.dsn.get_secret_value(), "target") as tgt:
        saved = checkpoint.load(tgt, settings.source.slot)
        conflicts = tgt.execute("SELECT count(*) FROM cdcsync.conflicts").fetchone()
        by_table = tgt.execute("SELECT table_name, count(*) FROM cdcsync.conflicts "
                               "GROUP BY 1 ORDER BY 1").fetchall()
        copies = _copies(tgt, settings.source.slot)
        letters = tgt.execute("SELECT count(*) FROM cdcsync.dead_letters").fetchone()
        holder = leader.lock_holder(tgt, settings.source.slot)
        standbys = leader.waiting_standbys(tgt, settings.source.slot)
        # A target not yet brought up to date by a `run` has no record of streams.
        row = tgt.execute("SELECT to_regclass('cdcsync.streams') IS NOT NULL").fetchone()
        has_streams = bool(row and row[0])
        recorded = walsenders.recorded(tgt, settings.source.slot) if has_streams else None
    # The active process: the session holding the slot's lock ("cdcsync PID@HOST").
    result["active_process"] = holder.describe() if holder else None
    result["standbys_waiting"] = standbys
    result["conflicts_by_table"] = {str(t): int(n) for t, n in by_table}
    result["checkpoint_lsn"] = str(saved.lsn) if saved else None
    result["checkpoint_commit_time"] = saved.commit_time.isoformat() if saved and \
        saved.commit_time else None
    result["conflicts"] = int(conflicts[0]) if conflicts else 0
    result["dead_letters"] = int(letters[0]) if letters else 0
    with connect(settings.source.dsn.get_secret_value(), "source") as src:
        info = catalog.slot_info(src, settings.source.slot)
        current = catalog.current_wal_lsn(src)
        # Who streams the slot, as the source sees it: a consumer other than cdcsync shows here.
        consumer = (catalog.consumer(src, info.active_pid)
                    if info is not None and info.active_pid is not None else None)
    result["source_wal_lsn"] = current
    result["slot_exists"] = info is not None
    if info is not None:
        result["slot_active_pid"] = info.active_pid
        result["slot_consumer"] = consumer
        # Whether that consumer is the stream a process syncing this target recorded: false
        # for another consumer (or a stream yet to record itself), null with none.
        result["slot_consumer_recorded"] = (info.active_pid == recorded
                                            if info.active_pid is not None and has_streams
                                            else None)
        result["slot_confirmed_lsn"] = info.confirmed_flush
        result["slot_retained_wal_bytes"] = info.retained_bytes
        result["slot_wal_status"] = info.wal_status
        result["slot_safe_wal_size_bytes"] = info.safe_wal_size
    position = saved.lsn if saved else (Lsn.parse(info.confirmed_flush) if info and
                                        info.confirmed_flush else None)
    result["lag_bytes"] = max(0, Lsn.parse(current) - position) if position is not None else None
    if saved and saved.commit_time:
        lag = dt.datetime.now(dt.UTC) - saved.commit_time
        result["lag_seconds"] = round(lag.total_seconds(), 3)
    else:
        result["lag_seconds"] = None
    result.update(copies)
    result.update(daemon_view(settings.http.listen))
    return result


def _copies(tgt: Conn, slot: str) -> dict[str, Any]:
    """Each table's copy state, the resyncs still open and those that failed since their
    table's last successful one, for `status`."""
    tables = {name: {"state": s.state, "rows_copied": s.rows_copied,
                     "rows_estimate": s.rows_estimate,
                     **({"reason": s.reason, "fix": s.fix} if s.state == "error" else {})}
              for name, s in state.load(tgt, slot).items()}
    resyncs = [{"id": r.id, "table": r.table, "purpose": r.purpose, "state": r.state,
                "where": r.where, "rows_copied": r.rows_copied, "rows_estimate": r.rows_estimate}
               for r in state.open_requests(tgt, slot)]
    failed = [{"id": r.id, "table": r.table, "purpose": r.purpose, "where": r.where,
               "error": r.error,
               "finished_at": None if r.finished_at is None else r.finished_at.isoformat()}
              for r in state.unresolved_failures(tgt, slot)]
    return {"tables": tables, "open_resyncs": resyncs, "failed_resyncs": failed}


def daemon_view(listen: str) -> dict[str, Any]:
    """What a running daemon reports on its HTTP port: state, readiness, applied counts."""
    base = probe.base_url(listen)
    if base is None:
        return {"daemon": "unknown (listen port 0)"}
    ready = probe.readiness(base)
    if ready is None:
        return {"daemon": f"not reachable at {base}"}
    with urllib.request.urlopen(f"{base}/metrics", timeout=2) as response:
        text = response.read().decode()
    applied: dict[str, dict[str, int]] = {}
    gauges: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "cdcsync_applied_changes_total":
                table = applied.setdefault(sample.labels["table"], {})
                table[sample.labels["op"]] = int(sample.value)
            elif sample.name in ("cdcsync_batch_rows_limit", "cdcsync_target_round_trip_seconds"):
                gauges[sample.name] = sample.value
    # Zero until the daemon streams, and the round trip until a batch has measured it.
    limit = int(gauges.get("cdcsync_batch_rows_limit", 0))
    round_trip = gauges.get("cdcsync_target_round_trip_seconds", 0.0)
    return {"daemon": ready.get("state"), "role": ready.get("role"), "ready": ready.get("ready"),
            "ready_reason": ready.get("reason"), "applied_since_start": applied,
            "batch_rows_limit": limit or None,
            "target_round_trip_ms": round(round_trip * 1000, 3) if round_trip else None}


def teardown(settings: Settings) -> list[str]:
    done: list[str] = []
    with connect(settings.source.dsn.get_secret_value(), "source") as src:
        slot = settings.source.slot
        dropped = catalog.drop_slot(src, slot)
        done.append(f"slot {slot!r} " + ("dropped" if dropped else "did not exist"))
        publication = settings.source.publication
        dropped = catalog.drop_publication(src, publication)
        done.append(f"publication {publication!r} " + ("dropped" if dropped else "did not exist"))
    return done
