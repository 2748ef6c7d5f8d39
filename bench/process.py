"""Benchmark of the poll workers: QUEUED rows -> plugin -> outcome and change sets persisted.

    .venv/bin/python bench/process.py [--rows 60000] [--netbox-entities 400]

Two measurements in one run, printed as figures and ratios:
 1. instant plugin: a loopback server (its own process, Nagle off) answers every entity of
    /bulk-plan-apply/ at once with a change set of three changes (one create, two noops), so the
    workers' own cost shows: claim, protojson, HTTP, decisions, COPY of change sets and changes,
    bulk state update. 1, 2 and 4 worker processes (the production role) drain the same queue.
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

import psycopg2
import redis
import urllib3
from google.protobuf import json_format

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peer import netbox as peer  # noqa: E402
from reconciler import inbox, sample, settings, wire  # noqa: E402
from reconciler.db import Database  # noqa: E402
from reconciler.roles import Link, serve  # noqa: E402
from reconciler.shared import Shared  # noqa: E402
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
        redis.Redis.from_url(self.redis_url).flushdb()
        self.admin(f"DROP DATABASE IF EXISTS {self.db_name} WITH (FORCE)")

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
            batch.append(wire.decode_entry(f"{n + 1}-0".encode(), fields))
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

    # --- 2: real NetBox ---

    def netbox_batches(self) -> list[list[dict]]:
        """The bench's network as /bulk-plan-apply/ batches of 100, ids as the reconciler numbers rows."""
        shape = sample.Shape(sites=1, devices_per_site=-(-self.args.netbox_entities // 60), ports_per_device=48,
                             vlans_per_site=10, prefixes_per_site=10, vms_per_site=5)
        entities = list(sample.network(shape, first_site=200))[: self.args.netbox_entities]
        items = []
        for n, entity in enumerate(entities, 1):
            member = entity.WhichOneof("entity")
            items.append({"id": str(n), "object_type": wire.OBJECT_TYPES[member],
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
                response = pool.request("POST", nb.plugin_url + "/bulk-plan-apply/", body=json.dumps({"entities": batch}),
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
    parser.add_argument("--netbox-rounds", type=int, default=3, help="bare/reconciler pairs; the median ratio is reported")
    parser.add_argument("--skip", action="append", default=[], choices=["instant", "netbox"])
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
            for workers in args.workers:
                r = bench.instant(url, workers)
                print(f"instant plugin, {workers} worker(s), batches of {args.batch_size}: {r['rows']:,} rows applied in {r['seconds']:.2f} s = "
                      f"{r['rate']:,.0f} rows/s ({r['change_sets']:,} change sets, {r['changes']:,} changes stored); "
                      f"/ target 10,000 = {r['rate'] / 10_000:.2f}")
            plugin.kill()
        if "netbox" not in args.skip:
            peer.up()
            try:
                ratios = [netbox_round(bench, n) for n in range(1, args.netbox_rounds + 1)]
            finally:
                peer.down()
            print(f"reconciler / bare client, median of {len(ratios)} rounds = {statistics.median(ratios):.2f} "
                  f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)}; target >= 0.90)")


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
