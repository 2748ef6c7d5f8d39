"""Metrics and health of `bin/reconciler run`: scraped from the real supervisor after a known ingest.

The plugin is the scripted loopback server (tests/faultserver.py) answering like a healthy plugin,
so the numbers are exact; the endpoint listens on a free loopback port ([metrics] listen = :0) and
the test reads which one from the log.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from netboxlabs.diode.sdk import ingester as sdk
from prometheus_client.parser import text_string_to_metric_families

from reconciler import errors, health, metrics, sample, settings, states, streamentry
from reconciler.errors import ConfigError

from .builders import request, site
from .faultserver import Step
from .support import push, query, reconciler, role_pid, wait_until

SHAPE = sample.Shape(sites=1, racks_per_site=1, devices_per_site=2, ports_per_device=3, vlans_per_site=2,
                     prefixes_per_site=2, vms_per_site=2, addresses_per_device=1)
FINISHED = (states.APPLIED, states.NO_CHANGES, states.FAILED, states.ERRORED, states.OPEN)


def run_env(env, plugin, tmp_path, **extra) -> dict:
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    return {**env, "RECONCILER_NETBOX_URL": plugin.url, "RECONCILER_NETBOX_TOKEN": "t0ken",
            "RECONCILER_NETBOX_TIMEOUT_SECONDS": "5", "RECONCILER_NETBOX_MAX_ATTEMPTS": "2",
            "RECONCILER_WORKERS_COUNT": "2", "TMPDIR": str(tmp), **extra}


def base_url(run) -> str:
    run.wait_for_log("metrics and health on http://")
    return re.search(r"metrics and health on (http://\S+?)/ ", run.log).group(1)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=15) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(base: str) -> dict[tuple[str, frozenset], float]:
    status, text = get(base + "/metrics")
    assert status == 200
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def by_label(samples, name: str, label: str, **fixed) -> dict[str, float]:
    """{value of `label`: sample} over the samples of `name` whose other labels are `fixed`."""
    found = {}
    for (sample_name, labels), number in samples.items():
        labels = dict(labels)
        if sample_name == name and all(labels.get(k) == v for k, v in fixed.items()) and number:
            found[labels[label]] = number
    return found


def known_ingest() -> tuple[list[dict], int]:
    """Stream entries of a small network, an entry with an in-request duplicate and an untyped entity,
    and an undecodable entry; and how many entities they carry."""
    requests = list(sample.requests(sample.network(SHAPE), per_request=20))
    dup = site("dup-site")
    requests.append(request(dup, dup, sdk.Entity()))
    entries = [sample.stream_fields(request) for request in requests]
    entries.append({b"request": b"\xffnot protobuf at all", b"ingestion_ts": b"1"})
    return entries, sum(len(request.entities) for request in requests)


def finished(dsn) -> bool:
    [(total, done)] = query(dsn, "SELECT count(*), count(*) FILTER (WHERE state = ANY(%s)) FROM ingestion_logs",
                            (list(FINISHED),))
    return total > 0 and total == done


@pytest.mark.subprocess
def test_metrics_and_health_after_a_known_ingest(env, plugin, tmp_path, redis_client, dsn):
    env = run_env(env, plugin, tmp_path, RECONCILER_NETBOX_BRANCH_REFRESH_SECONDS="1",
                  RECONCILER_NETBOX_TIMEOUT_SECONDS="2", RECONCILER_WORKERS_BATCH_SIZE="8")
    entries, entity_count = known_ingest()
    with reconciler(env, tmp_path) as run:
        base = base_url(run)
        run.wait_for_event("booted", count=4)
        # the supervisor's private PROMETHEUS_MULTIPROC_DIR, in its TMPDIR
        [directory] = (tmp_path / "tmp").glob("reconciler-run-*")
        push(redis_client, entries)
        wait_until(lambda: finished(dsn), timeout=60, what="every row finished")

        by_type = dict(query(dsn, "SELECT object_type, count(*) FROM ingestion_logs GROUP BY 1"))
        applied = dict(query(dsn, "SELECT object_type, count(*) FROM ingestion_logs WHERE state = %s GROUP BY 1",
                             (states.APPLIED,)))
        assert applied == by_type and sum(by_type.values()) == entity_count - 2  # a duplicate, an untyped entity
        samples = wait_until(lambda: (s := scrape(base)) and by_label(s, "reconciler_rows_total", "object_type",
                                                                      state="applied") == applied and s,
                             what=lambda: f"applied rows per object type {applied} in:\n{get(base + '/metrics')[1]}")

        assert value(samples, "reconciler_messages_consumed_total") == len(entries)
        assert value(samples, "reconciler_entities_consumed_total") == entity_count
        assert value(samples, "reconciler_entities_duplicate_total") == 1
        assert by_label(samples, "reconciler_dead_letters_total", "kind") == {"undecodable": 1, "no_entity_type": 1}
        assert by_label(samples, "reconciler_rows_claimed_total", "object_type") == by_type
        assert set(by_label(samples, "reconciler_rows_total", "state")) == {"applied"}
        plan_calls = len(plugin.calls("bulk-plan-apply/"))
        assert plan_calls >= 2
        assert value(samples, "reconciler_plugin_responses_total", endpoint="bulk-plan-apply", code="200") == plan_calls
        assert value(samples, "reconciler_plugin_request_duration_seconds_count",
                     endpoint="bulk-plan-apply") == plan_calls
        assert value(samples, "reconciler_plugin_request_duration_seconds_bucket", endpoint="bulk-plan-apply",
                     le="+Inf") == plan_calls
        assert value(samples, "reconciler_plugin_responses_total", endpoint="default-branch", code="200") >= 1
        samples = wait_until(lambda: (s := scrape(base)) and ("reconciler_stream_lag", frozenset()) in s and s,
                             what="the refresher's stream gauges")
        assert value(samples, "reconciler_stream_lag") == 0 and value(samples, "reconciler_stream_pending") == 0
        assert value(samples, "reconciler_backpressure_paused") == 0
        assert value(samples, "reconciler_backpressure_pauses_total") == 0
        assert by_label(samples, "reconciler_child_restarts_total", "role") == {}

        assert get(base + "/healthz") == (200, "ok\n")
        status, body = get(base + "/readyz")
        assert status == 200, body
        assert json.loads(body) == {"status": "ready", "failed": [], "checks": {
            "postgres": "ok", "redis": "ok", "plugin": "ok", "branch": "ok"}}
        assert by_label(samples, "reconciler_dependency_up", "dependency") == {"postgres": 1, "redis": 1, "plugin": 1}
        assert get(base + "/nothing")[0] == 404

        # A killed child is restarted and counted; the counts of the dead process stay in the sums,
        # its live gauges go.
        refresher = role_pid(run, "refresher")
        gauges = directory / f"gauge_livemostrecent_{refresher}.db"
        assert gauges.exists()
        for role in ("consumer", "refresher"):
            os.kill(role_pid(run, role), signal.SIGKILL)
            run.wait_for_event("child_started", child=role, count=2)
        assert not gauges.exists()
        samples = wait_until(lambda: (s := scrape(base)) and len(by_label(
            s, "reconciler_child_restarts_total", "role")) == 2 and s, what="two restarts counted")
        assert by_label(samples, "reconciler_child_restarts_total", "role", reason="killed") == {
            "consumer": 1, "refresher": 1}
        assert value(samples, "reconciler_entities_consumed_total") == entity_count

        # The plugin hangs past the refresher's probe timeout: requests that get no answer count as
        # "error", and it is not ready.
        plugin.default("default-branch/", Step(200, {"branch": None}, delay=7))
        wait_until(lambda: value(scrape(base), "reconciler_plugin_responses_total", endpoint="default-branch",
                                 code="error") >= 1, timeout=30, what="a timed-out default-branch request")
        status, body = wait_until(lambda: (answer := get(base + "/readyz"))[0] == 503 and answer, timeout=40,
                                  what="not ready (two probes in a row without an answer)")
        assert json.loads(body)["failed"] == ["plugin"], body
        assert value(scrape(base), "reconciler_dependency_up", dependency="plugin") == 0
        # The plugin goes away: not ready, naming it and why; the supervisor itself is still healthy.
        plugin.close()
        refused = lambda: "Connection refused" in json.loads(get(base + "/readyz")[1])["checks"]["plugin"]  # noqa: E731
        wait_until(refused, timeout=20, what="the refresher to find the plugin refusing connections")
        status, body = get(base + "/readyz")
        assert status == 503, body
        answer = json.loads(body)
        assert answer["status"] == "not ready" and answer["failed"] == ["plugin"]
        assert "unreachable since" in answer["checks"]["plugin"]
        assert answer["checks"]["postgres"] == "ok"
        assert answer["checks"]["branch"] == "ok"  # known before; kept
        assert get(base + "/healthz")[0] == 200

        run.signal(signal.SIGTERM)
        assert run.wait(timeout=20) == errors.RET_OK
    assert not directory.exists()  # the private directory goes with the supervisor


@pytest.mark.subprocess
def test_backpressure_is_counted_and_the_stream_gauges_follow_the_lag(env, plugin, tmp_path, redis_client, dsn):
    env = run_env(env, plugin, tmp_path, RECONCILER_WORKERS_COUNT="1", RECONCILER_WORKERS_BACKPRESSURE_THRESHOLD="5")
    with reconciler(env, tmp_path) as run:
        base = base_url(run)
        run.wait_for_event("booted", count=3)
        consumer = role_pid(run, "consumer")
        os.kill(consumer, signal.SIGSTOP)  # the consumer stops reading: the entries wait in the stream
        try:
            time.sleep(1.0)  # past its XREADGROUP's BLOCK, so Redis delivers nothing more to it
            push(redis_client, [sample.stream_fields(r) for r in sample.requests(sample.network(SHAPE), 3)][:8])
            samples = wait_until(lambda: (s := scrape(base)) and value(s, "reconciler_backpressure_paused") == 1 and s,
                                 what="paused workers")
            assert value(samples, "reconciler_stream_lag") == 8 and value(samples, "reconciler_stream_pending") == 0
            assert value(samples, "reconciler_backpressure_pauses_total") == 1
        finally:
            os.kill(consumer, signal.SIGCONT)
        samples = wait_until(lambda: (s := scrape(base)) and value(s, "reconciler_backpressure_paused") == 0
                             and value(s, "reconciler_stream_lag") == 0 and s, what="resumed workers")
        assert value(samples, "reconciler_backpressure_pauses_total") == 1
        assert value(samples, "reconciler_messages_consumed_total") == 8


@pytest.mark.subprocess
def test_consumer_alone_is_ready_without_a_plugin_and_an_operators_directory_is_emptied(env, tmp_path):
    directory = tmp_path / "prometheus"
    directory.mkdir()
    stale = directory / "counter_4194000.db"
    stale.write_bytes(b"left over by an earlier run")  # unreadable: a scrape would fail if it stayed
    with reconciler({**env, "PROMETHEUS_MULTIPROC_DIR": str(directory)}, tmp_path) as run:
        base = base_url(run)
        run.wait_for_event("booted")
        assert not stale.exists()
        status, body = get(base + "/readyz")
        assert status == 200, body
        assert json.loads(body)["checks"] == {"postgres": "ok", "redis": "ok"}
        assert "reconciler_messages_consumed_total" in get(base + "/metrics")[1]
        run.signal(signal.SIGTERM)
        assert run.wait(timeout=20) == errors.RET_OK
    assert directory.is_dir()  # the operator's directory stays


@pytest.mark.subprocess
def test_the_scratch_directory_of_a_killed_supervisor_is_removed_by_the_next_one(env, tmp_path):
    """atexit does not run on SIGKILL: each killed supervisor once left its metrics directory (and the
    Manager's pymp-* socket directory) in the temp folder."""
    # A short temp folder, as /tmp or systemd's /run/reconciler: under pytest's long tmp_path the
    # Manager's socket path would not fit a Unix socket's 107 bytes, and multiprocessing's own
    # pymp-* directory is used instead.
    temp = Path(tempfile.mkdtemp(prefix="rcn-"))
    env = {**env, "TMPDIR": str(temp)}
    for _ in range(3):
        with reconciler(env, tmp_path) as run:
            run.wait_for_event("booted")
            run.kill_all()
    [last_killed] = temp.glob("reconciler-run-*")  # each start removed the one killed before it
    someone_elses = temp / "reconciler-run-not-ours"
    someone_elses.mkdir()  # no lock file: not a directory a supervisor made, never touched
    with reconciler(env, tmp_path) as run:
        run.wait_for_event("booted")
        assert not last_killed.exists()
        [ours] = [path for path in temp.glob("reconciler-run-*") if path != someone_elses]
        run.signal(signal.SIGTERM)
        assert run.wait(timeout=20) == errors.RET_OK
    assert not ours.exists()
    assert list(temp.iterdir()) == [someone_elses]
    shutil.rmtree(temp)


@pytest.mark.subprocess
def test_a_taken_port_is_logged_and_the_service_runs_on(env, tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    listen = f"127.0.0.1:{taken.getsockname()[1]}"
    try:
        with reconciler({**env, "RECONCILER_METRICS_LISTEN": listen}, tmp_path) as run:
            run.wait_for_log(f"cannot serve metrics and health on {listen} ([metrics] listen)")
            run.wait_for_event("booted")
            run.signal(signal.SIGTERM)
            assert run.wait(timeout=20) == errors.RET_OK
    finally:
        taken.close()


# --- pieces, in-process ---


@pytest.mark.parametrize("fields, kind", [
    ({b"request": b"\xff\xff", b"ingestion_ts": b"1"}, "undecodable"),
    ({b"request": b"x", b"encoding": b"br", b"ingestion_ts": b"1"}, "undecodable"),
    ({b"request": b"x", b"encoding": b"gzip", b"ingestion_ts": b"1"}, "undecodable"),
    ({b"ingestion_ts": b"1"}, "malformed_entry"),
    ({b"request": b""}, "malformed_entry"),
    ({b"request": b"", b"ingestion_ts": b"soon"}, "malformed_entry"),
    ({b"request": b"", b"ingestion_ts": b"1"}, "malformed_entry"),
    ({b"request": b"x" * 2048, b"ingestion_ts": b"1"}, "too_large"),
    (sample.stream_fields(request(*[sdk.Entity(site=sdk.Site(name="s"))] * 3)), "too_large"),
    (sample.stream_fields(request(sdk.Entity())), "no_entity_type"),
], ids=["protobuf", "brotli", "encoding", "no-request", "no-ts", "bad-ts", "no-entities", "bytes", "entities",
        "untyped"])
def test_every_dead_letter_carries_its_kind_from_where_it_was_refused(fields, kind):
    message = streamentry.decode_entry(b"1-0", fields, streamentry.Limits(max_request_bytes=1024, max_entities=2))
    [rejection] = message.rejections
    assert rejection.kind == kind, rejection.reason
    assert rejection.kind in streamentry.DEAD_LETTER_KINDS


def test_listen_setting():
    parse = settings.BY_NAME["metrics.listen"].parse
    assert parse(" off ") == "" and parse("") == ""
    assert parse("127.0.0.1:0") == "127.0.0.1:0" and parse("[::1]:9464") == "[::1]:9464"
    assert health.split_listen("[::1]:9464") == ("::1", 9464) and health.split_listen(":9464") == ("", 9464)
    for bad in ("9464", "localhost:http", "127.0.0.1:70000", "::1:9464"):
        with pytest.raises(ValueError):
            parse(bad)
    with pytest.raises(ConfigError, match=r"environment RECONCILER_METRICS_LISTEN: expected host:port"):
        settings.load(None, {"RECONCILER_METRICS_LISTEN": "9464"})


def test_outcome_labels_cover_every_state_a_worker_records():
    recorded = {states.OPEN, states.APPLIED, states.FAILED, states.NO_CHANGES, states.PENDING_RETRY, states.ERRORED}
    assert set(metrics.OUTCOME_LABELS) == recorded
    assert Counter(metrics.OUTCOME_LABELS.values()).most_common(1)[0][1] == 1


def test_unexpected_decoding_errors_have_a_kind():
    unexpected = streamentry.decode_entry(b"2-0", {b"request": "text, not bytes", b"ingestion_ts": b"1"})
    assert [r.kind for r in unexpected.rejections] == ["unexpected_error"]
