"""The stream consumer role: diode ingest stream -> Postgres inbox.

Per iteration: read up to `read_count` entries (XREADGROUP, short BLOCK so a stop is noticed), or
take over entries a dead consumer left pending (XAUTOCLAIM), decode them, write them in one
transaction (inbox.write), and only then XACK + XDEL them. While Postgres or Redis is down the
entries stay in hand and are retried with backoff; they are never acknowledged before commit, so
a crash at any point leaves them pending for redelivery, and receipts make redelivery a no-op.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Callable, TypeVar

import redis

from . import inbox, metrics, shared, wire
from .db import Database
from .errors import BootError, ConflictError, DatabaseError, ReconcilerError
from .queuevacuum import QueueVacuum
from .roles import Role
from .settings import consumer_name

log = logging.getLogger(__name__)

T = TypeVar("T")

RECEIPT_PRUNE_INTERVAL = 60.0
RECEIPT_RETENTION = 3600.0  # see prune_receipts in sql/queries.sql
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

    def __init__(self, config, cache=None) -> None:
        super().__init__(config)
        self.cache = cache  # the refresher's cache, for today's default branch (None: no workers run)
        settings = config.redis
        self.stream, self.group = settings.stream, settings.group
        self.consumer = consumer_name()
        self.limits = wire.Limits(settings.max_request_bytes, settings.max_entities)
        self.redis: redis.Redis | None = None
        self.db: Database | None = None
        self._claim_cursor = "0-0"
        self._next_claim = 0.0
        self._next_prune = 0.0
        self._totals = inbox.Outcome()
        self._next_summary = time.monotonic() + SUMMARY_INTERVAL
        self.vacuum = QueueVacuum(config.postgres.dsn, config.postgres.schema)

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
        log.info("consuming %s as %s of group %s", self.stream, self.consumer, self.group)

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
            self._forget_dead_consumers(idle)
        if entries:
            log.info("took over %d entries pending for more than %.0f s", len(entries), idle)
        return entries

    def _forget_dead_consumers(self, idle: float) -> None:
        """Drop consumers with nothing pending that have been silent for long (restarts leave them)."""
        try:
            for info in self.redis.xinfo_consumers(self.stream, self.group):
                name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
                if name != self.consumer and info["pending"] == 0 and info["idle"] > idle * 1000:
                    self.redis.xgroup_delconsumer(self.stream, self.group, name)
        except (redis.RedisError, OSError) as exc:
            log.debug("cannot tidy the consumer list: %s", exc)

    # --- one batch ---

    def _handle(self, entries: list) -> None:
        messages = [wire.decode_entry(entry_id, fields, self.limits) for entry_id, fields in entries]
        outcome = self._retry("write the batch to Postgres", lambda: self._write(messages))
        if outcome is None:
            return  # stopping: the entries stay pending and are redelivered (a no-op if committed)
        ids = [entry_id for entry_id, _ in entries]
        self._retry("acknowledge the batch in Redis", lambda: self._acknowledge(ids))
        self._report(outcome)

    def _branch(self) -> str | None:
        """Today's default branch as rows record it, or None while the refresher does not know it."""
        if self.cache is None:
            return None
        view = shared.read(self.cache)  # a gone Manager raises: the supervisor restarts everything
        return view.branch_scope if view.branch_known else None

    def _write(self, messages: list[wire.Message]) -> inbox.Outcome:
        branch = self._branch()
        while True:
            try:
                return inbox.write(self.db, self.stream, messages, branch)
            except ConflictError as exc:
                # A concurrent consumer committed the same entity or entry first; re-plan at once.
                log.debug("write conflict, retrying: %s", exc)

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
        totals = self._totals
        for name in ("messages", "redelivered", "entities", "inserted", "duplicates", "requeued"):
            setattr(totals, name, getattr(totals, name) + getattr(outcome, name))
        totals.dead_letters += outcome.dead_letters

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
                with self.db.transaction() as tx:
                    tx.execute("prune_receipts", {"stream": self.stream, "ms": boundary[0], "seq": boundary[1],
                                                  "keep_seconds": RECEIPT_RETENTION})
        except (ReconcilerError, redis.RedisError, OSError) as exc:
            log.debug("receipt pruning skipped: %s", exc)

    def _oldest_unacknowledged(self) -> tuple[int, int] | None:
        summary = self.redis.xpending(self.stream, self.group)
        if summary["pending"]:
            return wire.stream_id_parts(_as_bytes(summary["min"]))
        for group in self.redis.xinfo_groups(self.stream):
            if _as_bytes(group["name"]) == self.group.encode():
                ms, seq = wire.stream_id_parts(_as_bytes(group["last-delivered-id"]))
                return ms, seq + 1
        return None


def _as_bytes(value) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()
