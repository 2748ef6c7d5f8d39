"""Command line: `reconciler run | migrate | check-config [--online] | print-config`, and the operator
commands (`status | retry | dead-letters | show`, reconciler/ops). check-config --online's checks are
preflight.py's."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from functools import partial
from typing import Callable

from . import errors, log as logsetup, ops, preflight, settings
from .db import Database
from .errors import ConfigError, DatabaseError, SchemaError
from .ops import console
from .roles import set_title
from .settings import SETTINGS, Config
from .supervisor import Supervisor

log = logging.getLogger("reconciler")


def _settings_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("-c", "--config", metavar="FILE",
                        help=f"INI file (default: ${settings.CONFIG_PATH_ENV} or {settings.DEFAULT_CONFIG_PATH} "
                             "if present)")
    group = parent.add_argument_group("setting overrides (win over the INI file and the environment)")
    for setting in SETTINGS:
        if setting.flags:
            group.add_argument(*setting.flags, dest=setting.dest, metavar="VALUE", default=None,
                               help=f"{setting.help} [{setting.section}] {setting.key}")
    return parent


def build_parser() -> argparse.ArgumentParser:
    parent = _settings_parent()
    parser = argparse.ArgumentParser(prog="reconciler", description=(
        "Reconcile diode ingest-stream data into NetBox through the diode plugin, via a Postgres inbox."))
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", parents=[parent], help="run the supervisor and its processes",
                              description="Run the supervisor: the stream consumer and the poll workers.")
    run.set_defaults(handler=cmd_run)
    migrate = commands.add_parser("migrate", parents=[parent], help="apply pending database migrations")
    migrate.set_defaults(handler=cmd_migrate)
    check = commands.add_parser("check-config", parents=[parent],
                                help="validate the configuration; exit 0 if valid, 1 otherwise")
    check.add_argument("--online", action="store_true",
                       help="then try Postgres, the schema, Redis, the consumer group, the token endpoint and the "
                            "plugin, one verdict line each, saying what to change; exit 0 only if all pass")
    check.add_argument("--json", action="store_true", help="print the verdicts as a JSON array")
    check.set_defaults(handler=cmd_check_config)
    show = commands.add_parser("print-config", parents=[parent],
                               help="print the effective configuration as INI (secrets masked)")
    show.add_argument("--defaults", action="store_true", help="print every setting with its default, commented")
    show.add_argument("--markdown", action="store_true", help="print the settings table used in README.md")
    show.set_defaults(handler=cmd_print_config)
    ops.add_commands(commands, parent)  # status, retry, dead-letters, show, deviations
    return parser


def load_config(args: argparse.Namespace) -> Config:
    overrides = {s.name: getattr(args, s.dest) for s in SETTINGS
                 if s.flags and getattr(args, s.dest, None) is not None}
    return settings.load(args.config, os.environ, overrides)


def cmd_run(config: Config, args: argparse.Namespace) -> int:
    logsetup.setup(config.log.level, config.log.format)
    try:
        settings.check_runnable(config)
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return errors.RET_CONFIG
    _warn_about(config)
    if config.postgres.migrate_on_start:
        code = _migrate(config)
        if code:
            return code
    set_title("supervisor")
    supervisor = Supervisor(config, reload_config=partial(reload_config, args))
    code = supervisor.run()
    log.info("exit %d: %s", code, errors.EXIT_CODES.get(code, "unknown"))
    return code


def reload_config(args: argparse.Namespace) -> Config:
    """SIGHUP: the INI file and environment read again, command-line flags still winning; refused
    (ConfigError) on the same checks as a start, so a reload cannot run what a start would not."""
    config = load_config(args)
    settings.check_runnable(config)
    _warn_about(config)
    return config


def _warn_about(config: Config) -> None:
    for note in settings.advisories(config):
        log.warning("configuration: %s", note)


def _migrate(config: Config) -> int:
    # The supervisor connects only here, before any fork, and closes the connection again.
    database = Database(config.postgres.dsn, config.postgres.schema, "reconciler migrate")
    try:
        applied = database.migrate()
    except SchemaError as exc:
        log.error("%s", exc)
        return errors.RET_CONFIG
    except DatabaseError as exc:
        log.error("cannot migrate the database: %s", exc)
        return errors.RET_CONNECT
    finally:
        database.close()
    log.info("schema %s is current (%d migrations applied now)", config.postgres.schema, len(applied))
    return errors.RET_OK


def cmd_migrate(config: Config, args: argparse.Namespace) -> int:
    logsetup.setup(config.log.level, config.log.format)
    return _migrate(config)


def cmd_check_config(config: Config, args: argparse.Namespace) -> int:
    try:
        settings.check_runnable(config)
    except ConfigError as exc:
        return _config_refused(args, exc)
    for note in settings.advisories(config):
        print(f"reconciler: warning: {note}", file=sys.stderr)
    where = config.path or "no file (defaults and environment)"
    changed = sum(1 for source in config.sources.values() if source != "default")
    verdicts = [preflight.Verdict("configuration", True, preflight.OK, f"configuration OK: {where}; {changed} of "
                                  f"{len(SETTINGS)} settings differ from their defaults")]
    if args.online:
        verdicts += preflight.run(config)
    if args.json:
        console.print_json([verdict.as_json() for verdict in verdicts])
    elif args.online:
        print("\n".join(preflight.render(verdict) for verdict in verdicts))
    else:
        print(verdicts[0].detail)
    return errors.RET_OK if all(verdict.ok for verdict in verdicts) else 1


def _config_refused(args: argparse.Namespace, exc: ConfigError) -> int:
    """check-config's answer to a configuration that does not validate: exit 1, and with --json the
    verdict too, so a script reads one format whatever failed."""
    print(f"reconciler: configuration error: {exc}", file=sys.stderr)
    if getattr(args, "json", False):
        console.print_json([preflight.Verdict("configuration", False, preflight.CONFIG, str(exc),
                                              "correct the setting named").as_json()])
    return 1


def cmd_print_config(config: Config, args: argparse.Namespace) -> int:
    if args.markdown:
        sys.stdout.write(settings.render_markdown_table())
    elif args.defaults:
        sys.stdout.write(settings.render_ini())
    else:
        sys.stdout.write(settings.render_ini(config))
    return errors.RET_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[Config, argparse.Namespace], int] = args.handler
    try:
        config = load_config(args)
    except ConfigError as exc:
        # check-config promises 0/1 to scripts; everything else uses the systemd exit code contract.
        if handler is cmd_check_config:
            return _config_refused(args, exc)
        print(f"reconciler: configuration error: {exc}", file=sys.stderr)
        return errors.RET_CONFIG
    return handler(config, args)
