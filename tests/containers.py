"""Fallback for machines without local Postgres/Redis: throwaway containers, where Docker runs."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg2
import redis


@dataclass(frozen=True)
class Servers:
    pg_admin_dsn: str
    redis_url: str


def _postgres_answers(dsn: str) -> bool:
    try:
        psycopg2.connect(dsn, connect_timeout=3).close()
        return True
    except psycopg2.OperationalError:
        return False


def _redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=3).ping())
    except redis.RedisError:
        return False


def _docker_client():
    try:
        import docker

        client = docker.from_env()
        client.ping()
        return client
    except Exception as exc:  # noqa: BLE001 - no SDK, no socket, no engine: all mean "no fallback here"
        raise RuntimeError(f"no Docker engine to fall back to ({exc})") from None


def _wait(check, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} container did not become ready")
        time.sleep(0.5)


@contextmanager
def reachable_servers(pg_admin_dsn: str, redis_url: str):
    """The given servers if they answer; else containers of the same kind; else a failure naming both."""
    started = []
    try:
        if not (_postgres_answers(pg_admin_dsn) and _redis_answers(redis_url)):
            pg_admin_dsn, redis_url = _start_containers(pg_admin_dsn, redis_url, started)
        yield Servers(pg_admin_dsn, redis_url)
    finally:
        for container in started:
            container.remove(force=True)


def _start_containers(pg_admin_dsn: str, redis_url: str, started: list):
    try:
        client = _docker_client()
    except RuntimeError as exc:
        raise RuntimeError(f"Postgres at {pg_admin_dsn} or Redis at {redis_url} does not answer, and {exc}. "
                           "Start them (see .ci/run) before running the tests.") from None
    if not _postgres_answers(pg_admin_dsn):
        pg = client.containers.run("postgres:15", detach=True, environment={"POSTGRES_HOST_AUTH_METHOD": "trust"},
                                   ports={"5432/tcp": ("127.0.0.1", None)})
        started.append(pg)
        pg.reload()
        port = pg.ports["5432/tcp"][0]["HostPort"]
        pg_admin_dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        _wait(lambda: _postgres_answers(pg_admin_dsn), "Postgres")
    if not _redis_answers(redis_url):
        rd = client.containers.run("redis:7", detach=True, ports={"6379/tcp": ("127.0.0.1", None)})
        started.append(rd)
        rd.reload()
        redis_url = f"redis://127.0.0.1:{rd.ports['6379/tcp'][0]['HostPort']}"
        _wait(lambda: _redis_answers(redis_url), "Redis")
    return pg_admin_dsn, redis_url
