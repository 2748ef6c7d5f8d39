"""Writing a worker batch's outcome to Postgres, in one transaction.

States in bulk (unnest) for the rows this worker still holds; drift clones; change sets and their
changes by COPY with ids allocated up front; at most KEEP_CHANGE_SETS change sets per row. Rows
whose lease was lost (expired and taken over by another worker) are left alone and reported.
"""

from __future__ import annotations

import time

import orjson

from . import pgcopy, states
from .db import Database, Tx
from .outcomes import ChangeSet, Decision

KEEP_CHANGE_SETS = 5


def persist(db: Database, owner: str, branch_scope: str, decisions: list[Decision],
            planned_before: set[int]) -> set[int]:
    """Write the decisions; returns the row ids written (the others were not ours any more).

    `planned_before`: rows that may already have change sets (requeued, or claimed before); only
    they are pruned to the newest KEEP_CHANGE_SETS, which spares the query on first plans.
    """
    with db.transaction() as tx:
        written = _finish_rows(tx, owner, branch_scope, decisions)
        kept = [d for d in decisions if d.row_id in written]
        clones = _clone_drift(tx, branch_scope, [d for d in kept if d.drift_state is not None])
        sets = [(clones.get(d.row_id, d.row_id), d.change_set) for d in kept if d.change_set is not None]
        _store_change_sets(tx, sets)
        prune = sorted({log_id for log_id, _ in sets} & planned_before)
        if prune:
            tx.execute("keep_latest_change_sets", {"ids": prune, "keep": KEEP_CHANGE_SETS})
    return written


def release(db: Database, owner: str, ids: list[int]) -> None:
    """Give claimed rows back untouched (the worker stops before it could ask the plugin)."""
    with db.transaction() as tx:
        tx.execute("release_claims", {"ids": ids, "owner": owner})


def _json(value) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _finish_rows(tx: Tx, owner: str, branch_scope: str, decisions: list[Decision]) -> set[int]:
    decisions = sorted(decisions, key=lambda d: d.row_id)  # rows are locked in this order
    drift = [d.drift_state is not None for d in decisions]
    rows = tx.fetchall("finish_rows", {
        "owner": owner, "branch": branch_scope,
        "ids": [d.row_id for d in decisions],
        "states": [states.APPLIED if moved else d.state for d, moved in zip(decisions, drift)],
        "errors": [None if moved else _json(d.error) for d, moved in zip(decisions, drift)],
        "next_attempt_at": [d.next_attempt_at for d in decisions],
        "superseded": drift,
    })
    return {row[0] for row in rows}


def _clone_drift(tx: Tx, branch_scope: str, decisions: list[Decision]) -> dict[int, int]:
    """{prior id: clone id} for the drift decisions."""
    if not decisions:
        return {}
    rows = tx.fetchall("clone_for_drift", {
        "ids": [d.row_id for d in decisions], "states": [d.drift_state for d in decisions],
        "errors": [_json(d.error) for d in decisions], "branch": branch_scope, "now_ns": time.time_ns()})
    return {prior: clone for clone, prior in rows}


def _store_change_sets(tx: Tx, sets: list[tuple[int, ChangeSet]]) -> None:
    if not sets:
        return
    ids = [row[0] for row in tx.fetchall("allocate_change_set_ids", {"count": len(sets)})]
    tx.copy("copy_change_sets", pgcopy.stream([_change_set_tuple(i, log_id, cs) for i, (log_id, cs) in zip(ids, sets)]))
    changes = [_change_tuple(i, n, change) for i, (_, cs) in zip(ids, sets) for n, change in enumerate(cs.changes)]
    if changes:
        tx.copy("copy_changes", pgcopy.stream(changes))


def _change_set_tuple(change_set_id: int, log_id: int, change_set: ChangeSet) -> bytes:
    return b"".join((pgcopy.tuple_start(5), pgcopy.bigint(change_set_id), pgcopy.text(change_set.external_id),
                     pgcopy.bigint(log_id), pgcopy.nullable_text(change_set.branch_id),
                     pgcopy.text(change_set.deviation_name)))


def _text_or_none(value) -> str | None:
    return None if value is None else str(value)


def _int_or_none(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _change_tuple(change_set_id: int, sequence: int, change: dict) -> bytes:
    new_refs = change.get("new_refs")
    return b"".join((
        pgcopy.tuple_start(12),
        pgcopy.text(str(change.get("id") or "")),
        pgcopy.bigint(change_set_id),
        pgcopy.text(str(change.get("change_type") or "")[:50]),
        pgcopy.text(str(change.get("object_type") or "")[:255]),
        pgcopy.text(str(change.get("object_primary_value") or "")[:255]),
        pgcopy.bigint(_int_or_none(change.get("object_id"))),
        pgcopy.nullable_text(_text_or_none(change.get("ref_id"))),
        pgcopy.nullable_integer(_int_or_none(change.get("object_version"))),
        pgcopy.jsonb(_json(change.get("before"))),
        pgcopy.jsonb(_json(change.get("data"))),
        pgcopy.text_array([str(r) for r in new_refs] if isinstance(new_refs, list) else None),
        pgcopy.integer(sequence),
    ))
