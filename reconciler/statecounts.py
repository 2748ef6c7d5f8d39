"""Rows per state and object type, kept by Postgres as they change (migration 0013), so the read
API's only_metrics answers from a handful of counter rows instead of counting millions.

Statement triggers on ingestion_logs append each statement's net change to state_count_deltas; the
consumer and the api role fold them into state_counts every FOLD_SECONDS, whichever takes the turn
(the consumer runs on every replica, whatever is configured, so deltas pile up only while it cannot
reach Postgres). A count is the folded rows plus the deltas, exact either way.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

from .db import Database, Tx
from .errors import DatabaseError

log = logging.getLogger(__name__)

FOLD_SECONDS = 5.0
FAILING_SECONDS = 300.0


class Folder:
    """Folds the deltas at most every FOLD_SECONDS, from a role's loop. Never raises: an outage is the
    role's to notice, and the deltas wait; folds failing for FAILING_SECONDS are logged once."""

    def __init__(self, schema: str) -> None:
        self.key = f"reconciler.fold_state_counts.{schema}"
        self._next = 0.0
        self._failing_since: float | None = None
        self._told = False

    def tick(self, db: Database) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + FOLD_SECONDS
        try:
            with db.transaction() as tx:
                if tx.fetchall("take_fold_turn", {"key": self.key})[0][0]:
                    tx.execute("fold_state_counts")
                    tx.execute("drop_empty_state_counts")
        except DatabaseError as exc:
            self._failed(now, exc)
            return
        if self._told:
            log.info("state counts fold again")
        self._failing_since, self._told = None, False

    def _failed(self, now: float, exc: DatabaseError) -> None:
        log.debug("state counts not folded: %s", exc)
        if self._failing_since is None:
            self._failing_since = now
        if not self._told and now - self._failing_since >= FAILING_SECONDS:
            self._told = True
            log.warning("state counts have not folded for %.0f s (the read API's counts stay exact, only slower "
                        "to read): %s", now - self._failing_since, exc)


def by_state_in(tx: Tx, object_types: list[str] | None = None) -> Counter:
    """{stored state: rows} of the object types given (None: all), read in an open transaction."""
    return Counter({state: n for state, n in tx.fetchall("state_counts", {"object_types": object_types}) if n})
