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
        "errors": [_json(d.error) for d in decisions], "branch": branch_scope, "now_ns": time.time_ns()})
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
    return b"".join((pgcopy.tuple_start(5), pgcopy.bigint(change_set_id), pgcopy.text(change_set.external_id),
                     pgcopy.bigint(log_id), pgcopy.nullable_text(change_set.branch_id),
                     pgcopy.text(change_set.deviation_name)))


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
        key = str(value or "")[:limit]
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
            pgcopy.text(str(change.get("object_primary_value") or "")[:255]),
            pgcopy.bigint(_fitting(object_id, 64)),
            pgcopy.NULL if ref_id is None else pgcopy.text(str(ref_id)),
            pgcopy.NULL if _fitting(version, 32) is None else pgcopy.integer(version),
            pgcopy.jsonb(_document(change.get("before"))),
            pgcopy.jsonb(_document(change.get("data"))),
            self._EMPTY_REFS if new_refs == [] else
            pgcopy.text_array([str(r) for r in new_refs] if isinstance(new_refs, list) else None),
            pgcopy.integer(sequence),
        ))


_CHANGE_FIELDS = pgcopy.tuple_start(12)
