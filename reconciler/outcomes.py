"""What the plugin's answer means for each claimed row (pure functions, no I/O).

The Go reconciler's rules for a plugin answer (docs/go-reconciler.md), with retries added:

| answer                        | plan-only                   | auto-apply                        |
|-------------------------------|-----------------------------|-----------------------------------|
| plan error / no result        | FAILED + placeholder set    | FAILED + placeholder set          |
| no changes (or only noops)    | NO_CHANGES                  | NO_CHANGES                        |
| changes                       | OPEN + change set           | APPLIED + change set              |
| changes, apply error          | -                           | FAILED + change set (audit)       |
| plugin unreachable, 5xx, 429, | PENDING_RETRY with backoff, ERRORED once attempts are spent;     |
| apply deadlock,               | nothing is said about the entity, so it is not FAILED            |
| entity not reached            |                                                                  |
| no answer (timeout, dropped)  | PENDING_RETRY until NetBox can no longer be working on the       |
|                               | request, in a batch half the size (the claim is given back while |
|                               | the batch can be split); answer_lost_at set                      |

A row whose last request went unanswered, or whose worker died holding it (answer_lost_at), may
have been applied by that request. In auto-apply, when its next plan finds nothing to do, that
apply is what happened: the row is APPLIED and keeps answer_lost_at, which says its change set was
lost with the answer (a row that was NO_CHANGES before it was seen again stays NO_CHANGES). Any
other outcome from a plugin answer clears answer_lost_at; a retry keeps it, and an answer that says
nothing of what the plugin did (unreadable, or a 5xx once apply-change-set/ reached it) sets it.

A row re-observed after it was APPLIED (requeued_from_state = 3) is a drift check: a clean plan,
or a plan error, puts it back to APPLIED; a plan with changes is drift, recorded as a new row (the
clone gets the state and the change set; the prior stays APPLIED and stops being the head).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from google.protobuf.message import DecodeError
from netboxlabs.diode.sdk.diode.v1 import ingester_pb2 as pb
from netboxlabs.diode.sdk.ingester import PRIMARY_VALUE_MAP

from . import backoff, protojson, states
from .changesets import error_leaves, has_changes, malformed_change_set
from .claims import KEEP, LOST, ChangeSet, Claimed, Decision
from .objecttypes import DISPLAY_NAMES, MEMBERS
from .text import without_nul

if TYPE_CHECKING:  # the decisions read the client's results, but never call it
    from .plugin import Result


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    base_seconds: float
    max_seconds: float

    @classmethod
    def of(cls, workers) -> RetryPolicy:
        """The policy [workers] sets."""
        return cls(workers.max_attempts, workers.retry_base_seconds, workers.retry_max_seconds)

    def delay(self, attempts: int) -> float:
        return backoff.delay(attempts, self.base_seconds, self.max_seconds)


# --- errors as stored in ingestion_logs.error ---


def _flatten(errors: Any) -> list[str]:
    """Plugin error trees as 'type.field: msg' lines."""
    return [f"{path}: {message}" if path else str(message) for path, message in error_leaves(errors)]


def error(message: str, code: str, details: Any = None) -> dict:
    return {"message": message, "code": code, "details": details}


def plugin_error(kind: str, errors: Any) -> dict:
    lines = _flatten(errors)
    summary = "; ".join(lines[:3]) + (f" (+{len(lines) - 3} more)" if len(lines) > 3 else "")
    code = "ERR_OPS_APPLY_CHANGE_SET" if kind == "apply" else "ERR_OPS_GENERATE_DIFF"
    return error(f"{kind} failed: {summary}", code, errors)


# --- deviation names: a change set's label, as the Go reconciler builds it (docs/go-reconciler.md) ---


def _primary_change(object_type: str, changes: list[dict]) -> dict | None:
    own = [c for c in changes if c.get("object_type") == object_type]
    if not own:
        return None
    primary = own[-1]
    if primary.get("ref_id"):
        same = [c for c in changes if c.get("ref_id") == primary["ref_id"]]
        primary = same[0]
    return primary


def deviation_name(object_type: str, changes: list[dict]) -> str:
    kind = DISPLAY_NAMES.get(object_type, object_type)
    primary = _primary_change(object_type, changes)
    if primary is None:
        return f"{kind} unchanged"
    value = primary.get("object_primary_value")
    verb = "discovered" if primary.get("change_type") == "create" else "modified"
    return " ".join(str(part) for part in (kind, value, verb) if part)[:255]


def _primary_value(object_type: str, entity: dict | None) -> str | None:
    member = MEMBERS.get(object_type)
    if member is None or not entity:
        return None
    message = pb.Entity.DESCRIPTOR.fields_by_name[member].message_type.name
    value = (entity.get(member) or {}).get(PRIMARY_VALUE_MAP.get(message, "name"))
    # From the stored entity, which may hold a NUL (plugin answers are cleaned when parsed; this
    # value is not from one).
    return without_nul(str(value)) if value not in (None, "") else None


def placeholder(row: Claimed, entity: dict | None, branch_id: str | None) -> ChangeSet:
    """The change set recording a plan failure, so the failure has a set to attach to (audit, UI)."""
    value = _primary_value(row.object_type, entity)
    kind = DISPLAY_NAMES.get(row.object_type)
    name = f"{kind} {value} reported" if kind and value else f"Unresolved {row.object_type} reported"
    return ChangeSet(str(uuid.uuid4()), branch_id, name[:255])


# --- decisions ---


def stored_change_set(object_type: str, change_set: dict, apply_warnings: list | None = None) -> ChangeSet:
    """A plan as stored, with the plugin's warnings on it (plan warnings come in the change set, those
    of an apply beside it)."""
    branch = change_set.get("branch")
    branch_id = f"{branch.get('name')} ({branch.get('id')})" if isinstance(branch, dict) else None
    changes = change_set.get("changes") or []
    plan_warnings = change_set.get("warnings")
    return ChangeSet(str(change_set.get("id") or uuid.uuid4()), branch_id, deviation_name(object_type, changes),
                     changes, plan_warnings=plan_warnings if isinstance(plan_warnings, dict) else None,
                     apply_warnings=apply_warnings or None)


def entities(rows: list[Claimed]) -> tuple[dict[int, dict], list[Decision]]:
    """Each row's entity as protojson with proto field names, as the plugin reads it; a row whose
    stored bytes do not parse fails."""
    parsed, failed = {}, []
    for row in rows:
        try:
            parsed[row.id] = pb.Entity.FromString(row.entity)
        except (DecodeError, UnicodeDecodeError) as exc:
            failure = error(f"the stored entity is not a valid diode.v1.Entity: {exc}", "ERR_INTERNAL")
            failed.append(plan_failed(row, failure, None, None))
    return dict(zip(parsed, protojson.batch_to_dicts(list(parsed.values())))), failed


def plan_failed(row: Claimed, failure: dict, entity: dict | None, branch_id: str | None) -> Decision:
    if row.drift_check:  # an applied object whose re-check failed stays applied, its last plan unchanged
        return Decision(row.id, states.APPLIED, answer_lost=KEEP, planned=False)
    return Decision(row.id, states.FAILED, failure, placeholder(row, entity, branch_id))


def decide(row: Claimed, result: Result | None, apply: bool, entity: dict | None, branch_id: str | None,
           retry: RetryPolicy, now: float) -> Decision:
    """The outcome of one row from the plugin's result for it (None: the plugin returned none).
    `now`: time.time(), the clock the result's running_until is on."""
    if result is None:
        return plan_failed(row, error(f"no result returned for ingestion log {row.id}", "ERR_OPS_GENERATE_DIFF"),
                           entity, branch_id)
    if result.running_until is not None:
        return in_doubt(row, str(result.unavailable), result.running_until - now, 1, retry)
    if result.unavailable:
        return unavailable(row, result.unavailable, retry, answer_lost=result.answer_lost)
    if result.plan_errors:
        return plan_failed(row, plugin_error("plan", result.plan_errors), entity, branch_id)
    if result.change_set is None:
        return plan_failed(row, error(f"no change set returned for ingestion log {row.id}", "ERR_OPS_GENERATE_DIFF"),
                           entity, branch_id)
    problem = malformed_change_set(result.change_set)
    if problem:
        return plan_failed(row, error(f"the plugin returned a malformed change set for ingestion log {row.id}: "
                                      f"{problem}", "ERR_OPS_GENERATE_DIFF", result.change_set), entity, branch_id)
    if not has_changes(result.change_set):
        if row.drift_check or (apply and row.answer_lost_at and row.requeued_from_state != states.NO_CHANGES):
            return Decision(row.id, states.APPLIED, answer_lost=KEEP)  # by the attempt whose answer was lost
        return Decision(row.id, states.NO_CHANGES)
    if apply and result.apply_transient:
        return unavailable(row, f"apply failed in NetBox's database: {_flatten(result.apply_errors)[0]}", retry)
    change_set = stored_change_set(row.object_type, result.change_set, result.warnings if apply else None)
    if not apply:
        state, failure = states.OPEN, None
    elif result.apply_errors:
        state, failure = states.FAILED, plugin_error("apply", result.apply_errors)
    else:
        state, failure = states.APPLIED, None
    if row.drift_check:
        return Decision(row.id, states.APPLIED, change_set=change_set, drift_state=state, error=failure)
    return Decision(row.id, state, failure, change_set)


def unavailable(row: Claimed, reason: str, retry: RetryPolicy, answer_lost: bool = False) -> Decision:
    """Nothing was learned about the entity: retry later, or give up once the attempts are spent.
    `answer_lost`: the plugin got the request and answered in a way that says nothing of what it did."""
    failure = error(reason, "ERR_PLUGIN_UNAVAILABLE")
    lost = LOST if answer_lost else KEEP
    if row.attempts >= retry.max_attempts:
        failure["message"] = f"gave up after {row.attempts} attempts: {reason}"
        return Decision(row.id, states.ERRORED, failure, answer_lost=lost)
    return Decision(row.id, states.PENDING_RETRY, failure, retry_in=retry.delay(row.attempts), answer_lost=lost)


def in_doubt(row: Claimed, reason: str, running_for: float, batch: int, retry: RetryPolicy) -> Decision:
    """The request carrying the row went unanswered (`batch` rows in it) and NetBox may go on working on
    it for `running_for` seconds: the row is not sent again before then, and then in a batch half the
    size. The claim counts against max_attempts only once the row went alone."""
    hold = max(0.0, running_for)
    failure = error(f"no answer from the plugin ({reason}); NetBox may still be working on the request, so the "
                    f"row is not sent again for {hold:.0f} s", "ERR_PLUGIN_NO_ANSWER")
    split = batch > 1
    if not split and row.attempts >= retry.max_attempts:
        failure["message"] = f"gave up after {row.attempts} attempts: {failure['message']}"
        return Decision(row.id, states.ERRORED, failure, retry_in=hold, answer_lost=LOST, timed_out=True)
    return Decision(row.id, states.PENDING_RETRY, failure, retry_in=hold, answer_lost=LOST, timed_out=True,
                    refund=split)


def unstorable(decision: Decision, reason: str) -> Decision:
    """A decision whose change set or error Postgres refused to store, as one it can store: the same
    outcome without the change set, and why in `error`. A plan that can no longer be reviewed (OPEN)
    is FAILED; an apply that happened in NetBox stays APPLIED."""
    failure = error(f"Postgres refused to store the plugin's answer for this row ({without_nul(reason)}); "
                    "recorded without its change set", "ERR_INTERNAL")
    field_name = "drift_state" if decision.drift_state is not None else "state"
    state = getattr(decision, field_name)
    changed: dict[str, Any] = {field_name: states.FAILED if state == states.OPEN else state}
    return replace(decision, error=failure, change_set=None, **changed)
