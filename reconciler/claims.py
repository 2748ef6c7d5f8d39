"""The poll workers' queue protocol: everything a worker does to `ingestion_logs` rows, in the
order it does it. Only this module names the statements of that protocol.

1. `sweep`: rows whose lease expired (a dead or hung worker's, here or on another replica) go back
   to QUEUED, or to ERRORED once their claims have used up max_attempts.
2. `claim`: up to a batch of due rows, locked with FOR UPDATE SKIP LOCKED and leased to this worker,
   committed before the plugin is asked (so no other worker can send them while it runs).
3. `release`: claimed rows that were never sent go back untouched, their attempt not counted.
4. `record`: the batch's decisions in one transaction: states in bulk for the rows this worker
   still holds, drift clones, change sets and their changes by COPY, at most KEEP_CHANGE_SETS
   change sets per row. Rows whose lease was lost (expired and taken over) are left alone.
5. `end_leases`: in the supervisor, once a worker is gone: its leases end now, or once NetBox can no
   longer be working on the request it sent.

The data a batch carries, `Claimed` rows in and `Decision`s out, is defined here too; the rules
that turn a plugin answer into a decision are in outcomes.py.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import orjson

from . import pgcopy, states
from .changesets import stored_label
from .db import Database, Tx
from .text import json_text

KEEP_CHANGE_SETS = 5
LOST, KEEP = True, None  # Decision.answer_lost: what becomes of the row's answer_lost_at


@dataclass(frozen=True)
class Claimed:
    """A row as claimed by a worker."""

    id: int
    object_type: str
    entity: bytes
    requeued_from_state: int | None
    attempts: int
    answer_lost_at: datetime.datetime | None = None
    timeouts: int = 0

    @property
    def drift_check(self) -> bool:
        return self.requeued_from_state == states.APPLIED

    @property
    def planned_before(self) -> bool:
        """Whether earlier change sets can exist: it was requeued, or claimed before."""
        return self.requeued_from_state is not None or self.attempts > 1


@dataclass
class ChangeSet:
    """A change set as stored: the plugin's, or a placeholder recording a failure."""

    external_id: str
    branch_id: str | None
    deviation_name: str
    changes: list[dict] = field(default_factory=list)
    plan_warnings: dict | None = None  # {object_type: {field: [message]}}: what the plan ignored
    apply_warnings: list | None = None  # [{object_type, object_id, fields, message}]: what the apply did not store


@dataclass
class Decision:
    row_id: int
    state: int
    error: dict | None = None
    change_set: ChangeSet | None = None
    drift_state: int | None = None  # drift: the prior becomes APPLIED; a clone gets this state, error, set
    retry_in: float | None = None  # seconds from the write until the row is due again (PENDING_RETRY)
    answer_lost: bool | None = False  # LOST: set answer_lost_at now; KEEP: keep it; False: clear it
    timed_out: bool = False  # its request went unanswered: the next claim is half the size
    refund: bool = False  # the claim does not count against max_attempts
    planned: bool = True  # the plugin produced a plan: NetBox changes from now on may not be in it


class Released(NamedTuple):
    """A row whose lease ended without an outcome: back to QUEUED, or ERRORED (attempts spent)."""

    id: int
    owner: str
    state: int


def sweep(db: Database, max_attempts: int) -> list[Released]:
    """Release every row whose lease expired, whoever held it."""
    with db.transaction() as tx:
        rows = tx.fetchall("release_expired_leases", {"max_attempts": max_attempts, "unsent_owner": None})
    return [Released(*row) for row in rows]


def claim(db: Database, owner: str, state: int, limit: int, lease_seconds: float) -> list[Claimed]:
    """Lease up to `limit` due rows to `owner`, marked `state` (APPLYING or OPEN) while in flight,
    committed before returning; in id order."""
    with db.transaction() as tx:
        rows = tx.fetchall("claim_batch", {"limit": limit, "state": state, "owner": owner,
                                           "lease_seconds": lease_seconds})
    return [Claimed(row_id, object_type, bytes(entity), requeued, attempts, answer_lost_at, timeouts)
            for row_id, object_type, entity, requeued, attempts, answer_lost_at, timeouts in sorted(rows)]


def release(db: Database, owner: str, ids: list[int]) -> None:
    """Give claimed rows back untouched (the worker stops before it could ask the plugin)."""
    with db.transaction() as tx:
        tx.execute("release_claims", {"ids": ids, "owner": owner})


def record(db: Database, owner: str, branch_scope: str, decisions: list[Decision],
           planned_before: set[int]) -> set[int]:
    """Write the decisions; returns the row ids written (the others were not ours any more).

    `planned_before`: rows that may already have change sets (requeued, or claimed before); only
    they are pruned to the newest KEEP_CHANGE_SETS, which spares the query on first plans.
    """
    with db.transaction() as tx:
        return write(tx, owner, branch_scope, decisions, planned_before)


def write(tx: Tx, owner: str, branch_scope: str, decisions: list[Decision], planned_before: set[int]) -> set[int]:
    """`record` within a transaction of the caller's (the review's apply adds its audit trail to it)."""
    written = _finish_rows(tx, owner, branch_scope, decisions)
    kept = [d for d in decisions if d.row_id in written]
    clones = _clone_drift(tx, branch_scope, [d for d in kept if d.drift_state is not None])
    sets = [(clones.get(d.row_id, d.row_id), d.change_set) for d in kept if d.change_set is not None]
    _store_change_sets(tx, sets)
    prune = sorted({log_id for log_id, _ in sets} & planned_before)
    if prune:
        tx.execute("keep_latest_change_sets", {"ids": prune, "keep": KEEP_CHANGE_SETS})
    return written


def end_leases(db: Database, owner: str, request_seconds: float, max_attempts: int,
               sent: bool) -> tuple[set[int], list[Released]]:
    """End the leases of a worker that is gone: (the ids it held, the rows released now). Rows it
    may have sent keep their lease `request_seconds` longer (NetBox may still be working on them);
    unless `sent`, its claims were never sent and are released without spending an attempt."""
    with db.transaction() as tx:
        ended = tx.fetchall("end_leases_of", {"owner": owner, "request_seconds": request_seconds})
        released = tx.fetchall("release_expired_leases", {"max_attempts": max_attempts,
                                                          "unsent_owner": None if sent else owner})
    return {row_id for row_id, in ended}, [Released(*row) for row in released]


def _finish_rows(tx: Tx, owner: str, branch_scope: str, decisions: list[Decision]) -> set[int]:
    decisions = sorted(decisions, key=lambda d: d.row_id)  # rows are locked in this order
    drift = [d.drift_state is not None for d in decisions]
    rows = tx.fetchall("finish_rows", {
        "owner": owner, "branch": branch_scope,
        "ids": [d.row_id for d in decisions],
        "states": [states.APPLIED if moved else d.state for d, moved in zip(decisions, drift)],
        "errors": [None if moved else json_text(d.error) for d, moved in zip(decisions, drift)],
        "retry_in": [d.retry_in for d in decisions],
        "superseded": drift,
        "answer_lost": [d.answer_lost for d in decisions],
        "timed_out": [d.timed_out for d in decisions],
        "refund": [d.refund for d in decisions],
        "planned": [d.planned for d in decisions],
    })
    return {row[0] for row in rows}


def _clone_drift(tx: Tx, branch_scope: str, decisions: list[Decision]) -> dict[int, int]:
    """{prior id: clone id} for the drift decisions."""
    if not decisions:
        return {}
    rows = tx.fetchall("clone_for_drift", {
        "ids": [d.row_id for d in decisions], "states": [d.drift_state for d in decisions],
        "errors": [json_text(d.error) for d in decisions], "branch": branch_scope, "now_ns": time.time_ns()})
    return {prior: clone for clone, prior in rows}


def _store_change_sets(tx: Tx, sets: list[tuple[int, ChangeSet]]) -> None:
    if not sets:
        return
    first = tx.fetchall("allocate_change_set_ids")[0][0]
    ids = range(first, first + len(sets))
    tx.copy("copy_change_sets", pgcopy.stream([_change_set_tuple(i, log_id, cs) for i, (log_id, cs) in zip(ids, sets)]))
    encoder = _ChangeEncoder()
    changes = [encoder.tuple(pgcopy.bigint(i), n, change) for i, (_, cs) in zip(ids, sets)
               for n, change in enumerate(cs.changes)]
    if changes:
        tx.copy("copy_changes", pgcopy.stream(changes))


def _change_set_tuple(change_set_id: int, log_id: int, change_set: ChangeSet) -> bytes:
    return b"".join((pgcopy.tuple_start(7), pgcopy.bigint(change_set_id), pgcopy.text(change_set.external_id),
                     pgcopy.bigint(log_id), pgcopy.nullable_text(change_set.branch_id),
                     pgcopy.text(change_set.deviation_name), pgcopy.jsonb(_document(change_set.plan_warnings or None)),
                     pgcopy.jsonb(_document(change_set.apply_warnings or None))))


def _fitting(value, bits: int) -> int | None:
    """An integer the column (bigint: 64, integer: 32 bits) can hold, else None: the change's
    `data` and `before` documents keep whatever the plugin sent."""
    limit = 1 << (bits - 1)
    return value if type(value) is int and -limit <= value < limit else None


def _document(value) -> bytes | None:
    return None if value is None else orjson.dumps(value)


class _ChangeEncoder:
    """Binary COPY tuples of `changes` (the columns of copy_changes): the worker's hottest loop,
    a few hundred rows per batch, so values that repeat (change and object types, empty lists) are
    encoded once per batch."""

    _EMPTY_REFS = pgcopy.text_array([])

    def __init__(self) -> None:
        self._texts: dict[str, bytes] = {}

    def _short(self, value, limit: int) -> bytes:
        key = stored_label(value, limit)
        encoded = self._texts.get(key)
        if encoded is None:
            encoded = self._texts[key] = pgcopy.text(key)
        return encoded

    def tuple(self, change_set: bytes, sequence: int, change: dict) -> bytes:
        new_refs = change.get("new_refs")
        ref_id, object_id, version = change.get("ref_id"), change.get("object_id"), change.get("object_version")
        return b"".join((
            _CHANGE_FIELDS,
            pgcopy.text(str(change.get("id") or "")),
            change_set,
            self._short(change.get("change_type"), 50),
            self._short(change.get("object_type"), 255),
            pgcopy.text(stored_label(change.get("object_primary_value"))),
            pgcopy.bigint(_fitting(object_id, 64)),
            pgcopy.NULL if ref_id is None else pgcopy.text(str(ref_id)),
            pgcopy.NULL if (fitted := _fitting(version, 32)) is None else pgcopy.integer(fitted),
            pgcopy.jsonb(_document(change.get("before"))),
            pgcopy.jsonb(_document(change.get("data"))),
            self._EMPTY_REFS if new_refs == [] else
            pgcopy.text_array([str(r) for r in new_refs] if isinstance(new_refs, list) else None),
            pgcopy.integer(sequence),
        ))


_CHANGE_FIELDS = pgcopy.tuple_start(12)
