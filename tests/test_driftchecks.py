"""The drift-checks role's rules on a real Postgres, where NetBox's answer is not the point: mode
never and its max age, a change log that cannot be read, rows another mode left in CHECKING.
Against the real NetBox change log: tests/test_drift_netbox.py."""

from __future__ import annotations

import datetime
import socket

import pytest

from reconciler import inbox, settings, states
from reconciler.consumer import Consumer
from reconciler.db import Database
from reconciler.driftchecks import DriftChecks, holds_reobservations
from reconciler.netboxapi import ChangeLogUnreadable

from .builders import STREAM, entry, site
from .faultserver import FaultServer, Step
from .support import query, scalar

pytestmark = pytest.mark.pg


@pytest.fixture
def db(dsn):
    database = Database(dsn, "reconciler")
    yield database
    database.close()


def drift_config(env, **drift) -> settings.Config:
    values = {f"RECONCILER_DRIFT_{key.upper()}": str(value) for key, value in drift.items()}
    return settings.load(path="/dev/null", environ={**env, **values})


def applied_then_seen_again(db, dsn, config, planned_hours_ago: float = 0.0, names=("a", "b")) -> None:
    """Rows APPLIED by a plan `planned_hours_ago`, then each seen again unchanged."""
    inbox.write(db, STREAM, [entry(*(site(n) for n in names))])
    query(dsn, "UPDATE ingestion_logs SET state = 3, attempts = 1, planned_at = now() - %s * interval '1 hour', "
               "planned_branch = '' WHERE state = 1",
          (planned_hours_ago,))
    inbox.write(db, STREAM, [entry(*(site(n) for n in names))], check=holds_reobservations(config))


def run_once(config) -> tuple[int, int]:
    role = DriftChecks(config)
    role.boot()
    try:
        return role.check_once()
    finally:
        role.shutdown()


def states_of(dsn) -> list[tuple]:
    return query(dsn, "SELECT state, requeued_from_state, duplicate_count, attempts FROM ingestion_logs ORDER BY id")


def test_mode_never_gives_an_unchanged_row_back_its_state_until_its_plan_is_older_than_max_age(db, dsn, env):
    config = drift_config(env, mode="never", max_age_hours=24)
    applied_then_seen_again(db, dsn, config, planned_hours_ago=1, names=("fresh",))
    applied_then_seen_again(db, dsn, config, planned_hours_ago=25, names=("stale",))
    assert [state for state, *_ in states_of(dsn)] == [states.CHECKING, states.CHECKING]
    assert run_once(config) == (1, 1)
    assert states_of(dsn) == [(states.APPLIED, None, 1, 1),  # counted, nothing else touched
                              (states.QUEUED, states.APPLIED, 1, 0)]  # a drift check, planned again
    assert scalar(dsn, "SELECT sum(skipped) || '/' || sum(planned) FROM drift_tally") == "1/1"


def test_a_row_planned_before_the_change_aware_rules_existed_is_planned_again(db, dsn, env):
    config = drift_config(env, mode="never")
    applied_then_seen_again(db, dsn, config)
    query(dsn, "UPDATE ingestion_logs SET planned_at = NULL")  # as migration 0010 leaves older rows
    assert run_once(config) == (0, 2)


def test_a_row_planned_in_a_branch_is_planned_again_main_s_change_log_says_nothing_of_it(db, dsn, env):
    config = drift_config(env, mode="never")
    applied_then_seen_again(db, dsn, config, names=("main",))
    applied_then_seen_again(db, dsn, config, names=("branched",))
    query(dsn, "UPDATE ingestion_logs SET planned_branch = 'staging (td5smq0f)' WHERE id = 2")
    assert run_once(config) == (1, 1)
    assert [state for state, *_ in states_of(dsn)] == [states.APPLIED, states.QUEUED]


def test_a_change_log_that_cannot_be_read_plans_every_reobservation_and_says_so(db, dsn, env, caplog):
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/api/plugins/diode"
    config = drift_config(env, mode="changes")
    config = config.replace(**{"netbox.url": url, "netbox.api_token": "t"})
    applied_then_seen_again(db, dsn, config)
    assert run_once(config) == (0, 2)
    [(failing_since, kind)] = query(dsn, "SELECT failing_since, failure_kind FROM change_log")
    assert failing_since is not None and kind == "unreachable"
    assert "every unchanged re-observation is planned again" in caplog.text


def test_without_an_api_token_reobservations_are_requeued_as_in_mode_always(db, dsn, env):
    config = drift_config(env, mode="changes")
    assert not holds_reobservations(config)
    applied_then_seen_again(db, dsn, config)
    assert [state for state, *_ in states_of(dsn)] == [states.QUEUED, states.QUEUED]


@pytest.mark.parametrize("drift", [{"mode": "always"}, {"mode": "changes"}], ids=["always", "changes-no-token"])
def test_a_consumer_that_requeues_itself_plans_what_an_earlier_configuration_left_in_checking(
        db, dsn, env, drift, caplog):
    applied_then_seen_again(db, dsn, drift_config(env, mode="never"))
    consumer = Consumer(drift_config(env, **drift))
    consumer.boot()
    consumer.shutdown()
    assert {state for state, *_ in states_of(dsn)} == {states.QUEUED}
    assert "2 rows waited in CHECKING for drift checks that no longer run" in caplog.text
    assert ("mode changes without [netbox] api_token" in caplog.text) == (drift["mode"] == "changes")


@pytest.mark.parametrize("step, kind", [
    (Step(403, {"detail": "You do not have permission to perform this action."}), "forbidden"),
    (Step(200, {"count": 1, "next": None, "results": [{"id": 1, "changed_object_type": "dcim.site"}]}), "unreadable"),
], ids=["forbidden", "record-without-time"])
def test_a_change_log_that_refuses_or_makes_no_sense_is_a_fallback_not_a_crash(db, dsn, env, step, kind):
    """Faults NetBox does not produce on demand, from the scripted server: the role plans everything
    it holds, records why, and does not move the high-water mark past what it could not read."""
    netbox = FaultServer()
    netbox.default("/api/core/object-changes/", step)
    try:
        config = drift_config(env, mode="changes").replace(**{"netbox.url": netbox.url, "netbox.api_token": "t"})
        applied_then_seen_again(db, dsn, config)
        assert run_once(config) == (0, 2)
    finally:
        netbox.close()
    [(failing_since, failure_kind, high_water)] = query(dsn, "SELECT failing_since, failure_kind, high_water "
                                                             "FROM change_log")
    assert failing_since is not None and failure_kind == kind and high_water is None
    assert netbox.calls("/api/core/object-changes/")[0].headers["Authorization"] == "Token t"


@pytest.mark.parametrize("netbox_ahead, refused", [(0.0, False), (5.0, False), (-12.0, True), (3600.0, True)])
def test_netbox_s_clock_is_checked_against_postgres_s(env, netbox_ahead, refused):
    role = DriftChecks(drift_config(env, mode="changes", clock_margin_seconds=10))
    postgres_now = datetime.datetime.now(datetime.timezone.utc)
    check = lambda: role._check_clock(postgres_now + datetime.timedelta(seconds=netbox_ahead), postgres_now)  # noqa: E731
    if refused:
        with pytest.raises(ChangeLogUnreadable) as raised:
            check()
        assert raised.value.kind == "clock"
    else:
        check()


def test_a_row_seen_again_while_it_waits_is_settled_by_when_it_began_waiting(db, dsn, env):
    """An entity re-sent more often than the change log is read would otherwise wait for ever."""
    config = drift_config(env, mode="changes", clock_margin_seconds=0).replace(**{"netbox.api_token": "t"})
    applied_then_seen_again(db, dsn, config, names=("busy",))
    query(dsn, "UPDATE ingestion_logs SET checking_since = now() - interval '1 minute', last_seen = now()")
    query(dsn, "UPDATE change_log SET trusted_since = now() - interval '1 day'")
    role = DriftChecks(config)
    role.boot()
    try:
        role._give_keys()
        read_up_to = scalar(dsn, "SELECT now() - interval '30 seconds'")  # after it began waiting, before last_seen
        assert role._settle(read_up_to) == (1, 0)
    finally:
        role.shutdown()
    assert states_of(dsn) == [(states.APPLIED, None, 1, 1)]
