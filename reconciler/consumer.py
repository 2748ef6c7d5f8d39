"""The stream consumer role: diode ingest stream -> Postgres inbox.

Per iteration: read up to `read_count` entries (XREADGROUP, short BLOCK so a stop is noticed), or
take over entries a dead consumer left pending (XAUTOCLAIM), decode them, write them in one
transaction (inbox.write), and only then XACK + XDEL them. While Postgres or Redis is down the
entries stay in hand and are retried with backoff (those another consumer took over meanwhile are
left to it); they are never acknowledged before commit, so a crash at any point leaves them pending
for redelivery, and receipts make redelivery a no-op.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Callable, TypeVar

import redis

from . import driftchecks, inbox, metrics, sharedcache, streamentry
from .db import Database
from .errors import BootError, ConflictError, DatabaseError, ReconcilerError
from .queuevacuum import QueueVacuum
from .roles import Role
from .settings import consumer_name
from .streamgroup import group_info, text

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
# A consumer name is one process (host and pid, settings.consumer_name) and a live one reads every
# `[redis] block_ms`, so only a dead process stays silent for hours. XGROUP DELCONSUMER drops the
# pending entries of the name it deletes, so the name must be long dead and hold nothing: with hours
# of silence, a consumer reading between our XINFO and our DELCONSUMER is all but impossible.
FORGET_CONSUMER_IDLE_SECONDS = 6 * 3600.0
# Pause between attempts of a write that met a concurrent writer of the same entities (ConflictError):
# short, since the other transaction commits within milliseconds, and jittered so two replicas that
# collided do not collide again in lockstep.
CONFLICT_FIRST_DELAY, CONFLICT_MAX_DELAY = 0.01, 1.0
SUMMARY_INTERVAL = 60.0
REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)


class Backoff:
    """Jittered exponential delays for retrying a dependency that is down."""

    def __init__(self, first: float = 0.5, cap: float = 30.0) -> None:
        self.first, self.cap, self.attempt = first, cap, 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.first * 2 ** self.attempt)
        self.attempt += 1
        return delay * random.uniform(0.5, 1.0)


class Consumer(Role):
    name = "consumer"
    forget_idle_seconds = FORGET_CONSUMER_IDLE_SECONDS

    def __init__(self, config, cache=None) -> None:
        super().__init__(config)
        self.cache = cache  # the refresher's cache, for today's default branch (None: no workers run)
        settings = config.redis
        self.stream, self.group = settings.stream, settings.group
        self.consumer = consumer_name()
        self.limits = streamentry.Limits.of(settings)
        self.redis: redis.Redis | None = None
        self.db: Database | None = None
        self._claim_cursor = "0-0"
        self._next_claim = 0.0
        self._next_prune = 0.0
        self._totals = inbox.Outcome()
        self._next_summary = time.monotonic() + SUMMARY_INTERVAL
        self.vacuum = QueueVacuum(config.postgres.dsn, config.postgres.schema)
        self.check_reobservations = driftchecks.holds_reobservations(config)

    # --- lifecycle ---

    def boot(self) -> None:
        settings = self.config.redis
        self.db = Database(self.config.postgres.dsn, self.config.postgres.schema, "reconciler consumer")
        self.db.check_schema()
        self.vacuum.decide(self.db)
        self.redis = redis.Redis.from_url(settings.url, socket_connect_timeout=5, client_name="reconciler-consumer",
                                          socket_timeout=settings.block_ms / 1000 + 10, health_check_interval=30)
        try:
            self.redis.ping()
            self._ensure_group()
        except (redis.RedisError, OSError) as exc:
            raise BootError(f"cannot use Redis at {settings.url.split('@')[-1]}: {exc}") from exc
        if not self.check_reobservations:
            self._plan_every_reobservation()
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

    def shutdown(self) -> None:
        if self.db is not None:
            self.db.close()
        if self.redis is not None:
            self.redis.close()

    def run_once(self) -> None:
        entries = self._take_over() if time.monotonic() >= self._next_claim else []
        if not entries:
            entries = self._retry("read the stream", self._read) or []
        if entries:
            self._handle(entries)
        self._housekeeping()

    # --- stream ---

    def _ensure_group(self) -> None:
        # Start at 0, not $: a new group must see entries that arrived before it existed.
        try:
            self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
            log.info("created consumer group %s on %s", self.group, self.stream)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _read(self) -> list:
        try:
            reply = self.redis.xreadgroup(self.group, self.consumer, {self.stream: ">"},
                                          count=self.config.redis.read_count, block=self.config.redis.block_ms)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            log.warning("consumer group %s is gone (stream deleted?); recreating it", self.group)
            self._ensure_group()
            return []
        return reply[0][1] if reply else []

    def _take_over(self) -> list:
        """One page of entries that other (dead) consumers left pending too long."""
        idle = self.config.redis.reclaim_idle_seconds
        try:
            cursor, entries, *_ = self.redis.xautoclaim(self.stream, self.group, self.consumer,
                                                        min_idle_time=int(idle * 1000),
                                                        start_id=self._claim_cursor, count=self.config.redis.read_count)
        except (redis.RedisError, OSError) as exc:
            log.warning("cannot take over pending entries: %s", exc)
            cursor, entries = b"0-0", []
        entries = [(entry_id, fields) for entry_id, fields in entries if fields is not None]
        self._claim_cursor = cursor.decode() if isinstance(cursor, bytes) else cursor
        if self._claim_cursor == "0-0":  # a full pass over the PEL is done; the next one later
            self._next_claim = time.monotonic() + max(1.0, idle / 2)
            self._forget_dead_consumers()
        if entries:
            log.info("took over %d entries pending for more than %.0f s", len(entries), idle)
        return entries

    def _forget_dead_consumers(self) -> None:
        """Drop consumer names silent for hours with nothing pending (every restart leaves one)."""
        try:
            for info in self.redis.xinfo_consumers(self.stream, self.group):
                name = text(info["name"])
                if name != self.consumer and info["pending"] == 0 and info["idle"] >= self.forget_idle_seconds * 1000:
                    self._forget(name, info["idle"] / 1000)
        except (redis.RedisError, OSError) as exc:
            log.debug("cannot tidy the consumer list: %s", exc)

    def _forget(self, name: str, idle: float) -> None:
        dropped = self.redis.xgroup_delconsumer(self.stream, self.group, name)
        if dropped:
            # It read entries after XINFO listed it: they left the pending list with it. It still holds
            # them and acknowledges them after its commit, but if it dies first nothing redelivers them.
            log.error("forgot consumer %s, which had just read %d entries: they are no longer pending",
                      name, dropped)
        else:
            log.info("forgot consumer %s (silent for %.1f h, nothing pending)", name, idle / 3600)

    # --- one batch ---

    def _handle(self, entries: list) -> None:
        batch = [streamentry.decode_entry(entry_id, fields, self.limits) for entry_id, fields in entries]
        outcome = self._retry("write the batch to Postgres", self._attempts(batch))
        if outcome is None:
            return  # stopping: the entries stay pending and are redelivered (a no-op if committed)
        ids = [message.stream_id for message in batch]  # less any another consumer took over meanwhile
        if ids:
            self._retry("acknowledge the batch in Redis", lambda: self._acknowledge(ids))
        self._report(outcome)

    def _attempts(self, batch: list[streamentry.Message]) -> Callable[[], inbox.Outcome | None]:
        """The write of a batch for _retry; every retry first leaves out entries no longer ours."""
        attempted = False

        def attempt() -> inbox.Outcome | None:
            nonlocal attempted
            if attempted:
                batch[:] = self._still_ours(batch)
            attempted = True
            return self._write(batch)
        return attempt

    def _still_ours(self, batch: list[streamentry.Message]) -> list[streamentry.Message]:
        """The entries of the batch still pending with this consumer, their idle time reset.

        While a write is retried (Postgres down or cut off), the entries idle in our pending list and
        another consumer may take them over (XAUTOCLAIM), commit and acknowledge them. Receipts turn a
        write of ours into a no-op only until they are pruned (RECEIPT_RETENTION), so an entry we no
        longer own is left to its new owner. XPENDING tells ownership (XCLAIM with min-idle 0 would
        take an entry from any owner); XCLAIM JUSTID then resets the idle time of ours, so no one takes
        them during the attempt. An entry taken over between the two calls is written by both within
        that attempt: its receipt makes the later write a no-op.
        """
        if not batch:
            return batch
        ids = [message.stream_id for message in batch]
        ordered = sorted(ids, key=streamentry.stream_id_parts)
        # len(ids) is enough: a consumer handles one batch at a time and acknowledges it before the
        # next, so its pending list holds this batch alone (an id missed would only be left pending).
        pending = self.redis.xpending_range(self.stream, self.group, min=ordered[0], max=ordered[-1],
                                            count=len(ids), consumername=self.consumer)
        mine = {_as_bytes(entry["message_id"]) for entry in pending}
        kept = [message for message in batch if _as_bytes(message.stream_id) in mine]
        if kept:
            self.redis.xclaim(self.stream, self.group, self.consumer, min_idle_time=0,
                              message_ids=[message.stream_id for message in kept], justid=True)
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

    def _write(self, batch: list[streamentry.Message]) -> inbox.Outcome | None:
        """inbox.write, re-planned after each conflict; None when the role stops meanwhile."""
        if not batch:
            return inbox.Outcome()  # everything was taken over: nothing of ours to write
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

    def _acknowledge(self, ids: list) -> None:
        # MULTI/EXEC: an entry is deleted only together with its ACK, never instead of it.
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, self.group, *ids)
            pipe.xdel(self.stream, *ids)
            pipe.execute()

    def _retry(self, what: str, action: Callable[[], T]) -> T | None:
        """Run action until it succeeds, backing off while a dependency is down; None when stopping."""
        backoff, down_since = Backoff(), None
        while True:
            try:
                result = action()
            except (DatabaseError, *REDIS_ERRORS, redis.ResponseError) as exc:
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning("cannot %s, will retry: %s", what, exc)
                if not self.pause(backoff.next_delay()):
                    return None
                continue
            if down_since is not None:
                log.info("could %s again after %.1f s", what, time.monotonic() - down_since)
            return result

    # --- reporting and housekeeping ---

    def _report(self, outcome: inbox.Outcome) -> None:
        metrics.consumed(outcome)
        for rejection in outcome.dead_letters:
            where = f"entity {rejection.index} of" if rejection.index is not None else "whole"
            log.warning("dead letter (%s entry %s): %s", where, rejection.message.stream_id.decode(), rejection.reason)
        if outcome.redelivered:
            log.info("%d redelivered entries were already committed; acknowledged them", outcome.redelivered)
        self._totals.add(outcome)

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now >= self._next_prune:
            self._next_prune = now + RECEIPT_PRUNE_INTERVAL
            self._prune_receipts()
        try:
            self.vacuum.tick(self.db)
        except DatabaseError as exc:
            log.debug("vacuum check skipped: %s", exc)
        if now >= self._next_summary:
            self._next_summary = now + SUMMARY_INTERVAL
            t = self._totals
            if t.messages:
                log.info("last %.0f s: %d entries, %d entities: %d new rows, %d duplicates (%d requeued), "
                         "%d dead letters", SUMMARY_INTERVAL, t.messages, t.entities, t.inserted, t.duplicates,
                         t.requeued, len(t.dead_letters))
            self._totals = inbox.Outcome()

    def _prune_receipts(self) -> None:
        """Forget receipts of entries older than anything still pending in the group."""
        try:
            boundary = self._oldest_unacknowledged()
            if boundary is not None:
                ms, seq = boundary
                with self.db.transaction() as tx:
                    tx.execute("prune_receipts", {"stream": self.stream, "ms": ms, "seq": seq,
                                                  "keep_seconds": RECEIPT_RETENTION})
        except (ReconcilerError, redis.RedisError, OSError) as exc:
            log.debug("receipt pruning skipped: %s", exc)

    def _oldest_unacknowledged(self) -> tuple[int, int] | None:
        summary = self.redis.xpending(self.stream, self.group)
        if summary["pending"]:
            return streamentry.stream_id_parts(_as_bytes(summary["min"]))
        group = group_info(self.redis, self.stream, self.group)
        if group is None:
            return None
        ms, seq = streamentry.stream_id_parts(_as_bytes(group["last-delivered-id"]))
        return ms, seq + 1


def _as_bytes(value) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()
