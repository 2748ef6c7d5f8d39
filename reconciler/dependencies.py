"""What a process knows of the services it depends on, and how an outage is made loud.

A Watch follows one dependency (POSTGRES, REDIS, PLUGIN, TOKEN_ENDPOINT) as the one process that
owns it sees it: the consumer owns Postgres and Redis (what it cannot write or read, nothing can),
the refresher owns the plugin and its token endpoint (it asks the plugin every few seconds,
refresher.py). Told `ok()` or `failed(problem, kind)` after every use, a Watch turns the changes
into what an operator sees:

- an ERROR line when the dependency goes down, again every `[log] outage_reminder_seconds` while it
  stays down, and one when it is back, also at ERROR so that `journalctl -p err` shows how long it
  lasted (event fields: dependency_down, dependency_still_down, dependency_up);
- the gauge reconciler_dependency_up{dependency};
- its row in `dependency_health` (host, dependency) for `reconciler status`, written on every change
  and refreshed every WRITE_SECONDS while nothing changes, whenever Postgres takes it (a Postgres
  outage is written once it is over);
- for the plugin and the token endpoint, the shared cache's `outages`: while either is down the
  workers claim nothing (rows stay QUEUED, no attempt is spent) and /readyz fails.
"""

from __future__ import annotations

import datetime
import logging
import socket
import time
from typing import Callable

from . import metrics
from .db import Database
from .errors import DatabaseError
from .text import human_seconds, one_line

log = logging.getLogger(__name__)

POSTGRES, REDIS, PLUGIN, TOKEN_ENDPOINT = "postgres", "redis", "plugin", "token_endpoint"
WHAT = {POSTGRES: "Postgres", REDIS: "Redis", PLUGIN: "the diode plugin", TOKEN_ENDPOINT: "the token endpoint"}
WRITE_SECONDS = 60.0  # a row's checked_at is refreshed this often while nothing changes
STALE_SECONDS = 3 * WRITE_SECONDS  # a row not refreshed for this long was left by a process that is gone

# Publishes a dependency's outage to the other processes (the shared cache): None when it is up.
Publish = Callable[[str, "dict | None"], None]


def _utc(epoch: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)


def clock(epoch: float) -> str:
    """`14:02 UTC` (today) or `2026-11-30 14:02 UTC`: when an outage began, as log lines and `status`
    say it."""
    moment = _utc(epoch)
    today = datetime.datetime.now(datetime.timezone.utc).date()
    return f"{moment:%H:%M} UTC" if moment.date() == today else f"{moment:%Y-%m-%d %H:%M} UTC"


def down_since(since: float, problem: str | None) -> str:
    """`unreachable since 14:02 UTC: <problem>`: an outage as /readyz and `status` tell it."""
    return f"unreachable since {clock(since)}: {problem}"


class Watch:
    def __init__(self, dependency: str, remind_seconds: float, db: Callable[[], Database | None] = lambda: None,
                 publish: Publish | None = None) -> None:
        """`db`: the owner's connection for the dependency_health row (None: not written); `publish`:
        where the other processes learn of an outage."""
        self.dependency, self.remind_seconds = dependency, remind_seconds
        self._db, self._publish = db, publish
        self.up: bool | None = None  # None until the first verdict
        self.since = time.time()
        self.problem: str | None = None
        self.kind: str | None = None
        self._next_reminder = 0.0
        self._next_write = 0.0

    @property
    def what(self) -> str:
        return WHAT[self.dependency]

    def ok(self) -> None:
        if self.up is not True:
            if self.up is False:
                log.error("%s is back after %s (down since %s: %s)", self.what, human_seconds(time.time() - self.since),
                          clock(self.since), self.problem, extra={"event": "dependency_up",
                                                                 "dependency": self.dependency})
            self._change(True, None, None)
        self._write_row()

    def failed(self, problem: str, kind: str | None = None) -> None:
        problem = one_line(problem)
        now = time.monotonic()
        if self.up is not False:
            self._change(False, problem, kind)
            log.error("%s is unreachable: %s", self.what, problem,
                      extra={"event": "dependency_down", "dependency": self.dependency, "kind": kind})
            self._next_reminder = now + self.remind_seconds
        elif now >= self._next_reminder:
            self._next_reminder = now + self.remind_seconds
            log.error("%s is still unreachable, since %s (%s): %s", self.what, clock(self.since),
                      human_seconds(time.time() - self.since), problem,
                      extra={"event": "dependency_still_down", "dependency": self.dependency, "kind": kind})
        if (problem, kind) != (self.problem, self.kind):
            self.problem, self.kind, self._next_write = problem, kind, 0.0  # the reason changed: say so
            self._tell_others()
        self._write_row()

    def _change(self, up: bool, problem: str | None, kind: str | None) -> None:
        self.up, self.since, self.problem, self.kind = up, time.time(), problem, kind
        self._next_write = 0.0
        metrics.dependency_up(self.dependency, up)
        self._tell_others()

    def _tell_others(self) -> None:
        if self._publish is not None:
            self._publish(self.dependency, None if self.up else {"since": self.since, "problem": self.problem,
                                                                 "kind": self.kind})

    def _write_row(self) -> None:
        """The dependency_health row, on a change and every WRITE_SECONDS; never raises (an outage of
        Postgres is the owner's to wait out, and the row is written once it is over)."""
        db = self._db()
        if db is None or time.monotonic() < self._next_write or self.up is None:
            return
        # Set first: a Postgres that does not answer is tried once per WRITE_SECONDS, not on every call.
        self._next_write = time.monotonic() + WRITE_SECONDS
        try:
            with db.transaction() as tx:
                tx.execute("report_dependency", {"host": socket.gethostname(), "dependency": self.dependency,
                                                 "up": self.up, "since": _utc(self.since), "problem": self.problem,
                                                 "kind": self.kind})
        except DatabaseError as exc:
            log.debug("cannot record the health of %s yet: %s", self.dependency, exc)

