"""The operator commands run as `bin/reconciler` subprocesses against a known database and stream:
`status` (text and --json), `retry`, `dead-letters list|show|replay|purge`, `show`, and the process
heartbeats `status` lists."""

from __future__ import annotations

import json
import os
import re
import signal
import socket

import pytest
from netboxlabs.diode.sdk import ingester as sdk
from netboxlabs.diode.sdk.diode.v1 import ingester_pb2 as pb

from reconciler import errors, processes, sample, states
from reconciler.db import Database
from reconciler.ops import deadletters, retry

from .builders import GROUP, STREAM, enqueue, next_entry_id, request, site
from .faultserver import FaultServer, Step
from .support import cli, cli_json, push, query, reconciler, scalar, wait_until

STAGING = {"id": "td5smq0f", "name": "staging"}
pytestmark = pytest.mark.plugin(branch=STAGING)  # the `plugin` fixture's default branch


# --- helpers ---


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def device(name: str) -> pb.Entity:
    return sdk.Entity(device=sdk.Device(name=name, site=sdk.Site(name="dc-1", slug="dc-1"), role="access",
                                        device_type=sdk.DeviceType(model="EX4300",
                                                                   manufacturer=sdk.Manufacturer(name="Juniper"))))


def set_row(dsn: str, row_id: int, assignments: str, params: tuple = ()) -> None:
    query(dsn, f"UPDATE ingestion_logs SET {assignments} WHERE id = %s", (*params, row_id))


def insert_dead_letter(dsn: str, fields: dict[bytes, bytes], reason: str = "test", age: str = "0 s",
                       entity_index: int | None = None) -> int:
    return scalar(dsn, "INSERT INTO dead_letters (stream, stream_id, entity_index, reason, field_names, field_values, "
                       "created_at) VALUES (%s, %s, %s, %s, %s, %s, now() - %s::interval) RETURNING id",
                  (STREAM, next_entry_id(), entity_index, reason, [name for name in fields],
                   [value for value in fields.values()], age))


def snapshot(dsn: str) -> list[tuple]:
    return query(dsn, "SELECT l.*, (SELECT count(*) FROM dead_letters) FROM ingestion_logs AS l ORDER BY id")


@pytest.fixture
def plugin_env(env, plugin):
    return {**env, "RECONCILER_NETBOX_URL": plugin.url, "RECONCILER_NETBOX_TOKEN": "t0ken"}


# --- status ---


@pytest.fixture
def known_state(dsn, redis_client):
    """Rows in every interesting state, two dead letters, a stream with a group, and heartbeats."""
    ids = enqueue(dsn, *[site(f"s{n}") for n in range(9)])
    set_row(dsn, ids[0], "updated_at = now() - interval '90 seconds'")  # the oldest QUEUED row
    set_row(dsn, ids[3], "state = 8, lease_owner = 'h:1:worker-1', lease_expires_at = now() + interval '10 min'")
    set_row(dsn, ids[4], "state = 8, lease_owner = 'h:2:worker-2', lease_expires_at = now() - interval '5 s'")
    set_row(dsn, ids[5], "state = 9, next_attempt_at = now() + interval '30 s'")
    set_row(dsn, ids[6], "state = 9, next_attempt_at = now() + interval '1 hour'")
    set_row(dsn, ids[7], "state = 4")
    set_row(dsn, ids[8], "state = 3")
    for _ in range(2):
        insert_dead_letter(dsn, {b"request": b"\xff garbage", b"ingestion_ts": b"1"})
    push(redis_client, [{b"n": str(n).encode()} for n in range(3)])
    redis_client.xgroup_create(STREAM, GROUP, id="0")
    redis_client.xreadgroup(GROUP, "c1", {STREAM: ">"}, count=1)  # one pending, two unread
    database = Database(dsn, "reconciler")
    processes.report_alive(database, "worker 1")
    database.close()
    query(dsn, "INSERT INTO processes VALUES ('other-host', 42, 'consumer', now() - interval '1 hour', now()), "
               "('gone-host', 7, 'worker 2', now() - interval '2 hours', now() - interval '1 hour')")
    return ids


@pytest.mark.subprocess
def test_status_json_matches_the_known_state(plugin_env, known_state):
    report = cli_json(plugin_env, "status")

    assert report["inbox"]["states"] == {"QUEUED": 3, "OPEN": 0, "APPLIED": 1, "FAILED": 1, "NO_CHANGES": 0,
                                         "IGNORED": 0, "ERRORED": 0, "APPLYING": 2, "PENDING_RETRY": 2,
                                         "CHECKING": 0}
    assert report["inbox"]["total"] == 9
    assert 85 <= report["inbox"]["oldest_queued_seconds"] < 300
    assert (report["inbox"]["in_flight"], report["inbox"]["expired_leases"]) == (2, 1)
    assert (report["inbox"]["pending_retry"], report["inbox"]["pending_retry_due_soon"]) == (2, 1)
    assert report["dead_letters"]["count"] == 2
    assert report["stream"]["length"] == 3
    group = report["stream"]["group"]
    assert (group["name"], group["lag"], group["pending"], group["consumers"]) == (GROUP, 2, 1, 1)
    assert report["default_branch"] == {"branch": {"id": "td5smq0f", "name": "staging"}}
    live = {(p["host"], p["role"]) for p in report["processes"]["live"]}
    assert live == {(socket.gethostname(), "worker 1"), ("other-host", "consumer")}
    assert report["schema"]["version"] == report["schema"]["wanted"]
    drift = report["drift"]
    assert (drift["mode"], drift["fallback_to_always"], drift["high_water"], drift["checking"]) == (
        "changes", "no [netbox] api_token is configured", None, 0)


@pytest.mark.subprocess
def test_status_text_is_a_readable_table_of_the_same(plugin_env, known_state):
    done = cli(plugin_env, "status")

    assert done.returncode == 0, done.stderr
    text = done.stdout
    for expected in (r"QUEUED\s+3\n", r"APPLYING\s+2\n", r"PENDING_RETRY\s+2\n", r"total\s+9\n",
                     r"oldest QUEUED\s+1m3\ds", r"in flight\s+2 \(1 with an expired lease\)",
                     r"PENDING_RETRY\s+2 \(1 due within 60s\)", r"dead letters\s+2 \(newest",
                     r"length\s+3\n", r"consumer group\s+diode-reconciler: lag 2, pending 1, consumers 1",
                     r"default branch\s+staging \(td5smq0f\)", r"other-host\s+42\s+consumer",
                     r"Drift checks \(mode changes, max age 24 h\)\n\s+FALLBACK\s+every re-observation is planned "
                     r"again, as mode always: no \[netbox\] api_token is configured\n",
                     rf"{re.escape(socket.gethostname())}\s+\d+\s+worker 1"):
        assert re.search(expected, text), f"{expected!r} not in:\n{text}"
    assert "gone-host" not in text and "Traceback" not in done.stderr


@pytest.mark.subprocess
def test_status_says_unknown_when_redis_cannot_compute_the_lag(plugin_env, redis_client, dsn):
    ids = push(redis_client, [{b"n": b"1"}, {b"n": b"2"}, {b"n": b"3"}])
    redis_client.xgroup_create(STREAM, GROUP, id="0")
    redis_client.xdel(STREAM, ids[1])  # an entry deleted before the group read it: Redis has no lag to give

    assert cli_json(plugin_env, "status")["stream"]["group"]["lag"] is None
    assert re.search(r"consumer group\s+diode-reconciler: lag unknown, pending 0", cli(plugin_env, "status").stdout)


@pytest.mark.subprocess
def test_status_reports_redis_and_netbox_down_and_still_exits_zero(env, dsn):
    enqueue(dsn, site("a"))
    down = {**env, "RECONCILER_REDIS_URL": f"redis://127.0.0.1:{closed_port()}/0",
            "RECONCILER_NETBOX_URL": f"http://127.0.0.1:{closed_port()}/api/plugins/diode",
            "RECONCILER_NETBOX_TOKEN": "t0ken"}

    done = cli(down, "status")

    assert done.returncode == 0, done.stderr
    assert re.search(r"Redis stream diode.v1.ingest-stream\n  unavailable:\s+Error 111 connecting", done.stdout)
    assert re.search(r"default branch\s+unknown \(default-branch/ failed after 1 attempts: .*Connection refused",
                     done.stdout)
    assert re.search(r"QUEUED\s+1\n", done.stdout) and "Traceback" not in done.stderr
    report = cli_json(down, "status")
    assert "error" in report["stream"] and "error" in report["default_branch"]
    assert report["inbox"]["states"]["QUEUED"] == 1


@pytest.mark.subprocess
def test_status_exits_4_when_postgres_is_unreachable_and_still_shows_the_stream(env, redis_client):
    push(redis_client, [{b"n": b"1"}])
    down = {**env, "RECONCILER_POSTGRES_DSN": f"postgresql://postgres@127.0.0.1:{closed_port()}/reconciler"}

    done = cli(down, "status")

    assert done.returncode == errors.RET_CONNECT
    assert re.search(r"Postgres inbox\n  unavailable:\s+cannot connect to Postgres", done.stdout)
    assert re.search(r"length\s+1\n", done.stdout) and "Traceback" not in done.stderr
    result = cli(down, "status", "--json")
    assert result.returncode == errors.RET_CONNECT
    report = json.loads(result.stdout)
    assert report["postgres"]["reachable"] is False and "error" in report["inbox"]
    assert report["stream"]["length"] == 1


@pytest.mark.subprocess
def test_status_points_at_migrate_when_the_schema_is_behind(env, dsn):
    query(dsn, "DELETE FROM schema_migrations WHERE version = (SELECT max(version) FROM schema_migrations)")
    done = cli(env, "status")
    assert done.returncode == 0 and "run `reconciler migrate`" in done.stdout


# --- heartbeats ---


@pytest.mark.pg
def test_heartbeats_are_written_at_most_every_few_seconds_and_listed_while_recent(dsn):
    database = Database(dsn, "reconciler")
    query(dsn, "INSERT INTO processes VALUES ('old-host', 1, 'consumer', now() - interval '3 days', "
               "now() - interval '2 days')")

    assert processes.report_alive(database, "consumer") is True
    assert processes.report_alive(database, "consumer") is False  # within HEARTBEAT_INTERVAL: no write
    [process] = processes.live_processes(database, within_seconds=60)
    database.close()

    assert (process.host, process.pid, process.role) == (socket.gethostname(), os.getpid(), "consumer")
    assert process.seconds_since_seen < 60
    # A new process's first heartbeat prunes processes silent for a day.
    assert scalar(dsn, "SELECT count(*) FROM processes WHERE host = 'old-host'") == 0


def test_a_heartbeat_never_raises_when_postgres_is_down():
    database = Database(f"postgresql://postgres@127.0.0.1:{closed_port()}/x", "reconciler")
    assert processes.report_alive(database, "worker 9") is False


# --- retry ---


@pytest.fixture
def failed_rows(dsn):
    """An old FAILED site, an ERRORED drift check, a fresh FAILED device, an APPLIED site and a
    superseded FAILED row (its entity has a newer head)."""
    old_failed, errored, applied, superseded = enqueue(dsn, site("a"), site("b"), site("c"), site("e"))
    [fresh_device] = enqueue(dsn, device("sw-1"))
    set_row(dsn, old_failed, "state = 4, error = '{\"message\": \"refused\"}', attempts = 1, "
                             "updated_at = now() - interval '2 hours'")
    set_row(dsn, errored, "state = 7, attempts = 8, requeued_from_state = 3, next_attempt_at = now(), "
                          "lease_expiries = 2, error = '{\"message\": \"plugin down\"}'")
    set_row(dsn, fresh_device, "state = 4, attempts = 1")
    set_row(dsn, applied, "state = 3")
    set_row(dsn, superseded, "state = 4, is_head = false")
    [new_head] = enqueue(dsn, site("e"))
    return {"old_failed": old_failed, "errored": errored, "device": fresh_device, "applied": applied,
            "superseded": superseded, "new_head": new_head}


def row(dsn, row_id) -> dict:
    names = ("state", "attempts", "error", "next_attempt_at", "lease_owner", "requeued_from_state")
    return dict(zip(names, query(dsn, f"SELECT {', '.join(names)} FROM ingestion_logs WHERE id = %s", (row_id,))[0]))


@pytest.mark.subprocess
def test_retry_dry_run_changes_nothing_and_says_what_would_change(env, dsn, failed_rows):
    before = snapshot(dsn)

    done = cli(env, "retry", "--dry-run")

    assert done.returncode == 0, done.stderr
    assert snapshot(dsn) == before
    assert "dry run: would requeue 3 rows to QUEUED (nothing changed)" in done.stdout
    assert re.search(r"FAILED\s+dcim\.device\s+1\n", done.stdout)
    assert re.search(r"FAILED\s+dcim\.site\s+1\n", done.stdout)
    assert re.search(r"ERRORED\s+dcim\.site\s+1\n", done.stdout)
    assert "1 matching rows are not the current row of their entity" in done.stdout


@pytest.mark.subprocess
def test_retry_filters_by_object_type_state_and_age(env, dsn, failed_rows):
    by_type = cli_json(env, "retry", "--object-type", "dcim.device")
    assert by_type["requeued"] == 1
    assert by_type["by_state_and_object_type"] == [{"state": "FAILED", "object_type": "dcim.device", "rows": 1}]
    assert row(dsn, failed_rows["device"])["state"] == states.QUEUED

    assert cli_json(env, "retry", "--state", "failed", "--newer-than", "1h")["requeued"] == 0
    by_age = cli_json(env, "retry", "--state", "failed", "--older-than", "1h")
    assert by_age["by_state_and_object_type"] == [{"state": "FAILED", "object_type": "dcim.site", "rows": 1}]
    assert row(dsn, failed_rows["errored"])["state"] == states.ERRORED


@pytest.mark.subprocess
def test_retry_requeues_like_a_fresh_row_and_leaves_the_rest_alone(env, dsn, failed_rows):
    done = cli(env, "retry")

    assert done.returncode == 0, done.stderr
    assert "requeued 3 rows to QUEUED:" in done.stdout
    assert row(dsn, failed_rows["old_failed"]) == {"state": states.QUEUED, "attempts": 0, "error": None,
                                                   "next_attempt_at": None, "lease_owner": None,
                                                   "requeued_from_state": states.FAILED}
    # An ERRORED drift check stays a drift check: its plan is judged against the APPLIED object.
    assert row(dsn, failed_rows["errored"]) == {"state": states.QUEUED, "attempts": 0, "error": None,
                                                "next_attempt_at": None, "lease_owner": None,
                                                "requeued_from_state": states.APPLIED}
    assert scalar(dsn, "SELECT lease_expiries FROM ingestion_logs WHERE id = %s", (failed_rows["errored"],)) == 0
    assert row(dsn, failed_rows["applied"])["state"] == states.APPLIED
    assert row(dsn, failed_rows["superseded"])["state"] == states.FAILED
    assert cli(env, "retry").stdout.startswith("no matching FAILED or ERRORED rows to requeue; nothing changed")


@pytest.mark.subprocess
def test_retry_of_a_row_that_gave_up_on_a_request_netbox_may_still_run_waits_for_it(env, dsn):
    """A row alone whose requests kept going unanswered ends ERRORED with the moment NetBox can no longer
    be working on the last one: a retry must not have it sent before then."""
    [row_id] = enqueue(dsn, site("slow"))
    set_row(dsn, row_id, "state = 7, attempts = 8, timeouts = 4, answer_lost_at = now(), "
                         "next_attempt_at = now() + interval '5 minutes', error = '{\"message\": \"no answer\"}'")
    until = scalar(dsn, "SELECT next_attempt_at FROM ingestion_logs WHERE id = %s", (row_id,))
    assert cli(env, "retry").returncode == 0
    assert row(dsn, row_id)["state"] == states.PENDING_RETRY and row(dsn, row_id)["next_attempt_at"] == until


@pytest.mark.subprocess
def test_retried_rows_are_planned_and_applied_by_a_running_reconciler(plugin_env, dsn, failed_rows, tmp_path):
    assert cli(plugin_env, "retry").returncode == 0

    with reconciler({**plugin_env, "RECONCILER_WORKERS_COUNT": "1"}, tmp_path):
        retried = (failed_rows["old_failed"], failed_rows["errored"], failed_rows["device"])
        wait_until(lambda: all(row(dsn, i)["state"] == states.APPLIED for i in retried), timeout=60,
                   what=lambda: f"retried rows applied: {[row(dsn, i) for i in retried]}")
    assert row(dsn, failed_rows["superseded"])["state"] == states.FAILED


@pytest.mark.subprocess
def test_retry_goes_in_batches_and_counts_on_a_terminal(env, dsn):
    ids = enqueue(dsn, *[site(f"b{n}") for n in range(5)])
    query(dsn, "UPDATE ingestion_logs SET state = 4 WHERE id = ANY(%s)", (ids,))
    database = Database(dsn, "reconciler")
    selection = retry.Selection((states.FAILED,))
    assert sum(retry.requeue(database, selection, batch=2).values()) == 5
    database.close()

    query(dsn, "UPDATE ingestion_logs SET state = 4 WHERE id = ANY(%s)", (ids,))
    leader, follower = os.openpty()
    try:
        done = cli(env, "retry", stderr=follower)
        os.close(follower)
        progress = os.read(leader, 4096).decode()
    finally:
        os.close(leader)
    assert done.returncode == 0 and "requeued 5 rows" in done.stdout
    assert "\rrequeued 5/5" in progress


# --- dead letters ---


@pytest.mark.subprocess
def test_a_dead_letter_replayed_through_a_running_consumer_becomes_queued_rows(env, dsn, redis_client, tmp_path):
    """Dead-lettered for a limit (max_entities 1), replayed once the limit is raised."""
    with reconciler({**env, "RECONCILER_REDIS_MAX_ENTITIES": "1"}, tmp_path):
        push(redis_client, [sample.stream_fields(request(site("r1"), site("r2")))])
        wait_until(lambda: scalar(dsn, "SELECT count(*) FROM dead_letters") == 1, what="a dead letter")
    [(letter_id, reason)] = query(dsn, "SELECT id, reason FROM dead_letters")
    assert "carries 2 entities; at most 1" in reason

    dry = cli(env, "dead-letters", "replay", "--dry-run", str(letter_id))
    assert dry.returncode == 0 and "dry run: would replay 1 dead letters" in dry.stdout
    assert scalar(dsn, "SELECT count(*) FROM dead_letters") == 1 and redis_client.xlen(STREAM) == 0

    with reconciler(env, tmp_path):
        done = cli(env, "dead-letters", "replay", str(letter_id))
        assert done.returncode == 0, done.stderr
        assert re.search(r"replayed 1 dead letters \(\d+ bytes\) into diode.v1.ingest-stream and deleted them",
                         done.stdout)
        wait_until(lambda: scalar(dsn, "SELECT count(*) FROM ingestion_logs WHERE state = 1") == 2,
                   what="two QUEUED rows from the replayed entry")
    assert scalar(dsn, "SELECT count(*) FROM dead_letters") == 0


@pytest.mark.subprocess
def test_replay_re_adds_the_stored_fields_byte_for_byte(env, dsn, redis_client):
    fields = sample.stream_fields(request(site("x")))
    letter_id = insert_dead_letter(dsn, fields)

    replayed = cli_json(env, "dead-letters", "replay", "--all")

    assert replayed["ids"] == [letter_id] and len(replayed["new_stream_ids"]) == 1
    [(entry_id, entry_fields)] = redis_client.xrange(STREAM)
    assert entry_id.decode() == replayed["new_stream_ids"][0] and entry_fields == fields
    assert scalar(dsn, "SELECT count(*) FROM dead_letters") == 0


@pytest.mark.subprocess
def test_replaying_a_still_bad_entity_loses_nothing(env, dsn, redis_client, tmp_path):
    with reconciler(env, tmp_path):
        push(redis_client, [sample.stream_fields(request(site("good"), sdk.Entity()))])
        wait_until(lambda: scalar(dsn, "SELECT count(*) FROM dead_letters") == 1, what="a dead letter")
        [(first_id, first_stream_id, reason)] = query(dsn, "SELECT id, stream_id, reason FROM dead_letters")

        assert cli(env, "dead-letters", "replay", str(first_id)).returncode == 0
        wait_until(lambda: scalar(dsn, "SELECT count(*) FROM dead_letters WHERE id > %s", (first_id,)) == 1,
                   what="the replayed entity dead-lettered again")
    [(stream_id, again)] = query(dsn, "SELECT stream_id, reason FROM dead_letters")
    # The replayed entry holds just that entity, so it is entity 0 of its new entry.
    assert (reason, again) == ("entity 1 has no entity type set", "entity 0 has no entity type set")
    assert stream_id != first_stream_id
    assert scalar(dsn, "SELECT count(*) FROM ingestion_logs") == 1


@pytest.mark.subprocess
def test_replay_fails_cleanly_when_redis_is_down(env, dsn):
    letter_id = insert_dead_letter(dsn, sample.stream_fields(request(site("x"))))
    down = {**env, "RECONCILER_REDIS_URL": f"redis://127.0.0.1:{closed_port()}/0"}

    done = cli(down, "dead-letters", "replay", str(letter_id))

    assert done.returncode == errors.RET_CONNECT and "Traceback" not in done.stderr
    assert "replay stopped, Redis failed" in done.stderr
    assert scalar(dsn, "SELECT count(*) FROM dead_letters") == 1


@pytest.mark.subprocess
def test_purge_deletes_only_what_it_names_and_dry_run_nothing(env, dsn):
    old = insert_dead_letter(dsn, {b"request": b"\x01"}, age="2 days")
    first = insert_dead_letter(dsn, {b"request": b"\x02"})
    second = insert_dead_letter(dsn, {b"request": b"\x03"})
    remaining = lambda: [r[0] for r in query(dsn, "SELECT id FROM dead_letters ORDER BY id")]  # noqa: E731

    dry = cli(env, "dead-letters", "purge", "--all", "--dry-run")
    assert dry.returncode == 0 and "dry run: would purge 3 dead letters (3 bytes); nothing changed" in dry.stdout
    assert remaining() == [old, first, second]

    nothing_named = cli(env, "dead-letters", "purge")
    assert nothing_named.returncode == errors.RET_CONFIG and remaining() == [old, first, second]

    assert cli_json(env, "dead-letters", "purge", "--older-than", "1d")["ids"] == [old]
    assert remaining() == [first, second]
    done = cli(env, "dead-letters", "purge", str(first))
    assert "purged 1 dead letters (1 bytes)" in done.stdout and remaining() == [second]

    missing = cli(env, "dead-letters", "purge", str(first), str(second))
    assert missing.returncode == 1 and f"not found: {first}" in missing.stdout and remaining() == []


@pytest.mark.subprocess
def test_dead_letters_list_and_show(env, dsn):
    good = insert_dead_letter(dsn, sample.stream_fields(request(site("shown"), sdk.Entity())), entity_index=1,
                              reason="entity 1 has no entity type set")
    bad = insert_dead_letter(dsn, {b"request": b"\xff\xfe not protobuf", b"ingestion_ts": b"17"},
                             reason="request is not a diode.v1.IngestRequest: " + "x" * 100)

    listing = cli(env, "dead-letters", "list")
    assert re.search(rf"{good}\s+\S+-0\s+1\s+\S+ \S+ UTC\s+\d+\s+entity 1 has no entity type set", listing.stdout)
    assert re.search(rf"{bad}\s+\S+-0\s+-\s+.*request is not a diode.v1.IngestRequest: x+…", listing.stdout)
    listed = cli_json(env, "dead-letters", "list")
    assert listed["count"] == 2 and [letter["id"] for letter in listed["dead_letters"]] == [good, bad]

    shown = cli_json(env, "dead-letters", "show", str(good))
    assert shown["fields"]["encoding"] == "br" and shown["payload"]["decodable"] is True
    first, second = shown["payload"]["entities"]
    assert first["entity"]["site"] == {"name": "shown", "slug": "shown"}
    assert second["error"] == "entity 1 has no entity type set"
    assert pb.Entity.FromString(bytes.fromhex(second["entity"]["hex"])).WhichOneof("entity") is None
    assert shown["payload"]["request"]["producer_app_name"] == "disco"

    garbage = cli_json(env, "dead-letters", "show", str(bad))
    assert garbage["payload"]["decodable"] is False
    assert garbage["payload"]["request"]["hex"] == b"\xff\xfe not protobuf".hex()
    text = cli(env, "dead-letters", "show", str(bad)).stdout
    assert "reason: request is not a diode.v1.IngestRequest" in text and "ingestion_ts=17" in text

    assert cli(env, "dead-letters", "show", "999999").returncode == 1


# --- show ---


@pytest.mark.subprocess
def test_show_prints_a_row_with_its_entity_as_protojson_and_its_change_sets(env, dsn):
    [row_id] = enqueue(dsn, device("sw-9"))
    set_row(dsn, row_id, "state = 3")
    change_set = scalar(dsn, "INSERT INTO change_sets (external_id, ingestion_log_id, branch_id) "
                             "VALUES ('cs-1', %s, NULL) RETURNING id", (row_id,))
    query(dsn, "INSERT INTO changes (external_id, change_set_id, change_type, object_type, object_primary_value, "
               "after, sequence_number) VALUES ('ch-1', %s, 'create', 'dcim.device', 'sw-9', %s, 0)",
          (change_set, json.dumps({"name": "sw-9"})))

    shown = json.loads(cli(env, "show", str(row_id)).stdout)

    assert shown["id"] == row_id and shown["state_name"] == "APPLIED" and shown["object_type"] == "dcim.device"
    assert shown["entity"]["device"]["name"] == "sw-9"
    assert shown["entity"]["device"]["device_type"]["manufacturer"] == {"name": "Juniper"}
    assert len(shown["entity_hash"]) == 64
    [stored] = shown["change_sets"]
    assert stored["external_id"] == "cs-1"
    assert [(c["change_type"], c["object_primary_value"], c["after"]) for c in stored["changes"]] == [
        ("create", "sw-9", {"name": "sw-9"})]

    missing = cli(env, "show", "999999")
    assert missing.returncode == 1 and "no ingestion log row with id 999999" in missing.stderr


@pytest.mark.subprocess
def test_status_lists_the_processes_of_a_running_service(env, tmp_path, dsn):
    plugin = FaultServer()
    plugin.default("default-branch/", Step(200, {"branch": None}))
    try:
        env = {**env, "RECONCILER_WORKERS_COUNT": "2", "RECONCILER_NETBOX_URL": plugin.url,
               "RECONCILER_NETBOX_TOKEN": "t"}
        with reconciler(env, tmp_path) as run:
            run.wait_for_event("ready")
            roles = lambda: sorted(p["role"] for p in cli_json(env, "status")["processes"]["live"])  # noqa: E731
            wait_until(lambda: roles() == ["consumer", "refresher", "worker 1", "worker 2"],
                       what=lambda: f"every role in `status`, saw {roles()}")
            pids = {p["pid"] for p in cli_json(env, "status")["processes"]["live"]}
            assert run.process.pid not in pids and len(pids) == 4
            run.signal(signal.SIGTERM)
            assert run.wait(20) == errors.RET_OK
    finally:
        plugin.close()


@pytest.mark.pg
def test_a_replay_or_purge_covers_the_letters_that_existed_when_it_started(dsn, monkeypatch):
    """Replayed entries that are still bad come back as new letters while the replay runs: a selection
    that followed them would replay its own output again and again."""
    monkeypatch.setattr(deadletters, "PAGE", 1)  # one letter per page, so letters arrive between pages
    first = [insert_dead_letter(dsn, {b"request": b"junk"}) for _ in range(2)]
    database = Database(dsn, "reconciler")
    seen = []
    for page in deadletters.pages(database, deadletters.Selector()):
        seen += [letter_id for letter_id, _ in page]
        insert_dead_letter(dsn, {b"request": b"junk again"})  # what the consumer writes meanwhile
    database.close()
    assert seen == first
