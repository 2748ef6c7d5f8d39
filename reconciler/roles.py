"""The contract between the supervisor and the processes it forks.

A role (consumer, poll worker, branch refresher, drift checks) implements `boot()` and `run_once()`
(what boot opens through `open_database()` and `closes()` is closed by `shutdown()`); `serve()` runs
it in the child process with the same signal contract for all:

- SIGTERM: finish the iteration in progress, shut down, exit 0. A second SIGTERM exits at once
  (RET_KILLED). SIGINT and SIGHUP are the supervisor's business; children ignore them, since
  Ctrl-C reaches the whole process group.
- boot() failing exits RET_BOOT, so the supervisor can tell "cannot start" from "crashed".
- Every iteration touches a shared heartbeat; a child whose heartbeat stops is hung: the supervisor
  sends SIGABRT, on which faulthandler writes every thread's stack to stderr (the journal) and the
  process dies; SIGKILL follows if it did not.
- A child whose supervisor died exits instead of running on as an orphan.
"""

from __future__ import annotations

import ctypes
import faulthandler
import logging
import os
import signal
import sys
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import setproctitle

from . import errors, log as logsetup
from .db import Database
from .processes import report_alive
from .settings import Config

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
SUMMARY_INTERVAL = 60.0  # seconds between the summary lines of a role that logs what it did


@dataclass
class Link:
    """What a child process shares with its supervisor. Plain values in shared memory, read and written
    without locks: a child killed at any instruction cannot leave a lock held that the supervisor, or
    the child's successor, would wait on for ever.
    """

    heartbeat: Any  # c_double: time.monotonic() of the child's last sign of progress
    booted: Any  # c_bool: boot() succeeded
    request_until: Any  # c_double: time.time() until which a plugin request it sent may still run (0: none)
    sent: Any  # c_bool: a request went out for the rows it holds, and their outcome is not recorded yet
    token: str  # tells this process's claims apart from those of an earlier process with the same pid

    @classmethod
    def create(cls, context=None) -> Link:
        """Shared with children forked from `context`; None: values of this process only."""
        value = context.RawValue if context is not None else lambda code, initial: _CTYPES[code](initial)
        return cls(value("d", time.monotonic()), value("b", False), value("d", 0.0), value("b", False),
                   uuid.uuid4().hex[:12])


_CTYPES = {"d": ctypes.c_double, "b": ctypes.c_bool}
_Closable = TypeVar("_Closable")


class Role(ABC):
    """Base class of a process role. Subclasses implement boot and run_once; what boot opens through
    `open_database` and `closes` is closed at shutdown."""

    name = "role"
    db: Database | None = None  # the role's Postgres connection (open_database); carries its heartbeat row

    def __init__(self, config: Config) -> None:
        self.config = config
        self._to_close: list[Any] = []
        self._next_summary = time.monotonic() + SUMMARY_INTERVAL
        self._stop_requested = False
        self.link = Link.create()  # serve() replaces it with the one the supervisor shares
        self.parent: int | None = None  # the supervisor's pid, in a served process

    # --- implemented by roles ---

    def boot(self) -> None:
        """Connect and check dependencies. Raise to report a boot failure."""

    @abstractmethod
    def run_once(self) -> None:
        """One iteration; must return within about a second so a stop is noticed."""

    def shutdown(self) -> None:
        """Close what the role opened, newest first. Called once after the last iteration (or a
        failed boot)."""
        while self._to_close:
            resource = self._to_close.pop()
            try:
                resource.close()
            except Exception:
                logger.exception("closing %r failed", resource)

    # --- provided to roles ---

    def summary_due(self) -> bool:
        """True once every SUMMARY_INTERVAL: time for the role's "last 60 s: ..." line."""
        now = time.monotonic()
        if now < self._next_summary:
            return False
        self._next_summary = now + SUMMARY_INTERVAL
        return True

    def closes(self, resource: _Closable) -> _Closable:
        """Register a connection (anything with close()) to be closed at shutdown; returns it."""
        self._to_close.append(resource)
        return resource

    def open_database(self) -> Database:
        """The role's Postgres connection, named after the role in pg_stat_activity; it also writes
        the role's heartbeat row (`reconciler status`)."""
        self.db = self.closes(Database(self.config.postgres.dsn, self.config.postgres.schema,
                                       f"reconciler {self.name}"))
        return self.db

    @property
    def stopping(self) -> bool:
        return self._stop_requested

    def request_stop(self) -> None:
        self._stop_requested = True

    def beat(self) -> None:
        """Tell the supervisor this process is alive and making progress."""
        self.link.heartbeat.value = time.monotonic()

    def in_flight(self, until: float) -> None:
        """Tell the supervisor until when (time.time()) a plugin request this process sent may still run
        in NetBox (0: none): if this process dies, its claimed rows are not released before then."""
        self.link.request_until.value = until

    def orphaned(self) -> bool:
        """The supervisor is gone: this process stops instead of running on as an orphan."""
        if self.parent is None or os.getppid() == self.parent:
            return False
        if not self._stop_requested:
            logger.error("supervisor %d is gone; stopping", self.parent)
            self._stop_requested = True
        return True

    def pause(self, seconds: float) -> bool:
        """Sleep up to `seconds`, waking early on stop (the supervisor gone included: every wait for a
        dependency passes here); False when the role should stop."""
        deadline = time.monotonic() + seconds
        while not self._stop_requested and not self.orphaned():
            self.beat()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            time.sleep(min(remaining, 0.1))
        return False


def _install_child_signals(role: Role) -> None:
    first_term_at: float | None = None

    def on_term(signum, frame):
        # A stop signalled to the whole process group (kill -TERM -pgid, timeout(1)) reaches a child
        # twice: directly and forwarded by the supervisor. Only a later, separate SIGTERM means "now".
        nonlocal first_term_at
        if first_term_at is not None and time.monotonic() - first_term_at > 1.0:
            os._exit(errors.RET_KILLED)
        if first_term_at is None:
            first_term_at = time.monotonic()
        role.request_stop()

    signal.set_wakeup_fd(-1)  # the supervisor's wake-up socket is not ours
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # On SIGABRT (the supervisor's, for a hang) or a crash in C code, every thread's stack goes to
    # stderr (the journal) before the process dies; written from C, so it works while Python is stuck
    # in a C call (a blocked socket read).
    try:
        faulthandler.enable(all_threads=True)
    except (RuntimeError, ValueError, OSError, AttributeError) as exc:  # no usable stderr (started with 2>&-)
        logger.warning("no stack dump on a hang: faulthandler cannot write to stderr (%s)", exc)
    # The supervisor blocked these across fork so none is lost before our handlers exist.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _boot(role: Role) -> None:
    try:
        role.boot()
    except Exception as exc:
        logger.error("boot failed: %s", exc, exc_info=not isinstance(exc, errors.ReconcilerError),
                     extra={"event": "boot_failed"})
        _shutdown_quietly(role)
        sys.exit(errors.RET_BOOT)
    role.link.booted.value = True
    logger.info("booted", extra={"event": "booted"})


def _shutdown_quietly(role: Role) -> None:
    try:
        role.shutdown()
    except Exception:
        logger.exception("shutdown failed")


def _report_alive(role: Role) -> None:
    """The `processes` row `reconciler status` lists (between iterations: no transaction is open).
    Written at most every few seconds, and never raises: an outage is the role's to wait out."""
    if role.db is not None:
        report_alive(role.db, role.name)


def set_title(name: str) -> None:
    """`reconciler: worker 3` in ps, top and `systemctl status`, instead of N identical python lines."""
    setproctitle.setproctitle(f"reconciler: {name}")


def serve(factory: Callable[[Config], Role], config: Config, link: Link, parent: int) -> None:
    """Child-process entry point: run one role until it is told to stop.

    `parent` is the supervisor's pid as the supervisor knew it: read here with getppid(), it would
    already be 1 if the supervisor died between fork and this line, and the orphan would run on.
    """
    role = factory(config)
    set_title(role.name)
    logsetup.set_role(role.name)
    logsetup.setup(config.log.level, config.log.format)
    role.link, role.parent = link, parent
    _install_child_signals(role)
    role.beat()
    _boot(role)
    try:
        while not role.stopping:
            if role.orphaned():
                break
            _report_alive(role)
            role.run_once()
            role.beat()
    except Exception:
        logger.exception("crashed", extra={"event": "crashed"})
        _shutdown_quietly(role)
        sys.exit(errors.RET_KILLED)
    _shutdown_quietly(role)
    logger.info("stopped", extra={"event": "stopped"})
