"""Benchmark of the read API (diode.v1.ReconcilerService) over a large inbox, against its ceilings.

    .venv/bin/python bench/readapi.py [--rows 1000000] [--calls 300] [--backlog 100000] [--json]
                                      [--skip api|consumer]

1. The inbox: `--rows` ingestion_logs rows written with INSERT ... SELECT (real entities of
   reconciler.sample, cycled), states as a busy auto-apply inbox has them (STATE_MIX; the QUEUED
   rows are the newest, a backlog the workers have not reached), and one change set of 1 to 3
   changes for every row that is not QUEUED (BRANCH_SHARE of them on a branch). Then VACUUM ANALYZE.
2. `bin/reconciler run` serves the API (workers 0: the consumer and the api role), auth `gateway`,
   with a JWT of scope diode:read. One grpcio client calls, in interleaved rounds (`--calls` rounds
   after `--warmup`, each case once a round, so the machine's drift spreads over every case alike):
   RetrieveDeviations pages of 100 (first, middle, last, and first pages filtered by state FAILED,
   state OPEN, one object type, a branch), RetrieveDeviationByID of random ids, RetrieveIngestionLogs
   (a page of 100; only_metrics without and with an object type). p50 and p99 of each.
3. Ceilings, in the same rounds: a bare gRPC server (its own process, 4 threads, no interceptor, no
   database) answering every RetrieveDeviations with a prebuilt copy of the real first page; and the
   page's bare SQL (the statement the service picks, api_rows, in a REPEATABLE READ READ ONLY
   transaction) through psycopg2. Each API case is reported as a ratio of its p99 to the bare gRPC p99.
4. EXPLAIN (ANALYZE, BUFFERS) of the statement the service picks for each measured page of
   deviations (service.deviations_query: api_deviation_ids or api_planned_ids), and of state_counts.
5. Behind a backlog: the newest `--backlog` rows made QUEUED without change sets (a burst the
   workers have not reached), then the pages that walk the primary key through such rows (first
   page, one object type, a branch; the last page as a control) measured again with the ceilings.
6. The consumer's cost of migration 0013's counter triggers: bench/consume.py's drain (one consumer
   process drains a pre-filled stream) and raw COPY, each run with the triggers enabled and disabled
   (ALTER TABLE ... DISABLE TRIGGER), alternating, `--consume-repeat` pairs: medians of entities/s
   and of the consumer's Postgres backend's CPU an entity (where the triggers run), and their ratios.

About 5 minutes. It creates and drops its own databases and uses Redis db 12 (flushed).
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import grpc
import jwt
import psycopg2
import psycopg2.extras

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

import consume  # noqa: E402
from process import Bench  # noqa: E402

from reconciler import sample, settings, states, streamentry  # noqa: E402
from reconciler.api import paging, reconciler_pb2 as pb, reconciler_pb2_grpc  # noqa: E402
from reconciler.api.service import Filters, deviations_query  # noqa: E402  (the statement a page runs)
from reconciler.db import QUERIES  # noqa: E402

SPAWN = multiprocessing.get_context("spawn")  # the bare server's process: grpc is not fork-safe once used
PAGE = 100
# Per mille of the rows: a busy auto-apply inbox. QUEUED rows are the newest ones (the backlog).
STATE_MIX = ((states.APPLIED, 880), (states.NO_CHANGES, 40), (states.FAILED, 20), (states.ERRORED, 5),
             (states.OPEN, 20), (states.IGNORED, 10), (states.QUEUED, 20), (states.PENDING_RETRY, 5))
BRANCH, BRANCH_SHARE = "feature (b1)", 100  # one change set in BRANCH_SHARE is on the branch
SPAN_NS = 30 * 86400 * 10**9  # the rows' ingestion_ts spread over the last 30 days
KEY = "the issuer's key, unknown to the reconciler"  # auth gateway reads the JWT's scope, not its signature
CEILING = "ceiling: bare gRPC, prebuilt page of 100"
COUNTER_TRIGGERS = ("ingestion_logs_count_inserted", "ingestion_logs_count_updated",
                    "ingestion_logs_count_deleted", "ingestion_logs_count_truncated")


def say(args, *text) -> None:
    """Progress and plans; on stderr under --json, which keeps stdout for the JSON document."""
    print(*text, file=sys.stderr if args.json else sys.stdout, flush=True)


def percentiles(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    return {"p50_ms": statistics.median(ordered) * 1000,
            "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000}


# --- 1: the inbox ---


def _state_case(rows: int) -> tuple[str, int]:
    """SQL for a row's state from its number g and t.b, a hash of g below the second value returned:
    the newest rows QUEUED, the others spread in STATE_MIX's proportions."""
    queued = rows * dict(STATE_MIX)[states.QUEUED] // 1000
    others = [(state, share) for state, share in STATE_MIX if state != states.QUEUED]
    bounds = list(itertools.accumulate(share for _, share in others))
    whens = " ".join(f"WHEN t.b < {bound} THEN {state}" for (state, _), bound in zip(others, bounds))
    return f"CASE WHEN g > {rows - queued} THEN {states.QUEUED} ELSE CASE {whens} END END", bounds[-1]


def _store_entities(bench: Bench) -> int:
    """A few hundred real entities (the default sample network: every type it makes) in a scratch
    table the fill cycles through."""
    rows = [(n, streamentry.OBJECT_TYPES[e.WhichOneof("entity")], e.SerializeToString())
            for n, e in enumerate(sample.network(sample.Shape()))]
    conn = psycopg2.connect(bench.dsn, options="-c search_path=reconciler")
    with conn, conn.cursor() as cursor:
        cursor.execute("CREATE UNLOGGED TABLE bench_entities (n int PRIMARY KEY, object_type text, entity bytea)")
        psycopg2.extras.execute_values(cursor, "INSERT INTO bench_entities VALUES %s", rows)
    conn.close()
    return len(rows)


def fill(bench: Bench, rows: int) -> None:
    entities = _store_entities(bench)
    state, buckets = _state_case(rows)
    start, step = time.time_ns() - SPAN_NS, SPAN_NS // rows
    producers = "ARRAY[" + ", ".join(f"'{p}'" for p in sample.PRODUCERS) + "]"
    # ORDER BY g: the identity hands out ids in the order rows arrive, so id = g, newest = highest.
    bench.sql(f"""
        INSERT INTO ingestion_logs (object_type, state, request_id, ingestion_ts, source_ts, producer_app_name,
                                    producer_app_version, sdk_name, sdk_version, entity, entity_hash, error,
                                    attempts, next_attempt_at, planned_branch, planned_at, created_at, updated_at)
        SELECT e.object_type, s.state, md5('request ' || g / 100)::uuid::text, t.ts, t.ts - 1000000000,
               ({producers})[1 + (g / 100) % {len(sample.PRODUCERS)}], '1.4.0', 'diode-sdk-python',
               '{sample.SDK_VERSION}', e.entity, sha256(g::text::bytea),
               CASE s.state
                   WHEN {states.FAILED} THEN jsonb_build_object(
                       'message', 'NetBox refused the change set: ' || e.object_type || '.name: already exists',
                       'code', 'ERR_OPS_APPLY_CHANGE_SET',
                       'details', jsonb_build_object('errors', jsonb_build_object(
                           e.object_type, jsonb_build_object('name', jsonb_build_array('already exists')))))
                   WHEN {states.ERRORED} THEN jsonb_build_object(
                       'message', 'the plugin answered HTTP 500', 'code', 'ERR_PLUGIN', 'details', NULL)
               END,
               CASE WHEN s.state = {states.PENDING_RETRY} THEN 1 ELSE 0 END,
               CASE WHEN s.state = {states.PENDING_RETRY} THEN now() + interval '1 minute' END,
               CASE WHEN s.state <> {states.QUEUED} AND g % {BRANCH_SHARE} = 7 THEN '{BRANCH}' END,
               CASE WHEN s.state <> {states.QUEUED} THEN to_timestamp(t.ts / 1e9) + interval '1 second' END,
               to_timestamp(t.ts / 1e9), to_timestamp(t.ts / 1e9) + interval '2 seconds'
        FROM generate_series(1, {rows}) AS g
        JOIN bench_entities AS e ON e.n = g % {entities}
        CROSS JOIN LATERAL (SELECT {start}::bigint + g::bigint * {step} AS ts,
                                   abs(hashint4(g)::bigint) % {buckets} AS b) AS t
        CROSS JOIN LATERAL (SELECT {state} AS state) AS s
        ORDER BY g""")
    bench.sql("DROP TABLE bench_entities")
    # change_sets.id is an identity advancing by 10,000 (migration 0003): Postgres numbers them.
    bench.sql(f"""
        INSERT INTO change_sets (external_id, ingestion_log_id, branch_id, deviation_name, created_at, updated_at)
        SELECT md5('change set ' || l.id)::uuid::text, l.id, l.planned_branch,
               l.object_type || ' obj-' || l.id || CASE WHEN l.state = {states.NO_CHANGES} THEN ' unchanged'
                                                        WHEN l.id % 4 = 0 THEN ' discovered' ELSE ' modified' END,
               l.planned_at, l.updated_at
        FROM ingestion_logs AS l WHERE l.state <> {states.QUEUED} ORDER BY l.id""")
    # 1 to 3 changes: the row's own object (created or updated; a noop when nothing changed), then
    # noops for the device and the site it refers to, as the plugin answers for an interface.
    bench.sql(f"""
        INSERT INTO changes (external_id, change_set_id, change_type, object_type, object_primary_value,
                             object_id, before, after, sequence_number)
        SELECT md5('change ' || c.id || ' ' || k)::uuid::text, c.id,
               CASE WHEN k > 0 OR l.state = {states.NO_CHANGES} THEN 'noop'
                    WHEN l.id % 4 = 0 THEN 'create' ELSE 'update' END,
               CASE k WHEN 0 THEN l.object_type WHEN 1 THEN 'dcim.device' ELSE 'dcim.site' END,
               CASE k WHEN 0 THEN 'obj-' || l.id WHEN 1 THEN 'sw-001-0001' ELSE 'dc-001' END,
               CASE WHEN k = 0 AND l.id % 4 = 0 THEN NULL WHEN k = 0 THEN l.id WHEN k = 1 THEN 9 ELSE 7 END,
               CASE WHEN k = 0 AND l.id % 4 = 0 THEN '{{}}'::jsonb
                    WHEN k = 0 THEN jsonb_build_object('id', l.id, 'name', 'obj-' || l.id, 'enabled', true,
                                                       'mtu', 1500, 'description', 'port (rev 0)')
                    WHEN k = 1 THEN '{{"id": 9, "name": "sw-001-0001", "site": 7}}'::jsonb
                    ELSE '{{"id": 7, "name": "dc-001", "slug": "dc-001"}}'::jsonb END,
               CASE WHEN k = 0 THEN jsonb_build_object('name', 'obj-' || l.id, 'enabled', true, 'mtu', 1500,
                                                       'description', 'port (rev 1)')
                    ELSE '{{}}'::jsonb END,
               k
        FROM change_sets AS c
        JOIN ingestion_logs AS l ON l.id = c.ingestion_log_id
        CROSS JOIN LATERAL generate_series(0, (l.id % 3)::int) AS k""")
    bench.sql("VACUUM ANALYZE")


def inbox_shape(bench: Bench) -> dict:
    counted = dict(bench.sql("SELECT state, count(*) FROM ingestion_logs GROUP BY state"))
    sets, changes, on_branch, mb = bench.sql(
        "SELECT (SELECT count(*) FROM change_sets), (SELECT count(*) FROM changes), "
        f"(SELECT count(*) FROM change_sets WHERE branch_id = '{BRANCH}'), "
        "pg_total_relation_size('ingestion_logs') / 1048576")[0]
    return {"rows": sum(counted.values()), "states": {states.NAMES[s]: n for s, n in sorted(counted.items())},
            "change_sets": sets, "changes": changes, "on_branch": on_branch, "ingestion_logs_mb": mb}


# --- 2: the API, served by `reconciler run` ---


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_event(log_path: Path, event: str, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log_path.read_text(errors="replace").splitlines():
            try:
                if json.loads(line).get("event") == event:
                    return
            except (ValueError, AttributeError):
                continue
        if process.poll() is not None:
            break
        time.sleep(0.1)
    raise SystemExit(f"no {event!r} from reconciler run; its log ({log_path}):\n{log_path.read_text()[-3000:]}")


@contextmanager
def api_served(bench: Bench) -> Iterator[str]:
    """`bin/reconciler run` with the read API on a free loopback port, no workers, no retention."""
    address = f"127.0.0.1:{free_port()}"
    env = {"PATH": os.environ["PATH"], **{f"RECONCILER_{key}": value for key, value in {
        "POSTGRES_DSN": bench.dsn, "REDIS_URL": bench.redis_url, "WORKERS_COUNT": "0", "METRICS_LISTEN": "off",
        "API_LISTEN": address, "RETENTION_SUPERSEDED_ROWS_DAYS": "0", "RETENTION_SUPERSEDED_CHANGE_SETS_DAYS": "0",
        "RETENTION_DEAD_LETTERS_DAYS": "0", "LOG_FORMAT": "json"}.items()}}
    log_path = Path(f"/tmp/bench-readapi-{os.getpid()}.log")
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, str(ROOT / "bin" / "reconciler"), "run", "-c", "/dev/null"],
                                   env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for_event(log_path, "api_serving", process)
            yield address
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(60)


def wait_for_fold(bench: Bench, timeout: float = 60.0) -> None:
    """The fill's counter deltas folded into state_counts by the API process's consumer, so that
    only_metrics reads what it reads in a steady inbox."""
    deadline = time.monotonic() + timeout
    while bench.sql("SELECT count(*) FROM state_count_deltas")[0][0]:
        if time.monotonic() > deadline:
            raise SystemExit("the consumer did not fold the state counters")
        time.sleep(0.5)


# --- 3: the ceilings ---


class _BarePage(reconciler_pb2_grpc.ReconcilerServiceServicer):
    def __init__(self, page: pb.RetrieveDeviationsResponse) -> None:
        self.page = page

    def RetrieveDeviations(self, request, context):
        return self.page


def _serve_bare(page: bytes, port) -> None:
    """The gRPC ceiling: the API's thread count, no interceptor, no database, the same page."""
    server = grpc.server(ThreadPoolExecutor(max_workers=settings.BY_NAME["api.threads"].default))
    reconciler_pb2_grpc.add_ReconcilerServiceServicer_to_server(
        _BarePage(pb.RetrieveDeviationsResponse.FromString(page)), server)
    port.put(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    server.wait_for_termination()


@contextmanager
def bare_served(page: pb.RetrieveDeviationsResponse) -> Iterator[str]:
    port = SPAWN.Queue()
    process = SPAWN.Process(target=_serve_bare, args=(page.SerializeToString(), port), daemon=True)
    process.start()
    try:
        yield f"127.0.0.1:{port.get(timeout=60)}"
    finally:
        process.terminate()
        process.join(10)


class BareSql:
    """One unfiltered page's statements, as the service runs them, on a psycopg2 connection of its own."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg2.connect(dsn, options="-c search_path=reconciler")

    def page(self, below: int) -> int:
        with self.conn, self.conn.cursor() as cursor:  # one transaction, committed at the end
            cursor.execute(QUERIES["read_snapshot"])
            cursor.execute(QUERIES[deviations_query(Filters())],
                           {**Filters().params(), "below": below, "limit": PAGE + 1})
            ids = [row[0] for row in cursor.fetchall()][:PAGE]
            cursor.execute(QUERIES["api_rows"], {"ids": ids, "with_change_set_data": False})
            return len(cursor.fetchall())

    def close(self) -> None:
        self.conn.close()


# --- the calls ---


def deviation_below(bench: Bench, newer: int) -> int:
    """The id of the deviation with `newer` deviations above it: a token holding it as the last id
    served asks for the page below (each row that is not QUEUED has one change set)."""
    return bench.sql(f"SELECT ingestion_log_id FROM change_sets ORDER BY ingestion_log_id DESC "
                     f"OFFSET {newer} LIMIT 1")[0][0]


def token(below: int) -> str:
    """An unfiltered page's token as service._page makes it: the last id served and the digest of
    the filters (none: Filters() is what RetrieveDeviations builds for a request without any)."""
    return paging.encode(below, paging.digest("deviations", Filters()))


def api_cases(bench: Bench, stub, metadata, object_type: str, ids: list[str]) -> dict[str, tuple[Callable, Callable]]:
    """Name -> (one call, a check of its answer)."""
    deviations = bench.sql("SELECT count(*) FROM change_sets")[0][0]
    middle, last = deviation_below(bench, deviations // 2), deviation_below(bench, deviations - PAGE - 1)
    by_id = itertools.cycle(ids)

    def page(check: Callable[[pb.RetrieveDeviationsResponse], bool] = lambda answer: True, **fields):
        request = pb.RetrieveDeviationsRequest(page_size=PAGE, **fields)
        return (lambda: stub.RetrieveDeviations(request, metadata=metadata, timeout=60),
                lambda answer: len(answer.deviations) == PAGE and check(answer))

    def logs(**fields):
        request = pb.RetrieveIngestionLogsRequest(**fields)
        return lambda: stub.RetrieveIngestionLogs(request, metadata=metadata, timeout=60)

    def all_in(field: str, values: set) -> Callable:
        return lambda answer: all(getattr(d, field) in values for d in answer.deviations)

    return {
        "deviations: first page": page(lambda answer: bool(answer.next_page_token)),
        "deviations: middle page": page(lambda answer: bool(answer.next_page_token), page_token=token(middle)),
        "deviations: last page": page(lambda answer: not answer.next_page_token, page_token=token(last)),
        "deviations: state FAILED": page(all_in("state", {states.FAILED}), state=[states.FAILED]),
        "deviations: state OPEN": page(all_in("state", {states.OPEN}), state=[states.OPEN]),
        f"deviations: object type {object_type}": page(all_in("object_type", {object_type}),
                                                       object_type=[object_type]),
        f"deviations: branch {BRANCH.split()[0]}": page(all_in("branch_id", {BRANCH}), branch_id=[BRANCH.split()[0]]),
        "deviation by id": (lambda: stub.RetrieveDeviationByID(pb.RetrieveDeviationByIDRequest(id=next(by_id)),
                                                               metadata=metadata, timeout=60),
                            lambda answer: bool(answer.deviation.id)),
        "ingestion logs: page": (logs(page_size=PAGE), lambda answer: len(answer.logs) == PAGE),
        "ingestion logs: only_metrics": (logs(only_metrics=True), lambda answer: answer.metrics.total > 0),
        f"ingestion logs: only_metrics, {object_type}": (logs(only_metrics=True, object_type=object_type),
                                                        lambda answer: answer.metrics.total > 0),
    }


def checked(cases: dict[str, tuple[Callable, Callable]]) -> dict[str, Callable]:
    """Each case called once and its answer checked: a benchmark of wrong answers measures nothing."""
    for name, (call, check) in cases.items():
        if not check(call()):
            raise SystemExit(f"{name}: the answer is not what the benchmark asked for")
    return {name: call for name, (call, _) in cases.items()}


def measure(cases: dict[str, Callable], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Interleaved: each round calls every case once, so drift and caches weigh on every case alike."""
    timings: dict[str, list[float]] = {name: [] for name in cases}
    for n in range(warmup + rounds):
        for name, call in cases.items():
            started = time.perf_counter()
            call()
            if n >= warmup:
                timings[name].append(time.perf_counter() - started)
    return timings


# --- 4: plans ---


def explain(bench: Bench, query: str, params: dict) -> str:
    conn = psycopg2.connect(bench.dsn, options="-c search_path=reconciler")
    with conn, conn.cursor() as cursor:
        cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + QUERIES[query], params)
        plan = "\n".join(row[0] for row in cursor.fetchall())
    conn.close()
    return plan


def explain_page(bench: Bench, filters: Filters, below: int = paging.FIRST) -> tuple[str, str]:
    """The statement the service runs for this page, and its plan."""
    query = deviations_query(filters)
    return query, explain(bench, query, {**filters.params(), "below": below, "limit": PAGE + 1})


def plans(bench: Bench, object_type: str) -> dict[str, str]:
    deviations = bench.sql("SELECT count(*) FROM change_sets")[0][0]
    pages = {"first page": (Filters(), paging.FIRST),
             "last page": (Filters(), deviation_below(bench, deviations - PAGE - 1)),
             "state FAILED": (Filters(states=(states.FAILED,)), paging.FIRST),
             "state OPEN": (Filters(states=(states.OPEN,)), paging.FIRST),
             f"object type {object_type}": (Filters(object_types=(object_type,)), paging.FIRST),
             f"branch {BRANCH.split()[0]}": (Filters(branches=(BRANCH.split()[0],)), paging.FIRST)}
    explained = {}
    for name, (filters, below) in pages.items():
        query, plan = explain_page(bench, filters, below)
        explained[f"{query}, {name}"] = plan
    explained["state_counts"] = explain(bench, "state_counts", {"object_types": None})
    explained[f"state_counts, {object_type}"] = explain(bench, "state_counts", {"object_types": [object_type]})
    return explained


# --- the read API run, and 5: the backlog ---


def make_backlog(bench: Bench, rows: int, backlog: int) -> None:
    """The newest `backlog` rows QUEUED without a change set, as a burst the workers have not reached
    leaves them (their change sets' changes go with them: migration 0003's trigger)."""
    bench.sql(f"UPDATE ingestion_logs SET state = {states.QUEUED}, error = NULL, attempts = 0, next_attempt_at = NULL, "
              f"planned_branch = NULL, planned_at = NULL WHERE id > {rows - backlog} AND state <> {states.QUEUED}")
    bench.sql(f"DELETE FROM change_sets WHERE ingestion_log_id > {rows - backlog}")
    bench.sql("VACUUM ANALYZE ingestion_logs, change_sets, changes")


def read_api(args) -> dict:
    with Bench(args) as bench:
        started = time.monotonic()
        fill(bench, args.rows)
        fill_seconds = time.monotonic() - started
        shape = inbox_shape(bench)
        say(args, f"filled {shape['rows']:,} rows ({shape['change_sets']:,} change sets, {shape['changes']:,} "
                  f"changes, {shape['on_branch']:,} on {BRANCH}; ingestion_logs {shape['ingestion_logs_mb']:,} MB) "
                  f"in {fill_seconds:.0f} s; states {shape['states']}")
        ids = [row[0] for row in bench.sql(f"SELECT external_id::text FROM ingestion_logs WHERE state <> "
                                           f"{states.QUEUED} ORDER BY random() LIMIT {args.calls + args.warmup}")]
        metadata = [("authorization", f"Bearer {jwt.encode({'scope': 'diode:read'}, KEY, algorithm='HS256')}")]
        results: dict = {"commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                                  capture_output=True).stdout.strip(),
                         "rows": args.rows, "fill_seconds": fill_seconds, "inbox": shape}
        with api_served(bench) as address, grpc.insecure_channel(address) as channel:
            wait_for_fold(bench)
            stub = reconciler_pb2_grpc.ReconcilerServiceStub(channel)
            cases = checked(api_cases(bench, stub, metadata, args.object_type, ids))
            real_page = stub.RetrieveDeviations(pb.RetrieveDeviationsRequest(page_size=PAGE), metadata=metadata)
            results["page_bytes"] = real_page.ByteSize()
            sql = BareSql(bench.dsn)
            last = deviation_below(bench, shape["change_sets"] - PAGE - 1)
            with bare_served(real_page) as bare_address, grpc.insecure_channel(bare_address) as bare_channel:
                bare_stub = reconciler_pb2_grpc.ReconcilerServiceStub(bare_channel)
                request = pb.RetrieveDeviationsRequest(page_size=PAGE)
                ceilings = {CEILING: lambda: bare_stub.RetrieveDeviations(request, metadata=metadata, timeout=60),
                            "reference: bare SQL, first page": lambda: sql.page(paging.FIRST)}
                cases = {**cases, **ceilings, "reference: bare SQL, last page": lambda: sql.page(last)}
                results["calls"] = timed(args, cases)
                results["plans"] = plans(bench, args.object_type)
                if args.backlog:
                    make_backlog(bench, args.rows, args.backlog)
                    wait_for_fold(bench)
                    say(args, f"the newest {args.backlog:,} rows made QUEUED without change sets")
                    behind = checked({name: case for name, case in api_cases(
                        bench, stub, metadata, args.object_type, ids).items() if name in backlog_cases(args)})
                    results["backlog"] = args.backlog
                    results["backlog_calls"] = timed(args, {**behind, **ceilings})
                    by_type = Filters(object_types=(args.object_type,))
                    for name, filters in (("first page", Filters()), (f"object type {args.object_type}", by_type)):
                        query, plan = explain_page(bench, filters)
                        results["plans"][f"{query}, {name} behind the backlog"] = plan
            sql.close()
    return results


def backlog_cases(args) -> set[str]:
    """The pages that walk the primary key through the backlog, and the last page as a control."""
    return {"deviations: first page", "deviations: last page", f"deviations: object type {args.object_type}",
            f"deviations: branch {BRANCH.split()[0]}"}


def timed(args, cases: dict[str, Callable]) -> dict[str, dict]:
    say(args, f"measuring {len(cases)} cases, {args.warmup} + {args.calls} interleaved rounds ...")
    started = time.monotonic()
    timings = measure(cases, args.calls, args.warmup)
    say(args, f"measured in {time.monotonic() - started:.0f} s")
    return {name: percentiles(seconds) for name, seconds in timings.items()}


# --- 6: the counter triggers on the consumer ---


def set_counters(bench: consume.Bench, enabled: bool) -> None:
    verb = "ENABLE" if enabled else "DISABLE"
    bench.sql("; ".join(f"ALTER TABLE ingestion_logs {verb} TRIGGER {name}" for name in COUNTER_TRIGGERS))


def counted_rows(bench: consume.Bench) -> int:
    return bench.sql("SELECT coalesce(sum(n), 0)::bigint FROM (SELECT n FROM state_counts UNION ALL "
                     "SELECT n FROM state_count_deltas) AS c")[0][0]


def trigger_cost(args) -> dict:
    """bench/consume.py's drain and raw COPY, unchanged, with the counters on and off in its database."""
    consume_args = argparse.Namespace(admin_dsn=args.admin_dsn, redis_url=args.redis_url, redis_db=args.redis_db,
                                      entities=args.consume_entities,
                                      read_count=settings.BY_NAME["redis.read_count"].default)
    runs: dict[bool, list[dict]] = {True: [], False: []}
    with consume.Bench(consume_args) as bench:
        entries = bench.entries()
        for n in range(args.consume_repeat):
            for enabled in (True, False) if n % 2 == 0 else (False, True):  # the order alternates: no order effect
                bench.reset_tables()
                bench.sql("DELETE FROM state_counts; DELETE FROM state_count_deltas")  # TRUNCATE's trigger may be off
                set_counters(bench, enabled)
                drain = bench.drain(entries)
                counted = counted_rows(bench)
                copy = bench.raw_copy(entries)
                if counted != (drain["rows"] if enabled else 0):
                    raise SystemExit(f"counters {'on' if enabled else 'off'}: {counted:,} rows counted of "
                                     f"{drain['rows']:,}")
                runs[enabled].append({"drain": drain["rate"], "copy": copy["rate"], "rows": drain["rows"],
                                      "backend_us": drain["backend_us"], "consumer_us": drain["consumer_us"]})
                say(args, f"drain {n + 1}, counters {'on ' if enabled else 'off'}: {drain['rows']:,} entities, "
                          f"{drain['rate']:,.0f} entities/s (CPU an entity: its Postgres backend "
                          f"{drain['backend_us']:.2f} us, the consumer {drain['consumer_us']:.2f} us); "
                          f"raw COPY {copy['rate']:,.0f} rows/s")
        set_counters(bench, True)
    # The triggers run in the consumer's Postgres backend: its CPU an entity is their cost without the disk.
    median = {enabled: {key: statistics.median(r[key] for r in rs) for key in ("drain", "copy", "backend_us")}
              for enabled, rs in runs.items()}
    return {"entities": runs[True][0]["rows"], "repeat": args.consume_repeat,
            "drain_on": median[True]["drain"], "drain_off": median[False]["drain"],
            "copy_on": median[True]["copy"], "copy_off": median[False]["copy"],
            "backend_us_on": median[True]["backend_us"], "backend_us_off": median[False]["backend_us"],
            "runs_on": runs[True], "runs_off": runs[False]}


# --- the report ---


def table(args, calls: dict[str, dict]) -> None:
    ceiling = calls[CEILING]["p99_ms"]
    say(args, "| call | p50 | p99 | p99 / bare gRPC p99 |\n|---|---|---|---|")
    for name, r in calls.items():
        say(args, f"| {name} | {r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms | {r['p99_ms'] / ceiling:.1f} |")


def targets(args, calls: dict[str, dict]) -> None:
    pages = {name.removeprefix("deviations: "): r["p99_ms"] for name, r in calls.items()
             if name.startswith("deviations: ")}
    say(args, "a page of 100, p99 < 50 ms: " + ", ".join(f"{name} {p99:.1f} ms {'met' if p99 < 50 else 'MISSED'}"
                                                          for name, p99 in pages.items()))
    first, last = calls["deviations: first page"], calls["deviations: last page"]
    say(args, f"last page / first page: p50 x{last['p50_ms'] / first['p50_ms']:.2f}, "
              f"p99 x{last['p99_ms'] / first['p99_ms']:.2f}")


def report(args, results: dict) -> None:
    if "api" in results:
        api = results["api"]
        for name, plan in api["plans"].items():
            say(args, f"\nEXPLAIN (ANALYZE, BUFFERS) {name}:\n{plan}")
        calls = api["calls"]
        say(args, f"\ncommit {api['commit']}; {api['rows']:,} rows, filled in {api['fill_seconds']:.0f} s; "
                  f"a page of 100 deviations is "
                  f"{api['page_bytes']:,} bytes; {args.calls} calls of each after {args.warmup} warm-up rounds\n")
        table(args, calls)
        say(args, "")
        targets(args, calls)
        metrics = max(r["p99_ms"] for name, r in calls.items() if "only_metrics" in name)
        say(args, f"only_metrics p99 < 100 ms: {metrics:.2f} ms {'met' if metrics < 100 else 'MISSED'}")
        for kind in ("first", "last"):
            page, ref = calls[f"deviations: {kind} page"], calls[f"reference: bare SQL, {kind} page"]
            say(args, f"{kind} page, API / its bare SQL: p50 x{page['p50_ms'] / ref['p50_ms']:.2f}, "
                      f"p99 x{page['p99_ms'] / ref['p99_ms']:.2f}")
        if "backlog_calls" in api:
            say(args, f"\nbehind a backlog: the newest {api['backlog']:,} rows QUEUED, without change sets\n")
            table(args, api["backlog_calls"])
            say(args, "")
            targets(args, api["backlog_calls"])
    if "consumer" in results:
        c = results["consumer"]
        say(args, f"\nconsumer, {c['entities']:,} entities, median of {c['repeat']} drains each way: counters on "
                  f"{c['drain_on']:,.0f} entities/s, off {c['drain_off']:,.0f} entities/s, on / off "
                  f"{c['drain_on'] / c['drain_off']:.2f}; raw COPY on {c['copy_on']:,.0f} rows/s, off "
                  f"{c['copy_off']:,.0f} rows/s, on / off {c['copy_on'] / c['copy_off']:.2f}; the consumer's Postgres "
                  f"backend, CPU an entity: on {c['backend_us_on']:.2f} us, off {c['backend_us_off']:.2f} us, "
                  f"on / off {c['backend_us_on'] / c['backend_us_off']:.2f}")
    if args.json:
        print(json.dumps(results, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--calls", type=int, default=300, help="measured calls of each case")
    parser.add_argument("--warmup", type=int, default=10, help="rounds called before measuring")
    parser.add_argument("--object-type", default="dcim.device", help="the object type filter (1.6%% of rows)")
    parser.add_argument("--backlog", type=int, default=100_000,
                        help="then the newest rows made QUEUED, and the pages that walk through them again (0: not)")
    parser.add_argument("--consume-entities", type=int, default=200_000)
    parser.add_argument("--consume-repeat", type=int, default=5, help="drains each way; the medians are reported")
    parser.add_argument("--skip", action="append", default=[], choices=["api", "consumer"])
    parser.add_argument("--json", action="store_true", help="the results as JSON on stdout (the rest on stderr)")
    parser.add_argument("--admin-dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    parser.add_argument("--redis-db", type=int, default=12)
    args = parser.parse_args()
    results = {}
    # The consumer half first: it forks the consumer, which grpc (used by the API half) does not survive.
    if "consumer" not in args.skip:
        results["consumer"] = trigger_cost(args)
    if "api" not in args.skip:
        results["api"] = read_api(args)
    report(args, results)


if __name__ == "__main__":
    os.environ.pop("RECONCILER_CONFIG", None)
    main()
