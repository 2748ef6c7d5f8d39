"""The poll worker on a real Postgres, with the scripted loopback plugin."""

from __future__ import annotations

import os
import threading
import time

import psycopg2
import pytest

from reconciler import metrics, settings, states
from reconciler.sharedcache import Shared
from reconciler.worker import ProxyGone, Worker, release_after_exit

from .builders import enqueue, sites
from .faultserver import Step, converge, plan_for
from .support import query, scalar, wait_until

# The plugin answers bulk-plan-apply/ only as each test scripts it (404 otherwise).
pytestmark = [pytest.mark.pg, pytest.mark.plugin(applies=False)]


@pytest.fixture
def shared():
    state = Shared(rate=0, burst=1)
    state.cache.update(branch_known=True, branch=None, behind=False)
    yield state
    if state.alive:
        state.shutdown()


def make_config(env, plugin, **extra):
    environ = {**env, "RECONCILER_NETBOX_URL": plugin.url, "RECONCILER_NETBOX_TOKEN": "t0ken",
               "RECONCILER_NETBOX_TIMEOUT_SECONDS": "5", "RECONCILER_NETBOX_MAX_ATTEMPTS": "2",
               "RECONCILER_WORKERS_RETRY_BASE_SECONDS": "60", "RECONCILER_WORKERS_COUNT": "1"}
    environ.update({f"RECONCILER_{k.upper()}": str(v) for k, v in extra.items()})
    return settings.load(path="/dev/null", environ=environ)


@pytest.fixture
def worker(env, plugin, shared):
    role = Worker(make_config(env, plugin), 1, shared.cache, shared.limiter)
    role.boot()
    yield role
    role.shutdown()


def row_states(dsn) -> list[tuple]:
    return query(dsn, "SELECT state, requeued_from_state, lease_owner FROM ingestion_logs ORDER BY id")


# --- outcomes through the real SQL ---


def test_auto_apply_applies_and_stores_change_sets(worker, plugin, dsn, shared):
    shared.cache.update(branch={"id": "td5smq0f", "name": "staging"})
    plugin.script("bulk-plan-apply/", Step(answer=converge))
    enqueue(dsn, *sites("a", "b", "c"))
    worker.run_once()
    assert row_states(dsn) == [(states.APPLIED, None, None)] * 3
    assert scalar(dsn, "SELECT count(*) FROM change_sets") == 3
    change = query(dsn, "SELECT c.change_type, c.object_type, c.after, c.new_refs, c.sequence_number, s.deviation_name "
                        "FROM changes c JOIN change_sets s ON s.id = c.change_set_id "
                        "ORDER BY c.change_set_id, c.sequence_number LIMIT 1")[0]
    assert change == ("create", "dcim.site", {"name": "obj-1"}, [], 0, "Site obj-1 discovered")
    assert {p for (p,) in query(dsn, "SELECT planned_branch FROM ingestion_logs")} == {"staging (td5smq0f)"}
    [call] = plugin.calls("bulk-plan-apply/")
    assert call.headers["X-NetBox-Branch"] == "td5smq0f"
    assert call.body["entities"][0]["entity"]["site"] == {"name": "a", "slug": "a"}
    assert "timestamp" in call.body["entities"][0]["entity"]


def test_plan_only_leaves_changes_open_and_records_failures(env, plugin, shared, dsn):
    role = Worker(make_config(env, plugin, workers_auto_apply="false"), 1, shared.cache, shared.limiter)
    role.boot()
    plugin.script("bulk-plan/", Step(200, {"results": [
        {"id": "1", "change_set": plan_for("1"), "errors": None},
        {"id": "2", "change_set": {"id": "x", "changes": [], "branch": None}, "errors": None},
        {"id": "3", "change_set": None, "errors": {"dcim.site": {"slug": ["invalid"]}}}]}))
    enqueue(dsn, *sites("a", "b", "c"))
    role.run_once()
    role.shutdown()
    assert [s for s, _, _ in row_states(dsn)] == [states.OPEN, states.NO_CHANGES, states.FAILED]
    assert plugin.calls("bulk-plan-apply/") == []
    sets = query(dsn, "SELECT ingestion_log_id, deviation_name FROM change_sets ORDER BY ingestion_log_id")
    assert sets == [(1, "Site obj-1 discovered"), (3, "Site c reported")]
    error = scalar(dsn, "SELECT error FROM ingestion_logs WHERE id = 3")
    assert error["code"] == "ERR_OPS_GENERATE_DIFF" and error["details"] == {"dcim.site": {"slug": ["invalid"]}}


def test_the_plugins_warnings_are_kept_with_the_change_set_and_counted(worker, plugin, dsn):
    planned = plan_for("1")
    planned["warnings"] = {"dcim.site": {"cooling": ["Ignored unsupported field."], "fans": ["Ignored."]}}
    collided = {"object_type": "dcim.site", "object_id": 12, "fields": ["name"], "message": "resolved onto it"}
    plugin.script("bulk-plan-apply/", Step(200, {"results": [
        {"id": "1", "change_set": planned, "errors": None, "warnings": [collided]},
        {"id": "2", "change_set": plan_for("2"), "errors": None}]}))
    enqueue(dsn, *sites("a", "b"))
    counted = metrics._objects().warnings
    before = {kind: counted.labels(kind, "dcim.site")._value.get() for kind in ("plan", "apply")}
    worker.run_once()
    assert query(dsn, "SELECT plan_warnings, apply_warnings FROM change_sets ORDER BY ingestion_log_id") == [
        (planned["warnings"], [collided]), (None, None)]
    assert {kind: counted.labels(kind, "dcim.site")._value.get() - before[kind] for kind in before} == \
        {"plan": 2, "apply": 1}


def test_no_transaction_is_open_during_the_plugin_call(worker, plugin, dsn):
    seen = {}

    def check_while_planning(body):
        conn = psycopg2.connect(dsn, options="-c search_path=reconciler")
        with conn.cursor() as cursor:  # would fail if the worker still held the claimed rows' locks
            cursor.execute("SELECT state, lease_owner FROM ingestion_logs FOR UPDATE NOWAIT")
            seen["rows"] = cursor.fetchall()
        conn.close()
        return converge(body)

    plugin.script("bulk-plan-apply/", Step(answer=check_while_planning))
    enqueue(dsn, *sites("a"))
    worker.run_once()
    assert seen["rows"] == [(states.APPLYING, worker.owner)]


def test_drift_of_an_applied_row_is_a_new_row(worker, plugin, dsn):
    plugin.default("bulk-plan-apply/", Step(answer=converge))
    enqueue(dsn, *sites("a"))
    worker.run_once()
    enqueue(dsn, *sites("a"))  # observed again: requeued from APPLIED
    assert row_states(dsn) == [(states.QUEUED, states.APPLIED, None)]
    worker.run_once()  # the plugin plans changes again: drift
    rows = query(dsn, "SELECT id, state, is_head, drift_of, requeued_from_state FROM ingestion_logs ORDER BY id")
    assert rows == [(1, states.APPLIED, False, None, None), (2, states.APPLIED, True, 1, None)]
    assert query(dsn, "SELECT ingestion_log_id FROM change_sets ORDER BY id") == [(1,), (2,)]


def test_clean_recheck_of_an_applied_row_stays_applied(worker, plugin, dsn):
    plugin.script("bulk-plan-apply/", Step(answer=converge), Step(answer=lambda body: Step(200, {"results": [
        {"id": e["id"], "change_set": {"id": "y", "changes": [], "branch": None}, "errors": None}
        for e in body["entities"]]})))
    enqueue(dsn, *sites("a"))
    worker.run_once()
    enqueue(dsn, *sites("a"))
    worker.run_once()
    assert query(dsn, "SELECT state, is_head, duplicate_count FROM ingestion_logs") == [(states.APPLIED, True, 1)]
    assert scalar(dsn, "SELECT count(*) FROM change_sets") == 1


def test_plugin_down_means_pending_retry_then_errored(env, plugin, shared, dsn):
    plugin.default("bulk-plan-apply/", Step(503, b"down"))
    role = Worker(make_config(env, plugin, workers_max_attempts=2), 1, shared.cache, shared.limiter)
    role.boot()
    enqueue(dsn, *sites("a"))
    role.run_once()
    [(state, attempts, delay, error)] = query(
        dsn, "SELECT state, attempts, extract(epoch FROM next_attempt_at - now()), error FROM ingestion_logs")
    assert (state, attempts) == (states.PENDING_RETRY, 1) and 25 <= delay <= 60
    assert error["code"] == "ERR_PLUGIN_UNAVAILABLE" and "HTTP 503" in error["message"]
    role.run_once()
    assert scalar(dsn, "SELECT state FROM ingestion_logs") == states.PENDING_RETRY  # not due yet: not claimed
    query(dsn, "UPDATE ingestion_logs SET next_attempt_at = now() - interval '1 second'")
    role.run_once()
    [(state, attempts, next_at, error)] = \
        query(dsn, "SELECT state, attempts, next_attempt_at, error FROM ingestion_logs")
    assert (state, attempts, next_at) == (states.ERRORED, 2, None)
    assert error["message"].startswith("gave up after 2 attempts")
    assert scalar(dsn, "SELECT count(*) FROM change_sets") == 0
    role.shutdown()


def test_at_most_five_change_sets_per_row(worker, plugin, dsn):
    plugin.default("bulk-plan-apply/", Step(200, {"results": [{"id": "1", "errors": {"plan": {"x": ["no"]}}}]}))
    created = []
    for _ in range(7):  # fails, is observed again (FAILED -> QUEUED), fails again...
        enqueue(dsn, *sites("a"))
        worker.run_once()
        created.append(scalar(dsn, "SELECT max(id) FROM change_sets"))
    assert scalar(dsn, "SELECT state FROM ingestion_logs") == states.FAILED
    assert [i for (i,) in query(dsn, "SELECT id FROM change_sets ORDER BY id")] == created[-5:]  # the newest five


# --- answers Postgres could refuse, and answers that are not change sets ---


def answer_with(*change_sets) -> Step:
    return Step(200, {"results": [{"id": str(n), "change_set": cs, "errors": None}
                                  for n, cs in enumerate(change_sets, start=1)]})


def test_nul_characters_and_huge_integers_in_a_change_set_are_stored(worker, plugin, dsn):
    """An entity may carry U+0000 (kept as bytes in the inbox) and the plugin echoes it: Postgres text
    and jsonb refuse it, which would stall the worker on the same batch for ever."""
    odd = plan_for("1")
    odd["changes"][0].update(object_primary_value="a\x00b", object_id=2 ** 70, object_version=2 ** 40,
                             data={"name": "a", "description": "x\x00y"})
    plugin.script("bulk-plan-apply/", answer_with(odd, plan_for("2")))
    enqueue(dsn, *sites("a", "b"))
    worker.run_once()
    assert [s for s, _, _ in row_states(dsn)] == [states.APPLIED, states.APPLIED]
    stored = query(dsn, "SELECT object_primary_value, object_id, object_version, after FROM changes "
                        "ORDER BY change_set_id")
    assert stored[0] == ("a\ufffdb", None, None, {"name": "a", "description": "x\ufffdy"})
    assert len(stored) == 2


@pytest.mark.parametrize("auto_apply, state", [("true", states.APPLIED), ("false", states.FAILED)])
def test_an_outcome_postgres_refuses_costs_no_other_row(env, plugin, shared, dsn, auto_apply, state, caplog):
    """The batch is bisected down to the refused row, which is recorded without its change set: an
    apply that happened stays APPLIED, a plan nobody could review is FAILED. Nothing stalls."""
    query(dsn, "ALTER TABLE changes ADD CONSTRAINT test_refuses CHECK (object_primary_value <> 'obj-3')")
    path = "bulk-plan-apply/" if auto_apply == "true" else "bulk-plan/"
    plugin.script(path, answer_with(*[plan_for(str(n)) for n in range(1, 6)]))
    role = Worker(make_config(env, plugin, workers_auto_apply=auto_apply), 1, shared.cache, shared.limiter)
    role.boot()
    enqueue(dsn, *sites("a", "b", "c", "d", "e"))
    role.run_once()
    role.shutdown()
    fine = states.APPLIED if auto_apply == "true" else states.OPEN
    assert [s for s, _, owner in row_states(dsn) if owner is None] == [fine, fine, state, fine, fine]
    assert [i for (i,) in query(dsn, "SELECT ingestion_log_id FROM change_sets ORDER BY 1")] == [1, 2, 4, 5]
    error = scalar(dsn, "SELECT error FROM ingestion_logs WHERE id = 3")
    assert error["code"] == "ERR_INTERNAL" and "test_refuses" in error["message"]
    assert "Postgres refused the outcome of row 3" in caplog.text


def test_an_outcome_refused_even_without_its_change_set_is_left_to_its_lease(worker, plugin, dsn, caplog):
    query(dsn, "ALTER TABLE changes ADD CONSTRAINT test_refuses CHECK (object_primary_value <> 'obj-2')")
    query(dsn, "ALTER TABLE ingestion_logs ADD CONSTRAINT test_refuses_too "
               "CHECK (error IS NULL OR error->>'code' <> 'ERR_INTERNAL')")
    plugin.script("bulk-plan-apply/", answer_with(plan_for("1"), plan_for("2")))
    enqueue(dsn, *sites("a", "b"))
    worker.run_once()
    assert row_states(dsn) == [(states.APPLIED, None, None), (states.APPLYING, None, worker.owner)]
    assert "cannot record row 2 even without its change set" in caplog.text
    # Its request went out and its outcome is not on the row: were the worker to die now, the supervisor
    # must treat the row as sent (its lease ends, an attempt spent), not as never sent.
    assert worker.link.sent.value is True
    assert "taken over by another worker" not in caplog.text


@pytest.mark.parametrize("change_set, problem", [
    (["not", "an", "object"], "the change set is list, not an object"),
    ({"id": "x", "changes": {"0": {}}}, "its changes are dict, not a list"),
    ({"id": "x", "changes": [{"change_type": "create"}, "create"]}, "one of its changes is not an object"),
], ids=["list", "changes-dict", "change-string"])
def test_a_malformed_change_set_fails_its_row_alone(worker, plugin, dsn, change_set, problem):
    plugin.script("bulk-plan-apply/", answer_with(change_set, plan_for("2")))
    enqueue(dsn, *sites("a", "b"))
    worker.run_once()
    assert [s for s, _, _ in row_states(dsn)] == [states.FAILED, states.APPLIED]
    error = scalar(dsn, "SELECT error FROM ingestion_logs WHERE id = 1")
    assert error["code"] == "ERR_OPS_GENERATE_DIFF" and error["message"].endswith(problem)


# --- the per-entity path (plugins older than 1.12) ---


def single_plugin(plugin) -> None:
    plugin.default("generate-diff/", Step(answer=lambda body: Step(200, {
        "id": "x", "errors": None, "change_set": plan_for(body["entity"]["site"]["name"])})))


def test_an_apply_that_may_have_happened_is_planned_again_not_replayed(env, plugin, shared, dsn):
    single_plugin(plugin)
    plugin.script("apply-change-set/", Step(200, {"id": "cs-a", "errors": None}), Step(503, b"busy"))
    role = Worker(make_config(env, plugin, netbox_api="single"), 1, shared.cache, shared.limiter)
    role.boot()
    enqueue(dsn, *sites("a", "b", "c"))
    role.run_once()
    role.shutdown()
    assert query(dsn, "SELECT state, attempts FROM ingestion_logs ORDER BY id") == [
        (states.APPLIED, 1), (states.PENDING_RETRY, 1), (states.QUEUED, 0)]  # the third was never sent
    assert len(plugin.calls("apply-change-set/")) == 2 and len(plugin.calls("generate-diff/")) == 2
    assert "not sent again" in scalar(dsn, "SELECT error->>'message' FROM ingestion_logs WHERE id = 2")


def test_a_stop_between_entities_gives_the_unsent_rows_back(env, plugin, shared, dsn):
    single_plugin(plugin)
    role = Worker(make_config(env, plugin, netbox_api="single", workers_auto_apply="false"), 1, shared.cache,
                  shared.limiter)
    role.boot()

    def stop_after_this_one(body):
        role.request_stop()  # SIGTERM while the plugin plans the second entity
        return Step(200, {"id": "x", "errors": None, "change_set": plan_for("b")})

    plugin.script("generate-diff/", Step(answer=lambda body: Step(200, {"id": "x", "errors": None,
                                                                        "change_set": plan_for("a")})),
                  Step(answer=stop_after_this_one))
    enqueue(dsn, *sites("a", "b", "c"))
    role.run_once()
    role.shutdown()
    assert query(dsn, "SELECT state, attempts, lease_owner FROM ingestion_logs ORDER BY id") == [
        (states.OPEN, 1, None), (states.OPEN, 1, None), (states.QUEUED, 0, None)]


def test_no_request_starts_that_could_outlast_the_lease(env, plugin, shared, dsn):
    """Per entity, a slow plugin. A lease of 6.5 s leaves 5.85 s for requests (a tenth is kept to
    record the outcome) and a request may take 4 s (2 s connect + 2 s read): the entities whose
    request starts by 1.85 s are planned, the next one waits for a later claim (PENDING_RETRY,
    counted: being out of time must not let a batch be claimed and given back for ever) and the
    rest go back to QUEUED uncounted."""
    plugin.default("generate-diff/", Step(delay=1.0, answer=lambda body: Step(200, {
        "id": "x", "errors": None, "change_set": plan_for(body["entity"]["site"]["name"])})))
    role = Worker(make_config(env, plugin, netbox_api="single", workers_auto_apply="false", netbox_timeout_seconds=2,
                              workers_lease_seconds=6.5), 1, shared.cache, shared.limiter)
    role.boot()
    enqueue(dsn, *sites("a", "b", "c", "d"))
    role.run_once()
    role.shutdown()
    assert query(dsn, "SELECT state, attempts, lease_owner FROM ingestion_logs ORDER BY id") == [
        (states.OPEN, 1, None), (states.OPEN, 1, None), (states.PENDING_RETRY, 1, None), (states.QUEUED, 0, None)]
    assert "could outlast the claim's lease" in scalar(dsn, "SELECT error->>'message' FROM ingestion_logs WHERE id = 3")
    assert len(plugin.calls("generate-diff/")) == 2


def test_a_retry_wait_the_lease_cannot_cover_counts_against_the_batch(env, plugin, shared, dsn):
    plugin.default("bulk-plan-apply/", Step(503, b"busy", headers={"Retry-After": "5"}))
    role = Worker(make_config(env, plugin, netbox_timeout_seconds=2, workers_lease_seconds=6.5), 1, shared.cache,
                  shared.limiter)
    role.boot()
    enqueue(dsn, *sites("a", "b"))
    role.run_once()
    role.shutdown()
    assert query(dsn, "SELECT state, attempts FROM ingestion_logs ORDER BY id") == [(states.PENDING_RETRY, 1)] * 2
    # Given up before the 5 s wait was begun: one request, and the reason is the lease, not the answer.
    assert len(plugin.calls("bulk-plan-apply/")) == 1
    assert "no time left to retry" in scalar(dsn, "SELECT error->>'message' FROM ingestion_logs WHERE id = 1")


def test_a_suspect_the_plugin_never_got_to_stays_a_suspect(worker, plugin, dsn):
    plugin.default("bulk-plan-apply/", Step(503, b"down"))
    enqueue(dsn, *sites("a"))
    query(dsn, "UPDATE ingestion_logs SET lease_expiries = 3")
    worker.run_once()
    assert query(dsn, "SELECT state, lease_expiries FROM ingestion_logs") == [(states.PENDING_RETRY, 3)]


def test_a_stop_gives_the_batch_back_but_records_rows_that_failed_without_the_plugin(worker, plugin, dsn):
    plugin.default("bulk-plan-apply/", Step(503, b"down", headers={"Retry-After": "5"}))
    enqueue(dsn, *sites("good", "bad"))
    query(dsn, "UPDATE ingestion_logs SET entity = '\\x0a0b' WHERE id = 2")
    threading.Timer(0.3, worker.request_stop).start()
    worker.run_once()
    assert query(dsn, "SELECT state, attempts, lease_owner FROM ingestion_logs ORDER BY id") == [
        (states.QUEUED, 0, None), (states.FAILED, 1, None)]


# --- leases ---


def test_expired_leases_return_to_queued_and_live_ones_are_left_alone(worker, plugin, dsn):
    plugin.default("bulk-plan-apply/", Step(answer=converge))
    enqueue(dsn, *sites("dead", "alive"))
    query(dsn, "UPDATE ingestion_logs SET state = 8, attempts = 1, lease_owner = 'otherhost:1:worker-1', "
               "lease_expires_at = now() - interval '1 second' WHERE id = 1")
    query(dsn, "UPDATE ingestion_logs SET state = 8, attempts = 1, lease_owner = 'otherhost:2:worker-1', "
               "lease_expires_at = now() + interval '1 hour' WHERE id = 2")
    worker.run_once()
    assert row_states(dsn) == [(states.APPLIED, None, None), (states.APPLYING, None, "otherhost:2:worker-1")]
    assert [e["id"] for e in plugin.calls("bulk-plan-apply/")[0].body["entities"]] == ["1"]


def test_a_row_whose_claim_outlived_its_lease_max_attempts_times_becomes_errored(env, plugin, shared, dsn, caplog):
    """Lease expiries are counted apart from claims: a row that met an unreachable plugin many times
    and then one worker crash is not given up on."""
    plugin.default("bulk-plan-apply/", Step(answer=converge))
    role = Worker(make_config(env, plugin, workers_max_attempts=3), 1, shared.cache, shared.limiter)
    role.boot()
    enqueue(dsn, *sites("poison", "unlucky"))
    query(dsn, "UPDATE ingestion_logs SET state = 8, lease_owner = 'gone:1:worker-1:x', "
               "lease_expires_at = now() - interval '1 second', attempts = 7, "
               "lease_expiries = CASE WHEN id = 1 THEN 2 ELSE 0 END")
    role.run_once()
    [(state, error, owner, expiries)] = query(
        dsn, "SELECT state, error, lease_owner, lease_expiries FROM ingestion_logs WHERE id = 1")
    assert (state, error["code"], owner, expiries) == (states.ERRORED, "ERR_LEASE_EXPIRED", None, 3)
    assert error["message"].startswith("gave up: its claim outlived the lease 3 times")
    assert query(dsn, "SELECT state, lease_expiries FROM ingestion_logs WHERE id = 2") == [(states.APPLIED, 0)]
    assert "1 rows outlived their lease 3 times (each kills or hangs whoever plans it) and are now ERRORED: [1]" \
        in caplog.text
    role.shutdown()
    enqueue(dsn, *sites("poison"))  # observed again: requeued, still a suspect
    assert query(dsn, "SELECT state, lease_expiries FROM ingestion_logs WHERE id = 1") == [(states.QUEUED, 3)]


def test_a_row_whose_claim_outlived_its_lease_is_claimed_alone(worker, plugin, dsn):
    plugin.default("bulk-plan-apply/", Step(answer=converge))
    enqueue(dsn, *sites("a", "b", "c", "d"))
    query(dsn, "UPDATE ingestion_logs SET lease_expiries = 1 WHERE id IN (2, 3)")
    for _ in range(3):
        worker.run_once()
    assert [[e["id"] for e in c.body["entities"]] for c in plugin.calls("bulk-plan-apply/")] == \
        [["2"], ["3"], ["1", "4"]]
    # A worker lived through planning them: no longer suspects.
    assert query(dsn, "SELECT state, attempts, lease_expiries FROM ingestion_logs ORDER BY id") == \
        [(states.APPLIED, 1, 0)] * 4


def test_worker_lease_owners_are_unique_even_with_the_same_host_and_pid(worker, env, plugin, shared):
    twin = Worker(make_config(env, plugin), 1, shared.cache, shared.limiter)
    twin.boot()
    assert twin.owner != worker.owner and twin.owner.rsplit(":", 1)[0] == worker.owner.rsplit(":", 1)[0]
    twin.shutdown()


def test_a_lost_lease_drops_the_outcome(worker, plugin, dsn):
    def taken_over_meanwhile(body):
        query(dsn, "UPDATE ingestion_logs SET lease_owner = 'another-worker'")
        return converge(body)

    plugin.script("bulk-plan-apply/", Step(answer=taken_over_meanwhile))
    enqueue(dsn, *sites("a"))
    worker.run_once()
    assert row_states(dsn) == [(states.APPLYING, None, "another-worker")]
    assert scalar(dsn, "SELECT count(*) FROM change_sets") == 0


def test_stopping_while_waiting_to_retry_gives_the_rows_back(worker, plugin, dsn):
    plugin.default("bulk-plan-apply/", Step(503, b"down", headers={"Retry-After": "5"}))
    enqueue(dsn, *sites("a"))
    threading.Timer(0.3, worker.request_stop).start()  # SIGTERM arrives during the backoff
    worker.run_once()
    assert query(dsn, "SELECT state, attempts, lease_owner FROM ingestion_logs") == [(states.QUEUED, 0, None)]


# --- what stops a worker from claiming ---


def test_nothing_is_claimed_while_the_branch_is_unknown(worker, plugin, dsn, shared, caplog):
    shared.cache.update(branch_known=False)
    enqueue(dsn, *sites("a"))
    for _ in range(2):
        worker.run_once()
    assert row_states(dsn) == [(states.QUEUED, None, None)] and plugin.calls("bulk-plan-apply/") == []
    assert caplog.text.count("default branch not yet known") == 1


def test_nothing_is_claimed_while_the_consumer_is_behind(worker, plugin, dsn, shared):
    shared.cache.update(behind=True)
    enqueue(dsn, *sites("a"))
    worker.run_once()
    assert row_states(dsn) == [(states.QUEUED, None, None)]


def test_a_dead_manager_is_fatal_for_a_worker(worker, shared):
    shared.manager._process.kill()
    shared.manager._process.join()
    with pytest.raises(ProxyGone):
        worker.run_once()


def test_rows_with_unparsable_entities_fail_alone(worker, plugin, dsn):
    plugin.default("bulk-plan-apply/", Step(answer=converge))
    enqueue(dsn, *sites("good", "bad"))
    query(dsn, "UPDATE ingestion_logs SET entity = '\\x0a0b' WHERE id = 2")
    worker.run_once()
    assert [s for s, _, _ in row_states(dsn)] == [states.APPLIED, states.FAILED]
    assert "not a valid diode.v1.Entity" in scalar(dsn, "SELECT error->>'message' FROM ingestion_logs WHERE id = 2")


def test_many_workers_claim_every_row_exactly_once(env, plugin, shared, dsn):
    plugin.default("bulk-plan-apply/", Step(answer=converge))
    enqueue(dsn, *sites(*[f"s{i}" for i in range(600)]))
    config = make_config(env, plugin, workers_batch_size=50)
    roles = [Worker(config, n, shared.cache, shared.limiter) for n in range(1, 5)]
    for role in roles:
        role.boot()

    def drain(role):
        deadline = time.monotonic() + 30
        while scalar(dsn, "SELECT count(*) FROM ingestion_logs WHERE state = 1") and time.monotonic() < deadline:
            role.run_once()

    threads = [threading.Thread(target=drain, args=(role,)) for role in roles]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for role in roles:
        role.shutdown()
    sent = [e["id"] for call in plugin.calls("bulk-plan-apply/") for e in call.body["entities"]]
    assert sorted(sent, key=int) == [str(i) for i in range(1, 601)]  # each row sent once
    assert scalar(dsn, "SELECT count(*) FROM ingestion_logs WHERE state = 3") == 600
    wait_until(lambda: scalar(dsn, "SELECT count(*) FROM change_sets") == 600)


# --- requests that went unanswered ---


def test_a_batch_that_timed_out_waits_for_netbox_then_goes_in_halves(env, plugin, shared, dsn):
    """NetBox goes on with a request we stopped waiting for. The batch was sent again at once (four
    times in 31 s once, each overlapping the last); now its rows wait until NetBox can no longer be
    working on it ([netbox] server_timeout_seconds after it was sent), uncounted, and go in halves."""
    plugin.script("bulk-plan-apply/", Step(answer=converge, delay=1.5))
    plugin.default("bulk-plan-apply/", Step(answer=converge))
    role = Worker(make_config(env, plugin, netbox_timeout_seconds=0.5, netbox_server_timeout_seconds=300,
                              netbox_max_attempts=4, workers_batch_size=4), 1, shared.cache, shared.limiter)
    role.boot()
    enqueue(dsn, *sites("a", "b", "c", "d"))
    sent = time.time()
    role.run_once()
    assert len(plugin.calls("bulk-plan-apply/")) == 1
    held = query(dsn, "SELECT state, attempts, timeouts, answer_lost_at IS NOT NULL, error->>'code', "
                      "extract(epoch FROM next_attempt_at) FROM ingestion_logs ORDER BY id")
    assert [row[:5] for row in held] == [(states.PENDING_RETRY, 0, 1, True, "ERR_PLUGIN_NO_ANSWER")] * 4
    assert all(sent + 300 <= row[5] <= time.time() + 300 for row in held)
    role.run_once()  # not due yet: nothing is sent
    assert len(plugin.calls("bulk-plan-apply/")) == 1

    query(dsn, "UPDATE ingestion_logs SET next_attempt_at = now()")  # NetBox is done with it now
    role.run_once()
    role.run_once()
    role.shutdown()
    assert [[e["id"] for e in c.body["entities"]] for c in plugin.calls("bulk-plan-apply/")[1:]] == \
        [["1", "2"], ["3", "4"]]
    assert query(dsn, "SELECT state, attempts, timeouts, answer_lost_at FROM ingestion_logs ORDER BY id") == \
        [(states.APPLIED, 1, 0, None)] * 4


def test_a_stop_during_a_request_that_goes_unanswered_holds_the_rows_instead_of_giving_them_back(
        env, plugin, shared, dsn):
    """Given back, the rows were claimed and sent again on restart while the first request still ran."""
    plugin.default("bulk-plan-apply/", Step(answer=converge, delay=1.5))
    role = Worker(make_config(env, plugin, netbox_timeout_seconds=0.5, netbox_max_attempts=4), 1, shared.cache,
                  shared.limiter)
    role.boot()
    enqueue(dsn, *sites("a", "b"))
    threading.Timer(0.2, role.request_stop).start()
    role.run_once()
    role.shutdown()
    assert query(dsn, "SELECT state, lease_owner, timeouts, next_attempt_at > now() + interval '200 seconds' "
                      "FROM ingestion_logs ORDER BY id") == [(states.PENDING_RETRY, None, 1, True)] * 2
    assert len(plugin.calls("bulk-plan-apply/")) == 1


def test_a_row_alone_that_keeps_timing_out_spends_its_attempts(env, plugin, shared, dsn):
    plugin.default("bulk-plan-apply/", Step(answer=converge, delay=1.0))
    role = Worker(make_config(env, plugin, netbox_timeout_seconds=0.3, workers_max_attempts=2), 1, shared.cache,
                  shared.limiter)
    role.boot()
    enqueue(dsn, *sites("slow"))
    for _ in range(2):
        query(dsn, "UPDATE ingestion_logs SET next_attempt_at = now() WHERE state = 9")
        role.run_once()
    role.shutdown()
    [(state, attempts, message)] = query(dsn, "SELECT state, attempts, error->>'message' FROM ingestion_logs")
    assert (state, attempts) == (states.ERRORED, 2) and message.startswith("gave up after 2 attempts: no answer")


# --- what a dead worker leaves ---


def _claimed_by_a_worker_that_dies(env, plugin, shared, dsn, sent: bool = True) -> Worker:
    """A worker claims the rows and never records them: as if SIGKILLed right after the plugin answered
    (`sent`), or before it sent anything."""
    role = Worker(make_config(env, plugin), 7, shared.cache, shared.limiter)
    role.boot()
    role._claim()
    if sent:  # what the plugin client says around a request that was answered
        role.in_flight(time.time() + 60)
        role.in_flight(0.0)
    role.shutdown()
    return role


@pytest.mark.parametrize("sent", [True, False], ids=["answer-lost", "nothing-sent"])
def test_the_supervisor_releases_a_dead_workers_rows_at_once(env, plugin, shared, dsn, sent):
    """They waited for their lease (600 s by default) although the supervisor reaps a worker within a second.
    Rows it had sent carry answer_lost_at: the plugin may have applied them."""
    enqueue(dsn, *sites("a", "b"))
    dead = _claimed_by_a_worker_that_dies(env, plugin, shared, dsn, sent)
    release_after_exit(dead.config, dead.index, os.getpid(), dead.link)
    assert query(dsn, "SELECT state, lease_owner, lease_expiries, answer_lost_at IS NOT NULL FROM ingestion_logs") == \
        [(states.QUEUED, None, 1, sent)] * 2


def test_a_dead_workers_rows_wait_while_its_request_may_still_run(env, plugin, shared, dsn):
    enqueue(dsn, *sites("a"))
    dead = _claimed_by_a_worker_that_dies(env, plugin, shared, dsn)
    dead.in_flight(time.time() + 120)  # what the plugin client said before sending
    release_after_exit(dead.config, dead.index, os.getpid(), dead.link)
    assert query(dsn, "SELECT state, lease_owner = %s, lease_expires_at BETWEEN now() + interval '118 seconds' "
                      "AND now() + interval '121 seconds' FROM ingestion_logs", (dead.owner,)) == \
        [(states.APPLYING, True, True)]
    other = Worker(make_config(env, plugin), 8, shared.cache, shared.limiter)
    release_after_exit(other.config, other.index, os.getpid(), other.link)  # someone else's rows: untouched
    assert scalar(dsn, "SELECT lease_owner FROM ingestion_logs") == dead.owner


def test_an_apply_whose_answer_was_lost_is_recorded_as_such(env, plugin, shared, dsn, worker):
    """The dead worker's apply happened; its re-plan finds nothing to do. The row ended NO_CHANGES without
    a word of the apply: now APPLIED, with answer_lost_at saying its change set was lost with the answer."""
    enqueue(dsn, *sites("applied-unseen", "known-before"))
    query(dsn, "UPDATE ingestion_logs SET state = 5, requeued_from_state = 5 WHERE id = 2")  # re-check of a NO_CHANGES
    query(dsn, "UPDATE ingestion_logs SET state = 1 WHERE id = 2")
    dead = _claimed_by_a_worker_that_dies(env, plugin, shared, dsn)
    release_after_exit(dead.config, dead.index, os.getpid(), dead.link)
    lost_at = scalar(dsn, "SELECT answer_lost_at FROM ingestion_logs WHERE id = 1")
    plugin.default("bulk-plan-apply/", Step(answer=lambda body: Step(200, {"results": [
        {"id": e["id"], "change_set": {"id": "cs", "branch": None, "changes": []}, "errors": None}
        for e in body["entities"]]})))
    for _ in range(2):  # each is a suspect now: claimed alone
        worker.run_once()
    assert query(dsn, "SELECT state, answer_lost_at FROM ingestion_logs ORDER BY id") == [
        (states.APPLIED, lost_at), (states.NO_CHANGES, None)]


def test_per_entity_an_unanswered_first_entity_is_held_alone_and_the_rest_given_back(env, plugin, shared, dsn):
    """Once the whole batch was held (and split, and counted) for its first entity's request."""
    plugin.script("generate-diff/", Step(200, {"id": "x", "errors": None, "change_set": plan_for("a")}, delay=1.0))
    role = Worker(make_config(env, plugin, netbox_api="single", workers_auto_apply="false",
                              netbox_timeout_seconds=0.3), 1, shared.cache, shared.limiter)
    role.boot()
    enqueue(dsn, *sites("a", "b", "c"))
    role.run_once()
    role.shutdown()
    assert query(dsn, "SELECT state, attempts, timeouts, answer_lost_at IS NOT NULL FROM ingestion_logs "
                      "ORDER BY id") == [
        (states.PENDING_RETRY, 1, 1, True), (states.QUEUED, 0, 0, False), (states.QUEUED, 0, 0, False)]
    assert len(plugin.calls("generate-diff/")) == 1


def test_a_batch_is_sized_for_its_first_row_and_rows_split_further_wait_to_lead(worker, plugin, dsn):
    plugin.default("bulk-plan-apply/", Step(answer=converge))
    enqueue(dsn, *sites("a", "b", "c", "d", "e", "f"))
    query(dsn, "UPDATE ingestion_logs SET timeouts = CASE id WHEN 1 THEN 1 WHEN 3 THEN 2 ELSE 0 END")
    worker.config.workers.batch_size = 4
    for _ in range(3):
        worker.run_once()
    assert [[e["id"] for e in c.body["entities"]] for c in plugin.calls("bulk-plan-apply/")] == \
        [["1", "2"], ["3"], ["4", "5", "6"]]


def test_an_answer_that_says_nothing_of_what_the_plugin_did_marks_the_rows(worker, plugin, dsn):
    """A 200 that is not the plugin's JSON: the apply may have happened. Retried, with answer_lost_at set."""
    plugin.default("bulk-plan-apply/", Step(200, b"<html>maintenance</html>"))
    enqueue(dsn, *sites("a"))
    worker.run_once()
    assert query(dsn, "SELECT state, answer_lost_at IS NOT NULL FROM ingestion_logs") == [(states.PENDING_RETRY, True)]
    assert len(plugin.calls("bulk-plan-apply/")) == 1
