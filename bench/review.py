"""Benchmark of the review loop's reads: `reconciler deviations list` over a large inbox.

    .venv/bin/python bench/review.py [--rows 300000] [--repeat 50]

It creates (and drops) its own database: `--rows` rows, half of them OPEN with a change set of one
create each, the rest APPLIED and NO_CHANGES, spread over two object types. Then, each `--repeat`
times, alternating, and the median of each:
 1. page: review.page, the first page of 50 OPEN rows (deviations_page through review_selection_v1,
    with each row's latest change set and its changes counted), and the same page with a name filter;
 2. its ceiling: a hand-written statement fetching the same 50 rows and their latest change set's
    name, with no filter machinery and no change counts (ratio = 1 / 2);
 3. tally: review.tally of every OPEN row (what `list` prints at the bottom) against its ceiling, a
    bare GROUP BY of the OPEN rows.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import psycopg2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reconciler import review, states
from reconciler.db import Database

ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
NAME = "reconciler_bench_review"
DSN = f"postgresql://postgres@127.0.0.1:5432/{NAME}"

BARE_PAGE = """
SELECT l.id, l.state, l.object_type, cs.deviation_name
FROM ingestion_logs AS l
LEFT JOIN LATERAL (SELECT deviation_name FROM change_sets WHERE ingestion_log_id = l.id ORDER BY id DESC LIMIT 1)
     AS cs ON true
WHERE l.state = 2 ORDER BY l.id DESC LIMIT 50"""
BARE_TALLY = "SELECT state, object_type, count(*) FROM ingestion_logs WHERE state = 2 GROUP BY 1, 2"

FILL = """
INSERT INTO ingestion_logs (object_type, state, request_id, ingestion_ts, producer_app_name, producer_app_version,
                            sdk_name, sdk_version, entity, entity_hash, planned_at, planned_branch)
SELECT CASE WHEN n %% 3 = 0 THEN 'dcim.device' ELSE 'dcim.interface' END,
       CASE WHEN n %% 4 = 0 THEN 3 WHEN n %% 4 = 1 THEN 5 ELSE 2 END,
       'r', 1, 'disco', '1', 's', '1', '\\x00', sha256(n::text::bytea), now() - n * interval '1 second', ''
FROM generate_series(1, %(rows)s) AS n;
INSERT INTO change_sets (external_id, ingestion_log_id, deviation_name)
SELECT 'x', id, 'Device sw-' || id || ' discovered' FROM ingestion_logs WHERE state = 2;
INSERT INTO changes (external_id, change_set_id, change_type, object_type, sequence_number, after)
SELECT 'c', id, 'create', 'dcim.device', 0, '{}' FROM change_sets;
ANALYZE;
"""


def _admin(statement: str) -> None:
    conn = psycopg2.connect(ADMIN)
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute(statement)
    conn.close()


def _prepare(rows: int) -> Database:
    _admin(f"DROP DATABASE IF EXISTS {NAME}")
    _admin(f"CREATE DATABASE {NAME}")
    db = Database(DSN, "reconciler")
    db.migrate()
    with db.transaction() as tx:
        tx.cursor.execute(FILL, {"rows": rows})
    return db


def _median_ms(action, repeat: int) -> float:
    timings = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    db = _prepare(args.rows)
    open_rows = review.Filters((states.OPEN,))
    named = review.Filters((states.OPEN,), name="sw-4242")

    def bare(statement: str):
        """The statement in a transaction of its own, as review.page and review.tally run theirs."""
        def run():
            with db.transaction() as tx:
                tx.cursor.execute(statement)
                return tx.cursor.fetchall()
        return run

    try:
        figures = {
            "page of 50": _median_ms(lambda: review.page(db, open_rows, limit=50), args.repeat),
            "page ceiling": _median_ms(bare(BARE_PAGE), args.repeat),
            "page, name filter": _median_ms(lambda: review.page(db, named, limit=50), args.repeat),
            "tally": _median_ms(lambda: review.tally(db, open_rows), args.repeat),
            "tally ceiling": _median_ms(bare(BARE_TALLY), args.repeat),
        }
    finally:
        db.close()
        _admin(f"DROP DATABASE IF EXISTS {NAME}")
    print(f"{args.rows} rows, {args.rows // 2} OPEN; medians of {args.repeat}:")
    for name, ms in figures.items():
        print(f"  {name:18} {ms:9.2f} ms")
    print(f"  page / ceiling     {figures['page of 50'] / figures['page ceiling']:9.2f}")
    print(f"  tally / ceiling    {figures['tally'] / figures['tally ceiling']:9.2f}")


if __name__ == "__main__":
    main()
