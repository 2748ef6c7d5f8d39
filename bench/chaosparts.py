"""Parts of the chaos suite (bench/chaos.py): a private Postgres cluster and Redis server, the
plugin stand-in, the service under test and the producer as subprocesses, and what the suite
observes (rows, dead letters, the consumer group, processes in /proc).

Nothing here touches the machine's own servers: every server is started on a free loopback port
in a temporary directory, and every process is found through the pids this module started.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import orjson
import psycopg2
import redis

from reconciler.sharedcache import MANAGER_TITLE
from reconciler.streamentry import ENTITIES_FIELD, fields_of, length_delimited

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
SCHEMA = "reconciler"
GROUP = "diode-reconciler"

# diode.v1.State
QUEUED, OPEN, APPLIED, FAILED, NO_CHANGES, IGNORED, ERRORED, APPLYING, PENDING_RETRY = range(1, 10)
NOT_FINAL = (QUEUED, APPLYING, PENDING_RETRY)
STATE_NAMES = {QUEUED: "QUEUED", OPEN: "OPEN", APPLIED: "APPLIED", FAILED: "FAILED", NO_CHANGES: "NO_CHANGES",
               IGNORED: "IGNORED", ERRORED: "ERRORED", APPLYING: "APPLYING", PENDING_RETRY: "PENDING_RETRY"}


class HarnessError(Exception):
    """The suite itself could not do what a scenario needs (a server would not start, ...)."""


def say(message: str) -> None:
    """Progress on stderr, with the time since the suite started."""
    print(f"[chaos {time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


_T0 = time.monotonic()


_SETPRIV = shutil.which("setpriv")


def dies_with_us(argv: list[str]) -> list[str]:
    """argv run so that the kernel kills it if this process dies first (a harness killed by a CI
    timeout must not leave servers behind): setpriv --pdeathsig, where util-linux has it."""
    return [_SETPRIV, "--pdeathsig", "KILL", "--", *argv] if _SETPRIV else argv


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check: Callable[[], object], timeout: float, interval: float = 0.2) -> object:
    """check()'s first truthy value within timeout seconds, else None."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


def tail(path: Path, lines: int = 30, grep: str | None = None) -> str:
    """The last lines of a log (those matching `grep`), a line repeated in a row shown once."""
    try:
        text = path.read_text("utf-8", "replace").splitlines()
    except OSError:
        return ""
    if grep:
        pattern = re.compile(grep)
        text = [line for line in text if pattern.search(line)]
    kept: list[str] = []
    for line in text:
        if not kept or line != kept[-1]:
            kept.append(line)
    return "\n".join(kept[-lines:])


# --- processes, from /proc ---


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    pgrp: int
    start: int  # start time in clock ticks since boot: tells a pid apart from its reuse
    state: str
    title: str

    @property
    def role(self) -> str | None:
        """'worker 1', 'consumer', ... for a titled reconciler process."""
        return self.title[len("reconciler: "):].strip() if self.title.startswith("reconciler: ") else None


def read_proc(pid: int) -> Proc | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read().decode("utf-8", "replace")
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            cmdline = handle.read()
    except OSError:
        return None
    rest = stat[stat.rindex(")") + 2:].split()
    title = cmdline.replace(b"\x00", b" ").decode("utf-8", "replace").strip()
    return Proc(pid, int(rest[1]), int(rest[2]), int(rest[19]), rest[0], title)


def all_procs() -> list[Proc]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            proc = read_proc(int(entry))
            if proc is not None:
                found.append(proc)
    return found


def children(pid: int) -> list[Proc]:
    return [proc for proc in all_procs() if proc.ppid == pid]


def descendants(pid: int) -> list[Proc]:
    table = all_procs()
    out, frontier = [], {pid}
    while frontier:
        level = [proc for proc in table if proc.ppid in frontier]
        out += level
        frontier = {proc.pid for proc in level}
    return out


def alive(proc: Proc) -> bool:
    """The same process (pid and start time) still exists and is not a zombie."""
    now = read_proc(proc.pid)
    return now is not None and now.start == proc.start and now.state != "Z"


def kill_session(leader: Proc | None) -> None:
    """SIGKILL every process of the process group `leader` started (start_new_session), and nothing
    that merely reuses its numbers later."""
    if leader is None:
        return
    for proc in all_procs():
        if proc.pgrp == leader.pid and proc.start >= leader.start and proc.state != "Z":
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def signal_proc(proc: Proc, signum: int) -> bool:
    """Signal this very process (not a later one that reused its pid); whether it was sent."""
    if not alive(proc):
        return False
    try:
        os.kill(proc.pid, signum)
        return True
    except ProcessLookupError:
        return False


# --- a watchdog for when the suite itself is killed ---


WATCHDOG = r"""
import os, shutil, signal, sys, time
root, leaders = sys.argv[1], []
for line in sys.stdin:
    if line.strip() == "done":
        sys.exit(0)  # the suite cleaned up after itself
    pid, start = line.split()
    leaders.append((int(pid), int(start)))
# The suite died without cleaning up: kill every session it started, then remove its directory.
for _ in range(3):
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pgrp, start = int(fields[2]), int(fields[19])
        if any(pgrp == pid and start >= since for pid, since in leaders):
            try:
                os.kill(int(entry), signal.SIGKILL)
            except OSError:
                pass
    time.sleep(1)
shutil.rmtree(root, ignore_errors=True)
"""


class Watchdog:
    """A process of its own that outlives the suite: if the suite dies without saying it is done (a
    SIGKILL), it kills every session the suite started and removes the suite's directory."""

    def __init__(self, root: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", WATCHDOG, str(root)], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, text=True, start_new_session=True)

    def watch(self, leader: Proc | None) -> None:
        if leader is not None and self.proc.poll() is None:
            try:
                self.proc.stdin.write(f"{leader.pid} {leader.start}\n")
                self.proc.stdin.flush()
            except OSError:
                pass

    def done(self) -> None:
        try:
            self.proc.stdin.write("done\n")
            self.proc.stdin.close()
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


_watchdog: Watchdog | None = None


def start_watchdog(root: Path) -> Watchdog:
    global _watchdog
    _watchdog = Watchdog(root)
    return _watchdog


def watched(proc: Proc | None) -> Proc | None:
    """Hand a session leader we started to the watchdog; returns it."""
    if _watchdog is not None:
        _watchdog.watch(proc)
    return proc


# --- PostgreSQL: a cluster of our own ---


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise HarnessError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
    return Path(found[-1]).parent


class PgCluster:
    """initdb into a temporary directory, a free loopback port, fsync on; killed and restarted at will."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "pg"
        self.data = self.dir / "data"
        self.socket_dir = self.dir / "sock"
        self.log = self.dir / "postgres.log"
        self.bin = _postgres_bin()
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.leader: Proc | None = None
        account = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        self._as_user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []} if account else {}

    def init(self) -> None:
        self.dir.mkdir(parents=True)
        self.socket_dir.mkdir()
        if self._as_user:
            for path in (self.dir, self.socket_dir):
                os.chown(path, self._as_user["user"], self._as_user["group"])
        done = subprocess.run([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                               "-E", "UTF8", "--no-locale", "--no-sync"],
                              capture_output=True, text=True, cwd=self.dir, **self._as_user)
        if done.returncode != 0:
            raise HarnessError(f"initdb failed: {done.stderr.strip()[-2000:]}")

    def start(self, timeout: float = 60.0) -> None:
        log = open(self.log, "ab")
        self.proc = subprocess.Popen(
            dies_with_us([str(self.bin / "postgres"), "-D", str(self.data), "-c", "listen_addresses=127.0.0.1",
                          "-c", f"port={self.port}", "-c", f"unix_socket_directories={self.socket_dir}",
                          "-c", "fsync=on", "-c", "synchronous_commit=on", "-c", "max_connections=200",
                          "-c", "shared_buffers=128MB", "-c", "log_min_messages=warning",
                          "-c", "log_line_prefix=%m [%p] "]),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.dir,
            start_new_session=True, **self._as_user)
        log.close()
        self.leader = watched(read_proc(self.proc.pid))
        if not wait_for(self._answers, timeout, 0.1):
            raise HarnessError(f"Postgres did not start on port {self.port}:\n{tail(self.log)}")

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise HarnessError(f"Postgres exited with {self.proc.returncode}:\n{tail(self.log)}")
        try:
            psycopg2.connect(self.dsn(), connect_timeout=2).close()
            return True
        except psycopg2.OperationalError:
            return False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def crash(self, signum: int = signal.SIGQUIT, timeout: float = 30.0) -> None:
        """SIGQUIT: the postmaster's immediate shutdown, as in a crash (shared memory discarded, WAL not
        flushed); recovery runs at the next start."""
        if not self.running:
            return
        os.kill(self.proc.pid, signum)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill_group()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self._kill_group()
        self._kill_group()  # any backend left behind

    def _kill_group(self) -> None:
        if self.proc is None:
            return
        kill_session(self.leader)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def admin(self, statement: str) -> None:
        conn = psycopg2.connect(self.dsn(), connect_timeout=5)
        conn.autocommit = True
        try:
            with conn.cursor() as cursor:
                cursor.execute(statement)
        finally:
            conn.close()


# --- Redis: a server of our own ---


class RedisServer:
    """redis-server on a free loopback port, append-only with fsync on every write, so that what it
    acknowledged survives a kill -9 of the process."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "redis"
        self.log = self.dir / "redis.log"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        binary = shutil.which("redis-server")
        if binary is None:
            raise HarnessError("redis-server is not installed")
        self.binary = binary

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30.0) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            dies_with_us([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                          "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
                          "--logfile", str(self.log), "--loglevel", "warning"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True)
        watched(read_proc(self.proc.pid))
        if not wait_for(self._answers, timeout, 0.05):
            raise HarnessError(f"Redis did not start on port {self.port}:\n{tail(self.log)}")

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise HarnessError(f"redis-server exited with {self.proc.returncode}:\n{tail(self.log)}")
        try:
            client = redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=2)
            try:
                # A server still loading its AOF answers LOADING: not ready yet.
                return bool(client.ping())
            finally:
                client.close()
        except redis.RedisError:
            return False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_connect_timeout=3, socket_timeout=10)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Graceful: SHUTDOWN (the AOF is flushed and fsynced)."""
        client = self.client()
        try:
            client.shutdown()
        except redis.RedisError:
            pass
        finally:
            client.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.running:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.running:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


# --- the plugin stand-in ---


def identity(entity: dict) -> bytes:
    """What makes an entity the same object for the stand-in's NetBox: the entity without the
    observation's timestamp and the Diode-only metadata (as the inbox's entity_hash), keys sorted."""
    if isinstance(entity, dict):
        entity = {key: value for key, value in entity.items() if key not in ("timestamp", "metadata")}
    return orjson.dumps(entity, option=orjson.OPT_SORT_KEYS)


@dataclass
class Fault:
    kind: str  # "503", "hang", "late", "drop"
    until: float  # time.monotonic() at which it ends
    per_entity: float = 0.0  # "late": seconds per entity in the request


@dataclass
class RequestRecord:
    number: int
    path: str
    entities: int
    arrived: float
    ended: float | None = None
    outcome: str = ""


class StandIn:
    """An instant loopback diode plugin that models NetBox's state and watches what it is sent.

    - GET default-branch/ -> {"branch": null}; POST bulk-plan-apply/ and bulk-plan/ -> one result per
      entity, matched by id: a create change the first time an entity is applied, an empty change
      list once it has been (a re-plan finds nothing, as on a real NetBox).
    - Counts every entity it is asked to plan or apply, and flags an entity (by identity, and by row
      id) that arrives while an earlier request carrying it is still being handled, whether or not
      the client still waits for that request's answer: NetBox does not stop working when the client
      gives up. No handler runs longer than `server_limit` seconds (NetBox's own request timeout).
    - Faults, for a period: 503 at once; hang (answer nothing until server_limit, then close the
      connection: NetBox's worker timeout, nothing applied); late (per-entity delay, then applied and
      answered, if anyone still listens); drop (applied, then the connection closed without an answer).
    - arm(delay, callback): the next bulk request calls callback(row ids) on arrival (in a thread of
      its own) and is answered `delay` seconds later: lets the suite kill something mid-request.
    """

    def __init__(self, server_limit: float) -> None:
        self.server_limit = server_limit
        self._lock = threading.Lock()
        self.applied: dict[bytes, int] = {}  # identity -> object id in "NetBox"
        self.applied_rows: set[str] = set()  # row ids whose own request created their object
        self.sent: Counter = Counter()  # identity -> requests that carried it
        self._inflight: dict[bytes, list[int]] = {}  # identity -> numbers of requests in progress carrying it
        self._inflight_rows: dict[str, list[int]] = {}
        self._row_idents: dict[str, bytes] = {}  # row id -> identity of the entity it carried first
        self.overlapping: set[bytes] = set()
        self.overlapping_rows: set[str] = set()
        self.overlap_examples: list[str] = []
        self.records: dict[int, RequestRecord] = {}
        self.outcomes: Counter = Counter()
        self.active = 0
        self.active_bulk = 0
        self.bulk_requests = 0
        self._numbers = iter(range(1, 1 << 62))
        self._fault: Fault | None = None
        self._armed: deque = deque()
        self._started = time.monotonic()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                stand_in._handle(self, None)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    body = None
                stand_in._handle(self, body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/api/plugins/diode"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="stand-in", daemon=True)
        self._thread.start()

    # --- control, from the suite ---

    def fault(self, kind: str, seconds: float, per_entity: float = 0.0) -> None:
        assert kind in ("503", "hang", "late", "drop"), kind
        with self._lock:
            self._fault = Fault(kind, time.monotonic() + seconds, per_entity)

    def heal(self) -> None:
        with self._lock:
            self._fault = None

    def arm(self, delay: float, callback: Callable[[list[str]], None]) -> None:
        with self._lock:
            self._armed.append((delay, callback))

    def disarm(self) -> None:
        with self._lock:
            self._armed.clear()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # --- what it saw ---

    @property
    def busy(self) -> int:
        """Requests being handled now."""
        with self._lock:
            return self.active

    @property
    def busy_bulk(self) -> int:
        """bulk-plan(-apply) requests being handled now."""
        with self._lock:
            return self.active_bulk

    def summary(self) -> dict:
        with self._lock:
            resent = {ident for ident, n in self.sent.items() if n > 1}
            return {
                "asked": sum(self.sent.values()), "entities": len(self.sent), "applied": len(self.applied),
                "resent": len(resent), "overlapping": len(self.overlapping | self._idents_of_rows()),
                "overlapping_identity": len(self.overlapping), "overlapping_rows": len(self.overlapping_rows),
                "replans": len(resent - self.overlapping - self._idents_of_rows()),
                "examples": list(self.overlap_examples), "outcomes": dict(self.outcomes),
                "bulk_requests": self.bulk_requests,
            }

    def _idents_of_rows(self) -> set[bytes]:
        return {self._row_idents[row] for row in self.overlapping_rows if row in self._row_idents}

    # --- handling ---

    def _current_fault(self) -> Fault | None:
        fault = self._fault
        if fault is not None and time.monotonic() >= fault.until:
            self._fault = fault = None
        return fault

    def _handle(self, handler: BaseHTTPRequestHandler, body) -> None:
        path = handler.path.split("/api/plugins/diode/", 1)[-1].split("?", 1)[0]
        arrived = time.monotonic()
        bulk = handler.command == "POST" and path in ("bulk-plan-apply/", "bulk-plan/")
        items: list[tuple[str, str, bytes, dict]] = []
        if bulk:
            entities = body.get("entities") if isinstance(body, dict) else None
            if not isinstance(entities, list):
                self._answer(handler, 400, {"detail": "expected {\"entities\": [...]}"})
                return
            for entity in entities:
                items.append((str(entity.get("id")), str(entity.get("object_type")),
                              identity(entity.get("entity")), entity))
        with self._lock:
            number = next(self._numbers)
            record = RequestRecord(number, path, len(items), arrived - self._started)
            self.records[number] = record
            self.active += 1
            if bulk:
                self.bulk_requests += 1
                self.active_bulk += 1
                self._enter(number, items, arrived)
            fault = self._current_fault()
            armed = self._armed.popleft() if bulk and self._armed else None
        try:
            record.outcome = self._serve(handler, path, bulk, items, fault, armed, arrived)
        finally:
            with self._lock:
                record.ended = time.monotonic() - self._started
                self.outcomes[record.outcome] += 1
                self.active -= 1
                if bulk:
                    self.active_bulk -= 1
                    self._leave(number, items)

    def _enter(self, number: int, items, arrived: float) -> None:
        """Under the lock: note what arrives while an earlier request carrying it is in progress."""
        for row, object_type, ident, _ in items:
            self._row_idents.setdefault(row, ident)
            earlier = self._inflight.get(ident)
            earlier_rows = self._inflight_rows.get(row)
            if earlier or earlier_rows:
                if earlier:
                    self.overlapping.add(ident)
                if earlier_rows:
                    self.overlapping_rows.add(row)
                if len(self.overlap_examples) < 5:
                    other = self.records[(earlier or earlier_rows)[0]]
                    self.overlap_examples.append(
                        f"row {row} ({object_type}) arrived in request #{number} at {arrived - self._started:.1f}s "
                        f"while request #{other.number} ({other.path}, {other.entities} entities, arrived at "
                        f"{other.arrived:.1f}s) carrying it was still in progress")
            self._inflight.setdefault(ident, []).append(number)
            self._inflight_rows.setdefault(row, []).append(number)
            self.sent[ident] += 1

    def _leave(self, number: int, items) -> None:
        for row, _, ident, _ in items:
            for table, key in ((self._inflight, ident), (self._inflight_rows, row)):
                numbers = table.get(key)
                if numbers:
                    numbers.remove(number)
                    if not numbers:
                        del table[key]

    def _serve(self, handler, path: str, bulk: bool, items, fault: Fault | None, armed, arrived: float) -> str:
        if armed is not None:
            delay, callback = armed
            threading.Thread(target=callback, args=([row for row, *_ in items],), daemon=True).start()
            self._sleep_until(arrived, delay)
        if fault is not None and fault.kind == "503":
            self._answer(handler, 503, {"detail": "Service Unavailable (stand-in fault)"})
            return "503"
        if fault is not None and fault.kind == "hang":
            self._sleep_until(arrived, self.server_limit)
            self._drop(handler)
            return "hung"
        if fault is not None and fault.kind == "late":
            self._sleep_until(arrived, fault.per_entity * max(1, len(items)))
        if path == "default-branch/" and handler.command == "GET":
            answer = {"branch": None}
        elif bulk:
            answer = {"results": self._results(items, apply=path == "bulk-plan-apply/")}
        else:
            self._answer(handler, 404, {"detail": "Not found."})
            return "404"
        if fault is not None and fault.kind == "drop":
            self._drop(handler)
            return "dropped"
        late = time.monotonic() - arrived
        return "200" if self._answer(handler, 200, answer) else f"200 unheard ({late:.1f}s)"

    def _sleep_until(self, arrived: float, seconds: float) -> None:
        end = arrived + min(seconds, self.server_limit)
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 0.5))

    def _results(self, items, apply: bool) -> list[dict]:
        results = []
        with self._lock:
            for row, object_type, ident, _entity in items:
                if ident in self.applied:
                    changes = []
                else:
                    object_id = len(self.applied) + 1
                    if apply:
                        self.applied[ident] = object_id
                        self.applied_rows.add(row)
                    changes = [{
                        "id": f"ch-{row}-{object_id}", "change_type": "create", "object_type": object_type,
                        "object_id": None, "ref_id": f"new_object:{object_type}:{object_id}",
                        "object_primary_value": f"obj-{object_id}", "before": {},
                        "data": {"name": f"obj-{object_id}"}, "new_refs": []}]
                results.append({"id": row, "errors": None,
                                "change_set": {"id": f"cs-{row}-{len(results)}", "branch": None, "changes": changes}})
        return results

    @staticmethod
    def _answer(handler, status: int, body) -> bool:
        data = orjson.dumps(body)
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
            handler.wfile.flush()
            return True
        except OSError:
            handler.close_connection = True
            return False  # the client gave up waiting

    @staticmethod
    def _drop(handler) -> None:
        handler.close_connection = True
        try:
            handler.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


# --- the service under test ---


class Service:
    """One `reconciler run` (a supervisor and its processes), started in a session of its own."""

    def __init__(self, label: str, env: dict[str, str], log: Path, config: Path) -> None:
        self.label, self.env, self.log, self.config = label, env, log, config
        self.proc: subprocess.Popen | None = None
        self.exits: list[tuple[str, int | None]] = []  # (how it was stopped, exit code)
        self.leader: Proc | None = None
        self._offset = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        self._offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            log.write(f"===== chaos: starting {self.label} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(dies_with_us([str(VENV_BIN / "reconciler"), "run", "-c", str(self.config)]),
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=ROOT, start_new_session=True)
        self.leader = watched(read_proc(self.proc.pid))

    def log_since_start(self) -> str:
        try:
            with open(self.log, "rb") as handle:
                handle.seek(self._offset)
                return handle.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def wait_ready(self, roles: set[str], timeout: float = 60.0) -> None:
        """Until the supervisor said every child booted and every role runs."""
        def ready():
            if self.proc.poll() is not None:
                raise HarnessError(f"{self.label} exited with {self.proc.returncode} while starting:\n"
                                   f"{self.log_since_start()[-3000:]}")
            return " ready: " in self.log_since_start() and roles <= set(self.roles())
        if not wait_for(ready, timeout, 0.2):
            raise HarnessError(f"{self.label} did not become ready within {timeout:.0f} s:\n"
                               f"{self.log_since_start()[-3000:]}")

    def roles(self) -> dict[str, Proc]:
        """The supervisor's titled children by role ('consumer', 'refresher', 'worker 1', ...)."""
        if not self.running:
            return {}
        return {proc.role: proc for proc in children(self.pid)
                if proc.role and proc.role not in ("supervisor", MANAGER_TITLE) and proc.state != "Z"}

    def manager(self) -> Proc | None:
        """The multiprocessing Manager of the shared cache, by its process title."""
        if not self.running:
            return None
        found = [proc for proc in children(self.pid) if proc.state != "Z" and proc.role == MANAGER_TITLE]
        return found[0] if len(found) == 1 else None

    def stop(self, timeout: float) -> int | None:
        """SIGTERM to the supervisor alone (systemd's KillMode=mixed); its exit code, None if it hung."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        os.kill(self.pid, signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
        self.exits.append(("SIGTERM", code))
        self.kill_group()
        return code

    def kill9(self) -> list[Proc]:
        """SIGKILL the supervisor alone; the processes it had, to check that none lingers."""
        before = descendants(self.pid)
        os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.exits.append(("SIGKILL", self.proc.returncode))
        return before

    def kill_group(self) -> None:
        """Whatever is left of the session we started (teardown)."""
        if self.proc is None:
            return
        kill_session(self.leader)
        if self.proc.poll() is None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass


# --- the producer ---


PUSHED = re.compile(r"pushed (\d+) entries \((\d+) entities")


class Push:
    """One `reconciler-sample` run; wait() gives the entities it reports pushed."""

    def __init__(self, redis_url: str, stream: str, config: Path, first_site: int, sites: int = 1,
                 rate: float = 0.0, rate_unit: str = "entities", per_request: int = 100, brotli: str = "mixed",
                 extra: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.argv = [str(VENV_BIN / "reconciler-sample"), "-c", str(config), "--redis-url", redis_url,
                     "--stream", stream, "--sites", str(sites), "--first-site", str(first_site),
                     "--per-request", str(per_request), "--brotli", brotli, "-q"]
        if rate > 0:
            self.argv += ["--rate", str(rate), "--rate-unit", rate_unit]
        self.argv += extra or []
        if env is None:
            env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
        self.proc = subprocess.Popen(dies_with_us(self.argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     stdin=subprocess.DEVNULL, env=env, cwd=ROOT)

    def wait(self, timeout: float = 600.0) -> tuple[int, int]:
        """(entries, entities) pushed; raises if the producer failed."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise HarnessError(f"reconciler-sample did not finish within {timeout:.0f} s") from None
        match = PUSHED.search(out.strip().splitlines()[-1] if out.strip() else "")
        if self.proc.returncode != 0 or match is None:
            raise HarnessError(f"reconciler-sample failed ({self.proc.returncode}): {err.strip()[-1000:]} {out[-300:]}")
        return int(match[1]), int(match[2])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# --- what the suite observes ---


class Observer:
    def __init__(self, dsn: str, redis_url: str, stream: str, group: str = GROUP) -> None:
        self.dsn, self.redis_url, self.stream, self.group = dsn, redis_url, stream, group
        self._conn = None

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg2.Error:
                pass
            self._conn = None

    def query(self, statement: str, params=None) -> list[tuple] | None:
        """Rows of a statement; None while Postgres cannot be asked."""
        for _ in range(2):
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = psycopg2.connect(self.dsn, connect_timeout=3,
                                                  options=f"-c search_path={SCHEMA} -c statement_timeout=30000")
                    self._conn.autocommit = True
                with self._conn.cursor() as cursor:
                    cursor.execute(statement, params)
                    return cursor.fetchall()
            except psycopg2.Error:
                self.close()
        return None

    def states(self) -> Counter | None:
        rows = self.query("SELECT state, count(*) FROM ingestion_logs GROUP BY state")
        return None if rows is None else Counter({state: n for state, n in rows})

    def scalar(self, statement: str, params=None):
        rows = self.query(statement, params)
        return None if not rows else rows[0][0]

    def lease_owner(self, row_ids: list[str]) -> str | None:
        ids = [int(row) for row in row_ids if row.isdigit()]
        return self.scalar("SELECT lease_owner FROM ingestion_logs WHERE id = ANY(%s::bigint[]) "
                           "AND lease_owner IS NOT NULL LIMIT 1", (ids,))

    def stream_state(self) -> tuple[int | None, int | None, int | None]:
        """(pending entries in the group, its lag, XLEN); None where Redis could not say."""
        client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=2, socket_timeout=5)
        try:
            pending = lag = None
            for group in client.xinfo_groups(self.stream):
                name = group["name"].decode() if isinstance(group["name"], bytes) else group["name"]
                if name == self.group:
                    pending, lag = group["pending"], group.get("lag")
            return pending, lag, client.xlen(self.stream)
        except redis.ResponseError:
            return 0, 0, 0  # no stream: nothing was ever pushed
        except redis.RedisError:
            return None, None, None
        finally:
            client.close()


# --- a lock the workers share, held by a process that dies ---


@dataclass
class SharedSemaphore:
    """A POSIX semaphore (multiprocessing's locks) mapped into a process: /dev/shm/sem.* (deleted)."""

    pid: int
    start: int  # mapping start address in that process
    end: int
    inode: int

    @property
    def map_file(self) -> str:
        return f"/proc/{self.pid}/map_files/{self.start:x}-{self.end:x}"


def shared_semaphores(pid: int) -> list[SharedSemaphore]:
    found = []
    try:
        with open(f"/proc/{pid}/maps") as handle:
            for line in handle:
                parts = line.split()
                if len(parts) >= 6 and "/dev/shm/sem." in parts[5]:
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    found.append(SharedSemaphore(pid, start, end, int(parts[4])))
    except OSError:
        pass
    return found


def semaphore_value(sem: SharedSemaphore) -> int | None:
    """The semaphore's count (glibc's new_sem: the low 32 bits of its first word)."""
    try:
        with open(sem.map_file, "rb") as handle:
            return int.from_bytes(handle.read(4), "little")
    except OSError:
        return None


def futex_waiters(pids: list[int], sems: dict[int, list[SharedSemaphore]], inode: int) -> list[int]:
    """The pids blocked in futex() on the semaphore with this inode (in their own mapping of it)."""
    blocked = []
    for pid in pids:
        mine = [sem for sem in sems.get(pid, []) if sem.inode == inode]
        try:
            with open(f"/proc/{pid}/syscall") as handle:
                fields = handle.read().split()
        except OSError:
            continue
        if len(fields) >= 2 and fields[0] == "202":  # futex (x86_64)
            address = int(fields[1], 16)
            if any(sem.start <= address < sem.end for sem in mine):
                blocked.append(pid)
    return blocked


# A helper process that takes a semaphore (the way a lock's holder does) and then waits to be killed
# holding it, or releases it when told to.
HOLDER = r"""
import ctypes, mmap, os, sys
path = sys.argv[1]
fd = os.open(path, os.O_RDWR)
page = mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
address = ctypes.addressof(ctypes.c_char.from_buffer(page))
libc = ctypes.CDLL(None, use_errno=True)
if libc.sem_trywait(ctypes.c_void_p(address)) != 0:
    print("busy", flush=True)
    sys.exit(1)
print("held", flush=True)
if sys.stdin.readline().strip() == "release":
    libc.sem_post(ctypes.c_void_p(address))
    print("released", flush=True)
"""


class Holder:
    """Runs HOLDER on one semaphore: held() once it holds it; release() or kill() (dies holding it)."""

    def __init__(self, sem: SharedSemaphore) -> None:
        self.proc = subprocess.Popen(dies_with_us([sys.executable, "-c", HOLDER, sem.map_file]), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.state = self.proc.stdout.readline().strip()

    @property
    def held(self) -> bool:
        return self.state == "held"

    def release(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("release\n")
                self.proc.stdin.flush()
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


# --- protobuf wire format, enough to build malformed IngestRequests (reconciler.streamentry's walker) ---


def join_request(header: bytes, entities: list[bytes]) -> bytes:
    return header + b"".join(length_delimited(ENTITIES_FIELD, entity) for entity in entities)


def replace_field(header: bytes, number: int, payload: bytes) -> bytes:
    """The header with field `number` (a string/bytes field) set to raw `payload`, valid UTF-8 or not."""
    kept = b"".join(header[start:end] for n, _, start, _, end in fields_of(header) if n != number)
    return kept + length_delimited(number, payload)
