"""The state machine of a claimed row: every row of the Go reconciler's outcome table
(docs/go-reconciler.md), plus retries."""

from __future__ import annotations

import datetime

import pytest

from reconciler import outcomes, states
from reconciler.claims import Claimed
from reconciler.outcomes import RetryPolicy
from reconciler.plugin import Result

from .faultserver import plan_for

NOW = datetime.datetime(2026, 11, 28, tzinfo=datetime.timezone.utc).timestamp()
RETRY = RetryPolicy(max_attempts=3, base_seconds=30, max_seconds=3600)
ENTITY = {"site": {"name": "dc-1", "slug": "dc-1"}}
NOOPS = {"id": "cs", "branch": None, "changes": [{"change_type": "noop", "object_type": "dcim.site", "object_id": 1}]}


def row(requeued_from=None, attempts=1, object_type="dcim.site") -> Claimed:
    return Claimed(7, object_type, b"", requeued_from, attempts)


def decide(result, apply=True, requeued_from=None, attempts=1):
    return outcomes.decide(row(requeued_from, attempts), result, apply, ENTITY, "br1", RETRY, NOW)


def summary(decision):
    return (decision.state, decision.drift_state, decision.error["code"] if decision.error else None,
            decision.change_set is not None and (len(decision.change_set.changes) or "placeholder"))


PLAN_ERROR = Result(7, plan_errors={"dcim.site": {"status": [["'bogus' is not a valid choice."]]}})
CHANGES = Result(7, change_set=plan_for("7", changes=2))
APPLY_ERROR = Result(7, change_set=plan_for("7"), apply_errors={"dcim.site": {"name": ["too long"]}})
DEADLOCK = Result(7, change_set=plan_for("7"), apply_errors={"__all__": ["db_deadlock_after_retries"]},
                  apply_transient=True)


@pytest.mark.parametrize("result, apply, requeued_from, expected", [
    # plan-only
    (None, False, None, (states.FAILED, None, "ERR_OPS_GENERATE_DIFF", "placeholder")),
    (PLAN_ERROR, False, None, (states.FAILED, None, "ERR_OPS_GENERATE_DIFF", "placeholder")),
    (PLAN_ERROR, False, states.APPLIED, (states.APPLIED, None, None, False)),
    (Result(7), False, None, (states.FAILED, None, "ERR_OPS_GENERATE_DIFF", "placeholder")),
    (Result(7, change_set={"id": "x", "changes": []}), False, None, (states.NO_CHANGES, None, None, False)),
    (Result(7, change_set=NOOPS), False, None, (states.NO_CHANGES, None, None, False)),
    (Result(7, change_set=NOOPS), False, states.APPLIED, (states.APPLIED, None, None, False)),
    (CHANGES, False, None, (states.OPEN, None, None, 2)),
    (CHANGES, False, states.FAILED, (states.OPEN, None, None, 2)),
    (CHANGES, False, states.NO_CHANGES, (states.OPEN, None, None, 2)),
    (CHANGES, False, states.APPLIED, (states.APPLIED, states.OPEN, None, 2)),
    # auto-apply
    (None, True, None, (states.FAILED, None, "ERR_OPS_GENERATE_DIFF", "placeholder")),
    (PLAN_ERROR, True, None, (states.FAILED, None, "ERR_OPS_GENERATE_DIFF", "placeholder")),
    (PLAN_ERROR, True, states.APPLIED, (states.APPLIED, None, None, False)),
    (Result(7, change_set=NOOPS), True, None, (states.NO_CHANGES, None, None, False)),
    (Result(7, change_set=NOOPS), True, states.APPLIED, (states.APPLIED, None, None, False)),
    (CHANGES, True, None, (states.APPLIED, None, None, 2)),
    (APPLY_ERROR, True, None, (states.FAILED, None, "ERR_OPS_APPLY_CHANGE_SET", 1)),
    (CHANGES, True, states.APPLIED, (states.APPLIED, states.APPLIED, None, 2)),
    (APPLY_ERROR, True, states.APPLIED, (states.APPLIED, states.FAILED, "ERR_OPS_APPLY_CHANGE_SET", 1)),
    (DEADLOCK, True, None, (states.PENDING_RETRY, None, "ERR_PLUGIN_UNAVAILABLE", False)),
], ids=["plan-only/no-result", "plan-only/plan-error", "plan-only/drift-check-plan-error", "plan-only/no-change-set",
        "plan-only/no-changes", "plan-only/only-noops", "plan-only/drift-check-clean", "plan-only/changes",
        "plan-only/requeued-failed", "plan-only/requeued-no-changes", "plan-only/drift",
        "apply/no-result", "apply/plan-error", "apply/drift-check-plan-error", "apply/no-changes",
        "apply/drift-check-clean", "apply/applied", "apply/apply-error", "apply/drift-applied",
        "apply/drift-apply-error", "apply/deadlock-is-transient"])
def test_outcome_table(result, apply, requeued_from, expected):
    assert summary(decide(result, apply, requeued_from)) == expected


def test_plan_error_is_stored_with_the_plugin_details():
    decision = decide(PLAN_ERROR)
    assert decision.error == {"message": "plan failed: dcim.site.status: 'bogus' is not a valid choice.",
                              "code": "ERR_OPS_GENERATE_DIFF", "details": PLAN_ERROR.plan_errors}


def test_unavailable_retries_with_growing_delays_then_errors():
    first = outcomes.unavailable(row(attempts=1), "HTTP 503", RETRY)
    second = outcomes.unavailable(row(attempts=2), "HTTP 503", RETRY)
    assert first.state == second.state == states.PENDING_RETRY
    assert 15 <= first.retry_in <= 30 and 30 <= second.retry_in <= 60
    spent = outcomes.unavailable(row(attempts=3), "HTTP 503", RETRY)
    assert spent.state == states.ERRORED and spent.retry_in is None
    assert spent.error["message"] == "gave up after 3 attempts: HTTP 503"
    assert first.answer_lost is spent.answer_lost is outcomes.KEEP


LOST_AT = datetime.datetime(2026, 11, 27, tzinfo=datetime.timezone.utc)
NOTHING_TO_DO = Result(7, change_set={"id": "cs", "branch": None, "changes": []})


@pytest.mark.parametrize("result, apply, requeued_from, expected", [
    (NOTHING_TO_DO, True, None, (states.APPLIED, outcomes.KEEP)),  # the lost attempt applied it
    (NOTHING_TO_DO, True, states.FAILED, (states.APPLIED, outcomes.KEEP)),
    (NOTHING_TO_DO, True, states.NO_CHANGES, (states.NO_CHANGES, False)),  # it had nothing to apply before
    (NOTHING_TO_DO, False, None, (states.NO_CHANGES, False)),  # a lost plan changed nothing
    (CHANGES, True, None, (states.APPLIED, False)),  # applied now, with its change set
    (PLAN_ERROR, True, None, (states.FAILED, False)),
    (Result(7, unavailable="HTTP 503"), True, None, (states.PENDING_RETRY, outcomes.KEEP)),
    (Result(7, unavailable="unreadable", answer_lost=True), True, None, (states.PENDING_RETRY, outcomes.LOST)),
], ids=["apply", "after-failed", "after-no-changes", "plan-only", "changes", "plan-error", "unavailable", "lost"])
def test_a_row_whose_last_answer_was_lost(result, apply, requeued_from, expected):
    claimed = Claimed(7, "dcim.site", b"", requeued_from, 2, LOST_AT)
    decision = outcomes.decide(claimed, result, apply, ENTITY, None, RETRY, NOW)
    assert (decision.state, decision.answer_lost) == expected


def test_an_unanswered_request_holds_the_row_and_splits_its_batch():
    held = outcomes.decide(row(attempts=3), Result(7, unavailable="ReadTimeoutError", running_until=NOW + 290),
                           True, ENTITY, None, RETRY, NOW)
    assert (held.state, held.retry_in, held.timed_out, held.answer_lost) == (states.ERRORED, 290, True, outcomes.LOST)
    split = outcomes.in_doubt(row(attempts=3), "ReadTimeoutError", 290, 100, RETRY)  # a batch: refunded, not spent
    assert (split.state, split.retry_in, split.refund, split.error["code"]) == \
        (states.PENDING_RETRY, 290, True, "ERR_PLUGIN_NO_ANSWER")
    assert outcomes.in_doubt(row(), "x", -5, 1, RETRY).retry_in == 0  # NetBox is done with it already


@pytest.mark.parametrize("object_type, changes, name", [
    ("dcim.site", plan_for("x")["changes"], "Site obj-x discovered"),
    ("dcim.device", [{"change_type": "noop", "object_type": "dcim.site", "object_primary_value": "dc"},
                     {"change_type": "update", "object_type": "dcim.device", "object_primary_value": "sw1"}],
     "Device sw1 modified"),
    ("dcim.device", [{"change_type": "create", "object_type": "dcim.device", "ref_id": "r1",
                      "object_primary_value": "sw2"},
                     {"change_type": "create", "object_type": "ipam.ipaddress", "object_primary_value": "10.0.0.1/24"},
                     {"change_type": "update", "object_type": "dcim.device", "ref_id": "r1",
                      "object_primary_value": None}],
     "Device sw2 discovered"),
    ("ipam.ipaddress", [{"change_type": "create", "object_type": "dcim.site", "object_primary_value": "dc"}],
     "IP Address unchanged"),
], ids=["create", "update-beside-noop", "deferred-update-names-its-create", "no-own-change"])
def test_deviation_names(object_type, changes, name):
    assert outcomes.deviation_name(object_type, changes) == name


def test_placeholder_names_the_entity_or_says_unresolved():
    assert outcomes.placeholder(row(), ENTITY, "br1").deviation_name == "Site dc-1 reported"
    assert outcomes.placeholder(row(), ENTITY, "br1").branch_id == "br1"
    ip = outcomes.placeholder(row(object_type="ipam.ipaddress"), {"ip_address": {"address": "10.0.0.1/24"}}, None)
    assert ip.deviation_name == "IP Address 10.0.0.1/24 reported"
    assert outcomes.placeholder(row(), None, None).deviation_name == "Unresolved dcim.site reported"


def test_change_set_records_the_branch_it_was_planned_in():
    change_set = plan_for("7")
    change_set["branch"] = {"id": "td5smq0f", "name": "staging"}
    decision = decide(Result(7, change_set=change_set))
    assert decision.change_set.branch_id == "staging (td5smq0f)" and decision.change_set.external_id == "cs-7"


@pytest.mark.parametrize("requeued_from, apply, expected", [
    (None, False, (states.FAILED, None, "ERR_INTERNAL", False)),  # a plan nobody can review
    (None, True, (states.APPLIED, None, "ERR_INTERNAL", False)),  # applied in NetBox all the same
    (states.APPLIED, False, (states.APPLIED, states.FAILED, "ERR_INTERNAL", False)),  # drift: the clone
    (states.APPLIED, True, (states.APPLIED, states.APPLIED, "ERR_INTERNAL", False)),
])
def test_an_unstorable_outcome_keeps_what_happened_without_its_change_set(requeued_from, apply, expected):
    decision = outcomes.unstorable(decide(CHANGES, apply, requeued_from), "a CHECK \x00 refused it")
    assert summary(decision) == expected
    assert "a CHECK \ufffd refused it" in decision.error["message"]  # the one NUL policy


def test_odd_values_in_names_do_not_break_them():
    change = {"change_type": "update", "object_type": "dcim.site", "object_primary_value": 42}
    assert outcomes.deviation_name("dcim.site", [change]) == "Site 42 modified"
    entity = {"site": {"name": "dc\x001"}}
    name = outcomes.placeholder(row(), entity, None).deviation_name
    assert name == "Site dc\ufffd1 reported"


@pytest.mark.parametrize("result, requeued_from, planned", [
    (PLAN_ERROR, states.APPLIED, False),  # a drift check whose plan failed: its last plan is still the one before
    (None, states.APPLIED, False),
    (Result(7, change_set=NOOPS), states.APPLIED, True),
    (CHANGES, states.APPLIED, True),
    (PLAN_ERROR, None, True),  # FAILED: its failure is the plugin's answer about it
])
def test_only_a_plan_moves_the_time_drift_checks_judge_from(result, requeued_from, planned):
    assert decide(result, requeued_from=requeued_from).planned is planned
