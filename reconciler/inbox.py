"""Writing one read of the stream into the Postgres inbox, exactly once.

One transaction per read: receipts for the stream entries (a redelivered entry is a no-op),
dedup against the current row of each entity hash, one COPY of the new QUEUED rows, bookkeeping
on the duplicates, dead letters for whatever could not become a row. The caller acknowledges the
entries in Redis only after this returns, i.e. after the commit.

What Postgres refuses for its content never blocks a read: a row refused by the COPY is found by
bisection and dead-lettered alone; anything else refused (a counter out of range) sends the read
back entry by entry, so that only the entry it belongs to becomes a dead letter.
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import orjson

from . import pgcopy, streamentry
from .db import Database, Tx
from .errors import ContentRejected, DatabaseError
from .states import CHECK_ON_DUPLICATE, REQUEUE_ON_DUPLICATE

COPY_COLUMNS = 12  # the column list of copy_ingestion_logs


@dataclass
class Written:
    """What one write did, for logs and metrics."""

    messages: int = 0
    redelivered: int = 0  # entries already committed earlier: no-ops
    entities: int = 0
    inserted: int = 0
    duplicates: int = 0
    requeued: int = 0
    dead_letters: list[streamentry.Rejection] = field(default_factory=list)

    def add(self, other: Written) -> None:
        """Add what another write did: counts add up, dead letters are appended."""
        for name in (f.name for f in fields(self)):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class _Placement:
    """Where each row of a batch goes: a new row per entity hash without a head (later copies in the
    batch counted on it), or one more observation of its head."""

    new_rows: dict[bytes, streamentry.EntityRow] = field(default_factory=dict)  # hash -> the row inserted
    copies: Counter = field(default_factory=Counter)  # hash -> in-batch duplicates of a new row
    increments: Counter = field(default_factory=Counter)  # head id -> observations


def write(db: Database, stream: str, messages: list[streamentry.Message], branch: str | None = None,
          hash_order: bool = False, check: bool = False) -> Written:
    """Commit the rows and dead letters of these stream entries; safe to call again after a crash.

    `branch` is today's default branch as rows record it ("<name> (<id>)", "" for main), or None
    while it is not known: then every existing row of an entity absorbs new observations.

    `check`: an APPLIED or NO_CHANGES row seen again waits in CHECKING for the change-log reader
    (driftchecks.py) instead of going back to QUEUED.

    New rows get their ids in arrival order. With `hash_order` (a re-plan after a ConflictError) they
    are inserted in entity-hash order instead: writers that re-plan then meet on the unique head index
    in one order (one waits, then conflicts) instead of each holding what the other needs (a deadlock,
    only detected after deadlock_timeout). Not always: ids would then lose the arrival order that
    claims follow, which keeps the entities of one request together in a poll worker's batch.
    """
    try:
        return _write_batch(db, stream, messages, branch, hash_order, check)
    except ContentRejected as exc:
        if len(messages) == 1:
            return _refuse_entry(db, stream, messages[0], exc)
        return _write_one_by_one(db, stream, messages, branch, hash_order, check)


def _write_one_by_one(db: Database, stream: str, messages: list[streamentry.Message], branch: str | None,
                      hash_order: bool, check: bool) -> Written:
    """Postgres refused something outside the COPY's savepoint, where the offending row is unknown: one
    transaction per entry finds its entry. Rare (a counter out of range), so the extra commits do not
    matter; entries committed before a conflict are redelivered no-ops when the caller re-plans."""
    written = Written()
    for message in messages:
        written.add(write(db, stream, [message], branch, hash_order, check))
    return written


def _refuse_entry(db: Database, stream: str, message: streamentry.Message, exc: ContentRejected) -> Written:
    """The whole entry as a dead letter with Postgres' reason, and its receipt (a redelivery stays a no-op)."""
    refused = streamentry.Message(stream_id=message.stream_id, fields=message.fields)
    refused.rejections.append(streamentry.Rejection(message, None, f"Postgres refused the stream entry: {exc}",
                                                    message.fields, streamentry.POSTGRES_REFUSED))
    return _write_batch(db, stream, [refused])


def _write_batch(db: Database, stream: str, messages: list[streamentry.Message], branch: str | None = None,
                 hash_order: bool = False, check: bool = False) -> Written:
    with db.transaction() as tx:
        fresh = _claim_receipts(tx, stream, messages)
        written = Written(messages=len(messages), redelivered=len(messages) - len(fresh))
        rows = [row for message in fresh for row in message.rows]
        written.dead_letters = [rejection for message in fresh for rejection in message.rejections]
        written.entities = sum(message.entity_count for message in fresh)
        heads = _lock_heads(tx, rows, branch)
        placement, refused = _insert_new_rows(tx, rows, heads, hash_order)
        written.dead_letters += refused
        written.requeued = _mark_duplicates(tx, placement.increments, heads, check)
        written.inserted = len(placement.new_rows)
        written.duplicates = len(rows) - len(refused) - written.inserted
        _store_dead_letters(tx, stream, written.dead_letters)
    return written


def _claim_receipts(tx: Tx, stream: str, messages: list[streamentry.Message]) -> list[streamentry.Message]:
    """The entries not committed before."""
    keys = [streamentry.stream_id_parts(m.stream_id) for m in messages]
    claimed = {(int(ms), int(seq)) for ms, seq in tx.fetchall("claim_receipts", {
        "stream": stream, "ms": [ms for ms, _ in keys], "seq": [seq for _, seq in keys],
        "entities": [m.entity_count for m in messages]})}
    return [m for m, key in zip(messages, keys) if key in claimed]


class Head(NamedTuple):
    """The current row of an entity hash."""

    id: int
    state: int
    planned_branch: str | None
    held: bool  # it waits for a request NetBox may still be working on (0009)

    def other_branch(self, branch: str | None) -> bool:
        """Finished in another branch than today's: says nothing about today's branch. A held row stays
        the head: a new row beside it would have its entity sent while that request may still run."""
        return (branch is not None and self.planned_branch is not None and self.planned_branch != branch
                and self.state in REQUEUE_ON_DUPLICATE and not self.held)


def _lock_heads(tx: Tx, rows: list[streamentry.EntityRow], branch: str | None) -> dict[bytes, Head]:
    """{hash: head} for the hashes that already have a row in today's branch, locked until commit.

    Heads finished in another branch are demoted here, so these entities become new rows.
    """
    if not rows:
        return {}
    hashes = b"".join(sorted({row.entity_hash for row in rows}))  # sorted: neighbouring probes share index pages
    heads = {bytes(entity_hash): Head(head_id, state, planned, held)
             for head_id, entity_hash, state, planned, held in tx.fetchall("lock_heads", {"hashes": hashes})}
    stale = sorted(head.id for head in heads.values() if head.other_branch(branch))
    if stale:
        tx.execute("demote_heads", {"ids": stale})
    return {entity_hash: head for entity_hash, head in heads.items() if not head.other_branch(branch)}


def _place(rows: list[streamentry.EntityRow], heads: dict[bytes, Head], refused: set[int]) -> _Placement:
    placement = _Placement()
    for row in rows:
        if id(row) in refused:
            continue
        head = heads.get(row.entity_hash)
        if head is not None:
            placement.increments[head.id] += 1
        elif row.entity_hash in placement.new_rows:
            placement.copies[row.entity_hash] += 1
        else:
            placement.new_rows[row.entity_hash] = row
    return placement


def _insert_new_rows(tx: Tx, rows: list[streamentry.EntityRow], heads: dict[bytes, Head],
                     hash_order: bool = False) -> tuple[_Placement, list[streamentry.Rejection]]:
    """COPY the new rows (in arrival order, or in hash order, see write); rows Postgres refuses are
    found, left out and returned as rejections.

    Leaving a row out changes the placement (an in-batch copy of it may become the new row instead),
    so it is redone after each refusal. Each round removes at least one row.
    """
    refused: dict[int, streamentry.Rejection] = {}
    while True:
        placement = _place(rows, heads, set(refused))
        order = sorted(placement.new_rows) if hash_order else placement.new_rows
        items = [(placement.new_rows[entity_hash], placement.copies[entity_hash]) for entity_hash in order]
        try:
            with tx.savepoint():
                if items:
                    tx.copy("copy_ingestion_logs", _encode(items))
            return placement, list(refused.values())
        except ContentRejected as exc:
            culprits = _find_refused(tx, items)
            if not culprits:
                # Refused together, yet no row alone (a limit of the statement, a trigger, a state that
                # passed): the rows may well be fine, and a dead letter would take them out of the inbox.
                raise DatabaseError(f"Postgres refused the batch's new rows but none of them alone: {exc}") from exc
            for (row, _), reason in culprits:
                refused[id(row)] = streamentry.Rejection(row.message, row.index, f"Postgres refused the row: {reason}",
                                                         streamentry.entity_fields(row), streamentry.POSTGRES_REFUSED)


def _find_refused(tx: Tx, items: list) -> list[tuple[tuple, str]]:
    """Bisect to the single tuples Postgres refuses (each probe is rolled back)."""
    try:
        tx.probe_copy("copy_ingestion_logs", _encode(items))
        return []
    except ContentRejected as exc:
        if len(items) == 1:
            return [(items[0], str(exc))]
    middle = len(items) // 2
    return _find_refused(tx, items[:middle]) + _find_refused(tx, items[middle:])


def _request_prefix(message: streamentry.Message) -> bytes:
    # source_metadata says which request fields were cleaned to be storable (streamentry._read_header).
    metadata = orjson.dumps({"cleaned_request_fields": message.cleaned}) if message.cleaned else None
    return b"".join((
        pgcopy.tuple_start(COPY_COLUMNS), pgcopy.text(message.request_id), pgcopy.bigint(message.ingestion_ts),
        pgcopy.text(message.producer_app_name), pgcopy.text(message.producer_app_version),
        pgcopy.text(message.sdk_name), pgcopy.text(message.sdk_version), pgcopy.jsonb(metadata)))


_TIMESTAMP_AND_ENTITY_LENGTH = struct.Struct(">iqi")  # source_ts (length 8, value), then len(entity)
_NO_TIMESTAMP_AND_ENTITY_LENGTH = struct.Struct(">ii")  # source_ts NULL (length -1), then len(entity)
_HASH_LENGTH = struct.pack(">i", 32)  # entity_hash is always a sha256 digest
_NO_DUPLICATES = pgcopy.integer(0)


def _encode(items: list) -> bytes:
    """Binary COPY payload of (row, in-batch duplicates) items (columns of copy_ingestion_logs).

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


def _mark_duplicates(tx: Tx, increments: Counter, heads: dict[bytes, Head], check: bool) -> int:
    """Count the new observations on their heads; returns how many finished heads went back to QUEUED
    or, with `check`, to CHECKING.

    Which states are requeued is decided here, from the heads lock_heads locked (their state cannot
    change before commit), so REQUEUE_ON_DUPLICATE and CHECK_ON_DUPLICATE are the one definition of
    those sets.
    """
    if not increments:
        return 0
    states = {head.id: head.state for head in heads.values()}
    ids = sorted(increments)
    requeue = [states[i] in REQUEUE_ON_DUPLICATE for i in ids]
    checked = [check and states[i] in CHECK_ON_DUPLICATE for i in ids]
    tx.execute("mark_duplicates", {"ids": ids, "increments": [increments[i] for i in ids], "requeue": requeue,
                                   "check": checked})
    return sum(requeue)


def _store_dead_letters(tx: Tx, stream: str, rejections: list[streamentry.Rejection]) -> None:
    if not rejections:
        return
    rows = []
    for rejection in rejections:
        names = list(rejection.fields)
        rows.append((stream, rejection.message.stream_id.decode("ascii", "replace"), rejection.index,
                     rejection.reason, [bytes(n) for n in names], [bytes(rejection.fields[n]) for n in names]))
    tx.execute_values("insert_dead_letters", rows)
