"""`reconciler deviations` as an operator runs it (bin/reconciler subprocesses) against Postgres and the
scripted plugin, for what the real NetBox will not do on demand (timeouts, 5xx, deadlocks, a plugin
older than 1.12, a create that binds without its fields) and for the commands' input and output.
The review loop against the real NetBox is in test_deviations_netbox.py; the pure parts come first."""

from __future__ import annotations

import json
import re

import pytest

from reconciler import review, states
from reconciler.changesets import same_changes
from reconciler.ops import diff

from .builders import enqueue, planned, site
from .faultserver import Step, plan_for
from .support import cli, cli_json, query, reconciler, scalar, wait_until

# --- pure: what counts as the same plan, and the diff a person reads ---


def create(object_type: str, value: str, ref: str, **data) -> dict:
    return {"id": f"id-{ref}", "change_type": "create", "object_type": object_type, "object_id": None,
            "ref_id": f"new_object:{object_type}:{ref}", "object_primary_value": value, "before": {},
            "data": {"name": value, **data}, "new_refs": [k for k, v in data.items() if str(v).startswith("new_")]}


def update(object_type: str, object_id: int, before: dict, data: dict) -> dict:
    return {"id": "u", "change_type": "update", "object_type": object_type, "object_id": object_id, "ref_id": None,
            "object_primary_value": "x", "before": {"id": object_id, **before}, "data": {"id": object_id, **data},
            "new_refs": []}


def noop(object_type: str, object_id: int, **before) -> dict:
    return {"id": "n", "change_type": "noop", "object_type": object_type, "object_id": object_id, "ref_id": None,
            "object_primary_value": "x", "before": {"id": object_id, **before}, "data": {}, "new_refs": []}


def device_plan(site_ref: str, device_ref: str, order: int = 1) -> list[dict]:
    site_change = create("dcim.site", "dc-1", site_ref)
    role = create("dcim.devicerole", "edge", f"role-{site_ref}")
    device = create("dcim.device", "sw-1", device_ref, site=f"new_object:dcim.site:{site_ref}",
                    role=f"new_object:dcim.devicerole:role-{site_ref}")
    return ([site_change, role] if order else [role, site_change]) + [device, noop("dcim.manufacturer", 4, name="a")]


def test_a_fresh_plan_is_the_same_whatever_its_ids_refs_and_order_within_a_level():
    assert same_changes(device_plan("a1", "d1"), device_plan("b2", "d2", order=0))


def test_a_fresh_plan_that_creates_or_writes_something_else_is_not_the_same():
    changed = device_plan("b2", "d2")
    changed[2]["data"]["serial"] = "SN2"
    assert not same_changes(device_plan("a1", "d1"), changed)
    assert not same_changes(device_plan("a1", "d1"), device_plan("a1", "d1")[1:])
    assert not same_changes([create("dcim.site", "x", "r")], [update("dcim.site", 3, {"name": "y"}, {"name": "x"})])


def test_an_update_is_stale_when_a_field_it_writes_changed_not_when_another_did():
    reviewed = [update("dcim.device", 7, {"serial": "A", "description": "d"}, {"serial": "B"})]
    assert same_changes(reviewed, [update("dcim.device", 7, {"serial": "A", "description": "edited"}, {"serial": "B"})])
    assert not same_changes(reviewed, [update("dcim.device", 7, {"serial": "C", "description": "d"}, {"serial": "B"})])
    assert same_changes([noop("dcim.site", 1, name="a")], [noop("dcim.site", 1, name="renamed")])


def test_a_reviewed_plan_read_back_from_postgres_is_the_same_as_the_plugins():
    fresh = [create("dcim.site", None, "r1", u_height=1.0, site="new_object:dcim.site:r1")]
    stored = [create("dcim.site", "", "r2", u_height=1, site="new_object:dcim.site:r2")]
    stored[0]["data"]["name"] = fresh[0]["data"]["name"] = None
    assert same_changes(stored, fresh)


def test_two_creates_of_one_object_in_a_plan_are_judged_stale_rather_than_guessed_at():
    twice = [create("extras.tag", "t", "r1"), create("extras.tag", "t", "r2")]
    assert not same_changes(twice, [create("extras.tag", "t", "r3"), create("extras.tag", "t", "r4")])


def test_the_diff_shows_creates_updates_and_refs_as_the_objects_they_create():
    changes = device_plan("a1", "d1") + [update("dcim.site", 3, {"name": "old", "slug": "s"},
                                                {"name": "new", "slug": "s"})]
    text = diff.render(changes, colour=False)
    assert '+ create dcim.device "sw-1"' in text
    assert '    site: new dcim.site "dc-1"' in text
    assert '~ update dcim.site #3 "x"\n    name: "old" → "new"\n    (written unchanged: slug)' in text
    assert '= noop dcim.manufacturer #4 "x"' in text
    assert "\033[" not in text and "\033[32m" in diff.render(changes, colour=True)
    [site_update] = [c for c in diff.as_json(changes) if c["change_type"] == "update"]
    assert site_update["fields"] == [{"field": "name", "before": "old", "after": "new"}]
    assert site_update["unchanged_fields"] == ["slug"]


# --- the commands, against Postgres and the scripted plugin ---

STAGING = "staging (td5smq0f)"


def same_plan(body) -> Step:
    """bulk-plan/: for each entity, the plan builders.planned stored for its row (so: unchanged)."""
    return Step(200, {"results": [{"id": e["id"], "errors": None,
                                   "change_set": plan_for(e["id"], object_type=e["object_type"])}
                                  for e in body["entities"]]})


def applied(body) -> Step:
    return Step(200, {"results": [{"id": cs["id"], "errors": None} for cs in body["change_sets"]]})


@pytest.fixture
def review_env(env, plugin):
    plugin.default("bulk-plan/", Step(answer=same_plan))
    plugin.default("bulk-apply/", Step(answer=applied))
    return {**env, "RECONCILER_NETBOX_URL": plugin.url, "RECONCILER_NETBOX_TOKEN": "t0ken", "SUDO_USER": "alice",
            "RECONCILER_NETBOX_TIMEOUT_SECONDS": "1", "RECONCILER_NETBOX_SERVER_TIMEOUT_SECONDS": "2",
            "RECONCILER_NETBOX_MAX_ATTEMPTS": "2"}


def row_states(dsn) -> dict[int, str]:
    return {row_id: states.NAMES[state] for row_id, state in query(dsn, "SELECT id, state FROM ingestion_logs")}


def reviews(dsn) -> list[tuple]:
    return query(dsn, "SELECT ingestion_log_id, action, outcome, operator, reason FROM reviews ORDER BY id")


@pytest.mark.subprocess
def test_apply_sends_the_reviewed_change_sets_in_their_branch_once_a_fresh_plan_matches(review_env, dsn, plugin):
    ids = planned(dsn, site("a"), site("b"), site("c"), branch_scope=STAGING)
    report = cli_json(review_env, "deviations", "apply", str(ids[0]), str(ids[1]))
    assert report["outcomes"] == {review.APPLIED: 2} and report["operator"] == "alice"
    assert row_states(dsn) == {ids[0]: "APPLIED", ids[1]: "APPLIED", ids[2]: "OPEN"}
    [plan_call] = plugin.calls("bulk-plan/")
    assert [e["id"] for e in plan_call.body["entities"]] == [str(ids[0]), str(ids[1])]
    [apply_call] = plugin.calls("bulk-apply/")
    assert [cs["id"] for cs in apply_call.body["change_sets"]] == [f"cs-{ids[0]}", f"cs-{ids[1]}"]
    assert apply_call.body["change_sets"][0]["changes"][0]["data"] == {"name": f"obj-{ids[0]}"}
    assert {c.headers["X-NetBox-Branch"] for c in plugin.seen if c.path != "default-branch/"} == {"td5smq0f"}
    assert reviews(dsn) == [(ids[0], "apply", review.APPLIED, "alice", None),
                            (ids[1], "apply", review.APPLIED, "alice", None)]


@pytest.mark.subprocess
@pytest.mark.parametrize("fault", [Step(200, {"results": []}, delay=3), Step(502, b"<html>bad gateway</html>"),
                                   Step(500, {"error": "boom"})], ids=["timeout", "gateway", "server_error"])
def test_an_apply_whose_answer_is_lost_is_never_sent_again_and_the_row_is_planned_afresh(review_env, dsn, plugin,
                                                                                         fault, tmp_path):
    [row_id] = planned(dsn, site("lost"))
    plugin.script("bulk-apply/", fault)
    done = cli(review_env, "deviations", "apply", str(row_id))
    assert done.returncode == 1
    assert "no answer" in done.stdout and "not sent again" in done.stdout
    assert len(plugin.calls("bulk-apply/")) == 1
    [(state, lost, code)] = query(dsn, "SELECT state, answer_lost_at IS NOT NULL, error->>'code' FROM ingestion_logs")
    assert (state, lost) == (states.PENDING_RETRY, True) and code.startswith("ERR_PLUGIN")
    assert [r[2] for r in reviews(dsn)] == [review.NO_ANSWER]

    again = cli(review_env, "deviations", "apply", str(row_id))  # an operator trying again is refused
    assert again.returncode == 1 and "PENDING_RETRY, not OPEN" in again.stderr

    with reconciler({**review_env, "RECONCILER_WORKERS_AUTO_APPLY": "false", "RECONCILER_WORKERS_COUNT": "1"},
                    tmp_path) as run:
        wait_until(lambda: row_states(dsn) == {row_id: "OPEN"}
                   and scalar(dsn, "SELECT lease_owner IS NULL FROM ingestion_logs"), timeout=30,
                   what=lambda: f"the row planned afresh by a worker: {query(dsn, 'SELECT * FROM ingestion_logs')}"
                                f"\n{run.log}")
    assert scalar(dsn, "SELECT count(*) FROM change_sets") == 2
    assert len(plugin.calls("bulk-apply/")) == 1


@pytest.mark.subprocess
def test_a_stale_plan_is_not_applied_and_the_row_stays_open_with_the_fresh_one(review_env, dsn, plugin):
    [row_id] = planned(dsn, site("moved"))
    plugin.script("bulk-plan/", Step(200, {"results": [{"id": str(row_id), "errors": None,
                                                        "change_set": plan_for(str(row_id), changes=2)}]}))
    done = cli(review_env, "deviations", "apply", str(row_id), "--json")
    assert done.returncode == 1
    assert plugin.calls("bulk-apply/") == []
    assert row_states(dsn) == {row_id: "OPEN"}
    assert query(dsn, "SELECT count(*) FROM changes GROUP BY change_set_id ORDER BY change_set_id") == [(1,), (2,)]
    assert [r[2] for r in reviews(dsn)] == [review.STALE]


@pytest.mark.subprocess
def test_a_create_that_bound_without_its_fields_is_planned_again_at_once(review_env, dsn, plugin):
    done_id, left_id = planned(dsn, site("shared"), site("partly"))
    warning = {"object_type": "dcim.site", "object_id": 12, "fields": ["name"], "message": "collided"}
    plugin.script("bulk-apply/", Step(200, {"results": [{"id": "x", "errors": None, "warnings": [warning]}] * 2}))
    left = plan_for(str(left_id))
    left["changes"] = [update("dcim.site", 12, {"name": "old"}, {"name": "partly"})]
    plugin.script("bulk-plan/", Step(answer=same_plan), Step(200, {"results": [
        {"id": str(done_id), "errors": None, "change_set": {"id": "empty", "changes": []}},
        {"id": str(left_id), "errors": None, "change_set": left}]}))
    report = cli(review_env, "deviations", "apply", str(done_id), str(left_id), "--json")
    assert report.returncode == 1  # one row needs another look
    assert row_states(dsn) == {done_id: "APPLIED", left_id: "OPEN"}
    assert [r[2] for r in reviews(dsn)] == [review.APPLIED, review.APPLIED_PARTLY]
    assert query(dsn, "SELECT apply_warnings FROM change_sets WHERE id IN (SELECT min(id) FROM change_sets "
                      "GROUP BY ingestion_log_id) ORDER BY id") == [([warning],), ([warning],)]
    shown = cli(review_env, "deviations", "show", str(left_id), "--color", "never").stdout
    assert '~ update dcim.site #12 "x"\n    name: "old" → "partly"' in shown


@pytest.mark.subprocess
def test_a_refused_apply_fails_the_row_and_a_rolled_back_one_leaves_it_open(review_env, dsn, plugin):
    refused_id, deadlocked_id = planned(dsn, site("refused"), site("deadlocked"))
    plugin.script("bulk-apply/", Step(207, {"results": [
        {"id": "a", "errors": {"dcim.site": {"name": ["too long"]}}},
        {"id": "b", "errors": {"request": {"change_set": ["invalid change_set: deadlock detected\nDETAIL: x"]}}}]}))
    done = cli(review_env, "deviations", "apply", str(refused_id), str(deadlocked_id))
    assert done.returncode == 1
    assert row_states(dsn) == {refused_id: "FAILED", deadlocked_id: "OPEN"}
    assert "too long" in scalar(dsn, "SELECT error->>'message' FROM ingestion_logs WHERE id = %s", (refused_id,))
    assert f"row {deadlocked_id}: not applied, still OPEN: NetBox's database rolled the apply back" in done.stdout
    assert [(r[0], r[2]) for r in reviews(dsn)] == [(deadlocked_id, review.NOT_APPLIED),
                                                     (refused_id, review.APPLY_FAILED)]


@pytest.mark.subprocess
def test_a_plugin_older_than_1_12_is_asked_one_change_set_at_a_time(review_env, dsn, plugin):
    ids = planned(dsn, site("old1"), site("old2"))
    plugin.default("bulk-plan/", Step(404, b"<html>Not Found</html>"))
    plugin.default("generate-diff/", Step(answer=lambda body: Step(200, {
        "change_set": plan_for(str(ids[0] if body["entity"]["site"]["name"] == "old1" else ids[1]))})))
    plugin.default("apply-change-set/", Step(answer=lambda body: Step(200, {"id": body["id"], "errors": None})))
    assert cli_json(review_env, "deviations", "apply", *map(str, ids))["outcomes"] == {review.APPLIED: 2}
    assert [c.body["id"] for c in plugin.calls("apply-change-set/")] == [f"cs-{i}" for i in ids]
    assert plugin.calls("bulk-apply/") == []


@pytest.mark.subprocess
@pytest.mark.parametrize("args, message", [
    (["999"], "no row 999"),
    (["{applied}"], "is APPLIED, not OPEN"),
    (["--all", "--type", "dcim.device", "--yes"], "no rows match (state OPEN, type 'dcim.device')"),
    (["--all"], "--all matches 2 rows"),
    (["{open}", "--all", "--yes"], "not both"),
    (["{open}", "--type", "dcim.site"], "with ids they would be ignored"),
    ([], "name the rows by id"),
    (["{open}@{other_plan}"], "was planned again since change set"),
], ids=["unknown", "not_open", "no_match", "all_without_yes", "ids_and_all", "ids_and_filters", "nothing",
        "not_the_plan_reviewed"])
def test_bad_input_gets_a_clear_error_and_changes_nothing(review_env, dsn, plugin, args, message):
    open_id, other_id, applied_id = planned(dsn, site("o1"), site("o2"), site("done"))
    query(dsn, "UPDATE ingestion_logs SET state = 3 WHERE id = %s", (applied_id,))
    other_plan = scalar(dsn, "SELECT id FROM change_sets WHERE ingestion_log_id = %s", (other_id,))
    before = query(dsn, "SELECT * FROM ingestion_logs ORDER BY id")
    for command in ("apply", "ignore"):
        if command == "ignore" and "@" in "".join(args):
            continue  # only apply names the plan reviewed
        extra = ["--reason", "r"] if command == "ignore" else []
        done = cli(review_env, "deviations", command, "--json",
                   *[a.format(open=open_id, applied=applied_id, other_plan=other_plan) for a in args], *extra)
        assert done.returncode == 1, done.stdout
        expected = message.replace("not OPEN", "not OPEN or FAILED") if command == "ignore" else message
        assert expected in done.stderr and expected in json.loads(done.stdout)["error"]
    assert query(dsn, "SELECT * FROM ingestion_logs ORDER BY id") == before
    assert [c.path for c in plugin.seen if c.path != "default-branch/"] == []
    assert reviews(dsn) == []


@pytest.mark.subprocess
def test_apply_of_a_named_plan_applies_it_and_show_says_how_to_name_it(review_env, dsn, plugin):
    [row_id] = planned(dsn, site("exact"))
    change_set = scalar(dsn, "SELECT id FROM change_sets")
    assert f"reconciler deviations apply {row_id}@{change_set}" in cli(review_env, "deviations", "show",
                                                                       str(row_id)).stdout
    assert cli_json(review_env, "deviations", "apply", f"{row_id}@{change_set}")["outcomes"] == {review.APPLIED: 1}


@pytest.mark.subprocess
def test_unignore_refuses_a_row_a_newer_one_replaced_and_changes_nothing(review_env, dsn):
    current, replaced = planned(dsn, site("current"), site("replaced"))
    query(dsn, "UPDATE ingestion_logs SET state = 6")
    query(dsn, "UPDATE ingestion_logs SET is_head = false WHERE id = %s", (replaced,))
    done = cli(review_env, "deviations", "unignore", str(current), str(replaced))
    assert done.returncode == 1 and f"row {replaced} is not the current row of its entity" in done.stderr
    assert row_states(dsn) == {current: "IGNORED", replaced: "IGNORED"}


@pytest.mark.subprocess
def test_list_filters_pages_and_counts(review_env, dsn):
    old = planned(dsn, site("dc-1-a"), site("dc-1-b"), producer_app_name="netbox-discovery")
    new = planned(dsn, site("dc-2-a"), branch_scope=STAGING, producer_app_name="orb-agent")
    query(dsn, "UPDATE ingestion_logs SET planned_at = now() - interval '3 hours' WHERE id = ANY(%s)", (old,))
    in_flight = enqueue(dsn, site("being-planned"))
    query(dsn, "UPDATE ingestion_logs SET state = 2, lease_owner = 'w', lease_expires_at = now() + interval '1 min' "
               "WHERE id = %s", (in_flight[0],))

    every = cli_json(review_env, "deviations", "list")
    assert [row["id"] for row in every] == sorted(old + new, reverse=True)  # newest first, none in flight
    assert every[0] | {"age_seconds": 0, "planned_at": 0} == {
        "id": new[0], "state": "OPEN", "object_type": "dcim.site", "name": f"Site obj-{new[0]} discovered",
        "changes": {"create": 1}, "planned_at": 0, "age_seconds": 0, "branch": STAGING, "producer": "orb-agent",
        "change_set_id": every[0]["change_set_id"], "warnings": False, "current": True}
    ids = lambda *args: [row["id"] for row in cli_json(review_env, "deviations", "list", *args)]  # noqa: E731
    assert ids("--since", "1h") == new
    assert ids("--branch", "staging") == ids("--branch", "td5smq0f") == new
    assert ids("--branch", "main") == sorted(old, reverse=True)
    assert ids("--producer", "netbox-discovery") == sorted(old, reverse=True)
    assert ids("--name", f"obj-{old[0]}") == [old[0]]
    assert ids("--name", "obj-?*") == sorted(old + new, reverse=True)
    assert ids("--state", "all", "--limit", "2") == [new[0], old[1]]
    assert ids("--limit", "2", "--before", str(new[0])) == sorted(old, reverse=True)

    text = cli(review_env, "deviations", "list", "--limit", "2").stdout
    assert f"Site obj-{new[0]} discovered" in text and "1 create" in text and "staging (td5smq0f)" in text
    assert "3 matching rows (state OPEN):" in text and re.search(r"OPEN\s+dcim\.site\s+3", text)
    assert f"the next page: add --before {old[1]}" in text


@pytest.mark.subprocess
def test_ignore_keeps_an_unchanged_entity_ignored_and_unignore_plans_it_again(review_env, dsn):
    kept, other = planned(dsn, site("ignored-one"), site("left-open"))
    report = cli_json(review_env, "deviations", "ignore", str(kept), "--reason", "decommissioned")
    assert report["ids"] == [kept] and report["operator"] == "alice"
    assert row_states(dsn) == {kept: "IGNORED", other: "OPEN"}

    enqueue(dsn, site("ignored-one"))  # seen again, unchanged
    assert row_states(dsn) == {kept: "IGNORED", other: "OPEN"}
    assert scalar(dsn, "SELECT duplicate_count FROM ingestion_logs WHERE id = %s", (kept,)) == 1
    [changed] = enqueue(dsn, site("ignored-one", description="now different"))  # a changed entity: a new row
    assert row_states(dsn)[changed] == "QUEUED"

    assert cli_json(review_env, "deviations", "unignore", str(kept))["ids"] == [kept]
    assert query(dsn, "SELECT state, requeued_from_state FROM ingestion_logs WHERE id = %s", (kept,)) == \
        [(states.QUEUED, states.IGNORED)]
    assert reviews(dsn) == [(kept, "ignore", review.IGNORED, "alice", "decommissioned"),
                            (kept, "unignore", review.UNIGNORED, "alice", None)]
    shown = cli(review_env, "deviations", "show", str(kept)).stdout
    assert "alice: ignore → ignored (decommissioned)" in shown and "alice: unignore → queued" in shown


@pytest.mark.subprocess
def test_show_prints_the_diff_the_entity_the_warnings_and_the_reviews(review_env, dsn):
    [row_id] = planned(dsn, site("shown", description="from discovery"))
    query(dsn, "UPDATE change_sets SET plan_warnings = %s",
          ('{"dcim.site": {"cooling": ["Ignored unsupported field."]}}',))
    text = cli(review_env, "deviations", "show", str(row_id), "--color", "never").stdout
    assert f"row {row_id}: dcim.site, OPEN" in text
    assert f'+ create dcim.site "obj-{row_id}"\n    name: "obj-{row_id}"' in text
    assert "plan warning: dcim.site cooling: Ignored unsupported field." in text
    assert '"description": "from discovery"' in text  # the entity as sent
    assert "reviews: none" in text
    assert "\033[" in cli(review_env, "deviations", "show", str(row_id), "--color", "always").stdout
    as_json = cli_json(review_env, "deviations", "show", str(row_id))
    assert set(as_json) == {"row", "change_set", "diff", "older_change_sets", "reviews"}
    assert as_json["diff"][0]["fields"] == [{"field": "name", "before": None, "after": f"obj-{row_id}"}]
    assert cli(review_env, "deviations", "show", "999").returncode == 1
