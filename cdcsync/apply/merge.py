"""Merging staged batches into their target tables, inside the applier's open transaction.

A flush is merged in bulk: TOASTed values an update did not resend are filled, every version of a
key but the last is dropped, then one upsert, one partial update and one delete per table, parents
before children, all in the flush's one query (:mod:`cdcsync.apply.script`). If the target
refuses the merged batch, the batch is merged again in runs of consecutive changes in source
order, halving every run the target refuses: an order-sensitive batch (a unique value moving
between rows) then succeeds, and a change the target rejects on its own is pinned down exactly,
then set aside as a dead letter or named by the error that halts. Nothing here commits: the
applier owns the transaction.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql
from psycopg.rows import TupleRow

from cdcsync import libpq
from cdcsync.apply import script as plan
from cdcsync.apply import sql as q
from cdcsync.apply.script import Rendered, Script, Staged
from cdcsync.apply.tables import OR_IGNORE_TRUNCATES, grant_fix
from cdcsync.errors import ApplyError
from cdcsync.logs import event
from cdcsync.model import TargetTable

Conn = psycopg.Connection[TupleRow]
Cur = psycopg.Cursor[TupleRow]

# Errors a merged batch can raise although applying its changes in source order would succeed:
# a unique value moving between rows within the batch, or foreign keys between tables in a cycle.
_ORDER_SENSITIVE = (pgerrors.UniqueViolation, pgerrors.ForeignKeyViolation,
                    pgerrors.ExclusionViolation)
# SQLSTATE classes that blame one change (a bad value, a constraint, a trigger raising), which
# [apply] on_error = "dead_letter" sets aside. Anything else (a missing privilege or column)
# would reject every change alike and halts under either policy.
_ROW_ERROR_CLASSES = ("22", "23", "P0")
# After a batch of inserts met keys already on the target, that table's next batches of inserts
# go straight to the upsert: a table the stream keeps re-inserting into (a resync over existing
# rows) does not pay for a refused plain insert every flush.
_UPSERT_ONLY_FLUSHES = 32
# Rendered merges kept (see Merger.add_merge); a stream's flushes take few shapes, so reaching
# this means shapes that do not repeat (many tables): start again rather than grow.
_SHAPES_KEPT = 256


def _shape(batch: Staged) -> tuple[object, ...]:
    """What the merge statements of ``batch`` depend on."""
    return (batch.table, batch.relation, batch.stage, batch.only_inserts, batch.deletes > 0,
            batch.repeats, batch.unchanged_mask, batch.direct, batch.binary, batch.collapsed)


@dataclass(frozen=True, slots=True)
class _Step:
    """One staged change, as the fallback addresses it."""

    seq: int
    is_delete: bool
    lsn: str
    key: str
    batch: Staged


class Merger:
    """Merges flushes for one pipeline; counts conflicts and dead letters until taken."""

    def __init__(self, slot: str, on_error: str,
                 copy_waited: Callable[[float], None] | None = None) -> None:
        self.slot = slot
        self.on_error = on_error
        # Told how long each merge's query waited for its COPY to start (see batch_size).
        self.copy_waited = copy_waited
        self.conflicts: Counter[str] = Counter()
        self.dead_letters: Counter[str] = Counter()
        self._upsert_only: Counter[int] = Counter()
        self._merges: dict[tuple[object, ...], Rendered] = {}

    def take_counts(self) -> tuple[Counter[str], Counter[str]]:
        """The conflicts and dead letters counted since the last call, per table."""
        counts = (self.conflicts, self.dead_letters)
        self.conflicts, self.dead_letters = Counter(), Counter()
        return counts

    def add_merge(self, script: Script, batches: list[Staged], conn: Conn) -> None:
        """Append the bulk merge of ``batches`` (copied into their stages, in foreign-key order)
        and the recording of the changes the conflict rule turns down; rendered once per shape
        of flush (the tables, what their batches hold, the statements chosen for them)."""
        plainly = {b.table.oid: bool(b.inserts) and self._may_insert_plainly(b.table.oid)
                   for b in batches if not b.direct}
        key = (conn.info.encoding, tuple(_shape(b) for b in batches), tuple(plainly.items()))
        part = self._merges.get(key)
        if part is None:
            fresh = Script()
            plan.merge(fresh, batches, {b.table.oid: self._upserts(b, plainly[b.table.oid])
                                        for b in batches if not b.direct})
            part = fresh.rendered(conn)
            if len(self._merges) >= _SHAPES_KEPT:
                self._merges.clear()
            self._merges[key] = part
        script.splice(part)
        script.copies.extend(plan.straight_copies(batches))

    def inserts_plainly(self, oid: int) -> bool:
        """Whether inserts into the table go in without ON CONFLICT (a plain INSERT, or a COPY
        straight into it): yes unless it lately refused one."""
        return self._upsert_only[oid] == 0

    def run(self, conn: Conn, script: Script, reached: threading.Event | None = None
            ) -> tuple[list[int], pgerrors.Error | None]:
        """Run ``script`` as one query and count the conflicts it recorded; each statement's
        affected rows, up to a failure; ``reached`` is set when its statement
        :attr:`Script.reached` has ended. If the target refused its merge, roll back to the
        merge's savepoint (the staged rows are back as they were copied) and say why; any other
        failure raises."""
        signal = (None if reached is None or script.reached is None
                  else (script.reached, reached))
        outcome = libpq.run_script(conn, script.render(conn), script.copies, signal)
        if outcome.copy_wait_s is not None and self.copy_waited is not None:
            self.copy_waited(outcome.copy_wait_s)
        for index, rows in enumerate(outcome.rowcounts):
            if index in script.conflicts and rows > 0:
                name, operation = script.conflicts[index]
                self.conflicts[name] += rows
                event(logging.INFO, "conflicts_recorded", slot=self.slot, table=name,
                      operation=operation, rows=rows)
        error = outcome.error
        if error is None:
            return outcome.rowcounts, None
        if (not isinstance(error, pgerrors.Error) or isinstance(error, psycopg.OperationalError)
                or not script.refused(len(outcome.rowcounts))):
            raise error
        conn.execute(plan.ROLLBACK_TO)
        return outcome.rowcounts, error

    def recover(self, cur: Cur, batches: list[Staged], refused: pgerrors.Error) -> None:
        """The target refused the bulk merge of ``batches``: merge them again with the upsert if
        a plainly inserted key was already there; else, merged in ever shorter runs of
        consecutive changes in source order, an order-sensitive batch succeeds, and any other
        failure is pinned to the exact change (set aside, or named)."""
        if self._refused_plain_insert(refused, batches):
            script = Script()
            self.add_merge(script, batches, cur.connection)
            _, again = self.run(cur.connection, script)
            if again is None:
                return
            refused = again
        event(logging.INFO if isinstance(refused, _ORDER_SENSITIVE) else logging.WARNING,
              "batch_replayed_in_source_order", slot=self.slot,
              rows=sum(b.changes for b in batches), reason=str(refused).splitlines()[0])
        self._split(cur, batches, refused)

    def _upserts(self, batch: Staged, plainly: bool) -> list[sql.Composed]:
        """The statements writing the batch's full and partial rows: inserts ``plainly`` (the
        table has not lately refused a plain insert), everything else through the upsert."""
        table, stage = batch.table, batch.stage
        statements: list[sql.Composed] = []
        if plainly:
            if batch.only_inserts:
                return [q.insert(stage, table)]
            statements += [q.insert(stage, table, q.op_is("I")),
                           q.upsert(stage, table, q.op_is("U"))]
        else:
            statements.append(q.upsert(stage, table))
        if batch.unchanged_mask:
            statements.append(q.partial_update(stage, table, batch.relation))
        return statements

    def _may_insert_plainly(self, oid: int) -> bool:
        if self._upsert_only[oid] > 0:
            self._upsert_only[oid] -= 1
            return False
        return True

    def _refused_plain_insert(self, exc: pgerrors.Error, batches: list[Staged]) -> bool:
        """Whether ``exc`` is a plainly inserted key already on the target: its table then goes
        through the upsert and its rule, this flush and the next few."""
        if not isinstance(exc, pgerrors.UniqueViolation):
            return False
        for batch in batches:
            table = batch.table
            if (batch.inserts and self._upsert_only[table.oid] == 0
                    and exc.diag.schema_name == table.schema
                    and exc.diag.table_name == table.name):
                self._upsert_only[table.oid] = _UPSERT_ONLY_FLUSHES
                return True
        return False

    def _upsert(self, cur: Cur, batch: Staged, where: sql.Composable,
                params: tuple[int, ...]) -> None:
        table = batch.table
        if table.conflict is None:
            cur.execute(q.upsert(batch.stage, table, where), params)
            if batch.unchanged_mask:
                cur.execute(q.partial_update(batch.stage, table, batch.relation, where), params)
            return
        full, partial, _ = self._candidates(cur, batch, where, params)
        applied = 0
        if full:
            cur.execute(q.upsert(batch.stage, table, where), params)
            applied += cur.rowcount
        if partial:
            cur.execute(q.partial_update(batch.stage, table, batch.relation, where), params)
            applied += cur.rowcount
        if applied < full + partial:
            self._record_conflicts(cur, batch, "upsert", where, params)

    def _delete(self, cur: Cur, batch: Staged, where: sql.Composable = q.NO_FILTER,
                params: tuple[int, ...] = ()) -> None:
        table = batch.table
        if not batch.deletes:
            return
        cur.execute(q.delete(batch.stage, table, where), params)
        if table.conflict_is_time and cur.rowcount < self._candidates(cur, batch, where,
                                                                      params)[2]:
            self._record_conflicts(cur, batch, "delete", where, params)

    def _candidates(self, cur: Cur, batch: Staged, where: sql.Composable,
                    params: tuple[int, ...]) -> tuple[int, int, int]:
        row = cur.execute(q.count_candidates(batch.stage, where), params).fetchone()
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2])

    def _record_conflicts(self, cur: Cur, batch: Staged, operation: str,
                          where: sql.Composable, params: tuple[int, ...]) -> None:
        cur.execute(q.record_conflicts(batch.stage, batch.table, operation, where), params)
        if cur.rowcount > 0:
            name = batch.table.source_name
            self.conflicts[name] += cur.rowcount
            event(logging.INFO, "conflicts_recorded", slot=self.slot, table=name,
                  operation=operation, rows=cur.rowcount)

    def _steps(self, cur: Cur, batches: list[Staged]) -> list[_Step]:
        """Every staged change, in source order."""
        steps: list[_Step] = []
        for batch in batches:
            # The fallbacks select staged rows by sequence number: an index, made for them only,
            # turns each into a lookup instead of a scan of the whole stage, while COPY on the
            # normal path stays free of index upkeep.
            cur.execute(q.index_stage(batch.stage))
            staged = cur.execute(q.staged_order(batch.stage, batch.table)).fetchall()
            steps.extend(_Step(int(seq), bool(is_delete), str(lsn), str(key), batch)
                         for seq, is_delete, lsn, key in staged)
        steps.sort(key=lambda step: step.seq)
        return steps

    def replay(self, cur: Cur, batches: list[Staged]) -> None:
        """Apply every staged row on its own, in source order, with the same statements."""
        for step in self._steps(cur, batches):
            self._replay_one(cur, step)
        for batch in batches:
            cur.execute(q.drop_stage_index(batch.stage))

    def _split(self, cur: Cur, batches: list[Staged], refused: pgerrors.Error) -> None:
        """Merge the batch in runs of consecutive changes, halving a run the target refuses
        until the refusal is pinned to single changes: k bad changes among n cost about
        2k log2(n) merges, where applying each change on its own costs n."""
        steps = self._steps(cur, batches)
        if not steps:
            # Refused with no change to blame (an empty chunk of a copy, merged into a table
            # the role may not write, or whose statement trigger raises): it halts, named.
            raise self._table_error(refused, batches, cur.connection)
        for batch in batches:
            for statement in plan.fills(batch):
                cur.execute(statement)
        self._merge_run(cur, batches, steps)
        for batch in batches:
            cur.execute(q.drop_stage_index(batch.stage))

    def _merge_run(self, cur: Cur, batches: list[Staged], steps: list[_Step]) -> None:
        if len(steps) == 1:
            self._replay_one(cur, steps[0])
            return
        where = q.seq_between("s")
        params = (steps[0].seq, steps[-1].seq)
        involved = [b for b in batches if any(step.batch is b for step in steps)]
        cur.execute("SAVEPOINT cdcsync_run")
        try:
            for batch in involved:
                if not batch.only_inserts:
                    cur.execute(q.keep_last_versions(batch.stage, batch.table, where,
                                                     q.seq_between("later")), params * 2)
            for batch in involved:
                self._upsert(cur, batch, where, params)
            for batch in reversed(involved):
                self._delete(cur, batch, where, params)
        except pgerrors.Error as exc:
            if isinstance(exc, psycopg.OperationalError):
                raise
            cur.execute("ROLLBACK TO SAVEPOINT cdcsync_run")
            middle = len(steps) // 2
            self._merge_run(cur, batches, steps[:middle])
            self._merge_run(cur, batches, steps[middle:])
        cur.execute("RELEASE SAVEPOINT cdcsync_run")

    def _replay_one(self, cur: Cur, step: _Step) -> None:
        """Apply one staged change; a rejection is set aside (dead_letter) or halts."""
        batch, seq, lsn, key = step.batch, step.seq, step.lsn, step.key
        # A savepoint per change costs a round trip, paid only on the fallback paths and only
        # when a rejected change is to be set aside rather than halt the pipeline.
        isolate = self.on_error == "dead_letter"
        if isolate:
            cur.execute("SAVEPOINT cdcsync_change")
        try:
            if step.is_delete:
                self._delete(cur, batch, q.only_seq(), (seq,))
            else:
                self._upsert(cur, batch, q.only_seq(), (seq,))
        except pgerrors.Error as exc:
            if isinstance(exc, psycopg.OperationalError):
                raise
            if not (isolate and (exc.sqlstate or "").startswith(_ROW_ERROR_CLASSES)):
                raise self._apply_error(exc, batch.table, key, lsn, cur.connection) from exc
            cur.execute("ROLLBACK TO SAVEPOINT cdcsync_change")
            self._dead_letter(cur, batch, seq, key=key, lsn=lsn, exc=exc)
        else:
            if isolate:
                cur.execute("RELEASE SAVEPOINT cdcsync_change")

    def _dead_letter(self, cur: Cur, batch: Staged, seq: int, *, key: str, lsn: str,
                     exc: pgerrors.Error) -> None:
        error = str(exc).strip().replace("\n", " ")
        cur.execute(q.record_dead_letter(batch.stage, batch.table, batch.relation, seq, error))
        name = batch.table.source_name
        self.dead_letters[name] += 1
        event(logging.WARNING, "dead_letter", slot=self.slot, table=name, key=key, lsn=lsn,
              error=error)

    def _apply_error(self, exc: pgerrors.Error, table: TargetTable, key: str,
                     lsn: str, conn: Conn) -> ApplyError:
        detail = str(exc).strip().replace("\n", " ")
        return ApplyError(
            f"the target rejected a change to {table.source_name} (key {key}) committed at "
            f"source LSN {lsn}: {detail}", fix=refusal_fix(exc, table, conn, "or the row"))

    def _table_error(self, exc: pgerrors.Error, batches: list[Staged], conn: Conn
                     ) -> ApplyError:
        named = [b.table for b in batches if exc.diag.table_name == b.table.name
                 and exc.diag.schema_name in (None, b.table.schema)]
        blamed = named or [b.table for b in batches]
        detail = str(exc).strip().replace("\n", " ")
        return ApplyError(
            f"the target refused to apply to {', '.join(t.source_name for t in blamed)}: "
            f"{detail}", fix=refusal_fix(exc, blamed[0], conn, ""))


def refusal_fix(exc: pgerrors.Error, table: TargetTable, conn: Conn, blame: str, *,
                truncates: bool = False) -> str:
    """What to do about the target refusing to apply to ``table``: the GRANT where the role
    lacks a privilege (with TRUNCATE, or the setting that does without it, where it refused a
    source TRUNCATE); else correct the table (``blame``: what else may be at fault)."""
    if isinstance(exc, pgerrors.InsufficientPrivilege):
        first = grant_fix(conn, f"{table.schema}.{table.name}", truncates=truncates)
        if truncates:
            first += OR_IGNORE_TRUNCATES
    else:
        first = f"correct the target table {blame}".rstrip()
    return f"{first}, then run `cdcsync run` again; it resumes from the last checkpoint"
