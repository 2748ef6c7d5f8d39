"""Why a dependency cannot be used, told from how a request failed or what it answered: pure
functions, no I/O, so `check-config --online` and the running service describe a problem alike.

A `Finding` says what is wrong as data, `kind` (the contract scripts and tests rely on; the wording
of `problem` and `advice` may change), the problem in one line, and what to change, naming the
setting. For the diode plugin (its endpoints under `[netbox] url`):

- `of_exception(url, exc)`: no answer (urllib3's exceptions): the name does not resolve (dns),
  nothing listens (refused), the certificate is not trusted or the port speaks no TLS (tls), no
  answer in time (timeout), the connection dropped (reset), anything else (unreachable).
- `of_response(url, status, headers, body)`: an answer that shows the URL is not the plugin's API or
  that the plugin refused us: HTML instead of JSON, or a redirect (html, redirect), 404 (not_found),
  the token refused or lacking a scope (unauthorized, forbidden), 429, 5xx; None when the plugin
  took the request: a 2xx, or a 400 in JSON, whose validation error proves the endpoint exists
  and let us in.
- `without_bulk_endpoints(url, api)`: bulk-plan/ answered 404 where generate-diff/ exists (plugin
  older than 1.12).
- `of_token_response(url, status, headers, body)`: the token endpoint's answer to the OAuth2
  client-credentials grant (bad client id or secret, scope refused, ...).
- `of_postgres_error(message)`, `of_redis_error(url, exc)`: the same for the other two dependencies.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import urllib.parse
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import orjson
import redis
import urllib3

# Kinds: what is wrong, as data.
DNS = "dns"
REFUSED = "refused"
TLS = "tls"
TIMEOUT = "timeout"
RESET = "reset"
UNREACHABLE = "unreachable"
HTML = "html"
REDIRECT = "redirect"
NOT_FOUND = "not_found"
OLD_PLUGIN = "old_plugin"
UNAUTHORIZED = "unauthorized"
FORBIDDEN = "forbidden"
RATE_LIMITED = "rate_limited"
SERVER_ERROR = "server_error"
UNEXPECTED = "unexpected"
BAD_CLIENT = "bad_client"
BAD_SCOPE = "bad_scope"
TOKEN_REFUSED = "token_refused"
NO_DATABASE = "no_database"
AUTH = "auth"
REDIS_ERROR = "redis_error"

PLUGIN_PATH = "/api/plugins/diode"
PLUGIN_URL = "[netbox] url"
TOKEN_URL = "[netbox] token_url"
# The OAuth2 scope each plugin endpoint requires (plugin-api.md §3.2); the plugin's 403 does not say which.
ENDPOINT_SCOPES = {
    "default-branch/": "netbox:read", "generate-diff/": "netbox:read", "bulk-plan/": "netbox:read",
    "apply-change-set/": "netbox:write", "bulk-apply/": "netbox:write", "bulk-plan-apply/": "netbox:write",
}
# The plugin's 403 details (DRF's wording, which the plugin keeps): a rejected token, no token, a scope missing.
INVALID_TOKEN_DETAIL = "invalid token"
NO_CREDENTIALS_DETAIL = "credentials were not provided"
NO_PERMISSION_DETAIL = "permission"
GATEWAY_STATUSES = (502, 503, 504)


@dataclass(frozen=True)
class Finding:
    kind: str
    problem: str  # one line: what was seen
    advice: str  # what to change


# --- no answer ---


def of_exception(url: str, exc: BaseException, setting: str = PLUGIN_URL, service: str = "NetBox") -> Finding:
    """Why a request to `url` got no answer (a urllib3 exception, or what it wraps). `setting` holds
    the URL and `service` is what should answer there, for the advice."""
    causes, where = list(_causes(exc)), _host_port(url)
    found = _socket_finding(url, where, causes, setting, service)
    if found is not None:
        return found
    if _any(causes, ssl.SSLCertVerificationError):
        reason = next(c for c in causes if isinstance(c, ssl.SSLCertVerificationError)).verify_message
        return Finding(TLS, f"{url}: TLS certificate verify failed ({reason})",
                       f"give this machine the CA that signed {where}'s certificate (the system trust store, or "
                       f"SSL_CERT_FILE), or set [netbox] verify_tls = false to accept any certificate")
    if _any(causes, ssl.SSLError, urllib3.exceptions.SSLError):
        return Finding(TLS, f"{url}: TLS handshake failed ({_innermost(causes)})",
                       f"does {where} speak TLS? use http:// or https:// in {setting} as the server does")
    if _any(causes, urllib3.exceptions.ProtocolError, ConnectionResetError, http.client.RemoteDisconnected):
        return Finding(RESET, f"{url}: the connection was dropped without an answer ({_innermost(causes)})",
                       f"is {where} an HTTP server (a proxy, or another service on that port)? check {setting}")
    return Finding(UNREACHABLE, f"{url}: {_innermost(causes)}", f"can this machine reach {where}? check {setting}")


def _socket_finding(url: str, where: str, causes: list[BaseException], setting: str, service: str) -> Finding | None:
    """The failures any TCP client meets (HTTP or Redis alike): DNS, refused, timeout. `url` is shown
    (its password masked), `where` is its host:port."""
    host = where.rsplit(":", 1)[0]
    if _any(causes, socket.gaierror, urllib3.exceptions.NameResolutionError):
        return Finding(DNS, f"{url}: the name {host} does not resolve",
                       f"correct the host name in {setting}, or its DNS")
    if _any(causes, ConnectionRefusedError):
        return Finding(REFUSED, f"{url}: connection refused (nothing listens on {where})",
                       f"is {service} running, and is the port in {setting} right?")
    # urllib3's NewConnectionError is a ConnectTimeoutError too (for compatibility): only a real one counts.
    if any(isinstance(cause, urllib3.exceptions.ConnectTimeoutError)
           and not isinstance(cause, urllib3.exceptions.NewConnectionError) for cause in causes):
        return Finding(TIMEOUT, f"{url}: no connection to {where} within the timeout",
                       f"is {where} reachable from here (host up, no firewall dropping packets)? check {setting}")
    if _any(causes, TimeoutError, socket.timeout, urllib3.exceptions.ReadTimeoutError, redis.TimeoutError):
        return Finding(TIMEOUT, f"{url}: connected to {where}, but no answer within the timeout",
                       f"is the service at {where} overloaded or hung? check it, and the port in {setting}")
    return None


# --- the plugin's answers ---


def of_response(url: str, status: int, headers: Mapping[str, str], body: bytes,
                credential: str = "[netbox] token") -> Finding | None:
    """What a plugin endpoint's answer says is wrong, or None if the plugin took the request.
    `credential` names where the token came from, for the advice when it is refused."""
    if 300 <= status < 400:
        return _redirect(url, headers.get("Location", ""))
    if status >= 500:
        return _server_error(url, status, body)
    if _is_html(headers, body) and not _at_plugin_path(url):
        return Finding(HTML, f"{url} answers HTML (HTTP {status}), not the plugin's JSON API",
                       f"{PLUGIN_URL} must end with {PLUGIN_PATH} (NetBox's URL, its BASE_PATH if any, then "
                       f"{PLUGIN_PATH})")
    if status == 404:
        return Finding(NOT_FOUND, f"{url} answered 404: no such endpoint",
                       f"is the diode plugin installed in that NetBox (PLUGINS), and does {PLUGIN_URL} include "
                       f"NetBox's BASE_PATH before {PLUGIN_PATH}?")
    if status in (401, 403):
        return _refused(url, status, body, credential)
    if status == 429:
        return Finding(RATE_LIMITED, f"{url} answered 429: too many requests",
                       "something in front of NetBox limits the rate: lower [netbox] rate_limit_per_second")
    if _is_html(headers, body):
        return Finding(HTML, f"{url} answers HTML (HTTP {status}), not the plugin's JSON API",
                       "something in front of NetBox (a proxy, a login page) answers instead of the plugin: "
                       f"{PLUGIN_URL} must reach NetBox's API directly")
    if 200 <= status < 300 or (status == 400 and _json(body) is not None):
        return None
    return Finding(UNEXPECTED, f"{url} answered HTTP {status}: {_snippet(body)}",
                   f"is {PLUGIN_URL} the diode plugin's API? compare its version with what this reconciler expects")


def without_bulk_endpoints(url: str, api: str) -> Finding:
    """bulk-plan/ (or another bulk endpoint) answered 404 while generate-diff/ exists: plugin older than 1.12."""
    if api == "auto":
        advice = ("the workers fall back to generate-diff/ per entity after each start's first 404; set "
                  "[netbox] api = single to say so, or upgrade the plugin to 1.12 or later for the bulk endpoints")
    else:
        advice = "set [netbox] api = single (or auto), or upgrade the plugin to 1.12 or later"
    return Finding(OLD_PLUGIN, f"{url} answered 404, but generate-diff/ exists: the plugin is older than 1.12",
                   advice)


def _redirect(url: str, location: str) -> Finding:
    target = urllib.parse.urljoin(url, location)
    ours, theirs = urllib.parse.urlsplit(url), urllib.parse.urlsplit(target)
    if (ours.scheme, theirs.scheme) == ("http", "https"):
        return Finding(REDIRECT, f"{url} redirects to https ({target})", f"use https:// in {PLUGIN_URL}")
    if not _at_plugin_path(url):
        return Finding(HTML, f"{url} redirects to {target}: that is a web page, not the plugin's JSON API",
                       f"{PLUGIN_URL} must end with {PLUGIN_PATH} (NetBox's URL, its BASE_PATH if any, then "
                       f"{PLUGIN_PATH})")
    return Finding(REDIRECT, f"{url} redirects to {target}",
                   f"a request redirected loses its body and method: set {PLUGIN_URL} to where it leads")


def _server_error(url: str, status: int, body: bytes, service: str = "NetBox") -> Finding:
    if status in GATEWAY_STATUSES:
        return Finding(SERVER_ERROR, f"{url} answered HTTP {status} from a gateway: {_snippet(body)}",
                       f"the proxy in front of {service} cannot reach it: is {service} running?")
    return Finding(SERVER_ERROR, f"{url} answered HTTP {status}: {_snippet(body)}",
                   f"{service} failed: its log says why")


def _refused(url: str, status: int, body: bytes, credential: str) -> Finding:
    detail = _detail(body)
    seen = f"{url} answered HTTP {status}: {detail or _snippet(body)}"
    lowered = detail.lower()
    if NO_PERMISSION_DETAIL in lowered:
        scope = ENDPOINT_SCOPES.get(_endpoint(url), "netbox:read netbox:write")
        return Finding(FORBIDDEN, f"{seen} (the token lacks the scope {scope})",
                       f"{credential} must carry the scopes 'netbox:read netbox:write': give them to its OAuth2 "
                       f"client in Diode's auth service (clients made on the plugin's credentials page have "
                       f"diode:ingest only and cannot use this API)")
    if NO_CREDENTIALS_DETAIL in lowered:
        return Finding(UNAUTHORIZED, f"{seen} (no Bearer token reached the plugin)",
                       "set [netbox] token or [netbox] token_url; a proxy in between may drop the Authorization "
                       "header")
    if INVALID_TOKEN_DETAIL in lowered or status == 401:
        return Finding(UNAUTHORIZED, f"{seen} (the token was rejected)",
                       f"{credential} is not a token Diode's auth service accepts (wrong, expired or revoked: a "
                       f"NetBox API token will not do), or NetBox cannot reach that service to check it (the "
                       f"plugin's diode_target)")
    return Finding(FORBIDDEN, seen, f"something refuses {credential}: {'the plugin' if detail else 'a proxy'} "
                                    f"says {detail or _snippet(body)!r}")


# --- the token endpoint ---


def of_token_response(url: str, status: int, headers: Mapping[str, str], body: bytes) -> Finding | None:
    """What the token endpoint's answer to the client-credentials grant says is wrong, or None when
    it issued an access token."""
    if 300 <= status < 400 or status >= 500 or status == 404 or _is_html(headers, body):
        return _token_url_finding(url, status, headers, body)
    answer = _json(body)
    error = str(answer.get("error", "")) if isinstance(answer, dict) else ""
    said = f"{url} answered HTTP {status}: {_snippet(body)}"
    if error == "invalid_client" or status == 401:
        return Finding(BAD_CLIENT, f"{said} (client id or secret refused)",
                       "check [netbox] client_id and client_secret_file (or client_secret): the client "
                       "diode-to-netbox of the Diode deployment, with its secret")
    if error == "invalid_scope":
        return Finding(BAD_SCOPE, f"{said} (scope 'netbox:read netbox:write' refused)",
                       "give the OAuth2 client named by [netbox] client_id the scopes netbox:read and netbox:write")
    if error:
        return Finding(TOKEN_REFUSED, f"{said} ({error})",
                       "the client named by [netbox] client_id may not use the client-credentials grant: check "
                       "it in Diode's auth service")
    if status != 200 or not (isinstance(answer, dict) and answer.get("access_token")):
        return Finding(UNEXPECTED, f"{said} (no access_token)",
                       f"is {TOKEN_URL} Diode's token endpoint (…/auth/token)?")
    return None


def _token_url_finding(url: str, status: int, headers: Mapping[str, str], body: bytes) -> Finding:
    """An answer that shows `url` is no token endpoint (or that the service behind it fails)."""
    if status >= 500:
        return _server_error(url, status, body, "Diode's auth service")
    kind = NOT_FOUND if status == 404 else REDIRECT if 300 <= status < 400 else HTML
    return Finding(kind,
                   f"{url} answered HTTP {status}{' in HTML' if _is_html(headers, body) else ''}: not a token endpoint",
                   f"{TOKEN_URL} must be the token endpoint of Diode's auth service, e.g. "
                   f"https://diode.example.net/diode/auth/token")


# --- Postgres and Redis ---

# libpq's messages: it tells these apart by text only (no SQLSTATE reaches a client that never connected).
_POSTGRES_MESSAGES = (
    ("could not translate host name", DNS),
    ("connection refused", REFUSED),
    ("no such file or directory", REFUSED),  # a Unix socket nobody listens on
    ("timeout expired", TIMEOUT),
    ("does not exist", NO_DATABASE),  # database "x" does not exist; role "x" is caught before
    ("authentication failed", AUTH),
    ("no pg_hba.conf entry", AUTH),
)


def of_postgres_error(message: str) -> Finding:
    """Why Postgres could not be connected to, from libpq's message."""
    lowered = message.lower()
    if "role" in lowered and "does not exist" in lowered:
        kind = AUTH
    else:
        kind = next((kind for text, kind in _POSTGRES_MESSAGES if text in lowered), UNREACHABLE)
    return Finding(kind, message, {
        DNS: "correct the host name in [postgres] dsn, or its DNS",
        REFUSED: "is Postgres running, and are the host and port in [postgres] dsn right?",
        TIMEOUT: "is the Postgres host reachable from here (up, no firewall dropping packets)? check [postgres] dsn",
        NO_DATABASE: "create that database (createdb NAME) or correct the database name in [postgres] dsn",
        AUTH: "correct the user or password in [postgres] dsn, or let it in (pg_hba.conf, CREATE ROLE)",
    }.get(kind, "check [postgres] dsn"))


def of_redis_error(url: str, exc: BaseException) -> Finding:
    """Why Redis at `url` (its password masked) could not be used."""
    where = _host_port(url, default_port=6379)
    if isinstance(exc, redis.AuthenticationError) or "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
        return Finding(AUTH, f"{url}: authentication failed ({exc})",
                       "put the right user:password (ACL) or :password (requirepass) in [redis] url")
    found = _socket_finding(url, where, list(_causes(exc)), "[redis] url", "Redis")
    if found is not None:
        return found
    if isinstance(exc, redis.ResponseError):
        return Finding(REDIS_ERROR, f"{url}: Redis answered {exc}",
                       "check [redis] url (its db index, its user's permissions)")
    return Finding(UNREACHABLE, f"{url}: {exc}", "check [redis] url")


# --- helpers ---


def _causes(exc: BaseException | None) -> Iterator[BaseException]:
    """The exception and what it wraps (cause, context, urllib3's `reason`), outermost first."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__ or getattr(exc, "reason", None)
        if not isinstance(exc, BaseException):
            exc = None


def _any(causes: list[BaseException], *types: type[BaseException]) -> bool:
    return any(isinstance(cause, types) for cause in causes)


def _innermost(causes: list[BaseException]) -> str:
    last = causes[-1]
    return f"{type(last).__name__}: {last}" if str(last) else type(last).__name__


def _host_port(url: str, default_port: int | None = None) -> str:
    parts = urllib.parse.urlsplit(url)
    port = parts.port or default_port or {"https": 443, "http": 80}.get(parts.scheme)
    return f"{parts.hostname}:{port}"


def _endpoint(url: str) -> str:
    """The plugin endpoint a URL names (`bulk-plan/`), or ""."""
    last = urllib.parse.urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1] + "/"
    return last if last in ENDPOINT_SCOPES else ""


def _at_plugin_path(url: str) -> bool:
    """Whether `url` (an endpoint's, or the base) is under a path ending with /api/plugins/diode."""
    path = urllib.parse.urlsplit(url).path.rstrip("/")
    if _endpoint(url):
        path = path.rsplit("/", 1)[0]
    return path.endswith(PLUGIN_PATH)


def _is_html(headers: Mapping[str, str], body: bytes) -> bool:
    content_type = (headers.get("Content-Type") or "").lower()
    start = body[:1024].lstrip().lower()  # NetBox's pages begin with blank lines from its templates
    return "html" in content_type or start.startswith((b"<!doctype html", b"<html"))


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _detail(body: bytes) -> str:
    answer = _json(body)
    return str(answer.get("detail", "")) if isinstance(answer, dict) else ""


def _snippet(body: bytes, width: int = 160) -> str:
    text = " ".join(body[:width * 2].decode("utf-8", "replace").split())
    return text[:width] + ("…" if len(text) > width else "") if text else "(empty body)"
