"""[drift] mode changes against a real NetBox: an unchanged re-send asks the plugin nothing, unless
someone other than the plugin changed an object it names in NetBox since it was last planned.

Requests to the plugin are counted at the plugin, in NetBox's access log (peer.plugin_requests).
Each test works on sites of its own (2x, beside test_e2e.py's 1x).
"""

from __future__ import annotations

import pytest

from peer import netbox as peer
from reconciler import driftkeys, sample, settings, states
from reconciler.ops import status

from .support import push, query, reconciler, scalar, wait_until
from .test_e2e import EXPECTED, SHAPE, head_states, netbox_counts, site_entries, wait_finished
from .test_metrics import base_url, scrape, value

pytestmark = pytest.mark.netbox

WAITING = (states.QUEUED, states.CHECKING, states.PENDING_RETRY)


@pytest.fixture
def drift_env(env, netbox):
    return {**env, **netbox.env(), "RECONCILER_WORKERS_COUNT": "2", "RECONCILER_NETBOX_TIMEOUT_SECONDS": "120",
            "RECONCILER_SUPERVISOR_HEARTBEAT_TIMEOUT_SECONDS": "180",
            "RECONCILER_DRIFT_MODE": "changes",  # with the peer's RECONCILER_NETBOX_API_TOKEN
            # One host: NetBox's clock is Postgres' clock, so a short margin and frequent reads keep the
            # tests quick without changing what is decided.
            "RECONCILER_DRIFT_POLL_SECONDS": "1", "RECONCILER_DRIFT_CLOCK_MARGIN_SECONDS": "2"}


def wait_settled(dsn, rows: int, seen: int) -> None:
    """Every row seen `seen` more times, and none of them waiting or in flight (claimed)."""
    def settled():
        return scalar(dsn, "SELECT count(*) FROM ingestion_logs WHERE duplicate_count >= %s", (seen,)) >= rows \
            and scalar(dsn, "SELECT count(*) FROM ingestion_logs WHERE state = ANY(%s) OR lease_owner IS NOT NULL",
                       (list(WAITING),)) == 0
    wait_until(settled, timeout=180, interval=0.5, what=lambda: "settled re-observations: " + str(
        query(dsn, "SELECT state, duplicate_count, count(*) FROM ingestion_logs GROUP BY 1, 2")))


def replanned(dsn) -> int:
    return scalar(dsn, "SELECT coalesce(sum(planned), 0) FROM drift_tally")


def device(name: str) -> dict:
    return peer.rest_get("/api/dcim/devices/", params={"name": name})["results"][0]


def serial_edited_by_hand(name: str) -> str:
    """Edit a device's serial as an operator would (REST PATCH as the admin); its serial before."""
    original = device(name)
    peer.rest_patch(f"/api/dcim/devices/{original['id']}/", {"serial": "CHANGED-BY-HAND"})
    return original["serial"]


def naming(site: int, object_type: str, name: str) -> int:
    """How many of a site's entities name this object: what a change to it re-plans."""
    prefix = f"{object_type}|{driftkeys.normalise(name)}|"
    return sum(any(key.startswith(prefix) for key in driftkeys.entity_keys(e))
               for e in sample.network(SHAPE, first_site=site))


def test_an_unchanged_resend_asks_the_plugin_nothing(drift_env, dsn, redis_client, tmp_path):
    site, total = 21, SHAPE.entity_count()
    with reconciler(drift_env, tmp_path) as run:
        push(redis_client, site_entries(site))
        wait_finished(dsn, total)
        before = peer.plugin_requests()
        push(redis_client, site_entries(site, cycle=1))  # the next discovery run: new timestamps, same objects
        wait_settled(dsn, total, seen=1)
        assert peer.plugin_requests() == before
        samples = scrape(base_url(run))
    assert head_states(dsn) == {states.APPLIED: total}
    assert scalar(dsn, "SELECT count(*) FROM ingestion_logs WHERE duplicate_count = 1 AND last_seen > created_at") \
        == total
    assert scalar(dsn, "SELECT sum(skipped) FROM drift_tally") == total and replanned(dsn) == 0
    assert value(samples, "reconciler_reobservations_total", outcome="skipped") == total
    assert value(samples, "reconciler_drift_fallback") == 0
    report, _ = status.collect(settings.load(path="/dev/null", environ=drift_env))
    drift = report["drift"]
    assert drift["last_hour"] == {"skipped": total, "planned": 0} and drift["fallback_to_always"] is None
    assert 0 <= drift["high_water_age_seconds"] < 60
    assert "change log read up to" in status.render(report)


def test_a_serial_changed_by_hand_is_put_back_and_only_what_names_its_device_is_planned(
        drift_env, dsn, redis_client, tmp_path):
    site, total = 22, SHAPE.entity_count()
    name = "sw-022-0000"
    with reconciler(drift_env, tmp_path):
        push(redis_client, site_entries(site))
        wait_finished(dsn, total)
        original = serial_edited_by_hand(name)
        push(redis_client, site_entries(site, cycle=1))  # at once: the change log has not been read since
        wait_settled(dsn, total, seen=1)
    assert device(name)["serial"] == original
    # The device, its interfaces and the addresses on them (each names the device): 10 of the 35 rows.
    assert replanned(dsn) == naming(site, "dcim.device", name) == 10
    assert head_states(dsn) == {states.APPLIED: total}


def test_a_device_deleted_by_hand_comes_back_with_its_interfaces(drift_env, dsn, redis_client, tmp_path):
    site, total = 23, SHAPE.entity_count()
    with reconciler(drift_env, tmp_path):
        push(redis_client, site_entries(site))
        wait_finished(dsn, total)
        peer.rest_delete(f"/api/dcim/devices/{device('sw-023-0001')['id']}/")  # its interfaces go with it
        assert netbox_counts("dc-023")["interfaces"] == EXPECTED["interfaces"] - 7
        push(redis_client, site_entries(site, cycle=1))
        wait_settled(dsn, total, seen=1)
    assert netbox_counts("dc-023") == EXPECTED
    addresses = peer.rest_get("/api/ipam/ip-addresses/", params={"device": "sw-023-0001"})
    assert addresses["count"] == 2  # assigned to the recreated interfaces again
    assert replanned(dsn) == naming(site, "dcim.device", "sw-023-0001")


def test_the_plugins_own_writes_plan_nothing_again(drift_env, dsn, redis_client, tmp_path):
    first, second, total = 24, 25, SHAPE.entity_count()
    with reconciler(drift_env, tmp_path):
        push(redis_client, site_entries(first))
        wait_finished(dsn, total)
        push(redis_client, site_entries(second))  # the plugin writes the second site meanwhile
        wait_finished(dsn, 2 * total)
        before = peer.plugin_requests()
        push(redis_client, site_entries(first, cycle=1))
        wait_settled(dsn, total, seen=1)
        assert peer.plugin_requests() == before
    assert replanned(dsn) == 0


def test_without_an_api_token_every_resend_is_planned_and_status_says_why(drift_env, dsn, redis_client, tmp_path):
    site, total = 26, SHAPE.entity_count()
    env = {k: v for k, v in drift_env.items() if k != "RECONCILER_NETBOX_API_TOKEN"}
    with reconciler(env, tmp_path):
        push(redis_client, site_entries(site))
        wait_finished(dsn, total)
        before = peer.plugin_requests()
        push(redis_client, site_entries(site, cycle=1))
        wait_settled(dsn, total, seen=1)
        assert peer.plugin_requests() > before
    assert head_states(dsn) == {states.APPLIED: total}
    report, _ = status.collect(settings.load(path="/dev/null", environ=env))
    assert report["drift"]["fallback_to_always"].endswith("no [netbox] api_token is configured")
    assert "FALLBACK" in status.render(report) and "no [netbox] api_token" in status.render(report)


def test_in_plan_only_mode_a_hand_edit_becomes_an_open_drift_row_that_would_undo_it(
        drift_env, dsn, redis_client, tmp_path):
    site, total = 27, SHAPE.entity_count()
    name = "sw-027-0000"
    with reconciler(drift_env, tmp_path):
        push(redis_client, site_entries(site))
        wait_finished(dsn, total)
    original = serial_edited_by_hand(name)
    with reconciler({**drift_env, "RECONCILER_WORKERS_AUTO_APPLY": "false"}, tmp_path):
        push(redis_client, site_entries(site, cycle=1))
        wait_settled(dsn, total, seen=1)
    [(row_id, drift_of)] = query(dsn, "SELECT id, drift_of FROM ingestion_logs WHERE state = %s AND object_type = "
                                      "'dcim.device' AND drift_of IS NOT NULL", (states.OPEN,))
    [(before, after)] = query(dsn, "SELECT c.before, c.after FROM changes c JOIN change_sets s ON s.id = "
                                   "c.change_set_id WHERE s.ingestion_log_id = %s AND c.change_type = 'update' "
                                   "AND c.object_type = 'dcim.device'", (row_id,))
    assert (before["serial"], after["serial"]) == ("CHANGED-BY-HAND", original)
    assert device(name)["serial"] == "CHANGED-BY-HAND"  # plan only: NetBox is left as it is
    assert scalar(dsn, "SELECT state FROM ingestion_logs WHERE id = %s", (drift_of,)) == states.APPLIED
