"""Writing one read of the stream into the Postgres inbox, exactly once.

One transaction per read: receipts for the stream entries (a redelivered entry is a no-op),
dedup against the current row of each entity hash, one COPY of the new QUEUED rows, bookkeeping
on the duplicates, dead letters for whatever could not become a row. The caller acknowledges the
entries in Redis only after this returns, i.e. after the commit.
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

from . import pgcopy, wire
from .db import Database, Tx
from .errors import ContentRejected
from .states import REQUEUE_ON_DUPLICATE

COPY_COLUMNS = 11  # the column list of copy_ingestion_logs


@dataclass
class Outcome:
    """What one write did, for logs and metrics."""

    messages: int = 0
    redelivered: int = 0  # entries already committed earlier: no-ops
    entities: int = 0
    inserted: int = 0
    duplicates: int = 0
    requeued: int = 0
    dead_letters: list[wire.Rejection] = field(default_factory=list)


@dataclass
class _Plan:
    new_rows: dict[bytes, list] = field(default_factory=dict)  # hash -> [row, in-batch duplicates]
    increments: Counter = field(default_factory=Counter)  # head id -> observations


def write(db: Database, stream: str, messages: list[wire.Message], branch: str | None = None) -> Outcome:
    """Commit the rows and dead letters of these stream entries; safe to call again after a crash.

    `branch` is today's default branch as rows record it ("<name> (<id>)", "" for main), or None
    while it is not known: then every existing row of an entity absorbs new observations.
    """
    with db.transaction() as tx:
        fresh = _claim_receipts(tx, stream, messages)
        outcome = Outcome(messages=len(messages), redelivered=len(messages) - len(fresh))
        rows = [row for message in fresh for row in message.rows]
        outcome.dead_letters = [rejection for message in fresh for rejection in message.rejections]
        outcome.entities = sum(message.entity_count for message in fresh)
        heads = _lock_heads(tx, rows, branch)
        plan, refused = _insert_new_rows(tx, rows, heads)
        outcome.dead_letters += refused
        _mark_duplicates(tx, plan.increments)
        outcome.inserted = len(plan.new_rows)
        outcome.duplicates = len(rows) - len(refused) - outcome.inserted
        states = {head.id: head.state for head in heads.values()}
        outcome.requeued = sum(1 for head_id in plan.increments if states[head_id] in REQUEUE_ON_DUPLICATE)
        _store_dead_letters(tx, stream, outcome.dead_letters)
    return outcome


def _claim_receipts(tx: Tx, stream: str, messages: list[wire.Message]) -> list[wire.Message]:
    if not messages:
        return []
    parts = [wire.stream_id_parts(m.stream_id) for m in messages]
    claimed = set(tx.fetchall("claim_receipts", {
        "stream": stream, "ms": [p[0] for p in parts], "seq": [p[1] for p in parts],
        "entities": [m.entity_count for m in messages]}))
    return [m for m, p in zip(messages, parts) if p in claimed]


class Head(NamedTuple):
    """The current row of an entity hash."""

    id: int
    state: int
    planned_branch: str | None

    def other_branch(self, branch: str | None) -> bool:
        """Finished in another branch than today's: says nothing about today's branch."""
        return (branch is not None and self.planned_branch is not None and self.planned_branch != branch
                and self.state in REQUEUE_ON_DUPLICATE)


def _lock_heads(tx: Tx, rows: list[wire.EntityRow], branch: str | None) -> dict[bytes, Head]:
    """{hash: head} for the hashes that already have a row in today's branch, locked until commit.

    Heads finished in another branch are demoted here, so these entities become new rows.
    """
    if not rows:
        return {}
    hashes = b"".join(sorted({row.entity_hash for row in rows}))  # sorted: neighbouring probes share index pages
    heads = {bytes(entity_hash): Head(head_id, state, planned)
             for head_id, entity_hash, state, planned in tx.fetchall("lock_heads", {"hashes": hashes})}
    stale = sorted(head.id for head in heads.values() if head.other_branch(branch))
    if stale:
        tx.execute("demote_heads", {"ids": stale})
    return {entity_hash: head for entity_hash, head in heads.items() if not head.other_branch(branch)}


def _plan(rows: list[wire.EntityRow], heads: dict[bytes, Head], refused: set[int]) -> _Plan:
    plan = _Plan()
    for row in rows:
        if id(row) in refused:
            continue
        head = heads.get(row.entity_hash)
        if head is not None:
            plan.increments[head.id] += 1
        elif row.entity_hash in plan.new_rows:
            plan.new_rows[row.entity_hash][1] += 1
        else:
            plan.new_rows[row.entity_hash] = [row, 0]
    return plan


def _insert_new_rows(tx: Tx, rows: list[wire.EntityRow], heads: dict[bytes, Head]) -> tuple[_Plan, list[wire.Rejection]]:
    """COPY the new rows; rows Postgres refuses are found, left out and returned as rejections.

    Leaving a row out changes the plan (an in-batch copy of it may become the new row instead),
    so the plan is rebuilt after each refusal. Each round removes at least one row.
    """
    refused: dict[int, wire.Rejection] = {}
    while True:
        plan = _plan(rows, heads, set(refused))
        items = list(plan.new_rows.values())
        try:
            with tx.savepoint():
                if items:
                    tx.copy("copy_ingestion_logs", _encode(items))
            return plan, list(refused.values())
        except ContentRejected as exc:
            culprits = _find_refused(tx, items) or [(item, str(exc)) for item in items]
            for (row, _), reason in culprits:
                refused[id(row)] = wire.Rejection(row.message, row.index, f"Postgres refused the row: {reason}",
                                                  wire.entity_fields(row))


def _find_refused(tx: Tx, items: list) -> list[tuple[list, str]]:
    """Bisect to the single tuples Postgres refuses (each probe is rolled back)."""
    try:
        tx.probe_copy("copy_ingestion_logs", _encode(items))
        return []
    except ContentRejected as exc:
        if len(items) == 1:
            return [(items[0], str(exc))]
    middle = len(items) // 2
    return _find_refused(tx, items[:middle]) + _find_refused(tx, items[middle:])


def _request_prefix(message: wire.Message) -> bytes:
    return b"".join((
        pgcopy.tuple_start(COPY_COLUMNS), pgcopy.text(message.request_id), pgcopy.bigint(message.ingestion_ts),
        pgcopy.text(message.producer_app_name), pgcopy.text(message.producer_app_version),
        pgcopy.text(message.sdk_name), pgcopy.text(message.sdk_version)))


_TIMESTAMP_AND_ENTITY_LENGTH = struct.Struct(">iqi")  # source_ts (length 8, value), then len(entity)
_NO_TIMESTAMP_AND_ENTITY_LENGTH = struct.Struct(">ii")  # source_ts NULL (length -1), then len(entity)
_HASH_LENGTH = struct.pack(">i", 32)  # entity_hash is always a sha256 digest
_NO_DUPLICATES = pgcopy.integer(0)


def _encode(items: list) -> bytes:
    """Binary COPY payload of [row, in-batch duplicates] items (columns of copy_ingestion_logs).

    The hot loop of the consumer: request columns are encoded once per request, object types once
    per batch, and each tuple's fixed-size parts with one precompiled struct.
    """
    prefixes: dict[int, bytes] = {}
    object_types: dict[str, bytes] = {}
    tuples = []
    for row, duplicates in items:
        prefix = prefixes.get(id(row.message))
        if prefix is None:
            prefix = prefixes[id(row.message)] = _request_prefix(row.message)
        object_type = object_types.get(row.object_type)
        if object_type is None:
            object_type = object_types[row.object_type] = pgcopy.text(row.object_type)
        if row.source_ts is None:
            middle = _NO_TIMESTAMP_AND_ENTITY_LENGTH.pack(-1, len(row.entity))
        else:
            middle = _TIMESTAMP_AND_ENTITY_LENGTH.pack(8, row.source_ts, len(row.entity))
        count = _NO_DUPLICATES if duplicates == 0 else pgcopy.integer(duplicates)
        tuples.append(b"".join((prefix, object_type, middle, row.entity, _HASH_LENGTH, row.entity_hash, count)))
    return pgcopy.stream(tuples)


def _mark_duplicates(tx: Tx, increments: Counter) -> None:
    if increments:
        ids = sorted(increments)
        tx.execute("mark_duplicates", {"ids": ids, "increments": [increments[i] for i in ids]})


def _store_dead_letters(tx: Tx, stream: str, rejections: list[wire.Rejection]) -> None:
    if not rejections:
        return
    rows = []
    for rejection in rejections:
        names = list(rejection.fields)
        rows.append((stream, rejection.message.stream_id.decode("ascii", "replace"), rejection.index,
                     rejection.reason, [bytes(n) for n in names], [bytes(rejection.fields[n]) for n in names]))
    tx.execute_values("insert_dead_letters", rows)
