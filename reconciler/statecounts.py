"""Rows per state and object type, kept by Postgres as they change (migration 0013), so the read
API's only_metrics answers from a handful of counter rows instead of counting millions.

Statement triggers on ingestion_logs append each statement's net change to state_count_deltas; the
consumer folds them into state_counts every FOLD_SECONDS (it runs on every replica and always, so the
deltas never pile up whatever else is configured). A count is the folded rows plus the deltas.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

from .db import Database, Tx
from .errors import DatabaseError

log = logging.getLogger(__name__)

FOLD_SECONDS = 5.0


class Folder:
    """Folds the deltas at most every FOLD_SECONDS, from a role's loop; never raises (an outage is
    the role's to notice, and the deltas wait)."""

    def __init__(self, schema: str) -> None:
        self.key = f"reconciler.fold_state_counts.{schema}"
        self._next = 0.0

    def tick(self, db: Database) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + FOLD_SECONDS
        try:
            with db.transaction() as tx:
                tx.execute("fold_state_counts", {"key": self.key})
                tx.execute("drop_empty_state_counts")
        except DatabaseError as exc:
            log.debug("state counts not folded: %s", exc)


def by_state_in(tx: Tx, object_types: list[str] | None = None) -> Counter:
    """{stored state: rows} of the object types given (None: all), read in an open transaction."""
    return Counter({state: n for state, n in tx.fetchall("state_counts", {"object_types": object_types}) if n})
