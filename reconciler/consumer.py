"""The stream consumer role: diode ingest stream -> Postgres inbox.

Per iteration: read up to `read_count` entries (XREADGROUP, short BLOCK so a stop is noticed), or
take over entries a dead consumer left pending (XAUTOCLAIM), decode them, write them in one
transaction (inbox.write), and only then XACK + XDEL them. While Postgres or Redis is down the
entries stay in hand and are retried with backoff (those another consumer took over meanwhile are
left to it), and the outage is made loud (dependencies.py: the consumer owns both). They are never
acknowledged before commit, so a crash at any point leaves them pending for redelivery, and
receipts make redelivery a no-op.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, TypeVar

import redis

from . import diagnosis, driftchecks, inbox, metrics, sharedcache, statecounts, streamentry
from .backoff import Backoff
from .db import Database
from .dependencies import POSTGRES, REDIS, Watch
from .errors import BootError, ConflictError, DatabaseError, ReconcilerError
from .queuevacuum import QueueVacuum
from .roles import SUMMARY_INTERVAL, Role
from .settings import consumer_name
from .streamgroup import StreamGroup, redis_client
from .text import as_bytes

log = logging.getLogger(__name__)

T = TypeVar("T")

RECEIPT_PRUNE_INTERVAL = 60.0
# How long a receipt outlives the acknowledgement of its entry (prune_receipts). It must outlast
# any write of the entry by a consumer that lost it: another consumer takes an entry over only
# after it sat `[redis] reclaim_idle_seconds` with its owner, and an owner re-checks that it still
# holds its entries (and resets their idle time) before every retried write (_still_ours). So a late
# write starts while the entry was still ours and lands within one attempt (connect_timeout 10 s +
# tcp_user_timeout 60 s + the statements), after which the other consumer's commit finds or leaves
# a receipt either way. An hour is far above one attempt, and need not grow with reclaim idle: a
# longer idle only makes takeovers later. A constant, not a setting: nothing an operator tunes.
RECEIPT_RETENTION = 3600.0
# Pause between attempts of a write that met a concurrent writer of the same entities (ConflictError):
# short, since the other transaction commits within milliseconds, and jittered so two replicas that
# collided do not collide again in lockstep.
CONFLICT_FIRST_DELAY, CONFLICT_MAX_DELAY = 0.01, 1.0
# Pause between attempts while Redis or Postgres is down.
OUTAGE_FIRST_DELAY, OUTAGE_MAX_DELAY = 0.5, 30.0
REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)
HEALTH_CHECK_SECONDS = 10.0


class Consumer(Role):
    name = "consumer"
    db: Database  # boot() opens it (Role.open_database)

    def __init__(self, config, cache=None) -> None:
        super().__init__(config)
        self.cache = cache  # the refresher's cache, for today's default branch (None: no workers run)
        settings = config.redis
        self.stream, self.group = settings.stream, settings.group
        self.consumer = consumer_name()
        self.limits = streamentry.Limits.of(settings)
        self.redis: redis.Redis  # boot() opens both
        self.stream_group: StreamGroup
        self._next_prune = 0.0
        self._totals = inbox.Written()
        self.vacuum = QueueVacuum(config.postgres.dsn, config.postgres.schema)
        self.counts = statecounts.Folder(config.postgres.schema)
        self.check_reobservations = driftchecks.holds_reobservations(config)
        self.watches = {dependency: Watch(dependency, config.log.outage_reminder_seconds, db=self._health_db)
                        for dependency in (POSTGRES, REDIS)}
        self._next_health_check = 0.0

    # --- lifecycle ---

    def boot(self) -> None:
        settings = self.config.redis
        self.open_database()
        self.db.check_schema()
        self.vacuum.decide(self.db)
        self.redis = self.closes(redis_client(settings.url, "consumer", blocking_ms=settings.block_ms))
        self.stream_group = StreamGroup(self.redis, self.stream, self.group, self.consumer, settings.read_count,
                                        settings.block_ms, settings.reclaim_idle_seconds)
        try:
            self.redis.ping()
            self.stream_group.ensure()
        except (redis.RedisError, OSError) as exc:
            raise BootError(f"cannot use Redis at {settings.url.split('@')[-1]}: {exc}") from exc
        if not self.check_reobservations:
            self._plan_every_reobservation()
        for watch in self.watches.values():
            watch.ok()  # both answered just now
        log.info("consuming %s as %s of group %s", self.stream, self.consumer, self.group)

    def _plan_every_reobservation(self) -> None:
        """No drift-checks process runs: re-observations are requeued here, and rows an earlier
        configuration parked in CHECKING are sent to QUEUED rather than left waiting for one."""
        released = driftchecks.release_checking(self.db)
        if released:
            log.warning("%d rows waited in CHECKING for drift checks that no longer run; planning them", released)
        if self.config.drift.mode == "changes":  # not what was asked for: say so, as the role would
            log.warning("[drift] mode changes without [netbox] api_token: every unchanged re-observation is "
                        "planned again, as in mode always")
            metrics.drift_fallback(True)

    def run_once(self) -> None:
        entries = self.stream_group.take_over()
        if not entries:
            entries = self._retry("read the stream", lambda _: self.stream_group.read()) or []
        if entries:
            self._handle(entries)
        self._housekeeping()

    # --- one batch ---

    def _handle(self, entries: list) -> None:
        batch = [streamentry.decode_entry(entry_id, fields, self.limits) for entry_id, fields in entries]
        written = self._write_while_ours(batch)
        if written is None:
            return  # stopping: the entries stay pending and are redelivered (a no-op if committed)
        outcome, kept = written
        ids = [message.stream_id for message in kept]
        if ids:
            self._retry("acknowledge the batch in Redis", lambda _: self.stream_group.acknowledge(ids))
        self._report(outcome)

    def _write_while_ours(self, batch: list[streamentry.Message]) \
            -> tuple[inbox.Written, list[streamentry.Message]] | None:
        """Write the batch, retrying while a dependency is down: (the outcome, the entries written), or
        None when stopping. Every retry first leaves out the entries another consumer took over
        meanwhile (receipts make a write of ours a no-op only until they are pruned, so an entry we no
        longer own is left to its new owner, to write and acknowledge)."""
        kept = batch

        def attempt(retrying: bool) -> tuple[inbox.Written, list[streamentry.Message]] | None:
            nonlocal kept
            if retrying:
                kept = self._still_ours(kept)
            outcome = self._write(kept)
            return None if outcome is None else (outcome, kept)
        return self._retry("write the batch to Postgres", attempt)

    def _still_ours(self, batch: list[streamentry.Message]) -> list[streamentry.Message]:
        mine = self.stream_group.still_ours([message.stream_id for message in batch])
        kept = [message for message in batch if as_bytes(message.stream_id) in mine]
        if len(kept) < len(batch):
            log.warning("%d of %d entries were taken over by another consumer while their write was retried; "
                        "left to it", len(batch) - len(kept), len(batch))
        return kept

    def _branch(self) -> str | None:
        """Today's default branch as rows record it, or None while the refresher does not know it."""
        if self.cache is None:
            return None
        view = sharedcache.read(self.cache)  # a gone Manager raises: the supervisor restarts everything
        return view.branch_scope if view.branch_known else None

    def _write(self, batch: list[streamentry.Message]) -> inbox.Written | None:
        """inbox.write, re-planned after each conflict; None when the role stops meanwhile."""
        if not batch:
            return inbox.Written()  # everything was taken over: nothing of ours to write
        branch = self._branch()
        backoff, conflicted = Backoff(CONFLICT_FIRST_DELAY, CONFLICT_MAX_DELAY), False
        while True:
            try:
                return inbox.write(self.db, self.stream, batch, branch, hash_order=conflicted,
                                   check=self.check_reobservations)
            except ConflictError as exc:
                # A concurrent writer committed the same entity or entry first (or we deadlocked with
                # it): re-plan against what it committed, inserting new rows in hash order so writers
                # that re-plan take their locks in one order and cannot deadlock again.
                log.debug("write conflict, retrying: %s", exc)
                conflicted = True
                if not self.pause(backoff.next_delay()):
                    return None

    def _retry(self, what: str, action: Callable[[bool], T]) -> T | None:
        """Run action until it succeeds, backing off while a dependency is down; None when stopping.
        The action is told whether this is a retry."""
        backoff, down_since = Backoff(OUTAGE_FIRST_DELAY, OUTAGE_MAX_DELAY), None
        failed: set[Watch] = set()
        while True:
            try:
                result = action(down_since is not None)
            except (DatabaseError, *REDIS_ERRORS, redis.ResponseError) as exc:
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning("cannot %s, will retry: %s", what, exc)
                watch = self.watches[POSTGRES if isinstance(exc, DatabaseError) else REDIS]
                watch.failed(f"cannot {what}: {exc}", self._kind(exc))
                failed.add(watch)
                if not self.pause(backoff.next_delay()):
                    return None
                continue
            if down_since is not None:
                log.info("could %s again after %.1f s", what, time.monotonic() - down_since)
            for watch in failed:
                watch.ok()
            return result

    def _kind(self, exc: BaseException) -> str:
        if isinstance(exc, DatabaseError):
            return diagnosis.of_postgres_error(str(exc)).kind
        return diagnosis.of_redis_error(self.config.redis.url, exc).kind

    # --- reporting and housekeeping ---

    def _report(self, outcome: inbox.Written) -> None:
        metrics.consumed(outcome)
        for rejection in outcome.dead_letters:
            where = f"entity {rejection.index} of" if rejection.index is not None else "whole"
            log.warning("dead letter (%s entry %s): %s", where, rejection.message.stream_id.decode(), rejection.reason)
        if outcome.redelivered:
            log.info("%d redelivered entries were already committed; acknowledged them", outcome.redelivered)
        self._totals.add(outcome)

    def _health_db(self) -> Database | None:
        """Where the dependency_health rows go: our connection, unless Postgres is what is down (then
        they are written once it is back)."""
        return None if self.watches[POSTGRES].up is False else self.db

    def _check_dependencies(self) -> None:
        """Postgres and Redis, asked every HEALTH_CHECK_SECONDS: an idle stream uses neither, and an
        outage must be told all the same (while the stream flows, _retry tells it at once)."""
        checks: dict[str, Callable[[], object]] = {POSTGRES: lambda: self.db.fetchall("ping"), REDIS: self.redis.ping}
        for dependency, check in checks.items():
            try:
                check()
            except (DatabaseError, redis.RedisError, OSError) as exc:
                self.watches[dependency].failed(f"cannot reach it: {exc}", self._kind(exc))
            else:
                self.watches[dependency].ok()

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now >= self._next_health_check:
            self._next_health_check = now + HEALTH_CHECK_SECONDS
            self._check_dependencies()
        if now >= self._next_prune:
            self._next_prune = now + RECEIPT_PRUNE_INTERVAL
            self._prune_receipts()
        try:
            self.vacuum.tick(self.db)
        except DatabaseError as exc:
            log.debug("vacuum check skipped: %s", exc)
        self.counts.tick(self.db)
        if self.summary_due():
            t = self._totals
            if t.messages:
                log.info("last %.0f s: %d entries, %d entities: %d new rows, %d duplicates (%d requeued), "
                         "%d dead letters", SUMMARY_INTERVAL, t.messages, t.entities, t.inserted, t.duplicates,
                         t.requeued, len(t.dead_letters))
            self._totals = inbox.Written()

    def _prune_receipts(self) -> None:
        """Forget receipts of entries older than anything still pending in the group."""
        try:
            boundary = self.stream_group.oldest_unacknowledged()
            if boundary is not None:
                ms, seq = boundary
                with self.db.transaction() as tx:
                    tx.execute("prune_receipts", {"stream": self.stream, "ms": ms, "seq": seq,
                                                  "keep_seconds": RECEIPT_RETENTION})
        except (ReconcilerError, redis.RedisError, OSError) as exc:
            log.debug("receipt pruning skipped: %s", exc)
