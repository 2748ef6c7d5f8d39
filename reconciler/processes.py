"""The processes that are alive, as Postgres knows them (table `processes`, migration 0005): what
`reconciler status` lists.

The supervisor's heartbeat (roles.Link.heartbeat) lives in shared memory and only tells it which
child hangs. An operator, possibly on another host and with several replicas running, asks Postgres
instead: every role process records (host, pid, role, started_at, last_seen) there.

A role calls `report_alive(db, role_name)` from its loop as often as it likes: it writes at most every
HEARTBEAT_INTERVAL seconds and never raises, since a Postgres outage must not crash a role that is
otherwise waiting it out (the consumer keeps its entries and retries).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import time
from typing import NamedTuple

from .db import Database
from .errors import DatabaseError

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 5.0

# Per process (keyed by pid: the state is inherited across fork, and a child is a new process),
# role and database.
_next_write: dict[tuple[int, str, str], float] = {}
_started_at: dict[int, datetime.datetime] = {}


class Process(NamedTuple):
    """A process whose heartbeat is recent."""

    host: str
    pid: int
    role: str
    started_at: datetime.datetime
    last_seen: datetime.datetime
    seconds_since_seen: float


def report_alive(db: Database, role_name: str) -> bool:
    """Record that this process runs `role_name`, at most every HEARTBEAT_INTERVAL; True if written."""
    pid = os.getpid()
    key, now = (pid, role_name, db.dsn), time.monotonic()
    if now < _next_write.get(key, 0.0):
        return False
    # Set before writing: while Postgres is down, one attempt per interval, not one per loop.
    _next_write[key] = now + HEARTBEAT_INTERVAL
    # The first heartbeat of a process stands for its start (roles beat from their first iteration).
    started = _started_at.setdefault(pid, datetime.datetime.now(datetime.timezone.utc))
    try:
        with db.transaction() as tx:
            tx.execute("process_heartbeat", {"host": socket.gethostname(), "pid": pid, "role": role_name,
                                             "started_at": started})
    except DatabaseError as exc:
        log.debug("heartbeat not recorded: %s", exc)
        return False
    return True


def live_processes(db: Database, within_seconds: float) -> list[Process]:
    """Processes whose last heartbeat is at most `within_seconds` old, by host, role and pid."""
    return [Process(*row) for row in db.fetchall("live_processes", {"within_seconds": within_seconds})]
