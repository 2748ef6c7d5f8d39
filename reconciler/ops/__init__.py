"""The operator commands' place on the command line: `status`, `retry`, `dead-letters`, `show`.

Each command lives in a module of its own (status.py, retry.py, deadletters.py, show.py); this
one only declares their arguments, so cli.py gains one line. Every command takes the same settings
(-c/--config, environment) as `reconciler run`, since it must look at the same database and stream.
"""

from __future__ import annotations

import argparse

from . import deadletters, retry, show, status
from .console import duration


def add_commands(commands, parent: argparse.ArgumentParser) -> None:
    """Add the operator commands to `reconciler`'s subparsers; `parent` carries the settings flags."""
    _add_status(commands, parent)
    _add_retry(commands, parent)
    _add_dead_letters(commands, parent)
    _add_show(commands, parent)


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object, for scripts")


def _dry_run_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="print what would change, change nothing")


def _add_status(commands, parent) -> None:
    parser = commands.add_parser(
        "status", parents=[parent], help="rows per state, leases, retries, stream lag, dead letters, branch, processes",
        description="What the reconciler is doing: the inbox by state, the oldest QUEUED row, rows in flight and "
                    "expired leases, PENDING_RETRY rows due soon, the stream and its consumer group, dead letters, "
                    "the plugin's default branch and the live processes. A part that cannot be read says why; the "
                    "exit code is 4 only when Postgres cannot be reached.")
    _json_flag(parser)
    parser.set_defaults(handler=status.cmd_status)


def _add_retry(commands, parent) -> None:
    parser = commands.add_parser(
        "retry", parents=[parent], help="send FAILED / ERRORED rows back to QUEUED",
        description="Send FAILED and ERRORED rows back to QUEUED for the workers to plan again (attempts, lease, "
                    "due time and error cleared). Only the current row of each entity is requeued. Ages count from "
                    "when the row last changed, i.e. when it failed.")
    parser.add_argument("--state", action="append", choices=sorted(retry.STATE_CHOICES),
                        help="only rows in this state (repeatable; default: failed and errored)")
    parser.add_argument("--object-type", metavar="TYPE", help="only rows of this NetBox object type, e.g. dcim.device")
    parser.add_argument("--older-than", type=duration, metavar="AGE", help="only rows that failed before AGE ago "
                                                                           "(90s, 15m, 1h, 2d)")
    parser.add_argument("--newer-than", type=duration, metavar="AGE", help="only rows that failed within AGE")
    _dry_run_flag(parser)
    _json_flag(parser)
    parser.set_defaults(handler=retry.cmd_retry)


def _add_dead_letters(commands, parent) -> None:
    parser = commands.add_parser("dead-letters", help="list, show, replay or purge dead letters",
                                 description="Stream input that could not become rows.")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", parents=[parent], help="id, stream id, reason, time and size of each")
    listing.add_argument("--limit", type=int, default=50, help="show at most this many, oldest first (0: all)")
    _json_flag(listing)
    listing.set_defaults(handler=deadletters.cmd_list)
    show = actions.add_parser("show", parents=[parent], help="one dead letter: reason, fields, decoded payload")
    show.add_argument("id", type=int)
    _json_flag(show)
    show.set_defaults(handler=deadletters.cmd_show)
    replay = actions.add_parser("replay", parents=[parent], help="put dead letters back into the stream",
                                description="XADD each dead letter's stream fields to the stream again, for the "
                                            "consumer to take in as new input, and delete it once that succeeded.")
    _selection_args(replay, older_than=False)
    replay.set_defaults(handler=deadletters.cmd_replay)
    purge = actions.add_parser("purge", parents=[parent], help="delete dead letters")
    _selection_args(purge, older_than=True)
    purge.set_defaults(handler=deadletters.cmd_purge)


def _selection_args(parser: argparse.ArgumentParser, older_than: bool) -> None:
    parser.add_argument("ids", nargs="*", type=int, metavar="ID", help="dead letters by id")
    parser.add_argument("--all", action="store_true", help="every dead letter")
    if older_than:
        parser.add_argument("--older-than", type=duration, metavar="AGE",
                            help="dead letters stored before AGE ago (90s, 15m, 1h, 2d)")
    _dry_run_flag(parser)
    _json_flag(parser)


def _add_show(commands, parent) -> None:
    parser = commands.add_parser("show", parents=[parent], help="one ingestion log row as JSON, with its change sets",
                                 description="One ingestion_logs row as JSON: its columns, its entity as protojson "
                                             "and its change sets with their changes.")
    parser.add_argument("id", type=int)
    parser.set_defaults(handler=show.cmd_show)
