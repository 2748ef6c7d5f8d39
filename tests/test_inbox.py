"""The inbox transaction on a real Postgres: dedup and requeue, redelivery, refused content, races."""

from __future__ import annotations

import threading

import psycopg2
import pytest
from netboxlabs.diode.sdk.diode.v1 import ingester_pb2 as pb

from reconciler import inbox, sample, states, streamentry
from reconciler.db import Database
from reconciler.errors import ConflictError, ContentRejected, DatabaseError

from .builders import STREAM, entry, next_entry_id, site
from .support import query, scalar, wait_until

pytestmark = pytest.mark.pg


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


# A new observation of a prior row in each state: the Go reconciler's rule (docs/go-reconciler.md),
# ERRORED requeued too (docs/schema.md).
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


def test_an_errored_drift_check_stays_a_drift_check_when_seen_again(db, dsn):
    inbox.write(db, STREAM, [entry(site("a"))])
    query(dsn, "UPDATE ingestion_logs SET state = %s, requeued_from_state = %s", (states.ERRORED, states.APPLIED))

    inbox.write(db, STREAM, [entry(site("a"))])

    [(_, state, _, requeued)] = rows(dsn)
    assert (state, requeued) == (states.QUEUED, states.APPLIED)


def test_a_row_waiting_for_a_request_netbox_may_still_run_is_not_requeued_by_a_new_observation(db, dsn):
    """An ERRORED row that gave up on an unanswered request keeps waiting for it when seen again (it was
    QUEUED at once, and sent while that request could still run); so does one planned in another branch."""
    inbox.write(db, STREAM, [entry(site("held")), entry(site("elsewhere"))])
    query(dsn, "UPDATE ingestion_logs SET state = 7, planned_branch = 'old (b1)', "
               "next_attempt_at = now() + interval '5 minutes'")
    until = query(dsn, "SELECT next_attempt_at FROM ingestion_logs ORDER BY id")
    inbox.write(db, STREAM, [entry(site("held")), entry(site("elsewhere"))], branch="new (b2)")
    assert query(dsn, "SELECT state, next_attempt_at, duplicate_count FROM ingestion_logs ORDER BY id") == [
        (states.PENDING_RETRY, until[0][0], 1), (states.PENDING_RETRY, until[1][0], 1)]


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
    broken = streamentry.decode_entry(b"9-1", {b"request": b"\xff\xff", b"ingestion_ts": b"1"})
    outcome = inbox.write(db, STREAM, [broken, entry(site("a"))])
    assert outcome.inserted == 1 and len(outcome.dead_letters) == 1
    [(stream_id, index, reason, names, values)] = query(
        dsn, "SELECT stream_id, entity_index, reason, field_names, field_values FROM dead_letters")
    assert (stream_id, index) == ("9-1", None) and reason.startswith("request is not a diode.v1.IngestRequest")
    assert dict(zip(map(bytes, names), map(bytes, values))) == {b"request": b"\xff\xff", b"ingestion_ts": b"1"}


def test_rows_postgres_refuses_become_dead_letters_and_nothing_else_is_lost(db, dsn):
    """A NUL in a text column and a value too long for its column: only those entities are refused.
    (Decoding cleans such request fields, test_request_fields_a_row_cannot_hold_are_cleaned_and_noted;
    the messages are altered after it, to reach the refusals this guards against.)"""
    good = [entry(site(f"g{i}")) for i in range(6)]
    nul = entry(site("nul"))
    nul.producer_app_name = "bad\x00name"
    long = entry(site("long"))
    long.sdk_version = "1." + "9" * 300
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


def test_request_fields_a_row_cannot_hold_are_cleaned_and_noted(db, dsn):
    """A NUL, over 255 characters or invalid UTF-8 in a request's id, producer or SDK fields once cost
    every entity of the request (or the whole entry): the entities are kept, the fields cleaned, and
    each row says what was cleaned in source_metadata."""
    clean = entry(site("clean"))
    nul = entry(site("nul-1"), site("nul-2"), producer_app_name="bad\x00name")
    long = entry(site("long"), id="r" * 300)
    req = pb.IngestRequest(entities=[site("latin")], id="req-latin", producer_app_name="x")
    raw = req.SerializeToString().replace(b"\x22\x01x", b"\x22\x04caf\xe9")  # field 4, "café" in Latin-1
    latin = streamentry.decode_entry(next_entry_id().encode(),
                                     sample.stream_fields(pb.IngestRequest.FromString(req.SerializeToString()))
                                     | {b"request": raw, b"encoding": b""})
    outcome = inbox.write(db, STREAM, [clean, nul, long, latin])

    assert outcome.dead_letters == [] and outcome.inserted == 5
    stored = {pb.Entity.FromString(bytes(e)).site.name: (request_id, producer, metadata)
              for e, request_id, producer, metadata
              in query(dsn, "SELECT entity, request_id, producer_app_name, source_metadata FROM ingestion_logs")}
    assert stored["clean"] == ("req", "disco", None)
    for name in ("nul-1", "nul-2"):
        assert stored[name] == ("req", "bad\ufffdname",
                                {"cleaned_request_fields": {"producer_app_name": "NUL replaced by U+FFFD"}})
    assert stored["long"] == ("r" * 255, "disco",
                              {"cleaned_request_fields": {"request_id": "truncated from 300 to 255 characters"}})
    assert stored["latin"] == ("req-latin", "caf\ufffd",
                               {"cleaned_request_fields": {"producer_app_name": "invalid UTF-8 replaced by U+FFFD"}})


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


def _entities(message: streamentry.Message) -> list[pb.Entity]:
    return [pb.Entity.FromString(row.entity) for row in message.rows]


def test_content_refused_outside_the_copy_costs_only_its_entry(db, dsn):
    """A counter that would overflow (duplicate_count is an integer) is refused by the UPDATE of the
    duplicates, outside the COPY's savepoint: the batch is written entry by entry and only the entry
    carrying that observation becomes a dead letter, with Postgres' reason; its receipt is kept."""
    inbox.write(db, STREAM, [entry(site("worn"))])
    query(dsn, "UPDATE ingestion_logs SET duplicate_count = 2147483647")
    batch = [entry(site("a")), entry(site("b"), site("worn")), entry(site("c"))]

    outcome = inbox.write(db, STREAM, batch)

    assert (outcome.messages, outcome.inserted, outcome.duplicates) == (3, 2, 0)
    [rejection] = outcome.dead_letters
    assert rejection.message is batch[1] and rejection.index is None
    assert rejection.reason.startswith("Postgres refused the stream entry: ") and "out of range" in rejection.reason
    [(stream_id, index, reason)] = query(dsn, "SELECT stream_id, entity_index, reason FROM dead_letters")
    assert (stream_id, index, reason) == (batch[1].stream_id.decode(), None, rejection.reason)
    names = sorted(pb.Entity.FromString(bytes(e)).site.name for (e,) in query(dsn, "SELECT entity FROM ingestion_logs"))
    assert names == ["a", "c", "worn"]
    assert inbox.write(db, STREAM, batch).redelivered == 3  # every entry has its receipt: a redelivery is a no-op


def test_a_refusal_no_single_row_explains_is_retried_not_dead_lettered(db, dsn):
    """Bisection finds no row Postgres refuses alone (here a trigger refuses statements of more than
    three rows): the rows may be fine, so the write fails to be retried and nothing is dead-lettered."""
    query(dsn, """
        CREATE FUNCTION refuse_big_statements() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF (SELECT count(*) FROM new_rows) > 3 THEN
                RAISE numeric_value_out_of_range USING MESSAGE = 'test: more than three rows in one statement';
            END IF;
            RETURN NULL;
        END $$;
        CREATE TRIGGER refuse_big_statements AFTER INSERT ON ingestion_logs REFERENCING NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION refuse_big_statements()""")

    with pytest.raises(DatabaseError, match="more than three rows") as raised:
        inbox.write(db, STREAM, [entry(*(site(f"s{i}") for i in range(6)))])

    assert not isinstance(raised.value, ContentRejected)  # retried later, never dead-lettered
    assert scalar(dsn, "SELECT count(*) FROM ingestion_logs") == 0
    assert scalar(dsn, "SELECT count(*) FROM dead_letters") == 0
    assert scalar(dsn, "SELECT count(*) FROM stream_receipts") == 0


def _race_in_copy(dsn, orders: list[list[str]], hash_order: bool) -> list[str]:
    """Two writers insert the same new sites in the given orders while a third transaction holds the
    middle one, so that both are inside their COPY when it lets go; returns the conflicts they met."""
    middle = entry(site(orders[0][len(orders[0]) // 2])).rows[0].entity_hash
    blocker = psycopg2.connect(dsn, options="-c search_path=reconciler")
    with blocker.cursor() as cursor:
        cursor.execute("INSERT INTO ingestion_logs (object_type, request_id, ingestion_ts, producer_app_name, "
                       "producer_app_version, sdk_name, sdk_version, entity, entity_hash) "
                       "VALUES ('dcim.site', 'r', 0, 'p', 'v', 's', 'v', '\\x00', %s)", (middle,))
    conflicts: list[str] = []

    def writer(order: list[str]) -> None:
        database = Database(dsn, "reconciler")
        while True:
            try:
                inbox.write(database, STREAM, [entry(*(site(name) for name in order))], hash_order=hash_order)
                break
            except ConflictError as exc:
                conflicts.append(str(exc))
        database.close()

    threads = [threading.Thread(target=writer, args=(order,)) for order in orders]
    for thread in threads:
        thread.start()
    wait_until(lambda: scalar(dsn, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                   "AND wait_event_type = 'Lock'") == 2, what="both writers waiting inside their COPY")
    blocker.rollback()
    blocker.close()
    for thread in threads:
        thread.join(30)
    assert scalar(dsn, "SELECT count(*) FROM ingestion_logs") == len(orders[0])
    assert scalar(dsn, "SELECT sum(duplicate_count) FROM ingestion_logs") == len(orders[0])
    return conflicts


NAMES = [f"s{i:02}" for i in range(40)]


def test_writers_in_opposite_arrival_orders_can_deadlock(dsn):
    """Why a re-plan uses hash order: in arrival order, two writers of the same new entities can each
    hold half of what the other needs on the unique head index (Postgres then aborts one)."""
    conflicts = _race_in_copy(dsn, [NAMES, NAMES[::-1]], hash_order=False)
    assert any("deadlock detected" in conflict for conflict in conflicts)


def test_writers_that_re_plan_in_hash_order_queue_up_instead_of_deadlocking(dsn):
    """hash_order (the consumer's re-plan after a conflict) inserts new rows in one order whatever
    order they arrived in: the second writer waits for the first, then conflicts and re-plans."""
    conflicts = _race_in_copy(dsn, [NAMES, NAMES[::-1]], hash_order=True)
    assert conflicts and not any("deadlock" in conflict for conflict in conflicts)


def test_new_rows_keep_their_arrival_order_unless_re_planned(db, dsn):
    inbox.write(db, STREAM, [entry(*(site(name) for name in NAMES[::-1]))])
    inbox.write(db, STREAM, [entry(*(site(f"re-planned-{n}") for n in range(10)))], hash_order=True)
    stored = [(pb.Entity.FromString(bytes(e)).site.name, bytes(h))
              for e, h in query(dsn, "SELECT entity, entity_hash FROM ingestion_logs ORDER BY id")]
    assert [name for name, _ in stored[:40]] == NAMES[::-1]
    assert [h for _, h in stored[40:]] == sorted(h for _, h in stored[40:])
