"""Client of the diode NetBox plugin API (plugin-api.md): one urllib3 pool per process.

Two kinds of failure leave this module, and the worker treats them differently:
- `Unavailable`: nothing said about the entities (connection refused, timeout, 429 or 5xx after
  every retry, an authentication or authorisation problem). The rows are retried later.
- per-entity `errors` in a result: the plugin planned or applied and refused. The rows fail.
A whole-call refusal of the content (a 400 with JSON) is reported per entity as a plan error.
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import orjson
import urllib3

from . import metrics
from .errors import ReconcilerError
from .ratelimit import SharedRateLimiter

log = logging.getLogger(__name__)

SCOPES = "netbox:read netbox:write"
RETRY_AFTER_CAP = 60.0


class Unavailable(ReconcilerError):
    """The plugin could not be asked (or would not answer); the entities were not judged."""


@dataclass
class Result:
    """The plugin's answer for one entity, whatever the endpoint."""

    id: str
    change_set: dict | None = None
    plan_errors: Any = None
    apply_errors: Any = None
    warnings: list = field(default_factory=list)


@dataclass(frozen=True)
class Item:
    """One entity to send: our row id (echoed by the plugin), its NetBox type and its protojson."""

    id: str
    object_type: str
    entity: dict


class Response:
    def __init__(self, status: int, body: bytes, headers) -> None:
        self.status, self.body, self.headers = status, body, headers

    def json(self) -> Any:
        """The parsed body; Unavailable if it is not JSON (a proxy page, a truncated answer)."""
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError:
            raise Unavailable(f"HTTP {self.status} with a body that is not JSON: {self.body[:200]!r}") from None

    def detail(self) -> str:
        try:
            return str(orjson.loads(self.body).get("detail", ""))
        except (orjson.JSONDecodeError, AttributeError):
            return self.body[:200].decode("utf-8", "replace")


class TokenSource:
    """The bearer token: a static one, or OAuth2 client credentials cached until shortly before expiry."""

    def __init__(self, pool: urllib3.PoolManager, token_url: str, client_id: str, client_secret: str,
                 static_token: str, timeout: urllib3.Timeout) -> None:
        self.pool, self.token_url, self.timeout = pool, token_url, timeout
        self.client_id, self.client_secret, self.static_token = client_id, client_secret, static_token
        self._token, self._renew_at = "", 0.0

    @property
    def renewable(self) -> bool:
        return bool(self.token_url)

    def header(self) -> str:
        if not self.renewable:
            return f"Bearer {self.static_token}"
        if not self._token or time.monotonic() >= self._renew_at:
            self._fetch()
        return f"Bearer {self._token}"

    def invalidate(self) -> None:
        self._token = ""

    def _fetch(self) -> None:
        fields = {"grant_type": "client_credentials", "client_id": self.client_id,
                  "client_secret": self.client_secret, "scope": SCOPES}
        started = time.perf_counter()
        try:
            response = self.pool.request("POST", self.token_url, fields=fields, encode_multipart=False,
                                         timeout=self.timeout, retries=False)
        except urllib3.exceptions.HTTPError as exc:
            metrics.plugin_request("token", None, time.perf_counter() - started)
            raise Unavailable(f"token endpoint {self.token_url} unreachable: {exc}") from None
        metrics.plugin_request("token", response.status, time.perf_counter() - started)
        if response.status != 200:
            raise Unavailable(f"token endpoint {self.token_url} answered HTTP {response.status}")
        try:
            answer = orjson.loads(response.data)
            token, lifetime = answer["access_token"], float(answer.get("expires_in", 300))
        except (ValueError, KeyError, TypeError):
            raise Unavailable(f"token endpoint {self.token_url} answered without an access_token") from None
        self._token = token
        # Renew with a tenth of the lifetime (at most a minute) to spare, never in a tight loop.
        self._renew_at = time.monotonic() + max(1.0, lifetime - min(60.0, lifetime / 10))
        log.info("obtained a plugin access token valid for %.0f s", lifetime)


def retry_after(header: str | None) -> float | None:
    """Seconds from a Retry-After header (delta seconds or an HTTP date), capped; None if absent."""
    if not header:
        return None
    try:
        seconds = float(header)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(header).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), RETRY_AFTER_CAP)


class PluginClient:
    def __init__(self, netbox, limiter: SharedRateLimiter, sleep: Callable[[float], bool] | None = None) -> None:
        """`netbox` is the [netbox] settings section; `sleep` may end early (returns False) when stopping."""
        self.base = netbox.url.rstrip("/") + "/"
        self.timeout = urllib3.Timeout(connect=5.0, read=netbox.timeout_seconds)
        self.max_attempts = netbox.max_attempts
        self.api = netbox.api
        self.limiter = limiter
        self.sleep = sleep or (lambda seconds: time.sleep(seconds) or True)
        self.pool = urllib3.PoolManager(num_pools=2, maxsize=2, retries=False,
                                        cert_reqs="CERT_REQUIRED" if netbox.verify_tls else "CERT_NONE")
        self.tokens = TokenSource(self.pool, netbox.token_url, netbox.client_id, _client_secret(netbox),
                                  netbox.token, self.timeout)
        self._bulk = {"auto": None, "bulk": True, "single": False}[netbox.api]

    # --- endpoints ---

    def default_branch(self) -> dict | None:
        """The plugin's default branch ({"id", "name"}) or None; a plugin without the endpoint has none."""
        response = self._call("GET", "default-branch/", None, None)
        if response.status == 404:
            return None
        body = self._expect_json(response, "default-branch")
        branch = body.get("branch") if isinstance(body, dict) else None
        if branch is not None and not (isinstance(branch, dict) and branch.get("id")):
            raise Unavailable(f"default-branch answered an unexpected body: {response.body[:200]!r}")
        return branch

    def plan(self, items: list[Item], branch: str | None) -> dict[str, Result]:
        """Plan only (bulk-plan/, or generate-diff/ per entity on plugins older than 1.12)."""
        return self._bulk_or_single("bulk-plan/", items, branch, apply=False)

    def plan_apply(self, items: list[Item], branch: str | None) -> dict[str, Result]:
        """Plan and apply (bulk-plan-apply/, or generate-diff/ + apply-change-set/ per entity)."""
        return self._bulk_or_single("bulk-plan-apply/", items, branch, apply=True)

    # --- bulk and single-entity paths ---

    def _bulk_or_single(self, path: str, items: list[Item], branch: str | None, apply: bool) -> dict[str, Result]:
        if self._bulk is not False:
            response = self._call("POST", path, {"entities": [vars(item) for item in items]}, branch)
            if response.status != 404:
                self._bulk = True
                return self._bulk_results(response, path, items, apply)
            if self._bulk is True and self.api == "bulk":
                raise Unavailable(f"{path} answered 404: is [netbox] url the plugin API base?")
            log.warning("%s answered 404: the plugin is older than 1.12; using generate-diff/ per entity", path)
            self._bulk = False
        return {item.id: self._single(item, branch, apply) for item in items}

    def _bulk_results(self, response: Response, path: str, items: list[Item], apply: bool) -> dict[str, Result]:
        if response.status == 400 and _is_json(response):
            # The whole envelope was refused; say so for every entity.
            errors = {"request": response.json()}
            return {item.id: Result(item.id, plan_errors=errors) for item in items}
        body = self._expect_json(response, path)
        raw_results = body.get("results") if isinstance(body, dict) else None
        if not isinstance(raw_results, list):
            raise Unavailable(f"{path} answered HTTP {response.status} without a results list")
        results = {}
        for raw in raw_results:
            result = _parse_result(raw, apply)
            if result is not None:
                results[result.id] = result
        return results

    def _single(self, item: Item, branch: str | None, apply: bool) -> Result:
        planned = self._call("POST", "generate-diff/", {"object_type": item.object_type, "entity": item.entity}, branch)
        if planned.status == 404:
            raise Unavailable("generate-diff/ answered 404: no diode plugin API at [netbox] url")
        body = self._expect_json(planned, "generate-diff", accept=(200, 400))
        result = Result(item.id, change_set=body.get("change_set"), plan_errors=body.get("errors"))
        changes = (result.change_set or {}).get("changes") or []
        if not apply or result.plan_errors or not changes:
            return result
        applied = self._call("POST", "apply-change-set/", result.change_set, branch)
        answer = self._expect_json(applied, "apply-change-set", accept=(200, 400))
        result.apply_errors = answer.get("errors")
        result.warnings = answer.get("warnings") or []
        return result

    def _expect_json(self, response: Response, what: str, accept=(200, 207)) -> Any:
        if response.status in accept:
            body = response.json()
            if isinstance(body, dict):
                return body
        raise Unavailable(f"{what} answered HTTP {response.status}: {response.body[:300]!r}")

    # --- one call, with rate limit, auth, retries ---

    def _call(self, method: str, path: str, body: Any, branch: str | None) -> Response:
        """Send with retries on transport errors, timeouts, 429 and 5xx; other answers are returned."""
        failures, refreshed = 0, False
        while True:
            attempt = self._attempt(method, path, body, branch)
            if attempt.response is not None and attempt.response.status == 403:
                if self._refresh_after_403(attempt.response, refreshed):
                    refreshed = True
                    continue
                raise Unavailable(f"{path} refused our token (HTTP 403: {attempt.response.detail()})")
            if not attempt.retry:
                return attempt.response
            failures += 1
            if failures >= self.max_attempts:
                raise Unavailable(f"{path} failed after {failures} attempts: {attempt.problem}")
            delay = attempt.wait if attempt.wait is not None else _backoff(failures)
            log.debug("%s %s: %s; retrying in %.2f s", method, path, attempt.problem, delay)
            if not self.sleep(delay):
                raise Unavailable(f"{path}: stopped while waiting to retry ({attempt.problem})")

    def _attempt(self, method: str, path: str, body: Any, branch: str | None) -> "_Attempt":
        self.limiter.acquire()
        headers = {"Authorization": self.tokens.header(), "Accept": "application/json",
                   "Content-Type": "application/json"}
        if branch:
            headers["X-NetBox-Branch"] = branch
        started = time.perf_counter()
        try:
            raw = self.pool.request(method, self.base + path, body=None if body is None else orjson.dumps(body),
                                    headers=headers, timeout=self.timeout, retries=False)
        except urllib3.exceptions.HTTPError as exc:
            metrics.plugin_request(path, None, time.perf_counter() - started)
            return _Attempt(None, retry=True, problem=f"{type(exc).__name__}: {exc}")
        metrics.plugin_request(path, raw.status, time.perf_counter() - started)
        response = Response(raw.status, raw.data, raw.headers)
        if raw.status == 429 or (raw.status >= 500 and raw.status != 501):
            return _Attempt(response, retry=True, problem=f"HTTP {raw.status}",
                            wait=retry_after(raw.headers.get("Retry-After")))
        return _Attempt(response, retry=False)

    def _refresh_after_403(self, response: Response, refreshed: bool) -> bool:
        """A renewable token rejected once ("Invalid token": expired, revoked, auth restarted) is renewed."""
        if not self.tokens.renewable or refreshed or "permission" in response.detail().lower():
            return False
        log.info("the plugin rejected our token (%s); renewing it once", response.detail())
        self.tokens.invalidate()
        return True


@dataclass
class _Attempt:
    response: Response | None
    retry: bool
    problem: str = ""
    wait: float | None = None  # from Retry-After


def _backoff(failures: int) -> float:
    """Jittered exponential delay before retry number `failures` (0.25 s doubling, 10 s at most)."""
    return min(10.0, 0.25 * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)


def _is_json(response: Response) -> bool:
    try:
        orjson.loads(response.body)
        return True
    except orjson.JSONDecodeError:
        return False


def _parse_result(raw: Any, apply: bool) -> Result | None:
    """One element of results[] (keys may be missing; plan errors come wrapped on plan-apply)."""
    if not isinstance(raw, dict) or raw.get("id") is None:
        return None
    result = Result(str(raw["id"]), change_set=raw.get("change_set"), warnings=raw.get("warnings") or [])
    errors = raw.get("errors")
    if apply and isinstance(errors, dict) and set(errors) <= {"plan", "apply"}:
        result.plan_errors, result.apply_errors = errors.get("plan"), errors.get("apply")
    else:
        result.plan_errors = errors
    return result


def _client_secret(netbox) -> str:
    if netbox.client_secret_file:
        with open(netbox.client_secret_file, encoding="utf-8") as handle:
            return handle.read().strip()
    return netbox.client_secret
