"""SQL for the target: staging tables, and the statements that merge them. Pure builders.

A staging table holds the rows of one source relation exactly as the stream carried them: every
value as ``text`` (the source's output representation) after the metadata columns of
:mod:`cdcsync.source.tuples`. The merge casts to the target column types, so the target's own
input functions do the parsing and user-defined types need no OID mapping. Type names come from
the target's ``format_type()``, which returns them already quoted, so they are spliced as SQL;
every other name is an Identifier.

Per flush, for each table: fill TOASTed values an update did not resend from an earlier version in
the same batch, drop every version of a key but the last, then upsert full rows, update partial
ones, delete deleted ones. Each merge statement takes an optional extra condition on the staged
rows, which the source-order replay uses to apply one staged row at a time.
"""

from __future__ import annotations

import zlib

from psycopg import sql

from cdcsync.model import Relation, TargetTable
from cdcsync.source.tuples import META_COLUMNS

SEQ, OP, LSN, COMMIT_TIME, UNCHANGED = (sql.Identifier(c) for c in META_COLUMNS)
NO_FILTER = sql.SQL("")


def _ident(name: str) -> sql.Identifier:
    return sql.Identifier(name)


def _target(table: TargetTable) -> sql.Identifier:
    return sql.Identifier(table.schema, table.name)


def _columns(table: TargetTable) -> sql.Composed:
    return sql.SQL(", ").join(_ident(c) for c in table.columns)


def _staged_values(table: TargetTable) -> sql.Composed:
    """The stage's columns cast to the target's types, in the target's column order."""
    return sql.SQL(", ").join(_typed("s", table, i) for i in range(len(table.columns)))


def _typed(alias: str, table: TargetTable, i: int) -> sql.Composed:
    return sql.SQL("{}.{}::{}").format(_ident(alias), _ident(table.columns[i]),
                                        sql.SQL(table.types[i]))


def stage_name(table: TargetTable, relation: Relation, *, binary: bool = False) -> str:
    """A temp table name unique to the target table, the relation's column list and, for binary
    values, their types (a connection of the pool keeps its temp tables across streams)."""
    parts = relation.column_names
    if binary and table.binary_types:
        parts += (":binary", *table.binary_types)
    digest = zlib.crc32("\0".join(parts).encode()) & 0xFFFFFFFF
    return f"cdcsync_stage_{table.oid}_{digest:08x}"


def create_stage(name: str, relation: Relation, types: tuple[str, ...] | None = None
                 ) -> sql.Composed:
    """The staging table: the relation's columns as ``text``, or of ``types`` (binary values)."""
    meta = ("bigint", "text", "pg_lsn", "timestamptz", "text")
    columns = [sql.SQL("{} {}").format(_ident(c), sql.SQL(t))
               for c, t in zip(META_COLUMNS, meta, strict=True)]
    columns += [sql.SQL("{} {}").format(_ident(c), sql.SQL(t))
                for c, t in zip(relation.column_names,
                                types or ("text",) * len(relation.columns), strict=True)]
    return sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} ({}) ON COMMIT DELETE ROWS").format(
        _ident(name), sql.SQL(", ").join(columns))


def truncate_stage(name: str) -> sql.Composed:
    return sql.SQL("TRUNCATE {}").format(_ident(name))


def copy_into(name: str) -> sql.Composed:
    return sql.SQL("COPY {} FROM STDIN (FORMAT binary)").format(_ident(name))


def copy_straight_into(table: TargetTable, *, binary: bool = False) -> sql.Composed:
    """COPY rows straight into the target table: its replicated columns, text format (or
    binary)."""
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(_target(table), _columns(table))
    return statement + sql.SQL(" (FORMAT binary)") if binary else statement


def _key_match(table: TargetTable, left: str, right: str, *, typed: bool = True) -> sql.Composed:
    if typed:
        pairs = (sql.SQL("{}.{} = {}").format(_ident(left), _ident(table.columns[i]),
                                               _typed(right, table, i)) for i in table.key)
    else:
        pairs = (sql.SQL("{0}.{1} = {2}.{1}").format(_ident(left), _ident(table.columns[i]),
                                                      _ident(right)) for i in table.key)
    return sql.SQL(" AND ").join(pairs)


def _rule(table: TargetTable, incoming: sql.Composable, operation: str) -> sql.Composed:
    """The conflict rule: the incoming change wins when its value is >= the target's (ties too).
    A change it turns down sets the transaction's :func:`lost_mark` of the operation."""
    assert table.conflict is not None
    current = sql.SQL("t.{}").format(_ident(table.columns[table.conflict]))
    return sql.SQL("(CASE WHEN {current} IS NULL OR {current} <= {incoming} THEN true "
                   "ELSE set_config({mark}, 'on', true) IS NULL END)").format(
        current=current, incoming=incoming, mark=sql.Literal(lost_mark(table, operation)))


def lost_mark(table: TargetTable, operation: str) -> str:
    """The setting the conflict rule turns on, for the rest of the transaction, when it turns
    down a change of ``operation`` (upsert, delete) to ``table``."""
    return f"cdcsync.lost_{table.oid}_{operation}"


def lost_marked(table: TargetTable, operation: str) -> sql.Composed:
    """Keeps staged rows only if the rule turned down a change of ``operation`` to ``table``: a
    condition on no row, so the planner decides it once and skips the statement otherwise."""
    return sql.SQL(" AND current_setting({}, true) = 'on'").format(
        sql.Literal(lost_mark(table, operation)))


def _unchanged(relation: Relation, column: str) -> sql.Composed:
    position = relation.column_names.index(column) + 1
    return sql.SQL("substr(s.{}, {}, 1) = '1'").format(UNCHANGED, sql.Literal(position))


def fill_unchanged(name: str, table: TargetTable, relation: Relation, column: str,
                   stage_type: str = "text") -> sql.Composed:
    """Give rows that left ``column`` unchanged its value: from the latest earlier version of the
    key in the batch that carried it or, for an update that moved the key, from the moved row
    (its earlier version in the batch, else the target, cast to the stage's ``stage_type``).
    Rows with neither keep the mark: the target row they update has the value."""
    stage = _ident(name)
    position = sql.Literal(relation.column_names.index(column) + 1)
    col = _ident(column)

    def earlier(alias: str) -> sql.Composed:
        return sql.SQL(
            "SELECT ARRAY[p.{col}] FROM {stage} p WHERE {match} AND p.{seq} < {alias}.{seq} "
            "AND p.{op} IN ('I', 'U') AND substr(p.{u}, {pos}, 1) = '0' "
            "ORDER BY p.{seq} DESC LIMIT 1"
        ).format(col=col, stage=stage, match=_key_match(table, "p", alias, typed=False),
                 seq=SEQ, alias=_ident(alias), op=OP, u=UNCHANGED, pos=position)

    moved_from = sql.SQL(
        "SELECT coalesce(({earlier_m}), (SELECT ARRAY[t.{col}::{stage_type}] FROM {target} t "
        "WHERE {match})) FROM {stage} m WHERE m.{seq} = x.{seq} - 1 AND m.{op} = 'M'"
    ).format(earlier_m=earlier("m"), col=col, stage_type=sql.SQL(stage_type),
             target=_target(table),
             match=_key_match(table, "t", "m"), stage=stage, seq=SEQ, op=OP)
    return sql.SQL(
        "UPDATE {stage} s SET {col} = f.v[1], "
        "{u} = overlay(s.{u} PLACING '0' FROM {pos} FOR 1) "
        "FROM (SELECT x.{seq}, coalesce(({earlier_x}), ({moved_from})) AS v "
        "FROM {stage} x WHERE substr(x.{u}, {pos}, 1) = '1') f "
        "WHERE s.{seq} = f.{seq} AND f.v IS NOT NULL"
    ).format(stage=stage, col=col, u=UNCHANGED, pos=position, seq=SEQ,
             earlier_x=earlier("x"), moved_from=moved_from)


def keep_last_versions(name: str, table: TargetTable, where: sql.Composable = NO_FILTER,
                       among: sql.Composable = NO_FILTER) -> sql.Composed:
    """Delete every staged version of a key but the last one: of the rows ``where`` keeps (alias
    ``s``), among those ``among`` keeps (alias ``later``). Only keys staged more than once are
    joined back, found by hashing rather than by sorting the stage: in most batches no key
    repeats, and a sort compares text keys in the target's collation."""
    keys = [_ident(table.columns[i]) for i in table.key]
    later_keys = sql.SQL(", ").join(sql.SQL("later.{}").format(k) for k in keys)
    return sql.SQL(
        "DELETE FROM {stage} s USING (SELECT {later_keys}, max(later.{seq}) AS last "
        "FROM {stage} later WHERE true{among} GROUP BY {later_keys} HAVING count(*) > 1) d "
        "WHERE {match} AND s.{seq} < d.last{where}"
    ).format(stage=_ident(name), later_keys=later_keys, seq=SEQ, among=among,
             match=_key_match(table, "s", "d", typed=False), where=where)


def count_candidates(name: str, where: sql.Composable = NO_FILTER) -> sql.Composed:
    """How many staged rows the upsert, the partial update and the delete will try to apply."""
    return sql.SQL("SELECT count(*) FILTER (WHERE {op} IN ('I', 'U') AND strpos({u}, '1') = 0), "
                   "count(*) FILTER (WHERE {op} IN ('I', 'U') AND strpos({u}, '1') > 0), "
                   "count(*) FILTER (WHERE {op} IN ('D', 'M')) FROM {stage} s WHERE true{where}"
                   ).format(
        op=OP, u=UNCHANGED, stage=_ident(name), where=where)


def upsert(name: str, table: TargetTable, where: sql.Composable = NO_FILTER) -> sql.Composed:
    """Insert the full staged rows, or update the existing row when the conflict rule allows.

    ``OVERRIDING SYSTEM VALUE`` here and in :func:`insert`: a target made from the source's
    schema dump keeps its ``GENERATED ALWAYS AS IDENTITY`` keys, which refuse a plain INSERT of
    the source's values (COPY takes them as they are); on other tables it changes nothing."""
    non_key = [c for i, c in enumerate(table.columns) if i not in table.key]
    statement = sql.SQL(
        "INSERT INTO {target} AS t ({columns}) OVERRIDING SYSTEM VALUE SELECT {values} "
        "FROM {stage} s WHERE s.{op} IN ('I', 'U') AND strpos(s.{u}, '1') = 0{where} "
        "ON CONFLICT ({keys}) "
    ).format(
        target=_target(table),
        columns=_columns(table),
        values=_staged_values(table),
        stage=_ident(name), op=OP, u=UNCHANGED, where=where,
        keys=sql.SQL(", ").join(_ident(table.columns[i]) for i in table.key),
    )
    if not non_key:
        return statement + sql.SQL("DO NOTHING")
    sets = sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(_ident(c)) for c in non_key)
    statement += sql.SQL("DO UPDATE SET {}").format(sets)
    if table.conflict is not None:
        incoming = sql.SQL("EXCLUDED.{}").format(_ident(table.columns[table.conflict]))
        statement += sql.SQL(" WHERE {}").format(_rule(table, incoming, "upsert"))
    return statement


def insert(name: str, table: TargetTable, where: sql.Composable = NO_FILTER) -> sql.Composed:
    """Insert the staged rows ``where`` keeps, without ON CONFLICT: tried first for inserts (the
    merge's savepoint undoes it if a key is already there), since a plain insert costs the target
    about half of an upsert's speculative one."""
    return sql.SQL("INSERT INTO {target} ({columns}) OVERRIDING SYSTEM VALUE SELECT {values} "
                   "FROM {stage} s WHERE true{where}").format(
        target=_target(table),
        columns=_columns(table),
        values=_staged_values(table),
        stage=_ident(name), where=where)


def op_is(op: str) -> sql.Composed:
    """Keeps the staged rows of one operation (I or U): a filter for the merge statements."""
    return sql.SQL(" AND s.{} = {}").format(OP, sql.Literal(op))


def partial_update(name: str, table: TargetTable, relation: Relation,
                   where: sql.Composable = NO_FILTER) -> sql.Composed:
    """Update rows that left TOASTed columns unchanged, keeping the target's value for those."""
    sets = sql.SQL(", ").join(
        sql.SQL("{col} = CASE WHEN {unchanged} THEN t.{col} ELSE {value} END").format(
            col=_ident(c), unchanged=_unchanged(relation, c), value=_typed("s", table, i))
        for i, c in enumerate(table.columns) if i not in table.key)
    statement = sql.SQL(
        "UPDATE {target} AS t SET {sets} FROM {stage} s "
        "WHERE s.{op} IN ('I', 'U') AND strpos(s.{u}, '1') > 0 AND {match}{where}"
    ).format(target=_target(table), sets=sets, stage=_ident(name), op=OP, u=UNCHANGED,
             match=_key_match(table, "t", "s"), where=where)
    if table.conflict is not None:
        statement += sql.SQL(" AND {}").format(
            _rule(table, _typed("s", table, table.conflict), "upsert"))
    return statement


def delete(name: str, table: TargetTable, where: sql.Composable = NO_FILTER) -> sql.Composed:
    """Delete staged keys; with a time conflict column, only rows not newer than the commit."""
    statement = sql.SQL("DELETE FROM {target} AS t USING {stage} s "
                        "WHERE s.{op} IN ('D', 'M') AND {match}{where}").format(
        target=_target(table), stage=_ident(name), op=OP, match=_key_match(table, "t", "s"),
        where=where)
    if table.conflict_is_time:
        statement += sql.SQL(" AND {}").format(
            _rule(table, sql.SQL("s.{}").format(COMMIT_TIME), "delete"))
    return statement


def record_conflicts(name: str, table: TargetTable, operation: str,
                     where: sql.Composable = NO_FILTER) -> sql.Composed:
    """Log the staged changes that lost to a newer target row into ``cdcsync.conflicts``.

    Runs after the merge: a row that still holds a strictly newer value than the incoming one is
    exactly a row the merge refused.
    """
    assert table.conflict is not None
    column = _ident(table.columns[table.conflict])
    if operation == "delete":
        selected = sql.SQL("s.{} IN ('D', 'M')").format(OP)
        incoming = sql.SQL("s.{}").format(COMMIT_TIME)
        incoming_text = sql.SQL("s.{}::text").format(COMMIT_TIME)
    else:
        selected = sql.SQL("s.{} IN ('I', 'U')").format(OP)
        incoming = _typed("s", table, table.conflict)
        incoming_text = sql.SQL("s.{}::text").format(column)
    key = sql.SQL("jsonb_build_object({})").format(sql.SQL(", ").join(
        sql.SQL("{}, t.{}").format(sql.Literal(table.columns[i]), _ident(table.columns[i]))
        for i in table.key))
    return sql.SQL(
        "INSERT INTO cdcsync.conflicts "
        "(table_name, key, operation, source_value, target_value, source_lsn) "
        "SELECT {name}, {key}, {operation}, {incoming_text}, t.{column}::text, s.{lsn} "
        "FROM {stage} s JOIN {target} t ON {match} "
        "WHERE {selected} AND t.{column} > {incoming}{where}"
    ).format(name=sql.Literal(table.source_name), key=key, operation=sql.Literal(operation),
             incoming_text=incoming_text, column=column, lsn=LSN, stage=_ident(name),
             target=_target(table), match=_key_match(table, "t", "s"), selected=selected,
             incoming=incoming, where=where)


def staged_order(name: str, table: TargetTable) -> sql.Composed:
    """Each staged row's sequence number, whether it is a delete, its LSN and key as text."""
    key = sql.SQL(", ").join(sql.SQL("{}").format(_ident(table.columns[i])) for i in table.key)
    return sql.SQL("SELECT {seq}, {op} IN ('D', 'M'), {lsn}::text, concat_ws(', ', {key}) "
                   "FROM {stage}").format(
        seq=SEQ, op=OP, lsn=LSN, key=key, stage=_ident(name))


def index_stage(name: str) -> sql.Composed:
    return sql.SQL("CREATE INDEX {} ON {} ({})").format(_ident(f"{name}_seq"), _ident(name), SEQ)


def drop_stage_index(name: str) -> sql.Composed:
    return sql.SQL("DROP INDEX {}").format(_ident(f"{name}_seq"))


def seq_between(alias: str) -> sql.Composed:
    """The staged rows of a run of consecutive changes: parameters first and last sequence."""
    return sql.SQL(" AND {}.{} BETWEEN %s AND %s").format(_ident(alias), SEQ)


def only_seq() -> sql.Composed:
    return sql.SQL(" AND s.{} = %s").format(SEQ)


def truncate(tables: list[TargetTable]) -> sql.Composed:
    return sql.SQL("TRUNCATE {}").format(sql.SQL(", ").join(_target(t) for t in tables))


def record_dead_letter(name: str, table: TargetTable, relation: Relation, seq: int,
                       error: str) -> sql.Composed:
    """Copy the staged change ``seq`` into ``cdcsync.dead_letters``.

    Values stay text and are never cast, so a change whose values the target cannot parse is
    still recorded; columns the source left unchanged (TOAST) are left out of the row.
    """
    def as_object(columns: list[str]) -> sql.Composed:
        return sql.SQL("jsonb_object(ARRAY[{}]::text[], ARRAY[{}]::text[])").format(
            sql.SQL(", ").join(sql.Literal(c) for c in columns),
            sql.SQL(", ").join(sql.SQL("s.{}::text").format(_ident(c)) for c in columns))

    names = sql.SQL(", ").join(sql.Literal(c) for c in relation.column_names)
    return sql.SQL(
        "INSERT INTO cdcsync.dead_letters "
        "(table_name, key, operation, row_data, error, source_lsn, commit_time) "
        "SELECT {table}, {key}, CASE s.{op} WHEN 'I' THEN 'insert' WHEN 'U' THEN 'update' "
        "ELSE 'delete' END, {row} - ARRAY(SELECT u.n FROM unnest(ARRAY[{names}]::text[]) "
        "WITH ORDINALITY AS u(n, i) WHERE substr(s.{u}, u.i::int, 1) = '1'), {error}, s.{lsn}, "
        "s.{commit_time} FROM {stage} s WHERE s.{seq} = {value}"
    ).format(table=sql.Literal(table.source_name),
             key=as_object([table.columns[i] for i in table.key]), op=OP,
             row=as_object(list(table.columns)), names=names, u=UNCHANGED,
             error=sql.Literal(error), lsn=LSN, commit_time=COMMIT_TIME, stage=_ident(name),
             seq=SEQ, value=sql.Literal(seq))


def add_column(table: TargetTable, column: str, type_name: str) -> sql.Composed:
    """A column new on the source, nullable and without a default, so adding it is instant."""
    return sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
        _target(table), _ident(column), sql.SQL(type_name))
