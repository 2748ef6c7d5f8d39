"""The review loop of plan-only mode against a real NetBox with the diode plugin: a network planned
and left OPEN, part of it applied through `reconciler deviations apply`, the rest ignored, stale
plans caught, and two applies at once applying each change set exactly once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
from netboxlabs.diode.sdk import ingester as sdk

from peer import netbox as peer
from reconciler import review, sample, states

from .support import BIN, ROOT, cli, cli_json, push, query, reconciler, scalar, wait_until

pytestmark = pytest.mark.netbox

SHAPE = sample.Shape(sites=1, devices_per_site=2, ports_per_device=2, vlans_per_site=2, prefixes_per_site=2,
                     vms_per_site=1, addresses_per_device=1)


@pytest.fixture
def plan_only(env, netbox):
    return {**env, **netbox.env(), "RECONCILER_WORKERS_AUTO_APPLY": "false", "RECONCILER_WORKERS_COUNT": "2",
            "RECONCILER_NETBOX_TIMEOUT_SECONDS": "120", "RECONCILER_SUPERVISOR_HEARTBEAT_TIMEOUT_SECONDS": "180"}


def network_entries(first_site: int, sites: int = 1, cycle: int = 0):
    shape = sample.Shape(**{**SHAPE.__dict__, "sites": sites})
    requests = sample.requests(sample.network(shape, cycle=cycle, first_site=first_site), per_request=25)
    return [sample.stream_fields(request) for request in requests]


def states_by_id(dsn) -> dict[int, int]:
    """Each row's state; a row a worker holds shows as None (OPEN is a plan-only worker's state in flight)."""
    return dict(query(dsn, "SELECT id, CASE WHEN lease_owner IS NULL THEN state END FROM ingestion_logs"))


def wait_all(dsn, rows: int, state: int, timeout: float = 240) -> None:
    wait_until(lambda: set(states_by_id(dsn).values()) == {state} and len(states_by_id(dsn)) == rows,
               timeout=timeout, interval=0.5,
               what=lambda: f"{rows} rows {states.NAMES[state]}: " + str(
                   query(dsn, "SELECT state, count(*), min(error::text) FROM ingestion_logs GROUP BY 1")))


def count(path: str, **params) -> int:
    return peer.rest_get(path, params={**params, "limit": 1})["count"]


def objects_named(prefix: str) -> dict[str, int]:
    """How many of each kind of object of one test NetBox holds, by the name prefix the test gave them."""
    return {"sites": count("/api/dcim/sites/", name__isw=prefix),
            "devices": count("/api/dcim/devices/", name__isw=f"sw-{prefix[3:]}"),
            "vlans": count("/api/ipam/vlans/", site=prefix) if count("/api/dcim/sites/", name=prefix) else 0}


def test_review_loop_applies_one_sites_devices_ignores_the_rest_and_keeps_them_so(plan_only, dsn, redis_client,
                                                                                    tmp_path):
    total = SHAPE.entity_count() * 2
    with reconciler(plan_only, tmp_path) as run:
        push(redis_client, network_entries(first_site=21, sites=2))
        wait_all(dsn, total, states.OPEN)
        assert objects_named("dc-021") == objects_named("dc-022") == {"sites": 0, "devices": 0, "vlans": 0}

        chosen = cli_json(plan_only, "deviations", "list", "--type", "dcim.device", "--name", "sw-021-*")
        assert [row["state"] for row in chosen] == ["OPEN", "OPEN"]
        assert {row["object_type"] for row in chosen} == {"dcim.device"}
        applied = cli_json(plan_only, "deviations", "apply", "--all", "--type", "dcim.device", "--name", "sw-021-*",
                           "--yes", timeout=180)
        assert applied["outcomes"] == {review.APPLIED: 2}, applied
        assert objects_named("dc-021") == {"sites": 1, "devices": 2, "vlans": 0}  # the devices, and what they need
        assert objects_named("dc-022") == {"sites": 0, "devices": 0, "vlans": 0}
        chosen_ids = {row["id"] for row in chosen}
        assert {i for i, s in states_by_id(dsn).items() if s == states.APPLIED} == chosen_ids
        assert {s for i, s in states_by_id(dsn).items() if i not in chosen_ids} == {states.OPEN}

        ignored = cli_json(plan_only, "deviations", "ignore", "--all", "--reason", "lab gear, not ours", "--yes")
        assert len(ignored["ids"]) == total - 2 and ignored["state"] == "IGNORED"
        assert objects_named("dc-022") == {"sites": 0, "devices": 0, "vlans": 0}
        netbox_before = objects_named("dc-021")

        push(redis_client, network_entries(first_site=21, sites=2, cycle=1))  # the next discovery run: unchanged
        wait_until(lambda: scalar(dsn, "SELECT count(*) FROM ingestion_logs WHERE duplicate_count = 1") == total
                   and states.CHECKING not in states_by_id(dsn).values(), timeout=120, interval=0.5,
                   what="the re-observations to settle")
        run.signal(signal.SIGTERM)
        assert run.wait(60) == 0
    assert scalar(dsn, "SELECT count(*) FROM ingestion_logs") == total  # nothing new: same entities
    after = states_by_id(dsn)
    assert {after[i] for i in chosen_ids} == {states.APPLIED}
    assert {s for i, s in after.items() if i not in chosen_ids} == {states.IGNORED}
    assert objects_named("dc-021") == netbox_before

    shown = cli_json(plan_only, "deviations", "show", str(min(chosen_ids)))
    assert [(r["action"], r["outcome"]) for r in shown["reviews"]] == [("apply", review.APPLIED)]
    assert shown["reviews"][0]["operator"]
    ignored_row = cli_json(plan_only, "deviations", "show", str(min(set(after) - chosen_ids)))
    assert [(r["action"], r["reason"]) for r in ignored_row["reviews"]] == [("ignore", "lab gear, not ours")]


def _by_hand(name: str, serial: str) -> dict:
    """The device an operator adds in NetBox's UI, with what it needs."""
    site = peer.rest_post("/api/dcim/sites/", {"name": "dc-031", "slug": "dc-031", "status": "active"})
    maker = peer.rest_post("/api/dcim/manufacturers/", {"name": "Hand", "slug": "hand"})
    model = peer.rest_post("/api/dcim/device-types/", {"model": "H1", "slug": "h1", "manufacturer": maker["id"]})
    role = peer.rest_post("/api/dcim/device-roles/", {"name": "hand-role", "slug": "hand-role", "color": "ff0000"})
    return peer.rest_post("/api/dcim/devices/", {"name": name, "serial": serial, "site": site["id"],
                                                 "device_type": model["id"], "role": role["id"], "status": "active"})


def test_a_plan_netbox_overtook_is_not_applied_but_planned_again_as_netbox_is_now(plan_only, dsn, redis_client,
                                                                                  tmp_path):
    device = sdk.Device(name="edge-031", serial="SN-FROM-DISCOVERY", status="active",
                        site=sdk.Site(name="dc-031", slug="dc-031", status="active"),
                        role=sdk.DeviceRole(name="hand-role", slug="hand-role", color="ff0000"),
                        device_type=sdk.DeviceType(model="H1", slug="h1",
                                                   manufacturer=sdk.Manufacturer(name="Hand", slug="hand")))
    entity = sample.stream_fields(sample._request([sdk.Entity(device=device)], sample.random.Random(3)))
    with reconciler(plan_only, tmp_path):
        push(redis_client, [entity])
        wait_all(dsn, 1, states.OPEN)
    [(row_id,)] = query(dsn, "SELECT id FROM ingestion_logs")
    reviewed = cli_json(plan_only, "deviations", "show", str(row_id))
    assert {c["change_type"] for c in reviewed["diff"] if c["object_type"] == "dcim.device"} == {"create"}

    made = _by_hand("edge-031", serial="SN-TYPED-BY-HAND")  # meanwhile, someone adds it by hand
    done = cli(plan_only, "deviations", "apply", str(row_id), "--json", timeout=120)
    assert done.returncode == 1, done.stderr  # not applied: the operator has to look again
    assert cli_json(plan_only, "deviations", "list", "--state", "all")[0]["state"] == "OPEN"
    assert count("/api/dcim/devices/", name="edge-031") == 1  # no second device
    assert peer.rest_get(f"/api/dcim/devices/{made['id']}/")["serial"] == "SN-TYPED-BY-HAND"

    fresh = cli_json(plan_only, "deviations", "show", str(row_id))
    [update] = [c for c in fresh["diff"] if c["object_type"] == "dcim.device"]
    assert update["change_type"] == "update" and update["object_id"] == made["id"]
    assert {"field": "serial", "before": "SN-TYPED-BY-HAND", "after": "SN-FROM-DISCOVERY"} in update["fields"]
    assert fresh["older_change_sets"] == 1  # the reviewed plan is kept
    assert [r["outcome"] for r in fresh["reviews"]] == [review.STALE]

    applied = cli_json(plan_only, "deviations", "apply", str(row_id), timeout=120)  # the fresh plan, reviewed
    assert applied["outcomes"] == {review.APPLIED: 1}
    assert peer.rest_get(f"/api/dcim/devices/{made['id']}/")["serial"] == "SN-FROM-DISCOVERY"
    assert count("/api/dcim/devices/", name="edge-031") == 1


def test_two_applies_of_the_same_200_rows_at_once_apply_each_change_set_once(plan_only, dsn, redis_client, tmp_path):
    sites = [sdk.Entity(site=sdk.Site(name=f"cc-{n:03d}", slug=f"cc-{n:03d}", status="active")) for n in range(200)]
    requests = [sample._request(sites[start:start + 50], sample.random.Random(start)) for start in range(0, 200, 50)]
    with reconciler(plan_only, tmp_path):
        push(redis_client, [sample.stream_fields(request) for request in requests])
        wait_all(dsn, 200, states.OPEN)
    env = {**plan_only, "RECONCILER_WORKERS_BATCH_SIZE": "20"}  # many batches, so the two runs interleave
    runs = [subprocess.Popen([sys.executable, str(BIN), "deviations", "apply", "--all", "--yes", "--json"], env=env,
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    answers = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], answers
    applied = [[row["id"] for row in json.loads(out)["rows"] if row["outcome"] == review.APPLIED] for out, _ in answers]
    assert sorted(applied[0] + applied[1]) == sorted(states_by_id(dsn))  # every row, by one run or the other
    assert set(states_by_id(dsn).values()) == {states.APPLIED}
    assert count("/api/dcim/sites/", name__isw="cc-") == 200
    created = peer.rest_get("/api/core/object-changes/", params={"changed_object_type": "dcim.site",
                                                                 "action": "create", "limit": 1000})
    names = [change["object_repr"] for change in created["results"] if change["object_repr"].startswith("cc-")]
    assert len(names) == len(set(names)) == 200  # each created once
    assert scalar(dsn, "SELECT count(*) FROM reviews WHERE outcome = 'applied'") == 200
