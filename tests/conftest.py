"""Fixtures on the machine's real Postgres and Redis.

Each test gets its own database, cloned from a template migrated once per session, and dropped
afterwards; and a Redis db index of its own, flushed before and after. Where the machine's servers
do not answer and a Docker engine exists, throwaway containers are started instead; otherwise the
tests fail (never skip): a suite that skips its database tests proves nothing.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager

import psycopg2
import pytest
import redis

from reconciler import settings
from reconciler.db import Database

from . import containers
from .faultserver import FaultServer, Step, converge

# The developer's shell must not leak settings into the tests.
for _name in [n for n in os.environ if n.startswith(settings.ENV_PREFIX)]:
    del os.environ[_name]

PG_ADMIN_DSN = os.environ.get("TEST_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379")
REDIS_DB = int(os.environ.get("TEST_REDIS_DB", "12"))


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


@pytest.fixture
def redis_url(servers):
    url = f"{servers.redis_url}/{REDIS_DB}"
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
    }


@pytest.fixture
def config(env):
    """A validated Config for in-process role tests (same settings as `env`)."""
    return settings.load(path="/dev/null", environ=env)


@pytest.fixture
def plugin():
    """The scripted plugin answering as a healthy one: no default branch, every entity applied."""
    server = FaultServer()
    server.default("default-branch/", Step(200, {"branch": None}))
    server.default("bulk-plan-apply/", Step(answer=converge))
    yield server
    server.close()
