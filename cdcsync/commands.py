"""The ``cdcsync`` command: parse, load settings once, call into the package, print, exit code.

Each command imports its own modules when it runs: importing all of them (the daemon, Sentry,
the scheduler, the verifier) made every start of every command a few hundred ms slower, and a
scheduled `cdcsync verify` or `status` pays that each time. They are imported through
:func:`coldstart.load`, which then turns the garbage collector back on.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson
import psycopg

from cdcsync import __version__, coldstart
from cdcsync.config_file import config_path
from cdcsync.dsn import redact
from cdcsync.errors import CdcsyncError
from cdcsync.logs import configure, event

if TYPE_CHECKING:
    from cdcsync.config import Settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdcsync", description=__doc__)
    parser.add_argument("--version", action="version", version=f"cdcsync {__version__}")
    parser.add_argument("--config", metavar="PATH",
                        help="TOML configuration (default: $CDCSYNC_CONFIG)")
    parser.add_argument("--debug", action="store_true", help="tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("check", help="verify every prerequisite on both sides; changes nothing")
    setup = commands.add_parser("setup", help="create publication, slot and target metadata")
    setup.add_argument("--create-tables", action="store_true",
                       help="create missing target tables from the source catalog")
    commands.add_parser("run", help="stream changes until SIGTERM or SIGINT")
    resync = commands.add_parser("resync", help="re-copy a table while streaming goes on")
    resync.add_argument("table", metavar="TABLE", help="the source table, schema.table")
    resync.add_argument("--where", metavar="SQL",
                        help="copy only the rows matching this condition (source columns)")
    resync.add_argument("--dry-run", action="store_true",
                        help="only say how many rows would be copied")
    status = commands.add_parser("status", help="checkpoint, slot and lag")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    teardown = commands.add_parser("teardown", help="drop the slot and the publication")
    teardown.add_argument("--yes", action="store_true", help="confirm")
    _dead_letter_parser(commands)
    verify = commands.add_parser("verify", help="compare source and target rows; exit 1 if "
                                 "they differ")
    verify.add_argument("--table", action="append", default=[], metavar="SCHEMA.TABLE",
                        help="a configured source table to verify (repeatable; default: all)")
    verify.add_argument("--json", action="store_true", help="machine-readable report")
    verify.add_argument("--repair", action="store_true",
                        help="re-copy exactly the differing keys (online), then check them")
    demo = commands.add_parser("demo", help="two throwaway clusters, a live workload, the sync")
    demo.add_argument("--seconds", type=float, default=20.0, help="how long the workload runs")
    demo.add_argument("--rate", type=int, default=2000, help="changes per second to generate")
    return parser


def _dead_letter_parser(commands: Any) -> None:
    letters = commands.add_parser("dead-letters", help="changes the target rejected")
    actions = letters.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="show them, oldest first")
    listing.add_argument("--table", help="only this source table (schema.table)")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    for name, verb in (("retry", "apply them again, with the usual conflict rule"),
                       ("discard", "delete them")):
        action = actions.add_parser(name, help=verb)
        action.add_argument("ids", nargs="*", type=int, metavar="ID")
        action.add_argument("--all", action="store_true", help="every dead letter")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except CdcsyncError as exc:
        if args.debug:
            logging.getLogger("cdcsync").exception("failed")
        print(f"cdcsync: {redact(str(exc))}", file=sys.stderr)
        # verify's exit code 1 means "the tables differ"; failing to decide is 2, always.
        return 2 if args.command == "verify" else exc.exit_code
    except psycopg.Error as exc:
        # A database refusal no module translated: still one line, the database's own words.
        if args.debug:
            logging.getLogger("cdcsync").exception("failed")
        detail = " ".join(str(exc).split()) or type(exc).__name__
        print(f"cdcsync: the database refused: {redact(detail)} — fix: correct what it names, "
              "then run the command again (--debug shows where it happened)", file=sys.stderr)
        return 2 if args.command == "verify" else 1
    except KeyboardInterrupt:
        return 130


def _settings(args: argparse.Namespace) -> Settings:
    from cdcsync.config import load_settings  # noqa: PLC0415 (see _run)

    settings = load_settings(config_path(args.config))
    configure("debug" if args.debug else settings.log.level, settings.log.format)
    return settings


# What each command imports when it runs (the others: cdcsync.admin).
_MODULES = {
    "demo": ("cdcsync.demo",),
    "run": ("cdcsync.daemon", "cdcsync.notify"),
    "resync": ("cdcsync.backfill.operator",),
    "verify": ("cdcsync.verify.command",),
    "dead-letters": ("cdcsync.admin", "cdcsync.dead_letters"),
}


def _run(args: argparse.Namespace) -> int:
    """``cdcsync run``: the slot's stream opens and the target is asked its first question as
    soon as the configuration file is read, while pydantic, the settings and the daemon's own
    modules load (see :mod:`cdcsync.source.early` and :mod:`cdcsync.target_ahead`)."""
    coldstart.load("cdcsync.source.early", "cdcsync.target_ahead", resume=False)
    from cdcsync.source.early import EarlyStream  # noqa: PLC0415
    from cdcsync.target_ahead import TargetAhead  # noqa: PLC0415

    path = config_path(args.config)
    early = EarlyStream.open_unvalidated(path)
    ahead = TargetAhead.open_unvalidated(path)
    try:
        coldstart.load("cdcsync.config", resume=False)
        settings = _settings(args)
        if early is None or not early.serves(settings):
            if early is not None:
                early.close()
            early = EarlyStream.open(settings)
        coldstart.load(*_MODULES["run"])
        from cdcsync import daemon  # noqa: PLC0415
        from cdcsync.notify import Notifier  # noqa: PLC0415

        daemon.run(settings, notifier=Notifier.from_environ(os.environ), early=early,
                   ahead=ahead)
    finally:
        if early is not None:
            early.close()
        if ahead is not None:
            ahead.close()
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        return _run(args)
    coldstart.load("cdcsync.config", *_MODULES.get(args.command, ("cdcsync.admin",)))
    if args.command == "demo":
        from cdcsync import demo  # noqa: PLC0415 (see the module docstring)

        configure("debug" if args.debug else "warning", "text")
        return int(demo.run_demo(seconds=args.seconds, rate=args.rate))
    settings = _settings(args)
    if args.command == "resync":
        from cdcsync.backfill import operator  # noqa: PLC0415

        outcome = operator.resync_table(settings, args.table, args.where, dry_run=args.dry_run)
        if outcome.dry_run:
            print(f"would copy {outcome.rows} rows of {outcome.table}")
        else:
            print(f"resynced {outcome.table}: {outcome.rows} rows copied by "
                  f"{outcome.performed_by}")
        return 0
    if args.command == "verify":
        from cdcsync.verify import command as verify_command  # noqa: PLC0415

        return verify_command.main(settings, args.table, args.json, repair=args.repair)
    return _admin(settings, args)


def _admin(settings: Settings, args: argparse.Namespace) -> int:
    from cdcsync import admin  # noqa: PLC0415

    if args.command == "check":
        report = admin.check(settings)
        for status, what, detail in report.lines:
            print(f"{status:4}  {what}: {redact(detail)}" if detail else f"{status:4}  {what}")
        return 0 if report.ok else 1
    if args.command == "setup":
        for line in admin.setup(settings, create_tables=args.create_tables):
            print(line)
        return 0
    if args.command == "status":
        result = admin.status(settings)
        if args.json:
            print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
        else:
            _print_status(result)
        return 0
    if args.command == "dead-letters":
        return _dead_letters(settings, args)
    if args.command == "teardown":
        if not args.yes:
            print("cdcsync: teardown drops the slot and the publication; add --yes to confirm",
                  file=sys.stderr)
            return 2
        for line in admin.teardown(settings):
            print(line)
        event(logging.INFO, "teardown", slot=settings.source.slot)
        return 0
    raise AssertionError(args.command)


def _print_status(result: dict[str, Any]) -> None:
    for key, value in result.items():
        if key == "tables":
            for name, table in value.items():
                problem = (f": {table['reason']} (fix: {table['fix']})"
                           if table["state"] == "error" else "")
                print(f"{'table ' + name:26} {table['state']}, "
                      f"{table['rows_copied']:,} rows copied{problem}")
        elif key == "open_resyncs":
            for r in value:
                print(f"{'resync ' + str(r['id']):26} {r['table']} {r['state']}, "
                      f"{r['rows_copied']:,} of ~{r['rows_estimate'] or 0:,} rows")
        elif key == "failed_resyncs":
            for r in value:
                print(f"{'resync ' + str(r['id']):26} {r['table']} failed at "
                      f"{r['finished_at']}: {r['error']}")
        else:
            print(f"{key:26} {value}")
def _dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    from cdcsync import admin, dead_letters  # noqa: PLC0415

    with admin.connect(settings.target.dsn.get_secret_value(), "target") as conn:
        if args.action == "list":
            letters = dead_letters.fetch(conn, table=args.table)
            if args.json:
                print(orjson.dumps([d.as_dict() for d in letters],
                                   option=orjson.OPT_INDENT_2).decode())
                return 0
            for d in letters:
                print(f"{d.id}  {d.recorded_at:%Y-%m-%d %H:%M:%S%z}  {d.table}  {d.operation}  "
                      f"key {orjson.dumps(d.key).decode()}  LSN {d.lsn}  {d.error}")
            return 0
        if args.action == "discard":
            count = dead_letters.discard(conn, args.ids, everything=args.all)
            print(f"discarded {count} dead letter(s)")
            return 0
        conn.autocommit = False
        outcome = dead_letters.retry(conn, settings, args.ids, everything=args.all)
        print(f"retried {outcome.retried} dead letter(s): "
              f"{outcome.retried - outcome.failed_again} applied, "
              f"{outcome.failed_again} rejected again (see `cdcsync dead-letters list`)")
        return 1 if outcome.failed_again else 0

