"""Benchmark: are claims slower while retention prunes?

    .venv/bin/python bench/retention.py [--claims 1000] [--superseded 300000]

An inbox of QUEUED rows (enough for every claim) and `--superseded` finished rows that are no
longer their entity's current row, a year old, each with a change set and two changes (what
retention deletes). A claimer takes `--claims` batches of 100 with the workers' own claims.claim
and finishes each (one UPDATE to APPLIED, as claims.record's finish does), timing each claim:

 1. alone: the ceiling, claims with nothing else running;
 2. while a retention walk (retention.prune in a process of its own, resting as long as each step
    took, as the service's retention process does) deletes the superseded rows;
 3. alone again, to show how far the machine drifted within the run.

Reported: claims/s and the p50 and p99 of one claim in each phase, and the ratios of phase 2 to the
mean of phases 1 and 3. It creates and drops its own database.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from process import Bench

from reconciler import claims, retention, settings, states
from reconciler.db import Database

BATCH = 100


def fill(bench: Bench, queued: int, superseded: int) -> None:
    bench.sql(f"""
        INSERT INTO ingestion_logs (object_type, state, request_id, ingestion_ts, producer_app_name,
                                    producer_app_version, sdk_name, sdk_version, entity, entity_hash, is_head,
                                    created_at, updated_at)
        SELECT 'dcim.site', CASE WHEN g <= {superseded} THEN 3 ELSE 1 END, 'bench', 0, 'bench', '1', 'sdk', '1',
               '\\x0a00'::bytea, sha256(g::text::bytea), g > {superseded},
               now() - CASE WHEN g <= {superseded} THEN interval '365 days' ELSE interval '0' END,
               now() - CASE WHEN g <= {superseded} THEN interval '365 days' ELSE interval '0' END
        FROM generate_series(1, {queued + superseded}) AS g ORDER BY g""")
    bench.sql(f"""INSERT INTO change_sets (external_id, ingestion_log_id, created_at)
                  SELECT 'cs', id, updated_at FROM ingestion_logs WHERE id <= {superseded} ORDER BY id""")
    bench.sql("""INSERT INTO changes (external_id, change_set_id, change_type, object_type, sequence_number)
                 SELECT 'c', id, 'create', 'dcim.site', n FROM change_sets, generate_series(0, 1) AS n""")
    bench.sql("VACUUM ANALYZE")


def claim_batches(dsn: str, count: int) -> tuple[list[float], float]:
    """Claim and finish `count` batches: each claim's duration, and how long it all took."""
    db = Database(dsn, "reconciler")
    timings: list[float] = []
    started = time.monotonic()
    try:
        while len(timings) < count:
            began = time.perf_counter()
            rows = claims.claim(db, "bench", states.APPLYING, BATCH, 600)
            timings.append(time.perf_counter() - began)
            if not rows:
                raise SystemExit("the queue ran dry: raise --queued")
            with db.transaction() as tx:
                tx.cursor.execute("UPDATE ingestion_logs SET state = 3, lease_owner = NULL, lease_expires_at = NULL "
                                  "WHERE id = ANY(%s)", ([row.id for row in rows],))
    finally:
        db.close()
    return timings, time.monotonic() - started


def prune(dsn: str, done) -> None:
    config = settings.load(path=None, environ={"RECONCILER_POSTGRES_DSN": dsn})
    db = Database(dsn, "reconciler")
    started = time.monotonic()
    counts = retention.prune(db, config)
    db.close()
    done.put((counts, time.monotonic() - started))


def summary(name: str, measured: tuple[list[float], float]) -> dict:
    timings, seconds = measured
    ordered = sorted(timings)
    return {"phase": name, "claims_per_s": len(timings) / seconds, "p50_ms": statistics.median(ordered) * 1000,
            "p99_ms": ordered[int(len(ordered) * 0.99)] * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--claims", type=int, default=1000, help="batches of 100 claimed in each phase")
    parser.add_argument("--superseded", type=int, default=300_000)
    parser.add_argument("--admin-dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    parser.add_argument("--redis-db", type=int, default=11)
    args = parser.parse_args()
    with Bench(args) as bench:
        started = time.monotonic()
        queued = 3 * args.claims * BATCH
        fill(bench, queued, args.superseded)
        print(f"filled {queued:,} QUEUED and {args.superseded:,} superseded rows in "
              f"{time.monotonic() - started:.0f} s", flush=True)
        results = [summary("alone", claim_batches(bench.dsn, args.claims))]
        done: multiprocessing.Queue = multiprocessing.Queue()
        pruner = multiprocessing.Process(target=prune, args=(bench.dsn, done))
        pruner.start()
        results.append(summary("while pruning", claim_batches(bench.dsn, args.claims)))
        still_pruning = pruner.is_alive()
        pruner.join()
        counts, took = done.get()
        results.append(summary("alone again", claim_batches(bench.dsn, args.claims)))
    print(f"the walk deleted {retention.described(counts)} in {took:.1f} s"
          f"{'' if still_pruning else ' (it ended before the claims did: raise --superseded)'}")
    print("| phase | claims/s | p50 claim | p99 claim |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['phase']} | {r['claims_per_s']:.0f} | {r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms |")
    ceiling = {key: (results[0][key] + results[2][key]) / 2 for key in ("claims_per_s", "p50_ms", "p99_ms")}
    ratio = {key: results[1][key] / ceiling[key] for key in ceiling}
    drift = results[2]["claims_per_s"] / results[0]["claims_per_s"]
    print(f"while pruning, against the mean of the runs alone: claims/s x{ratio['claims_per_s']:.2f}, p50 "
          f"x{ratio['p50_ms']:.2f}, p99 x{ratio['p99_ms']:.2f}; the second run alone moved x{drift:.2f} in claims/s")


if __name__ == "__main__":
    os.environ.pop("RECONCILER_CONFIG", None)
    main()
