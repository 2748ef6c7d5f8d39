"""The refresher (default branch, backpressure) and a worker killed mid-batch under `reconciler run`."""

from __future__ import annotations

import os
import signal

import pytest

from reconciler import sample, settings
from reconciler.refresher import Refresher
from reconciler.sharedcache import Shared, read

from .builders import GROUP, STREAM, request, sites
from .faultserver import Step, converge
from .support import push, query, reconciler, role_pid, scalar, wait_until

# A plugin that answers only what each test scripts or sets (404 otherwise, default-branch/ included).
pytestmark = pytest.mark.plugin(branch_endpoint=False, applies=False)


@pytest.fixture
def shared():
    state = Shared(rate=0, burst=1)
    yield state
    state.shutdown()


@pytest.fixture
def refresher(env, plugin, shared):
    config = settings.load(path="/dev/null", environ={
        **env, "RECONCILER_NETBOX_URL": plugin.url, "RECONCILER_NETBOX_TOKEN": "t", "RECONCILER_WORKERS_COUNT": "1",
        "RECONCILER_NETBOX_MAX_ATTEMPTS": "1", "RECONCILER_WORKERS_BACKPRESSURE_THRESHOLD": "5"})
    role = Refresher(config, shared.cache, shared.limiter)
    role.boot()
    yield role
    role.shutdown()


@pytest.mark.pg
def test_branch_is_published_and_404_means_no_branch(refresher, plugin, shared):
    plugin.script("default-branch/", Step(200, {"branch": {"id": "td5smq0f", "name": "staging"}}))
    assert read(shared.cache).branch_known is False
    refresher.run_once()
    view = read(shared.cache)
    assert (view.branch_known, view.branch_id, view.branch_scope) == (True, "td5smq0f", "staging (td5smq0f)")
    plugin.script("default-branch/", Step(404, b"<html>Not Found</html>"))
    refresher._next_branch = refresher._next_probe = 0
    refresher.run_once()
    assert read(shared.cache).branch is None and read(shared.cache).branch_known


@pytest.mark.pg
def test_an_outage_keeps_the_last_known_branch_and_is_told_to_the_workers_once(refresher, plugin, shared, caplog):
    plugin.script("default-branch/", Step(200, {"branch": {"id": "b1", "name": "one"}}))
    plugin.default("default-branch/", Step(500, b"boom"))
    refresher.run_once()
    for _ in range(3):
        refresher._next_branch = refresher._next_probe = 0
        refresher.run_once()
    view = read(shared.cache)
    assert view.branch_id == "b1" and list(view.outages) == ["plugin"]
    assert "HTTP 500" in view.outages["plugin"]["problem"]
    down = [r for r in caplog.records if getattr(r, "event", None) == "dependency_down"]
    assert len(down) == 1 and down[0].levelname == "ERROR" and down[0].dependency == "plugin"
    plugin.default("default-branch/", Step(200, {"branch": {"id": "b1", "name": "one"}}))
    refresher._next_probe = 0
    refresher.run_once()
    assert read(shared.cache).outages == {}
    assert [r.levelname for r in caplog.records if getattr(r, "event", None) == "dependency_up"] == ["ERROR"]


@pytest.mark.pg
def test_first_answer_is_retried_quickly_not_after_the_interval(refresher, plugin, shared):
    plugin.script("default-branch/", Step(403, {"detail": "Invalid token"}), Step(200, {"branch": None}))
    refresher.run_once()
    assert read(shared.cache).branch_known is False
    wait_until(lambda: (refresher.run_once(), read(shared.cache).branch_known)[1], timeout=5,
               what="the retried first branch fetch")


@pytest.mark.pg
def test_backpressure_follows_lag_plus_pending_and_logs_each_change_once(refresher, redis_client, shared, caplog):
    caplog.set_level("INFO")
    redis_client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    push(redis_client, [{b"request": b"x", b"ingestion_ts": b"1"}] * 4)
    refresher.run_once()
    assert read(shared.cache).behind is False
    push(redis_client, [{b"request": b"x", b"ingestion_ts": b"1"}] * 4)  # 8 waiting > threshold 5
    refresher._next_backpressure = 0
    refresher.run_once()
    assert read(shared.cache).behind is True
    entries = redis_client.xreadgroup(GROUP, "c", {STREAM: ">"})[0][1]  # 8 pending now, still behind
    refresher._next_backpressure = 0
    refresher.run_once()
    assert read(shared.cache).behind is True
    ids = [entry_id for entry_id, _ in entries]
    redis_client.xack(STREAM, GROUP, *ids)
    redis_client.xdel(STREAM, *ids)
    refresher._next_backpressure = 0
    refresher.run_once()
    assert read(shared.cache).behind is False
    assert caplog.text.count("workers pause") == 1 and caplog.text.count("workers resume") == 1


@pytest.mark.subprocess
def test_worker_killed_mid_batch_its_rows_are_taken_over_once_its_request_cannot_run(
        env, tmp_path, redis_client, dsn, plugin):
    """The supervisor reaps the worker at once, but the worker died with a request in flight: its rows
    wait until NetBox can no longer be working on it ([netbox] server_timeout_seconds), not for the lease."""
    plugin.default("default-branch/", Step(200, {"branch": None}))
    plugin.default("bulk-plan-apply/", Step(answer=converge))
    env = {**env, "RECONCILER_WORKERS_COUNT": "1", "RECONCILER_NETBOX_URL": plugin.url, "RECONCILER_NETBOX_TOKEN": "t",
           "RECONCILER_NETBOX_TIMEOUT_SECONDS": "1", "RECONCILER_NETBOX_MAX_ATTEMPTS": "2",
           "RECONCILER_NETBOX_SERVER_TIMEOUT_SECONDS": "2", "RECONCILER_WORKERS_LEASE_SECONDS": "600"}
    shape = sample.Shape(devices_per_site=1, vlans_per_site=5, prefixes_per_site=5, vms_per_site=5)
    with reconciler(env, tmp_path) as run:
        victim = role_pid(run, "worker 1")

        def kill_the_worker(body):
            os.kill(victim, signal.SIGKILL)  # dies while its batch is in the plugin: claimed, never finished
            return converge(body)

        plugin.script("bulk-plan-apply/", Step(answer=kill_the_worker))
        push(redis_client, sample.entries(shape))
        run.wait_for_event("child_exited", child="worker 1", exit_code=-signal.SIGKILL)
        run.wait_for_log("once NetBox can no longer be working on its last request")
        run.wait_for_log("outlived their lease", timeout=30)
        wait_until(lambda: scalar(dsn, "SELECT count(*) FROM ingestion_logs WHERE state = 3") == shape.entity_count(),
                   timeout=30, what="every row applied")
        run.signal(signal.SIGTERM)
        assert run.wait(20) == 0
    first = {e["id"] for e in plugin.calls("bulk-plan-apply/")[0].body["entities"]}
    assert query(dsn, "SELECT count(*), count(DISTINCT ingestion_log_id) FROM change_sets") == \
        [(shape.entity_count(), shape.entity_count())]  # one change set per row: applied once
    attempts = dict(query(dsn, "SELECT id::text, attempts FROM ingestion_logs"))
    assert {attempts[i] for i in first} == {2}  # the killed batch was claimed twice


@pytest.mark.subprocess
def test_a_row_that_kills_every_worker_that_plans_it_ends_errored_alone(env, tmp_path, redis_client, dsn, plugin):
    """The rows of a killed batch are planned one at a time afterwards: the poison row spends its lease
    budget ([workers] max_attempts expiries) and ends ERRORED; its batch-mates are applied."""
    plugin.default("default-branch/", Step(200, {"branch": None}))
    env = {**env, "RECONCILER_WORKERS_COUNT": "1", "RECONCILER_NETBOX_URL": plugin.url, "RECONCILER_NETBOX_TOKEN": "t",
           "RECONCILER_NETBOX_TIMEOUT_SECONDS": "1", "RECONCILER_NETBOX_MAX_ATTEMPTS": "2",
           "RECONCILER_NETBOX_SERVER_TIMEOUT_SECONDS": "1", "RECONCILER_WORKERS_LEASE_SECONDS": "3",
           "RECONCILER_WORKERS_MAX_ATTEMPTS": "2"}
    names = ["a", "b", "poison", "c", "d"]
    with reconciler(env, tmp_path) as run:
        def kill_whoever_plans_the_poison(body):
            if any(e["entity"]["site"]["name"] == "poison" for e in body["entities"]):
                os.kill(role_pid(run, "worker 1"), signal.SIGKILL)
            return converge(body)

        plugin.default("bulk-plan-apply/", Step(answer=kill_whoever_plans_the_poison))
        push(redis_client, [sample.stream_fields(request(*sites(*names)))])
        wait_until(lambda: scalar(dsn, "SELECT count(*) FROM ingestion_logs WHERE state IN (3, 7)") == len(names),
                   timeout=60, interval=0.5, what="every row applied or errored")
        run.signal(signal.SIGTERM)
        assert run.wait(20) == 0
    rows = query(dsn, "SELECT position(convert_to('poison', 'UTF8') in entity) > 0, state, lease_expiries, "
                      "error->>'code' FROM ingestion_logs ORDER BY id")
    # The batch-mates were suspects once (planned alone), cleared when a worker lived through them.
    assert rows == [(False, 3, 0, None), (False, 3, 0, None), (True, 7, 2, "ERR_LEASE_EXPIRED"),
                    (False, 3, 0, None), (False, 3, 0, None)]
    calls = [[e["id"] for e in call.body["entities"]] for call in plugin.calls("bulk-plan-apply/")]
    assert len(calls[0]) == 5 and all(len(batch) == 1 for batch in calls[1:])
    assert "now ERRORED: [3]" in run.log
