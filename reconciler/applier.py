"""Apply what was reviewed, or nothing: the work of `reconciler deviations apply` (ops/deviations.py
selects the rows and reports; review.py holds the statements).

The plugin checks nothing when it applies (plugin-api.md §5.3, §8.4: `before` is not compared, the
last writer wins, a create that collides binds to the existing object without storing its fields),
so staleness is ours to detect. For each batch of rows:

1. claim them (review.claim): leased to this run and committed before the plugin is asked, so no
   worker, other apply or ignore acts on them meanwhile; rows someone else holds are skipped;
2. plan them again, in the branch each was planned in (bulk-plan/, read-only): a row whose fresh
   plan makes other changes than its reviewed one is stale, and stays OPEN with the fresh plan (the
   reviewed one is kept for audit, among the KEEP_CHANGE_SETS); one with nothing left to do is
   NO_CHANGES; one that no longer plans is FAILED, as a worker would record it;
3. apply the reviewed change sets of the others (bulk-apply/, or apply-change-set/ before plugin
   1.12) and record each outcome (`Outcome`): APPLIED; FAILED when the plugin refused it; an apply
   whose answer was lost (timeout, 5xx) is never sent again: the row waits until NetBox can no
   longer be working on it, then a worker plans it afresh; an apply where a create bound to an
   existing object without storing its fields (often a site or role another row of the same batch
   just created) is planned again at once: APPLIED if nothing is left, else OPEN with what is.

Rows the plugin could not be asked about, or whose apply it rolled back (a deadlock), go back to
OPEN unchanged. The outcomes are written in one transaction, retried through a Postgres outage
while the lease lasts (what NetBox did must not be lost); if they cannot be, the rows return to
QUEUED after their lease, with answer_lost_at, and are planned afresh, never applied again.

The decisions (`judge_fresh_plan`, `judge_apply`, `judge_what_is_left`) are pure functions.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

from . import outcomes, review, states
from .changesets import dropped_fields, same_changes
from .claims import Claimed, Decision
from .db import Database
from .errors import ContentRejected, DatabaseError
from .outcomes import RetryPolicy
from .plugin import AnswerLost, InDoubt, Item, PluginClient, Result, Unavailable
from .review import Outcome, Reviewed
from .settings import claim_lease_seconds, lease_budget_seconds

log = logging.getLogger(__name__)

RECORD_RETRY_SECONDS = 2.0


@dataclass
class Report:
    """What one batch came to."""

    outcomes: list[Outcome] = field(default_factory=list)  # recorded
    untouched: dict[int, str] = field(default_factory=dict)  # claimed, given back OPEN: why
    busy: list[int] = field(default_factory=list)  # not OPEN any more, planned again, or held by someone else
    lost: list[int] = field(default_factory=list)  # claimed, but the lease ran out before the outcome was written
    unrecorded: str | None = None  # why the outcomes could not be written: the rows return after their lease


class Applier:
    def __init__(self, config, db: Database, plugin: PluginClient, owner: str, operator: str) -> None:
        self.db, self.plugin, self.owner, self.operator = db, plugin, owner, operator
        self.lease = claim_lease_seconds(config)
        self.budget = lease_budget_seconds(config.workers)
        self.retry = RetryPolicy.of(config.workers)

    def apply(self, reviewed: dict[int, int | None]) -> Report:
        """Claim, plan again, apply and record one batch: {row id: the change set id reviewed, or None
        for whichever is the row's latest}. A row planned again since is left alone (busy)."""
        started = time.monotonic()
        deadline = started + self.budget  # read before the claim, so it errs early
        claimed = review.claim(self.db, self.owner, reviewed, self.lease)
        report = Report(busy=sorted(set(reviewed) - {r.row.id for r in claimed}))
        for scope in sorted({r.branch_scope for r in claimed}):
            self._apply_in_branch([r for r in claimed if r.branch_scope == scope], deadline, report)
        if report.outcomes or report.untouched:
            self._record(report, lease_ends=started + self.lease)
        return report

    def _record(self, report: Report, lease_ends: float) -> None:
        """Write the batch's outcomes. An outage is waited out while the lease lasts (NetBox's part is done
        and must not be lost); content Postgres refuses costs the change sets, not the outcomes."""
        stripped = False
        while True:
            try:
                written, released = review.record(self.db, self.owner, report.outcomes, report.untouched,
                                                  self.operator)
                break
            except ContentRejected as exc:
                if stripped:
                    report.unrecorded = str(exc)
                    return
                log.error("Postgres refused the outcome of a batch (%s); recording it without change sets", exc)
                report.outcomes = [replace(o, decision=outcomes.unstorable(o.decision, str(exc)))
                                   if o.decision.change_set is not None else o for o in report.outcomes]
                stripped = True
            except DatabaseError as exc:
                if time.monotonic() + RECORD_RETRY_SECONDS >= lease_ends or \
                        not self.plugin.pacer.pause(RECORD_RETRY_SECONDS):
                    report.unrecorded = str(exc)
                    return
                log.warning("cannot record the outcome of %d rows, will retry: %s",
                            len(report.outcomes) + len(report.untouched), exc)
        report.lost = sorted({o.reviewed.row.id for o in report.outcomes} - written
                             | set(report.untouched) - released)
        report.outcomes = [o for o in report.outcomes if o.reviewed.row.id in written]
        report.untouched = {row_id: why for row_id, why in report.untouched.items() if row_id in released}

    def _apply_in_branch(self, claimed: list[Reviewed], deadline: float, report: Report) -> None:
        entities, failed = outcomes.entities([r.row for r in claimed])
        by_id = {r.row.id: r for r in claimed}
        report.outcomes += [Outcome(by_id[d.row_id], review.PLAN_FAILED, d, detail=_error_detail(d)) for d in failed]
        planned = [r for r in claimed if r.row.id in entities and r.change_set["changes"]]
        report.untouched.update((r.row.id, "it has no stored plan to apply") for r in claimed
                                if r.row.id in entities and not r.change_set["changes"])
        if not planned:
            return
        branch_id = planned[0].branch_id
        try:
            fresh = self._plan_again([r.row for r in planned], entities, branch_id, deadline)
        except Unavailable as exc:
            report.untouched.update((r.row.id, f"could not plan it again to check it: {exc}") for r in planned)
            return
        now = time.time()
        current = []
        for reviewed in planned:
            result = fresh.get(reviewed.row.id)
            if result is not None and result.unavailable:
                report.untouched[reviewed.row.id] = f"could not plan it again to check it: {result.unavailable}"
                continue
            decision = outcomes.decide(reviewed.row, result, False, entities[reviewed.row.id], branch_id,
                                       self.retry, now)
            judged = judge_fresh_plan(reviewed, decision, result)
            if judged is None:
                current.append(reviewed)
            else:
                report.outcomes.append(judged)
        if current:
            self._send(current, entities, branch_id, deadline, report)

    def _send(self, current: list[Reviewed], entities: dict[int, dict], branch_id: str | None, deadline: float,
              report: Report) -> None:
        try:
            results = self.plugin.apply({r.row.id: r.change_set for r in current}, branch_id, deadline)
        except InDoubt as exc:
            log.warning("no answer to the apply of %d change sets: %s", len(current), exc)
            results = {r.row.id: Result(r.row.id, unavailable=str(exc), answer_lost=True, running_until=exc.until)
                       for r in current}
        except AnswerLost as exc:
            results = {r.row.id: Result(r.row.id, unavailable=str(exc), answer_lost=True) for r in current}
        except Unavailable as exc:
            results = {r.row.id: Result(r.row.id, unavailable=str(exc), sent=False) for r in current}
        now = time.time()
        partly = []
        for reviewed in current:
            judged = judge_apply(reviewed, results.get(reviewed.row.id), self.retry, now)
            if isinstance(judged, str):
                report.untouched[reviewed.row.id] = judged
            elif judged.outcome == review.APPLIED_PARTLY:
                partly.append(judged)
            else:
                report.outcomes.append(judged)
        if partly:
            report.outcomes += self._plan_what_is_left(partly, entities, branch_id, deadline)

    def _plan_again(self, rows: list[Claimed], entities: dict[int, dict], branch_id: str | None,
                    deadline: float) -> dict[int, Result]:
        """A fresh plan of each row (bulk-plan/: it reads, never writes)."""
        return self.plugin.plan([Item(row.id, row.object_type, entities[row.id]) for row in rows], branch_id, deadline)

    def _plan_what_is_left(self, partly: list[Outcome], entities: dict[int, dict], branch_id: str | None,
                           deadline: float) -> list[Outcome]:
        """Rows applied with fields NetBox did not store, planned again while still claimed. If the plugin
        cannot be asked now, they stay QUEUED, for a worker to plan."""
        rows = [o.reviewed.row for o in partly]
        try:
            fresh = self._plan_again(rows, entities, branch_id, deadline)
        except Unavailable as exc:
            log.warning("could not plan %d partly applied rows again (%s); a worker will", len(rows), exc)
            return partly
        now = time.time()
        return [judge_what_is_left(o, outcomes.decide(o.reviewed.row, fresh.get(o.reviewed.row.id), False,
                                                      entities[o.reviewed.row.id], branch_id, self.retry, now))
                for o in partly]


# --- the decisions ---


def judge_fresh_plan(reviewed: Reviewed, decision: Decision, result: Result | None) -> Outcome | None:
    """What a fresh plan says of a reviewed row: None when it makes the reviewed changes (apply them),
    else the outcome to record: stale (OPEN with the fresh plan), already in NetBox, or plan failed."""
    if decision.state == states.OPEN:
        assert result is not None and result.change_set is not None  # OPEN: the plugin planned changes
        if same_changes(reviewed.change_set["changes"], result.change_set.get("changes") or []):
            return None
        return Outcome(reviewed, review.STALE, decision, detail={"fresh_changes": len(result.change_set["changes"])})
    if decision.state == states.NO_CHANGES:
        return Outcome(reviewed, review.ALREADY_IN_NETBOX, decision)
    return Outcome(reviewed, review.PLAN_FAILED, decision, detail=_error_detail(decision))


def judge_apply(reviewed: Reviewed, result: Result | None, retry: RetryPolicy, now: float) -> Outcome | str:
    """What the plugin's answer to an apply means for the row: an outcome to record, or why the row goes
    back OPEN unchanged (the apply surely did not happen). `now`: time.time()."""
    row = reviewed.row
    if result is None:
        result = Result(row.id, unavailable="the plugin answered without a result for it", answer_lost=True)
    if result.running_until is not None:
        decision = outcomes.in_doubt(row, str(result.unavailable), result.running_until - now, 1, retry)
        return Outcome(reviewed, review.NO_ANSWER, decision, detail=_error_detail(decision))
    if result.unavailable:
        if not result.answer_lost:
            return f"the plugin could not be asked: {result.unavailable}"
        decision = outcomes.unavailable(row, f"the apply's answer was lost, so it is not sent again: "
                                             f"{result.unavailable}", retry, answer_lost=True)
        return Outcome(reviewed, review.NO_ANSWER, decision, detail=_error_detail(decision))
    if result.apply_transient:
        failure = outcomes.plugin_error("apply", result.apply_errors)
        return f"NetBox's database rolled the apply back ({failure['message']}); apply it again"
    if result.apply_errors:
        decision = Decision(row.id, states.FAILED, outcomes.plugin_error("apply", result.apply_errors))
        return Outcome(reviewed, review.APPLY_FAILED, decision, detail=_error_detail(decision))
    dropped = dropped_fields(result.warnings)
    if dropped:
        failure = outcomes.error("applied, but NetBox already had objects it creates, and kept their fields as they "
                                 "were; planned again to show what is left", "ERR_APPLY_FIELDS_NOT_STORED", dropped)
        decision = Decision(row.id, states.QUEUED, failure)
        return Outcome(reviewed, review.APPLIED_PARTLY, decision, apply_warnings=result.warnings,
                       detail={"not_stored": dropped})
    return Outcome(reviewed, review.APPLIED, Decision(row.id, states.APPLIED), apply_warnings=result.warnings)


def judge_what_is_left(partly: Outcome, fresh: Decision) -> Outcome:
    """A partly applied row, planned again: nothing left to do means NetBox already had what was not
    stored (typically a shared object the same batch created for another row): APPLIED. Changes left
    are for review: OPEN with the fresh plan. Otherwise it stays QUEUED, to be planned by a worker."""
    if fresh.state == states.NO_CHANGES:
        return Outcome(partly.reviewed, review.APPLIED, Decision(fresh.row_id, states.APPLIED),
                       apply_warnings=partly.apply_warnings, detail=partly.detail)
    if fresh.state == states.OPEN:
        return Outcome(partly.reviewed, review.APPLIED_PARTLY, fresh, apply_warnings=partly.apply_warnings,
                       detail=partly.detail)
    return partly


def _error_detail(decision: Decision) -> dict:
    return {"error": decision.error} if decision.error else {}
