"""State the supervisor creates before forking and its children share.

- the refresher's cache, a multiprocessing.Manager dict: the plugin's default branch, whether
  the consumer is behind (backpressure), the outages of the plugin and its token endpoint
  (dependencies.py), and PROBE_REQUESTED, set by a worker the plugin failed so that the refresher
  asks it at once. Workers read it once per batch (one IPC round trip).
- the plugin request-rate limiter (shared memory, see ratelimit.py).

The Manager runs as the supervisor's child, ignores SIGINT/SIGTERM (a stop signalled to the whole
process group must not take it down before the workers), and is shut down last. A worker that
finds the Manager gone exits (RET_KILLED) to be restarted, instead of retrying on a broken proxy.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import uuid
from dataclasses import dataclass
from multiprocessing.managers import DictProxy, SyncManager

from . import scratch
from .ratelimit import SharedRateLimiter
from .roles import set_title

# The one multiprocessing context of the service. Pinned to fork: the roles are handed to their
# processes as closures and live objects, and since Python 3.14 the default start method on Linux is
# forkserver, which would pickle them.
MP = multiprocessing.get_context("fork")

MANAGER_TITLE = "shared cache"  # the Manager's process title: `reconciler: shared cache`

PROBE_REQUESTED = "probe"

# Errors a proxy raises when the Manager process is gone.
PROXY_ERRORS = (BrokenPipeError, EOFError, ConnectionError, FileNotFoundError)


_PR_SET_PDEATHSIG = 1


def _manager_init(supervisor: int) -> None:
    """In the Manager process: ignore stop signals, and die with the supervisor.

    Stop signals sent to the whole process group must not take the Manager down before the workers
    have drained (they are shut down last, explicitly). But a SIGKILLed supervisor cannot shut it
    down at all, so the kernel is asked to kill it when its parent dies.
    """
    set_title(MANAGER_TITLE)  # its own line in ps and `systemctl status`
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != supervisor:  # the supervisor died before prctl took effect
        os._exit(1)


@dataclass(frozen=True)
class View:
    """One consistent read of the cache."""

    branch_known: bool  # False until the refresher got a first answer: until then, nothing is claimed
    branch: dict | None  # {"id": schema id, "name": ...} or None (no default branch)
    behind: bool  # the consumer is behind: workers pause
    outages: dict  # dependency -> {"since", "problem", "kind"} while the plugin or its token endpoint is down

    @property
    def branch_id(self) -> str | None:
        return self.branch["id"] if self.branch else None

    @property
    def branch_scope(self) -> str:
        """How change sets record the branch: "<name> (<id>)", or "" for main."""
        return f"{self.branch['name']} ({self.branch['id']})" if self.branch else ""


class Shared:
    """The Manager and its cache, and the rate limiter."""

    def __init__(self, rate: float, burst: int, address: str | None = None) -> None:
        """`address`: the Manager's Unix socket path (the supervisor's scratch directory, so nothing is
        left in the temp folder when the supervisor is killed); None for multiprocessing's own."""
        self.manager = SyncManager(address=address, ctx=MP)
        self.manager.start(_manager_init, (os.getpid(),))
        self.cache: DictProxy = self.manager.dict(branch_known=False, branch=None, behind=False, outages={})
        self.limiter = SharedRateLimiter(rate, burst, MP)

    @classmethod
    def for_config(cls, config) -> Shared:
        """The supervisor's: its Manager listens in the scratch directory, on a socket of its own (a
        killed Manager leaves its socket file behind, and the next one must not need that name)."""
        return cls(config.netbox.rate_limit_per_second, config.netbox.rate_limit_burst,
                   scratch.socket_path(f"m-{uuid.uuid4().hex[:8]}"))  # short: sun_path holds 107 bytes

    @property
    def sentinel(self) -> int:
        return self.manager._process.sentinel  # type: ignore[attr-defined]  # private; not in the stubs

    @property
    def alive(self) -> bool:
        return self.manager._process.is_alive()  # type: ignore[attr-defined]  # private; not in the stubs

    def shutdown(self) -> None:
        self.manager.shutdown()


def read(cache) -> View:
    """The cache as one View (raises one of PROXY_ERRORS when the Manager is gone)."""
    state = cache.copy()
    return View(state["branch_known"], state["branch"], state["behind"], state["outages"])
