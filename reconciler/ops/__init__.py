"""The operator commands' place on the command line: `status`, `retry`, `dead-letters`, `show`,
`deviations`, `prune`.

Each command lives in a module of its own (status.py, retry.py, deadletters.py, show.py,
deviations.py, prune.py); this one only declares their arguments, so cli.py gains one line. Every
command takes the same settings (-c/--config, environment) as `reconciler run`, since it must look at
the same database and stream.
"""

from __future__ import annotations

import argparse

from . import deadletters, deviations, prune, retry, show, status
from .console import duration


def add_commands(commands, parent: argparse.ArgumentParser) -> None:
    """Add the operator commands to `reconciler`'s subparsers; `parent` carries the settings flags."""
    _add_status(commands, parent)
    _add_retry(commands, parent)
    _add_dead_letters(commands, parent)
    _add_show(commands, parent)
    _add_deviations(commands, parent)
    _add_prune(commands, parent)


def count(raw: str) -> int:
    """A number of rows, 0 or more (an argparse type)."""
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of rows, 0 or more; got {raw!r}")
    return value


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


def _add_deviations(commands, parent) -> None:
    parser = commands.add_parser(
        "deviations", help="review what plan-only mode leaves OPEN: list, show, apply, ignore, unignore",
        description="With [workers] auto_apply = false, rows end OPEN with a planned change set. List them, review "
                    "one as a diff, apply reviewed change sets (planned again first, applied only if NetBox did not "
                    "change since), ignore them, or send ignored ones back to be planned. Every apply, ignore and "
                    "unignore is recorded with the operator's login name and the time.")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", parents=[parent], help="rows by state, type, age, branch, producer, name",
                                 description="Matching rows, newest first, with the counts by state and type of "
                                             "all of them at the bottom.")
    _deviation_filters(listing, states=True)
    listing.add_argument("--limit", type=count, default=deviations.LIST_LIMIT,
                         help=f"show at most this many (default {deviations.LIST_LIMIT}; 0: all)")
    listing.add_argument("--before", type=int, metavar="ID", help="the next page: rows with ids below ID")
    _json_flag(listing)
    listing.set_defaults(handler=deviations.cmd_list)

    show = actions.add_parser("show", parents=[parent], help="one row's change set as a diff, its entity, warnings "
                                                              "and reviews")
    show.add_argument("id", type=int)
    show.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                      help="colour the diff (auto: on a terminal)")
    _json_flag(show)
    show.set_defaults(handler=deviations.cmd_show)

    apply = actions.add_parser(
        "apply", parents=[parent], help="apply reviewed change sets of OPEN rows",
        description="Apply the change set planned for each OPEN row, in the branch it was planned in. Each row is "
                    "planned again first: if NetBox changed since, so that the plan differs, nothing is applied and "
                    "the row stays OPEN with the fresh plan (stale). An apply whose answer is lost is never sent "
                    "again: the row is planned afresh. Exit 0 when every row was applied (or found already in "
                    "NetBox), 1 otherwise.")
    _row_selection(apply, states=False, reviewed=True)
    apply.set_defaults(handler=deviations.cmd_apply)

    ignore = actions.add_parser("ignore", parents=[parent], help="OPEN or FAILED rows to IGNORED",
                                description="IGNORED rows stay so when the same entity is seen again unchanged "
                                            "(counted); a changed entity becomes a new row.")
    _row_selection(ignore, states=True)
    ignore.add_argument("--reason", required=True, metavar="TEXT", help="why, kept with the row's reviews")
    ignore.set_defaults(handler=deviations.cmd_ignore)

    unignore = actions.add_parser("unignore", parents=[parent], help="IGNORED rows back to QUEUED, to be planned")
    _row_selection(unignore, states=False)
    unignore.add_argument("--reason", metavar="TEXT", help="why, kept with the row's reviews")
    unignore.set_defaults(handler=deviations.cmd_unignore)


def _deviation_filters(parser: argparse.ArgumentParser, states: bool) -> None:
    if states:
        parser.add_argument("--state", action="append", choices=list(deviations.STATE_CHOICES),
                            help="rows in this state (repeatable; default: open)")
    parser.add_argument("--type", metavar="TYPE", help="only rows of this NetBox object type, e.g. dcim.device")
    parser.add_argument("--since", type=duration, metavar="AGE", help="only rows planned within AGE (90s, 15m, 2h, 2d)")
    parser.add_argument("--branch", metavar="BRANCH", help="only rows planned in this branch (name or id; main: none)")
    parser.add_argument("--producer", metavar="APP", help="only rows sent by this producer app")
    parser.add_argument("--name", metavar="PATTERN", help="only rows whose name (e.g. 'Device sw-011-0001 "
                                                          "discovered') contains PATTERN; * and ? are wildcards")


def _row_selection(parser: argparse.ArgumentParser, states: bool, reviewed: bool = False) -> None:
    if reviewed:
        parser.add_argument("ids", nargs="*", type=deviations.row_ref, metavar="ID[@CHANGE_SET]",
                            help="rows by id; ID@CHANGE_SET applies the row only if that change set (the one "
                                 "reviewed, as list and show print it) is still its plan")
    else:
        parser.add_argument("ids", nargs="*", type=int, metavar="ID", help="rows by id")
    parser.add_argument("--all", action="store_true", help="every row the filters match (needs --yes)")
    parser.add_argument("--yes", action="store_true", help="confirm --all")
    _deviation_filters(parser, states)
    if not states:
        parser.set_defaults(state=None)
    _dry_run_flag(parser)
    _json_flag(parser)


def _add_prune(commands, parent) -> None:
    parser = commands.add_parser(
        "prune", parents=[parent], help="delete now what [retention] lets go: superseded rows and plans, dead letters",
        description="One retention walk now, as the service's retention process does every [retention] "
                    "interval_seconds: finished rows that are no longer their entity's current row, change sets a "
                    "newer plan superseded, and dead letters, each once older than its [retention] setting. Current, "
                    "QUEUED, OPEN and in-flight rows are never deleted.")
    _dry_run_flag(parser)
    _json_flag(parser)
    parser.set_defaults(handler=prune.cmd_prune)
