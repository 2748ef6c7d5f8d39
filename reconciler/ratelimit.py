"""One request-rate limit for the plugin, shared by every worker process.

A token bucket in shared memory, created by the supervisor before it forks: N workers together
send at most `rate` requests per second (bursts of `burst`), which is what protects NetBox, rather
than N times the limit. CLOCK_MONOTONIC is system-wide, so every process refills the same bucket
by the same clock.

The bucket is guarded by a POSIX record lock (fcntl.lockf) on an unlinked temporary file that the
children inherit, not by a multiprocessing lock: the kernel releases a record lock when the process
holding it dies, so a worker killed inside the bucket cannot leave every other worker blocked for
ever. (Record locks belong to the process, not to the inherited descriptor, so each worker's lock
excludes the others'.) A process killed between the two stores leaves a bucket at most one token
off, which the next refill absorbs.
"""

from __future__ import annotations

import fcntl
import multiprocessing
import tempfile
import time
from contextlib import contextmanager
from typing import Callable, Iterator


class SharedRateLimiter:
    def __init__(self, rate: float, burst: int, context=multiprocessing.get_context("fork")) -> None:
        self.rate, self.burst = rate, burst
        self._bucket = context.RawArray("d", [float(burst), time.monotonic()])  # tokens, last refill
        self._lock_file = tempfile.TemporaryFile()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.lockf(self._lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self._lock_file, fcntl.LOCK_UN)

    def _take(self) -> float:
        """Take a token if there is one; otherwise the seconds until there will be."""
        with self._locked():
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
