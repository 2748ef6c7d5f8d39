"""Retention (reconciler/retention.py) on a year of synthetic history: what should go goes, nothing
current, OPEN, queued or in flight is touched, and no claim or consumer write waits for it."""

from __future__ import annotations

import signal
from dataclasses import dataclass

import psycopg2
import pytest

from reconciler import claims, errors, inbox, retention, sample, states
from reconciler.db import QUERIES, Database

from .builders import STREAM, enqueue, entry, request, site, sites
from .support import cli, cli_json, push, query, reconciler, scalar, wait_until


@dataclass(frozen=True)
class Group:
    """Rows of one kind in the history: `rows` of them, `days` old (spread over the range)."""

    name: str
    rows: int
    is_head: bool
    state: int
    days: tuple[int, int]
    leased: bool = False
    goes: bool = False


# Settings of the tests: rows and change sets kept 30 days, dead letters 90 (the defaults).
HISTORY = (
    Group("superseded applied, a year", 2500, False, states.APPLIED, (31, 365), goes=True),
    Group("superseded failed", 300, False, states.FAILED, (31, 365), goes=True),
    Group("superseded no changes", 300, False, states.NO_CHANGES, (31, 365), goes=True),
    Group("superseded ignored", 100, False, states.IGNORED, (31, 365), goes=True),
    Group("superseded errored", 100, False, states.ERRORED, (31, 365), goes=True),
    Group("superseded this month", 300, False, states.APPLIED, (0, 29)),
    Group("superseded but OPEN", 200, False, states.OPEN, (31, 365)),
    Group("superseded but PENDING_RETRY", 100, False, states.PENDING_RETRY, (31, 365)),
    Group("superseded but in flight", 100, False, states.APPLYING, (31, 365), leased=True),
    Group("superseded, finished, still leased", 50, False, states.APPLIED, (31, 365), leased=True),
    Group("current applied, a year old", 1000, True, states.APPLIED, (31, 365)),
    Group("current OPEN, a year old", 300, True, states.OPEN, (31, 365)),
    Group("current failed, a year old", 100, True, states.FAILED, (31, 365)),
)
# Rows planned several times: change sets of these ages (days), newest last. A plan goes once the one
# after it is older than the retention: it has been superseded that long.
PLANS = {"five old plans": (300, 200, 100, 60, 40), "old and recent plans": (100, 50, 10),
         "recent plans": (20, 10, 1)}


def kept_plans(ages: tuple[int, ...], days: float = 30) -> list[int]:
    return [age for age, newer in zip(ages, ages[1:]) if newer <= days] + [ages[-1]]
DEAD_LETTERS = {"old": (91, 365, 400), "recent": (0, 89, 150)}  # (days from, to, how many)
KEEP = {"RECONCILER_RETENTION_SUPERSEDED_ROWS_DAYS": "30", "RECONCILER_RETENTION_SUPERSEDED_CHANGE_SETS_DAYS": "30",
        "RECONCILER_RETENTION_DEAD_LETTERS_DAYS": "90"}


def _age(days: tuple[int, int]) -> str:
    low, high = days
    return f"now() - ({low} + mod(g, {high - low + 1})) * interval '1 day' - interval '1 hour'"


def write_history(dsn: str) -> dict[str, list[int]]:
    """The groups' rows, change sets for every row (plus PLANS on current rows) and dead letters,
    inserted as they would be after a year; the ids of each group's rows (and of the PLANS rows)."""
    entity = site("history").SerializeToString()
    ids: dict[str, list[int]] = {}
    with psycopg2.connect(dsn, options="-c search_path=reconciler") as conn, conn.cursor() as cursor:
        for group in HISTORY + tuple(Group(name, 50, True, states.OPEN, (0, 0)) for name in PLANS):
            cursor.execute(f"""
                INSERT INTO ingestion_logs (object_type, state, request_id, ingestion_ts, producer_app_name,
                    producer_app_version, sdk_name, sdk_version, entity, entity_hash, is_head, lease_owner,
                    lease_expires_at, created_at, updated_at)
                SELECT 'dcim.site', %(state)s, 'history', 0, 'history', '1', 'sdk', '1', %(entity)s,
                       sha256((%(name)s || g)::bytea), %(is_head)s,
                       CASE WHEN %(leased)s THEN 'elsewhere:1:worker-1:x' END,
                       CASE WHEN %(leased)s THEN now() + interval '1 day' END, {_age(group.days)}, {_age(group.days)}
                FROM generate_series(1, %(rows)s) AS g ORDER BY g RETURNING id""",
                           {"state": group.state, "entity": entity, "name": group.name, "is_head": group.is_head,
                            "leased": group.leased, "rows": group.rows})
            ids[group.name] = sorted(row_id for (row_id,) in cursor.fetchall())
        # One change set (two changes) per row of the groups, as old as the row, and PLANS' on theirs, in
        # the order they were made: change set ids follow time, as the workers take them.
        plans = [(row_id, days) for name, ages in PLANS.items() for days in ages for row_id in ids[name]]
        cursor.execute("""
            INSERT INTO change_sets (external_id, ingestion_log_id, created_at)
            SELECT external_id, ingestion_log_id, created_at FROM (
                SELECT 'cs' AS external_id, id AS ingestion_log_id, updated_at AS created_at FROM ingestion_logs
                WHERE request_id = 'history' AND id <> ALL(%(plan_rows)s::bigint[])
                UNION ALL
                SELECT days::text, id, now() - days * interval '1 day'
                FROM unnest(%(plan_rows)s::bigint[], %(plan_days)s::integer[]) AS p (id, days)) AS made
            ORDER BY created_at""", {"plan_rows": [row_id for row_id, _ in plans],
                                     "plan_days": [days for _, days in plans]})
        cursor.execute("""
            INSERT INTO changes (external_id, change_set_id, change_type, object_type, sequence_number)
            SELECT 'c', id, 'create', 'dcim.site', n FROM change_sets, generate_series(0, 1) AS n""")
        letters = " UNION ALL ".join(
            f"SELECT '{name}' AS reason, {_age((low, high))} AS created_at FROM generate_series(1, {count}) AS g"
            for name, (low, high, count) in DEAD_LETTERS.items())
        cursor.execute(f"""
            INSERT INTO dead_letters (stream, stream_id, reason, field_names, field_values, created_at)
            SELECT %(stream)s, '1-0', reason, ARRAY['data'::bytea], ARRAY['x'::bytea], created_at
            FROM ({letters}) AS letters ORDER BY created_at""", {"stream": STREAM})
    conn.close()
    return ids


def expected_gone(ids: dict[str, list[int]]) -> dict[str, int]:
    """What retention should delete: rows, change sets (beyond those of the deleted rows) and dead letters."""
    superseded_plans = sum((len(ages) - len(kept_plans(ages))) * 50 for ages in PLANS.values())
    return {"rows": sum(len(ids[g.name]) for g in HISTORY if g.goes), "change_sets": superseded_plans,
            "dead_letters": DEAD_LETTERS["old"][2]}


def assert_only_what_should_go_is_gone(dsn: str, ids: dict[str, list[int]]) -> None:
    remaining = {row_id for (row_id,) in query(dsn, "SELECT id FROM ingestion_logs")}
    for group in HISTORY:
        kept = remaining & set(ids[group.name])
        assert kept == (set() if group.goes else set(ids[group.name])), group.name
    for name, ages in PLANS.items():
        plans = query(dsn, "SELECT external_id, count(*) FROM change_sets WHERE ingestion_log_id = ANY(%s) "
                           "GROUP BY external_id", (ids[name],))
        assert dict(plans) == {str(days): len(ids[name]) for days in kept_plans(ages)}, name
    assert scalar(dsn, "SELECT count(*) FROM change_sets WHERE ingestion_log_id NOT IN "
                       "(SELECT id FROM ingestion_logs)") == 0
    assert scalar(dsn, "SELECT count(*) FROM changes WHERE change_set_id NOT IN (SELECT id FROM change_sets)") == 0
    history = "SELECT id FROM change_sets WHERE ingestion_log_id IN (SELECT id FROM ingestion_logs " \
              "WHERE request_id = 'history')"
    assert scalar(dsn, f"SELECT count(*) FROM changes WHERE change_set_id IN ({history})") == \
        2 * scalar(dsn, f"SELECT count(*) FROM ({history}) AS kept")
    assert [reason for (reason,) in query(dsn, "SELECT DISTINCT reason FROM dead_letters")] == ["recent"]
    assert scalar(dsn, "SELECT count(*) FROM dead_letters") == DEAD_LETTERS["recent"][2]


@pytest.mark.pg
def test_a_walk_deletes_what_is_past_retention_and_nothing_current_queued_or_in_flight(dsn, config):
    ids = write_history(dsn)
    config = config.replace(**{"retention.superseded_rows_days": 30.0, "retention.superseded_change_sets_days": 30.0,
                               "retention.dead_letters_days": 90.0})
    db = Database(dsn, "reconciler")
    try:
        would = retention.prune(db, config, dry_run=True, rest=lambda seconds: True)
        assert would == expected_gone(ids)
        assert scalar(dsn, "SELECT count(*) FROM ingestion_logs") == sum(len(rows) for rows in ids.values())
        assert retention.prune(db, config, rest=lambda seconds: True) == expected_gone(ids)
        assert retention.prune(db, config, rest=lambda seconds: True) == {"rows": 0, "change_sets": 0,
                                                                          "dead_letters": 0}
    finally:
        db.close()
    assert_only_what_should_go_is_gone(dsn, ids)
    assert dict(query(dsn, "SELECT kind, deleted FROM pruned")) == expected_gone(ids)


@pytest.mark.pg
def test_the_walk_over_change_sets_resumes_where_the_last_one_ended(dsn, config):
    """A later walk starts at the first change set the last one found too young, and still finds the
    plans that a newer one has superseded long enough since (here: the retention shortened to 5 days
    stands for 25 days passing)."""
    ids = write_history(dsn)
    db = Database(dsn, "reconciler")
    keep = {"retention.superseded_rows_days": 0.0, "retention.dead_letters_days": 0.0}
    try:
        month = config.replace(**keep, **{"retention.superseded_change_sets_days": 30.0})
        gone = retention.prune(db, month, rest=lambda seconds: True)
        assert gone == {"change_sets": expected_gone(ids)["change_sets"]}
        walked_to = scalar(dsn, "SELECT walked_to FROM pruned WHERE kind = 'change_sets'")
        assert walked_to == scalar(dsn, "SELECT max(id) FROM change_sets "
                                        "WHERE created_at < now() - interval '30 days'")
        week = config.replace(**keep, **{"retention.superseded_change_sets_days": 5.0})
        later = {name: len(kept_plans(ages)) - len(kept_plans(ages, days=5)) for name, ages in PLANS.items()}
        assert retention.prune(db, week, rest=lambda seconds: True) == {"change_sets": 50 * sum(later.values())}
    finally:
        db.close()
    for name, ages in PLANS.items():
        plans = query(dsn, "SELECT external_id, count(*) FROM change_sets WHERE ingestion_log_id = ANY(%s) "
                           "GROUP BY external_id", (ids[name],))
        assert dict(plans) == {str(days): len(ids[name]) for days in kept_plans(ages, days=5)}, name


@pytest.mark.pg
def test_a_setting_of_zero_keeps_that_kind_for_ever(dsn, config):
    ids = write_history(dsn)
    config = config.replace(**{"retention.superseded_rows_days": 0.0, "retention.superseded_change_sets_days": 0.0,
                               "retention.dead_letters_days": 90.0})
    db = Database(dsn, "reconciler")
    try:
        assert retention.prune(db, config, rest=lambda seconds: True) == {"dead_letters": DEAD_LETTERS["old"][2]}
    finally:
        db.close()
    assert scalar(dsn, "SELECT count(*) FROM ingestion_logs") == sum(len(rows) for rows in ids.values())


@pytest.mark.pg
def test_no_claim_or_consumer_write_waits_for_a_pruning_step(dsn, config):
    """A step holds its deletes uncommitted while the workers claim and the consumer writes: neither
    waits (their statements would time out), and a drift clone whose origin is being deleted is
    claimed and re-observed as usual (its origin's delete does not touch it)."""
    [clone] = enqueue(dsn, site("clone"))
    [origin] = [row_id for (row_id,) in query(dsn, """
        INSERT INTO ingestion_logs (object_type, state, request_id, ingestion_ts, producer_app_name,
                                    producer_app_version, sdk_name, sdk_version, entity, entity_hash, is_head,
                                    updated_at)
        SELECT object_type, 3, request_id, ingestion_ts, producer_app_name, producer_app_version, sdk_name,
               sdk_version, entity, entity_hash, false, now() - interval '40 days' FROM ingestion_logs WHERE id = %s
        RETURNING id""", (clone,))]
    query(dsn, "UPDATE ingestion_logs SET drift_of = %s WHERE id = %s", (origin, clone))
    queued = enqueue(dsn, *sites("queued-1", "queued-2"))
    pruning = psycopg2.connect(dsn, options="-c search_path=reconciler")
    others = Database(dsn, "reconciler", statement_timeout_ms=10_000)
    try:
        with pruning.cursor() as cursor:
            cursor.execute(QUERIES["prune_superseded_rows"],
                           {"after": 0, "limit": retention.BATCH, "keep_days": 30.0, "dry_run": False})
            assert cursor.fetchone()[2] == 1  # the origin, deleted and not committed yet
        claimed = claims.claim(others, "worker", states.APPLYING, 10, 60)
        assert [row.id for row in claimed] == [clone, *queued]
        written = inbox.write(others, STREAM, [entry(site("clone")), entry(site("new"))])
        assert written.duplicates == 1
        pruning.commit()
    finally:
        pruning.close()
        others.close()
    assert scalar(dsn, "SELECT drift_of FROM ingestion_logs WHERE id = %s", (clone,)) == origin
    assert scalar(dsn, "SELECT count(*) FROM ingestion_logs WHERE id = %s", (origin,)) == 0


@pytest.mark.subprocess
def test_the_service_prunes_a_year_of_history_while_it_consumes_and_applies(env, tmp_path, dsn, plugin, redis_client):
    ids = write_history(dsn)
    env = {**env, **KEEP, "RECONCILER_RETENTION_INTERVAL_SECONDS": "1", "RECONCILER_WORKERS_COUNT": "2",
           "RECONCILER_NETBOX_URL": plugin.url, "RECONCILER_NETBOX_TOKEN": "t"}
    dry = cli_json(env, "prune", "--dry-run")
    assert {kind: entry["count"] for kind, entry in dry["kinds"].items()} == expected_gone(ids)
    before = scalar(dsn, "SELECT count(*) FROM ingestion_logs")
    assert before == sum(len(rows) for rows in ids.values())
    names = [f"live-{n}" for n in range(600)]
    with reconciler(env, tmp_path) as run:
        run.wait_for_event("booted", count=5)  # consumer, retention, refresher, 2 workers
        for start in range(0, len(names), 20):
            push(redis_client, [sample.stream_fields(request(*sites(*names[start:start + 20])))])
        gone = lambda: dict(query(dsn, "SELECT kind, deleted FROM pruned"))  # noqa: E731
        wait_until(lambda: gone() == expected_gone(ids), timeout=60, what=lambda: f"the history pruned, saw {gone()}")
        wait_until(lambda: scalar(dsn, "SELECT count(*) FROM ingestion_logs WHERE request_id = 'req' AND state = 3")
                   == len(names), timeout=60, what="every live entity applied")
        status = cli_json(env, "status")
        assert "retention" in {p["role"] for p in status["processes"]["live"]}
        assert {kind: entry["deleted"] for kind, entry in status["retention"]["kinds"].items()} == expected_gone(ids)
        assert status["retention"]["tables"]["ingestion_logs"]["bytes"] > 0
        run.signal(signal.SIGTERM)
        assert run.wait(30) == errors.RET_OK
    assert_only_what_should_go_is_gone(dsn, ids)
    text = cli(env, "status").stdout
    assert "superseded rows" in text and f"{expected_gone(ids)['rows']:,} deleted" in text


@pytest.mark.subprocess
def test_one_pruner_walks_at_a_time_across_replicas(env, dsn):
    """Another replica's retention process (here: this test) holds the walk: `prune` says so and deletes
    nothing; a dry run only counts, so it does not wait for the lock."""
    ids = write_history(dsn)
    env = {**env, **KEEP}
    other = Database(dsn, "reconciler")
    try:
        with retention.exclusive(other, "reconciler") as mine:
            assert mine
            refused = cli(env, "prune")
            assert refused.returncode == 1 and "another pruner is walking" in refused.stderr
            dry = cli_json(env, "prune", "--dry-run")
            assert {kind: entry["count"] for kind, entry in dry["kinds"].items()} == expected_gone(ids)
        assert scalar(dsn, "SELECT count(*) FROM ingestion_logs") == sum(len(rows) for rows in ids.values())
        done = cli(env, "prune")
        assert done.returncode == 0, done.stderr
        assert f"superseded rows: deleted {expected_gone(ids)['rows']:,}" in done.stdout
    finally:
        other.close()
    assert_only_what_should_go_is_gone(dsn, ids)
