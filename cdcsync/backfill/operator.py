"""``cdcsync resync``: queue a re-copy for the process streaming the slot, or perform it alone.

When a daemon streams the slot, it performs the request and the command follows its progress
through the target's metadata. When none does, the command runs the daemon in-process until its
request is done: the watermarks only work where the stream is consumed.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import psycopg
from psycopg.rows import TupleRow

from cdcsync import leader, prerequisites
from cdcsync.admin import connect
from cdcsync.apply import tables
from cdcsync.apply.tables import described
from cdcsync.backfill import resync, source_rows, state
from cdcsync.config import Settings
from cdcsync.config_file import TABLE_NAME_RE
from cdcsync.errors import CdcsyncError, ConfigError, PrerequisiteError
from cdcsync.logs import event
from cdcsync.source import catalog

Conn = psycopg.Connection[TupleRow]


@dataclass(frozen=True, slots=True)
class Outcome:
    table: str
    rows: int
    dry_run: bool
    performed_by: str


def resync_table(settings: Settings, table: str, where: str | None, *,
                 dry_run: bool, purpose: str = "resync") -> Outcome:
    """Re-copy ``table`` (rows matching ``where``); ``purpose`` "repair" also deletes the target
    rows matching ``where`` that the source lacks (``where`` then names keys only)."""
    if not TABLE_NAME_RE.match(table):
        raise ConfigError(f"{table!r} is not schema.table",
                          fix="name the source table, e.g. public.orders")
    if not tables.selected(settings.tables, table):
        raise PrerequisiteError(f"{table} is not among the configured `tables`",
                                fix="add it to `tables`, run `cdcsync setup`, then resync")
    slot = settings.source.slot
    with connect(settings.source.dsn.get_secret_value(), "source") as src, \
            connect(settings.target.dsn.get_secret_value(), "target") as tgt:
        relation = source_rows.relation_of(src, table)
        name = tables.target_of(settings, relation)
        catalog_rows = described(tgt, [name]).get(name, [])
        target = tables.resolve(tgt, settings, relation, rows=catalog_rows)
        # Refused here rather than by the daemon, which would halt on the chunk (and fail it).
        prerequisites.refuse_unwritable(tgt, settings, name, catalog_rows, target.columns)
        order = source_rows.key_order(src, tgt, relation, target)
        try:
            with src.transaction():
                src.execute("SET TRANSACTION READ ONLY")
                rows = source_rows.count(src, relation, order, where)
        except psycopg.errors.Error as exc:
            if isinstance(exc, psycopg.OperationalError):
                raise
            raise ConfigError(f"the source refuses --where {where!r}: "
                              f"{str(exc).strip().splitlines()[0]}",
                              fix="give a condition on the table's columns, in SQL") from None
        if dry_run:
            return Outcome(table, rows, dry_run=True, performed_by="nobody")
        info = catalog.slot_info(src, slot)
        request_id = state.enqueue(tgt, slot, table, where, purpose)
        event(logging.INFO, "resync_requested", slot=slot, table=table, request=request_id,
              where=where, rows=rows)
        holder = leader.lock_holder(tgt, slot)
        if holder is not None or (info is not None and info.active_pid is not None):

            def alive() -> bool:
                if leader.lock_holder(tgt, slot) is not None:
                    return True
                now = catalog.slot_info(src, slot)
                return now is not None and now.active_pid is not None

            return _outcome(resync.wait_for(tgt, request_id, slot=slot, alive=alive),
                            "the running daemon")
    return _alone(settings, request_id)


def _alone(settings: Settings, request_id: int) -> Outcome:
    # The daemon's modules (scheduler, Sentry, metrics) load only when no daemon streams the
    # slot: `cdcsync verify`, which imports this module for --repair, starts faster without them.
    from cdcsync.daemon import DaemonThread  # noqa: PLC0415

    runner = DaemonThread(settings)
    runner.start()
    died = threading.Event()

    def watch() -> None:
        runner.join()
        died.set()

    threading.Thread(target=watch, daemon=True).start()
    try:
        with connect(settings.target.dsn.get_secret_value(), "target") as tgt:
            request = resync.wait_for(tgt, request_id, slot=settings.source.slot, stop=died)
    finally:
        runner.close()
    if runner.error is not None:
        raise runner.error
    return _outcome(request, "this command (no daemon was streaming the slot)")


def _outcome(request: state.Request, performed_by: str) -> Outcome:
    if request.state == "failed":
        # A refusal the daemon halted on carries its own fix (the GRANT to run, say).
        cause, _, fix = (request.error or "").partition(" — fix: ")
        again = f"then `cdcsync resync {request.table}` again"
        raise CdcsyncError(f"resync of {request.table} failed: {cause}",
                           fix=f"{fix}; {again}" if fix else f"correct the cause, {again}")
    if request.state != "done":
        raise CdcsyncError(f"resync of {request.table} stopped before it finished: the daemon "
                           f"performing it stopped (request {request.id} is {request.state})",
                           fix="see the daemon's log for why, then `cdcsync run`: it resumes "
                               "the request")
    return Outcome(request.table, request.rows_copied, dry_run=False, performed_by=performed_by)
