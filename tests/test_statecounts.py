"""The per-state counters of migration 0013 (reconciler/statecounts.py) against a count of the rows,
through everything that writes ingestion_logs: the consumer's inserts and duplicates, claims and their
outcomes, deletes, a TRUNCATE, and two folders at once."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from reconciler import claims, statecounts, states
from reconciler.db import Database

from .builders import enqueue, planned, site
from .support import query

pytestmark = pytest.mark.pg


def counted(db: Database) -> Counter:
    with db.transaction() as tx:
        return statecounts.by_state_in(tx)


def actual(dsn: str) -> Counter:
    return Counter(dict(query(dsn, "SELECT state, count(*) FROM ingestion_logs GROUP BY state")))


def deltas(dsn: str) -> int:
    return query(dsn, "SELECT count(*) FROM state_count_deltas")[0][0]


def test_the_counters_follow_every_write_and_folding_keeps_them_exact(dsn):
    db = Database(dsn, "reconciler")
    folder = statecounts.Folder("reconciler")
    try:
        enqueue(dsn, *(site(f"count-{n}") for n in range(30)))
        planned(dsn, *(site(f"planned-{n}") for n in range(10)))
        enqueue(dsn, site("count-1"), site("count-2"))  # duplicates: counted on the existing rows
        claims.claim(db, "counter-test", states.APPLYING, 5, 60)  # QUEUED -> APPLYING
        query(dsn, "UPDATE ingestion_logs SET last_seen = now()")  # no state changes: no delta
        assert counted(db) == actual(dsn)

        folder.tick(db)
        assert deltas(dsn) == 0 and counted(db) == actual(dsn)
        query(dsn, "DELETE FROM ingestion_logs WHERE id IN (SELECT id FROM ingestion_logs ORDER BY id LIMIT 3)")
        query(dsn, "UPDATE ingestion_logs SET state = %s WHERE state = %s", (states.FAILED, states.OPEN))
        assert counted(db) == actual(dsn) and deltas(dsn) > 0
        assert not query(dsn, "SELECT 1 FROM state_counts WHERE n = 0")

        query(dsn, "TRUNCATE ingestion_logs CASCADE")
        assert counted(db) == Counter() and deltas(dsn) == 0
        enqueue(dsn, site("after-truncate"))
        assert counted(db) == actual(dsn) == Counter({states.QUEUED: 1})
    finally:
        db.close()


def test_two_folders_at_once_neither_lose_nor_double_a_delta(dsn):
    """Two replicas fold while rows keep changing state: one of them folds at a time, and the counts
    always add up."""
    enqueue(dsn, *(site(f"fold-{n}") for n in range(200)))
    stop = threading.Event()

    def fold_repeatedly() -> None:
        db = Database(dsn, "reconciler")
        folder = statecounts.Folder("reconciler")
        while not stop.is_set():
            folder._next = 0.0  # every turn, not every FOLD_SECONDS
            folder.tick(db)
        db.close()

    folders = [threading.Thread(target=fold_repeatedly) for _ in range(2)]
    for folder in folders:
        folder.start()
    db = Database(dsn, "reconciler")
    try:
        for state in (states.OPEN, states.APPLIED, states.FAILED, states.QUEUED) * 5:
            query(dsn, "UPDATE ingestion_logs SET state = %s WHERE id IN (SELECT id FROM ingestion_logs "
                       "ORDER BY random() LIMIT 50)", (state,))
            assert counted(db) == actual(dsn)
        stop.set()
        for folder in folders:
            folder.join()
        assert counted(db) == actual(dsn)
    finally:
        stop.set()
        db.close()
