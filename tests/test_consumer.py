"""The consumer on real Redis and Postgres: normal flow, garbage, takeovers and faults."""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import brotli
import pytest

from reconciler import inbox, sample, streamentry
from reconciler.consumer import Consumer

from .builders import GROUP, STREAM
from .support import push, query, reconciler, scalar, wait_until


@pytest.fixture
def consumer(config):
    role = Consumer(config)
    yield role
    role.shutdown()


def drain(role: Consumer, redis_client, timeout: float = 30.0) -> None:
    """Run the consumer's loop until the stream is empty and nothing is pending."""
    deadline = time.monotonic() + timeout
    while redis_client.xlen(STREAM) or redis_client.xpending(STREAM, GROUP)["pending"]:
        assert time.monotonic() < deadline, "the consumer did not drain the stream"
        role.run_once()


def consumed(redis_client) -> bool:
    return redis_client.xlen(STREAM) == 0 and redis_client.xpending(STREAM, GROUP)["pending"] == 0


@contextmanager
def stop_after(role: Consumer, seconds: float):
    """Ask the role to stop after `seconds`, so a loop that would never end fails the test instead."""
    timer = threading.Timer(seconds, role.request_stop)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


SHAPE = sample.Shape(sites=2, devices_per_site=6)


@pytest.mark.pg
def test_consumes_sdk_requests_plain_and_brotli(consumer, redis_client, dsn):
    entries = list(sample.entries(SHAPE, raw_share=0.5))
    assert {b"encoding" in fields for fields in entries} == {True, False}
    push(redis_client, entries)
    consumer.boot()
    drain(consumer, redis_client)
    assert scalar(dsn, "SELECT count(*) FROM ingestion_logs WHERE state = 1") == SHAPE.entity_count()
    assert scalar(dsn, "SELECT count(*) FROM stream_receipts") == len(entries)
    assert redis_client.xlen(STREAM) == 0  # XDEL after commit: the stream does not grow forever


@pytest.mark.pg
def test_a_new_group_reads_entries_that_were_there_before_it(consumer, redis_client, dsn):
    push(redis_client, sample.entries(sample.Shape(devices_per_site=1)))
    assert not redis_client.exists(STREAM + ":none") and redis_client.xlen(STREAM) > 0
    consumer.boot()  # creates the group now
    drain(consumer, redis_client)
    assert scalar(dsn, "SELECT count(*) FROM ingestion_logs") == sample.Shape(devices_per_site=1).entity_count()


@pytest.mark.pg
def test_resending_the_inventory_dedups_and_requeues(consumer, redis_client, dsn):
    shape = sample.Shape(devices_per_site=2)
    push(redis_client, sample.entries(shape, cycle=0))
    consumer.boot()
    drain(consumer, redis_client)
    query(dsn, "UPDATE ingestion_logs SET state = 3")  # as if applied
    push(redis_client, sample.entries(shape, cycle=1, changed=0.2))  # new timestamps, some descriptions changed
    drain(consumer, redis_client)
    changed = scalar(dsn, "SELECT count(*) FROM ingestion_logs WHERE state = 1 AND requeued_from_state IS NULL")
    requeued = scalar(dsn, "SELECT count(*) FROM ingestion_logs WHERE requeued_from_state = 3")
    assert changed > 0 and requeued > 0
    assert changed + requeued == shape.entity_count()
    assert scalar(dsn, "SELECT count(*) FROM ingestion_logs") == shape.entity_count() + changed


@pytest.mark.pg
def test_garbage_becomes_dead_letters_and_consuming_continues(consumer, redis_client, dsn):
    good = list(sample.entries(sample.Shape(devices_per_site=1)))
    garbage = [
        {b"request": b"\x00\x01\x02 not protobuf", b"ingestion_ts": b"1"},
        {b"request": b"abc", b"encoding": b"br", b"ingestion_ts": b"1"},
        {b"ingestion_ts": b"1"},
        {b"request": good[0][b"request"], b"encoding": b"br", b"ingestion_ts": b"soon"},
        {b"request": brotli.compress(b"{\"entities\": []}"), b"encoding": b"br", b"ingestion_ts": b"1"},
    ]
    push(redis_client, garbage[:3] + good + garbage[3:])
    consumer.boot()
    drain(consumer, redis_client)
    assert scalar(dsn, "SELECT count(*) FROM ingestion_logs") == sample.Shape(devices_per_site=1).entity_count()
    letters = query(dsn, "SELECT reason, field_names, field_values FROM dead_letters ORDER BY id")
    assert len(letters) == len(garbage)
    assert [dict(zip(map(bytes, n), map(bytes, v))) for _, n, v in letters] == garbage
    assert all(reason for reason, _, _ in letters)


@pytest.mark.pg
def test_pending_entries_of_a_dead_consumer_are_taken_over(consumer, redis_client, dsn):
    consumer.boot()
    push(redis_client, sample.entries(sample.Shape(devices_per_site=1)))
    # A consumer that read the entries and died before committing them.
    redis_client.xreadgroup(GROUP, "diode-reconciler-deadhost-1", {STREAM: ">"}, count=100)
    assert redis_client.xpending(STREAM, GROUP)["pending"] > 0
    wait_until(lambda: (consumer.run_once(), consumed(redis_client))[1], timeout=15, what="takeover")
    assert scalar(dsn, "SELECT count(*) FROM ingestion_logs") == sample.Shape(devices_per_site=1).entity_count()
    consumer.stream_group.forget_idle_seconds = 1.0  # as if the hours it takes had passed
    consumer.stream_group._next_takeover = 0
    wait_until(lambda: (consumer.run_once(), len(redis_client.xinfo_consumers(STREAM, GROUP)) == 1)[1],
               timeout=15, what="the dead consumer to be forgotten")


@pytest.mark.pg
def test_only_consumers_silent_for_hours_with_nothing_pending_are_forgotten(consumer, redis_client, caplog):
    """XGROUP DELCONSUMER drops a consumer's pending entries: a replica idle between two reads, or one
    that read entries since XINFO listed it, must keep its name."""
    consumer.boot()
    live, dead = "diode-reconciler-livehost-1", "diode-reconciler-deadhost-1"
    redis_client.xgroup_createconsumer(STREAM, GROUP, live)
    redis_client.xgroup_createconsumer(STREAM, GROUP, dead)
    time.sleep(1.2)  # idle longer than reclaim_idle_seconds (1 s here), far from hours
    consumer.stream_group._next_takeover = 0
    consumer.run_once()  # a full takeover pass, which then tidies the consumer list
    assert {live, dead} <= {info["name"].decode() for info in redis_client.xinfo_consumers(STREAM, GROUP)}

    consumer.stream_group.forget_idle_seconds = 1.0  # as if hours had passed; the live one reads entries meanwhile
    push(redis_client, sample.entries(sample.Shape(devices_per_site=1)))
    redis_client.xreadgroup(GROUP, live, {STREAM: ">"}, count=1)
    consumer.stream_group._next_takeover = 0
    with caplog.at_level(logging.INFO, logger="reconciler.streamgroup"):
        consumer.run_once()
    names = {info["name"].decode() for info in redis_client.xinfo_consumers(STREAM, GROUP)}
    assert live in names and dead not in names
    assert redis_client.xpending(STREAM, GROUP)["consumers"][0]["name"] == live.encode()
    forgotten = [record.consumer for record in caplog.records if getattr(record, "event", "") == "consumer_forgotten"]
    assert forgotten == [dead]


@pytest.mark.pg
def test_entry_ids_beyond_bigint_become_rows_and_so_do_the_auto_ids_after_them(consumer, redis_client, dsn):
    """Redis stream ids go up to 2**64-1 per part. Once a producer XADDs one explicitly, every later
    auto id is above it too: each such entry must become rows like any other (it once became a dead
    letter, and so did everything after it), and receipts must still be pruned after them."""
    entries = list(sample.entries(sample.Shape(devices_per_site=2)))
    consumer.boot()
    redis_client.xadd(STREAM, entries[0], id=b"18446744073709551614-1")
    for fields in entries[1:]:
        redis_client.xadd(STREAM, fields)  # auto ids: 18446744073709551614-2, -3, ...
    with stop_after(consumer, 20):
        drain(consumer, redis_client, timeout=20)
    assert scalar(dsn, "SELECT count(*) FROM dead_letters") == 0
    expected = sum(len(streamentry.decode_entry(b"1-0", fields).rows) for fields in entries)
    assert scalar(dsn, "SELECT count(*) FROM ingestion_logs") == expected
    assert scalar(dsn, "SELECT max(ms)::text FROM stream_receipts") == "18446744073709551614"

    # A redelivery of the first entry is a no-op: its receipt is found.
    assert inbox.write(consumer.db, STREAM,
                       [streamentry.decode_entry(b"18446744073709551614-1", entries[0])]).redelivered == 1
    query(dsn, "UPDATE stream_receipts SET committed_at = now() - interval '1 day'")
    consumer._prune_receipts()
    assert scalar(dsn, "SELECT count(*) FROM stream_receipts") == 0


@pytest.mark.pg
def test_entries_taken_over_while_a_write_is_retried_are_not_written_twice(config, redis_client, dsn):
    """A consumer cut off from Postgres retries its batch; a replica takes the entries over, commits and
    acknowledges them, and their receipts are pruned (an hour later). When Postgres comes back for the
    first consumer, it must leave those entries to the replica instead of counting every entity twice."""
    shape = sample.Shape(devices_per_site=1)
    push(redis_client, sample.entries(shape))
    cut_off, replica = Consumer(config), Consumer(config)
    replica.consumer = "diode-reconciler-replica-1"
    try:
        cut_off.boot()
        replica.boot()
        cut_off.db.close()
        cut_off.db.dsn = "postgresql://postgres@127.0.0.1:1/unreachable"  # refused, as behind a partition
        reader = threading.Thread(target=cut_off.run_once)  # reads the batch, then retries its write
        with stop_after(cut_off, 90):
            reader.start()
            wait_until(lambda: redis_client.xpending(STREAM, GROUP)["pending"], what="the cut-off consumer's read")
            wait_until(lambda: (replica.run_once(), consumed(redis_client))[1], timeout=40,
                       what="the replica to take the entries over")
            query(dsn, "UPDATE stream_receipts SET committed_at = now() - interval '2 hours'")
            replica._prune_receipts()
            assert scalar(dsn, "SELECT count(*) FROM stream_receipts") == 0
            cut_off.db.dsn = dsn
            reader.join(60)
            assert not cut_off.stopping, "the cut-off consumer kept retrying"
        assert scalar(dsn, "SELECT count(*) FROM ingestion_logs") == shape.entity_count()
        assert scalar(dsn, "SELECT sum(duplicate_count) FROM ingestion_logs") == 0
    finally:
        cut_off.request_stop()
        cut_off.shutdown()
        replica.shutdown()


@pytest.mark.pg
def test_a_write_that_keeps_conflicting_backs_off_and_ends_when_stopping(consumer, redis_client, dsn):
    """Conflicts are retried at once no more: a short jittered pause between attempts, and a stop
    request ends the loop, leaving the entries pending for redelivery."""
    query(dsn, """
        CREATE SEQUENCE conflict_attempts;
        CREATE FUNCTION always_conflict() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM nextval('conflict_attempts');
            RAISE unique_violation USING MESSAGE = 'test: another writer got there first';
        END $$;
        CREATE TRIGGER always_conflict BEFORE INSERT ON stream_receipts
        FOR EACH STATEMENT EXECUTE FUNCTION always_conflict()""")
    consumer.boot()
    push(redis_client, sample.entries(sample.Shape(devices_per_site=1)))
    loop = threading.Thread(target=consumer.run_once, daemon=True)
    loop.start()
    time.sleep(2)
    consumer.request_stop()
    loop.join(5)
    assert not loop.is_alive(), "the conflict loop did not end on stop"
    assert 3 <= scalar(dsn, "SELECT last_value FROM conflict_attempts") <= 40
    assert redis_client.xpending(STREAM, GROUP)["pending"] > 0


@pytest.mark.pg
def test_dropped_redis_connections_lose_nothing(consumer, redis_client, dsn):
    consumer.boot()
    entries = list(sample.entries(sample.Shape(sites=2, devices_per_site=4)))
    for chunk in range(0, len(entries), 3):
        push(redis_client, entries[chunk:chunk + 3])
        for client in redis_client.client_list():
            if client["name"] == "reconciler-consumer":
                redis_client.client_kill_filter(_id=client["id"])
        consumer.run_once()
    drain(consumer, redis_client)
    assert scalar(dsn, "SELECT count(*) FROM ingestion_logs") == \
        sample.Shape(sites=2, devices_per_site=4).entity_count()
    assert scalar(dsn, "SELECT sum(duplicate_count) FROM ingestion_logs") == 0


# --- faults with the real `reconciler run` process ---


@pytest.fixture
def acl_user(redis_client):
    name = f"reconciler-test-{uuid.uuid4().hex[:8]}"
    redis_client.acl_setuser(name, enabled=True, passwords=["+secret"], keys=["*"], channels=["*"],
                             categories=["+@all"])
    yield name
    redis_client.acl_deluser(name)


@pytest.mark.subprocess
def test_kill_between_commit_and_ack_creates_no_duplicate(env, tmp_path, redis_client, redis_url, acl_user, dsn):
    shape = sample.Shape(devices_per_site=3)
    entries = list(sample.entries(shape))
    env = {**env, "RECONCILER_REDIS_URL": redis_url.replace("redis://", f"redis://{acl_user}:secret@")}
    redis_client.acl_setuser(acl_user, enabled=True, commands=["-xack"])  # commit will succeed, the ACK will not

    with reconciler(env, tmp_path) as run:
        run.wait_for_event("booted")
        push(redis_client, entries)
        run.wait_for_log("cannot acknowledge the batch in Redis")
        committed = scalar(dsn, "SELECT count(*) FROM stream_receipts")
        run.kill_all()  # kill -9, after commit and before any ACK
    assert committed >= 1 and redis_client.xpending(STREAM, GROUP)["pending"] == committed

    redis_client.acl_setuser(acl_user, enabled=True, commands=["+xack"])
    with reconciler(env, tmp_path) as run:
        wait_until(lambda: consumed(redis_client), what="the redelivery to be acknowledged")
        run.wait_for_log("redelivered entries were already committed")
        run.signal(signal.SIGTERM)
        assert run.wait(20) == 0
    assert scalar(dsn, "SELECT count(*) FROM ingestion_logs") == shape.entity_count()
    assert scalar(dsn, "SELECT sum(duplicate_count) FROM ingestion_logs") == 0


def _postgres_version() -> str:
    return sorted(p.name for p in Path("/etc/postgresql").iterdir())[-1]


@pytest.mark.subprocess
@pytest.mark.chaos  # restarts the machine's Postgres: any other run on it sees that
def test_postgres_restart_mid_ingest_loses_and_duplicates_nothing(env, tmp_path, redis_client, dsn):
    shape = sample.Shape(sites=6, devices_per_site=10)
    entries = list(sample.entries(shape))
    with reconciler(env, tmp_path) as run:
        run.wait_for_event("booted")

        # The last quarter is held back until Postgres is back, so that at least one write meets the
        # connection the restart cut, however fast the first three quarters were consumed.
        held_back = len(entries) - len(entries) // 4

        def produce():
            for chunk in range(0, held_back, 4):
                push(redis_client, entries[chunk:min(chunk + 4, held_back)])
                time.sleep(0.02)

        producer = threading.Thread(target=produce)
        producer.start()
        wait_until(lambda: scalar(dsn, "SELECT count(*) FROM stream_receipts") > len(entries) // 4, what="ingest")
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", _postgres_version(), "main", "restart",
                        "-m", "fast"], check=True, timeout=60)
        producer.join()
        push(redis_client, entries[held_back:])
        wait_until(lambda: consumed(redis_client), timeout=90, what="the consumer to catch up after the restart")
        run.wait_for_log("cannot write the batch to Postgres, will retry")
        run.signal(signal.SIGTERM)
        assert run.wait(20) == 0
    assert scalar(dsn, "SELECT count(*) FROM ingestion_logs") == shape.entity_count()
    assert scalar(dsn, "SELECT count(DISTINCT entity_hash) FROM ingestion_logs") == shape.entity_count()
    assert scalar(dsn, "SELECT sum(duplicate_count) FROM ingestion_logs") == 0
    assert scalar(dsn, "SELECT count(*) FROM dead_letters") == 0


@pytest.mark.pg
def test_queue_table_is_vacuumed_by_reconciler_when_autovacuum_is_off(consumer, dsn):
    consumer.boot()
    server_off = scalar(dsn, "SHOW autovacuum") == "off"
    assert consumer.vacuum.needed == server_off
    consumer.vacuum.needed = True  # what decide() chose on this machine; forced where autovacuum runs
    query(dsn, "INSERT INTO ingestion_logs (object_type, request_id, ingestion_ts, producer_app_name, "
               "producer_app_version, sdk_name, sdk_version, entity, entity_hash) "
               "SELECT 'dcim.site', 'r', 0, 'p', 'v', 's', 'v', '\\x00', sha256(i::text::bytea) "
               "FROM generate_series(1, 5000) i")
    query(dsn, "UPDATE ingestion_logs SET state = 3")  # 5,000 dead row versions, like claims leave
    before = scalar(dsn, "SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 'ingestion_logs'")

    def vacuumed():
        consumer.vacuum._next_check = 0
        consumer.vacuum.tick(consumer.db)
        return scalar(dsn, "SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 'ingestion_logs'") > before

    wait_until(vacuumed, timeout=20, interval=0.5, what="reconciler's VACUUM of ingestion_logs")
