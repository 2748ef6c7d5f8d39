"""A real NetBox 4.7.3 with the diode plugin 1.18.3 and netbox-branching 1.2.2 on loopback.

For end-to-end tests and the quick start. NetBox runs from its own Python 3.12 venv (this module
runs under any Python >= 3.11, stdlib only) against the machine's PostgreSQL (own database) and
Redis (own db indexes), with a stdlib stand-in for Diode's token introspection (peer/introspect.py).

Everything is kept in ``$PEER_CACHE`` (default ``~/.cache/reconciler-netbox-peer``):
the venv, NETBOX_ROOT, secrets, logs, pid/state files, and a ``pg_dump`` of the freshly migrated
database, so that only the first bring-up pays for the ~5.5 min ``netbox migrate``. Its long steps
(pip, the migrations) log a plain progress line to stderr every PROGRESS_SECONDS: elapsed time,
packages collected, migrations applied of the plan's total.

CLI: ``python -m peer.netbox up|down [--purge]|reset|status|env``.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import re
import secrets
import signal
import socket
import string
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

VERSIONS = {
    "netbox": "4.7.3",
    "netboxlabs-diode-netbox-plugin": "1.18.3",
    "netboxlabs-netbox-branching": "1.2.2",
}
TAG = "netbox-{}-diode-{}-branching-{}".format(*VERSIONS.values())
NETBOX_TOKEN = "0123456789abcdef0123456789abcdef01234567"  # v1 REST token of user admin (nbshell/bootstrap.py)
PLUGIN_TOKEN = "peer-token-1"  # any bearer works: the stand-in grants read+write (see introspect.py)

PYTHON312 = os.environ.get("PEER_PYTHON", "/root/.pyenv/versions/3.12.1/bin/python")
CACHE = Path(os.environ.get("PEER_CACHE") or Path.home() / ".cache/reconciler-netbox-peer")
DB_NAME = os.environ.get("PEER_NETBOX_DB", "reconciler_peer_netbox")
PG = {"host": "127.0.0.1", "port": "5432", "user": "postgres"}  # the machine's server, trust auth
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379  # the machine's server; we only ever FLUSHDB our two dbs
REDIS_DBS = {"tasks": int(os.environ.get("PEER_REDIS_TASKS_DB", 14)),
             "caching": int(os.environ.get("PEER_REDIS_CACHE_DB", 15))}
# The plugin caches object lookups in Redis; 0 makes edits made outside the plugin visible at once.
FIND_OBJ_CACHE_TTL = int(os.environ.get("PEER_FIND_OBJ_CACHE_TTL", 0))
FORBIDDEN_PORTS = {8000, 8081}  # 8081 is the Go reconciler's gRPC default
READY_TIMEOUT = 120.0
PROGRESS_SECONDS = 15.0  # a long step of the first install says how far it is this often

HERE = Path(__file__).resolve().parent
VENV = CACHE / f"venv-{TAG}"
NETBOX_ROOT = CACHE / "netbox-root"
SNAPSHOT = CACHE / f"{TAG}.dump"
SECRETS_FILE = CACHE / "secrets.json"
STATE_FILE = CACHE / "state.json"
LOGS = CACHE / "logs"
RUN = CACHE / "run"
GUNICORN_PIDFILE = RUN / "gunicorn.pid"


class PeerError(RuntimeError):
    """A bring-up step failed; the message ends with the tail of the relevant log."""


@dataclass
class Peer:
    plugin_url: str
    netbox_url: str
    netbox_token: str
    introspect_url: str
    pids: dict
    timings: dict = field(default_factory=dict)

    def env(self) -> dict:
        """Variables for a shell or a subprocess: the reconciler's own settings plus the peer's."""
        return {
            "RECONCILER_NETBOX_URL": self.plugin_url,
            "RECONCILER_NETBOX_TOKEN": PLUGIN_TOKEN,
            "RECONCILER_NETBOX_API_TOKEN": self.netbox_token,  # the change log, for [drift] mode changes
            "PEER_NETBOX_URL": self.netbox_url,
            "PEER_NETBOX_TOKEN": self.netbox_token,
            "PEER_INTROSPECT_URL": self.introspect_url,
        }


# --- small utilities --------------------------------------------------------------------------


def _log(msg: str) -> None:
    print(f"[peer] {msg}", file=sys.stderr, flush=True)


class _Timer:
    """Records one wall time per step and reports each as it ends."""

    def __init__(self):
        self.timings = {}

    @contextlib.contextmanager
    def step(self, name: str):
        start = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = round(time.monotonic() - start, 3)
            _log(f"{name}: {self.timings[name]:.2f}s")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"(no log at {path})"
    return f"--- last {len(text)} lines of {path} ---\n" + "\n".join(text)


def _clock(seconds: float) -> str:
    return f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"


class Progress:
    """What a long step says while it runs, every `every` seconds: its elapsed time, and what the
    command's output told so far (subclasses read it line by line in `feed`). Plain lines, each on
    its own, so that a journal or a CI log reads as well as a terminal."""

    def __init__(self, what: str, every: float | None = None) -> None:
        self.what, self.started = what, time.monotonic()
        self.every = PROGRESS_SECONDS if every is None else every

    def feed(self, line: str) -> None:
        pass

    def detail(self) -> str:
        return ""

    def report(self) -> str:
        detail = self.detail()
        return f"{self.what}: {_clock(time.monotonic() - self.started)} elapsed" + (f", {detail}" if detail else "")


class MigrateProgress(Progress):
    """`migrate` prints `  Applying app.0001_name... OK` per migration: counted against the plan's
    total (`showmigrations --plan` before it; None if that could not be read)."""

    APPLYING = re.compile(r"Applying \S+\.\.\.")

    def __init__(self, total: int | None, what: str = "netbox migrate", every: float | None = None) -> None:
        super().__init__(what, every)
        self.total, self.applied = total, 0

    def feed(self, line: str) -> None:
        self.applied += len(self.APPLYING.findall(line))

    def detail(self) -> str:
        return f"migrations applied {self.applied}" + (f" of {self.total}" if self.total is not None else "")


def pending_migrations(plan: str) -> int:
    """Migrations not yet applied in the output of `showmigrations --plan` (`[ ]  app.0001_name`)."""
    return sum(1 for line in plan.splitlines() if line.startswith("[ ]"))


class PipProgress(Progress):
    """`pip install` (output not a terminal) prints `Collecting name...` per package, then one
    `Installing collected packages: a, b, ...`."""

    def __init__(self, what: str = "venv install", every: float | None = None) -> None:
        super().__init__(what, every)
        self.collected, self.installing = 0, 0

    def feed(self, line: str) -> None:
        if line.startswith("Collecting "):
            self.collected += 1
        elif line.startswith("Installing collected packages:"):
            self.installing = len(line.split(":", 1)[1].split(","))

    def detail(self) -> str:
        if self.installing:
            return f"{self.collected} packages collected, installing {self.installing}"
        return f"{self.collected} packages collected"


def _run(argv: list, log: Path, env: dict | None = None, progress: Progress | None = None) -> str:
    """Run a command to completion, output appended to `log`; raise with the log's tail on failure.
    With `progress`, its output is read as it comes and a progress line is logged every
    `progress.every` seconds until it ends."""
    with open(log, "ab") as out:
        shown = " ".join(str(arg) if len(str(arg)) < 200 else "<script>" for arg in argv)
        out.write(f"\n$ {shown}\n".encode())
        out.flush()
        environ = {**os.environ, **(env or {})}
        if progress is None:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=out, env=environ)
            stdout, returncode = proc.stdout, proc.returncode
            out.write(stdout)
        else:
            stdout, returncode = _stream(argv, out, {**environ, "PYTHONUNBUFFERED": "1"}, progress)
    if returncode != 0:
        raise PeerError(f"{argv[0]} exited {returncode}\n{_tail(log)}")
    return stdout.decode()


def _stream(argv: list, out, environ: dict, progress: Progress) -> tuple[bytes, int]:
    """Run `argv`, its stdout fed line by line to `progress` and to `out` (stderr goes straight to
    `out`), logging `progress.report()` every `progress.every` seconds; (stdout, exit status)."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=out, env=environ)
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, name=f"read {progress.what}", daemon=True).start()
    chunks = []
    next_report = time.monotonic() + progress.every
    try:
        while True:
            try:
                line = lines.get(timeout=max(0.0, next_report - time.monotonic()))
            except queue.Empty:
                line = b""
            if line is None:
                proc.stdout.close()
                break
            if line:
                chunks.append(line)
                out.write(line)
                out.flush()
                progress.feed(line.decode(errors="replace"))
            if time.monotonic() >= next_report:
                _log(progress.report())
                next_report = time.monotonic() + progress.every
        return b"".join(chunks), proc.wait()
    finally:
        if proc.poll() is None:  # we are being interrupted: the command goes with us
            proc.kill()
            proc.wait()


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        # As gunicorn binds: connections of our previous run in TIME_WAIT must not count as busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_port(preferred: int | None) -> int:
    """The previous port when it is still free (stable URLs across restarts), else a new free one."""
    if preferred and preferred not in FORBIDDEN_PORTS and _port_free(preferred):
        return preferred
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in FORBIDDEN_PORTS:
            return port


def _http(url: str, headers: dict | None = None, timeout: float = 10, method: str = "GET",
          body: bytes | None = None) -> tuple[int, bytes]:
    """A request (GET unless told) without raising on HTTP errors; (0, b'') when nothing answers."""
    request = urllib.request.Request(url, headers=headers or {}, method=method, data=body)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


# --- processes --------------------------------------------------------------------------------


def _alive(pid: int | None, marker: str) -> bool:
    """True if `pid` runs and is ours: not a zombie (reaped late when detached) and its command
    line contains `marker` (guards against a recycled pid)."""
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state != "Z" and marker in cmdline


def _start_detached(argv: list, log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start in its own session with output to `log`, so it outlives us and holds no pipe of ours."""
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, **(env or {})})


def _stop(pid: int | None, marker: str, sig: int, timeout: float = 15) -> None:
    if not _alive(pid, marker):
        return
    os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while _alive(pid, marker):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it if we are its parent (library use)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
        time.sleep(0.05)


def _gunicorn_marker() -> str:
    return str(GUNICORN_PIDFILE)  # on the command line of our gunicorn only


def _introspect_marker(port: int) -> str:
    return f"introspect.py {port}"


# --- state --------------------------------------------------------------------------------------


def _load_state() -> dict:
    try:
        return json.loads(STATE_FILE.read_text())
    except (OSError, ValueError):
        return {}


def _save_state(state: dict) -> None:
    tmp = STATE_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.rename(STATE_FILE)


@contextlib.contextmanager
def _locked():
    """One bring-up/reset/down at a time, also across processes (parallel test runs)."""
    for directory in (CACHE, LOGS, RUN):
        directory.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# --- venv, secrets, configuration ---------------------------------------------------------------


def _venv_ok() -> bool:
    """The venv has the `netbox` script and exactly the pinned versions."""
    if not (VENV / "bin/netbox").exists():
        return False
    check = ("import json, importlib.metadata as m; "
             f"print(json.dumps({{n: m.version(n) for n in {list(VERSIONS)!r}}}))")
    proc = subprocess.run([VENV / "bin/python", "-c", check], capture_output=True, text=True)
    return proc.returncode == 0 and json.loads(proc.stdout) == VERSIONS


def _ensure_venv(timer: _Timer) -> None:
    with timer.step("venv check"):
        if _venv_ok():
            return
    with timer.step("venv install"):
        log = LOGS / "pip.log"
        if not (VENV / "bin/python").exists():
            _run([PYTHON312, "-m", "venv", VENV], log)
        pins = [f"{name}=={version}" for name, version in VERSIONS.items()]
        _log(f"venv install: pip installs NetBox {VERSIONS['netbox']} and its plugins into {VENV} "
             f"(about a minute or two; log {log})")
        _run([VENV / "bin/pip", "install", "--disable-pip-version-check", "--progress-bar", "off", *pins], log,
             progress=PipProgress())
        if not _venv_ok():
            raise PeerError(f"venv at {VENV} lacks the pinned versions\n{_tail(log)}")


def _secrets() -> dict:
    """SECRET_KEY and a token pepper, generated once and kept (the snapshot does not depend on them)."""
    if not SECRETS_FILE.exists():
        def rand(length):
            return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(length))
        tmp = SECRETS_FILE.with_suffix(".tmp")
        # A token pepper must be at least 50 characters.
        tmp.write_text(json.dumps({"SECRET_KEY": rand(60), "PEPPER": rand(64)}))
        tmp.chmod(0o600)
        tmp.rename(SECRETS_FILE)
    return json.loads(SECRETS_FILE.read_text())


CONFIGURATION = """\
# Written by peer/netbox.py on every NetBox start; edits are lost.
from netbox_branching.utilities import DynamicSchemaDict

ALLOWED_HOSTS = ['127.0.0.1', 'localhost']
DATABASES = DynamicSchemaDict({{'default': {{
    'ENGINE': 'django.db.backends.postgresql', 'NAME': {db!r}, 'USER': {pg[user]!r}, 'PASSWORD': '',
    'HOST': {pg[host]!r}, 'PORT': {pg[port]!r}, 'CONN_MAX_AGE': 300, 'CONN_HEALTH_CHECKS': True,
}}}})
DATABASE_ROUTERS = ['netbox_branching.database.BranchAwareRouter']
REDIS = {{
    'tasks': {{'HOST': {redis_host!r}, 'PORT': {redis_port}, 'DATABASE': {redis_dbs[tasks]},
              'USERNAME': '', 'PASSWORD': '', 'SSL': False}},
    'caching': {{'HOST': {redis_host!r}, 'PORT': {redis_port}, 'DATABASE': {redis_dbs[caching]},
                'USERNAME': '', 'PASSWORD': '', 'SSL': False}},
}}
SECRET_KEY = {secret_key!r}
API_TOKEN_PEPPERS = {{1: {pepper!r}}}
DEBUG = False
TIME_ZONE = 'UTC'
# A test instance must not talk to the outside world.
CENSUS_REPORTING_ENABLED = False
RELEASE_CHECK_URL = None
ISOLATED_DEPLOYMENT = True

PLUGINS = ['netbox_diode_plugin', 'netbox_branching']
PLUGINS_CONFIG = {{'netbox_diode_plugin': {{
    # Token introspection goes to {{override}}/auth/introspect: the stand-in (peer/introspect.py).
    'diode_target_override': {introspect_base!r},
    'diode_username': 'diode',
    # Only for NetBox->Diode calls, never made here; set so nothing reads /run/secrets.
    'netbox_to_diode_client_secret': 'netbox-peer-unused',
    'find_obj_cache_ttl': {find_obj_cache_ttl},
}}}}

LOGGING = {{
    'version': 1, 'disable_existing_loggers': False,
    'handlers': {{'console': {{'class': 'logging.StreamHandler'}}}},
    'loggers': {{'netbox.diode_data': {{'handlers': ['console'], 'level': 'WARNING'}}}},
}}
"""


def _write_configuration(introspect_port: int) -> None:
    conf = NETBOX_ROOT / "conf"
    conf.mkdir(parents=True, exist_ok=True)
    keys = _secrets()
    text = CONFIGURATION.format(
        db=DB_NAME, pg=PG, redis_host=REDIS_HOST, redis_port=REDIS_PORT, redis_dbs=REDIS_DBS,
        secret_key=keys["SECRET_KEY"], pepper=keys["PEPPER"],
        introspect_base=f"http://127.0.0.1:{introspect_port}", find_obj_cache_ttl=FIND_OBJ_CACHE_TTL)
    (conf / "configuration.py").write_text(text)


def _netbox_cmd(*args: str, log_name: str, progress: Progress | None = None) -> str:
    """Run `netbox <django command>` (the wheel has no manage.py) against our NETBOX_ROOT."""
    return _run([VENV / "bin/netbox", *args], LOGS / log_name, env={"NETBOX_ROOT": str(NETBOX_ROOT)},
                progress=progress)


def _nbshell(script: str, **env: str) -> dict:
    """Run one of peer/nbshell/*.py inside NetBox; the script prints one JSON line, returned here.
    (`shell -c` execs the whole text; feeding stdin to nbshell would break multi-line blocks.)"""
    code = (HERE / "nbshell" / script).read_text()
    out = _run([VENV / "bin/netbox", "shell", "-c", code], LOGS / "shell.log",
               env={"NETBOX_ROOT": str(NETBOX_ROOT), **env}, progress=Progress(f"netbox shell {script}"))
    return json.loads(out.strip().splitlines()[-1])


# --- PostgreSQL and Redis -----------------------------------------------------------------------


def _pg_args(db: str = "postgres") -> list:
    return ["-h", PG["host"], "-p", PG["port"], "-U", PG["user"], "-d", db]


def _psql(sql: str, db: str = "postgres") -> str:
    return _run(["psql", *_pg_args(db), "-XAtq", "-v", "ON_ERROR_STOP=1", "-c", sql],
                LOGS / "postgres.log").strip()


def _db_stamp() -> str | None:
    """Which versions the database was migrated for, kept as the database's comment:
    None if the database does not exist, '' if it has no stamp."""
    row = _psql(f"select 'db:' || coalesce(shobj_description(oid, 'pg_database'), '') "
                f"from pg_database where datname = '{DB_NAME}'")
    return row.removeprefix("db:") if row else None


def _has_schema() -> bool:
    return _psql("select to_regclass('public.django_migrations') is not null", DB_NAME) == "t"


def _stamp_db() -> None:
    _psql(f"comment on database {DB_NAME} is '{TAG}'")


def _ensure_schema(timer: _Timer) -> None:
    """Create the database if needed; restore the snapshot into an empty one (about 1 s), or
    migrate it (about 5.5 min), bootstrap the admin token and take the snapshot."""
    with timer.step("db check"):
        stamp = _db_stamp()
        if stamp is None:
            _psql(f"create database {DB_NAME}")
        if stamp == TAG:
            return
        empty = not _has_schema()
    if empty and SNAPSHOT.exists():
        with timer.step("snapshot restore"):
            _run(["pg_restore", "--no-owner", *_pg_args(DB_NAME), SNAPSHOT], LOGS / "postgres.log")
    else:
        with timer.step("netbox migrate"):
            _migrate()
        with timer.step("bootstrap admin token"):
            _nbshell("bootstrap.py", PEER_NETBOX_TOKEN=NETBOX_TOKEN)
        if empty:  # only a schema migrated from nothing is a clean snapshot
            with timer.step("snapshot dump"):
                tmp = SNAPSHOT.with_suffix(".tmp")
                _run(["pg_dump", "-Fc", "-f", tmp, *_pg_args(DB_NAME)], LOGS / "postgres.log",
                     progress=Progress("snapshot dump"))
                tmp.rename(SNAPSHOT)
    _stamp_db()


def _migrate() -> None:
    """`netbox migrate`, saying every PROGRESS_SECONDS how many of the plan's migrations are applied
    (the first time, a few hundred in about 5.5 min)."""
    try:
        plan = _netbox_cmd("showmigrations", "--plan", log_name="migrate.log",
                           progress=Progress("netbox showmigrations"))
        total = pending_migrations(plan)
    except PeerError as err:  # only the count is lost
        _log(f"netbox migrate: cannot count the migrations to apply ({str(err).splitlines()[0]})")
        total = None
    _log(f"netbox migrate: {'some' if total is None else total} migrations to apply (the first time about "
         f"5.5 min; progress every {PROGRESS_SECONDS:.0f} s; log {LOGS / 'migrate.log'})")
    progress = MigrateProgress(total)
    _netbox_cmd("migrate", "--no-input", log_name="migrate.log", progress=progress)
    _log(f"netbox migrate: {progress.detail()}")


def _drop_database() -> None:
    _psql(f"drop database if exists {DB_NAME} with (force)")  # also ends NetBox's open sessions


def _flush_redis() -> None:
    """Drop NetBox's tasks and caches, including the plugin's lookup and introspection caches."""
    for db in REDIS_DBS.values():
        _run(["redis-cli", "-h", REDIS_HOST, "-p", str(REDIS_PORT), "-n", str(db), "flushdb"],
             LOGS / "redis.log")


# --- services -----------------------------------------------------------------------------------


def _ensure_introspect(state: dict, timer: _Timer) -> None:
    with timer.step("introspect stand-in"):
        port = state.get("introspect_port")
        if _alive(state.get("introspect_pid"), _introspect_marker(port)) and \
                _http(f"http://127.0.0.1:{port}/health")[0] == 200:
            return
        port = _pick_port(port)
        log = LOGS / "introspect.log"
        proc = _start_detached([VENV / "bin/python", HERE / "introspect.py", str(port)], log)
        state.update(introspect_port=port, introspect_pid=proc.pid)
        _wait(lambda: _http(f"http://127.0.0.1:{port}/health")[0] == 200, 5, proc, log,
              "introspection stand-in")


def _status_ok(port: int | None) -> bool:
    if not port:
        return False
    status, _ = _http(f"http://127.0.0.1:{port}/api/status/", _rest_headers(), timeout=5)
    return status == 200


def _ensure_netbox(state: dict, timer: _Timer) -> None:
    """Start gunicorn unless ours already serves and points at the current stand-in."""
    with timer.step("netbox start"):
        running = _alive(state.get("netbox_pid"), _gunicorn_marker())
        if running and state.get("netbox_introspect_port") == state["introspect_port"] \
                and _status_ok(state.get("netbox_port")):
            return
        _stop_netbox(state)
        _write_configuration(state["introspect_port"])
        port = _pick_port(state.get("netbox_port"))
        log = LOGS / "netbox.log"
        argv = [VENV / "bin/gunicorn", "netbox.wsgi", "--chdir", CACHE, "--bind", f"127.0.0.1:{port}",
                "--workers", "2", "--threads", "2", "--timeout", "300", "--graceful-timeout", "2",
                "--max-requests", "0", "--no-control-socket", "--pid", GUNICORN_PIDFILE,
                "--access-logfile", LOGS / "netbox-access.log", "--error-logfile", log, "--capture-output"]
        proc = _start_detached(argv, log, env={"NETBOX_ROOT": str(NETBOX_ROOT)})
        state.update(netbox_port=port, netbox_pid=proc.pid, netbox_introspect_port=state["introspect_port"])
        _wait(lambda: _status_ok(port), READY_TIMEOUT, proc, log, "NetBox /api/status/")


def _wait(ready, timeout: float, proc: subprocess.Popen, log: Path, what: str) -> None:
    """Poll `ready` every 0.2 s; fail early if the process we just started exited.

    We are its parent, so poll() is exact. Not _alive(): until the kernel has finished loading
    the new program, /proc/<pid>/cmdline can still read empty, and a marker check then
    mistakes a process that is starting for one that died."""
    started = time.monotonic()
    deadline, next_report = started + timeout, started + PROGRESS_SECONDS
    while not ready():
        if proc.poll() is not None:
            raise PeerError(f"{what}: process {proc.pid} exited with {proc.returncode}\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise PeerError(f"{what}: not ready after {timeout:.0f}s\n{_tail(log)}")
        if time.monotonic() >= next_report:
            _log(f"{what}: not ready yet, {_clock(time.monotonic() - started)} elapsed (at most {timeout:.0f} s)")
            next_report += PROGRESS_SECONDS
        time.sleep(0.2)


def _stop_netbox(state: dict) -> None:
    # SIGINT is gunicorn's quick shutdown; workers exit with the master (~2 s, --graceful-timeout).
    _stop(state.pop("netbox_pid", None), _gunicorn_marker(), signal.SIGINT)
    GUNICORN_PIDFILE.unlink(missing_ok=True)


def _peer(state: dict, timings: dict) -> Peer:
    base = f"http://127.0.0.1:{state['netbox_port']}"
    return Peer(plugin_url=f"{base}/api/plugins/diode", netbox_url=base, netbox_token=NETBOX_TOKEN,
                introspect_url=f"http://127.0.0.1:{state['introspect_port']}/auth/introspect",
                pids={"netbox": state["netbox_pid"], "introspect": state["introspect_pid"]},
                timings=timings)


def _bring_up(state: dict, timer: _Timer) -> Peer:
    _ensure_venv(timer)
    _ensure_introspect(state, timer)
    _save_state(state)
    _write_configuration(state["introspect_port"])  # `netbox migrate` and shell read it too
    _ensure_schema(timer)
    _ensure_netbox(state, timer)
    _save_state(state)
    return _peer(state, timer.timings)


# --- public API ---------------------------------------------------------------------------------


def up() -> Peer:
    """Bring the peer up (each step skips what is already there) and return its URLs and pids."""
    timer = _Timer()
    with _locked(), timer.step("up total"):
        return _bring_up(_load_state(), timer)


def reset() -> Peer:
    """Back to an empty NetBox (admin + token only; branches gone) from the snapshot, and start it."""
    timer = _Timer()
    with _locked(), timer.step("reset total"):
        state = _load_state()
        with timer.step("netbox stop"):
            _stop_netbox(state)
        with timer.step("redis flushdb"):
            _flush_redis()
        with timer.step("drop database"):
            _drop_database()
        _save_state(state)
        return _bring_up(state, timer)


def down(purge: bool = False) -> None:
    """Stop what up() started. The venv and snapshot are kept for a fast next up(); so is the
    database, unless `purge` drops it and flushes our Redis dbs (the next up() restores, ~1 s)."""
    timer = _Timer()
    with _locked(), timer.step("down"):
        state = _load_state()
        _stop_netbox(state)
        port = state.get("introspect_port")
        _stop(state.pop("introspect_pid", None), _introspect_marker(port), signal.SIGTERM)
        _save_state(state)
        if purge:
            _flush_redis()
            _drop_database()


def status() -> dict:
    state = _load_state()
    port = state.get("introspect_port")
    return {
        "netbox_running": _alive(state.get("netbox_pid"), _gunicorn_marker()),
        "netbox_ready": _status_ok(state.get("netbox_port")),
        "introspect_running": _alive(state.get("introspect_pid"), _introspect_marker(port)),
        "netbox_url": f"http://127.0.0.1:{state['netbox_port']}" if state.get("netbox_port") else None,
        "pids": {"netbox": state.get("netbox_pid"), "introspect": state.get("introspect_pid")},
        "cache": str(CACHE), "venv": VENV.exists(), "snapshot": SNAPSHOT.exists(), "database": DB_NAME,
    }


def current() -> Peer:
    """The running peer, from the state file (raises if up() has not started it)."""
    state = _load_state()
    if not (_alive(state.get("netbox_pid"), _gunicorn_marker())
            and _alive(state.get("introspect_pid"), _introspect_marker(state.get("introspect_port")))):
        raise PeerError("the NetBox peer is not up; run `python -m peer.netbox up`")
    return _peer(state, {})


def create_default_branch(name: str) -> str:
    """Create (or reuse) a ready netbox-branching Branch, provisioned synchronously because no
    rqworker runs, make it the diode plugin's default branch, and return its schema id.
    The plugin only *reports* the default: callers must still send X-NetBox-Branch."""
    with _locked():
        return _nbshell("branch.py", PEER_BRANCH_NAME=name)["schema_id"]


def _rest_headers(branch: str | None = None) -> dict:
    headers = {"Authorization": f"Token {NETBOX_TOKEN}", "Accept": "application/json"}
    if branch:
        headers["X-NetBox-Branch"] = branch
    return headers


def rest_get(path: str, params: dict | None = None, branch: str | None = None):
    """GET a NetBox REST API path (e.g. '/api/dcim/devices/') as admin; parsed JSON."""
    url = current().netbox_url + path + ("?" + urllib.parse.urlencode(params, doseq=True) if params else "")
    status, body = _http(url, _rest_headers(branch), timeout=60)
    if status != 200:
        raise PeerError(f"GET {url}: HTTP {status}: {body[:500]!r}")
    return json.loads(body)


def rest_patch(path: str, fields: dict) -> dict:
    """PATCH a NetBox object (e.g. '/api/dcim/devices/7/') as admin, as an operator editing by hand."""
    return _rest_write("PATCH", path, fields, 200)


def rest_post(path: str, fields: dict) -> dict:
    """POST a new NetBox object (e.g. to '/api/dcim/sites/') as admin, as an operator adding it by hand."""
    return _rest_write("POST", path, fields, 201)


def _rest_write(method: str, path: str, fields: dict, expected: int) -> dict:
    url = current().netbox_url + path
    status, body = _http(url, {**_rest_headers(), "Content-Type": "application/json"}, timeout=60, method=method,
                         body=json.dumps(fields).encode())
    if status != expected:
        raise PeerError(f"{method} {url}: HTTP {status}: {body[:500]!r}")
    return json.loads(body)


def rest_delete(path: str) -> None:
    """DELETE a NetBox object as admin (what goes with it, NetBox deletes too)."""
    url = current().netbox_url + path
    status, body = _http(url, _rest_headers(), timeout=60, method="DELETE")
    if status != 204:
        raise PeerError(f"DELETE {url}: HTTP {status}: {body[:500]!r}")


def plugin_requests() -> int:
    """Requests the plugin has answered since NetBox started, from gunicorn's access log (every path
    under /api/plugins/diode/ but default-branch/, which only the refresher asks)."""
    path = LOGS / "netbox-access.log"
    if not path.exists():
        return 0
    with open(path, "rb") as log:
        return sum(1 for line in log if b"/api/plugins/diode/" in line and b"default-branch" not in line)


# --- CLI ----------------------------------------------------------------------------------------


def main(argv: list | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    command = args[0] if args else "status"
    try:
        if command in ("up", "reset"):
            peer = up() if command == "up" else reset()
            print(json.dumps(asdict(peer), indent=1))
        elif command == "down":
            down(purge="--purge" in args)
        elif command == "status":
            print(json.dumps(status(), indent=1))
        elif command == "env":
            for key, value in current().env().items():
                print(f"export {key}={value}")
        else:
            print("usage: python -m peer.netbox up|down [--purge]|reset|status|env", file=sys.stderr)
            return 2
    except PeerError as err:
        print(f"[peer] FAILED: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
