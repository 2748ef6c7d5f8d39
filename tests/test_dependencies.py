"""A dependency that is down is loud, and costs no row anything: the Watch's lines, gauge and row
(reconciler/dependencies.py), and the plugin going away under a steady stream (`reconciler run`)."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import urllib.request

import pytest

from reconciler import dependencies, errors, sample, states
from reconciler.db import Database
from reconciler.dependencies import PLUGIN, Watch

from .builders import request, sites
from .support import cli, cli_json, push, query, reconciler, scalar, wait_until

# How long the plugin stays down under the steady stream. Every retry setting below is scaled so
# that, before dependency health, this outage would have spent every row's attempts many times
# over; set it to 600 to run the outage the issue names (10 minutes).
OUTAGE_SECONDS = float(os.environ.get("TEST_PLUGIN_OUTAGE_SECONDS", "30"))  # not RECONCILER_*: conftest drops those


def events(caplog, event: str) -> list:
    return [record for record in caplog.records if getattr(record, "event", None) == event]


@pytest.mark.pg
def test_a_watch_logs_the_start_reminders_and_end_of_an_outage_and_keeps_its_row(dsn, caplog):
    published: list = []
    db = Database(dsn, "reconciler")
    watch = Watch(PLUGIN, remind_seconds=0.0, db=lambda: db, publish=lambda name, outage: published.append(outage))
    try:
        watch.ok()
        assert published == [None]
        watch.failed("connection refused", "refused")
        watch.failed("connection refused", "refused")
        [down] = events(caplog, "dependency_down")
        assert (down.levelname, down.dependency, down.kind) == ("ERROR", "plugin", "refused")
        assert [r.levelname for r in events(caplog, "dependency_still_down")] == ["ERROR"]
        assert published[-1]["problem"] == "connection refused" and published[-1]["kind"] == "refused"
        [(up, problem, kind)] = query(dsn, "SELECT up, problem, kind FROM dependency_health")
        assert (up, problem, kind) == (False, "connection refused", "refused")
        watch.failed("HTTP 502 from a gateway", "server_error")  # the reason changed: told and written
        assert published[-1]["kind"] == "server_error"
        assert scalar(dsn, "SELECT kind FROM dependency_health") == "server_error"
        watch.ok()
        [back] = events(caplog, "dependency_up")
        assert back.levelname == "ERROR" and "down since" in back.getMessage()
        assert published[-1] is None and scalar(dsn, "SELECT up FROM dependency_health") is True
    finally:
        db.close()


def readiness(base: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(base + "/readyz", timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


def gauge(base: str, dependency: str) -> float | None:
    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    found = re.search(rf'^reconciler_dependency_up{{dependency="{dependency}"}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else None


class SteadyStream:
    """A diode client sending a few new sites every half second, until stopped."""

    def __init__(self, redis_client) -> None:
        self.redis, self.sent, self._stop = redis_client, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            names = [f"steady-{self.sent + n}" for n in range(5)]
            push(self.redis, [sample.stream_fields(request(*sites(*names)))])
            self.sent += len(names)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.sent


@pytest.mark.subprocess
def test_the_plugin_down_under_a_steady_stream_costs_no_row_an_attempt(env, tmp_path, dsn, plugin, redis_client):
    env = {**env, "RECONCILER_WORKERS_COUNT": "2", "RECONCILER_NETBOX_URL": plugin.url, "RECONCILER_NETBOX_TOKEN": "t",
           "RECONCILER_WORKERS_BATCH_SIZE": "10", "RECONCILER_WORKERS_MAX_ATTEMPTS": "2",
           "RECONCILER_WORKERS_RETRY_BASE_SECONDS": "1", "RECONCILER_WORKERS_RETRY_MAX_SECONDS": "2",
           "RECONCILER_NETBOX_MAX_ATTEMPTS": "2", "RECONCILER_NETBOX_TIMEOUT_SECONDS": "2",
           "RECONCILER_LOG_OUTAGE_REMINDER_SECONDS": str(OUTAGE_SECONDS / 3)}
    with reconciler(env, tmp_path) as run:
        run.wait_for_event("ready")
        base = re.search(r"metrics and health on (http://\S+?)/ ", run.log).group(1)
        stream = SteadyStream(redis_client)
        wait_until(lambda: scalar(dsn, "SELECT count(*) FROM ingestion_logs WHERE state = %s", (states.APPLIED,)) >= 20,
                   what="rows applied before the outage")
        assert readiness(base)[0] == 200 and gauge(base, "plugin") == 1

        plugin.go_down()
        wait_until(lambda: readiness(base)[0] == 503, timeout=30, what="not ready while the plugin is down")
        assert readiness(base)[1]["failed"] == ["plugin"] and gauge(base, "plugin") == 0
        shown = wait_until(lambda: re.search(r"plugin\s+unreachable since \d\d:\d\d UTC: .*Connection refused",
                                             cli(env, "status").stdout), timeout=20, what="the outage in `status`")
        assert shown
        held = scalar(dsn, "SELECT count(*) FROM ingestion_logs WHERE state = %s", (states.QUEUED,))
        threading.Event().wait(OUTAGE_SECONDS)  # the outage goes on under the stream
        assert scalar(dsn, "SELECT count(*) FROM ingestion_logs WHERE state = %s", (states.QUEUED,)) > held
        run.wait_for_event("dependency_still_down", dependency="plugin", timeout=OUTAGE_SECONDS)

        plugin.come_back()
        wait_until(lambda: readiness(base)[0] == 200, timeout=30, what="ready once the plugin answers")
        sent = stream.stop()
        wait_until(lambda: scalar(dsn, "SELECT count(*) FROM ingestion_logs WHERE state = %s", (states.APPLIED,))
                   == sent, timeout=60, what=f"all {sent} rows applied")
        assert gauge(base, "plugin") == 1
        status = cli_json(env, "status")["dependencies"]["seen"]
        assert {(entry["dependency"], entry["up"]) for entry in status} >= {("plugin", True), ("redis", True),
                                                                            ("postgres", True)}
        run.signal(signal.SIGTERM)
        assert run.wait(30) == errors.RET_OK

    assert query(dsn, "SELECT state, max(attempts), count(*) FILTER (WHERE error IS NOT NULL) FROM ingestion_logs "
                      "GROUP BY state") == [(states.APPLIED, 1, 0)]  # none ERRORED, no attempt spent on the outage
    [down] = run.events("dependency_down", dependency="plugin")
    assert down["level"] == "error" and down["kind"] == "refused"
    assert len(run.events("dependency_up", dependency="plugin")) == 1
    assert len(run.events("dependency_still_down", dependency="plugin")) >= 1
    assert dependencies.WHAT[PLUGIN] in down["msg"]


@pytest.mark.subprocess
def test_redis_down_is_loud_from_the_consumer_and_nothing_is_lost(env, tmp_path, dsn, redis_client, redis_url,
                                                                   redis_proxy):
    proxy, proxied = redis_proxy
    env = {**env, "RECONCILER_REDIS_URL": proxied, "RECONCILER_LOG_OUTAGE_REMINDER_SECONDS": "2"}
    with reconciler(env, tmp_path) as run:
        run.wait_for_event("ready")
        base = re.search(r"metrics and health on (http://\S+?)/ ", run.log).group(1)
        assert gauge(base, "redis") == 1
        proxy.cut()
        push(redis_client, [sample.stream_fields(request(*sites("while-redis-is-away")))])
        [down] = run.wait_for_event("dependency_down", dependency="redis")
        assert down["level"] == "error"
        # The cut connection fails first; every new one is refused, and that is what the service tells.
        wait_until(lambda: query(dsn, "SELECT up, kind FROM dependency_health WHERE dependency = 'redis'")
                   == [(False, "refused")], what=lambda: f"Redis refusing connections, recorded:\n{run.log}")
        assert readiness(base)[1]["checks"]["redis"] != "ok" and gauge(base, "redis") == 0
        direct = {**env, "RECONCILER_REDIS_URL": redis_url}
        shown = wait_until(lambda: re.search(r"redis\s+unreachable since \d\d:\d\d UTC: cannot read the stream",
                                             cli(direct, "status").stdout), what="the outage in `status`")
        assert shown
        run.wait_for_event("dependency_still_down", dependency="redis", timeout=20)
        proxy.restore()
        run.wait_for_event("dependency_up", dependency="redis", timeout=40)
        wait_until(lambda: scalar(dsn, "SELECT count(*) FROM ingestion_logs") == 1, what="the entry consumed")
        assert gauge(base, "redis") == 1 and readiness(base)[0] == 200
        run.signal(signal.SIGTERM)
        assert run.wait(30) == errors.RET_OK


@pytest.mark.subprocess
def test_postgres_down_is_loud_from_the_consumer_and_nothing_is_lost(env, tmp_path, dsn, redis_client,
                                                                      postgres_proxy):
    proxy, proxied = postgres_proxy
    env = {**env, "RECONCILER_POSTGRES_DSN": proxied, "RECONCILER_LOG_OUTAGE_REMINDER_SECONDS": "2"}
    with reconciler(env, tmp_path) as run:
        run.wait_for_event("ready")
        base = re.search(r"metrics and health on (http://\S+?)/ ", run.log).group(1)
        proxy.cut()
        push(redis_client, [sample.stream_fields(request(*sites("while-postgres-is-away")))])
        [down] = run.wait_for_event("dependency_down", dependency="postgres")
        assert down["level"] == "error"
        assert gauge(base, "postgres") == 0 and readiness(base)[1]["checks"]["postgres"] != "ok"
        run.wait_for_event("dependency_still_down", dependency="postgres", timeout=20)
        proxy.restore()
        run.wait_for_event("dependency_up", dependency="postgres", timeout=40)
        wait_until(lambda: scalar(dsn, "SELECT count(*) FROM ingestion_logs") == 1, what="the entry written")
        assert gauge(base, "postgres") == 1
        [(up, since)] = query(dsn, "SELECT up, since FROM dependency_health WHERE dependency = 'postgres'")
        assert up is True and since is not None  # written once it was over
        run.signal(signal.SIGTERM)
        assert run.wait(30) == errors.RET_OK
