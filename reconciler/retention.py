"""Retention: what may leave the inbox, and the role that deletes it.

Three kinds of things go once they are older than their `[retention]` setting (0 keeps them):
- `rows`: finished rows that are no longer their entity's current row (`is_head` false: a drift
  re-plan or a new default branch replaced them), unchanged that long, with their change sets and
  changes;
- `change_sets`: a row's older plans, once a newer one has superseded them that long (the latest
  always stays);
- `dead_letters`, replayed or not.
Current rows, QUEUED, OPEN, PENDING_RETRY, CHECKING and in-flight rows are never deleted.

Each kind is a walk in id order, one short transaction per step of BATCH (sql/queries.sql
prune_*; the walk over change sets resumes where the last one ended, so each change set is walked
once): a step locks only what it deletes, and skips what anyone else holds (SKIP LOCKED), so
no claim and no consumer write ever waits for it. Its commits do not wait for the WAL flush (a
step lost in a crash is walked again), and after each step the walk rests REST_FACTOR times as long
as the step took. One walk at a time across replicas
(an advisory lock); a dry run (`reconciler prune --dry-run`) takes the same steps and deletes
nothing. What went is tallied in `pruned` (for `status`) in the step's own transaction, and in
the reconciler_pruned_total metric.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from . import metrics
from .db import Database
from .errors import DatabaseError
from .processes import report_alive
from .roles import Role

log = logging.getLogger(__name__)

BATCH = 1000
# After each step the walk rests this many times as long as the step took: retention takes at most a
# quarter of one connection's time, and of the WAL the claims' commits must flush (docs/benchmarks.md).
REST_FACTOR = 3.0
FIRST_PASS_DELAY = 60.0  # seconds after boot, so a restart's own load is over first
RETRY_SECONDS = 60.0  # after a pass Postgres broke off


@dataclass(frozen=True)
class Kind:
    name: str  # the metric's label, the `pruned` row, the key in reports
    statement: str  # one step of its walk (sql/queries.sql)
    setting: str  # its key in [retention]
    what: str  # how a report names them
    resumes: bool = False  # a walk starts where the last one ended (pruned.walked_to), not at the start


KINDS = (
    Kind("rows", "prune_superseded_rows", "superseded_rows_days", "superseded rows"),
    Kind("change_sets", "prune_superseded_change_sets", "superseded_change_sets_days", "superseded change sets",
         resumes=True),
    Kind("dead_letters", "prune_dead_letters", "dead_letters_days", "dead letters"),
)


def keep_days(config, kind: Kind) -> float:
    return getattr(config.retention, kind.setting)


def enabled(config) -> bool:
    """Whether anything is ever deleted (else no retention process runs)."""
    return any(keep_days(config, kind) > 0 for kind in KINDS)


def _sleep(seconds: float) -> bool:
    time.sleep(seconds)
    return True


Rest = Callable[[float], bool]  # sleeps; False when the walk should stop (a role's pause)


def prune(db: Database, config, dry_run: bool = False, rest: Rest = _sleep) -> dict[str, int]:
    """One walk of every kind that has a retention: how many went (or would go), by kind name."""
    return {kind.name: walk(db, kind, keep_days(config, kind), dry_run, rest)
            for kind in KINDS if keep_days(config, kind) > 0}


def walk(db: Database, kind: Kind, days: float, dry_run: bool, rest: Rest) -> int:
    after = db.fetchall("pruned_walked_to", {"kind": kind.name})[0][0] if kind.resumes else 0
    total = 0
    while True:
        started = time.monotonic()
        with db.transaction() as tx:
            tx.execute("commit_without_waiting")
            [(last, reached_recent, doomed)] = tx.fetchall(kind.statement, {
                "after": after, "limit": BATCH, "keep_days": days, "dry_run": dry_run})
            if not dry_run and (doomed or (kind.resumes and last is not None)):
                tx.execute("tally_pruned", {"kind": kind.name, "deleted": doomed,
                                            "walked_to": last if kind.resumes else None})
        if doomed and not dry_run:
            metrics.pruned(kind.name, doomed)
        total += doomed
        if last is None or reached_recent:
            return total
        after = last
        if not rest(REST_FACTOR * (time.monotonic() - started)):
            return total


@contextmanager
def exclusive(db: Database, schema: str) -> Iterator[bool]:
    """Hold the retention lock of `schema` for a walk: yields False (and holds nothing) when another
    pruner (another replica, `reconciler prune`) has it."""
    key = {"key": f"reconciler.retention.{schema}"}
    [(taken,)] = db.fetchall("pruner_lock", key)
    try:
        yield taken
    finally:
        if taken:
            try:
                db.fetchall("pruner_unlock", key)
            except DatabaseError:
                pass  # the connection is gone, and the lock with it


def described(counts: dict[str, int]) -> str:
    """`12 superseded rows, 0 superseded change sets, 3 dead letters`."""
    return ", ".join(f"{counts[kind.name]:,} {kind.what}" for kind in KINDS if kind.name in counts)


class Pruner(Role):
    """The retention process: a walk every `[retention] interval_seconds`."""

    name = "retention"
    db: Database  # boot() opens it

    def __init__(self, config) -> None:
        super().__init__(config)
        self._next_pass = time.monotonic() + min(FIRST_PASS_DELAY, config.retention.interval_seconds)

    def boot(self) -> None:
        self.open_database()
        self.db.check_schema()
        kept = ", ".join(f"{kind.what} {keep_days(self.config, kind):g} days" if keep_days(self.config, kind) > 0
                         else f"{kind.what} for ever" for kind in KINDS)
        log.info("keeping %s; looking every %s s", kept, f"{self.config.retention.interval_seconds:g}")

    def run_once(self) -> None:
        if time.monotonic() < self._next_pass:
            self.pause(1.0)
            return
        try:
            self._pass()
        except DatabaseError as exc:
            log.warning("retention broke off, will try again in %.0f s: %s", RETRY_SECONDS, exc)
            self._next_pass = time.monotonic() + RETRY_SECONDS
            return
        self._next_pass = time.monotonic() + self.config.retention.interval_seconds

    def _rest(self, seconds: float) -> bool:
        """Between two steps of a walk: the process's heartbeat row (a long walk must not look dead in
        `status`), then a pause as long as the step took."""
        report_alive(self.db, self.name)
        return self.pause(seconds)

    def _pass(self) -> None:
        started = time.monotonic()
        with exclusive(self.db, self.config.postgres.schema) as mine:
            if not mine:
                log.debug("another pruner is walking; skipping this pass")
                return
            counts = prune(self.db, self.config, rest=self._rest)
        if any(counts.values()):
            log.info("deleted %s in %.1f s", described(counts), time.monotonic() - started,
                     extra={"event": "pruned"})
