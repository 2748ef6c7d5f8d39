"""Vacuuming the queue table ourselves when the server's autovacuum is off.

ingestion_logs churns (every row is claimed and finished, every re-observation requeues), and
each change leaves a dead entry in the claim index. Migration 0001 tunes autovacuum for it, but a
server with `autovacuum = off` ignores per-table settings, and claims then slow down as dead
entries pile up. In that case the consumer checks the table's dead rows every 30 s against the
same threshold and runs VACUUM in a thread of its own, on its own connection, so the stream is
never blocked by it.
"""

from __future__ import annotations

import logging
import threading
import time

from .db import Database
from .errors import DatabaseError

log = logging.getLogger(__name__)

CHECK_INTERVAL = 30.0


class QueueVacuum:
    def __init__(self, dsn: str, schema: str) -> None:
        self._database = Database(dsn, schema, "reconciler vacuum")  # used by the vacuum thread only
        self._thread: threading.Thread | None = None
        self._next_check = 0.0
        self.needed = False

    def decide(self, db: Database) -> None:
        """At boot: vacuum ourselves only if the server will not."""
        self.needed = not db.fetchall("autovacuum_enabled")[0][0]
        if self.needed:
            log.warning("autovacuum is off on this Postgres server, so it ignores ingestion_logs' settings: "
                        "reconciler will VACUUM ingestion_logs itself (turn autovacuum on to leave it to Postgres)")

    def tick(self, db: Database) -> None:
        """From the consumer's housekeeping: start a VACUUM if the table needs one and none runs."""
        now = time.monotonic()
        if not self.needed or now < self._next_check or (self._thread and self._thread.is_alive()):
            return
        self._next_check = now + CHECK_INTERVAL
        if db.fetchall("queue_table_needs_vacuum")[0][0]:
            self._thread = threading.Thread(target=self._vacuum, name="vacuum", daemon=True)
            self._thread.start()

    def _vacuum(self) -> None:
        started = time.monotonic()
        try:
            self._database.vacuum_queue_table()
            log.info("vacuumed ingestion_logs in %.1f s", time.monotonic() - started)
        except DatabaseError as exc:
            log.warning("VACUUM of ingestion_logs failed, will try again: %s", exc)
        finally:
            self._database.close()
