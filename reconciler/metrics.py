"""Prometheus metrics of every process, each defined once here (prometheus-client multiprocess mode).

Every process (supervisor, consumer, poll workers, refresher) counts into files of its own in one
directory, PROMETHEUS_MULTIPROC_DIR; the supervisor's /metrics (health.py) adds them up. The
directory must be in the environment before prometheus_client is first imported in the process
(prometheus_client.values picks the value class at import). So nothing here imports it at module
level: the supervisor calls prepare_directory() before anything counts and before it forks; the
children inherit the environment and the module, and each writes files named by its own pid.
Without prepare_directory (metrics off, in-process tests, benchmarks) the metrics are plain
in-memory values of each process: same calls, nothing exported.

Callers use the functions below, one line at the point where the numbers are already known, once
per batch or per plugin request (`.inc(n)`), never per entity.
"""

from __future__ import annotations

import glob
import logging
import os
import sys
from collections import Counter
from typing import Iterable

from . import scratch, states

log = logging.getLogger(__name__)

ENV = "PROMETHEUS_MULTIPROC_DIR"

# Plugin calls last from milliseconds (default-branch/) to tens of seconds (a cold batch of 100).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# Read API calls take milliseconds; a count over a filter the counters do not keep may take seconds.
API_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)

# How rows' outcomes are labelled (drift clones are counted by the state the clone got).
OUTCOME_LABELS = {states.OPEN: "planned", states.APPLIED: "applied", states.FAILED: "failed",
                  states.NO_CHANGES: "no_changes", states.PENDING_RETRY: "pending_retry",
                  states.ERRORED: "errored"}

class _Metrics:
    """The metric objects; built on first use, after prepare_directory in the supervisor."""

    def __init__(self) -> None:
        from prometheus_client import Counter as C, Gauge as G, Histogram as H

        # registry=None: nothing reads this process's registry; /metrics reads the files.
        # consumer
        self.messages = C("reconciler_messages_consumed", "Stream entries committed to the inbox (first delivery).",
                          registry=None)
        self.redelivered = C("reconciler_messages_redelivered", "Stream entries delivered again after they had "
                             "been committed (acknowledged as no-ops).", registry=None)
        self.entities = C("reconciler_entities_consumed", "Entities in the committed stream entries.", registry=None)
        self.duplicates = C("reconciler_entities_duplicate", "Entities already in the inbox (same entity hash): "
                            "counted on the existing row instead of a new one.", registry=None)
        self.requeued = C("reconciler_entities_requeued", "Duplicates that sent a finished row back to QUEUED (or, "
                          "for the drift checks, to CHECKING).",
                          registry=None)
        self.dead_letters = C("reconciler_dead_letters", "Stream entries or entities stored as dead letters, "
                              "by kind of reason.", ["kind"], registry=None)
        # poll workers
        self.claimed = C("reconciler_rows_claimed", "Rows claimed by poll workers.", ["object_type"], registry=None)
        self.rows = C("reconciler_rows", "Rows' recorded outcomes by object type and state: planned (OPEN, plan-only), "
                      "applied, no_changes, failed, pending_retry, errored.", ["object_type", "state"], registry=None)
        self.warnings = C("reconciler_plugin_warnings", "The plugin's warnings on recorded change sets, by kind "
                          "(plan: a field it ignored; apply: a create it resolved onto an existing object without "
                          "storing its fields) and the object type they name.", ["kind", "object_type"],
                          registry=None)
        # plugin client (workers and refresher)
        self.latency = H("reconciler_plugin_request_duration_seconds", "Plugin HTTP requests, from sending to the "
                         "whole answer read, by endpoint.", ["endpoint"], buckets=LATENCY_BUCKETS, registry=None)
        self.responses = C("reconciler_plugin_responses", "Plugin HTTP requests by endpoint and status code "
                           "(code \"error\": no answer: refused, reset, timed out).", ["endpoint", "code"],
                           registry=None)
        # refresher
        self.lag = G("reconciler_stream_lag", "Stream entries not yet delivered to the consumer group.",
                     multiprocess_mode="livemostrecent", registry=None)
        self.pending = G("reconciler_stream_pending", "Stream entries delivered but not yet acknowledged.",
                         multiprocess_mode="livemostrecent", registry=None)
        self.paused = G("reconciler_backpressure_paused", "1 while poll workers pause because the consumer is "
                        "behind ([workers] backpressure_threshold).", multiprocess_mode="livemostrecent",
                        registry=None)
        self.pauses = C("reconciler_backpressure_pauses", "Times the poll workers were paused by backpressure.",
                        registry=None)
        # drift checks
        self.reobservations = C("reconciler_reobservations", "Unchanged re-observations of APPLIED or NO_CHANGES "
                                "rows settled by the drift checks: skipped (NetBox did not change under them) or "
                                "planned (it did, their last plan is older than [drift] max_age_hours, or the "
                                "change log cannot be read).", ["outcome"], registry=None)
        self.drift_fallback = G("reconciler_drift_fallback", "1 while NetBox's change log cannot be read and every "
                                "unchanged re-observation is planned again, as in [drift] mode always.",
                                multiprocess_mode="livemostrecent", registry=None)
        self.change_log_high_water = G("reconciler_change_log_high_water_timestamp_seconds", "NetBox's clock at the "
                                       "start of the last successful read of its change log (Unix time).",
                                       multiprocess_mode="livemostrecent", registry=None)
        self.change_log_changes = C("reconciler_change_log_changes", "Changes made by others than the plugin, read "
                                    "from NetBox's change log (each once).",
                                    registry=None)
        # dependencies (dependencies.py): each set by the process that owns it
        self.dependency_up = G("reconciler_dependency_up", "1 while a dependency answers, 0 while it is down: postgres "
                               "and redis as the consumer sees them, plugin and token_endpoint as the refresher does.",
                               ["dependency"], multiprocess_mode="livemostrecent", registry=None)
        # retention
        self.pruned = C("reconciler_pruned", "What retention deleted, by kind: rows (finished, no longer their "
                        "entity's current row), change_sets (superseded plans), dead_letters.", ["kind"],
                        registry=None)
        # read API
        self.api_requests = C("reconciler_api_requests", "Read API calls (diode.v1.ReconcilerService) by method "
                              "and gRPC status code.", ["method", "code"], registry=None)
        self.api_latency = H("reconciler_api_request_duration_seconds", "Read API calls, from receipt to the answer "
                             "built, by method.", ["method"], buckets=API_LATENCY_BUCKETS, registry=None)
        self.api_serving = G("reconciler_api_serving", "1 while the read API serves (it answers calls and Postgres "
                             "answers it), 0 while it does not.", multiprocess_mode="livemostrecent", registry=None)
        # supervisor
        self.restarts = C("reconciler_child_restarts", "Child processes restarted by the supervisor, by role and "
                          "reason (boot_failure, killed: by a signal, crashed: a non-zero exit).",
                          ["role", "reason"], registry=None)


_metrics: _Metrics | None = None


def _objects() -> _Metrics:
    """The metric objects of this process, built on first use."""
    global _metrics
    if _metrics is None:
        _metrics = _Metrics()
    return _metrics


# --- set-up, in the supervisor before it forks ---


def enabled(config) -> bool:
    return bool(config.metrics.listen)


def prepare_directory(config) -> str | None:
    """Before the first fork: point PROMETHEUS_MULTIPROC_DIR at an empty directory; its path.

    An operator's PROMETHEUS_MULTIPROC_DIR (e.g. under systemd's RuntimeDirectory) is used and
    emptied of the last run's files (even with metrics off: the children write there all the same);
    otherwise the supervisor's scratch directory (scratch.py); none when metrics are off.
    """
    if not enabled(config) and ENV not in os.environ:
        return None
    if _metrics is not None or "prometheus_client.values" in sys.modules and ENV not in os.environ:
        raise RuntimeError("prometheus_client was used before metrics.prepare_directory(): its values would "
                           "stay in this process instead of the multiprocess directory")
    path = os.environ.get(ENV)
    if path:
        os.makedirs(path, exist_ok=True)
        for stale in glob.glob(os.path.join(path, "*.db")):
            os.remove(stale)
    else:
        path = os.environ[ENV] = scratch.directory()
    _objects()  # the supervisor's own metrics, before any child inherits the module
    log.debug("metrics of every process in %s", path)
    return path


def directory() -> str | None:
    return os.environ.get(ENV)


# --- supervisor ---


def child_exited(pid: int) -> None:
    """A child is gone (reaped): drop its live gauges (its counters keep counting in the sums)."""
    path = directory()
    if path:
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(pid, path)


def child_restarted(name: str, booted: bool, exitcode: int | None) -> None:
    """The supervisor restarts a child (`worker 3` counts as role worker)."""
    if not booted:
        reason = "boot_failure"
    elif exitcode is not None and exitcode < 0:
        reason = "killed"
    else:
        reason = "crashed"
    _objects().restarts.labels(name.split(" ", 1)[0], reason).inc()


# --- consumer ---


def consumed(outcome) -> None:
    """One committed read of the stream (an inbox.Written)."""
    m = _objects()
    m.messages.inc(outcome.messages - outcome.redelivered)
    if outcome.redelivered:
        m.redelivered.inc(outcome.redelivered)
    m.entities.inc(outcome.entities)
    if outcome.duplicates:
        m.duplicates.inc(outcome.duplicates)
    if outcome.requeued:
        m.requeued.inc(outcome.requeued)
    if outcome.dead_letters:
        for kind, n in Counter(r.kind for r in outcome.dead_letters).items():
            m.dead_letters.labels(kind).inc(n)


# --- poll workers ---


def claimed(object_types: Iterable[str]) -> None:
    """One claimed batch: the object type of each row."""
    claimed_rows = _objects().claimed
    for object_type, n in Counter(object_types).items():
        claimed_rows.labels(object_type).inc(n)


def decided(outcomes: Iterable[tuple[str, int]]) -> None:
    """One batch's recorded outcomes: (object type, state) of each row."""
    rows = _objects().rows
    for (object_type, state), n in Counter(outcomes).items():
        rows.labels(object_type, OUTCOME_LABELS.get(state) or states.NAMES.get(state, str(state)).lower()).inc(n)


def warned(plan_warnings: Iterable[dict], apply_warnings: Iterable[list]) -> None:
    """The warnings of one batch's recorded change sets: one per field a plan ignored, one per create an
    apply resolved onto an existing object."""
    counts: Counter = Counter()
    for warnings in plan_warnings:
        for object_type, fields in warnings.items():
            counts[("plan", str(object_type))] += len(fields) if isinstance(fields, dict) else 1
    for applied in apply_warnings:
        counts.update(("apply", str(w.get("object_type", ""))) for w in applied)
    metric = _objects().warnings
    for (kind, object_type), n in counts.items():
        metric.labels(kind, object_type).inc(n)


# --- plugin client ---


def plugin_request(path: str, status: int | None, seconds: float) -> None:
    """One HTTP request to the plugin (status None: no answer)."""
    m = _objects()
    endpoint = path.strip("/") or "/"
    m.latency.labels(endpoint).observe(seconds)
    m.responses.labels(endpoint, "error" if status is None else str(status)).inc()


# --- refresher ---


def stream_backlog(lag: int, pending: int) -> None:
    m = _objects()
    m.lag.set(lag)
    m.pending.set(pending)


def backpressure(paused: bool, started: bool) -> None:
    """The refresher's backpressure decision; `started`: the workers were running until now."""
    m = _objects()
    if started:  # counted first: a scrape that sees the workers paused sees this pause counted
        m.pauses.inc()
    m.paused.set(1 if paused else 0)


# --- drift checks ---


def reobservations_settled(skipped: int, planned: int) -> None:
    m = _objects()
    if skipped:
        m.reobservations.labels("skipped").inc(skipped)
    if planned:
        m.reobservations.labels("planned").inc(planned)


def drift_fallback(on: bool) -> None:
    _objects().drift_fallback.set(1 if on else 0)


def change_log_read(changes: int, high_water: float) -> None:
    m = _objects()
    m.change_log_changes.inc(changes)
    m.change_log_high_water.set(high_water)


# --- dependencies ---


def dependency_up(dependency: str, up: bool) -> None:
    _objects().dependency_up.labels(dependency).set(1 if up else 0)


# --- retention ---


def pruned(kind: str, n: int) -> None:
    _objects().pruned.labels(kind).inc(n)


# --- read API ---


def api_call(method: str, code: str, seconds: float) -> None:
    m = _objects()
    m.api_requests.labels(method, code).inc()
    m.api_latency.labels(method).observe(seconds)


def api_serving(serving: bool) -> None:
    _objects().api_serving.set(1 if serving else 0)
