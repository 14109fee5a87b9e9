"""The initial snapshot: every selected table copied exactly as of the slot's starting point.

Only the connection that creates a slot can export the snapshot matching the slot's consistent
point, so the first run re-creates the slot (nothing has been applied from it yet) with
``SNAPSHOT 'export'`` and keeps that connection idle while workers copy under
``SET TRANSACTION SNAPSHOT``. The stream then starts at the consistent point: every change after
it is streamed, every change before it is in the copy, none is in both.

Each table is copied in one target transaction that also marks it ready, so a table is wholly
copied or not at all. A table still empty on the target is filled by a plain COPY; one holding
rows goes through the staging tables and the merge, like the stream. Tables are copied in
parallel, parents before the children whose foreign keys reference them. After a crash the
exported snapshot is gone: tables not ready are then copied online by resync.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import psycopg
from psycopg import pq, sql
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool

from cdcsync import checkpoint, link_watch, roundtrip
from cdcsync.apply import tables
from cdcsync.apply.applier import Applier
from cdcsync.backfill import copy_format, copy_pipe, source_rows, state
from cdcsync.backfill.progress import ProgressLine
from cdcsync.config import Settings
from cdcsync.dsn import with_session_options
from cdcsync.errors import CdcsyncError, ConnectionLost, PrerequisiteError, is_transient
from cdcsync.keyrange import Span
from cdcsync.link_watch import LinkWatch
from cdcsync.logs import event
from cdcsync.model import CopiedRows, Lsn, Relation, TargetTable
from cdcsync.refusals import refusal
from cdcsync.source import catalog

Conn = psycopg.Connection[TupleRow]

# The budget of the fresh connection that ends an exporting session left behind.
_ASK_TIMEOUT_S = 5


class Stopped(CdcsyncError):
    """The snapshot was asked to stop; the tables not ready are copied on the next start."""


def selected(settings: Settings, links: LinkWatch | None = None) -> list[str]:
    dsn = with_session_options(settings.source.dsn.get_secret_value(), "cdcsync")
    with link_watch.connect(dsn, links) as src:
        return [t.qualified for t in catalog.selected_tables(src, settings.tables)]


def needed(states: dict[str, state.TableState], names: list[str]) -> bool:
    """The initial snapshot runs only while no table has started copying: otherwise the slot
    has streamed already and re-creating it would lose changes."""
    return bool(names) and all(n in states and states[n].state == "pending" for n in names)


@dataclass(frozen=True, slots=True)
class Hooks:
    """How the snapshot tells the daemon it started, and that it is alive while it copies; and
    the daemon's watch over the links of the snapshot's connections."""

    started: Callable[[], None]
    alive: Callable[[], None]
    links: LinkWatch | None = None


def take(settings: Settings, pool_conn: Conn, names: list[str], stop: threading.Event,
         hooks: Hooks) -> int:
    """Re-create the slot with an exported snapshot, copy ``names``, move the checkpoint to the
    slot's consistent point; return the rows copied."""
    slot = settings.source.slot
    source_dsn = with_session_options(settings.source.dsn.get_secret_value(), "cdcsync-snapshot")
    # Opened before the slot is dropped: a source that refuses it (a role without REPLICATION,
    # a pooler in the way) keeps the slot setup made, which would otherwise look lost.
    try:
        exporter = psycopg.connect(source_dsn, replication="database", autocommit=True)
    except psycopg.OperationalError as exc:
        raise refusal(exc, source_dsn, "source") or ConnectionLost(
            f"cannot open a replication connection: {exc}") from exc
    pid = exporter.info.backend_pid
    try:
        with exporter:
            with link_watch.connect(source_dsn, hooks.links) as src:
                catalog.drop_slot(src, slot)
            start, snapshot = _export_slot(exporter, slot, settings.source.decoder)
            # Committed before any table is: a crash from here on resumes at the new slot.
            with pool_conn.cursor() as cur:
                checkpoint.save(cur, slot, start, None)
            pool_conn.commit()
            event(logging.INFO, "snapshot_started", slot=slot, lsn=str(start),
                  tables=len(names), workers=settings.snapshot.workers)
            hooks.started()
            return _copy_all(settings, names, snapshot, start, stop=stop, hooks=hooks)
    except Exception as exc:
        if is_transient(exc):
            _end_exporter(source_dsn, slot, pid)
        raise


def _end_exporter(dsn: str, slot: str, pid: int) -> None:
    """After a snapshot lost a connection, and closed its exporting session: end that session
    from a fresh connection if it is still there. Its link may have died behind a middlebox
    that keeps it open, which the close never crossed, and the session would stay idle in the
    exported snapshot's transaction, holding back the source's vacuum, for as long as the
    middlebox keeps it. Best effort: the source may be out of reach too."""
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=_ASK_TIMEOUT_S) as conn:
            ended = catalog.end_exporter(conn, pid)
    except psycopg.Error:
        return
    if ended:
        event(logging.WARNING, "walsender_ended", slot=slot, pid=pid,
              reason="the exporting session of a snapshot that lost a connection outlived its "
                     "close")


def _export_slot(conn: Conn, slot: str, plugin: str) -> tuple[Lsn, str]:
    # Names validated by the configuration; the replication protocol takes no parameters.
    command = f"CREATE_REPLICATION_SLOT \"{slot}\" LOGICAL {plugin} (SNAPSHOT 'export')"
    result = conn.pgconn.exec_(command.encode())
    if result.status != pq.ExecStatus.TUPLES_OK:
        raise PrerequisiteError(
            f"cannot create slot {slot!r} with an exported snapshot: "
            f"{result.error_message.decode().strip()}",
            fix="check that the role has REPLICATION and a replication slot is free")
    point, name = result.get_value(0, 1), result.get_value(0, 2)
    assert point is not None and name is not None
    return Lsn.parse(point.decode()), name.decode()


def _copy_all(settings: Settings, names: list[str], snapshot: str, start: Lsn, *,
              stop: threading.Event, hooks: Hooks) -> int:
    slot = settings.source.slot
    links = hooks.links
    with _target(settings, links, autocommit=True) as tgt:
        resolved = {}
        with _source(settings, snapshot, links) as src:
            for name in names:
                relation = source_rows.relation_of(src, name)
                resolved[name] = (relation, tables.resolve(tgt, settings, relation),
                                  source_rows.estimate(src, relation))
        parents = tables.parents_of(tgt, [t.oid for _, t, _ in resolved.values()])
    by_oid = {t.oid: n for n, (_, t, _) in resolved.items()}
    line = ProgressLine("snapshot", sum(e for _, _, e in resolved.values()), slot=slot)
    abort = threading.Event()
    copier = _Copier(settings, snapshot, start, line, abort, links)
    done: set[str] = set()
    running: dict[Future[int], str] = {}
    total = 0
    with ThreadPoolExecutor(settings.snapshot.workers, thread_name_prefix="cdcsync-copy") as pool:
        try:
            remaining = list(names)
            while remaining or running:
                # A child waits for its parents, unless nothing else can run (a cycle).
                ready = [n for n in remaining
                         if all(by_oid[p] in done or by_oid[p] == n
                                for p in parents[resolved[n][1].oid])]
                if not ready and not running:
                    ready = remaining[:1]
                for name in ready[:max(0, settings.snapshot.workers - len(running))]:
                    remaining.remove(name)
                    relation, table, estimate = resolved[name]
                    running[pool.submit(copier.copy_table, relation, table, estimate)] = name
                finished, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
                hooks.alive()
                if stop.is_set():
                    abort.set()
                for future in finished:
                    name = running.pop(future)
                    total += future.result()
                    done.add(name)
        except BaseException:
            abort.set()
            raise
    line.close()
    event(logging.INFO, "snapshot_done", slot=slot, lsn=str(start), rows=total)
    return total


def _source(settings: Settings, snapshot: str, links: LinkWatch | None) -> Conn:
    # Paced: its COPY is read only as fast as the target takes the rows.
    dsn = with_session_options(settings.source.dsn.get_secret_value(), "cdcsync-snapshot",
                               paced=True)
    conn = link_watch.connect(dsn, links)
    # A long COPY must not hit a statement_timeout the provider sets (Supabase does).
    conn.execute("SET statement_timeout = 0")
    conn.autocommit = False
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
    return conn


def _target(settings: Settings, links: LinkWatch | None, *, autocommit: bool = False) -> Conn:
    dsn = with_session_options(settings.target.dsn.get_secret_value(), "cdcsync-snapshot")
    return link_watch.connect(dsn, links, autocommit=autocommit)


@dataclass(frozen=True, slots=True)
class _Copier:
    """What every table's copy shares: the exported snapshot, its LSN, the progress line."""

    settings: Settings
    snapshot: str
    start: Lsn
    line: ProgressLine
    stop: threading.Event
    links: LinkWatch | None

    def copy_table(self, relation: Relation, table: TargetTable, estimate: int) -> int:
        slot = self.settings.source.slot
        name = relation.qualified
        with _source(self.settings, self.snapshot, self.links) as src, \
                _target(self.settings, self.links) as tgt:
            if self.links is not None:
                self.links.pair(src, tgt)
            tgt.execute("SET statement_timeout = 0")
            state.set_state(tgt, slot, name, "copying", rows_copied=0, rows_estimate=estimate)
            tgt.commit()
            try:
                rows, how = self._fill(src, tgt, relation, table)
            except Exception as exc:
                tgt.rollback()
                if not isinstance(exc, Stopped):
                    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                    state.set_state(tgt, slot, name, "error", reason=reason,
                                    fix="correct the cause; the next `cdcsync run` copies the "
                                        "table again, online")
                    tgt.commit()
                raise
            state.set_state(tgt, slot, name, "ready", rows_copied=rows)
            tgt.commit()
        event(logging.INFO, "table_copied", slot=slot, table=name, rows=rows, copy=how)
        return rows

    def _fill(self, src: Conn, tgt: Conn, relation: Relation,
              table: TargetTable) -> tuple[int, str]:
        """Copy the table; return the rows and how they went: a binary or text plain COPY, or
        the merge."""
        target = sql.Identifier(table.schema, table.name)
        empty = tgt.execute(sql.SQL("SELECT NOT EXISTS (SELECT 1 FROM {})").format(
            target)).fetchone()
        if empty and empty[0]:
            tgt.execute("SAVEPOINT cdcsync_copy")
            try:
                return self._fill_empty(src, tgt, relation, table)
            except psycopg.Error as exc:
                if isinstance(exc, psycopg.OperationalError):
                    raise
                # A row the target refuses: the merge path pins it down and applies
                # [apply] on_error to it. The interrupted COPY may have spoiled this source
                # session; the exported snapshot still serves a new one.
                tgt.execute("ROLLBACK TO SAVEPOINT cdcsync_copy")
                event(logging.WARNING, "copy_refused", slot=self.settings.source.slot,
                      table=relation.qualified, reason=str(exc).strip().splitlines()[0],
                      then="copying through the staging tables and the merge")
            with _source(self.settings, self.snapshot, self.links) as fresh:
                return self._fill_merged(fresh, tgt, relation, table), "merge"
        return self._fill_merged(src, tgt, relation, table), "merge"

    def _fill_merged(self, src: Conn, tgt: Conn, relation: Relation, table: TargetTable) -> int:
        """Rows already there, or a refused row: the merge applies the conflict rule and the
        error policy to each row, and deletes what the source does not hold."""
        order = source_rows.key_order(src, tgt, relation, table)
        applier = Applier(tgt, self.settings)
        after = None
        copied = 0
        while True:
            self._check_stop()
            upto = source_rows.chunk_end(src, relation, order, after, None,
                                         rows=self.settings.snapshot.chunk_rows)
            span = Span(after, upto)
            data, count = source_rows.read_staged(src, source_rows.staged_copy(
                relation, table, order, self.start, span, condition=None))
            applier.apply_copied(CopiedRows(relation, table, data, count), order, span,
                                 windowed=False, delete_missing=True)
            copied += count
            self.line.add(count)
            if upto is None:
                return copied
            after = upto

    def _fill_empty(self, src: Conn, tgt: Conn, relation: Relation,
                    table: TargetTable) -> tuple[int, str]:
        shown = 0

        def on_block(rows: int) -> None:
            nonlocal shown
            self._check_stop()
            self.line.add(rows)
            shown += rows

        binary = copy_format.binary(tgt, relation, table)
        rows = copy_pipe.pipe(src, tgt, source_rows.plain_copy_out(relation, table, binary=binary),
                              source_rows.plain_copy_in(table, binary=binary), on_block)
        # A binary COPY's trailer is one more message than its rows.
        self.line.add(rows - shown)
        return rows, "binary" if binary else "text"

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise Stopped("stopped during the snapshot; the next start copies the tables "
                          "not ready online")


def prepare(settings: Settings, pool: ConnectionPool, stop: threading.Event,
            hooks: Hooks) -> checkpoint.Checkpoint | None:
    """Before streaming: take the initial snapshot if nothing was copied yet, and queue an
    online copy for every other table not ready (a crash mid-snapshot, a table added later).
    Return the checkpoint the stream starts from, read with the copy states (a round trip saved
    where the target is far), unless a snapshot moved it since (None)."""
    slot = settings.source.slot
    names = selected(settings, hooks.links)
    initial = settings.snapshot.mode == "initial"
    with pool.connection() as conn:
        with roundtrip.autocommit(conn):
            states, saved = state.register_and_load(conn, slot, names,
                                                    "pending" if initial else "ready")
        if not initial:
            return saved
        if needed(states, names):
            take(settings, conn, names, stop, hooks)
            states, saved = state.load(conn, slot), None
        behind = [n for n in names if states[n].state != "ready"]
        if not behind:
            return saved
        for name in _parents_first(settings, conn, behind, hooks.links):
            request = state.enqueue(conn, slot, name, None, "snapshot")
            event(logging.INFO, "copy_queued", slot=slot, table=name, request=request,
                  reason=f"table state {states[name].state}")
        conn.commit()
    return saved


def _parents_first(settings: Settings, tgt: Conn, names: list[str],
                   links: LinkWatch | None) -> list[str]:
    dsn = with_session_options(settings.source.dsn.get_secret_value(), "cdcsync")
    with link_watch.connect(dsn, links) as src:
        oids = {tables.resolve(tgt, settings, source_rows.relation_of(src, n)).oid: n
                for n in names}
    order, _ = tables.foreign_key_order(tgt, list(oids))
    return [oids[oid] for oid in order]
