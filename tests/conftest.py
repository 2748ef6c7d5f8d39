"""Fixtures on the machine's real Postgres and Redis.

Each test gets its own database, cloned from a template migrated once per session, and dropped
afterwards; and the session's own Redis db index (claimed, so that two runs on one machine never
share one), flushed before and after. Where the machine's servers do not answer and a Docker engine
exists, throwaway containers are started instead; otherwise the tests fail (never skip): a suite
that skips its database tests proves nothing.

Tiers (markers, setup.cfg): a test that uses these servers is marked `pg`, `subprocess` or `netbox`,
which collection checks; a test without a marker needs no server.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from contextlib import contextmanager

import psycopg2
import pytest
import redis

from reconciler import settings
from reconciler.db import Database

from . import containers
from .faultserver import FaultServer, Step, converge
from .tcpproxy import TcpProxy

# The developer's shell must not leak settings into the tests.
for _name in [n for n in os.environ if n.startswith(settings.ENV_PREFIX)]:
    del os.environ[_name]

PG_ADMIN_DSN = os.environ.get("TEST_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379")
REDIS_DB = os.environ.get("TEST_REDIS_DB")  # a fixed db index instead of a claimed one

# The Redis db indexes a session may claim: 0 holds the claims, 1 is the service's default
# (etc/reconciler.ini, the quick start), 11-13 are the benchmarks' (bench/consume.py, process.py,
# drift.py) and 14-15 the NetBox peer's (peer/netbox.py).
CLAIMABLE_REDIS_DBS = range(2, 11)
CLAIM_KEY = "reconciler-tests:db:{}"  # in db 0, which no test flushes
CLAIM_SECONDS = 120  # a crashed session's claim lapses after this; a live one renews it every 30 s

# Tier markers: a test that uses a fixture needing the servers must carry one of these.
TIERS = ("pg", "subprocess", "netbox")
SERVER_FIXTURE = "servers"  # every fixture that needs Postgres or Redis depends on it


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Refuse a test that uses Postgres/Redis without a tier marker: `-m "not pg ..."` selections
    would silently run it (and fail without servers) or never run it."""
    untiered = [item.nodeid for item in items if SERVER_FIXTURE in getattr(item, "fixturenames", ())
                and not any(item.get_closest_marker(tier) for tier in TIERS)]
    if untiered:
        raise pytest.UsageError("tests using the Postgres/Redis fixtures need a tier marker ("
                                + ", ".join(TIERS) + "; see setup.cfg):\n  " + "\n  ".join(untiered))


def _admin(dsn: str, statement: str) -> None:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute(statement)
    conn.close()


def _with_database(dsn: str, name: str) -> str:
    return dsn.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(scope="session")
def servers():
    """Admin DSN and Redis URL of servers that answer (the machine's own, or containers)."""
    with containers.reachable_servers(PG_ADMIN_DSN, REDIS_URL) as found:
        yield found


@pytest.fixture(scope="session")
def template_db(servers):
    admin_dsn = servers.pg_admin_dsn
    name = f"reconciler_tpl_{os.getpid()}"
    _admin(admin_dsn, f"DROP DATABASE IF EXISTS {name}")
    _admin(admin_dsn, f"CREATE DATABASE {name}")
    database = Database(_with_database(admin_dsn, name), "reconciler")
    database.migrate()
    database.close()
    yield name
    _admin(admin_dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextmanager
def _fresh_database(admin_dsn: str, create: str):
    name = f"reconciler_t_{uuid.uuid4().hex[:12]}"
    _admin(admin_dsn, f"CREATE DATABASE {name} {create}")
    try:
        yield _with_database(admin_dsn, name)
    finally:
        _admin(admin_dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def dsn(servers, template_db):
    """A fresh, migrated database for this test."""
    with _fresh_database(servers.pg_admin_dsn, f"TEMPLATE {template_db}") as url:
        yield url


@pytest.fixture
def empty_dsn(servers):
    """A fresh database with no schema at all (for migration tests)."""
    with _fresh_database(servers.pg_admin_dsn, "") as url:
        yield url


class _RedisDbClaim:
    """A Redis db index held for this session: SET NX of CLAIM_KEY in db 0 with an expiry that a
    thread renews until release() (or until the process dies and the claim lapses)."""

    _RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('expire', KEYS[1], ARGV[2]) end return 0"
    _RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"

    def __init__(self, server_url: str) -> None:
        self._client = redis.Redis.from_url(f"{server_url}/0")
        self._token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.index = next((index for index in CLAIMABLE_REDIS_DBS if self._client.set(
            CLAIM_KEY.format(index), self._token, nx=True, ex=CLAIM_SECONDS)), None)
        if self.index is None:
            self._client.close()
            raise RuntimeError(f"every Redis db index in {CLAIMABLE_REDIS_DBS.start}..{CLAIMABLE_REDIS_DBS.stop - 1} "
                               f"is claimed by another test run ({CLAIM_KEY.format('N')} in db 0); "
                               "wait, or set TEST_REDIS_DB")
        self._key = CLAIM_KEY.format(self.index)
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew, name="redis-db-claim", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(CLAIM_SECONDS / 4):
            try:
                self._client.eval(self._RENEW, 1, self._key, self._token, CLAIM_SECONDS)
            except redis.RedisError:
                pass  # Redis away for a moment: the next turn renews it

    def release(self) -> None:
        self._stop.set()
        self._renewer.join()
        try:
            self._client.eval(self._RELEASE, 1, self._key, self._token)
        finally:
            self._client.close()


@pytest.fixture(scope="session")
def redis_db(servers):
    """This session's Redis db index: TEST_REDIS_DB, or the first of CLAIMABLE_REDIS_DBS no other run holds."""
    if REDIS_DB is not None:
        yield int(REDIS_DB)
        return
    claim = _RedisDbClaim(servers.redis_url)
    try:
        yield claim.index
    finally:
        claim.release()


@pytest.fixture
def redis_url(servers, redis_db):
    """The session's Redis db (every test and every `bin/reconciler` it starts use it), flushed around each test."""
    url = f"{servers.redis_url}/{redis_db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture
def redis_client(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


RETENTION_OFF = {f"RECONCILER_RETENTION_{kind}_DAYS": "0"
                 for kind in ("SUPERSEDED_ROWS", "SUPERSEDED_CHANGE_SETS", "DEAD_LETTERS")}


@pytest.fixture
def env(dsn, redis_url):
    """Environment for a `bin/reconciler` subprocess pointed at this test's database and Redis."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "RECONCILER_POSTGRES_DSN": dsn,
        "RECONCILER_REDIS_URL": redis_url,
        "RECONCILER_REDIS_RECLAIM_IDLE_SECONDS": "1",
        "RECONCILER_SUPERVISOR_DRAIN_SECONDS": "10",
        "RECONCILER_WORKERS_COUNT": "0",
        "RECONCILER_METRICS_LISTEN": "127.0.0.1:0",  # a free port: runs in parallel must not share 9464
        "RECONCILER_API_LISTEN": "off",  # test_api*.py serve it, each on a port of its own
        **RETENTION_OFF,  # its own process; test_retention.py runs it
    }


@pytest.fixture
def redis_proxy(redis_url):
    """(a TCP proxy in front of this test's Redis, the URL through it): proxy.cut() makes Redis vanish."""
    proxy = TcpProxy(int(redis_url.split(":")[2].split("/")[0]))
    yield proxy, redis_url.replace(redis_url.split("/")[2], f"127.0.0.1:{proxy.port}")
    proxy.close()


@pytest.fixture
def postgres_proxy(dsn):
    """(a TCP proxy in front of Postgres, this test's DSN through it): proxy.cut() makes Postgres vanish."""
    proxy = TcpProxy(5432)
    yield proxy, dsn.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    proxy.close()


@pytest.fixture
def config(env):
    """A validated Config for in-process role tests (same settings as `env`)."""
    return settings.load(path="/dev/null", environ=env)


@pytest.fixture(scope="module")
def netbox():
    """The real NetBox with the diode plugin (peer/netbox.py), running and empty: reset once per module,
    so each test of a module works on objects of its own."""
    from peer import netbox as peer

    peer.up()
    yield peer.reset()
    peer.down()


@pytest.fixture
def plugin_factory():
    """Makes scripted plugins (tests/faultserver.py), all closed after the test.

    plugin_factory(branch=None, branch_endpoint=True, applies=True): default-branch/ answers `branch`
    (None: main), or 404 as an older plugin does without `branch_endpoint`; bulk-plan-apply/ plans
    and applies every entity (`converge`), or without `applies` answers only what the test scripts.
    """
    made: list[FaultServer] = []

    def make(branch: dict | None = None, *, branch_endpoint: bool = True, applies: bool = True) -> FaultServer:
        server = FaultServer()
        made.append(server)
        if branch_endpoint:
            server.default("default-branch/", Step(200, {"branch": branch}))
        if applies:
            server.default("bulk-plan-apply/", Step(answer=converge))
        return server

    yield make
    for server in made:
        server.close()


@pytest.fixture
def plugin(request, plugin_factory):
    """The scripted plugin: a healthy one (no default branch, every entity applied), unless the test
    or its module says otherwise with `@pytest.mark.plugin(**plugin_factory arguments)`."""
    marker = request.node.get_closest_marker("plugin")
    return plugin_factory(*marker.args, **marker.kwargs) if marker else plugin_factory()
