"""End to end through the real stream, `reconciler run` and a real NetBox 4.7 with the diode plugin.

The NetBox comes from peer/netbox.py (installed and migrated once, then restored from a cached
snapshot in seconds). Objects are checked through NetBox's own REST API. Each test uses sites of its
own, so the tests do not depend on each other's objects.
"""

from __future__ import annotations

import signal

import pytest

from peer import netbox as peer
from reconciler import sample, states

from .support import push, query, reconciler, scalar, wait_until

pytestmark = pytest.mark.netbox

SHAPE = sample.Shape(sites=1, devices_per_site=2, ports_per_device=4, vlans_per_site=3, prefixes_per_site=3,
                     vms_per_site=2, addresses_per_device=2)
FINISHED = (states.APPLIED, states.NO_CHANGES, states.FAILED, states.ERRORED, states.OPEN)


@pytest.fixture
def run_env(env, netbox):
    return {**env, **netbox.env(), "RECONCILER_WORKERS_COUNT": "2", "RECONCILER_NETBOX_TIMEOUT_SECONDS": "120",
            "RECONCILER_SUPERVISOR_HEARTBEAT_TIMEOUT_SECONDS": "180"}


def site_entries(site: int, cycle: int = 0, changed: float = 0.0):
    requests = sample.requests(sample.network(SHAPE, cycle=cycle, changed=changed, first_site=site), per_request=20)
    return [sample.stream_fields(request) for request in requests]


def wait_finished(dsn, rows: int, timeout: float = 180) -> None:
    def finished():
        counts = dict(query(dsn, "SELECT state, count(*) FROM ingestion_logs WHERE is_head GROUP BY 1"))
        return sum(counts.get(s, 0) for s in FINISHED) >= rows and counts
    wait_until(finished, timeout=timeout, interval=0.5, what=lambda: f"{rows} finished rows: " + str(
        query(dsn, "SELECT state, count(*), min(error::text) FROM ingestion_logs GROUP BY 1")))


def head_states(dsn) -> dict:
    return dict(query(dsn, "SELECT state, count(*) FROM ingestion_logs WHERE is_head GROUP BY 1"))


def count(path: str, branch: str | None = None, **params) -> int:
    return peer.rest_get(path, params={**params, "limit": 1}, branch=branch)["count"]


def netbox_counts(site: str, branch: str | None = None) -> dict:
    if count("/api/dcim/sites/", branch, name=site) == 0:
        return dict.fromkeys(EXPECTED, 0)  # NetBox refuses a filter on a site it does not have
    return {
        "sites": count("/api/dcim/sites/", branch, name=site),
        "devices": count("/api/dcim/devices/", branch, site=site),
        "interfaces": count("/api/dcim/interfaces/", branch, site=site),
        "vlans": count("/api/ipam/vlans/", branch, site=site),
        "prefixes": count("/api/ipam/prefixes/", branch, site=site),
        "vms": count("/api/virtualization/virtual-machines/", branch, site=site),
    }


EXPECTED = {"sites": 1, "devices": 2, "interfaces": 2 * (4 + 3), "vlans": 3, "prefixes": 3, "vms": 2}


def test_network_lands_in_netbox_and_the_same_data_again_changes_nothing(run_env, dsn, redis_client, tmp_path):
    site, total = 11, SHAPE.entity_count()
    with reconciler(run_env, tmp_path) as run:
        push(redis_client, site_entries(site))
        wait_finished(dsn, total)
        assert head_states(dsn) == {states.APPLIED: total}, run.log
        assert netbox_counts("dc-011") == EXPECTED
        addresses = peer.rest_get("/api/ipam/ip-addresses/", params={"parent": "10.11.0.0/16", "limit": 50})
        assert addresses["count"] == 4
        assert {a["assigned_object_type"] for a in addresses["results"]} == {"dcim.interface"}
        change_sets = scalar(dsn, "SELECT count(*) FROM change_sets")

        push(redis_client, site_entries(site, cycle=1))  # the agent's next run: new timestamps, same objects
        wait_until(lambda: scalar(dsn, "SELECT count(*) FROM ingestion_logs WHERE duplicate_count = 1") == total
                   and head_states(dsn) == {states.APPLIED: total}, timeout=120, interval=0.5, what="the re-check")
        run.signal(signal.SIGTERM)
        assert run.wait(60) == 0
    assert scalar(dsn, "SELECT count(*) FROM ingestion_logs") == total  # no new rows: dedup, and no drift
    assert scalar(dsn, "SELECT count(*) FROM change_sets") == change_sets  # clean re-plans store nothing
    assert netbox_counts("dc-011") == EXPECTED


def test_data_netbox_already_holds_is_no_changes(run_env, dsn, redis_client, tmp_path):
    site, total = 12, SHAPE.entity_count()
    with reconciler(run_env, tmp_path):
        push(redis_client, site_entries(site))
        wait_finished(dsn, total)
    assert head_states(dsn) == {states.APPLIED: total}
    query(dsn, "TRUNCATE ingestion_logs, stream_receipts CASCADE")  # a fresh inbox, same NetBox
    with reconciler(run_env, tmp_path):
        push(redis_client, site_entries(site, cycle=1))
        wait_finished(dsn, total)
    assert head_states(dsn) == {states.NO_CHANGES: total}
    assert scalar(dsn, "SELECT count(*) FROM change_sets") == 0


def test_changed_interface_description_is_applied_as_an_update(run_env, dsn, redis_client, tmp_path):
    site, total = 13, SHAPE.entity_count()
    with reconciler(run_env, tmp_path):
        push(redis_client, site_entries(site))
        wait_finished(dsn, total)
        changed = [e for e in sample.network(SHAPE, cycle=5, changed=1.0, first_site=site) if e.HasField("interface")]
        interface = changed[0]
        push(redis_client, [sample.stream_fields(sample._request([interface], sample.random.Random(1)))])
        wait_until(lambda: scalar(dsn, "SELECT count(*) FROM ingestion_logs") == total + 1
                   and scalar(dsn, "SELECT state FROM ingestion_logs ORDER BY id DESC LIMIT 1") == states.APPLIED,
                   timeout=60, interval=0.5, what="the changed interface to be applied")
    [(change_type, after)] = query(dsn, "SELECT c.change_type, c.after FROM changes c JOIN change_sets s "
                                        "ON s.id = c.change_set_id WHERE s.ingestion_log_id = (SELECT max(id) "
                                        "FROM ingestion_logs) AND c.object_type = 'dcim.interface'")
    assert change_type == "update" and after["description"] == interface.interface.description
    found = peer.rest_get("/api/dcim/interfaces/", params={"device": interface.interface.device.name,
                                                           "name": interface.interface.name})
    assert found["results"][0]["description"] == interface.interface.description == "port ge-0/0/0 (rev 5)"


def test_plan_only_leaves_open_rows_with_change_sets_and_netbox_untouched(run_env, dsn, redis_client, tmp_path):
    site, total = 14, SHAPE.entity_count()
    with reconciler({**run_env, "RECONCILER_WORKERS_AUTO_APPLY": "false"}, tmp_path) as run:
        push(redis_client, site_entries(site))
        wait_finished(dsn, total)
        run.signal(signal.SIGTERM)
        assert run.wait(60) == 0
    assert head_states(dsn) == {states.OPEN: total}
    assert scalar(dsn, "SELECT count(DISTINCT ingestion_log_id) FROM change_sets") == total
    assert scalar(dsn, "SELECT count(*) FROM changes WHERE change_type = 'create'") >= total
    assert netbox_counts("dc-014") == dict.fromkeys(EXPECTED, 0)


def test_changes_land_in_the_plugins_default_branch(run_env, dsn, redis_client, tmp_path):
    site, total = 15, SHAPE.entity_count()
    schema_id = peer.create_default_branch("e2e-branch")
    try:
        with reconciler(run_env, tmp_path) as run:
            run.wait_for_log("default branch: e2e-branch")
            push(redis_client, site_entries(site))
            wait_finished(dsn, total)
        assert head_states(dsn) == {states.APPLIED: total}
        assert netbox_counts("dc-015", branch=schema_id) == EXPECTED
        assert netbox_counts("dc-015") == dict.fromkeys(EXPECTED, 0)  # nothing in main
        assert {b for (b,) in query(dsn, "SELECT DISTINCT branch_id FROM change_sets")} == {f"e2e-branch ({schema_id})"}
        assert {b for (b,) in query(dsn, "SELECT DISTINCT planned_branch FROM ingestion_logs")} == \
            {f"e2e-branch ({schema_id})"}
    finally:
        peer.reset()  # the branch and its default setting go with the reset
