"""The review loop's side of the inbox: the rows plan-only mode leaves OPEN, as operators list,
apply, ignore and unignore them (`reconciler deviations`, ops/deviations.py). Only this module
names the statements of that protocol.

- `Filters` select rows the same way for `list`, `apply --all` and `ignore --all`; `page` and `tally`
  read them.
- `targets` looks up rows named by id, so that a command refuses bad ids before it changes anything.
- `claim` leases OPEN rows to one apply run, with the workers' discipline (claims.py): committed
  before the plugin is asked, skipped when someone else holds them. `release` gives back those the
  apply did not change; `record` writes the outcome of the others (through claims.write, as a worker
  does) with the apply's warnings and the audit trail, in one transaction.
- `ignore` and `unignore` move rows to IGNORED and back to QUEUED, audited.

Every action an operator takes on a row is written to `reviews` (migration 0011): who, when, why,
what came of it (one of the OUTCOMES below), which change set.
"""

from __future__ import annotations

import datetime
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from . import claims, states
from .claims import Claimed, Decision
from .db import Database
from .text import json_text

# What came of an operator's action on a row: reviews.outcome, and the `outcome` of --json output.
APPLIED = "applied"  # the reviewed change set is in NetBox
APPLIED_PARTLY = "applied_partly"  # applied, but NetBox kept fields of objects it had: OPEN with what is left
STALE = "stale"  # NetBox changed since the review: nothing applied, the row is OPEN with the fresh plan
ALREADY_IN_NETBOX = "already_in_netbox"  # a fresh plan has nothing left to do: NO_CHANGES
PLAN_FAILED = "plan_failed"  # planning again failed: nothing applied, the row is FAILED like a worker's
APPLY_FAILED = "apply_failed"  # the plugin refused the apply (rolled back): FAILED
NO_ANSWER = "no_answer"  # the apply went unanswered: never sent again, planned afresh once NetBox is done
NOT_APPLIED = "not_applied"  # the plugin could not be asked, or rolled the apply back: still OPEN, unchanged
IGNORED = "ignored"
UNIGNORED = "queued"
OUTCOMES = (APPLIED, APPLIED_PARTLY, STALE, ALREADY_IN_NETBOX, PLAN_FAILED, APPLY_FAILED, NO_ANSWER, NOT_APPLIED,
            IGNORED, UNIGNORED)

IGNORABLE = (states.OPEN, states.FAILED)


@dataclass(frozen=True)
class Filters:
    """Which rows an operator asked for. `name` is a pattern on the change set's name, matched anywhere
    in it, `*` and `?` as wildcards; `branch` a branch name or id, or "main"."""

    states: tuple[int, ...] = (states.OPEN,)
    object_type: str | None = None
    since: float | None = None  # seconds: planned within
    branch: str | None = None
    producer: str | None = None
    name: str | None = None
    ids: tuple[int, ...] | None = None  # only these rows (a dry run of named rows)

    @property
    def narrowed(self) -> bool:
        """Whether anything but the state narrows the selection."""
        return any(value is not None for value in (self.object_type, self.since, self.branch, self.producer,
                                                   self.name))

    def params(self) -> dict[str, Any]:
        return {"states": list(self.states), "object_type": self.object_type, "since": self.since,
                "branch": self.branch, "producer": self.producer,
                "name": None if self.name is None else f"%{_like_pattern(self.name)}%",
                "ids": None if self.ids is None else list(self.ids)}


def _like_pattern(glob: str) -> str:
    """A glob as the body of an ILIKE pattern: its own % and _ escaped, * and ? translated."""
    escaped = re.sub(r"([\\%_])", r"\\\1", glob)
    return escaped.replace("*", "%").replace("?", "_")


@dataclass(frozen=True)
class Listed:
    """A row as `deviations list` shows it."""

    id: int
    state: int
    object_type: str
    name: str | None  # its latest change set's name (none if it was never planned)
    branch: str | None  # "<name> (<id>)", "" for main, None if never planned
    producer: str
    planned_at: datetime.datetime
    age_seconds: float
    is_head: bool
    change_set_id: int | None
    changes: dict[str, int]  # by change type, noops left out
    warned: bool  # the plugin left warnings on its latest change set


def page(db: Database, filters: Filters, before: int | None = None, limit: int | None = None,
         planned_before: datetime.datetime | None = None) -> list[Listed]:
    """Matching rows, newest first: `limit` of them (None: all) with ids below `before`, and planned
    before `planned_before` if given (an --all run does not chase what was planned after it began)."""
    rows = db.fetchall("deviations_page", {**filters.params(), "before": before, "limit": limit,
                                           "planned_before": planned_before})
    return [Listed(*row) for row in rows]


def now(db: Database) -> datetime.datetime:
    """Postgres's clock, which planned_at is on."""
    return db.fetchall("database_now")[0][0]


def tally(db: Database, filters: Filters) -> Counter:
    """{(state, object type): rows} of every matching row."""
    return Counter({(state, object_type): count
                    for state, object_type, count in db.fetchall("deviations_tally", filters.params())})


@dataclass(frozen=True)
class Target:
    id: int
    state: int
    is_head: bool
    held: bool  # a worker or an apply holds it under a lease
    change_set_id: int | None  # its latest


def targets(db: Database, ids: list[int]) -> dict[int, Target]:
    """The rows of `ids` that exist, as they are now."""
    return {row[0]: Target(*row) for row in db.fetchall("review_targets", {"ids": ids})}


# --- apply ---


@dataclass(frozen=True)
class Reviewed:
    """An OPEN row claimed for an apply, with the change set last planned for it: the one reviewed."""

    row: Claimed
    branch_scope: str  # where it was planned: "<name> (<id>)", "" for main
    change_set_id: int
    change_set: dict  # as the plugin gave it: {"id", "changes": [...]}, ready to send back to apply

    @property
    def branch_id(self) -> str | None:
        """The X-NetBox-Branch of its plan (and so of its apply)."""
        found = re.search(r"\(([^()]*)\)$", self.branch_scope)
        return found.group(1) if found else None


def claim(db: Database, owner: str, reviewed: dict[int, int | None], lease_seconds: float) -> list[Reviewed]:
    """Lease the rows of `reviewed` ({row id: the change set reviewed, None: its latest}) that are OPEN,
    nobody holds, and were not planned again since; committed before returning."""
    ids = sorted(reviewed)
    with db.transaction() as tx:
        rows = tx.fetchall("claim_for_apply", {"ids": ids, "expected": [reviewed[i] for i in ids], "owner": owner,
                                               "lease_seconds": lease_seconds})
    claimed = []
    for row_id, object_type, entity, branch_scope, answer_lost_at, change_set, changes in sorted(rows):
        row = Claimed(row_id, object_type, bytes(entity), None, 0, answer_lost_at)
        if change_set is None:  # an OPEN row always has its plan; a row without is returned, never applied
            claimed.append(Reviewed(row, branch_scope, 0, {"id": "", "changes": []}))
            continue
        claimed.append(Reviewed(row, branch_scope, change_set["id"],
                                {"id": change_set["external_id"], "changes": [as_sent(c) for c in changes]}))
    return claimed


def as_sent(change: dict) -> dict:
    """A stored change as the plugin planned it (its apply reads these fields)."""
    return {"id": change["external_id"], "change_type": change["change_type"], "object_type": change["object_type"],
            "object_id": change["object_id"], "ref_id": change["ref_id"],
            "object_primary_value": change["object_primary_value"], "before": change["before"] or {},
            "data": change["after"] if change["after"] is not None else {}, "new_refs": change["new_refs"] or []}


@dataclass
class Outcome:
    """What an apply did with one claimed row: the row's decision, and what the audit trail says."""

    reviewed: Reviewed
    outcome: str
    decision: Decision
    apply_warnings: list = field(default_factory=list)  # reported by the apply, on the reviewed change set
    detail: dict = field(default_factory=dict)


def record(db: Database, owner: str, outcomes: list[Outcome], untouched: dict[int, str],
           operator: str) -> tuple[set[int], set[int]]:
    """In one transaction: write the outcomes of the rows this apply still holds, give those it did not
    change (`untouched`: why) back OPEN as they were, and audit it all. Returns (the ids written, the
    ids given back); the others' leases ran out before (the lease sweep has them): their outcomes are
    audited all the same, marked lease_lost, since what happened in NetBox happened."""
    with db.transaction() as tx:
        # Every writer locks rows in id order; the writes below go branch by branch.
        tx.execute("lock_rows", {"ids": sorted({o.reviewed.row.id for o in outcomes} | set(untouched))})
        released = {row_id for row_id, in tx.fetchall("release_apply_claims", {"ids": sorted(untouched),
                                                                             "owner": owner})}
        written: set[int] = set()
        for scope in sorted({o.reviewed.branch_scope for o in outcomes}):
            same = [o for o in outcomes if o.reviewed.branch_scope == scope]
            written |= claims.write(tx, owner, scope, [o.decision for o in same],
                                    planned_before={o.reviewed.row.id for o in same})
        warned = [o for o in outcomes if o.apply_warnings]
        if warned:
            tx.execute("note_apply_warnings", {"ids": [o.reviewed.change_set_id for o in warned],
                                               "warnings": [json_text(o.apply_warnings) for o in warned]})
        _audit(tx, "apply", operator, None,
               [(row_id, None, NOT_APPLIED, {"why": why}) for row_id, why in sorted(untouched.items())
                if row_id in released]
               + [(o.reviewed.row.id, o.reviewed.change_set_id, o.outcome,
                   (o.detail or {}) | ({} if o.reviewed.row.id in written else {"lease_lost": True}) or None)
                  for o in outcomes])
    return written, released


# --- ignore, unignore ---


def ignore(db: Database, ids: list[int], operator: str, reason: str) -> dict[int, int]:
    """IGNORED for those of `ids` that are OPEN or FAILED and nobody holds: {id: the state it had}."""
    with db.transaction() as tx:
        rows = tx.fetchall("ignore_rows", {"ids": ids})
        _audit(tx, "ignore", operator, reason, [(row_id, change_set, IGNORED, None) for row_id, _, change_set in rows])
    return {row_id: state for row_id, state, _ in rows}


def unignore(db: Database, ids: list[int], operator: str, reason: str | None) -> set[int]:
    """QUEUED again for those of `ids` that are IGNORED and the current row of their entity."""
    with db.transaction() as tx:
        rows = tx.fetchall("unignore_rows", {"ids": ids})
        _audit(tx, "unignore", operator, reason, [(row_id, change_set, UNIGNORED, None) for row_id, change_set in rows])
    return {row_id for row_id, _ in rows}


def history(db: Database, row_id: int) -> list[dict[str, Any]]:
    """A row's audit trail, oldest first."""
    names = ("action", "outcome", "operator", "reason", "at", "change_set_id", "detail")
    return [dict(zip(names, row)) for row in db.fetchall("reviews_of_row", {"id": row_id})]


def _audit(tx, action: str, operator: str, reason: str | None,
           entries: list[tuple[int, int | None, str, dict | None]]) -> None:
    if not entries:
        return
    tx.execute("record_reviews", {
        "action": action, "operator": operator, "reason": reason,
        "ids": [row_id for row_id, _, _, _ in entries],
        "change_sets": [change_set for _, change_set, _, _ in entries],
        "outcomes": [outcome for _, _, outcome, _ in entries],
        "details": [json_text(detail) for _, _, _, detail in entries]})
