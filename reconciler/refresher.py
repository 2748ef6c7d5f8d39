"""The refresher role: keeps the shared cache current for the workers (and the consumer).

- The plugin's health (dependencies.py): it asks the plugin's `default-branch/` once (no retries:
  the next probe is the retry), every PROBE_SECONDS while it answers and every PROBE_DOWN_SECONDS
  while it does not (or at once when a worker found it unreachable). While the plugin or its token
  endpoint is down, the cache says so: workers claim nothing, /readyz fails, and the ERROR lines, the
  gauge and `status` say since when and why.
- The plugin's default branch, taken from those answers at start and every `[netbox]
  branch_refresh_seconds`. A 404 (plugin older than 1.5) means "no branch". While no first answer
  has arrived, workers claim nothing: a cold cache is indistinguishable from "no branch" and would
  plan against main. A failed answer keeps the last value.
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

from . import diagnosis, metrics
from .dependencies import PLUGIN, TOKEN_ENDPOINT, Watch
from .errors import BootError
from .plugin import NotSent, PluginClient, TokenUnavailable, Unavailable, Unreachable, probe_client
from .roles import Role
from .sharedcache import PROBE_REQUESTED, PROXY_ERRORS
from .streamgroup import group_info, redis_client

log = logging.getLogger(__name__)

BACKPRESSURE_INTERVAL = 1.0
PROBE_SECONDS = 10.0
PROBE_DOWN_SECONDS = 2.0
# A small GET that a NetBox busy with the workers' bulk requests may still answer slowly; not longer,
# since backpressure is decided between probes.
PROBE_READ_SECONDS = 15.0


class Refresher(Role):
    name = "refresher"

    def __init__(self, config, cache, limiter) -> None:
        super().__init__(config)
        self.cache, self.limiter = cache, limiter
        self.plugin: PluginClient  # boot() opens both
        self.redis: redis.Redis
        self.watches: dict[str, Watch] = {}
        self._next_probe = 0.0
        self._answered_failures = 0  # failed answers in a row (see _plugin_failed)
        self._next_branch = 0.0
        self._next_backpressure = 0.0
        self._behind = False

    def boot(self) -> None:
        self.plugin = probe_client(self.config, self.limiter, pacer=self, timeout=PROBE_READ_SECONDS)
        self.redis = self.closes(redis_client(self.config.redis.url, "refresher"))
        # For its heartbeat row (roles.py) and the dependency_health rows; opened lazily, so Postgres
        # being down does not stop the refresher from serving the branch.
        self.open_database()
        owned = [PLUGIN, TOKEN_ENDPOINT] if self.config.netbox.token_url else [PLUGIN]
        self.watches = {dependency: Watch(dependency, self.config.log.outage_reminder_seconds, db=lambda: self.db,
                                          publish=self._publish) for dependency in owned}
        try:
            self.cache.get("branch_known")
        except PROXY_ERRORS as exc:
            raise BootError(f"the shared cache is unreachable: {exc!r}") from exc

    def run_once(self) -> None:
        now = time.monotonic()
        if now >= self._next_probe or self._probe_requested():
            self._probe()
        if now >= self._next_backpressure:
            self._next_backpressure = now + BACKPRESSURE_INTERVAL
            self._check_backpressure()
        self.pause(0.2)

    # --- the plugin's health and default branch ---

    def _probe_requested(self) -> bool:
        if not self.cache.get(PROBE_REQUESTED):
            return False
        self.cache[PROBE_REQUESTED] = False
        self.plugin.tokens.invalidate()  # a worker may have failed to get a token: try the endpoint too
        return True

    def _probe(self) -> None:
        try:
            branch = self.plugin.default_branch()
        except NotSent:
            return  # stopping: no verdict
        except TokenUnavailable as exc:
            self.watches[TOKEN_ENDPOINT].failed(str(exc), exc.kind)
        except Unavailable as exc:
            self._plugin_failed(exc)
        else:
            self._answered_failures = 0
            for watch in self.watches.values():
                watch.ok()
            self._take_branch(branch)
        healthy = all(watch.up for watch in self.watches.values()) and not self._answered_failures
        self._next_probe = time.monotonic() + (PROBE_SECONDS if healthy else PROBE_DOWN_SECONDS)

    def _plugin_failed(self, exc: Unavailable) -> None:
        """The plugin could not be used. Nothing listening is down at once; an answer that is not one
        (5xx, a refused token, a page that is not the API, no answer in time) is down when the next
        probe, seconds later, gets no better: a busy NetBox's one slow or failed answer must not stop
        every worker. A 429 is an answer: the plugin is up, and the workers' own limiter copes."""
        if TOKEN_ENDPOINT in self.watches:
            self.watches[TOKEN_ENDPOINT].ok()  # the request got its token
        if exc.kind == diagnosis.RATE_LIMITED:
            self.watches[PLUGIN].ok()
            return
        self._answered_failures = 0 if isinstance(exc, Unreachable) else self._answered_failures + 1
        if self._answered_failures != 1:
            self.watches[PLUGIN].failed(str(exc), exc.kind)

    def _take_branch(self, branch: dict | None) -> None:
        known = self.cache.get("branch_known")
        if known and time.monotonic() < self._next_branch:
            return
        if not known or self.cache.get("branch") != branch:
            log.info("default branch: %s", f"{branch['name']} ({branch['id']})" if branch else "none (main)")
        self.cache.update(branch=branch, branch_known=True)
        self._next_branch = time.monotonic() + self.config.netbox.branch_refresh_seconds

    def _publish(self, dependency: str, outage: dict | None) -> None:
        """Tell the workers (and /readyz) that a dependency is down (`outage`) or up again (None)."""
        outages = dict(self.cache.get("outages") or {})
        if outage is None:
            outages.pop(dependency, None)
        else:
            outages[dependency] = outage
        self.cache["outages"] = outages

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
