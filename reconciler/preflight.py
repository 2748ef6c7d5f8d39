"""`reconciler check-config --online`: each dependency tried in order, one verdict per check.

1. postgres: connect to [postgres] dsn.
2. schema: at the version this reconciler needs. Behind passes with a note when `run` migrates it
   ([postgres] migrate_on_start), and fails otherwise (run `reconciler migrate`).
3. redis: PING [redis] url.
4. consumer group: [redis] group on [redis] stream. A missing stream or group passes: the consumer
   creates the group at the start of the stream, so the entries already there are read.
5. token endpoint: the OAuth2 client-credentials grant on [netbox] token_url, as the workers ask it;
   a static token needs none.
6. default branch: GET default-branch/ (404 from a plugin that exists: older than 1.5, no branch).
7. plan: the endpoint the workers call first, with nothing in it, so it reads and writes nothing:
   bulk-plan-apply/ with auto_apply, which needs the scope netbox:write, else bulk-plan/ (netbox:read);
   generate-diff/ (and apply-change-set/ with auto_apply) with [netbox] api = single. The plugin
   (1.18.3) refuses an empty batch with a JSON 400 after it checked the token and its scope: that
   proves the endpoint and the token. A 404 where generate-diff/ exists is a plugin older than 1.12.

A check that needs an earlier one that failed is skipped, saying so; the plugin's checks (5-7) pass
unchecked with [workers] count = 0, since only the workers use the plugin. What a failure means and
what to change is diagnosis.py's, so that the service can describe its failures the same way.
Every connection is new and short-lived (5 s to connect, a few seconds to answer), with no retries:
this is an operator's question, not the workers' traffic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import orjson
import redis
import urllib3

from . import diagnosis
from .db import Database, latest_version
from .diagnosis import Finding
from .errors import DatabaseError
from .plugin import client_secret, http_pool, read_token, request_token
from .settings import Config, mask_url_password
from .streamgroup import group_info, redis_client
from .text import as_text, one_line

CONNECT_SECONDS = 5.0
ANSWER_SECONDS = 15.0  # an empty batch or the branch: NetBox answers in milliseconds when it works

POSTGRES, SCHEMA, REDIS, CONSUMER_GROUP = "postgres", "schema", "redis", "consumer group"
TOKEN_ENDPOINT, DEFAULT_BRANCH, PLAN = "token endpoint", "default branch", "plan"
PLUGIN_CHECKS = (TOKEN_ENDPOINT, DEFAULT_BRANCH, PLAN)
# A check is skipped when the one it needs failed: its failure would only repeat that one's (the plan
# goes to the same address, with the same token, as the default branch).
NEEDS = {SCHEMA: POSTGRES, CONSUMER_GROUP: REDIS, DEFAULT_BRANCH: TOKEN_ENDPOINT, PLAN: DEFAULT_BRANCH}

# Verdict kinds beyond diagnosis.py's: a pass, a pass worth a note, a check not made.
OK = "ok"
CONFIG = "config"  # the offline check refused the configuration
SCHEMA_BEHIND, SCHEMA_AHEAD, SCHEMA_UNREADABLE = "schema_behind", "schema_ahead", "schema_unreadable"
NO_STREAM, NO_GROUP, NOT_A_STREAM = "no_stream", "no_group", "not_a_stream"
STATIC_TOKEN = "static_token"
NO_BRANCH_ENDPOINT = "no_branch_endpoint"
SKIPPED, NOT_USED = "skipped", "not_used"


@dataclass(frozen=True)
class Verdict:
    name: str
    ok: bool
    kind: str  # OK, a note's kind, one of diagnosis.py's, or SKIPPED
    detail: str
    advice: str = ""  # what to change; on a pass, a note

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def failed(name: str, finding: Finding) -> Verdict:
    return Verdict(name, False, finding.kind, finding.problem, finding.advice)


class Session:
    """What the checks share, in order: the Postgres connection, the Redis client, the bearer token."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.database = Database(config.postgres.dsn, config.postgres.schema, "reconciler check-config",
                                 connect_timeout=int(CONNECT_SECONDS), statement_timeout_ms=int(ANSWER_SECONDS * 1000))
        self.redis_url = mask_url_password(config.redis.url)
        self.redis = redis_client(config.redis.url, "check-config", CONNECT_SECONDS)
        netbox = config.netbox
        self.pool = http_pool(netbox, size=1)
        self.timeout = urllib3.Timeout(connect=CONNECT_SECONDS, read=min(ANSWER_SECONDS, netbox.timeout_seconds))
        self.base = netbox.url.rstrip("/") + "/"
        self.bearer = "" if netbox.token_url else netbox.token  # with token_url, the token endpoint's check fills it
        self.credential = (f"the token of client {netbox.client_id!r} from [netbox] token_url" if netbox.token_url
                           else "[netbox] token")

    def close(self) -> None:
        self.database.close()
        self.redis.close()
        self.pool.clear()


# --- Postgres ---


def check_postgres(session: Session) -> Verdict:
    try:
        info = session.database.connect().info
    except DatabaseError as exc:
        return failed(POSTGRES, diagnosis.of_postgres_error(one_line(str(exc))))
    version = f"{info.server_version // 10000}.{info.server_version % 10000}"
    return Verdict(POSTGRES, True, OK, f"connected to {info.host}:{info.port}/{info.dbname} as {info.user} "
                                       f"(PostgreSQL {version})")


def check_schema(session: Session) -> Verdict:
    schema, wanted = session.config.postgres.schema, latest_version()
    try:
        current = session.database.schema_version()
    except DatabaseError as exc:
        return Verdict(SCHEMA, False, SCHEMA_UNREADABLE, f"cannot read schema {schema}'s version: {one_line(str(exc))}",
                       "let the [postgres] dsn user use that schema (reconciler migrate creates it)")
    at = f"schema {schema} is at version {current}, this reconciler needs {wanted}"
    if current > wanted:
        return Verdict(SCHEMA, False, SCHEMA_AHEAD, f"{at}: a newer reconciler migrated it",
                       "run that newer reconciler, or point [postgres] schema at this version's schema")
    if current < wanted and session.config.postgres.migrate_on_start:
        return Verdict(SCHEMA, True, SCHEMA_BEHIND, at,
                       "`reconciler run` migrates it at start ([postgres] migrate_on_start = true)")
    if current < wanted:
        return Verdict(SCHEMA, False, SCHEMA_BEHIND, at,
                       "run `reconciler migrate` (or set [postgres] migrate_on_start = true)")
    return Verdict(SCHEMA, True, OK, f"schema {schema} is at version {current}")


# --- Redis ---


def check_redis(session: Session) -> Verdict:
    try:
        session.redis.ping()
    except (redis.RedisError, OSError) as exc:
        return failed(REDIS, diagnosis.of_redis_error(session.redis_url, exc))
    return Verdict(REDIS, True, OK, f"{session.redis_url} answered PING")


def check_consumer_group(session: Session) -> Verdict:
    stream, group = session.config.redis.stream, session.config.redis.group
    try:
        key_type = as_text(session.redis.type(stream))
        if key_type != "stream":
            return _no_stream(stream, group, key_type)
        return _group(group, stream, group_info(session.redis, stream, group), session.redis.xlen(stream))
    except (redis.RedisError, OSError) as exc:
        return failed(CONSUMER_GROUP, diagnosis.of_redis_error(session.redis_url, exc))


def _no_stream(stream: str, group: str, key_type: str) -> Verdict:
    if key_type == "none":
        return Verdict(CONSUMER_GROUP, True, NO_STREAM, f"stream {stream} does not exist yet",
                       f"the consumer creates it with group {group} when it starts; the ingester adds to it")
    return Verdict(CONSUMER_GROUP, False, NOT_A_STREAM, f"key {stream} holds a {key_type}, not a stream",
                   "check the db index in [redis] url (the ingester's REDIS_STREAM_DB) and [redis] stream")


def _group(group: str, stream: str, info: dict | None, length: int) -> Verdict:
    if info is None:
        return Verdict(CONSUMER_GROUP, True, NO_GROUP, f"stream {stream} ({length} entries) has no group {group}",
                       "the consumer creates it at the start of the stream, so the entries already there are read")
    lag = info.get("lag")
    return Verdict(CONSUMER_GROUP, True, OK, f"group {group} on {stream}: {length} entries, {info['pending']} pending, "
                                             f"lag {'unknown' if lag is None else lag}, {info['consumers']} consumers")


# --- the plugin ---


def check_token_endpoint(session: Session) -> Verdict:
    netbox = session.config.netbox
    if not netbox.token_url:
        return Verdict(TOKEN_ENDPOINT, True, STATIC_TOKEN, "static token, no token endpoint")
    try:
        response = request_token(session.pool, netbox.token_url, netbox.client_id, client_secret(netbox),
                                 session.timeout)
    except urllib3.exceptions.HTTPError as exc:
        return failed(TOKEN_ENDPOINT, diagnosis.of_exception(netbox.token_url, exc, diagnosis.TOKEN_URL,
                                                             "Diode's auth service"))
    finding = diagnosis.of_token_response(netbox.token_url, response.status, response.headers, response.data)
    if finding is not None:
        return failed(TOKEN_ENDPOINT, finding)
    session.bearer, lifetime = read_token(response.data)
    return Verdict(TOKEN_ENDPOINT, True, OK, f"client {netbox.client_id} got a token valid for {lifetime:.0f} s")


def check_default_branch(session: Session) -> Verdict:
    response, finding = ask(session, "GET", "default-branch/")
    if finding is not None and finding.kind == diagnosis.NOT_FOUND and plugin_exists(session):
        return Verdict(DEFAULT_BRANCH, True, NO_BRANCH_ENDPOINT,
                       f"{finding.problem}, but generate-diff/ exists: the plugin is older than 1.5",
                       "such a plugin has no default branch: entities go to NetBox's main")
    if finding is not None:
        return failed(DEFAULT_BRANCH, finding)
    assert response is not None  # no finding without an answer
    body = _json(response.data)
    if not isinstance(body, dict) or "branch" not in body:
        return Verdict(DEFAULT_BRANCH, False, diagnosis.UNEXPECTED, f"default-branch/ answered {said(response)}",
                       f"is {diagnosis.PLUGIN_URL} the diode plugin's API?")
    branch = body["branch"]
    if not branch:
        return Verdict(DEFAULT_BRANCH, True, OK, "no default branch: entities go to NetBox's main")
    return Verdict(DEFAULT_BRANCH, True, OK, f"default branch {branch.get('name')!r} ({branch.get('id')})")


def check_plan(session: Session) -> Verdict:
    netbox, auto_apply = session.config.netbox, session.config.workers.auto_apply
    if netbox.api == "single":
        probes: list[tuple[str, dict]] = [("generate-diff/", {})] + ([("apply-change-set/", {})] if auto_apply else [])
        return _single_entity_endpoints(session, probes)
    path = "bulk-plan-apply/" if auto_apply else "bulk-plan/"
    response, finding = ask(session, "POST", path, {"entities": []})
    if finding is not None and finding.kind == diagnosis.NOT_FOUND and plugin_exists(session):
        old = diagnosis.without_bulk_endpoints(session.base + path, netbox.api)
        return Verdict(PLAN, netbox.api == "auto", old.kind, old.problem, old.advice)
    if finding is not None:
        return failed(PLAN, finding)
    assert response is not None
    return Verdict(PLAN, True, OK, f"{path} took an empty batch: {said(response)}")


def _single_entity_endpoints(session: Session, probes: list[tuple[str, dict]]) -> Verdict:
    """[netbox] api = single: each endpoint the workers use, with an empty body (refused, nothing done)."""
    answers = []
    for path, body in probes:
        response, finding = ask(session, "POST", path, body)
        if finding is not None:
            return failed(PLAN, finding)
        assert response is not None
        answers.append(f"{path} {said(response)}")
    return Verdict(PLAN, True, OK, "; ".join(answers))


def plugin_exists(session: Session) -> bool:
    """Whether the diode plugin answers at [netbox] url: generate-diff/, there since 1.0, takes an
    empty body (400) or refuses our token; only a 404 (or no answer) says no plugin."""
    response, finding = ask(session, "POST", "generate-diff/", {})
    return response is not None and (finding is None or finding.kind in (diagnosis.UNAUTHORIZED, diagnosis.FORBIDDEN))


def ask(session: Session, method: str, path: str, body: Any = None,
        ) -> tuple[urllib3.BaseHTTPResponse | None, Finding | None]:
    """One request to a plugin endpoint: its answer (None without one) and what is wrong with it, if anything."""
    url = session.base + path
    headers = {"Accept": "application/json", "Content-Type": "application/json"}
    if session.bearer:
        headers["Authorization"] = f"Bearer {session.bearer}"
    try:
        # No redirect followed: one would turn the POST into a GET, and where it leads is the finding.
        response = session.pool.request(method, url, body=None if body is None else orjson.dumps(body),
                                        headers=headers, timeout=session.timeout, retries=False, redirect=False)
    except urllib3.exceptions.HTTPError as exc:
        return None, diagnosis.of_exception(url, exc)
    return response, diagnosis.of_response(url, response.status, response.headers, response.data, session.credential)


def said(response: urllib3.BaseHTTPResponse) -> str:
    text = one_line(response.data[:400].decode("utf-8", "replace"), width=200)
    return f"HTTP {response.status} {text}"


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


# --- running them ---

CHECKS: tuple[tuple[str, Callable[[Session], Verdict]], ...] = (
    (POSTGRES, check_postgres), (SCHEMA, check_schema), (REDIS, check_redis), (CONSUMER_GROUP, check_consumer_group),
    (TOKEN_ENDPOINT, check_token_endpoint), (DEFAULT_BRANCH, check_default_branch), (PLAN, check_plan))


def run(config: Config) -> list[Verdict]:
    """Every check, in order; one that needs a failed one is skipped."""
    session = Session(config)
    verdicts: dict[str, Verdict] = {}
    try:
        for name, check in CHECKS:
            verdicts[name] = _not_checked(name, config, verdicts) or check(session)
    finally:
        session.close()
    return list(verdicts.values())


def _not_checked(name: str, config: Config, verdicts: dict[str, Verdict]) -> Verdict | None:
    if name in PLUGIN_CHECKS and config.workers.count == 0:
        return Verdict(name, True, NOT_USED, "not checked: with [workers] count = 0 nothing uses the plugin")
    need = NEEDS.get(name)
    if need is not None and not verdicts[need].ok:
        return Verdict(name, False, SKIPPED, f"not checked: it needs {need}, which failed")
    return None


def render(verdict: Verdict) -> str:
    """One line per check, and the advice under it (a note on a pass)."""
    mark = "ok  " if verdict.ok else "FAIL"
    line = f"{mark} {verdict.name:<15} {verdict.detail}"
    if verdict.advice and verdict.kind != SKIPPED:
        line += f"\n     {'':<15} {'note' if verdict.ok else 'change'}: {verdict.advice}"
    return line
