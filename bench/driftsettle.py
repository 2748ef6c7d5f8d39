"""Benchmark of the drift checks' own cost, without NetBox: what settling a re-sent inventory costs
the reconciler in CPU and Postgres ([drift] mode changes).

    .venv/bin/python bench/driftsettle.py [--rows 100000] [--changes 1000]

On a database of its own: --rows entities of the sample network are written by the consumer's
transaction (inbox.write), marked APPLIED an hour ago, and written again unchanged, so they wait in
CHECKING. Then, each against a ceiling measured in the same run:
 1. keys: the drift-checks role gives every CHECKING row its keys (read the entity, parse it, walk
    it, store the keys); ceiling: the same reads and writes with the keys computed beforehand.
 2. settle: the role settles every row against --changes changes by hand kept in netbox_changes,
    each naming one row's own object (so at least that many rows are planned again); ceiling: the
    same batches of a bare UPDATE that gives every row back its state.
"""

from __future__ import annotations

import argparse
import datetime
import math
import random
import sys
import time
from pathlib import Path

import psycopg2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from netboxlabs.diode.sdk.diode.v1 import ingester_pb2 as pb  # noqa: E402

from reconciler import driftkeys, inbox, sample, settings, streamentry  # noqa: E402
from reconciler.db import Database  # noqa: E402
from reconciler.driftchecks import KEYS_BATCH, SETTLE_BATCH, DriftChecks  # noqa: E402

STREAM = "diode.v1.ingest-stream"
DATABASE = "bench_drift_settle"


def sql(dsn: str, statement: str, params=None) -> list[tuple]:
    with psycopg2.connect(dsn, options="-c search_path=reconciler") as conn, conn.cursor() as cur:
        cur.execute(statement, params)
        return cur.fetchall() if cur.description else []


def fill(db: Database, dsn: str, rows: int) -> None:
    """`rows` entities APPLIED an hour ago, then seen again unchanged: CHECKING."""
    shape = sample.Shape(sites=math.ceil(rows / sample.Shape().entity_count()))
    for cycle in (0, 1):
        entries = [streamentry.decode_entry(f"{cycle + 1}{n:09d}-0".encode(), fields)
                   for n, fields in enumerate(sample.entries(shape, cycle=cycle, per_request=100))]
        for first in range(0, len(entries), 25):  # the consumer's read_count
            inbox.write(db, STREAM, entries[first:first + 25], branch="", check=cycle == 1)
        if cycle == 0:
            sql(dsn, "UPDATE ingestion_logs SET state = 3, planned_at = now() - interval '1 hour', "
                     "planned_branch = ''")


def bench_keys(role: DriftChecks, dsn: str) -> dict:
    rows = sql(dsn, "SELECT id, entity FROM ingestion_logs WHERE state = 10 ORDER BY id")
    computed = {row_id: "\n".join(driftkeys.entity_keys(pb.Entity.FromString(bytes(entity))))
                for row_id, entity in rows}
    started = time.perf_counter()
    while True:  # ceiling: the role's statements, keys known beforehand
        batch = role.db.fetchall("checking_without_keys", {"limit": KEYS_BATCH})
        if not batch:
            break
        with role.db.transaction() as tx:
            tx.execute("store_drift_keys", {"ids": [i for i, _ in batch], "keys": [computed[i] for i, _ in batch]})
    ceiling = time.perf_counter() - started
    sql(dsn, "UPDATE ingestion_logs SET drift_keys = NULL")
    started = time.perf_counter()
    role._give_keys()
    real = time.perf_counter() - started
    return {"rows": len(rows), "seconds": real, "rate": len(rows) / real, "ceiling_rate": len(rows) / ceiling,
            "ratio": ceiling / real}


def bench_settle(role: DriftChecks, dsn: str, changes: int) -> dict:
    rows = sql(dsn, "SELECT id, object_type, drift_keys FROM ingestion_logs WHERE state = 10")
    now = datetime.datetime.now(datetime.timezone.utc)
    chosen = random.Random(7).sample(rows, min(changes, len(rows)))
    # The key NetBox's record of an edit of the row's own object meets it by: its name and owner.
    own = [next(k for k in keys if k.startswith(object_type + "|") and k.count("|") == 2 and not k.endswith("|?"))
           for _, object_type, keys in chosen]
    sql(dsn, "INSERT INTO netbox_changes (key, changed_at, change_id) SELECT k, %s, n FROM unnest(%s::text[]) "
             "WITH ORDINALITY AS u (k, n) ON CONFLICT DO NOTHING", (now, own))
    sql(dsn, "UPDATE change_log SET high_water = %s, trusted_since = %s", (now, now - datetime.timedelta(days=1)))
    started = time.perf_counter()  # ceiling: the same batches, every row given back its state
    while sql(dsn, "WITH w AS (SELECT id FROM ingestion_logs WHERE state = 10 ORDER BY id LIMIT %s "
                   "FOR UPDATE SKIP LOCKED) UPDATE ingestion_logs l SET state = l.requeued_from_state, "
                   "requeued_from_state = NULL, updated_at = now() FROM w WHERE l.id = w.id RETURNING true",
              (SETTLE_BATCH,)):
        pass
    ceiling = time.perf_counter() - started
    sql(dsn, "UPDATE ingestion_logs SET state = 10, requeued_from_state = state WHERE state = 3")
    started = time.perf_counter()
    skipped, planned = role._settle(now + datetime.timedelta(hours=1))
    real = time.perf_counter() - started
    total = skipped + planned
    return {"rows": total, "changes": len(own), "planned": planned, "seconds": real, "rate": total / real,
            "ceiling_rate": total / ceiling, "ratio": ceiling / real}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--changes", type=int, default=1000)
    parser.add_argument("--admin-dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    admin = psycopg2.connect(args.admin_dsn)
    admin.autocommit = True
    admin.cursor().execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
    admin.cursor().execute(f"CREATE DATABASE {DATABASE}")
    dsn = args.admin_dsn.rsplit("/", 1)[0] + "/" + DATABASE
    db = Database(dsn, "reconciler")
    db.migrate()
    try:
        started = time.perf_counter()
        fill(db, dsn, args.rows)
        print(f"filled {sql(dsn, 'SELECT count(*) FROM ingestion_logs WHERE state = 10')[0][0]} CHECKING rows in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        config = settings.load(path="/dev/null", environ={"RECONCILER_POSTGRES_DSN": dsn,
                                                           "RECONCILER_DRIFT_MODE": "changes",
                                                           "RECONCILER_NETBOX_API_TOKEN": "unused"})
        role = DriftChecks(config)
        role.boot()
        keys = bench_keys(role, dsn)
        print(f"keys:   {keys['rows']} rows in {keys['seconds']:.1f} s = {keys['rate']:,.0f} rows/s; "
              f"ceiling {keys['ceiling_rate']:,.0f} rows/s; ratio {keys['ratio']:.2f}", flush=True)
        settle = bench_settle(role, dsn, args.changes)
        print(f"settle: {settle['rows']} rows against {settle['changes']} changes by hand ({settle['planned']} planned "
              f"again) in {settle['seconds']:.1f} s = {settle['rate']:,.0f} rows/s; ceiling "
              f"{settle['ceiling_rate']:,.0f} rows/s; ratio {settle['ratio']:.2f}")
        role.shutdown()
    finally:
        db.close()
        admin.cursor().execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        admin.close()


if __name__ == "__main__":
    main()
