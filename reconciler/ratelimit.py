"""One request-rate limit for the plugin, shared by every worker process.

A token bucket in shared memory, created by the supervisor before it forks: N workers together
send at most `rate` requests per second (bursts of `burst`), which is what protects NetBox, rather
than N times the limit. CLOCK_MONOTONIC is system-wide, so every process refills the same bucket
by the same clock.
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Callable


class SharedRateLimiter:
    def __init__(self, rate: float, burst: int, context=multiprocessing.get_context("fork")) -> None:
        self.rate, self.burst = rate, burst
        self._bucket = context.Array("d", [float(burst), time.monotonic()], lock=True)  # tokens, last refill

    def _take(self) -> float:
        """Take a token if there is one; otherwise the seconds until there will be."""
        with self._bucket.get_lock():
            now = time.monotonic()
            tokens = min(self.burst, self._bucket[0] + (now - self._bucket[1]) * self.rate)
            self._bucket[1] = now
            if tokens >= 1:
                self._bucket[0] = tokens - 1
                return 0.0
            self._bucket[0] = tokens
            return (1 - tokens) / self.rate

    def acquire(self, sleep: Callable[[float], object] = time.sleep) -> None:
        """Block until this process may send one request, or until `sleep` returns False (the caller
        is stopping, and checks that itself), without a token taken."""
        if self.rate <= 0:
            return  # unlimited
        while (wait := self._take()) > 0:
            if sleep(wait) is False:
                return
