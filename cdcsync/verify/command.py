"""``cdcsync verify``: select tables, compare each, print the table or JSON, return the exit code.

:func:`verify` is the Python entry point, :func:`verify_keys` checks given keys again (after a
repair), and :func:`main` is the command; ``--repair`` re-copies exactly the differing keys
through the online resync path.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TextIO

import orjson

from cdcsync.backfill import operator
from cdcsync.config import Settings
from cdcsync.errors import ConfigError
from cdcsync.keyrange import Key
from cdcsync.source import catalog
from cdcsync.source.catalog import SourceTable
from cdcsync.verify.compare import Progress, TableVerifier, verify_table
from cdcsync.verify.report import Differences, VerifyReport
from cdcsync.verify.sides import Sides, open_sides
from cdcsync.verify.spec import table_spec


def verify(settings: Settings, tables: Sequence[str] = (),
           progress: Callable[[str], Progress | None] | None = None) -> VerifyReport:
    """Compare the selected tables (``tables``: source names, default every configured table).

    ``progress(table)`` may return a callback receiving (ranges done, ranges in all).
    """
    report = VerifyReport()
    with open_sides(settings) as sides:
        for table in _chosen(sides, settings, tables):
            spec = table_spec(sides.source, sides.target, settings, table)
            report.tables.append(verify_table(sides, spec, settings.verify,
                                              progress(table.qualified) if progress else None))
    return report


def verify_keys(settings: Settings, table: str, keys: Sequence[Key]) -> Differences:
    """Compare exactly ``keys`` of the source table ``table`` (after a repair, for instance),
    past the changes in flight when a consumer holds the slot; what still differs is returned."""
    with open_sides(settings) as sides:
        source_table = _chosen(sides, settings, [table])[0]
        spec = table_spec(sides.source, sides.target, settings, source_table)
        return TableVerifier(sides, spec, settings.verify).recheck(keys)


def _chosen(sides: Sides, settings: Settings, names: Sequence[str]) -> list[SourceTable]:
    """The configured tables named by ``names`` (source names), or all of them."""
    chosen = sides.on_source(lambda c: catalog.selected_tables(c, settings.tables))
    by_name = {t.qualified: t for t in chosen}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise ConfigError(
            f"--table {', '.join(unknown)}: not among the configured tables",
            fix=f"choose from {', '.join(sorted(by_name)) or '(none)'}")
    return [by_name[n] for n in dict.fromkeys(names)] if names else chosen


def _bar(stream: TextIO) -> Callable[[str], Progress]:
    def for_table(table: str) -> Progress:
        def show(done: int, total: int) -> None:
            filled = 30 * done // max(total, 1)
            stream.write(f"\r{table[:40]:40} [{'#' * filled}{'.' * (30 - filled)}] "
                         f"{done}/{total} ranges")
            if done >= total:
                stream.write("\n")
            stream.flush()
        return show
    return for_table


def main(settings: Settings, tables: Sequence[str], as_json: bool, *,
         repair: bool = False) -> int:
    """Run the command: 0 in sync (or repaired), 1 when differences remain (errors raise, exit
    code 2)."""
    report = verify(settings, tables, _bar(sys.stderr) if sys.stderr.isatty() else None)
    repaired = _repair(settings, report) if repair and not report.in_sync else None
    if as_json:
        body = report.as_json()
        if repaired is not None:
            body["repair"] = {table: {"keys": count, "still_differ": left.count}
                              for table, (count, left) in repaired.items()}
        print(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode())
    else:
        print("\n".join(report.lines()))
        for table, (count, left) in (repaired or {}).items():
            print(f"repaired {table}: {count} keys re-copied, "
                  f"{'in sync' if left.count == 0 else f'{left.count} still differ'}")
    if repaired is not None:
        return 0 if all(left.count == 0 for _, left in repaired.values()) else 1
    return 0 if report.in_sync else 1


def _repair(settings: Settings, report: VerifyReport) -> dict[str, tuple[int, Differences]]:
    """Re-copy exactly the differing keys of each table through the online resync path (which
    also deletes keys the source lacks), then compare those keys again."""
    done: dict[str, tuple[int, Differences]] = {}
    for table in report.tables:
        if table.in_sync:
            continue
        keys = table.keys()
        condition = table.key_condition(keys).as_string(None)
        operator.resync_table(settings, table.source_table, condition, dry_run=False,
                              purpose="repair")
        done[table.source_table] = (len(keys), verify_keys(settings, table.source_table, keys))
    return done
