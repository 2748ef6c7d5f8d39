"""The supervisor's HTTP endpoint ([metrics] listen): /metrics, /healthz, /readyz.

Served by stdlib http.server from a daemon thread of the supervisor, so it answers while the
supervisor runs, whatever its children do:

- /metrics: every process's metrics, added up from the multiprocess directory (metrics.py).
- /healthz: 200 while the supervisor runs.
- /readyz: 200 only if Postgres answers SELECT 1, Redis answers PING, and, when poll workers run,
  the refresher last found the plugin (and its token endpoint) answering and knows the default
  branch; else 503. The body is JSON naming every check and what failed. Postgres and Redis are
  tried on each request, in parallel, with short timeouts, on connections opened for the request
  (never one inherited across a fork); the plugin's health is the refresher's (dependencies.py),
  which asks it every few seconds.

prometheus_client is imported only in start_server, after metrics.prepare_directory.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import socketserver
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import redis

from . import sharedcache
from .db import Database
from .dependencies import PLUGIN, TOKEN_ENDPOINT, WHAT, down_since
from .errors import DatabaseError
from .roles import STOP_SIGNALS
from .settings import Config
from .streamgroup import redis_client

log = logging.getLogger(__name__)

CHECK_TIMEOUT = 2.0  # seconds, per readiness check
# The supervisor's current config and shared cache (None between generations).
State = Callable[[], tuple[Config, object]]


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


# --- readiness checks: each returns None when fine, or what is wrong ---


def check_postgres(config: Config) -> str | None:
    database = Database(config.postgres.dsn, config.postgres.schema, "reconciler readiness",
                        connect_timeout=max(2, int(CHECK_TIMEOUT)), statement_timeout_ms=int(CHECK_TIMEOUT * 1000))
    try:
        database.fetchall("ping")
        return None
    except DatabaseError as exc:
        return str(exc)
    finally:
        database.close()


def check_redis(config: Config) -> str | None:
    client = redis_client(config.redis.url, "readiness", CHECK_TIMEOUT)
    try:
        client.ping()
        return None
    except (redis.RedisError, OSError) as exc:
        return f"PING failed: {exc}"
    finally:
        client.close()


def check_dependency(cache, dependency: str) -> str | None:
    """The refresher's verdict on the plugin or its token endpoint (dependencies.py): what is wrong
    since when, or None while it answers."""
    view, problem = _view(cache)
    if view is None:
        return problem
    outage = view.outages.get(dependency)
    if outage is None:
        return None
    return f"{WHAT[dependency]} {down_since(outage['since'], outage['problem'])}"


def check_branch(cache) -> str | None:
    view, problem = _view(cache)
    if view is None:
        return problem
    if view.branch_known:
        return None
    return "the default branch is not known yet (the refresher has not reached the plugin)"


def _view(cache) -> tuple[sharedcache.View | None, str | None]:
    """The shared cache, or None and why it cannot be read."""
    if cache is None:
        return None, "the shared cache is being restarted"
    try:
        return sharedcache.read(cache), None
    except sharedcache.PROXY_ERRORS as exc:
        return None, f"the shared cache is unreachable: {exc!r}"


# Held by a readiness probe while its threads are inside libpq, OpenSSL and urllib3, and by the
# supervisor around fork: a child forked while another thread holds one of those libraries' internal
# locks would inherit it locked and hang on its first connection.
FORK_LOCK = threading.Lock()


def readiness(config: Config, cache) -> dict[str, str | None]:
    """Every check, run in parallel: name -> None (fine) or what is wrong."""
    with FORK_LOCK:
        return _run_checks(config, cache)


def _run_checks(config: Config, cache) -> dict[str, str | None]:
    checks: dict[str, Callable[[], str | None]] = {
        "postgres": lambda: check_postgres(config), "redis": lambda: check_redis(config)}
    if config.workers.count > 0:  # the consumer alone needs neither the plugin nor the branch
        checks["plugin"] = lambda: check_dependency(cache, PLUGIN)
        if config.netbox.token_url:
            checks["token_endpoint"] = lambda: check_dependency(cache, TOKEN_ENDPOINT)
        checks["branch"] = lambda: check_branch(cache)
    with ThreadPoolExecutor(max_workers=len(checks), thread_name_prefix="readiness") as pool:
        futures = {name: pool.submit(_guarded, check) for name, check in checks.items()}
        return {name: future.result() for name, future in futures.items()}


def _guarded(check: Callable[[], str | None]) -> str | None:
    try:
        return check()
    except Exception as exc:  # a probe must answer, whatever a client library raises
        log.debug("readiness check failed unexpectedly", exc_info=True)
        return f"{type(exc).__name__}: {exc}"


# --- the server ---


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # or keep-alive answers wait for a delayed ACK
    timeout = 60  # an idle keep-alive connection gives its thread back
    server: _Server

    def log_message(self, format, *args) -> None:  # noqa: A002 (the stdlib's signature)
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._metrics()
        elif path == "/healthz":
            self._send(200, b"ok\n", "text/plain; charset=utf-8")
        elif path == "/readyz":
            self._ready()
        else:
            self._send(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain; charset=utf-8")

    def _metrics(self) -> None:
        try:
            body = self.server.exposition(self.server.registry)
        except Exception as exc:  # an unreadable file in the directory: say so instead of hanging up
            log.warning("cannot collect the metrics: %s", exc, exc_info=True)
            self._send(500, f"cannot collect the metrics: {exc}\n".encode(), "text/plain; charset=utf-8")
            return
        self._send(200, body, self.server.content_type)

    def _ready(self) -> None:
        config, cache = self.server.state()
        results = readiness(config, cache)
        failed = [name for name, problem in results.items() if problem is not None]
        body = {"status": "not ready" if failed else "ready", "failed": failed,
                "checks": {name: problem or "ok" for name, problem in results.items()}}
        self._send(503 if failed else 200, json.dumps(body, indent=1).encode() + b"\n", "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], state: State) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        # Imported here, in the main thread: an import in progress in this thread when the
        # supervisor forks could leave the child a module lock nobody will release.
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector
        self.registry = CollectorRegistry()
        MultiProcessCollector(self.registry)
        self.exposition, self.content_type = generate_latest, CONTENT_TYPE_LATEST
        self.state = state

    def handle_error(self, request, client_address) -> None:
        log.debug("request from %s failed", client_address, exc_info=True)  # e.g. the client hung up

    def server_bind(self) -> None:
        # HTTPServer's own server_bind also resolves the address's FQDN, which can stall on a slow resolver.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]


def start_server(config: Config, state: State) -> _Server | None:
    """Serve [metrics] listen from a daemon thread; None when off or the address cannot be bound.

    Call after metrics.prepare_directory(). A bind failure is logged, not fatal: the pipeline
    matters more than its observation. Forked children close their copy of the listening socket.
    """
    if not config.metrics.listen:
        log.info("metrics and health endpoint off ([metrics] listen is empty)")
        return None
    host, port = split_listen(config.metrics.listen)
    try:
        server = _Server((host, port), state)
    except OSError as exc:
        log.error("cannot serve metrics and health on %s ([metrics] listen): %s; running without them",
                  config.metrics.listen, exc)
        return None
    # The children have no use for the listening socket; a copy held by one would keep the port bound.
    os.register_at_fork(after_in_child=server.socket.close)
    # Stop signals are the main thread's business: the thread starts with them blocked.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    shown = f"[{server.server_name}]" if ":" in server.server_name else server.server_name
    log.info("metrics and health on http://%s:%d/ (/metrics, /healthz, /readyz)", shown, server.server_port)
    return server
