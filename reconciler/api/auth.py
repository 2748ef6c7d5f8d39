"""Who may read: the bearer token of each read API call, checked as `[api] auth` says.

- gateway: the diode gateway in front has introspected the token already; like the Go reconciler we
  only read the JWT's `scope` claim (its signature unchecked) and require `[api] scope`. Settings
  refuse this mode off loopback (settings.check_api): anyone reaching the port could forge a JWT.
- introspect: every token is asked about at `[api] introspect_url` (OAuth2 introspection, RFC 7662)
  in the form field `token`. With `[api] introspect_client_id` we authenticate ourselves to it with
  HTTP Basic, as the RFC asks; without, the token also goes as the bearer, which is how Diode's auth
  service and the NetBox peer's stand-in read it. An active answer is kept until the token expires,
  so a client costs one introspection per token; a refusal is kept briefly, in a smaller cache of its
  own, so random tokens cannot push out the good ones.
- token: the token must be the one in `[api] token_file`.

A refusal (refusal.py) is UNAUTHENTICATED for no or a bad token, PERMISSION_DENIED for a good token
without the scope, UNAVAILABLE when the introspection endpoint failed, each with its reason.
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

from ..settings import read_secret_file
from . import refusal
from .refusal import Refused

log = logging.getLogger(__name__)

INTROSPECT_TIMEOUT = urllib3.Timeout(connect=5.0, read=5.0)
UNSTATED_LIFETIME = 300.0  # an active answer without `exp` is kept this long (the plugin's own choice)
REFUSAL_SECONDS = 10.0  # an inactive answer is kept this long: a client retrying a bad token is not an outage
MAX_ACTIVE = 10_000  # tokens whose active answer is kept
MAX_REFUSED = 1_000  # tokens whose refusal is kept


def bearer(metadata: Mapping[str, str]) -> str:
    """The token of `authorization: Bearer <token>`; Refused when the call carries none."""
    value = metadata.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Refused(grpc.StatusCode.UNAUTHENTICATED, refusal.NO_TOKEN,
                      "no bearer token: send the metadata `authorization: Bearer <token>`")
    return token.strip()


def _require_scope(granted: object, scope: str) -> None:
    scopes = granted.split() if isinstance(granted, str) else []
    if scope not in scopes:
        raise Refused(grpc.StatusCode.PERMISSION_DENIED, refusal.SCOPE_MISSING,
                      f"the token does not grant the scope {scope} (it grants: {' '.join(scopes) or 'none'})")


class Gateway:
    def __init__(self, scope: str) -> None:
        self.scope = scope

    def __call__(self, token: str) -> None:
        try:
            claims = jwt.decode(token, options={"verify_signature": False, "verify_exp": True})
        except jwt.ExpiredSignatureError:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, refusal.TOKEN_EXPIRED, "the token has expired") from None
        except jwt.PyJWTError:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, refusal.NOT_A_JWT, "the bearer token is not a JWT") from None
        _require_scope(claims.get("scope"), self.scope)


@dataclass(frozen=True)
class _Answer:
    active: bool
    scope: object
    keep_until: float  # time.time()


class Introspection:
    def __init__(self, url: str, scope: str, connections: int, client_id: str = "", client_secret: str = "") -> None:
        self.url, self.scope = url, scope
        self.http = urllib3.PoolManager(maxsize=connections, retries=False)
        self.client = urllib3.make_headers(basic_auth=f"{client_id}:{client_secret}") if client_id else None
        self._active: dict[bytes, _Answer] = {}
        self._refused: dict[bytes, _Answer] = {}
        self._lock = threading.Lock()

    def __call__(self, token: str) -> None:
        key = hashlib.sha256(token.encode()).digest()  # the caches hold no token
        now = time.time()
        with self._lock:
            answer = self._active.get(key) or self._refused.get(key)
        if answer is None or answer.keep_until <= now:
            answer = self._ask(token, now)
            self._keep(key, answer, now)
        if not answer.active:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, refusal.TOKEN_INACTIVE,
                          "the token is not active (expired, revoked or unknown)")
        _require_scope(answer.scope, self.scope)

    def _ask(self, token: str, now: float) -> _Answer:
        headers = self.client or {"Authorization": f"Bearer {token}"}
        try:
            response = self.http.request("POST", self.url, fields={"token": token, "token_type_hint": "access_token"},
                                         encode_multipart=False, headers=headers, timeout=INTROSPECT_TIMEOUT)
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
        return Refused(grpc.StatusCode.UNAVAILABLE, refusal.INTROSPECTION_FAILED,
                       f"cannot verify the token now: the introspection endpoint gave {what}")

    def _keep(self, key: bytes, answer: _Answer, now: float) -> None:
        kept, limit, other = (self._active, MAX_ACTIVE, self._refused) if answer.active else \
            (self._refused, MAX_REFUSED, self._active)
        with self._lock:
            other.pop(key, None)  # a token's last answer only: a stale grant must not hide a fresh refusal
            if len(kept) >= limit:
                for stale in [k for k, old in kept.items() if old.keep_until <= now]:
                    del kept[stale]
                while len(kept) >= limit:  # all live: forget the oldest
                    del kept[next(iter(kept))]
            kept[key] = answer


def read_secret(path: str) -> str:
    """A token or secret from its file (settings.read_secret_file); ValueError when empty."""
    secret = read_secret_file(path)
    if not secret:
        raise ValueError(f"{path} is empty")
    return secret


class StaticToken:
    def __init__(self, path: str) -> None:
        self.expected = read_secret(path).encode()

    def __call__(self, token: str) -> None:
        if not hmac.compare_digest(token.encode(), self.expected):
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, refusal.WRONG_TOKEN,
                          "the bearer token is not the one this service accepts")


def checker(api) -> Callable[[str], None]:
    """The token check `[api] auth` names; raises Refused for a token it does not accept."""
    if api.auth == "introspect":
        secret = read_secret(api.introspect_client_secret_file) if api.introspect_client_id else ""
        return Introspection(api.introspect_url, api.scope, api.threads, api.introspect_client_id, secret)
    if api.auth == "token":
        return StaticToken(api.token_file)
    return Gateway(api.scope)
