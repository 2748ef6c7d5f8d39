"""`reconciler deviations list|show|apply|ignore|unignore`: the review loop of plan-only mode.

With `[workers] auto_apply = false` rows end OPEN with a planned change set. These commands let an
operator (or a script, with --json) list them, review one as a diff, apply the reviewed change sets
(applier.py: planned again first, applied only if nothing changed since), or ignore them. The same
filters select rows for `list`, `apply --all` and `ignore --all` (review.Filters). Every apply,
ignore and unignore is recorded with the operator's login name and the time (review.py).

Bad input changes nothing: an unknown id, a row in the wrong state, filters that match nothing, ids
and --all together, and --all without --yes are refused before any row is touched.
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import os
import signal
import socket
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from .. import errors, review, states
from ..applier import Applier, Report
from ..db import Database
from ..errors import DatabaseError
from ..plugin import PluginClient
from ..ratelimit import SharedRateLimiter
from ..review import Filters
from ..settings import Config
from . import console, diff
from .show import row_view

STATE_CHOICES = {"open": (states.OPEN,), "failed": (states.FAILED,), "applied": (states.APPLIED,),
                 "ignored": (states.IGNORED,), "all": tuple(states.NAMES)}
LIST_LIMIT = 50
MARK_BATCH_ROWS = 1000  # ignore and unignore: one short transaction per batch, as `retry` does


def operator_name() -> str:
    """Who runs the command: the login name behind sudo, else this process's user."""
    return os.environ.get("SUDO_USER") or getpass.getuser()


# --- selection ---


def filters_from(args: argparse.Namespace, chosen_states: tuple[int, ...] | None = None) -> Filters:
    if chosen_states is None:
        chosen_states = tuple(sorted({s for name in (args.state or ["open"]) for s in STATE_CHOICES[name]}))
    return Filters(chosen_states, args.type, args.since, args.branch, args.producer, args.name)


def describe(filters: Filters) -> str:
    """The filters in words, for messages."""
    parts = ["state " + "/".join(states.NAMES[s] for s in filters.states)]
    for label, value in (("type", filters.object_type), ("branch", filters.branch),
                         ("producer", filters.producer), ("name", filters.name)):
        if value is not None:
            parts.append(f"{label} {value!r}")
    if filters.since is not None:
        parts.append(f"planned within {console.human_seconds(filters.since)}")
    return ", ".join(parts)


class Refused(Exception):
    """Bad input: the command changes nothing and says why."""


def row_ref(text: str) -> tuple[int, int | None]:
    """`ID` or `ID@CHANGE_SET` (an argparse type): a row, and the change set reviewed if named."""
    row, _, change_set = text.partition("@")
    try:
        return int(row), int(change_set) if change_set else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a row id, or ID@CHANGE_SET as `deviations list` and "
                                         f"`show` print them; got {text!r}") from None


@dataclass(frozen=True)
class Selection:
    """The rows an apply, ignore or unignore acts on: named (with the change set each was reviewed in,
    None when not said), or every row the filters match (`named` None) planned before `started`."""

    named: dict[int, int | None] | None
    filters: Filters
    total: int
    started: datetime.datetime


def select(db: Database, args: argparse.Namespace, allowed: tuple[int, ...], filters: Filters) -> Selection:
    """What the command acts on; Refused when the input is bad, before anything changes."""
    if args.ids and args.all:
        raise Refused("name rows by id or select them with --all and filters, not both")
    started = review.now(db)
    if args.ids:
        if filters.narrowed or args.state:
            raise Refused("filters (--state, --type, --since, --branch, --producer, --name) select rows for --all; "
                          "with ids they would be ignored")
        named: dict[int, int | None] = dict(ref if isinstance(ref, tuple) else (ref, None) for ref in args.ids)
        _check(db, named, allowed)
        return Selection(named, filters, len(named), started)
    if not args.all:
        raise Refused("name the rows by id, or select them with --all and filters (see --help)")
    total = sum(review.tally(db, filters).values())
    if not total:
        raise Refused(f"no rows match ({describe(filters)}); nothing changed")
    if not args.yes and not args.dry_run:
        what = "every row in that state" if not filters.narrowed else "them"
        raise Refused(f"--all matches {total} rows ({describe(filters)}); nothing changed: add --yes to act on "
                      f"{what}, or --dry-run to see them first")
    return Selection(None, filters, total, started)


def _check(db: Database, named: dict[int, int | None], allowed: tuple[int, ...]) -> None:
    ids = sorted(named)
    found = review.targets(db, ids)
    problems = [f"no row {row_id}" for row_id in ids if row_id not in found]
    for row_id in ids:
        target = found.get(row_id)
        if target is None:
            continue
        if target.state not in allowed:
            wanted = " or ".join(states.NAMES[s] for s in allowed)
            problems.append(f"row {row_id} is {states.NAMES.get(target.state, target.state)}, not {wanted}")
        elif target.held:
            problems.append(f"row {row_id} is being worked on (a worker or another apply holds it)")
        elif allowed == (states.IGNORED,) and not target.is_head:
            problems.append(f"row {row_id} is not the current row of its entity (a newer row exists)")
        elif named[row_id] is not None and named[row_id] != target.change_set_id:
            problems.append(f"row {row_id} was planned again since change set {named[row_id]} (its plan is now "
                            f"{target.change_set_id}): review it again")
    if problems:
        raise Refused("; ".join(problems) + "; nothing changed")


def batches(db: Database, selection: Selection, size: int) -> Iterator[dict[int, int | None]]:
    """The rows to act on, `size` at a time, {id: the change set to expect}: the named ones, or the
    newest matching rows first, each visited once (a row an earlier batch left matching is behind the
    cursor), only those planned before the command began, each with the change set listed for it."""
    if selection.named is not None:
        ids = sorted(selection.named)
        for start in range(0, len(ids), size):
            yield {row_id: selection.named[row_id] for row_id in ids[start:start + size]}
        return
    before = None
    while True:
        rows = review.page(db, selection.filters, before=before, limit=size, planned_before=selection.started)
        if not rows:
            return
        yield {row.id: row.change_set_id for row in rows}
        before = rows[-1].id


def refuse(message: str, as_json: bool) -> int:
    """Bad input: said on stderr, and for scripts as {"error": ...} on stdout too."""
    console.fail(message)
    if as_json:
        console.print_json({"error": message})
    return console.RET_FAILED


# --- list ---


def cmd_list(config: Config, args: argparse.Namespace) -> int:
    return console.with_database(config, "deviations list", lambda db: _list(db, args))


def _list(db: Database, args: argparse.Namespace) -> int:
    filters = filters_from(args)
    shown: list[review.Listed] = []  # the last page, for the paging hint

    def pages() -> Iterator[list[review.Listed]]:
        for rows in _pages(db, filters, args.before, args.limit or None):
            shown[:] = rows
            yield rows
    if args.json:
        console.print_json_array(_listed_json(row) for rows in pages() for row in rows)
        return errors.RET_OK
    listed = 0
    for line in console.table_pages(["id", "type", "what", "changes", "age", "branch", "state"], (
            [[row.id, row.object_type, (row.name or "-") + (" (warnings)" if row.warned else ""),
              _change_counts(row.changes), console.human_seconds(row.age_seconds), _branch(row.branch),
              states.NAMES.get(row.state, str(row.state))] for row in rows] for rows in pages())):
        print(line)
        listed += 1
    if not listed:
        print(f"no rows match ({describe(filters)})" + (f" below id {args.before}" if args.before else ""))
        return errors.RET_OK
    counts = review.tally(db, filters)
    total = sum(counts.values())
    print(f"\n{total} matching rows ({describe(filters)}):")
    print(console.table(["state", "type", "rows"], [[states.NAMES.get(state, str(state)), object_type, n]
                                                    for (state, object_type), n in sorted(counts.items())]))
    shown_rows = listed - 1  # less the header line
    if args.limit and shown_rows == args.limit and shown[-1].id > 1:
        print(f"\nshowing {shown_rows}; the next page: add --before {shown[-1].id}")
    return errors.RET_OK


LIST_PAGE = 1000  # rows read at a time: a list of every OPEN row is written as it is read, never held whole


def _pages(db: Database, filters: review.Filters, before: int | None,
           limit: int | None) -> Iterator[list[review.Listed]]:
    """The matching rows, newest first, LIST_PAGE at a time: `limit` of them (None: all) below `before`."""
    left = limit
    while left is None or left > 0:
        size = LIST_PAGE if left is None else min(LIST_PAGE, left)
        rows = review.page(db, filters, before=before, limit=size)
        if rows:
            yield rows
        if len(rows) < size:
            return
        before = rows[-1].id
        if left is not None:
            left -= len(rows)


def _listed_json(row: review.Listed) -> dict[str, Any]:
    return {"id": row.id, "state": states.NAMES.get(row.state, str(row.state)), "object_type": row.object_type,
            "name": row.name, "changes": row.changes, "planned_at": row.planned_at,
            "age_seconds": round(row.age_seconds, 3), "branch": row.branch, "producer": row.producer,
            "change_set_id": row.change_set_id, "warnings": row.warned, "current": row.is_head}


def _change_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in counts.items()) or "-"


def _branch(scope: str | None) -> str:
    return "-" if scope is None else scope or "main"


# --- show ---


def cmd_show(config: Config, args: argparse.Namespace) -> int:
    return console.with_database(config, "deviations show", lambda db: _show(db, args))


def _show(db: Database, args: argparse.Namespace) -> int:
    view = row_view(db, args.id)
    if view is None:
        console.fail(f"no row {args.id}")
        return console.RET_FAILED
    change_sets = view.pop("change_sets")
    latest = change_sets[-1] if change_sets else None
    planned = [review.as_sent(change) for change in latest["changes"]] if latest else []
    reviews = review.history(db, args.id)
    if args.json:
        console.print_json({"row": view, "change_set": latest, "diff": diff.as_json(planned),
                            "older_change_sets": len(change_sets) - 1 if change_sets else 0, "reviews": reviews})
        return errors.RET_OK
    colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print(_show_text(view, latest, planned, len(change_sets), reviews, colour))
    return errors.RET_OK


def _show_text(view: dict, latest: dict | None, planned: list[dict], sets: int, reviews: list[dict],
               colour: bool) -> str:
    out = [f"row {view['id']}: {view['object_type']}, {view['state_name']}"
           + ("" if view.get("is_head") else " (a newer row of this entity exists)"),
           f"  producer {view['producer_app_name']} {view['producer_app_version']}, request {view['request_id']}, "
           f"seen {view['duplicate_count'] + 1} times"]
    if view.get("error"):
        out.append(f"  error: {view['error'].get('message')}")
    if latest is None:
        out.append("\nno change set: it was never planned")
    else:
        out.append(f"\nchange set {latest['id']} ({latest['external_id']}): {latest['deviation_name']}, planned "
                   f"{view.get('planned_at') or latest['created_at']} in {_branch(latest['branch_id'] or '')}"
                   + (f"; {sets - 1} older kept" if sets > 1 else ""))
        out.append(diff.render(planned, colour) or "  (no changes)")
        out += _warning_lines(latest)
        if view["state"] == states.OPEN:
            out.append(f"\nto apply this plan and no other: reconciler deviations apply {view['id']}@{latest['id']}")
    out.append("\nentity as sent:")
    out.append(console.indented_json(view["entity"], "  "))
    out.append("\nreviews:" if reviews else "\nreviews: none")
    for entry in reviews:
        why = f" ({entry['reason']})" if entry["reason"] else ""
        out.append(f"  {entry['at']}  {entry['operator']}: {entry['action']} → {entry['outcome']}{why}")
    return "\n".join(out)


def _warning_lines(change_set: dict) -> list[str]:
    lines = []
    for object_type, fields in (change_set.get("plan_warnings") or {}).items():
        for name, messages in (fields.items() if isinstance(fields, dict) else [("", fields)]):
            lines.append(f"  plan warning: {object_type} {name}: {'; '.join(map(str, messages))}")
    for warning in change_set.get("apply_warnings") or []:
        lines.append(f"  apply warning: {warning.get('object_type')} #{warning.get('object_id')}: "
                     f"{warning.get('message')}")
    return (["\nwarnings from the plugin:"] + lines) if lines else []


# --- ignore, unignore ---


def cmd_ignore(config: Config, args: argparse.Namespace) -> int:
    return console.with_database(config, "deviations ignore", lambda db: _mark(db, args, ignoring=True))


def cmd_unignore(config: Config, args: argparse.Namespace) -> int:
    return console.with_database(config, "deviations unignore", lambda db: _mark(db, args, ignoring=False))


def _mark(db: Database, args: argparse.Namespace, ignoring: bool) -> int:
    allowed = review.IGNORABLE if ignoring else (states.IGNORED,)
    chosen = None if ignoring else (states.IGNORED,)
    if ignoring and args.state and not set(filters_from(args).states) <= set(allowed):
        return refuse("ignore acts on OPEN and FAILED rows: --state open or --state failed", args.json)
    try:
        selection = select(db, args, allowed, filters_from(args, chosen))
    except Refused as exc:
        return refuse(str(exc), args.json)
    verb = "ignore" if ignoring else "unignore"
    if args.dry_run:
        return _dry_run(db, selection, verb, args.json)
    operator = operator_name()
    done: list[int] = []
    progress = console.Counter("ignored" if ignoring else "requeued", selection.total)
    try:
        for batch in batches(db, selection, MARK_BATCH_ROWS):
            if ignoring:
                marked = sorted(review.ignore(db, sorted(batch), operator, args.reason))
            else:
                marked = sorted(review.unignore(db, sorted(batch), operator, args.reason))
            done += marked
            progress.add(len(marked))
    finally:
        progress.finish()
    skipped = sorted(set(selection.named) - set(done)) if selection.named is not None else []
    new_state = "IGNORED" if ignoring else "QUEUED"
    if args.json:
        console.print_json({"action": verb, "state": new_state, "ids": done, "skipped": skipped, "operator": operator})
    else:
        print(f"{len(done)} rows now {new_state} (by {operator})" + (f": {_ids(done)}" if done else ""))
        if skipped:
            print(f"{len(skipped)} rows changed meanwhile (a worker or an apply holds them, or they are not the "
                  f"current row of their entity) and were left alone: {_ids(skipped)}")
    return errors.RET_OK if done or not skipped else console.RET_FAILED


def _ids(ids: list[int], shown: int = 20) -> str:
    return ", ".join(map(str, ids[:shown])) + (f" (+{len(ids) - shown} more)" if len(ids) > shown else "")


def _dry_run(db: Database, selection: Selection, verb: str, as_json: bool) -> int:
    filters = selection.filters
    if selection.named is not None:
        filters = Filters(tuple(states.NAMES), ids=tuple(sorted(selection.named)))
    rows = review.page(db, filters, limit=None)
    if as_json:
        console.print_json({"dry_run": True, "action": verb, "rows": [_listed_json(row) for row in rows]})
        return errors.RET_OK
    print(f"dry run: would {verb} {len(rows)} rows (nothing changed):")
    print(console.table(["id", "type", "what", "changes", "state"], [
        [row.id, row.object_type, row.name or "-", _change_counts(row.changes), states.NAMES.get(row.state)]
        for row in rows]))
    return errors.RET_OK


# --- apply ---


class Interruptible:
    """The plugin client's pacer in an operator's shell: Ctrl-C (or SIGTERM) only sets a flag; no new
    request starts after it, the one in flight is waited for and recorded, the rest are given back."""

    def __init__(self) -> None:
        self.stopping = False

    def handle_signals(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._stop)

    def _stop(self, signum, frame) -> None:
        self.stopping = True

    def beat(self) -> None:
        pass

    def pause(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        return not self.stopping

    def in_flight(self, until: float) -> None:
        pass


def apply_owner() -> str:
    """The lease owner of an apply run: host, pid and a token of its own, like a worker's."""
    return f"{socket.gethostname()}:{os.getpid()}:apply:{uuid.uuid4().hex[:12]}"


def cmd_apply(config: Config, args: argparse.Namespace) -> int:
    return console.with_database(config, "deviations apply", lambda db: _apply(config, db, args))


def _apply(config: Config, db: Database, args: argparse.Namespace) -> int:
    if args.state and set(filters_from(args).states) != {states.OPEN}:
        return refuse("apply acts on OPEN rows only", args.json)
    try:
        selection = select(db, args, (states.OPEN,), filters_from(args, (states.OPEN,)))
    except Refused as exc:
        return refuse(str(exc), args.json)
    if args.dry_run:
        return _dry_run(db, selection, "apply", args.json)
    pacer = Interruptible()
    pacer.handle_signals()
    plugin = PluginClient(config.netbox, SharedRateLimiter(config.netbox.rate_limit_per_second,
                                                           config.netbox.rate_limit_burst), pacer=pacer)
    applier = Applier(config, db, plugin, apply_owner(), operator_name())
    reports, failure = _run_batches(applier.apply, batches(db, selection, config.workers.batch_size),
                                    selection.total, pacer)
    return _report_apply(reports, named=selection.named is not None, interrupted=pacer.stopping,
                         failure=failure, as_json=args.json, operator=applier.operator)


def _run_batches(apply_batch: Callable[[dict[int, int | None]], Report], work: Iterator[dict[int, int | None]],
                 total: int, pacer: Interruptible) -> tuple[list[Report], str | None]:
    """The batches' reports, and why the run stopped early if Postgres failed it (what was done is
    reported all the same)."""
    progress = console.Counter("applying: rows done", total)
    reports = []
    try:
        for batch in work:
            if pacer.stopping:
                break
            report = apply_batch(batch)
            reports.append(report)
            progress.add(len(batch))
            if report.unrecorded:
                return reports, f"could not record the outcome of a batch: {report.unrecorded}"
    except DatabaseError as exc:
        return reports, str(exc)
    finally:
        progress.finish()
    return reports, None


def _report_apply(reports: list[Report], named: bool, interrupted: bool, failure: str | None, as_json: bool,
                  operator: str) -> int:
    busy = sorted(row_id for report in reports for row_id in report.busy)
    lost = sorted(row_id for report in reports for row_id in report.lost)
    unrecorded = sorted(o.reviewed.row.id for report in reports if report.unrecorded for o in report.outcomes) + \
        sorted(row_id for report in reports if report.unrecorded for row_id in report.untouched)
    outcomes = [o for report in reports if not report.unrecorded for o in report.outcomes]
    untouched = {row_id: why for report in reports if not report.unrecorded for row_id, why in report.untouched.items()}
    counts = Counter(o.outcome for o in outcomes)
    if untouched:
        counts[review.NOT_APPLIED] += len(untouched)
    attention = [o for o in outcomes if o.outcome not in (review.APPLIED, review.ALREADY_IN_NETBOX)]
    if as_json:
        console.print_json({
            "operator": operator, "interrupted": interrupted, "outcomes": dict(sorted(counts.items())),
            "rows": [{"id": o.reviewed.row.id, "outcome": o.outcome, "state": states.NAMES[o.decision.state],
                      "change_set_id": o.reviewed.change_set_id, **o.detail} for o in outcomes]
            + [{"id": row_id, "outcome": review.NOT_APPLIED, "state": "OPEN", "why": why}
               for row_id, why in sorted(untouched.items())],
            "busy": busy, "lease_lost": lost, "unrecorded": unrecorded, "error": failure})
    else:
        _print_apply(outcomes, counts, untouched, busy, lost, named, interrupted, operator)
        if unrecorded:
            print(f"{len(unrecorded)} rows were claimed but their outcome could not be written: they return to "
                  f"QUEUED after their lease and are planned afresh, never applied again: {_ids(unrecorded)}")
    if failure:
        console.fail(f"deviations apply stopped: {failure}")
    failed = attention or untouched or lost or unrecorded or (named and busy) or interrupted or failure
    return console.RET_FAILED if failed else errors.RET_OK


_OUTCOME_WORDS = {
    review.APPLIED: "applied",
    review.ALREADY_IN_NETBOX: "already as planned in NetBox (NO_CHANGES), nothing to apply",
    review.STALE: "stale: NetBox changed since it was planned; nothing applied, OPEN with a fresh plan to review",
    review.PLAN_FAILED: "no longer plans (FAILED); nothing applied",
    review.APPLY_FAILED: "refused by the plugin (FAILED); nothing of it applied",
    review.NO_ANSWER: "no answer: it may or may not have been applied; it is not sent again, but planned afresh "
                      "once NetBox can no longer be working on it",
    review.APPLIED_PARTLY: "applied, but NetBox already had objects it creates and kept their fields as they were; "
                           "planned again: what is left is OPEN for review (or QUEUED, if the plugin could not be "
                           "asked)",
}


def _print_apply(outcomes, counts: Counter, untouched: dict[int, str], busy: list[int], lost: list[int],
                 named: bool, interrupted: bool, operator: str) -> None:
    for outcome in outcomes:
        if outcome.outcome == review.APPLIED:
            continue
        error = (outcome.decision.error or {}).get("message")
        print(f"row {outcome.reviewed.row.id}: {_OUTCOME_WORDS[outcome.outcome]}" + (f" ({error})" if error else ""))
    for row_id, why in sorted(untouched.items()):
        print(f"row {row_id}: not applied, still OPEN: {why}")
    if busy:
        who = "planned again, changed or held by a worker or another apply meanwhile" if named else \
            "taken by another apply or worker, or planned again meanwhile"
        print(f"{len(busy)} rows left alone, {who}: {_ids(busy)}")
    if lost:
        print(f"{len(lost)} rows outlived this run's lease before their outcome was written; the lease sweep "
              f"returns them to QUEUED, to be planned afresh: {_ids(lost)}")
    summary = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()) if n) or "nothing"
    stop = "; interrupted, the remaining rows were not touched" if interrupted else ""
    print(f"apply by {operator}: {summary}{stop}")
