"""The one backoff policy of the service: delays that double from `first` up to `cap`, jittered
(a uniform 50–100 %) where several processes may have failed together and must not retry in
lockstep: workers, consumers of several replicas, plugin requests.

Used for: a dependency down (consumer), a write conflict (consumer), a plugin request that failed
(plugin client), a row's next attempt (outcomes.RetryPolicy), a child's restart (supervisor, not
jittered: one process, and the delay is logged), the first default-branch fetch (refresher, likewise).
"""

from __future__ import annotations

import random


def delay(failures: int, first: float, cap: float, jitter: bool = True) -> float:
    """Seconds to wait after `failures` failures in a row (1: the first failure waits `first`)."""
    base = min(cap, first * 2 ** min(max(failures, 1) - 1, 30))
    return base * random.uniform(0.5, 1.0) if jitter else base


class Backoff:
    """A run of failures, and the wait before the next try."""

    def __init__(self, first: float, cap: float, jitter: bool = True) -> None:
        self.first, self.cap, self.jitter = first, cap, jitter
        self.failures = 0

    def next_delay(self) -> float:
        self.failures += 1
        return delay(self.failures, self.first, self.cap, self.jitter)
