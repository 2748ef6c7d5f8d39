"""Who may read: the bearer token of each read API call, checked as `[api] auth` says.

- gateway: the diode gateway in front has introspected the token already; like the Go reconciler we
  only read the JWT's `scope` claim (its signature unchecked) and require `[api] scope`. Settings
  refuse this mode off loopback (settings.check_api): anyone reaching the port could forge a JWT.
- introspect: every token is asked about at `[api] introspect_url` (OAuth2 introspection, RFC 7662;
  Diode's auth service and the NetBox peer's stand-in read the token from the Authorization header,
  the RFC from the form field `token`: both are sent). An active answer is kept until the token
  expires, so a client costs one introspection per token; a refusal is kept briefly.
- token: the token must be the one in `[api] token_file`.

A refusal is data: the gRPC status code (UNAUTHENTICATED: no or a bad token; PERMISSION_DENIED: a
good token without the scope; UNAVAILABLE: the introspection endpoint failed) and a message for the
caller.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import grpc
import jwt
import orjson
import urllib3

log = logging.getLogger(__name__)

INTROSPECT_TIMEOUT = urllib3.Timeout(connect=5.0, read=5.0)
UNSTATED_LIFETIME = 300.0  # an active answer without `exp` is kept this long (the plugin's own choice)
REFUSAL_SECONDS = 10.0  # an inactive answer is kept this long: a client retrying a bad token is not an outage
MAX_CACHED = 10_000


class Refused(Exception):
    """A call refused: its gRPC status code and the message the caller gets."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def bearer(metadata: Mapping[str, str]) -> str:
    """The token of `authorization: Bearer <token>`; Refused when the call carries none."""
    value = metadata.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Refused(grpc.StatusCode.UNAUTHENTICATED,
                      "no bearer token: send the metadata `authorization: Bearer <token>`")
    return token.strip()


def _require_scope(granted: object, scope: str) -> None:
    scopes = granted.split() if isinstance(granted, str) else []
    if scope not in scopes:
        raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                      f"the token does not grant the scope {scope} (it grants: {' '.join(scopes) or 'none'})")


class Gateway:
    def __init__(self, scope: str) -> None:
        self.scope = scope

    def __call__(self, token: str) -> None:
        try:
            claims = jwt.decode(token, options={"verify_signature": False, "verify_exp": True})
        except jwt.ExpiredSignatureError:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "the token has expired") from None
        except jwt.PyJWTError:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not a JWT") from None
        _require_scope(claims.get("scope"), self.scope)


@dataclass(frozen=True)
class _Answer:
    active: bool
    scope: object
    keep_until: float  # time.time()


class Introspection:
    def __init__(self, url: str, scope: str, connections: int) -> None:
        self.url, self.scope = url, scope
        self.http = urllib3.PoolManager(maxsize=connections, retries=False)
        self._answers: dict[bytes, _Answer] = {}
        self._lock = threading.Lock()

    def __call__(self, token: str) -> None:
        key = hashlib.sha256(token.encode()).digest()  # the cache holds no token
        now = time.time()
        with self._lock:
            answer = self._answers.get(key)
        if answer is None or answer.keep_until <= now:
            answer = self._ask(token, now)
            self._keep(key, answer, now)
        if not answer.active:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "the token is not active (expired, revoked or unknown)")
        _require_scope(answer.scope, self.scope)

    def _ask(self, token: str, now: float) -> _Answer:
        try:
            response = self.http.request("POST", self.url, fields={"token": token, "token_type_hint": "access_token"},
                                         encode_multipart=False, headers={"Authorization": f"Bearer {token}"},
                                         timeout=INTROSPECT_TIMEOUT)
        except urllib3.exceptions.HTTPError as exc:
            raise self._unavailable(f"no answer ({exc})") from None
        if response.status != 200:
            raise self._unavailable(f"HTTP {response.status}")
        try:
            body = orjson.loads(response.data)
            active = body["active"] is True
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise self._unavailable("an answer without `active`") from None
        if not active:
            return _Answer(False, None, now + REFUSAL_SECONDS)
        expires = body.get("exp")
        if isinstance(expires, (int, float)) and not isinstance(expires, bool):
            return _Answer(expires > now, body.get("scope"), float(expires))
        return _Answer(True, body.get("scope"), now + UNSTATED_LIFETIME)

    def _unavailable(self, what: str) -> Refused:
        log.warning("token introspection at %s failed: %s", self.url, what, extra={"event": "introspection_failed"})
        return Refused(grpc.StatusCode.UNAVAILABLE, f"cannot verify the token now: the introspection endpoint "
                                                    f"gave {what}")

    def _keep(self, key: bytes, answer: _Answer, now: float) -> None:
        with self._lock:
            if len(self._answers) >= MAX_CACHED:
                for stale in [k for k, kept in self._answers.items() if kept.keep_until <= now]:
                    del self._answers[stale]
                while len(self._answers) >= MAX_CACHED:  # all live: forget the oldest
                    del self._answers[next(iter(self._answers))]
            self._answers[key] = answer


class StaticToken:
    def __init__(self, path: str) -> None:
        with open(path, encoding="utf-8") as handle:
            self.expected = handle.read().strip().encode()
        if not self.expected:
            raise ValueError(f"[api] token_file {path} is empty")

    def __call__(self, token: str) -> None:
        if not hmac.compare_digest(token.encode(), self.expected):
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not the one this service accepts")


def checker(api) -> Callable[[str], None]:
    """The token check `[api] auth` names; raises Refused for a token it does not accept."""
    if api.auth == "introspect":
        return Introspection(api.introspect_url, api.scope, api.threads)
    if api.auth == "token":
        return StaticToken(api.token_file)
    return Gateway(api.scope)
