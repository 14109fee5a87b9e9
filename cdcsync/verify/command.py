"""``cdcsync verify``: select tables, compare each, print the table or JSON, return the exit code.

:func:`verify` is the Python entry point (the CLI and a repair use it), :func:`verify_keys`
checks given keys again (after a repair), and :func:`main` is the command.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TextIO

import orjson

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


def main(settings: Settings, tables: Sequence[str], as_json: bool) -> int:
    """Run the command: 0 in sync, 1 when differences remain (errors raise, exit code 2)."""
    report = verify(settings, tables, _bar(sys.stderr) if sys.stderr.isatty() else None)
    if as_json:
        print(orjson.dumps(report.as_json(), option=orjson.OPT_INDENT_2).decode())
    else:
        print("\n".join(report.lines()))
    return 0 if report.in_sync else 1
