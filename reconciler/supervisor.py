"""The supervisor: forks one process per role, keeps them running, stops them cleanly.

Signal handlers only record the signal; the main loop acts on it. The loop sleeps in
multiprocessing.connection.wait() on every child's sentinel plus a socket that the signal
wake-up fd writes to, so a child's death and a signal both wake it at once. Children are reaped
only through multiprocessing (Process.exitcode / join), never with waitpid(-1), which would steal
their exit status from multiprocessing.
"""

from __future__ import annotations

import enum
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

from . import backoff, errors, health, metrics, retention
from .consumer import Consumer
from .driftchecks import DriftChecks, holds_reobservations
from .refresher import Refresher
from .retention import Pruner
from .roles import STOP_SIGNALS, Link, Role, serve
from .settings import Config
from .sharedcache import MP, Shared
from .systemd import Notifier, status_line
from .worker import Worker, release_after_exit

log = logging.getLogger(__name__)

CRASH_WINDOW = 60.0  # seconds in which crashes of one child are counted
MAX_CRASHES = 5  # crashes within the window before the supervisor gives up
ABORT_GRACE = 2.0  # seconds from a hung child's SIGABRT (its stacks to the journal) to SIGKILL if it lives on


class Phase(enum.Enum):
    """Where the supervisor is in its life; every decision of its loop reads this one value."""

    STARTING = "starting"  # this generation's children are not all booted yet: READY=1 not sent
    RUNNING = "running"  # every child of this generation booted once
    RELOADING = "reloading"  # SIGHUP: draining the children to start them again with the new configuration
    STOPPING = "stopping"  # a stop signal: draining, then exit 0 if every child stopped cleanly
    GIVING_UP = "giving up"  # a child cannot be kept up: draining, then exit with `exit_code`


@dataclass(frozen=True)
class RoleSpec:
    """A process the supervisor keeps running: its name, how to build its role, and what to do once
    the process is gone (with its pid and Link) before it is restarted."""

    name: str
    factory: Callable[[Config], Role]
    after_exit: Callable[[int, Link], None] | None = None


@dataclass
class Child:
    spec: RoleSpec
    process: multiprocessing.process.BaseProcess | None = None
    link: Link = field(default_factory=Link.create)  # not shared until the first spawn replaces it
    boot_failures: int = 0
    crashes: deque = field(default_factory=deque)
    start_at: float = 0.0  # monotonic time of the next (re)start
    aborted_at: float | None = None  # when it was sent SIGABRT for hanging

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.exitcode is None


def service_roles(config: Config, shared: Shared) -> list[RoleSpec]:
    """The processes `reconciler run` keeps running: the consumer, the drift checks when it parks
    re-observations in CHECKING for them, retention unless everything is kept for ever, the read API
    unless [api] listen is off, and with workers the refresher."""
    specs = [RoleSpec("consumer", partial(Consumer, cache=shared.cache))]
    if holds_reobservations(config):
        specs.append(RoleSpec("drift-checks", DriftChecks))
    if retention.enabled(config):
        specs.append(RoleSpec("retention", Pruner))
    if config.api.listen:
        specs.append(RoleSpec("api", api_server))
    if config.workers.count > 0:
        specs.append(RoleSpec("refresher", partial(Refresher, cache=shared.cache, limiter=shared.limiter)))
        specs += [RoleSpec(f"worker {n}", partial(Worker, index=n, cache=shared.cache, limiter=shared.limiter),
                           after_exit=partial(release_after_exit, config, n))
                  for n in range(1, config.workers.count + 1)]
    return specs


def api_server(config: Config) -> Role:
    """The read API's role, its modules (gRPC's reflection, health, the generated code) imported in the
    child that serves. gRPC's core itself is imported everywhere (the SDK's modules import it), which
    fork tolerates as long as no channel or server exists before it: the only server is made here."""
    from .api.server import ApiServer

    return ApiServer(config)


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (perhaps the OOM killer)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {code}"


class Supervisor:
    """Keeps one process per role running, plus the Manager of the shared cache (see sharedcache.py)."""

    def __init__(self, config: Config, reload_config: Callable[[], Config] | None = None) -> None:
        self.config = config
        self.reload_config = reload_config
        self.shared: Shared | None = None
        self.children: list[Child] = []
        self._manager_deaths: deque = deque()
        self._signals: list[int] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self.phase = Phase.STARTING
        self.exit_code = errors.RET_OK  # what run() returns; set with GIVING_UP
        self._reload_pending = False  # a SIGHUP arrived during a drain: handled once the drain is over
        self.notifier = Notifier()
        # What the status line reports besides the children.
        self._restarts = 0
        self._rejected_reload: str | None = None  # why the last reload was refused, until one succeeds

    # --- signals ---

    def _record_signal(self, signum, frame) -> None:
        """Signal handler: only remember the signal; the loop acts on it."""
        self._signals.append(signum)

    def _install_signals(self) -> None:
        for sock in (self._wake_r, self._wake_w):
            sock.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._record_signal)

    def _take_signals(self) -> list[int]:
        try:
            while self._wake_r.recv(512):
                pass
        except BlockingIOError:
            pass
        taken, self._signals = self._signals, []
        return taken

    # --- the shared cache and the children that use it ---

    def _start_generation(self) -> None:
        """Start the Manager, then every child (they inherit the Manager's proxies)."""
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self.shared = Shared.for_config(self.config)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        self.children = [Child(spec) for spec in service_roles(self.config, self.shared)]
        self._spawn_due()

    def _stop_generation(self) -> bool:
        """Drain every child, then shut the Manager down: last, so no child loses it mid-batch."""
        clean = self._drain()
        if self.shared is not None:
            self.shared.shutdown()
            self.shared = None
        return clean

    def _check_manager(self) -> None:
        """A dead Manager invalidates every child's proxies: restart all of them with a new one."""
        if self.shared is None or self.shared.alive:
            return
        now = time.monotonic()
        self._manager_deaths.append(now)
        while self._manager_deaths and self._manager_deaths[0] < now - CRASH_WINDOW:
            self._manager_deaths.popleft()
        log.error("the shared cache's Manager died; restarting every process", extra={"event": "manager_died"})
        self.shared = None
        self._stop_generation()
        if len(self._manager_deaths) > MAX_CRASHES:
            log.error("the Manager died %d times within %.0f s; giving up", len(self._manager_deaths), CRASH_WINDOW,
                      extra={"event": "giving_up", "child": "shared cache"})
            self._give_up(errors.RET_CRASHLOOP)
            return
        if self.phase is not Phase.STOPPING:  # a stop signal may have come during that drain
            self._start_generation()

    # --- spawning ---

    def _spawn(self, child: Child) -> None:
        child.link = Link.create(MP)
        child.aborted_at = None
        child.process = MP.Process(target=serve, name=child.spec.name, daemon=True,
                                   args=(child.spec.factory, self.config, child.link, os.getpid()))
        # Blocked across fork so a signal cannot reach the child before its own handlers exist;
        # the child unblocks once they are installed.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            with health.FORK_LOCK:  # not while a readiness probe is inside a C library (health.py)
                child.process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        log.info("started %s (pid %d)", child.spec.name, child.process.pid,
                 extra={"event": "child_started", "child": child.spec.name, "child_pid": child.process.pid})

    def _spawn_due(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.process is None and child.start_at <= now:
                self._spawn(child)

    # --- reaping and restart policy ---

    def _reap(self) -> None:
        for child in self.children:
            if child.process is not None and child.process.exitcode is not None:
                self._on_exit(child)

    def _on_exit(self, child: Child) -> None:
        process, booted = child.process, child.link.booted.value
        assert process is not None and process.pid is not None  # reaped: it was started
        process.join()
        metrics.child_exited(process.pid)
        child.process = None
        log.warning("%s (pid %d) %s", child.spec.name, process.pid, describe_exit(process.exitcode),
                    extra={"event": "child_exited", "child": child.spec.name, "exit_code": process.exitcode})
        self._after_exit(child, process)
        delay = self._boot_failed(child) if not booted else self._crashed(child)
        if self.phase is not Phase.GIVING_UP:
            self._restarts += 1
            metrics.child_restarted(child.spec.name, booted, process.exitcode)
            log.info("restarting %s in %.1f s", child.spec.name, delay,
                     extra={"event": "restarting", "child": child.spec.name, "delay": delay})
            child.start_at = time.monotonic() + delay

    def _after_exit(self, child: Child, process) -> None:
        """The role's own clean-up once a process that did not stop cleanly is reaped (a worker's claims)."""
        if child.spec.after_exit is not None and process.exitcode != 0:
            try:
                child.spec.after_exit(process.pid, child.link)
            except Exception:
                log.exception("clean-up after %s (pid %d) failed", child.spec.name, process.pid)
            self.notifier.watchdog()  # it may wait for Postgres a few seconds

    def _boot_failed(self, child: Child) -> float:
        child.boot_failures += 1
        limit = self.config.supervisor.max_boot_failures
        if child.boot_failures >= limit:
            log.error("%s failed to boot %d times in a row; giving up", child.spec.name, child.boot_failures,
                      extra={"event": "giving_up", "child": child.spec.name})
            self._give_up(errors.RET_BOOT)
        return backoff.delay(child.boot_failures, 1.0, 30.0, jitter=False)

    def _crashed(self, child: Child) -> float:
        child.boot_failures = 0
        now = time.monotonic()
        child.crashes.append(now)
        while child.crashes and child.crashes[0] < now - CRASH_WINDOW:
            child.crashes.popleft()
        if len(child.crashes) > MAX_CRASHES:
            log.error("%s crashed %d times within %.0f s; giving up", child.spec.name, len(child.crashes), CRASH_WINDOW,
                      extra={"event": "giving_up", "child": child.spec.name})
            self._give_up(errors.RET_CRASHLOOP)
        return backoff.delay(len(child.crashes), 0.5, 10.0, jitter=False)

    def _give_up(self, exit_code: int) -> None:
        self.phase, self.exit_code = Phase.GIVING_UP, exit_code

    def _kill_hung(self) -> None:
        """A child that stopped beating is sent SIGABRT (faulthandler writes its stacks to the journal
        and it dies, roles.py), then SIGKILL if it still runs ABORT_GRACE seconds later (a stopped or
        uninterruptible process)."""
        timeout = self.config.supervisor.heartbeat_timeout_seconds
        now = time.monotonic()
        for child in self.children:
            if not child.running or now - child.link.heartbeat.value <= timeout:
                child.aborted_at = None  # beating again: a later hang gets its stack dump too
                continue
            assert child.process is not None  # running
            if child.aborted_at is None:
                log.error("%s (pid %d) made no progress for %.0f s; writing its stacks to the log, then killing it",
                          child.spec.name, child.process.pid, now - child.link.heartbeat.value,
                          extra={"event": "child_hung", "child": child.spec.name})
                child.aborted_at = now
                _signal(child.process, signal.SIGABRT)
            elif now - child.aborted_at >= ABORT_GRACE:
                _signal(child.process, signal.SIGKILL)

    # --- main loop ---

    def _wait(self) -> None:
        sentinels = [c.process.sentinel for c in self.children if c.process is not None]
        if self.shared is not None:
            sentinels.append(self.shared.sentinel)
        pending = [c.start_at for c in self.children if c.process is None]
        timeout = 1.0 if not pending else max(0.0, min(1.0, min(pending) - time.monotonic()))
        multiprocessing.connection.wait([self._wake_r, *sentinels], timeout=timeout)

    def run(self) -> int:
        """Run until a stop signal (exit 0 after a clean drain) or until a child cannot be kept up."""
        self._install_signals()
        # Metrics and health: the directory before the first fork, the endpoint in a thread of ours.
        metrics.prepare_directory(self.config)
        health.start_server(self.config, lambda: (self.config, getattr(self.shared, "cache", None)))
        try:
            self._start_generation()
            return self._loop()
        finally:
            signal.set_wakeup_fd(-1)
            if self.shared is not None:
                self.shared.shutdown()

    def _loop(self) -> int:
        while True:
            self._wait()
            earlier_drain_clean = True
            for signum in self._take_signals():
                if signum == signal.SIGHUP:
                    earlier_drain_clean = self._reload() and earlier_drain_clean
                elif self.phase is not Phase.STOPPING:
                    log.info("%s received; stopping", signal.Signals(signum).name,
                             extra={"event": "stop_requested"})
                    self.phase = Phase.STOPPING
            if self.phase is Phase.STOPPING:
                # A stop during a reload's drain: that drain's result counts for the exit code too.
                return self._stop(earlier_drain_clean)
            self._reap()
            self._check_manager()
            if self.phase is Phase.STOPPING:  # a stop came during the Manager's restart drain
                return self._stop()
            if self.phase is Phase.GIVING_UP:
                self._stop()
                return self.exit_code
            self._kill_hung()
            self._spawn_due()
            self._tell_systemd()

    # --- what systemd is told ---

    def _tell_systemd(self) -> None:
        """READY=1 once every child of this generation has booted, then a status line; the watchdog."""
        booted = sum(1 for c in self.children if c.running and c.link.booted.value)
        if self.phase is Phase.STARTING and booted == len(self.children):
            self.phase = Phase.RUNNING
            summary = self.summary()
            log.info("ready: %s", summary, extra={"event": "ready"})
            self.notifier.ready(summary)
        elif self.phase is Phase.RUNNING:
            self.notifier.status(self.summary())
        else:
            self.notifier.status(f"starting: {booted} of {len(self.children)} processes booted")
        self.notifier.watchdog()

    def summary(self) -> str:
        """The status line for `systemctl status` (systemd.status_line)."""
        running = [c.spec.name for c in self.children if c.running and c.link.booted.value]
        return status_line(running, len(self.children), self._restarts, self._rejected_reload)

    def _reload(self) -> bool:
        """SIGHUP: re-read the configuration and restart every child with it. Returns whether the
        drain was clean (True when nothing was drained); a stop signal during the drain leaves the
        phase STOPPING and no new children."""
        if self.phase in (Phase.STOPPING, Phase.GIVING_UP):
            return True
        if self.reload_config is None:
            log.warning("SIGHUP received but this supervisor has no configuration to reload")
            return True
        try:
            config = self.reload_config()
        except errors.ConfigError as exc:
            log.error("SIGHUP: new configuration rejected, keeping the running one: %s", exc,
                      extra={"event": "reload_rejected"})
            self._rejected_reload = str(exc)
            return True
        self._rejected_reload = None
        log.info("SIGHUP: configuration reloaded; restarting children", extra={"event": "reloading"})
        self.notifier.reloading()
        self.phase = Phase.RELOADING
        clean = self._stop_generation()
        if self.phase is Phase.STOPPING:
            return clean
        self.config = config
        self.phase = Phase.STARTING
        self._start_generation()
        return True

    # --- stopping ---

    def _stop(self, earlier_drain_clean: bool = True) -> int:
        """Drain every child within drain_seconds; exit code 0 only if all stopped cleanly (in this
        drain and in a reload's drain the stop interrupted)."""
        self.notifier.stopping()
        clean = self._stop_generation() and earlier_drain_clean
        log.info("stopped %s", "cleanly" if clean else "after killing children",
                 extra={"event": "stopped", "clean": clean})
        return errors.RET_OK if clean else errors.RET_KILLED

    def _drain(self) -> bool:
        running = [c for c in self.children if c.running]
        for child in running:
            _signal(child.process, signal.SIGTERM)
        deadline = time.monotonic() + self.config.supervisor.drain_seconds
        stop_seen = self.phase is Phase.STOPPING
        while any(c.running for c in running) and time.monotonic() < deadline:
            multiprocessing.connection.wait([self._wake_r, *(c.process.sentinel for c in running
                                                             if c.process is not None and c.running)],
                                            timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            self.notifier.watchdog()  # a drain may outlast WatchdogSec/2; the supervisor is not hung
            kill, stop_seen = self._stop_again(self._take_signals(), stop_seen)
            if kill:
                log.warning("second stop signal; killing children now")
                break
        clean = True
        # Children that died just before the stop too: their clean-up must run all the same.
        for child in [c for c in self.children if c.process is not None]:
            assert child.process is not None and child.process.pid is not None  # the filter above; started
            if child.running:
                log.error("%s (pid %d) did not stop in time; killing it", child.spec.name, child.process.pid)
                _signal(child.process, signal.SIGKILL)
            child.process.join()
            metrics.child_exited(child.process.pid)
            if any(child is stopped for stopped in running):
                clean = clean and child.process.exitcode == 0
            self._after_exit(child, child.process)
            child.process = None
        if self._reload_pending and self.phase not in (Phase.STOPPING, Phase.GIVING_UP):
            # The file may have changed again since this drain began: reload once more.
            self._reload_pending = False
            log.info("SIGHUP received while draining; reloading after it", extra={"event": "reload_queued"})
            self._signals.append(signal.SIGHUP)  # handled by the loop's next turn, like any signal
        return clean

    def _stop_again(self, signals: list[int], stop_seen: bool) -> tuple[bool, bool]:
        """While draining: (kill the children now, a stop was seen). A stop signal on top of a stop
        kills at once. The first stop during another drain (a reload's, the Manager's restart) makes
        the phase STOPPING, so that drain ends in a stop instead of new children; during a give-up's
        drain it is only noted (the exit code stays the give-up's). A SIGHUP waits for the drain's end."""
        for signum in signals:
            if signum == signal.SIGHUP:
                self._reload_pending = True
                continue
            if stop_seen:
                return True, True
            stop_seen = True
            if self.phase is not Phase.GIVING_UP:
                self.phase = Phase.STOPPING
            log.info("%s received while draining; stopping after the drain", signal.Signals(signum).name,
                     extra={"event": "stop_requested"})
        return False, stop_seen


def _signal(process, signum: int) -> None:
    try:
        os.kill(process.pid, signum)
    except ProcessLookupError:
        pass  # it exited between our check and the signal
