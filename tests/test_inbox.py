"""The inbox transaction on a real Postgres: dedup and requeue, redelivery, refused content, races."""

from __future__ import annotations

import itertools
import threading

import pytest
from netboxlabs.diode.sdk import ingester as sdk
from netboxlabs.diode.sdk.diode.v1 import ingester_pb2 as pb

from reconciler import inbox, sample, states, wire
from reconciler.db import Database
from reconciler.errors import ConflictError

from .support import query, scalar

STREAM = "diode.v1.ingest-stream"
_ids = itertools.count(1)


def site(name: str, **extra) -> pb.Entity:
    return sdk.Entity(site=sdk.Site(name=name, slug=name, **extra))


def entry(*entities: pb.Entity, **request_fields) -> wire.Message:
    fields = dict(id="req", producer_app_name="disco", producer_app_version="1", sdk_name="diode-sdk-python",
                  sdk_version="1.14.3")
    fields.update(request_fields)
    req = pb.IngestRequest(entities=list(entities), **fields)
    return wire.decode_entry(f"{next(_ids)}-0".encode(), sample.stream_fields(req))


@pytest.fixture
def db(dsn):
    database = Database(dsn, "reconciler")
    yield database
    database.close()


def rows(dsn) -> list[tuple]:
    return query(dsn, "SELECT id, state, duplicate_count, requeued_from_state FROM ingestion_logs ORDER BY id")


def test_new_entities_become_queued_rows(db, dsn):
    outcome = inbox.write(db, STREAM, [entry(site("a"), site("b"))])
    assert (outcome.inserted, outcome.duplicates, outcome.dead_letters) == (2, 0, [])
    assert [(state, dups) for _, state, dups, _ in rows(dsn)] == [(states.QUEUED, 0), (states.QUEUED, 0)]
    stored = query(dsn, "SELECT object_type, request_id, producer_app_name, sdk_version, entity, entity_hash, "
                        "is_head, external_id IS NOT NULL FROM ingestion_logs ORDER BY id")[0]
    assert stored[:4] == ("dcim.site", "req", "disco", "1.14.3")
    assert pb.Entity.FromString(bytes(stored[4])).site.name == "a"
    assert len(bytes(stored[5])) == 32 and stored[6] and stored[7]


# The reference's dedup table: a new observation of a prior row in each state.
@pytest.mark.parametrize("prior_state, after, requeued_from", [
    (states.QUEUED, states.QUEUED, None),
    (states.OPEN, states.OPEN, None),
    (states.APPLYING, states.APPLYING, None),
    (states.IGNORED, states.IGNORED, None),
    (states.PENDING_RETRY, states.PENDING_RETRY, None),
    (states.APPLIED, states.QUEUED, states.APPLIED),
    (states.FAILED, states.QUEUED, states.FAILED),
    (states.NO_CHANGES, states.QUEUED, states.NO_CHANGES),
    (states.ERRORED, states.QUEUED, states.ERRORED),
], ids=lambda v: states.NAMES.get(v, str(v)))
def test_duplicate_of_a_prior_row(db, dsn, prior_state, after, requeued_from):
    inbox.write(db, STREAM, [entry(site("a"))])
    query(dsn, "UPDATE ingestion_logs SET state = %s, error = '{\"message\": \"x\"}', attempts = 3", (prior_state,))

    outcome = inbox.write(db, STREAM, [entry(site("a"))])

    assert (outcome.inserted, outcome.duplicates) == (0, 1)
    assert outcome.requeued == (1 if requeued_from else 0)
    [(_, state, dups, requeued)] = rows(dsn)
    assert (state, dups, requeued) == (after, 1, requeued_from)
    error, attempts = query(dsn, "SELECT error, attempts FROM ingestion_logs")[0]
    assert (error is None, attempts == 0) == ((True, True) if requeued_from else (False, False))


def test_same_entity_with_other_timestamp_metadata_and_producer_is_a_duplicate(db, dsn):
    inbox.write(db, STREAM, [entry(site("a"))])
    later = site("a")
    later.timestamp.seconds += 86400
    later.site.metadata.update({"agent": "v2"})
    inbox.write(db, STREAM, [entry(later, producer_app_name="other", id="req-2")])
    assert [(state, dups) for _, state, dups, _ in rows(dsn)] == [(states.QUEUED, 1)]


def test_changed_entity_is_a_new_row(db, dsn):
    inbox.write(db, STREAM, [entry(site("a"))])
    inbox.write(db, STREAM, [entry(site("a", description="moved"))])
    assert len(rows(dsn)) == 2


def test_in_batch_duplicates(db, dsn):
    """3 copies of a new entity and 2 of an existing one: one insert; counts {new: 2, prior: 2}."""
    inbox.write(db, STREAM, [entry(site("old"))])
    query(dsn, "UPDATE ingestion_logs SET state = %s", (states.APPLIED,))
    outcome = inbox.write(db, STREAM, [entry(site("new"), site("old"), site("new")), entry(site("new"), site("old"))])
    assert (outcome.inserted, outcome.duplicates, outcome.requeued) == (1, 4, 1)
    got = {bytes(h): (state, dups, requeued) for state, dups, requeued, h in query(
        dsn, "SELECT state, duplicate_count, requeued_from_state, entity_hash FROM ingestion_logs")}
    assert set(got.values()) == {(states.QUEUED, 2, None), (states.QUEUED, 2, states.APPLIED)}


def test_redelivered_entry_is_a_no_op(db, dsn):
    message = entry(site("a"), site("b"))
    inbox.write(db, STREAM, [message])
    again = inbox.write(db, STREAM, [message, entry(site("c"))])
    assert (again.redelivered, again.inserted, again.duplicates) == (1, 1, 0)
    assert [dups for _, _, dups, _ in rows(dsn)] == [0, 0, 0]
    assert scalar(dsn, "SELECT count(*) FROM stream_receipts") == 2  # one per distinct entry


def test_decode_rejections_become_dead_letters_with_their_fields(db, dsn):
    broken = wire.decode_entry(b"9-1", {b"request": b"\xff\xff", b"ingestion_ts": b"1"})
    outcome = inbox.write(db, STREAM, [broken, entry(site("a"))])
    assert outcome.inserted == 1 and len(outcome.dead_letters) == 1
    [(stream_id, index, reason, names, values)] = query(
        dsn, "SELECT stream_id, entity_index, reason, field_names, field_values FROM dead_letters")
    assert (stream_id, index) == ("9-1", None) and reason.startswith("request is not a diode.v1.IngestRequest")
    assert dict(zip(map(bytes, names), map(bytes, values))) == {b"request": b"\xff\xff", b"ingestion_ts": b"1"}


def test_rows_postgres_refuses_become_dead_letters_and_nothing_else_is_lost(db, dsn):
    """A NUL in a text column and a value too long for its column: only those entities are refused."""
    good = [entry(site(f"g{i}")) for i in range(6)]
    nul = entry(site("nul"), producer_app_name="bad\x00name")
    long = entry(site("long"), sdk_version="1." + "9" * 300)
    in_batch_copy = entry(site("nul"))  # same entity as the refused one, from a clean request
    outcome = inbox.write(db, STREAM, good[:3] + [nul] + good[3:] + [long, in_batch_copy])

    assert outcome.inserted == 7  # 6 good + the clean copy of "nul", which takes the refused row's place
    reasons = sorted(rejection.reason for rejection in outcome.dead_letters)
    assert len(reasons) == 2
    assert "0x00" in reasons[0] or "0x00" in reasons[1]
    assert any("too long" in reason for reason in reasons)
    stored = query(dsn, "SELECT stream_id, entity_index, reason FROM dead_letters ORDER BY stream_id")
    assert {row[0] for row in stored} == {nul.stream_id.decode(), long.stream_id.decode()}
    assert all(row[1] == 0 and row[2].startswith("Postgres refused the row") for row in stored)
    names = sorted(pb.Entity.FromString(bytes(e)).site.name for (e,) in query(dsn, "SELECT entity FROM ingestion_logs"))
    assert names == ["g0", "g1", "g2", "g3", "g4", "g5", "nul"]


def test_concurrent_writers_never_create_two_rows_for_one_entity(dsn):
    """Two consumers (replicas) writing overlapping entities at once: one head per hash, counts add up."""
    entities = [site(f"s{i}") for i in range(200)]
    batches = [[entry(*entities[i:i + 50])] for i in range(0, 200, 50)]
    conflicts = []

    def writer(order):
        database = Database(dsn, "reconciler")
        for batch in order:
            while True:
                try:
                    inbox.write(database, STREAM, [entry(*(e for m in batch for e in _entities(m)))])
                    break
                except ConflictError:
                    conflicts.append(1)
        database.close()

    threads = [threading.Thread(target=writer, args=(batches,)), threading.Thread(target=writer, args=(batches[::-1],))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert scalar(dsn, "SELECT count(*) FROM ingestion_logs") == 200
    assert scalar(dsn, "SELECT sum(duplicate_count) FROM ingestion_logs") == 200


def _entities(message: wire.Message) -> list[pb.Entity]:
    return [pb.Entity.FromString(row.entity) for row in message.rows]
