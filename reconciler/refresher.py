"""The refresher role: keeps the shared cache current for the workers (and the consumer).

- The plugin's default branch, fetched at start and every `[netbox] branch_refresh_seconds`.
  A 404 (plugin older than 1.5) means "no branch". An error keeps the last value; while no first
  answer has arrived the fetch is retried with backoff (1 s doubling to 30 s), since workers claim
  nothing until the branch is known: a cold cache is indistinguishable from "no branch" and would
  plan against main.
- Backpressure, every second: the consumer group's lag plus pending entries against
  `[workers] backpressure_threshold`. One process decides, so pausing and resuming are logged once.
  Lag and pending are measured even when the threshold is off, for the stream gauges (metrics.py).
  XLEN alone would count leftovers forever; with reconciler's XDEL-after-ACK, XLEN is only the
  fallback when Redis cannot compute the lag.
"""

from __future__ import annotations

import logging
import time

import redis

from . import backoff, metrics
from .errors import BootError
from .plugin import PluginClient, Unavailable
from .roles import Role
from .sharedcache import PROXY_ERRORS
from .streamgroup import group_info, redis_client

log = logging.getLogger(__name__)

BACKPRESSURE_INTERVAL = 1.0


class Refresher(Role):
    name = "refresher"

    def __init__(self, config, cache, limiter) -> None:
        super().__init__(config)
        self.cache, self.limiter = cache, limiter
        self.plugin: PluginClient  # boot() opens both
        self.redis: redis.Redis
        self._next_branch = 0.0
        self._branch_failures = 0
        self._next_backpressure = 0.0
        self._behind = False

    def boot(self) -> None:
        self.plugin = PluginClient(self.config.netbox, self.limiter, pacer=self)
        self.redis = self.closes(redis_client(self.config.redis.url, "refresher"))
        # Only for its heartbeat row (roles.py); opened lazily, so Postgres being down does not stop
        # the refresher from serving the branch.
        self.open_database()
        try:
            self.cache.get("branch_known")
        except PROXY_ERRORS as exc:
            raise BootError(f"the shared cache is unreachable: {exc!r}") from exc

    def run_once(self) -> None:
        now = time.monotonic()
        if now >= self._next_branch:
            self._refresh_branch()
        if now >= self._next_backpressure:
            self._next_backpressure = now + BACKPRESSURE_INTERVAL
            self._check_backpressure()
        self.pause(0.2)

    # --- default branch ---

    def _refresh_branch(self) -> None:
        try:
            branch = self.plugin.default_branch()
        except Unavailable as exc:
            self._branch_failed(exc)
            return
        known = self.cache.get("branch_known")
        if not known or self.cache.get("branch") != branch:
            log.info("default branch: %s", f"{branch['name']} ({branch['id']})" if branch else "none (main)")
        self.cache.update(branch=branch, branch_known=True)
        self._branch_failures = 0
        self._next_branch = time.monotonic() + self.config.netbox.branch_refresh_seconds

    def _branch_failed(self, exc: Unavailable) -> None:
        self._branch_failures += 1
        if self.cache.get("branch_known"):
            if self._branch_failures == 1:
                log.warning("default branch refresh failed; serving the last known value: %s", exc)
            self._next_branch = time.monotonic() + self.config.netbox.branch_refresh_seconds
            return
        if self._branch_failures == 1:
            log.warning("default branch not known yet (workers wait for it); retrying: %s", exc)
        self._next_branch = time.monotonic() + backoff.delay(self._branch_failures, 1.0, 30.0, jitter=False)

    # --- backpressure ---

    def _check_backpressure(self) -> None:
        threshold = self.config.workers.backpressure_threshold
        try:
            lag, pending = self._backlog()
        except (redis.RedisError, OSError) as exc:
            log.debug("backpressure check skipped (not pausing): %s", exc)
            lag, pending = 0, 0  # fail open: an unreadable Redis must not stop the workers
        else:
            metrics.stream_backlog(lag, pending)
        if threshold <= 0:
            metrics.backpressure(False, started=False)
            return
        backlog = lag + pending
        behind = backlog > threshold
        metrics.backpressure(behind, started=behind and not self._behind)
        if behind != self._behind:
            self._behind = behind
            if behind:
                log.warning("the consumer is behind (%d stream entries unread or pending > %d); workers pause",
                            backlog, threshold)
            else:
                log.info("the consumer caught up (%d stream entries unread or pending); workers resume", backlog)
        self.cache["behind"] = behind

    def _backlog(self) -> tuple[int, int]:
        """(entries not yet delivered to the group, entries delivered and not acknowledged)."""
        stream, group = self.config.redis.stream, self.config.redis.group
        info = group_info(self.redis, stream, group)
        if info is None:
            return 0, 0
        lag = info.get("lag")
        return (lag if lag is not None else self.redis.xlen(stream)), info["pending"]
