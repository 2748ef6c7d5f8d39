"""Client of the diode NetBox plugin API (docs/plugin.md): one urllib3 pool per process.

Two kinds of failure leave this module, and the worker treats them differently:
- `Unavailable`: nothing said about the entities (connection refused, 429 or 5xx after every retry,
  an authentication or authorisation problem, no time left before the caller's deadline). The rows
  are retried later. Its subclasses: `NotSent`, the caller is stopping and nothing was sent at all;
  `AnswerLost`, the plugin got the request and its answer says nothing of what it did (a 2xx we
  cannot read, a 5xx once apply-change-set/ reached it): it may have applied; and its subclass
  `InDoubt`, a request went unanswered (read timeout, dropped connection, a gateway's 502/504 and
  the like) and NetBox may still be working on it: it is never repeated, and its entities must not be
  sent again before `until` (NetBox does not stop when we stop waiting).
  On the per-entity path, entities not done once the plugin is unavailable come back as results
  with `unavailable` set (`sent` False for those never sent, `answer_lost` and `running_until` as
  above), beside the results of those done.
- per-entity `errors` in a result: the plugin planned or applied and refused. The rows fail.
A whole-call refusal of the content (a 400 with JSON) is reported per entity as a plan error.

No request starts that could not finish before the caller's deadline (the worker's lease) or
once the caller's pacer (its role) is stopping: both are checked after the rate-limit and token
waits, right before sending (and stopping before a token request too). Each request, token
requests included, beats the role's heartbeat first, so a long per-entity batch is not taken for a
hung process, and tells the pacer until when it may still be running in NetBox (`in_flight`), so
that the rows of a worker that dies are not released while NetBox may still be working on them.
"""

from __future__ import annotations

import email.utils
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import orjson
import urllib3

from . import backoff, diagnosis, metrics
from .changesets import error_leaves, malformed_change_set
from .dependencies import PLUGIN, TOKEN_ENDPOINT
from .errors import ReconcilerError
from .ratelimit import SharedRateLimiter
from .settings import plugin_connect_seconds, plugin_request_seconds, read_secret_file
from .text import without_nul

log = logging.getLogger(__name__)

SCOPES = "netbox:read netbox:write"
RETRY_AFTER_CAP = 60.0
RETRY_DELAYS = (0.25, 10.0)  # a failed request is sent again after 0.25 s, doubling up to 10 s
# 5xx answers that end the request: the application's own error, or "unavailable" before it started.
# Any other 5xx is a gateway's (502, 504, a CDN's 52x, 598/599...): the request may still run behind it.
ENDED_5XX = (500, 503)
# The plugin's stable error codes for an apply that NetBox's database could not carry out.
TRANSIENT_APPLY_ERRORS = frozenset({"db_deadlock_after_retries", "db_error"})


class Pacer(Protocol):
    """What the client needs from the process it runs in (a Role provides it)."""

    @property
    def stopping(self) -> bool: ...

    def beat(self) -> None: ...

    def pause(self, seconds: float) -> bool: ...

    def in_flight(self, until: float) -> None: ...


class Unpaced:
    """A pacer for one-off callers (status, tests): plain sleeps, never stopping."""

    stopping = False

    def beat(self) -> None:
        pass

    def pause(self, seconds: float) -> bool:
        time.sleep(seconds)
        return True

    def in_flight(self, until: float) -> None:
        pass


class Unavailable(ReconcilerError):
    """The plugin could not be asked (or would not answer); the entities were not judged. `kind` says
    why when it is known, as diagnosis.py names it."""

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind


class NotSent(Unavailable):
    """The caller is stopping and no request was sent: the rows used no attempt."""


class Unreachable(Unavailable):
    """No request reached the plugin: nothing listens, the name does not resolve, the connection
    could not be made within the timeout, or (TokenUnavailable) no token could be had. What it was
    to carry is untouched and spends no attempt: the worker gives its rows back and waits for the
    plugin (dependencies.py). `kind` says why, as diagnosis.py names it."""

    dependency = PLUGIN


class TokenUnavailable(Unreachable):
    """The token endpoint gave no token (unreachable, or it refused the client's credentials)."""

    dependency = TOKEN_ENDPOINT


class AnswerLost(Unavailable):
    """The plugin got the request, and what it did is unknown: it may have applied."""


class InDoubt(AnswerLost):
    """A request went unanswered: NetBox may still be working on it until `until` (time.time())."""

    def __init__(self, message: str, until: float) -> None:
        super().__init__(message)
        self.until = until


@dataclass
class Result:
    """The plugin's answer for one entity, whatever the endpoint."""

    id: int
    change_set: dict | None = None
    plan_errors: Any = None
    apply_errors: Any = None
    apply_transient: bool = False  # apply_errors are only NetBox's database in trouble: worth a retry
    warnings: list = field(default_factory=list)
    unavailable: str | None = None  # per-entity path: why this entity has no outcome
    sent: bool = True  # False: nothing about this entity was sent, or the plugin surely did not act on it
    answer_lost: bool = False  # the plugin got its request and what it did is unknown
    running_until: float | None = None  # in doubt: its request may run in NetBox until then (time.time())


@dataclass(frozen=True)
class Item:
    """One entity to send: our row id (echoed by the plugin, as text on the wire), its NetBox type and
    its protojson."""

    id: int
    object_type: str
    entity: dict


class Response:
    def __init__(self, status: int, body: bytes, headers) -> None:
        self.status, self.body, self.headers = status, body, headers

    def json_object(self) -> dict | None:
        """The body if it is a JSON object, else None."""
        try:
            body = self.json()
        except Unavailable:
            return None
        return body if isinstance(body, dict) else None

    def json(self) -> Any:
        """The parsed body; Unavailable if it is not JSON (a proxy page, a truncated answer).

        Postgres text and jsonb cannot hold U+0000, yet an entity may carry one (the inbox keeps
        entities as bytes) and the plugin echoes it in change sets and errors; it is replaced by
        U+FFFD here, once for everything that is stored, or the batch could never be recorded.
        """
        try:
            value = orjson.loads(self.body)
        except orjson.JSONDecodeError:
            raise Unavailable(f"HTTP {self.status} with a body that is not JSON: {self.body[:200]!r}") from None
        return without_nul(value) if b"\\u0000" in self.body else value

    def detail(self) -> str:
        try:
            return str(orjson.loads(self.body).get("detail", ""))
        except (orjson.JSONDecodeError, AttributeError):
            return self.body[:200].decode("utf-8", "replace")


class TokenSource:
    """The bearer token: a static one, or OAuth2 client credentials cached until shortly before expiry."""

    def __init__(self, pool: urllib3.PoolManager, token_url: str, client_id: str, client_secret: str,
                 static_token: str, timeout: urllib3.Timeout, pacer: Pacer) -> None:
        self.pool, self.token_url, self.timeout, self.pacer = pool, token_url, timeout, pacer
        self.client_id, self.client_secret, self.static_token = client_id, client_secret, static_token
        self._token, self._renew_at = "", 0.0

    @property
    def renewable(self) -> bool:
        return bool(self.token_url)

    @property
    def due(self) -> bool:
        """Whether the next header() requests a new token first."""
        return self.renewable and (not self._token or time.monotonic() >= self._renew_at)

    def header(self) -> str:
        if not self.renewable:
            return f"Bearer {self.static_token}"
        if self.due:
            self._fetch()
        return f"Bearer {self._token}"

    def invalidate(self) -> None:
        self._token = ""

    def _fetch(self) -> None:
        self.pacer.beat()
        started = time.perf_counter()
        try:
            response = request_token(self.pool, self.token_url, self.client_id, self.client_secret, self.timeout)
        except urllib3.exceptions.HTTPError as exc:
            metrics.plugin_request("token", None, time.perf_counter() - started)
            raise TokenUnavailable(f"token endpoint {self.token_url} unreachable: {exc}",
                                   diagnosis.of_exception(self.token_url, exc).kind) from None
        metrics.plugin_request("token", response.status, time.perf_counter() - started)
        refused = diagnosis.of_token_response(self.token_url, response.status, response.headers, response.data)
        if response.status != 200:
            raise TokenUnavailable(f"token endpoint {self.token_url} answered HTTP {response.status}",
                                   refused.kind if refused else diagnosis.UNEXPECTED)
        try:
            token, lifetime = read_token(response.data)
        except ValueError:
            raise TokenUnavailable(f"token endpoint {self.token_url} answered without an access_token",
                                   diagnosis.UNEXPECTED) from None
        self._token = token
        # Renew with a tenth of the lifetime (at most a minute) to spare, never in a tight loop.
        self._renew_at = time.monotonic() + max(1.0, lifetime - min(60.0, lifetime / 10))
        log.info("obtained a plugin access token valid for %.0f s", lifetime)


def request_token(pool: urllib3.PoolManager, token_url: str, client_id: str, client_secret: str,
                  timeout: urllib3.Timeout) -> urllib3.BaseHTTPResponse:
    """The OAuth2 client-credentials grant, sent once (TokenSource, `check-config --online`); urllib3's
    HTTPError when no answer came."""
    fields = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": client_secret,
              "scope": SCOPES}
    return pool.request("POST", token_url, fields=fields, encode_multipart=False, timeout=timeout, retries=False)


def read_token(body: bytes) -> tuple[str, float]:
    """The access token and its lifetime in seconds from the token endpoint's answer; ValueError
    when it holds none."""
    try:
        answer = orjson.loads(body)
        return answer["access_token"], float(answer.get("expires_in", 300))
    except (ValueError, KeyError, TypeError):
        raise ValueError("the answer holds no access_token") from None


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


def http_pool(netbox, size: int) -> urllib3.PoolManager:
    """Connections to NetBox (plugin or REST API) as [netbox] says: no urllib3 retries (each caller
    decides what may be repeated), TLS verified unless verify_tls is off."""
    return urllib3.PoolManager(num_pools=2, maxsize=size, retries=False,
                               cert_reqs="CERT_REQUIRED" if netbox.verify_tls else "CERT_NONE")


QUICK_PROBE_SECONDS = 5.0  # an operator's `status` waits no longer than this for the plugin


def probe_client(config, limiter: SharedRateLimiter | None = None, pacer: Pacer | None = None,
                 timeout: float | None = None) -> PluginClient:
    """A client that asks once: for health probes (the refresher, `status`), where the next probe is the
    retry. Its read timeout is `timeout`, at most the workers' own (the connection itself is given
    PLUGIN_CONNECT_SECONDS either way)."""
    read = min(timeout, config.netbox.timeout_seconds) if timeout else config.netbox.timeout_seconds
    once = config.replace(**{"netbox.timeout_seconds": read, "netbox.max_attempts": 1})
    return PluginClient(once.netbox, limiter or SharedRateLimiter(0, 1), pacer)


class PluginClient:
    def __init__(self, netbox, limiter: SharedRateLimiter, pacer: Pacer | None = None) -> None:
        """`netbox` is the [netbox] settings section; `pacer` the calling role (its pause ends early
        when it stops)."""
        self.base = netbox.url.rstrip("/") + "/"
        self.timeout = urllib3.Timeout(connect=plugin_connect_seconds(netbox), read=netbox.timeout_seconds)
        self.attempt_seconds = plugin_request_seconds(netbox)
        self.server_timeout = netbox.server_timeout_seconds
        self.max_attempts = netbox.max_attempts
        self.api = netbox.api
        self.limiter = limiter
        self.pacer = pacer or Unpaced()
        self.pool = http_pool(netbox, size=2)
        self.tokens = TokenSource(self.pool, netbox.token_url, netbox.client_id, client_secret(netbox),
                                  netbox.token, self.timeout, self.pacer)
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

    def plan(self, items: list[Item], branch: str | None, deadline: float | None = None) -> dict[int, Result]:
        """Plan only (bulk-plan/, or generate-diff/ per entity on plugins older than 1.12).
        `deadline`: time.monotonic() by which every request must have finished."""
        return self._bulk_or_single("bulk-plan/", items, branch, apply=False, deadline=deadline)

    def plan_apply(self, items: list[Item], branch: str | None, deadline: float | None = None) -> dict[int, Result]:
        """Plan and apply (bulk-plan-apply/, or generate-diff/ + apply-change-set/ per entity)."""
        return self._bulk_or_single("bulk-plan-apply/", items, branch, apply=True, deadline=deadline)

    def apply(self, change_sets: dict[int, dict], branch: str | None,
              deadline: float | None = None) -> dict[int, Result]:
        """Apply stored change sets, keyed by their row ids (bulk-apply/, or apply-change-set/ one by one on
        plugins older than 1.12); results carry apply_errors and warnings. Never sent twice once the
        plugin may have got them: an apply whose answer is lost is left to a fresh plan."""
        ids = list(change_sets)
        if self._bulk is not False:
            response = self._call("POST", "bulk-apply/", {"change_sets": [change_sets[i] for i in ids]}, branch,
                                  deadline, replay_safe=False)
            if response.status != 404:
                self._bulk = True
                return self._bulk_apply_results(response, ids)
            self._no_bulk_endpoints("bulk-apply/")
        return self._each(ids, lambda row_id: self._apply_one(row_id, change_sets[row_id], branch, deadline))

    # --- bulk and single-entity paths ---

    def _bulk_or_single(self, path: str, items: list[Item], branch: str | None, apply: bool,
                        deadline: float | None) -> dict[int, Result]:
        if self._bulk is not False:
            response = self._call("POST", path, {"entities": [_wire_item(item) for item in items]}, branch, deadline)
            if response.status != 404:
                self._bulk = True
                return self._bulk_results(response, path, items, apply)
            self._no_bulk_endpoints(path)
        by_id = {item.id: item for item in items}
        return self._each(list(by_id), lambda row_id: self._single(by_id[row_id], branch, apply, deadline))

    def _no_bulk_endpoints(self, path: str) -> None:
        """A bulk endpoint answered 404: the plugin is older than 1.12 (unless [netbox] api = bulk)."""
        if self._bulk is True and self.api == "bulk":
            raise Unavailable(f"{path} answered 404: is [netbox] url the plugin API base?")
        log.warning("%s answered 404: the plugin is older than 1.12; using its single-entity endpoints", path)
        self._bulk = False

    def _bulk_results(self, response: Response, path: str, items: list[Item], apply: bool) -> dict[int, Result]:
        if response.status == 400 and _is_json(response):
            # The whole envelope was refused; say so for every entity.
            errors = {"request": response.json()}
            return {item.id: Result(item.id, plan_errors=errors) for item in items}
        body = self._expect_json(response, path)
        raw_results = body.get("results")
        if not isinstance(raw_results, list):
            raise AnswerLost(f"{path} answered HTTP {response.status} without a results list")
        results = {}
        for raw in raw_results:
            result = _parse_result(raw, apply)
            if result is not None:
                results[result.id] = result
        return results

    def _each(self, ids: list[int], one: Callable[[int], Result]) -> dict[int, Result]:
        """One row after the other. Once the plugin cannot be asked (down, a stop, the deadline), the
        rows not done are reported unavailable; those done keep their results (some may be applied)."""
        results: dict[int, Result] = {}
        for position, row_id in enumerate(ids):
            try:
                results[row_id] = one(row_id)
            except Unavailable as exc:
                if not results and not isinstance(exc, AnswerLost):
                    raise
                first_unsent = position if isinstance(exc, (NotSent, Unreachable)) else position + 1
                if first_unsent > position:  # this row's request may have reached the plugin
                    results[row_id] = Result(row_id, unavailable=str(exc), answer_lost=isinstance(exc, AnswerLost),
                                             running_until=getattr(exc, "until", None))
                results.update((rest, Result(rest, unavailable=str(exc), sent=False)) for rest in ids[first_unsent:])
                break
        return results

    def _single(self, item: Item, branch: str | None, apply: bool, deadline: float | None) -> Result:
        planned = self._call("POST", "generate-diff/", {"object_type": item.object_type, "entity": item.entity},
                             branch, deadline)
        if planned.status == 404:
            raise Unavailable("generate-diff/ answered 404: no diode plugin API at [netbox] url")
        body = self._expect_json(planned, "generate-diff", accept=(200, 400))
        result = Result(item.id, change_set=body.get("change_set"), plan_errors=body.get("errors"))
        change_set = result.change_set
        if not apply or result.plan_errors or malformed_change_set(change_set) or not (change_set or {}).get("changes"):
            return result
        assert change_set is not None  # it has changes
        applied = self._apply_one(item.id, change_set, branch, deadline)
        result.apply_errors, result.apply_transient = applied.apply_errors, applied.apply_transient
        result.warnings = applied.warnings
        return result

    def _apply_one(self, row_id: int, change_set: dict, branch: str | None, deadline: float | None) -> Result:
        # Not repeated once it may have reached the plugin (a timeout, a 5xx): replaying an old change
        # set can create an object twice. The entity is planned afresh later instead.
        applied = self._call("POST", "apply-change-set/", change_set, branch, deadline, replay_safe=False)
        answer = self._expect_json(applied, "apply-change-set", accept=(200, 400))
        errors = answer.get("errors")
        return Result(row_id, apply_errors=errors, apply_transient=transient_apply_errors(errors),
                      warnings=_warning_list(answer.get("warnings")))

    def _bulk_apply_results(self, response: Response, ids: list[int]) -> dict[int, Result]:
        """bulk-apply/'s results, correlated by position (the plugin answers some failures under ids of its
        own). A result missing from the answer is one whose outcome is unknown."""
        if response.status == 400 and _is_json(response):  # the whole request was refused: nothing applied
            refused = f"bulk-apply/ refused the whole request: {response.body[:300]!r}"
            return {row_id: Result(row_id, unavailable=refused, sent=False) for row_id in ids}
        raw_results = self._expect_json(response, "bulk-apply/").get("results")
        if not isinstance(raw_results, list):
            raise AnswerLost(f"bulk-apply/ answered HTTP {response.status} without a results list")
        results = {}
        for row_id, raw in zip(ids, raw_results):
            errors = raw.get("errors") if isinstance(raw, dict) else {"request": {"__all__": [repr(raw)[:200]]}}
            results[row_id] = Result(row_id, apply_errors=errors, warnings=_warning_list(
                raw.get("warnings") if isinstance(raw, dict) else None),
                apply_transient=transient_apply_errors(errors) or _bulk_apply_deadlock(errors))
        for row_id in ids[len(raw_results):]:
            results[row_id] = Result(row_id, unavailable="bulk-apply/ answered without a result for this change set",
                                     answer_lost=True)
        return results

    def _expect_json(self, response: Response, what: str, accept=(200, 207)) -> Any:
        """The answer as a JSON object; a 2xx that is not one is an answer lost (the plugin did the work)."""
        if response.status in accept:
            body = response.json_object()
            if body is not None:
                return body
        lost = 200 <= response.status < 300
        finding = diagnosis.of_response(self.base, response.status, response.headers, response.body)
        raise (AnswerLost if lost else Unavailable)(f"{what} answered HTTP {response.status}: {response.body[:300]!r}",
                                                    finding.kind if finding else None)

    # --- one call, with rate limit, auth, retries ---

    def _call(self, method: str, path: str, body: Any, branch: str | None, deadline: float | None = None,
              replay_safe: bool = True) -> Response:
        """Send with retries on connection errors, 429 and 5xx; other answers are returned. A request
        that went unanswered is never sent again (InDoubt). Without `replay_safe`, only a request that
        surely did not reach the plugin is sent again."""
        failures, refreshed, reached = 0, False, False
        while True:
            try:
                attempt = self._attempt(method, path, body, branch, deadline)
            except NotSent as exc:
                if failures:  # the failed attempts count, even if this one was never sent
                    raise Unavailable(f"{exc}, after {failures} failed attempts") from None
                raise
            except TokenUnavailable as exc:
                if reached:  # an earlier attempt got to the plugin: this request did, whatever the token does now
                    raise Unavailable(f"{path}: {exc}, after {failures} failed attempts", exc.kind) from None
                raise
            if attempt.response is not None and attempt.response.status == 403:
                if self._refresh_after_403(attempt.response, refreshed):
                    refreshed = True
                    continue
                refused = diagnosis.of_response(self.base + path, 403, attempt.response.headers, attempt.response.body)
                raise Unavailable(f"{path} refused our token (HTTP 403: {attempt.response.detail()})",
                                  refused.kind if refused else None)
            if not attempt.retry:
                assert attempt.response is not None  # a final answer (retry=False) always has one
                return attempt.response
            if attempt.running_until is not None:
                raise InDoubt(f"{path}: {attempt.problem}; not sent again while NetBox may still be working on it",
                              attempt.running_until)
            if attempt.sent and not replay_safe:  # before the attempts: what it did is unknown either way
                raise AnswerLost(f"{path}: {attempt.problem}; not sent again, the plugin may have acted on it")
            # Unreachable only if no attempt got through: an answer (a 429 included) came from the plugin.
            failures, reached = failures + 1, reached or attempt.sent or attempt.response is not None
            if failures >= self.max_attempts:
                if not reached:
                    raise Unreachable(f"{path} failed after {failures} attempts: {attempt.problem}", attempt.kind)
                raise Unavailable(f"{path} failed after {failures} attempts: {attempt.problem}", self._kind(attempt))
            delay = attempt.wait if attempt.wait is not None else backoff.delay(failures, *RETRY_DELAYS)
            if not self._time_left(deadline, delay + self.attempt_seconds):
                raise Unavailable(f"{path}: {attempt.problem}; no time left to retry within the claim's lease")
            log.debug("%s %s: %s; retrying in %.2f s", method, path, attempt.problem, delay)
            if not self.pacer.pause(delay):
                raise Unavailable(f"{path}: stopped while waiting to retry ({attempt.problem})")

    def _attempt(self, method: str, path: str, body: Any, branch: str | None, deadline: float | None) -> _Attempt:
        self.limiter.acquire(self.pacer.pause)  # ends early on a stop, which the next line catches
        self._refuse_if_stopping(path)
        self._refuse_unless_time_for(path, deadline, requests=2 if self.tokens.due else 1)  # a token request first
        headers = {"Authorization": self.tokens.header(), "Accept": "application/json",
                   "Content-Type": "application/json"}
        if branch:
            headers["X-NetBox-Branch"] = branch
        # Checked again last: waiting for the rate limit or a token may have used the time.
        self._refuse_if_stopping(path)
        self._refuse_unless_time_for(path, deadline, requests=1)
        self.pacer.beat()
        # Until then it may run: while we wait for the answer, and in NetBox after we stopped waiting.
        self.pacer.in_flight(time.time() + self.attempt_seconds + self.server_timeout)
        started = time.perf_counter()
        try:
            raw = self.pool.request(method, self.base + path, body=None if body is None else orjson.dumps(body),
                                    headers=headers, timeout=self.timeout, retries=False)
        except urllib3.exceptions.HTTPError as exc:
            metrics.plugin_request(path, None, time.perf_counter() - started)
            if isinstance(exc, urllib3.exceptions.ConnectTimeoutError):  # refused or unreachable: never sent
                self.pacer.in_flight(0.0)
                return _Attempt(None, retry=True, problem=f"{type(exc).__name__}: {exc}", sent=False,
                                kind=diagnosis.of_exception(self.base + path, exc).kind)
            return _Attempt(None, retry=True, problem=f"{type(exc).__name__}: {exc}", running_until=self._gave_up())
        metrics.plugin_request(path, raw.status, time.perf_counter() - started)
        response = Response(raw.status, raw.data, raw.headers)
        if raw.status >= 500 and raw.status not in ENDED_5XX and raw.status != 501:
            return _Attempt(response, retry=True, problem=f"HTTP {raw.status} from a gateway that stopped waiting",
                            running_until=self._gave_up())
        self.pacer.in_flight(0.0)  # answered: it ended
        if raw.status == 429 or (raw.status >= 500 and raw.status != 501):
            return _Attempt(response, retry=True, problem=f"HTTP {raw.status}", sent=raw.status != 429,
                            wait=retry_after(raw.headers.get("Retry-After")))
        return _Attempt(response, retry=False)

    def _kind(self, attempt: _Attempt) -> str | None:
        """What a failed attempt says is wrong (diagnosis.py): from the answer, or why none came."""
        response = attempt.response
        if response is None:
            return attempt.kind
        finding = diagnosis.of_response(self.base, response.status, response.headers, response.body)
        return finding.kind if finding else None

    def _gave_up(self) -> float:
        """Until when a request we stopped waiting for may run: NetBox may have started it only now (it
        queues behind busy workers), and works on it for up to [netbox] server_timeout_seconds."""
        until = time.time() + self.server_timeout
        self.pacer.in_flight(until)
        return until

    def _refuse_if_stopping(self, path: str) -> None:
        if self.pacer.stopping:
            raise NotSent(f"{path}: stopping before the request was sent")

    def _refuse_unless_time_for(self, path: str, deadline: float | None, requests: int) -> None:
        """Unavailable unless `requests` requests could finish before the deadline. Counted against the
        rows, unlike a stop: or a batch could be claimed and given back for ever."""
        if not self._time_left(deadline, requests * self.attempt_seconds):
            raise Unavailable(f"{path}: not sent, it could outlast the claim's lease")

    @staticmethod
    def _time_left(deadline: float | None, seconds: float) -> bool:
        return deadline is None or time.monotonic() + seconds <= deadline

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
    sent: bool = True  # False: surely not acted on (no connection, or 429), safe to send again
    running_until: float | None = None  # no answer: NetBox may be working on it until then (time.time())
    kind: str | None = None  # why no connection could be made (diagnosis.py)


def _is_json(response: Response) -> bool:
    try:
        orjson.loads(response.body)
        return True
    except orjson.JSONDecodeError:
        return False


def _parse_result(raw: Any, apply: bool) -> Result | None:
    """One element of results[] (keys may be missing; plan errors come wrapped on plan-apply)."""
    row_id = _row_id(raw.get("id")) if isinstance(raw, dict) else None
    if row_id is None:
        return None
    result = Result(row_id, change_set=raw.get("change_set"), warnings=_warning_list(raw.get("warnings")))
    errors = raw.get("errors")
    if apply and isinstance(errors, dict) and set(errors) <= {"plan", "apply"}:
        result.plan_errors, result.apply_errors = errors.get("plan"), errors.get("apply")
        result.apply_transient = transient_apply_errors(result.apply_errors)
    else:
        result.plan_errors = errors
    return result


def _warning_list(warnings: Any) -> list:
    """An answer's apply warnings: its list of objects, anything else left out (every endpoint's results go
    through here, so Result.warnings holds dicts only)."""
    return [w for w in warnings if isinstance(w, dict)] if isinstance(warnings, list) else []


def _bulk_apply_deadlock(errors: Any) -> bool:
    """Whether bulk-apply/ failed a change set only on a Postgres deadlock, rolled back and worth another
    try. It has no stable code for that (bulk-plan-apply/ has, see TRANSIENT_APPLY_ERRORS): the
    exception's text, "invalid change_set: deadlock detected ...", is all it says."""
    leaves = error_leaves(errors)
    return bool(leaves) and all(path == "request.change_set" and "deadlock detected" in str(message)
                                for path, message in leaves)


def _row_id(echoed: Any) -> int | None:
    """The row id the plugin echoed (we send it as text), or None when it is not one of ours."""
    if isinstance(echoed, int) and not isinstance(echoed, bool):
        return echoed
    return int(echoed) if isinstance(echoed, str) and echoed.isascii() and echoed.isdigit() else None


def _wire_item(item: Item) -> dict:
    return {"id": str(item.id), "object_type": item.object_type, "entity": item.entity}


def transient_apply_errors(errors: Any) -> bool:
    """Whether an apply failed only because NetBox's database was in trouble (the plugin's stable codes
    under `__all__`, however the lists around them nest), not because of the change set: such a row
    is retried, not FAILED."""
    leaves = error_leaves(errors)
    return bool(leaves) and all(path == "__all__" and message in TRANSIENT_APPLY_ERRORS for path, message in leaves)


def client_secret(netbox) -> str:
    """The OAuth2 client secret: the content of [netbox] client_secret_file, or [netbox] client_secret."""
    if netbox.client_secret_file:
        return read_secret_file(netbox.client_secret_file)
    return netbox.client_secret
