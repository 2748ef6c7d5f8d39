"""The ingest stream's consumer group, as Redis holds it: the one place that speaks its protocol.

A `StreamGroup` is one consumer's handle on the group: create it, read new entries, take over
entries a dead consumer left pending, check which entries are still ours before a retried write,
acknowledge (and delete) entries once they are committed, forget consumers long dead, and tell how
far back receipts must be kept. The consumer role decides when; this class only says how.
`group_info` reads what Redis says about a group for the consumer, the refresher and `status`.

Our clients keep redis-py's bytes replies (stream payloads are binary), so names and ids arrive as
bytes; text.as_text/as_bytes convert them.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis

from .streamentry import stream_id_parts
from .text import as_bytes, as_text

log = logging.getLogger(__name__)

# A consumer name is one process (host and pid, settings.consumer_name) and a live one reads every
# `[redis] block_ms`, so only a dead process stays silent for hours. XGROUP DELCONSUMER drops the
# pending entries of the name it deletes, so the name must be long dead and hold nothing: with hours
# of silence, a consumer reading between our XINFO and our DELCONSUMER is all but impossible.
FORGET_CONSUMER_IDLE_SECONDS = 6 * 3600.0
# Beyond its BLOCK time, how long a blocking read waits for Redis' reply: a Redis that forks for a
# snapshot or waits on an fsync can stall for seconds, and a read given up on leaves its entries
# pending with us until a takeover.
BLOCKING_REPLY_MARGIN = 10.0


def redis_client(url: str, name: str, timeout: float = 5.0, blocking_ms: int = 0) -> redis.Redis:
    """The one way the service connects to Redis: named in CLIENT LIST (`reconciler-<name>`), with
    connect and reply timeouts so a Redis that stops answering is noticed. A client that blocks in
    reads of `blocking_ms` waits that long plus BLOCKING_REPLY_MARGIN for a reply."""
    reply = blocking_ms / 1000 + BLOCKING_REPLY_MARGIN if blocking_ms else timeout
    return redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=reply,
                                client_name=f"reconciler-{name}", health_check_interval=30)


def group_info(client: redis.Redis, stream: str, group: str) -> dict | None:
    """The XINFO GROUPS entry of `group` on `stream` (fields as redis-py returns them), or None."""
    for info in client.xinfo_groups(stream):
        if as_text(info["name"]) == group:
            return info
    return None


class StreamGroup:
    def __init__(self, client: redis.Redis, stream: str, group: str, consumer: str, read_count: int,
                 block_ms: int, reclaim_idle_seconds: float,
                 forget_idle_seconds: float = FORGET_CONSUMER_IDLE_SECONDS) -> None:
        self.client, self.stream, self.group, self.consumer = client, stream, group, consumer
        self.read_count, self.block_ms = read_count, block_ms
        self.reclaim_idle_seconds = reclaim_idle_seconds
        self.forget_idle_seconds = forget_idle_seconds
        self._takeover_cursor = "0-0"
        self._next_takeover = 0.0

    def ensure(self) -> None:
        """Create the group unless it exists; at 0, not $: a new group must see entries that arrived
        before it existed."""
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
            log.info("created consumer group %s on %s", self.group, self.stream)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read(self) -> list:
        """New entries [(id, fields)], after blocking up to block_ms; the group is recreated if gone."""
        try:
            reply: Any = self.client.xreadgroup(self.group, self.consumer, {self.stream: ">"},
                                           count=self.read_count, block=self.block_ms)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            log.warning("consumer group %s is gone (stream deleted?); recreating it", self.group)
            self.ensure()
            return []
        return reply[0][1] if reply else []

    def take_over(self) -> list:
        """One page of entries other (dead) consumers left pending longer than reclaim_idle_seconds,
        when a pass over the pending list is due; [] otherwise, or when Redis fails (logged)."""
        if time.monotonic() < self._next_takeover:
            return []
        idle = self.reclaim_idle_seconds
        try:
            cursor, entries, *_ = self.client.xautoclaim(self.stream, self.group, self.consumer,
                                                         min_idle_time=int(idle * 1000),
                                                         start_id=self._takeover_cursor, count=self.read_count)
        except (redis.RedisError, OSError) as exc:
            log.warning("cannot take over pending entries: %s", exc)
            cursor, entries = b"0-0", []
        entries = [(entry_id, fields) for entry_id, fields in entries if fields is not None]
        self._takeover_cursor = as_text(cursor)
        if self._takeover_cursor == "0-0":  # a full pass over the pending list is done; the next one later
            self._next_takeover = time.monotonic() + max(1.0, idle / 2)
            self.forget_dead_consumers()
        if entries:
            log.info("took over %d entries pending for more than %.0f s", len(entries), idle)
        return entries

    def still_ours(self, ids: list) -> set[bytes]:
        """Those of `ids` still pending with this consumer, their idle time reset.

        While a write is retried (Postgres down or cut off), the entries idle in our pending list and
        another consumer may take them over, commit and acknowledge them. XPENDING tells ownership
        (XCLAIM with min-idle 0 would take an entry from any owner); XCLAIM JUSTID then resets the
        idle time of ours, so no one takes them during the next attempt. An entry taken over between
        the two calls is written by both within that attempt: its receipt makes the later write a no-op.
        """
        if not ids:
            return set()
        ordered = sorted(ids, key=lambda entry_id: stream_id_parts(as_bytes(entry_id)))
        # len(ids) is enough: a consumer handles one batch at a time and acknowledges it before the
        # next, so its pending list holds this batch alone (an id missed would only be left pending).
        pending = self.client.xpending_range(self.stream, self.group, min=ordered[0], max=ordered[-1],
                                             count=len(ids), consumername=self.consumer)
        mine = {as_bytes(entry["message_id"]) for entry in pending}
        kept = [entry_id for entry_id in ids if as_bytes(entry_id) in mine]
        if kept:
            self.client.xclaim(self.stream, self.group, self.consumer, min_idle_time=0, message_ids=kept,
                               justid=True)
        return {as_bytes(entry_id) for entry_id in kept}

    def acknowledge(self, ids: list) -> None:
        """XACK and XDEL the entries in one MULTI/EXEC: an entry is deleted only together with its ACK,
        never instead of it."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, self.group, *ids)
            pipe.xdel(self.stream, *ids)
            pipe.execute()

    def forget_dead_consumers(self) -> None:
        """Drop consumer names silent for hours with nothing pending (every restart leaves one)."""
        try:
            for info in self.client.xinfo_consumers(self.stream, self.group):
                name = as_text(info["name"])
                if name != self.consumer and info["pending"] == 0 and info["idle"] >= self.forget_idle_seconds * 1000:
                    self._forget(name, info["idle"] / 1000)
        except (redis.RedisError, OSError) as exc:
            log.debug("cannot tidy the consumer list: %s", exc)

    def _forget(self, name: str, idle: float) -> None:
        dropped = self.client.xgroup_delconsumer(self.stream, self.group, name)
        if dropped:
            # It read entries after XINFO listed it: they left the pending list with it. It still holds
            # them and acknowledges them after its commit, but if it dies first nothing redelivers them.
            log.error("forgot consumer %s, which had just read %d entries: they are no longer pending",
                      name, dropped, extra={"event": "consumer_forgotten", "consumer": name, "dropped": dropped})
        else:
            log.info("forgot consumer %s (silent for %.1f h, nothing pending)", name, idle / 3600,
                     extra={"event": "consumer_forgotten", "consumer": name, "dropped": 0})

    def oldest_unacknowledged(self) -> tuple[int, int] | None:
        """(ms, seq) of the oldest entry not yet acknowledged (pending, or the next to be delivered);
        None when the group does not exist."""
        summary = self.client.xpending(self.stream, self.group)
        if summary["pending"]:
            return stream_id_parts(as_bytes(summary["min"]))
        group = group_info(self.client, self.stream, self.group)
        if group is None:
            return None
        ms, seq = stream_id_parts(as_bytes(group["last-delivered-id"]))
        return ms, seq + 1
