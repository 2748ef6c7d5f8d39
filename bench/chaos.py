"""The chaos suite: the real service, pushed and broken the way an operator's worst week would.

    .venv/bin/python bench/chaos.py --short          # the CI-sized run (a few minutes)
    .venv/bin/python bench/chaos.py                  # the full run: 20 kills per role, >= 50,000 entities
    .venv/bin/python bench/chaos.py --only worker-kill --only bad-input --keep

It starts a PostgreSQL cluster of its own (initdb in a temporary directory, a free loopback port,
fsync on) and a Redis server of its own (append-only, fsync on every write), so it can kill and
restart them without touching the machine's servers; a loopback plugin stand-in in a thread of
this process (bench/chaosparts.py: it models NetBox's state, counts every entity it is asked to
plan or apply, flags an entity sent while an earlier request carrying it is still in progress, and
answers 503, hangs, answers late or drops connections when told to); and the real `reconciler run`
and `reconciler-sample`. Each scenario gets a database, a stream and a stand-in of its own, does
its damage within bounds of time and count, waits (bounded) for the service to settle, stops it
with SIGTERM and checks:

- no loss: every entity pushed became a row (bad input: a dead letter, as many as expected);
- every entity reached the plugin's "NetBox" (applied), and none was sent while an earlier
  request carrying it was in progress (re-sends after that request ended are re-plans: allowed,
  counted apart);
- nothing stuck: no row QUEUED, APPLYING or PENDING_RETRY, no FAILED or ERRORED row, no entry
  pending in the consumer group, no lag, an empty stream;
- the service stops cleanly (exit 0) and leaves no process and no scratch directory behind.

One Markdown table row per scenario goes to stdout at the end, reasons for each FAIL below it;
progress goes to stderr. Exit status 0 only when every scenario passed.
"""

from __future__ import annotations

import argparse
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import brotli
from netboxlabs.diode.sdk.diode.v1 import ingester_pb2 as pb

from reconciler.streamentry import split_request

from chaosparts import (
    ERRORED, FAILED, NO_CHANGES, NOT_FINAL, ROOT, STATE_NAMES, VENV_BIN, HarnessError, Holder, Observer, PgCluster,
    Proc, Push, RedisServer, Service, StandIn, alive, futex_waiters, join_request, replace_field, say,
    semaphore_value, shared_semaphores, signal_proc, start_watchdog, tail, wait_for)

# How long the stand-in's NetBox may go on working on a request after it arrived, answered or not (its
# worker timeout): no handler runs longer. The service is told so ([netbox] server_timeout_seconds) when
# its code has that setting. Well above the read timeout (3 s), so a hang is one.
SERVER_TIMEOUT = 10.0
HUGE_ID = "18446744073709551614-1"  # a legal stream id above 2^63 - 1
CRASH_BUDGET = 5  # kills of one role per CRASH_WINDOW: the supervisor gives up after more than 5 crashes in 60 s
CRASH_WINDOW = 63.0
FEED_SHAPE = ["--devices-per-site", "4", "--ports-per-device", "20", "--vlans-per-site", "10",
              "--prefixes-per-site", "5", "--vms-per-site", "10"]  # 156 entities per site

# Settings of every scenario (RECONCILER_<KEY>); scenarios override some.
BASE_SETTINGS = {
    "WORKERS_COUNT": "2", "WORKERS_AUTO_APPLY": "true", "WORKERS_BATCH_SIZE": "100",
    "WORKERS_LEASE_SECONDS": "20", "WORKERS_RETRY_BASE_SECONDS": "1", "WORKERS_RETRY_MAX_SECONDS": "5",
    "NETBOX_TOKEN": "chaos-static-token", "NETBOX_TIMEOUT_SECONDS": "3", "NETBOX_MAX_ATTEMPTS": "3",
    "NETBOX_BRANCH_REFRESH_SECONDS": "30", "SUPERVISOR_DRAIN_SECONDS": "20",
    "SUPERVISOR_HEARTBEAT_TIMEOUT_SECONDS": "20", "REDIS_RECLAIM_IDLE_SECONDS": "10",
    "METRICS_LISTEN": "127.0.0.1:0", "LOG_LEVEL": "info",
}


@dataclass(frozen=True)
class Plan:
    """How much of everything: --short (CI) or the full run."""

    short: bool
    kills: int  # of the consumer, of a worker mid-batch, of the refresher, of workers contending for the limiter
    manager_kills: int
    supervisor_kills: int
    pg_crashes: int
    redis_restarts: int  # of each kind: graceful and kill -9
    sigterms: int
    slow_sigterms: int
    sites: int  # sites of 643 entities pushed up front by most scenarios
    feed_rate: float  # entities/s pushed while roles are killed
    outage: tuple[float, float, float]  # seconds of 503, hang, dropped connections
    settle: float  # seconds a scenario may take to settle


SHORT = Plan(short=True, kills=3, manager_kills=2, supervisor_kills=3, pg_crashes=2, redis_restarts=1, sigterms=2,
             slow_sigterms=2, sites=2, feed_rate=150.0, outage=(8.0, 10.0, 6.0), settle=60.0)
FULL = Plan(short=False, kills=20, manager_kills=20, supervisor_kills=21, pg_crashes=10, redis_restarts=5,
            sigterms=10, slow_sigterms=5, sites=6, feed_rate=60.0, outage=(60.0, 30.0, 20.0), settle=180.0)


# --- the suite: servers and code shared by the scenarios ---


class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.plan = SHORT if args.short else FULL
        self.root = Path(tempfile.mkdtemp(prefix="reconciler-chaos-"))
        os.chmod(self.root, 0o755)  # the postgres account must reach its directory below
        self.config = self.root / "empty.ini"  # settings come from the environment alone
        self.config.write_text("# chaos suite: every setting comes from RECONCILER_* variables\n")
        try:
            self.pg = PgCluster(self.root)
            self.redis = RedisServer(self.root)
        except HarnessError:
            shutil.rmtree(self.root, ignore_errors=True)
            raise
        self.pythonpath: str | None = None
        self._sites = 0
        self.server_timeout_setting = False
        self.live: list[Callable[[], None]] = []  # teardown of what scenarios started
        self.watchdog = None

    def _code_overlay(self, code: str) -> str:
        """Run reconciler from another source tree: its reconciler/ and sql/ copied side by side as the
        package (`reconciler.sql` is the sql/ directory), first on PYTHONPATH."""
        source = Path(code).resolve()
        overlay = self.root / "code"
        shutil.copytree(source / "reconciler", overlay / "reconciler")
        shutil.copytree(source / "sql", overlay / "reconciler" / "sql")
        return str(overlay)

    def start(self) -> None:
        say(f"working directory {self.root}")
        self.watchdog = start_watchdog(self.root)
        if self.args.code:
            self.pythonpath = self._code_overlay(self.args.code)
            say(f"reconciler runs from {self.args.code}")
        self.pg.init()
        self.pg.start()
        self.redis.start()
        say(f"own Postgres on 127.0.0.1:{self.pg.port} ({self.pg.bin.parent.name}), "
            f"own Redis on 127.0.0.1:{self.redis.port}")
        probe = subprocess.run([str(VENV_BIN / "reconciler"), "print-config", "--defaults"], capture_output=True,
                               text=True, env=self.base_env(self.root), cwd=ROOT, timeout=60)
        if probe.returncode != 0:
            raise HarnessError(f"reconciler print-config failed ({probe.returncode}): {probe.stderr.strip()[-1500:]}")
        self.server_timeout_setting = "server_timeout_seconds" in probe.stdout
        say("[netbox] server_timeout_seconds: " + (f"set to {SERVER_TIMEOUT:g} s" if self.server_timeout_setting
                                                    else "not a setting of this code; not set"))

    def ensure_servers(self) -> None:
        if not self.pg.running:
            say("Postgres was down; starting it")
            self.pg.start()
        if not self.redis.running:
            say("Redis was down; starting it")
            self.redis.start()

    def next_sites(self, count: int) -> int:
        """A site index no earlier push used, so every pushed entity is new."""
        first = self._sites
        self._sites += count
        return first

    def base_env(self, tmpdir: Path) -> dict[str, str]:
        drop = ("RECONCILER_", "PROMETHEUS_MULTIPROC_DIR", "CREDENTIALS_DIRECTORY", "RUNTIME_DIRECTORY",
                "NOTIFY_SOCKET", "WATCHDOG_", "PYTHONPATH")
        env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        env["TMPDIR"] = str(tmpdir)
        if self.pythonpath:
            env["PYTHONPATH"] = self.pythonpath
        return env

    def close(self) -> None:
        for teardown in reversed(self.live):
            try:
                teardown()
            except Exception:  # noqa: BLE001 - teardown goes on whatever one part does
                pass
        self.live.clear()
        self.redis.stop()
        self.pg.stop()
        if self.watchdog is not None:
            self.watchdog.done()
        if self.args.keep:
            say(f"kept {self.root} (logs under scenarios/)")
        else:
            shutil.rmtree(self.root, ignore_errors=True)


# --- one scenario's world ---


class KillBudget:
    """Kills per role within a minute, below the supervisor's crash limit (it gives up after more)."""

    def __init__(self) -> None:
        self.times: dict[str, deque] = {}

    def wait(self, role: str) -> float:
        times = self.times.setdefault(role, deque())
        now = time.monotonic()
        while times and times[0] < now - CRASH_WINDOW:
            times.popleft()
        return 0.0 if len(times) < CRASH_BUDGET else times[0] + CRASH_WINDOW - now

    def spend(self, role: str) -> None:
        self.times.setdefault(role, deque()).append(time.monotonic())


@dataclass
class Row:
    name: str
    pushed: int = 0
    rows: int = 0
    applied: int = 0
    resent: int = 0
    overlapping: int = 0
    replans: int = 0
    stuck: int = 0
    failed_errored: int = 0
    dead_letters: str = "0"
    pending: str = "0"
    exit: str = ""
    verdict: str = "FAIL"
    seconds: float = 0.0
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Ctx:
    """A scenario's database, stream, stand-in, services and bookkeeping."""

    def __init__(self, suite: Suite, name: str, settings: dict[str, str] | None = None) -> None:
        self.suite, self.name, self.plan = suite, name, suite.plan
        self.dir = suite.root / "scenarios" / name
        self.tmp = self.dir / "tmp"
        self.tmp.mkdir(parents=True)
        self.log = self.dir / "service.log"
        self.database = "chaos_" + re.sub(r"\W", "_", name)
        suite.pg.admin(f"DROP DATABASE IF EXISTS {self.database}")
        suite.pg.admin(f"CREATE DATABASE {self.database}")
        self.stream = f"chaos.{name}"
        self.settings = {**BASE_SETTINGS, **(settings or {})}
        server_timeout = float(self.settings.pop("NETBOX_SERVER_TIMEOUT_SECONDS", SERVER_TIMEOUT))
        if suite.server_timeout_setting:
            self.settings["NETBOX_SERVER_TIMEOUT_SECONDS"] = f"{server_timeout:g}"
        # No request runs in the stand-in longer than the service is told NetBox may work on one (a little
        # less, so that a re-send right at the limit is not taken for an overlap).
        self.standin = StandIn(server_limit=server_timeout - 0.5)
        suite.live.append(self.standin.close)
        self.obs = Observer(suite.pg.dsn(self.database), suite.redis.url, self.stream)
        self.env = suite.base_env(self.tmp)
        self.env.update({f"RECONCILER_{key}": value for key, value in self.settings.items()})
        self.env.update(RECONCILER_POSTGRES_DSN=suite.pg.dsn(self.database), RECONCILER_REDIS_URL=suite.redis.url,
                        RECONCILER_REDIS_STREAM=self.stream, RECONCILER_NETBOX_URL=self.standin.url)
        self.services: list[Service] = []
        self.pushed = 0
        self.expected_dead_letters = 0
        self.budget = KillBudget()
        self.problems: list[str] = []
        self.notes: list[str] = []
        self._feeder: Feeder | None = None
        self.settled_states = None

    @property
    def roles(self) -> set[str]:
        count = int(self.settings["WORKERS_COUNT"])
        return {"consumer"} | ({"refresher"} | {f"worker {n}" for n in range(1, count + 1)} if count else set())

    # --- services ---

    def start_service(self, label: str | None = None) -> Service:
        label = label or f"{self.name} service {len(self.services) + 1}"
        service = Service(label, self.env, self.log, self.suite.config)
        self.services.append(service)
        self.suite.live.append(service.kill_group)
        service.start()
        service.wait_ready(self.roles)
        return service

    def restart(self, service: Service) -> None:
        service.start()
        service.wait_ready(self.roles)

    def stop(self, service: Service, why: str) -> int | None:
        """SIGTERM and wait; a non-zero exit or a hang is a problem."""
        drain = float(self.settings["SUPERVISOR_DRAIN_SECONDS"])
        code = service.stop(drain + 20)
        if code != 0:
            what = "did not exit" if code is None else f"exited with {code}"
            self.problems.append(f"{service.label} {what} on SIGTERM ({why})")
        return code

    def wait_roles(self, service: Service, gone: set[int] = frozenset(), min_age: float = 1.5,
                   timeout: float = 60.0) -> bool:
        """Until every role runs again, none of them a process in `gone`, each for at least min_age s."""
        def ready():
            if not service.running:
                return True  # nothing to wait for
            current = service.roles()
            return self.roles <= set(current) and not any(p.pid in gone for p in current.values()) and \
                all(_age(p) >= min_age for p in current.values())
        if wait_for(ready, timeout, 0.1) and service.running:
            return True
        if not service.running:
            self.problems.append(f"{service.label} exited with {service.proc.returncode} "
                                 f"({_last_error(service.log)})")
        else:
            self.problems.append(f"{service.label}: not every role came back within {timeout:.0f} s "
                                 f"(running: {sorted(service.roles())})")
        return False

    def kill_role(self, service: Service, role: str) -> Proc | None:
        """SIGKILL one role's process, within the crash budget; the process killed, or None."""
        delay = self.budget.wait(role)
        if delay > 0:
            if delay >= 1:
                say(f"  waiting {delay:.0f} s so that {role} stays within the supervisor's crash limit")
            time.sleep(delay)
        proc = service.roles().get(role)
        if proc is None or not signal_proc(proc, signal.SIGKILL):
            self.notes.append(f"{role} was not running when it was to be killed")
            return None
        self.budget.spend(role)
        return proc

    # --- input ---

    def push(self, sites: int = 1, **options) -> int:
        """Push `sites` new sites with reconciler-sample and wait; the entities pushed."""
        entities = self.start_push(sites, **options).wait()[1]
        self.pushed += entities
        return entities

    def start_push(self, sites: int = 1, stream: str | None = None, **options) -> Push:
        env = self.suite.base_env(self.tmp)
        return Push(self.suite.redis.url, stream or self.stream, self.suite.config,
                    self.suite.next_sites(sites), sites, env=env, **options)

    def feed(self, rate: float) -> Feeder:
        """Keep pushing small sites at `rate` entities/s in the background until stop_feeding()."""
        self._feeder = Feeder(self, rate)
        return self._feeder

    def stop_feeding(self, now: bool = False) -> None:
        if self._feeder is not None:
            self.pushed += self._feeder.stop(now)
            self._feeder = None

    # --- the end ---

    def settle(self, timeout: float) -> bool:
        """Until no row is in a non-final state, nothing is pending or unread in the group, the stream
        is empty and the stand-in handles no request, three times in a row (bounded)."""
        stable, deadline = 0, time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.services and not any(s.running for s in self.services):
                self.problems.append("no service was running while waiting to settle")
                return False
            states = self.obs.states()
            pending, lag, length = self.obs.stream_state()
            done = states is not None and not any(states[s] for s in NOT_FINAL) and pending == 0 \
                and not lag and length == 0 and self.standin.busy == 0
            stable = stable + 1 if done else 0
            if stable >= 3:
                return True
            time.sleep(0.5)
        return False

    def finish(self, settle_timeout: float | None = None) -> tuple[bool, list[int | None]]:
        self.stop_feeding()
        self.standin.disarm()
        started = time.monotonic()
        settled = self.settle(settle_timeout or self.plan.settle)
        self.settled_states = self.obs.states()  # before the stop gives anything back
        if not settled:
            self.problems.append(f"did not settle within {settle_timeout or self.plan.settle:.0f} s")
        else:
            self.notes.append(f"settled {time.monotonic() - started:.0f} s after the last fault")
        codes = [self.stop(service, "final stop") for service in self.services if service.running]
        leftovers = [p.name for p in self.tmp.iterdir() if p.is_dir()]
        if leftovers:
            self.problems.append(f"{len(leftovers)} scratch directories left in the service's temp folder "
                                 f"after the final stop: {', '.join(sorted(leftovers)[:5])}")
        return settled, codes


def _age(proc: Proc) -> float:
    with open("/proc/uptime") as handle:
        uptime = float(handle.read().split()[0])
    return uptime - proc.start / os.sysconf("SC_CLK_TCK")


def _last_error(log: Path) -> str:
    """The last errors the log shows: exception lines and ERROR lines, the last three."""
    found = tail(log, 3, r" (ERROR|CRITICAL) |^[A-Za-z_.]*(Error|Exception|Exit)\b")
    return " | ".join(line.strip()[:200] for line in found.splitlines()) or "no error logged"


class Feeder:
    """reconciler-sample runs of one small new site each, back to back at `rate` entities/s."""

    def __init__(self, ctx: Ctx, rate: float) -> None:
        self.ctx, self.rate = ctx, rate
        self.entities = 0
        self.error: str | None = None
        self._push: Push | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="feeder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._push = self.ctx.start_push(1, rate=self.rate, rate_unit="entities", extra=FEED_SHAPE)
                self.ctx.suite.live.append(self._push.kill)
                self.entities += self._push.wait()[1]
            except HarnessError as exc:
                if not self._stop.is_set():
                    self.error = str(exc)
                return

    def stop(self, now: bool = False) -> int:
        """Stop after the site being pushed (a push is never cut short: its count must be exact), or at
        once when the suite is interrupted."""
        self._stop.set()
        if now and self._push is not None:
            self._push.kill()
        self._thread.join(120)
        if self.error:
            self.ctx.problems.append(f"the producer failed: {self.error}")
        return self.entities


# --- scenarios ---


def _kill_while_fed(ctx: Ctx, role: str) -> None:
    """kill -9 of `role` again and again while the stream is fed."""
    service = ctx.start_service()
    ctx.push(ctx.plan.sites)
    ctx.feed(ctx.plan.feed_rate)
    for _ in range(ctx.plan.kills):
        time.sleep(random.uniform(1.0, 3.0))
        killed = ctx.kill_role(service, role)
        if killed and not ctx.wait_roles(service, {killed.pid}):
            return
    time.sleep(2)


def consumer_kill(ctx: Ctx) -> None:
    """kill -9 of the consumer while the stream is fed; its pending entries are taken over."""
    _kill_while_fed(ctx, "consumer")


def worker_kill(ctx: Ctx) -> None:
    """kill -9 of the worker whose bulk request the stand-in is handling (held 1.5 s): mid-batch."""
    service = ctx.start_service()
    ctx.feed(ctx.plan.feed_rate)
    ctx.push(ctx.plan.sites)
    hits: queue.Queue = queue.Queue()
    kills, misses = 0, 0
    while kills < ctx.plan.kills and misses < 10:
        ctx.standin.arm(1.5, hits.put)
        try:
            rows = hits.get(timeout=30)
        except queue.Empty:
            ctx.standin.disarm()
            ctx.notes.append("no bulk request arrived within 30 s to kill its worker")
            misses += 1
            continue
        owner = ctx.obs.lease_owner(rows) or ""
        match = re.match(r"[^:]*:(\d+):worker-(\d+)", owner)
        target = next((p for p in service.roles().values() if match and p.pid == int(match[1])), None)
        if target is None:
            misses += 1
            ctx.notes.append(f"the worker holding rows {rows[:3]} was not found (owner {owner!r})")
            continue
        if ctx.budget.wait(target.role) > 0:
            continue  # this worker was killed often enough this minute: another request, maybe the other's
        if signal_proc(target, signal.SIGKILL):
            ctx.budget.spend(target.role)
            kills += 1
            if not ctx.wait_roles(service, {target.pid}, min_age=1.0):
                return
            time.sleep(random.uniform(0.5, 2.0))
    if kills < ctx.plan.kills:
        ctx.problems.append(f"only {kills} of {ctx.plan.kills} workers could be killed mid-batch")
    ctx.notes.append(f"{kills} workers killed while the plugin handled their batch")


def refresher_kill(ctx: Ctx) -> None:
    """kill -9 of the branch refresher (it also measures backpressure) while rows flow."""
    _kill_while_fed(ctx, "refresher")


def manager_kill(ctx: Ctx) -> None:
    """kill -9 of the shared cache's Manager: the supervisor restarts every process."""
    service = ctx.start_service()
    ctx.push(ctx.plan.sites)
    ctx.feed(ctx.plan.feed_rate)
    for _ in range(ctx.plan.manager_kills):
        time.sleep(random.uniform(1.0, 3.0))
        delay = ctx.budget.wait("manager")
        if delay > 0:
            if delay >= 1:
                say(f"  waiting {delay:.0f} s so that the Manager stays within the supervisor's crash limit")
            time.sleep(delay)
        manager = service.manager()
        if manager is None:
            ctx.problems.append(f"the Manager could not be told apart among the supervisor's children "
                                f"({[p.title for p in service.roles().values()]})")
            return
        before = {p.pid for p in service.roles().values()}
        signal_proc(manager, signal.SIGKILL)
        ctx.budget.spend("manager")
        # every role restarts with a new Manager
        if not ctx.wait_roles(service, before, min_age=1.0, timeout=90):
            return
        if not wait_for(lambda: (m := service.manager()) is not None and m.pid != manager.pid, 30):
            ctx.problems.append("no new Manager after the old one was killed")
            return
    time.sleep(2)


def supervisor_kill(ctx: Ctx) -> None:
    """kill -9 of the supervisor, in turn while all is well, while Redis is down and while Postgres is
    down (children then wait in retry loops): none of its processes may outlive it by 10 s; then the
    server is started again, and the service."""
    service = ctx.start_service()
    ctx.push(ctx.plan.sites)
    orphans: dict[str, list[str]] = {}  # circumstances -> processes that outlived their supervisor
    for n in range(ctx.plan.supervisor_kills):
        down = (None, "Redis", "Postgres")[n % 3]
        if down != "Redis":  # the producer needs Redis
            ctx.feed(ctx.plan.feed_rate)
        time.sleep(random.uniform(1.0, 3.0))
        if down == "Redis":
            ctx.suite.redis.kill()
        elif down == "Postgres":
            ctx.suite.pg.crash(signal.SIGQUIT)
        if down:
            time.sleep(2.0)  # the children notice and retry
        before = service.kill9()
        if not wait_for(lambda: not any(alive(p) for p in before), 10.0, 0.1):
            lingering = [p for p in before if alive(p)]
            when = f"while {down} was down" if down else "with Redis and Postgres up"
            orphans.setdefault(when, []).extend(f"{p.title} ({p.pid})" for p in lingering)
            for proc in lingering:
                signal_proc(proc, signal.SIGKILL)
        ctx.stop_feeding()
        ctx.suite.ensure_servers()
        ctx.restart(service)
    for when, lingering in orphans.items():
        ctx.problems.append(f"{len(lingering)} processes outlived their supervisor, killed {when}, by more than "
                            f"10 s: {', '.join(lingering[:4])}{' ...' if len(lingering) > 4 else ''}")
    ctx.notes.append(f"supervisor killed {ctx.plan.supervisor_kills} times, a third each with all up, with Redis "
                     f"down, with Postgres down" + ("" if orphans else "; its processes were gone within 10 s"))


def postgres_crash(ctx: Ctx) -> None:
    """Postgres crashes (SIGQUIT of the postmaster) right after a claim: as soon as the stand-in sees a
    bulk request arrive, whose answer it holds back 5 s; then Postgres is started again."""
    service = ctx.start_service()
    pg = ctx.suite.pg
    for _ in range(ctx.plan.pg_crashes):
        crashed = threading.Event()
        latency: list[float] = []

        def on_request(rows: list[str]) -> None:
            started = time.monotonic()
            pg.crash(signal.SIGQUIT)
            latency.append(time.monotonic() - started)
            crashed.set()

        ctx.standin.arm(5.0, on_request)
        ctx.push(1)
        if not crashed.wait(30):
            ctx.standin.disarm()
            ctx.problems.append("no bulk request arrived within 30 s to crash Postgres on")
            break
        pg.start()
        say(f"  Postgres crashed right after a claim ({latency[0] * 1000:.0f} ms to stop) and restarted")
        wait_for(lambda: ctx.standin.busy_bulk == 0, 20)  # the held request ends
        if not ctx.wait_roles(service, min_age=0.0):
            return
        time.sleep(2)
    ctx.notes.append(f"{ctx.plan.pg_crashes} Postgres crashes right after a claim")


def redis_restart(ctx: Ctx) -> None:
    """Redis restarted while the consumer ingests: SHUTDOWN (graceful), then kill -9, alternately."""
    service = ctx.start_service()
    server = ctx.suite.redis
    lags = []
    for n in range(2 * ctx.plan.redis_restarts):
        graceful = n % 2 == 0
        ctx.push(ctx.plan.sites, per_request=10)  # many small entries: one transaction each
        pending, lag, length = ctx.obs.stream_state()
        lags.append(length or 0)
        if graceful:
            server.shutdown()
        else:
            server.kill()
        time.sleep(random.uniform(0.5, 2.0))
        server.start()
        say(f"  Redis {'shut down' if graceful else 'killed (-9)'} with {length} entries in the stream; restarted")
        if not ctx.wait_roles(service, min_age=0.0):
            return
        time.sleep(2)
    busy = sum(1 for length in lags if length)
    ctx.notes.append(f"{len(lags)} Redis restarts, {busy} while entries were still in the stream "
                     f"(entries then: {lags})")
    if not busy:
        ctx.problems.append("the consumer had always finished before Redis went down: not a restart during ingest")


def sigterm_load(ctx: Ctx) -> None:
    """SIGTERM while rows flow (children finish their batch), then started again at once."""
    service = ctx.start_service()
    ctx.push(ctx.plan.sites)
    ctx.feed(4 * ctx.plan.feed_rate)
    for n in range(ctx.plan.sigterms):
        time.sleep(random.uniform(2.0, 4.0))
        ctx.stop(service, f"under load, stop {n + 1}")
        ctx.restart(service)
    time.sleep(2)


def sigterm_slow(ctx: Ctx) -> None:
    """SIGTERM while the plugin is slower than the read timeout (a batch of 100 takes 8 s), then started
    again at once: the rows given back must not be re-sent while the first request still runs."""
    service = ctx.start_service()
    ctx.standin.fault("late", 3600, per_entity=0.08)
    ctx.push(ctx.plan.sites)
    for n in range(ctx.plan.slow_sigterms):
        if not wait_for(lambda: ctx.standin.busy_bulk > 0, 30):
            ctx.problems.append("no bulk request in progress to stop the service during")
            break
        time.sleep(1.0)
        ctx.stop(service, f"with a slow plugin, stop {n + 1}")
        ctx.restart(service)
    time.sleep(5)
    ctx.standin.heal()


def slow_plugin(ctx: Ctx) -> None:
    """The plugin slower than the read timeout for a batch of 100 (5 s against 3 s) but not for 50 or 25."""
    ctx.start_service()
    ctx.standin.fault("late", ctx.plan.settle + 60, per_entity=0.05)
    ctx.push(1 if ctx.plan.short else 3)


def outage(ctx: Ctx) -> None:
    """The plugin answers 503, then hangs (answers nothing until NetBox's own timeout), then drops
    connections, each for a period, while the stream is fed; then it is healthy again."""
    ctx.start_service()
    ctx.feed(ctx.plan.feed_rate)
    time.sleep(3)
    for kind, seconds in zip(("503", "hang", "drop"), ctx.plan.outage):
        say(f"  plugin: {kind} for {seconds:.0f} s")
        ctx.standin.fault(kind, seconds)
        time.sleep(seconds)
    ctx.standin.heal()
    say("  plugin: healthy again")
    ctx.notes.append("stand-in answers: " + ", ".join(f"{n} {k}" for k, n in
                                                       sorted(ctx.standin.summary()["outcomes"].items())))


def two_supervisors(ctx: Ctx) -> None:
    """Two services on one stream and one database, side by side (two replicas)."""
    first = ctx.start_service("supervisor A")
    ctx.start_service("supervisor B")
    ctx.push(ctx.plan.sites)
    ctx.feed(ctx.plan.feed_rate)
    time.sleep(8 if ctx.plan.short else 60)
    # one replica loses a worker mid-flight: its rows are the other's to finish too
    killed = ctx.kill_role(first, "worker 1")
    if killed:
        ctx.wait_roles(first, {killed.pid})
    time.sleep(3)


def bad_input(ctx: Ctx) -> None:
    """Malformed entries interleaved with valid ones, and an entry with a stream id above 2^63 - 1
    followed by normal entries: the valid entities must become rows, each bad one a dead letter."""
    ctx.start_service()
    client = ctx.suite.redis.client()
    try:
        scratch = f"{ctx.stream}.scratch"  # valid requests of the real producer, to break or to send by hand
        ctx.start_push(1, stream=scratch, per_request=25, brotli="off").wait()
        raw = [fields[b"request"] for _, fields in client.xrange(scratch)]
        client.delete(scratch)
        before, after, dead, valid = _bad_entries(raw)
        ctx.push(1, per_request=25)
        for fields in before:
            client.xadd(ctx.stream, fields)
        ctx.push(1, per_request=25)
        client.xadd(ctx.stream, after[0], id=HUGE_ID)  # legal: each part of an id may reach 2^64 - 1
        for fields in after[1:]:
            client.xadd(ctx.stream, fields)  # auto ids: above the huge one too
        ctx.push(1, per_request=25)
        ctx.pushed += valid
        ctx.expected_dead_letters = dead
        ctx.notes.append(f"{dead} malformed entries or entities and {valid} valid entities sent by hand between "
                         f"3 sample sites; the entries from id {HUGE_ID} on have ids above 2^63 - 1")
    finally:
        client.close()


def _bad_entries(raw: list[bytes]) -> tuple[list[dict], list[dict], int, int]:
    """Stream entries built from valid requests: (those to send before the huge id, those from the huge
    id on (the first gets it), dead letters expected, valid entities among them)."""
    ts = str(time.time_ns()).encode()
    header = [split_request(r)[0] for r in raw]
    entities = [split_request(r)[1] for r in raw]
    # whole entries that cannot be read: one dead letter each
    whole = [
        {b"request": b"\x00\x01garbage\xff\xfe", b"ingestion_ts": ts},
        {b"ingestion_ts": ts, b"note": b"no request field"},
        {b"request": raw[0]},  # no ingestion_ts
        {b"request": b"this is not brotli", b"encoding": b"br", b"ingestion_ts": ts},
        {b"request": raw[1], b"encoding": b"zstd", b"ingestion_ts": ts},
        {b"request": raw[2], b"ingestion_ts": b"yesterday"},
        {b"request": raw[3][:-3], b"ingestion_ts": ts},  # truncated inside its last entity
        {b"request": header[4], b"ingestion_ts": ts},  # no entities
        {b"request": join_request(header[8], (entities[8] * 3)[:60]), b"ingestion_ts": ts},  # > max_entities (50)
        {b"request": b"\x0a" + b"\x00" * 70_000, b"ingestion_ts": ts},  # > max_request_bytes (64 KiB)
        {b"request": brotli.compress(b"\x00" * 300_000), b"encoding": b"br", b"ingestion_ts": ts},  # a bomb
    ]
    # one bad entity among good ones: a dead letter each, the others become rows
    untyped = entities[5][:1] + [b""] + entities[5][1:]
    undecodable = entities[6][:2] + [b"\xff\xff\xff"] + entities[6][2:]
    unknown_kind = entities[7] + [b"\xb8\x3e\x01"]  # Entity field 999: a kind from a newer SDK
    mixed = [join_request(header[5], untyped), join_request(header[6], undecodable),
             join_request(header[7], unknown_kind)]
    # request-level oddities that must cost no entity (the metadata is cleaned, the entities kept)
    nul_producer = pb.IngestRequest.FromString(raw[9])
    nul_producer.producer_app_name = "device-disc\x00overy"
    long_id = pb.IngestRequest.FromString(raw[10])
    long_id.id = "r" * 300
    not_utf8 = join_request(replace_field(header[11], 4, b"\xff\xfediscovery"), entities[11])
    oddities = [nul_producer.SerializeToString(), long_id.SerializeToString(), not_utf8]

    def entry(request: bytes, compress: bool = False) -> dict:
        if compress:
            return {b"request": brotli.compress(request, quality=1), b"encoding": b"br", b"ingestion_ts": ts}
        return {b"request": request, b"ingestion_ts": ts}

    before = whole[:6] + [entry(mixed[0]), entry(oddities[0], True), entry(mixed[1]), entry(oddities[1])] \
        + whole[6:] + [entry(mixed[2], True), entry(oddities[2])]
    after = [entry(raw[12]), entry(b"\x00garbage after the huge id"), entry(raw[13], True),
             {b"request": b"not brotli either", b"encoding": b"br", b"ingestion_ts": ts}]
    dead = len(whole) + len(mixed) + 2
    valid = sum(len(entities[i]) for i in (5, 6, 7, 9, 10, 11, 12, 13))
    return before, after, dead, valid


def shared_lock(ctx: Ctx) -> None:
    """Workers contend for the shared rate limiter (4 requests/s) and are killed again and again; then
    its lock is taken by a process that is killed while it holds it, as a worker killed inside
    acquire() leaves it. The other workers must keep going."""
    service = ctx.start_service()
    ctx.push(ctx.plan.sites)
    ctx.feed(2 * ctx.plan.feed_rate)
    kills = 0
    for _ in range(ctx.plan.kills):
        time.sleep(random.uniform(0.5, 2.0))
        role = random.choice(sorted(r for r in ctx.roles if r.startswith("worker")))
        killed = ctx.kill_role(service, role)
        if killed:
            kills += 1
            if not ctx.wait_roles(service, {killed.pid}, min_age=0.5):
                return
    ctx.notes.append(f"{kills} workers killed while contending for the rate limiter")
    _lock_left_held(ctx, service)
    time.sleep(10)


def _lock_left_held(ctx: Ctx, service: Service) -> None:
    """Find the process-shared semaphore the workers block on while it is held, take it from a helper
    process and kill the helper: the lock stays held by a dead process."""
    workers = [p.pid for role, p in service.roles().items() if role.startswith("worker")]
    sems = {pid: shared_semaphores(pid) for pid in workers}
    common = set.intersection(*({s.inode for s in found} for found in sems.values())) if workers else set()
    candidates = [s for s in sorted(sems[workers[0]], key=lambda s: s.inode) if s.inode in common] if workers else []
    for sem in candidates[:8]:
        if semaphore_value(sem) != 1:
            continue
        holder = Holder(sem)
        ctx.suite.live.append(holder.kill)
        if not holder.held:
            continue
        blocked = wait_for(lambda: futex_waiters(workers, sems, sem.inode), 4.0, 0.05)
        if blocked:
            holder.kill()
            say(f"  the workers' shared lock (semaphore inode {sem.inode}) is now held by a killed process; "
                f"{len(blocked)} worker(s) were waiting for it")
            ctx.notes.append(f"shared lock left held by a killed process (semaphore {sem.inode}, "
                             f"{len(blocked)} workers were blocked on it)")
            return
        holder.release()
    ctx.notes.append("no process-shared semaphore that the workers wait for was found: nothing to leave held")


@dataclass(frozen=True)
class Scenario:
    name: str
    run: Callable[[Ctx], None]
    settings: dict = field(default_factory=dict)
    expect_dead_letters: bool = False


SCENARIOS = [
    Scenario("consumer-kill", consumer_kill),
    Scenario("worker-kill", worker_kill),
    Scenario("refresher-kill", refresher_kill),
    Scenario("manager-kill", manager_kill),
    Scenario("supervisor-kill", supervisor_kill),
    Scenario("postgres-crash", postgres_crash, {"NETBOX_TIMEOUT_SECONDS": "10", "NETBOX_SERVER_TIMEOUT_SECONDS": "20",
                                                "WORKERS_LEASE_SECONDS": "45",
                                                "SUPERVISOR_HEARTBEAT_TIMEOUT_SECONDS": "30",
                                                "SUPERVISOR_DRAIN_SECONDS": "30"}),
    Scenario("redis-restart", redis_restart, {"REDIS_READ_COUNT": "1"}),
    Scenario("sigterm-load", sigterm_load),
    Scenario("sigterm-slow", sigterm_slow),
    Scenario("slow-plugin", slow_plugin),
    Scenario("outage", outage, {"WORKERS_MAX_ATTEMPTS": "100"}),  # retries spread over minutes, not hours
    Scenario("two-supervisors", two_supervisors),
    Scenario("bad-input", bad_input, {"REDIS_MAX_ENTITIES": "50", "REDIS_MAX_REQUEST_BYTES": "65536"},
             expect_dead_letters=True),
    Scenario("shared-lock", shared_lock, {"NETBOX_RATE_LIMIT_PER_SECOND": "4", "NETBOX_RATE_LIMIT_BURST": "1"}),
]


# --- running and judging ---


def _about(scenario: Scenario) -> str:
    """The first sentence of the scenario's docstring."""
    text = " ".join(scenario.run.__doc__.split())
    return text.split(": ", 1)[0].split(". ", 1)[0].rstrip(".")


def run_scenario(suite: Suite, scenario: Scenario) -> Row:
    row = Row(scenario.name)
    started = time.monotonic()
    say(f"=== {scenario.name}: {_about(scenario)}")
    ctx, interrupted = None, False
    try:
        suite.ensure_servers()
        ctx = Ctx(suite, scenario.name, scenario.settings)
        scenario.run(ctx)
        settled, codes = ctx.finish()
        judge(ctx, row, codes)
    except KeyboardInterrupt:
        interrupted = True
        raise
    except HarnessError as exc:  # the scenario could not go on (a service would not start, ...)
        row.reasons = (ctx.problems if ctx else []) + [str(exc).splitlines()[0][:300]]
        say(str(exc))
    except Exception as exc:  # noqa: BLE001 - one scenario's surprise must not stop the others
        row.reasons = (ctx.problems if ctx else []) + [f"error in the suite: {exc!r}"[:300]]
        traceback.print_exc()
    finally:
        if ctx is not None:
            ctx.stop_feeding(now=interrupted)
            for service in ctx.services:
                service.kill_group()
            ctx.standin.close()
            ctx.obs.close()
    row.seconds = time.monotonic() - started
    if row.reasons:
        row.verdict = "FAIL"
        if ctx is not None:
            _show_log_excerpt(ctx)
    say(f"=== {scenario.name}: {row.verdict} in {row.seconds:.0f} s" +
        "".join(f"\n      - {reason}" for reason in row.reasons))
    return row


def judge(ctx: Ctx, row: Row, codes: list[int | None]) -> None:
    obs, reasons = ctx.obs, ctx.problems
    states = obs.states()
    if states is None:
        reasons.append("Postgres could not be asked for the rows")
        states = {}
    summary = ctx.standin.summary()
    dead = obs.scalar("SELECT count(*) FROM dead_letters") or 0
    duplicates = obs.scalar("SELECT coalesce(sum(duplicate_count), 0) FROM ingestion_logs") or 0
    drift = obs.scalar("SELECT count(*) FROM ingestion_logs WHERE drift_of IS NOT NULL") or 0
    pending, lag, length = obs.stream_state()
    rows = sum(states.values())
    at_settle = ctx.settled_states if ctx.settled_states is not None else states
    stuck = {STATE_NAMES[s]: at_settle.get(s, 0) for s in NOT_FINAL if at_settle.get(s)}
    failed_errored = states.get(FAILED, 0) + states.get(ERRORED, 0)

    row.pushed, row.rows, row.applied = ctx.pushed, rows, summary["applied"]
    row.resent, row.overlapping, row.replans = summary["resent"], summary["overlapping"], summary["replans"]
    row.stuck, row.failed_errored = sum(stuck.values()), failed_errored
    row.dead_letters = f"{dead}/{ctx.expected_dead_letters}" if ctx.expected_dead_letters else str(dead)
    row.pending = "?" if pending is None else str(pending)
    row.exit = ",".join("hung" if code is None else str(code) for code in codes) or "-"

    if rows - drift != ctx.pushed:
        lost = ctx.pushed - (rows - drift)
        reasons.append(f"{lost} of {ctx.pushed} entities pushed did not become rows" if lost > 0 else
                       f"{-lost} more rows than entities pushed")
    if drift:
        reasons.append(f"{drift} drift rows, though the stand-in never answers changes for an applied entity")
    if duplicates:
        reasons.append(f"{duplicates} observations counted as duplicates: an entry was ingested twice")
    if summary["applied"] != ctx.pushed:
        reasons.append(f"the plugin applied {summary['applied']} of the {ctx.pushed} entities pushed")
    if summary["overlapping"]:
        reasons.append(f"{summary['overlapping']} entities were sent while an earlier request carrying them was "
                       f"still in progress (by row id: {summary['overlapping_rows']}); e.g. "
                       + "; ".join(summary["examples"][:2]))
    if stuck:
        reasons.append(f"{sum(stuck.values())} rows stuck: " + ", ".join(f"{n} {s}" for s, n in stuck.items()))
    if failed_errored:
        sample = obs.query("SELECT state, error->>'code', left(error->>'message', 160), count(*) FROM ingestion_logs "
                           "WHERE state IN (4, 7) GROUP BY 1, 2, 3 ORDER BY 4 DESC LIMIT 2") or []
        reasons.append(f"{failed_errored} rows FAILED or ERRORED: " + "; ".join(
            f"{n} {STATE_NAMES[s]} {code}: {message}" for s, code, message, n in sample))
    if dead != ctx.expected_dead_letters:
        sample = obs.query("SELECT left(reason, 110), count(*) FROM dead_letters GROUP BY 1 ORDER BY 2 DESC "
                           "LIMIT 4") or []
        reasons.append(f"{dead} dead letters, {ctx.expected_dead_letters} expected: " + "; ".join(
            f"{n}x {reason}" for reason, n in sample))
    if pending or lag or length:
        reasons.append(f"the consumer group kept {pending} pending entries, lag {lag}, {length} entries in the stream")
    lost_answers = obs.query("SELECT id FROM ingestion_logs WHERE state = %s", (NO_CHANGES,)) or []
    unrecorded = sum(1 for (row_id,) in lost_answers if str(row_id) in ctx.standin.applied_rows)
    if unrecorded:
        ctx.notes.append(f"{unrecorded} rows ended NO_CHANGES though a request carrying that very row applied "
                         f"them (its answer was lost)")
    if summary["replans"]:
        ctx.notes.append(f"{summary['replans']} entities re-sent after their earlier request had ended (allowed)")
    row.reasons = reasons
    row.notes = ctx.notes
    row.verdict = "PASS" if not reasons else "FAIL"


def _show_log_excerpt(ctx: Ctx) -> None:
    excerpt = tail(ctx.log, 12, r" (ERROR|CRITICAL) |Traceback|taken over|gave .* back|outlived")
    if excerpt:
        say(f"  from {ctx.log}:\n" + "\n".join("    " + line[:300] for line in excerpt.splitlines()))


COLUMNS = ("scenario", "pushed", "rows", "applied", "sent >1", "overlapping", "re-plans", "stuck",
           "FAILED+ERRORED", "dead letters", "pending", "exit", "verdict")


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = (r.name, f"{r.pushed:,}", f"{r.rows:,}", f"{r.applied:,}", f"{r.resent:,}", f"{r.overlapping:,}",
                 f"{r.replans:,}", f"{r.stuck:,}", f"{r.failed_errored:,}", r.dead_letters, r.pending, r.exit,
                 f"**{r.verdict}**" if r.verdict == "FAIL" else r.verdict)
        lines.append("| " + " | ".join(cells) + " |")
    total = sum(r.pushed for r in rows)
    lines.append("")
    lines.append(f"{sum(r.verdict == 'PASS' for r in rows)} of {len(rows)} scenarios passed; {total:,} entities "
                 f"pushed in all; {sum(r.seconds for r in rows):.0f} s.")
    for r in rows:
        if r.reasons or r.notes:
            lines.append("")
            lines.append(f"- **{r.name}** ({r.verdict}, {r.seconds:.0f} s)")
            lines += [f"  - FAIL: {reason}" for reason in r.reasons]
            lines += [f"  - {note}" for note in r.notes]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = [s.name for s in SCENARIOS]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " (see the module docstring)")
    parser.add_argument("--short", action="store_true",
                        help="the CI-sized run: a few kills per role, one restart of each server (~6 min)")
    parser.add_argument("--only", action="append", metavar="NAME", choices=names,
                        help=f"run only this scenario (repeatable): {', '.join(names)}")
    parser.add_argument("--skip", action="append", metavar="NAME", choices=names, default=[],
                        help="leave this scenario out (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (logs) at the end")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random timings")
    parser.add_argument("--code", metavar="DIR",
                        help="run reconciler from this source tree (its reconciler/ and sql/) instead of the "
                             "project's, e.g. a checkout of the commit before a fix")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for scenario in SCENARIOS:
            print(f"{scenario.name:16} {_about(scenario)}")
        return 0
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    random.seed(seed)
    chosen = [s for s in SCENARIOS if (not args.only or s.name in args.only) and s.name not in args.skip]

    def on_term(signum, frame):
        raise KeyboardInterrupt

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_term)
    rows: list[Row] = []
    started = time.monotonic()
    suite = None
    try:
        suite = Suite(args)
        suite.start()
        say(f"{'short' if args.short else 'full'} run of {len(chosen)} scenarios, seed {seed}")
        for scenario in chosen:
            rows.append(run_scenario(suite, scenario))
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        return 130
    except HarnessError as exc:
        say(f"the suite could not start: {exc}")
        return 1
    finally:
        if suite is not None:
            suite.close()
    print(f"\n## Chaos suite ({'--short' if args.short else 'full run'}, seed {seed}, "
          f"{time.monotonic() - started:.0f} s)\n")
    print(table(rows), flush=True)
    return 0 if rows and all(r.verdict == "PASS" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
