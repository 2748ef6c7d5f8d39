"""Benchmark of the inbox: Redis stream -> consumer -> committed rows, on this machine.

    .venv/bin/python bench/consume.py [--entities 200000] [--latency-seconds 20] [--churn-rows 1000000]

Four measurements in one run, printed as figures and ratios:
 1. drain: the stream is pre-filled with SDK-built IngestRequests (100 entities each, 90% brotli),
    then ONE real consumer process (the production role, dedup on) drains it; entities/s from the
    consumer's boot to the last entry acknowledged.
 2. raw COPY: the same rows, pre-encoded, COPYed into the same table in the same batch sizes with
    one commit per batch: the ceiling the consumer is compared with (ratio = 1 / 2).
 3. latency: a producer XADDs 20 requests/s (2,000 entities/s) with ingestion_ts = time of XADD;
    a LISTEN on a bench-only trigger records when each entry's receipt commits; p50/p99.
 4. claim cost: 1,000,000 rows pass through QUEUED -> claimed -> finished by the workers' own
    claim_batch and finish_rows statements; the claim's time is compared between the first and
    the last 100,000 rows: nothing vacuuming, the consumer's own VACUUM, and server autovacuum
    with the table's settings (migration 0001).
It creates and drops its own database and uses Redis db 11 (flushed).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import select
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import psycopg2
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reconciler import inbox, sample, settings, streamentry
from reconciler.consumer import Consumer
from reconciler.db import Database
from reconciler.roles import Link, serve

STREAM, GROUP = "diode.v1.ingest-stream", "diode-reconciler"
MP = multiprocessing.get_context("fork")

# The workers' own statements (sql/queries.sql), as a worker runs them in auto-apply mode.
CLAIM = ("claim_batch", {"limit": 100, "state": 8, "owner": "bench", "lease_seconds": 300})
NOTIFY_TRIGGER = """
CREATE FUNCTION bench_notify_receipts() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('receipts', (SELECT string_agg(ms || '-' || seq, ',') FROM new_rows));
  RETURN NULL;
END $$;
CREATE TRIGGER bench_notify AFTER INSERT ON stream_receipts REFERENCING NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION bench_notify_receipts();"""


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def admin(dsn: str, statement: str) -> None:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    conn.cursor().execute(statement)
    conn.close()


def percentiles(values: list[float]) -> dict:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99), "max": ordered[-1]}


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.db_name = f"bench_consume_{os.getpid()}"
        self.dsn = args.admin_dsn.rsplit("/", 1)[0] + "/" + self.db_name
        self.redis_url = f"{args.redis_url}/{args.redis_db}"
        self.redis = redis.Redis.from_url(self.redis_url)
        self.config = settings.load(path=None, environ={
            "RECONCILER_POSTGRES_DSN": self.dsn, "RECONCILER_REDIS_URL": self.redis_url,
            "RECONCILER_REDIS_READ_COUNT": str(args.read_count), "RECONCILER_WORKERS_COUNT": "0"})

    # --- setup ---

    def __enter__(self):
        admin(self.args.admin_dsn, f"CREATE DATABASE {self.db_name}")
        database = Database(self.dsn, "reconciler")
        database.migrate()
        database.close()
        self.redis.flushdb()
        return self

    def __exit__(self, *exc):
        self.redis.flushdb()
        admin(self.args.admin_dsn, f"DROP DATABASE IF EXISTS {self.db_name} WITH (FORCE)")

    def sql(self, statement: str, params=None):
        conn = psycopg2.connect(self.dsn, options="-c search_path=reconciler")
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(statement, params)
            rows = cursor.fetchall() if cursor.description else None
        conn.close()
        return rows

    def reset_tables(self) -> None:
        self.sql("TRUNCATE ingestion_logs, stream_receipts, dead_letters CASCADE")
        self.redis.flushdb()

    # --- the consumer under test: the production role in a forked process ---

    def start_consumer(self):
        link = Link.create(MP)
        process = MP.Process(target=serve, args=(Consumer, self.config, link, os.getpid()), daemon=True)
        process.start()
        deadline = time.monotonic() + 30
        while not link.booted.value:
            if time.monotonic() > deadline or not process.is_alive():
                raise SystemExit("the consumer did not boot")
            time.sleep(0.05)
        return process

    @staticmethod
    def stop_consumer(process) -> None:
        os.kill(process.pid, signal.SIGTERM)
        process.join(30)

    def stream_done(self) -> bool:
        return self.redis.xlen(STREAM) == 0 and self.redis.xpending(STREAM, GROUP)["pending"] == 0

    # --- 1 + 2: drain and raw COPY ---

    def entries(self) -> list[dict[bytes, bytes]]:
        per_site = sample.Shape(sites=1, devices_per_site=90).entity_count()
        shape = sample.Shape(sites=-(-self.args.entities // per_site), devices_per_site=90)
        return list(sample.entries(shape, per_request=100))

    def drain(self, entries) -> dict:
        started = time.perf_counter()
        with self.redis.pipeline(transaction=False) as pipe:
            for fields in entries:
                pipe.xadd(STREAM, fields)
            pipe.execute()
        xadd_seconds = time.perf_counter() - started
        process = self.start_consumer()
        backend = self.sql("SELECT pid FROM pg_stat_activity WHERE application_name = 'reconciler consumer' "
                           "AND datname = current_database()")[0][0]
        cpu_before = cpu_seconds(process.pid), cpu_seconds(backend)
        started = time.perf_counter()
        while not self.stream_done():
            time.sleep(0.005)
        seconds = time.perf_counter() - started
        consumer_cpu, backend_cpu = cpu_seconds(process.pid) - cpu_before[0], cpu_seconds(backend) - cpu_before[1]
        self.stop_consumer(process)
        rows = self.sql("SELECT count(*) FROM ingestion_logs")[0][0]
        return {"rows": rows, "seconds": seconds, "rate": rows / seconds, "xadd_rate": rows / xadd_seconds,
                "consumer_us": consumer_cpu / rows * 1e6, "backend_us": backend_cpu / rows * 1e6}

    def raw_copy(self, entries) -> dict:
        """The same rows COPYed in the consumer's batch sizes, one commit per batch, nothing else."""
        self.reset_tables()
        batch = self.args.read_count
        payloads = []
        for i in range(0, len(entries), batch):
            messages = [streamentry.decode_entry(f"{i + n}-0".encode(), fields)
                        for n, fields in enumerate(entries[i:i + batch])]
            payloads.append(inbox._encode([[row, 0] for m in messages for row in m.rows]))
        self.sql("CHECKPOINT")
        database = Database(self.dsn, "reconciler")
        started = time.perf_counter()
        for payload in payloads:
            with database.transaction() as tx:
                tx.copy("copy_ingestion_logs", payload)
        seconds = time.perf_counter() - started
        database.close()
        rows = self.sql("SELECT count(*) FROM ingestion_logs")[0][0]
        return {"rows": rows, "seconds": seconds, "rate": rows / seconds}

    # --- 3: latency at a steady rate ---

    def latency(self) -> dict:
        self.reset_tables()
        self.sql(NOTIFY_TRIGGER)
        committed: dict[str, int] = {}
        stop = threading.Event()
        listener = threading.Thread(target=self._listen, args=(committed, stop))
        listener.start()
        process = self.start_consumer()
        count = int(self.args.latency_seconds * 20)
        network = sample.network(sample.Shape(sites=-(-count * 100 // 10_000), devices_per_site=180))
        prepared = [sample.stream_fields(r) for r in sample.requests(network, 100)][:count]
        sent: dict[str, int] = {}
        next_at = time.perf_counter()
        for fields in prepared:  # like the ingester: the request is ready, ingestion_ts is taken at XADD
            next_at += 1.0 / 20
            time.sleep(max(0.0, next_at - time.perf_counter()))
            ts = time.time_ns()
            fields[b"ingestion_ts"] = str(ts).encode()
            sent[self.redis.xadd(STREAM, fields).decode()] = ts
        deadline = time.monotonic() + 30
        while len(committed) < len(sent) and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        listener.join()
        self.stop_consumer(process)
        self.sql("DROP TRIGGER bench_notify ON stream_receipts; DROP FUNCTION bench_notify_receipts()")
        latencies = [(committed[i] - ts) / 1e6 for i, ts in sent.items() if i in committed]
        return {"entries": len(sent), "committed": len(latencies), **percentiles(latencies)}

    def bare_commits(self) -> dict:
        """The disk's own tail: one-row INSERT + COMMIT at the same 20/s, nothing else."""
        conn = psycopg2.connect(self.dsn, options="-c search_path=reconciler")
        cursor = conn.cursor()
        cursor.execute("CREATE TABLE bench_probe (x int)")  # a real, WAL-logged table: commits wait for fsync
        conn.commit()
        latencies = []
        for _ in range(int(self.args.latency_seconds * 20)):
            cursor.execute("INSERT INTO bench_probe VALUES (1)")
            started = time.perf_counter()
            conn.commit()
            latencies.append((time.perf_counter() - started) * 1000)
            time.sleep(0.05)
        cursor.execute("DROP TABLE bench_probe")
        conn.commit()
        conn.close()
        return percentiles(latencies)

    def _listen(self, committed: dict, stop: threading.Event) -> None:
        conn = psycopg2.connect(self.dsn)
        conn.autocommit = True
        conn.cursor().execute("LISTEN receipts")
        while not stop.is_set():
            if select.select([conn], [], [], 0.1)[0]:
                conn.poll()
                now = time.time_ns()
                for note in conn.notifies:
                    for stream_id in note.payload.split(","):
                        committed[stream_id] = now
                conn.notifies.clear()
        conn.close()

    # --- 4: claim cost while 1M rows churn ---

    def churn(self, vacuum: str) -> dict:
        """1,000,000 rows through QUEUED -> claimed -> finished; claim time early vs late.

        vacuum: "none" (this server as configured: autovacuum off, nothing vacuums), "reconciler"
        (a consumer process runs meanwhile and vacuums the table itself, as it does when autovacuum
        is off), "autovacuum" (server autovacuum switched on for the run, with migration 0001's
        table settings; the server setting is restored afterwards).
        """
        self.reset_tables()
        self.sql("VACUUM ANALYZE ingestion_logs")
        before = self._vacuum_count()
        consumer = self.start_consumer() if vacuum == "reconciler" else None
        if vacuum == "autovacuum":
            self.sql("ALTER SYSTEM SET autovacuum = on")
            self.sql("SELECT pg_reload_conf()")
        try:
            buckets = self._churn_rows()
        finally:
            if vacuum == "autovacuum":
                self.sql("ALTER SYSTEM RESET autovacuum")
                self.sql("SELECT pg_reload_conf()")
            if consumer is not None:
                self.stop_consumer(consumer)
        first, last = statistics.median(buckets[0]), statistics.median(buckets[-1])
        dead = self.sql("SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'ingestion_logs'")[0][0]
        return {"rows": self.args.churn_rows, "first_ms": first, "last_ms": last, "ratio": last / first,
                "vacuums": self._vacuum_count() - before, "dead_tuples": dead}

    def _vacuum_count(self) -> int:
        return self.sql("SELECT vacuum_count + autovacuum_count FROM pg_stat_user_tables "
                        "WHERE relname = 'ingestion_logs'")[0][0]

    def _churn_rows(self) -> list[list[float]]:
        """Claim times (ms) per 100,000 rows processed."""
        entities = [e.SerializeToString() for e in sample.network(sample.Shape(sites=10, devices_per_site=90))][:50_000]
        database = Database(self.dsn, "reconciler")
        buckets: list[list[float]] = []
        done = 0
        while done < self.args.churn_rows:
            with database.transaction() as tx:
                tx.copy("copy_ingestion_logs", self._churn_payload(entities))
            while ids := self._claim(database, buckets, done):
                with database.transaction() as tx:
                    tx.fetchall("finish_rows", {"owner": "bench", "branch": "", "ids": ids, "states": [3] * len(ids),
                                                "errors": [None] * len(ids), "next_attempt_at": [None] * len(ids),
                                                "superseded": [False] * len(ids)})
                done += len(ids)
        database.close()
        return buckets

    @staticmethod
    def _claim(database: Database, buckets: list[list[float]], done: int) -> list[int]:
        with database.transaction() as tx:
            started = time.perf_counter()
            ids = sorted(row[0] for row in tx.fetchall(*CLAIM))
            elapsed_ms = (time.perf_counter() - started) * 1000
        if ids:
            while len(buckets) <= done // 100_000:
                buckets.append([])
            buckets[done // 100_000].append(elapsed_ms)
        return ids

    @staticmethod
    def _churn_payload(entities: list[bytes]) -> bytes:
        """Rows with fresh random hashes: every round's rows are new heads, as new entities would be."""
        message = streamentry.Message(stream_id=b"0-0", fields={}, request_id="r", producer_app_name="bench",
                               producer_app_version="1", sdk_name="s", sdk_version="1")
        rows = [[streamentry.EntityRow(message, n, "dcim.interface", data, os.urandom(32), None), 0]
                for n, data in enumerate(entities)]
        return inbox._encode(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entities", type=int, default=200_000)
    parser.add_argument("--read-count", type=int, default=settings.BY_NAME["redis.read_count"].default)
    parser.add_argument("--repeat", type=int, default=3, help="drains to run; the median is reported")
    parser.add_argument("--latency-seconds", type=float, default=20.0)
    parser.add_argument("--churn-rows", type=int, default=1_000_000)
    parser.add_argument("--skip", action="append", default=[], choices=["drain", "latency", "churn"])
    parser.add_argument("--admin-dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    parser.add_argument("--redis-db", type=int, default=11)
    args = parser.parse_args()
    drains = []
    with Bench(args) as bench:
        if "drain" not in args.skip:
            entries = bench.entries()
            for attempt in range(args.repeat):
                bench.reset_tables()
                drain = bench.drain(entries)
                copy = bench.raw_copy(entries)
                print(f"drain {attempt + 1}: 1 consumer, read_count {args.read_count}: {drain['rows']:,} entities in "
                      f"{drain['seconds']:.2f} s = {drain['rate']:,.0f} entities/s "
                      f"(consumer CPU {drain['consumer_us']:.1f} us/entity, "
                      f"its Postgres backend {drain['backend_us']:.1f} us/entity); "
                      f"raw COPY of the same rows {copy['rate']:,.0f} rows/s; ratio {drain['rate'] / copy['rate']:.2f}")
                drains.append((drain, copy))
            drain, copy = sorted(drains, key=lambda pair: pair[0]["rate"])[len(drains) // 2]
            print(f"median drain: {drain['rate']:,.0f} entities/s; "
                  f"consumer / raw COPY = {drain['rate'] / copy['rate']:.2f}; "
                  f"/ target 30,000 = {drain['rate'] / 30000:.2f}; "
                  f"/ Go reconciler 17,000 = {drain['rate'] / 17000:.2f}")
        if "latency" not in args.skip:
            lat, bare = bench.latency(), bench.bare_commits()
            print(f"latency XADD -> commit at 2,000 entities/s ({lat['committed']}/{lat['entries']} entries): "
                  f"p50 {lat['p50']:.1f} ms, p95 {lat['p95']:.1f} ms, p99 {lat['p99']:.1f} ms, max {lat['max']:.1f} ms")
            print(f"  the disk's own tail, 1-row commits at 20/s: p50 {bare['p50']:.1f} ms, p95 {bare['p95']:.1f} ms, "
                  f"p99 {bare['p99']:.1f} ms, max {bare['max']:.1f} ms")
        if "churn" not in args.skip:
            autovacuum = bench.sql("SHOW autovacuum")[0][0]
            for vacuum, label in (("none", f"nothing vacuums (server autovacuum = {autovacuum})"),
                                  ("reconciler", "reconciler's own VACUUM (autovacuum off)"),
                                  ("autovacuum", "server autovacuum on, migration 0001 table settings")):
                c = bench.churn(vacuum)
                print(f"claim of 100 rows, {label}: first 100k rows {c['first_ms']:.2f} ms, last 100k of "
                      f"{c['rows']:,} rows {c['last_ms']:.2f} ms (ratio {c['ratio']:.2f}; {c['vacuums']} vacuums; "
                      f"{c['dead_tuples']:,} dead tuples at the end)")


if __name__ == "__main__":
    main()
