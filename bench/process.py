"""Benchmark of the poll workers: QUEUED rows -> plugin -> outcome and change sets persisted.

    .venv/bin/python bench/process.py [--rows 60000] [--workers 1 2 4] [--netbox-entities 400]
                                      [--skip instant|bare|netbox]

Two measurements in one run, printed as figures and ratios:
 1. instant plugin: a loopback server (its own process, Nagle off) answers every entity of
    /bulk-plan-apply/ at once with a change set of three changes (one create, two noops), so the
    workers' own cost shows: claim, protojson, HTTP, decisions, COPY of change sets and changes,
    bulk state update. 1, 2 and 4 worker processes (the production role) drain the same queue.
    The ceiling, in the same run (issue 10): a bare loop drains the same queue from the same
    instant plugin before the workers and again after them, in this process, with one connection
    and no supervisor, Manager, metrics, rate limiter, decisions or error handling: per batch it
    runs the workers' statements by name through reconciler.db.Database -- claim_batch (committed),
    then one POST of the batch's entities (protojson.batch_to_dicts of the stored bytes, orjson)
    to /bulk-plan-apply/, then in one transaction finish_rows (every row APPLIED),
    allocate_change_set_ids and the COPYs copy_change_sets and copy_changes of what the plugin
    answered (encoded with reconciler.pgcopy; a change set's deviation name is just the object
    type). That is the minimum work a worker must do for a batch: it stores the same rows, change
    sets and changes, column for column but that name. The workers' rows/s are reported as a ratio
    to the mean of the two bare runs (goal: 2 workers at >= 0.5 of it); both bare runs are printed,
    and how far the second moved from the first (the machine's drift, or an order effect). The
    bare loop is one process: on 2 cores, 2 workers can pass 1.0 of it; 1 worker against it is the
    cost of the worker's own machinery.
 2. real NetBox (peer/netbox.py, reset before each half): entities/s applied by `reconciler run`
    (2 workers, from the first XADD to the last row APPLIED) against a bare client that POSTs the
    same batches to /bulk-plan-apply/ from 2 threads. The ratio is the reconciler's overhead; NetBox's
    own speed drifts between resets, so rounds of one of each (order alternating) are run and the
    median ratio is reported.
It creates and drops its own database and uses Redis db 11.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import orjson
import psycopg2
import redis
import urllib3
from google.protobuf import json_format
from netboxlabs.diode.sdk.diode.v1 import ingester_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peer import netbox as peer  # noqa: E402
from reconciler import inbox, pgcopy, protojson, sample, settings, states, streamentry  # noqa: E402
from reconciler.db import Database  # noqa: E402
from reconciler.roles import Link, serve  # noqa: E402
from reconciler.sharedcache import Shared  # noqa: E402
from reconciler.worker import Worker  # noqa: E402

MP = multiprocessing.get_context("fork")
STREAM = "diode.v1.ingest-stream"


# --- the instant plugin ---


# One result per entity: a change set of two noops (referenced objects that exist) and a create,
# as NetBox answers for a new interface of an existing device. Built from a template so that the
# stub spends as little of the machine's two cores as possible.
RESULT = ('{"id": "%(id)s", "errors": null, "change_set": {"id": "cs-%(id)s", "branch": null, "changes": ['
          '{"id": "%(id)s-0", "change_type": "noop", "object_type": "dcim.site", "object_id": 7, "ref_id": null, '
          '"object_primary_value": "dc-1", "before": {"id": 7, "name": "dc-1", "slug": "dc-1"}, "data": {}, '
          '"new_refs": []}, '
          '{"id": "%(id)s-1", "change_type": "noop", "object_type": "dcim.device", "object_id": 9, "ref_id": null, '
          '"object_primary_value": "sw-1", "before": {"id": 9, "name": "sw-1", "site": 7}, "data": {}, '
          '"new_refs": []}, '
          '{"id": "%(id)s-2", "change_type": "create", "object_type": "%(type)s", "object_id": null, '
          '"ref_id": "new_object:%(type)s:%(id)s", "object_primary_value": "obj-%(id)s", "before": {}, '
          '"data": {"name": "obj-%(id)s", "device": 9, "type": "1000base-t", "enabled": true}, "new_refs": []}]}}')


class InstantPlugin(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else every keep-alive reply waits 40 ms for a delayed ACK

    def log_message(self, *args) -> None:
        pass

    def _send(self, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send(b'{"branch": null}')

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        results = ", ".join(RESULT % {"id": e["id"], "type": e["object_type"]} for e in body["entities"])
        self._send(("{\"results\": [" + results + "]}").encode())


def _serve_instant_plugin(port) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), InstantPlugin)
    port.value = server.server_address[1]
    server.serve_forever()


# --- the bare loop's record: finish_rows and the change sets, nothing else ---


def _record_bare(database: Database, owner: str, rows: list[tuple], change_sets: dict[int, dict]) -> None:
    """Every claimed row APPLIED with the plugin's change set and its changes, in one transaction."""
    ids = [row[0] for row in rows]
    n = len(ids)
    with database.transaction() as tx:
        written = {r[0] for r in tx.fetchall("finish_rows", {
            "owner": owner, "branch": "", "ids": ids, "states": [states.APPLIED] * n, "errors": [None] * n,
            "retry_in": [None] * n, "superseded": [False] * n, "answer_lost": [False] * n,
            "timed_out": [False] * n, "refund": [False] * n, "planned": [True] * n})}
        sets = [(row, change_sets[row[0]]) for row in rows if row[0] in written and row[0] in change_sets]
        if not sets:
            return
        first = tx.fetchall("allocate_change_set_ids")[0][0]
        tx.copy("copy_change_sets", pgcopy.stream([
            b"".join((pgcopy.tuple_start(7), pgcopy.bigint(first + k), pgcopy.text(str(cs["id"])),
                      pgcopy.bigint(row[0]), pgcopy.NULL, pgcopy.text(row[1]), pgcopy.NULL, pgcopy.NULL))
            for k, (row, cs) in enumerate(sets)]))
        texts: dict[str, bytes] = {}  # change and object types repeat: each encoded once per batch

        def short(value: str) -> bytes:
            encoded = texts.get(value)
            if encoded is None:
                encoded = texts[value] = pgcopy.text(value)
            return encoded

        tx.copy("copy_changes", pgcopy.stream([
            b"".join((_CHANGE_FIELDS, pgcopy.text(str(c["id"])), pgcopy.bigint(first + k),
                      short(c["change_type"]), short(c["object_type"]),
                      pgcopy.text(str(c.get("object_primary_value") or "")), pgcopy.bigint(c.get("object_id")),
                      pgcopy.nullable_text(c.get("ref_id")), pgcopy.NULL,
                      pgcopy.jsonb(orjson.dumps(c.get("before"))), pgcopy.jsonb(orjson.dumps(c.get("data"))),
                      _NO_REFS if c.get("new_refs") == [] else pgcopy.text_array(c.get("new_refs")),
                      pgcopy.integer(seq)))
            for k, (_, cs) in enumerate(sets) for seq, c in enumerate(cs["changes"])]))


_CHANGE_FIELDS = pgcopy.tuple_start(12)
_NO_REFS = pgcopy.text_array([])


# --- the bench ---


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.db_name = f"bench_process_{os.getpid()}"
        self.dsn = args.admin_dsn.rsplit("/", 1)[0] + "/" + self.db_name
        self.redis_url = f"{args.redis_url}/{args.redis_db}"

    def __enter__(self):
        self.admin(f"CREATE DATABASE {self.db_name}")
        database = Database(self.dsn, "reconciler")
        database.migrate()
        database.close()
        redis.Redis.from_url(self.redis_url).flushdb()
        return self

    def __exit__(self, *exc):
        try:
            self.admin(f"DROP DATABASE IF EXISTS {self.db_name} WITH (FORCE)")
        finally:
            redis.Redis.from_url(self.redis_url).flushdb()

    def admin(self, statement: str) -> None:
        conn = psycopg2.connect(self.args.admin_dsn)
        conn.autocommit = True
        conn.cursor().execute(statement)
        conn.close()

    def sql(self, statement: str):
        conn = psycopg2.connect(self.dsn, options="-c search_path=reconciler")
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(statement)
            rows = cursor.fetchall() if cursor.description else None
        conn.close()
        return rows

    def config(self, plugin_url: str, workers: int, token: str = "t") -> settings.Config:
        return settings.load(path=None, environ={
            "RECONCILER_POSTGRES_DSN": self.dsn, "RECONCILER_REDIS_URL": self.redis_url,
            "RECONCILER_NETBOX_URL": plugin_url, "RECONCILER_NETBOX_TOKEN": token,
            "RECONCILER_NETBOX_RATE_LIMIT_PER_SECOND": "0", "RECONCILER_WORKERS_COUNT": str(workers),
            "RECONCILER_NETBOX_TIMEOUT_SECONDS": "120", "RECONCILER_SUPERVISOR_HEARTBEAT_TIMEOUT_SECONDS": "180",
            "RECONCILER_WORKERS_BACKPRESSURE_THRESHOLD": "0",
            "RECONCILER_WORKERS_BATCH_SIZE": str(self.args.batch_size)})

    # --- 1: instant plugin ---

    def fill_queue(self) -> None:
        """--rows distinct QUEUED rows of a realistic network, through the consumer's own write path."""
        self.sql("TRUNCATE ingestion_logs, stream_receipts, change_sets RESTART IDENTITY CASCADE")
        per_site = sample.Shape(devices_per_site=90).entity_count()
        shape = sample.Shape(sites=-(-self.args.rows // per_site), devices_per_site=90)
        database = Database(self.dsn, "reconciler")
        batch, n = [], 0
        for n, fields in enumerate(sample.entries(shape)):
            batch.append(streamentry.decode_entry(f"{n + 1}-0".encode(), fields))
            if len(batch) == 25:
                inbox.write(database, STREAM, batch)
                batch = []
        if batch:
            inbox.write(database, STREAM, batch)
        database.close()
        self.sql(f"DELETE FROM ingestion_logs WHERE id > {self.args.rows}")
        self.sql("VACUUM ANALYZE ingestion_logs")

    def instant(self, plugin_url: str, workers: int) -> dict:
        self.fill_queue()
        config = self.config(plugin_url, workers)
        shared = Shared(0, 1)
        shared.cache.update(branch_known=True, branch=None, behind=False)
        processes = []
        started = time.perf_counter()
        for n in range(1, workers + 1):
            factory = lambda config, n=n: Worker(config, n, shared.cache, shared.limiter)  # noqa: E731
            process = MP.Process(target=serve, args=(factory, config, Link.create(MP), os.getpid()), daemon=True)
            process.start()
            processes.append(process)
        while self.sql("SELECT EXISTS (SELECT FROM ingestion_logs WHERE state = 1) "
                       "OR EXISTS (SELECT FROM ingestion_logs WHERE lease_owner IS NOT NULL)")[0][0]:
            time.sleep(0.1)  # both probes use partial indexes: the bench must not load the machine itself
        seconds = time.perf_counter() - started
        for process in processes:
            os.kill(process.pid, signal.SIGTERM)
            process.join(30)
        shared.shutdown()
        applied, sets, changes = self.sql("SELECT (SELECT count(*) FROM ingestion_logs WHERE state = 3), "
                                          "(SELECT count(*) FROM change_sets), (SELECT count(*) FROM changes)")[0]
        return {"workers": workers, "rows": applied, "seconds": seconds, "rate": applied / seconds,
                "change_sets": sets, "changes": changes}

    def bare(self, plugin_url: str) -> dict:
        """The ceiling: one loop in this process does per batch only what a worker must (see the
        module docstring), with the workers' statements, on the same queue and plugin."""
        self.fill_queue()
        database = Database(self.dsn, "reconciler", "bench bare loop")
        pool = urllib3.PoolManager(maxsize=1, retries=False)
        url = plugin_url + "/bulk-plan-apply/"
        headers = {"Authorization": "Bearer t", "Accept": "application/json", "Content-Type": "application/json"}
        claim = {"limit": self.args.batch_size, "state": states.APPLYING, "owner": "bench bare loop",
                 "lease_seconds": 600.0}
        started = time.perf_counter()
        while True:
            with database.transaction() as tx:
                rows = sorted(tx.fetchall("claim_batch", claim))
            if not rows:
                break
            entities = protojson.batch_to_dicts([pb.Entity.FromString(bytes(row[2])) for row in rows])
            body = orjson.dumps({"entities": [{"id": str(row[0]), "object_type": row[1], "entity": entity}
                                              for row, entity in zip(rows, entities)]})
            response = pool.request("POST", url, body=body, headers=headers, timeout=120)
            if response.status != 200:
                raise RuntimeError(f"the instant plugin answered HTTP {response.status}")
            change_sets = {int(r["id"]): r["change_set"] for r in orjson.loads(response.data)["results"]}
            _record_bare(database, claim["owner"], rows, change_sets)
        seconds = time.perf_counter() - started
        database.close()
        pool.clear()
        applied, sets, changes = self.sql("SELECT (SELECT count(*) FROM ingestion_logs WHERE state = 3), "
                                          "(SELECT count(*) FROM change_sets), (SELECT count(*) FROM changes)")[0]
        return {"rows": applied, "seconds": seconds, "rate": applied / seconds, "change_sets": sets, "changes": changes}

    # --- 2: real NetBox ---

    def netbox_batches(self) -> list[list[dict]]:
        """The bench's network as /bulk-plan-apply/ batches of 100, ids as the reconciler numbers rows."""
        shape = sample.Shape(sites=1, devices_per_site=-(-self.args.netbox_entities // 60), ports_per_device=48,
                             vlans_per_site=10, prefixes_per_site=10, vms_per_site=5)
        entities = list(sample.network(shape, first_site=200))[: self.args.netbox_entities]
        items = []
        for n, entity in enumerate(entities, 1):
            member = entity.WhichOneof("entity")
            items.append({"id": str(n), "object_type": streamentry.OBJECT_TYPES[member],
                          "entity": json_format.MessageToDict(entity, preserving_proto_field_name=True)})
        self._entities = entities
        return [items[i:i + 100] for i in range(0, len(items), 100)]

    def bare_client(self, batches: list[list[dict]]) -> dict:
        nb = peer.reset()
        pool = urllib3.PoolManager(maxsize=2)
        pending = list(batches)
        lock = threading.Lock()
        errors = []

        def client():
            while True:
                with lock:
                    if not pending:
                        return
                    batch = pending.pop(0)
                response = pool.request("POST", nb.plugin_url + "/bulk-plan-apply/",
                                        body=json.dumps({"entities": batch}),
                                        headers={"Authorization": f"Bearer {peer.PLUGIN_TOKEN}",
                                                 "Content-Type": "application/json"}, timeout=300)
                errors.extend(r for r in json.loads(response.data)["results"] if r.get("errors"))

        started = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - started
        entities = sum(len(b) for b in batches)
        return {"entities": entities, "seconds": seconds, "rate": entities / seconds, "errors": len(errors)}

    def reconciler_run(self) -> dict:
        nb = peer.reset()
        self.sql("TRUNCATE ingestion_logs, stream_receipts, change_sets CASCADE")
        client = redis.Redis.from_url(self.redis_url)
        client.flushdb()
        env = {"PATH": os.environ["PATH"], **{f"RECONCILER_{k}": v for k, v in {
            "POSTGRES_DSN": self.dsn, "REDIS_URL": self.redis_url, "WORKERS_COUNT": "2",
            "NETBOX_TIMEOUT_SECONDS": "300", "WORKERS_LEASE_SECONDS": "1500",
            "SUPERVISOR_HEARTBEAT_TIMEOUT_SECONDS": "400", "SUPERVISOR_DRAIN_SECONDS": "310"}.items()}, **nb.env()}
        log = open(f"/tmp/bench-process-{os.getpid()}.log", "wb")
        process = subprocess.Popen([sys.executable, str(ROOT / "bin" / "reconciler"), "run"], env=env,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        time.sleep(3)  # boot, and the refresher's first answer
        requests = sample.requests(self._entities, per_request=100)
        started = time.perf_counter()
        for request in requests:
            client.xadd(STREAM, sample.stream_fields(request))
        total = len(self._entities)
        while self.sql("SELECT count(*) FROM ingestion_logs WHERE state NOT IN (1, 8, 9)")[0][0] < total:
            time.sleep(0.2)
        seconds = time.perf_counter() - started
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(60)
        states = dict(self.sql("SELECT state, count(*) FROM ingestion_logs GROUP BY 1"))
        return {"entities": total, "seconds": seconds, "rate": total / seconds, "states": states}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch-size", type=int, default=settings.BY_NAME["workers.batch_size"].default)
    parser.add_argument("--netbox-entities", type=int, default=400)
    parser.add_argument("--netbox-rounds", type=int, default=3,
                        help="bare/reconciler pairs; the median ratio is reported")
    parser.add_argument("--skip", action="append", default=[], choices=["instant", "bare", "netbox"],
                        help="instant: the instant-plugin half (bare loop included); bare: only its bare loop; "
                             "netbox: the NetBox half")
    parser.add_argument("--admin-dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    parser.add_argument("--redis-db", type=int, default=11)
    args = parser.parse_args()
    with Bench(args) as bench:
        if "instant" not in args.skip:
            port = MP.Value("i", 0)
            plugin = MP.Process(target=_serve_instant_plugin, args=(port,), daemon=True)
            plugin.start()
            while not port.value:
                time.sleep(0.01)
            url = f"http://127.0.0.1:{port.value}/api/plugins/diode"
            bare = "bare" not in args.skip
            ceilings = [bare_run(bench, url, "before")] if bare else []
            results = []
            for workers in args.workers:
                r = bench.instant(url, workers)
                results.append(r)
                print(f"instant plugin, {workers} worker(s), batches of {args.batch_size}: "
                      f"{r['rows']:,} rows applied in {r['seconds']:.2f} s = "
                      f"{r['rate']:,.0f} rows/s ({r['change_sets']:,} change sets, {r['changes']:,} changes stored); "
                      f"/ target 10,000 = {r['rate'] / 10_000:.2f}", flush=True)
            if bare:
                ceilings.append(bare_run(bench, url, "after"))
                ceiling = statistics.mean(ceilings)
                print(f"bare loop, mean of before and after: {ceiling:,.0f} rows/s (after / before = "
                      f"{ceilings[1] / ceilings[0]:.2f}: how far the ceiling moved during the run)")
                for r in results:
                    goal = "; goal for 2 workers >= 0.50" if r["workers"] == 2 else ""
                    print(f"{r['workers']} worker(s): {r['rate'] / ceiling:.2f} of the bare loop "
                          f"({r['rate']:,.0f} / {ceiling:,.0f} rows/s{goal})")
            plugin.kill()
        if "netbox" not in args.skip:
            peer.up()
            try:
                ratios = [netbox_round(bench, n) for n in range(1, args.netbox_rounds + 1)]
            finally:
                peer.down()
            print(f"reconciler / bare client, median of {len(ratios)} rounds = {statistics.median(ratios):.2f} "
                  f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)}; target >= 0.90)")


def bare_run(bench: Bench, url: str, when: str) -> float:
    r = bench.bare(url)
    print(f"bare loop ({when} the workers; 1 process: claim_batch, 1 POST, finish_rows + COPY), batches of "
          f"{bench.args.batch_size}: {r['rows']:,} rows applied in {r['seconds']:.2f} s = {r['rate']:,.0f} rows/s "
          f"({r['change_sets']:,} change sets, {r['changes']:,} changes stored)", flush=True)
    if r["rows"] != bench.args.rows:
        raise SystemExit(f"the bare loop applied {r['rows']:,} of {bench.args.rows:,} rows: it is no ceiling")
    return r["rate"]


def netbox_round(bench: Bench, number: int) -> float:
    """One bare-client run and one `reconciler run`, each on a NetBox fresh from its snapshot; the
    order alternates between rounds, since NetBox's speed drifts between resets."""
    batches = bench.netbox_batches()
    if number % 2:
        bare, ours = bench.bare_client(batches), bench.reconciler_run()
    else:
        ours, bare = bench.reconciler_run(), bench.bare_client(batches)
    print(f"round {number}: real NetBox, bare client (2 threads, batches of 100): {bare['entities']} entities in "
          f"{bare['seconds']:.1f} s = {bare['rate']:.1f} entities/s ({bare['errors']} with errors)")
    print(f"round {number}: real NetBox, reconciler run (2 workers): {ours['entities']} entities in "
          f"{ours['seconds']:.1f} s = {ours['rate']:.1f} entities/s (states {ours['states']}); "
          f"ratio {ours['rate'] / bare['rate']:.2f}")
    return ours['rate'] / bare['rate']


if __name__ == "__main__":
    main()
