"""`reconciler check-config --online`, run as an operator runs it, against the real NetBox peer, the
scripted plugin for what NetBox will not do on demand, and addresses where nothing (or the wrong
thing) answers. Each test checks the exit code and the verdicts' kinds (--json), not their wording."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from reconciler import diagnosis, preflight
from reconciler.diagnosis import PLUGIN_PATH

from .faultserver import Step
from .support import cli

FORBIDDEN_DETAIL = {"detail": "You do not have permission to perform this action."}
EMPTY_BATCH_REFUSED = {"errors": {"request": {"entities": ["a non-empty list of entities is required"]}}}


def online(env: dict[str, str], **settings: str) -> tuple[int, dict[str, dict]]:
    """check-config --online --json with these RECONCILER_* settings: its exit code and verdicts by name."""
    done = cli({**env, **settings}, "check-config", "--online", "--json")
    assert done.stdout.startswith("["), f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    verdicts = json.loads(done.stdout)
    assert [v["name"] for v in verdicts] == ["configuration", *(name for name, _ in preflight.CHECKS)], done.stderr
    return done.returncode, {verdict["name"]: verdict for verdict in verdicts}


def kinds(verdicts: dict[str, dict]) -> dict[str, str]:
    return {name: verdict["kind"] for name, verdict in verdicts.items()}


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def with_workers(env):
    """The test's Postgres and Redis, with poll workers and a token: the plugin's checks run."""
    return {**env, "RECONCILER_WORKERS_COUNT": "2", "RECONCILER_NETBOX_TOKEN": "t"}


# --- the real NetBox peer ---


@pytest.fixture
def peer_env(with_workers, netbox):
    return {**with_workers, **netbox.env()}


@pytest.mark.netbox
@pytest.mark.parametrize("auto_apply, api", [("true", "auto"), ("false", "bulk"), ("true", "single")])
def test_every_check_passes_against_a_real_netbox(peer_env, auto_apply, api):
    code, verdicts = online(peer_env, RECONCILER_WORKERS_AUTO_APPLY=auto_apply, RECONCILER_NETBOX_API=api)

    assert code == 0, verdicts
    assert kinds(verdicts) == {"configuration": "ok", "postgres": "ok", "schema": "ok", "redis": "ok",
                               "consumer group": preflight.NO_STREAM, "token endpoint": preflight.STATIC_TOKEN,
                               "default branch": "ok", "plan": "ok"}


@pytest.mark.netbox
def test_the_text_report_has_one_line_per_check_and_exit_0(peer_env):
    done = cli(peer_env, "check-config", "--online")

    assert done.returncode == 0, done.stdout + done.stderr
    verdict_lines = [line for line in done.stdout.splitlines() if not line.startswith(" ")]
    assert [line.split()[0] for line in verdict_lines] == ["ok"] * (1 + len(preflight.CHECKS)), done.stdout


@pytest.mark.netbox
@pytest.mark.parametrize("path", ["", "/dcim/devices/"])
def test_netboxs_own_pages_instead_of_the_plugin_api_are_told_html(peer_env, netbox, path):
    env = {name: value for name, value in peer_env.items() if name != "RECONCILER_NETBOX_API_TOKEN"}
    code, verdicts = online(env, RECONCILER_NETBOX_URL=netbox.netbox_url + path)

    assert code == 1
    assert kinds(verdicts)["default branch"] == diagnosis.HTML, verdicts["default branch"]
    assert PLUGIN_PATH in verdicts["default branch"]["advice"]
    assert kinds(verdicts)["plan"] == preflight.SKIPPED


@pytest.mark.netbox
def test_a_plugin_path_netbox_does_not_serve_is_told_not_found(peer_env, netbox):
    env = {name: value for name, value in peer_env.items() if name != "RECONCILER_NETBOX_API_TOKEN"}
    code, verdicts = online(env, RECONCILER_NETBOX_URL=netbox.netbox_url + "/netbox" + PLUGIN_PATH)

    assert code == 1
    assert kinds(verdicts)["default branch"] == diagnosis.NOT_FOUND, verdicts["default branch"]


@pytest.mark.netbox
@pytest.mark.parametrize("token, check, kind", [
    ("invalid-token", "default branch", diagnosis.UNAUTHORIZED),  # introspection says inactive
    ("noscope-token", "default branch", diagnosis.FORBIDDEN),  # active, without netbox:read
    ("ro-token", "plan", diagnosis.FORBIDDEN),  # netbox:read only: bulk-plan-apply/ needs netbox:write
])
def test_a_token_the_plugin_refuses_is_told_by_why(peer_env, token, check, kind):
    code, verdicts = online(peer_env, RECONCILER_NETBOX_TOKEN=token)

    assert code == 1
    assert kinds(verdicts)[check] == kind, verdicts[check]


@pytest.mark.netbox
def test_a_read_only_token_is_enough_for_plan_only_mode(peer_env):
    code, verdicts = online(peer_env, RECONCILER_NETBOX_TOKEN="ro-token", RECONCILER_WORKERS_AUTO_APPLY="false")

    assert code == 0, verdicts


# --- the scripted plugin ---


@pytest.fixture
def scripted(with_workers, plugin_factory):
    """A plugin that answers nothing unless scripted (404 HTML, as NetBox does for an unknown path), and
    the environment pointing at it."""
    server = plugin_factory(branch_endpoint=False, applies=False)
    return server, {**with_workers, "RECONCILER_NETBOX_URL": server.url}


def healthy(server) -> None:
    server.default("default-branch/", Step(200, {"branch": None}))
    server.default("bulk-plan-apply/", Step(400, EMPTY_BATCH_REFUSED))
    server.default("generate-diff/", Step(400, {"id": "x", "errors": {"request": {"entity": ["entity is required"]}}}))


@pytest.mark.subprocess
def test_a_login_page_at_the_plugin_path_is_told_html(scripted):
    server, env = scripted
    server.default("default-branch/", Step(200, b"<!DOCTYPE html><html><body>Log in</body></html>",
                                           headers={"Content-Type": "text/html; charset=utf-8"}))

    code, verdicts = online(env)

    assert code == 1
    assert kinds(verdicts)["default branch"] == diagnosis.HTML


@pytest.mark.subprocess
def test_no_plugin_at_all_is_told_not_found(scripted):
    server, env = scripted  # every path answers 404

    code, verdicts = online(env)

    assert code == 1
    assert kinds(verdicts)["default branch"] == diagnosis.NOT_FOUND


@pytest.mark.subprocess
@pytest.mark.parametrize("api, passes", [("bulk", False), ("auto", True)])
def test_a_plugin_older_than_1_12_is_told_apart_from_no_plugin(scripted, api, passes):
    server, env = scripted
    healthy(server)
    server.default("bulk-plan-apply/", Step(404, b"<html>Not Found</html>", headers={"Content-Type": "text/html"}))

    code, verdicts = online(env, RECONCILER_NETBOX_API=api)

    assert (code, verdicts["plan"]["ok"]) == ((0, True) if passes else (1, False)), verdicts["plan"]
    assert kinds(verdicts)["plan"] == diagnosis.OLD_PLUGIN
    assert "api = single" in verdicts["plan"]["advice"]


@pytest.mark.subprocess
def test_a_plugin_older_than_1_5_has_no_default_branch_and_passes(scripted):
    server, env = scripted
    healthy(server)
    server.default("default-branch/", Step(404, b"<html>Not Found</html>", headers={"Content-Type": "text/html"}))

    code, verdicts = online(env)

    assert code == 0, verdicts
    assert kinds(verdicts)["default branch"] == preflight.NO_BRANCH_ENDPOINT


@pytest.mark.subprocess
def test_a_403_for_a_missing_scope_names_the_scope(scripted):
    server, env = scripted
    healthy(server)
    server.default("bulk-plan-apply/", Step(403, FORBIDDEN_DETAIL))

    code, verdicts = online(env)

    assert code == 1
    assert kinds(verdicts)["plan"] == diagnosis.FORBIDDEN
    assert "netbox:write" in verdicts["plan"]["detail"]


@pytest.mark.subprocess
def test_a_token_endpoint_refusing_the_client_is_told_bad_client(scripted):
    server, env = scripted
    healthy(server)
    server.default("/auth/token", Step(401, {"error": "invalid_client"}))
    token_url = server.url.replace(PLUGIN_PATH, "/auth/token")

    code, verdicts = online(env, RECONCILER_NETBOX_TOKEN="", RECONCILER_NETBOX_TOKEN_URL=token_url,
                            RECONCILER_NETBOX_CLIENT_ID="diode-to-netbox", RECONCILER_NETBOX_CLIENT_SECRET="wrong")

    assert code == 1
    assert kinds(verdicts)["token endpoint"] == diagnosis.BAD_CLIENT
    assert kinds(verdicts)["default branch"] == kinds(verdicts)["plan"] == preflight.SKIPPED
    assert server.calls("default-branch/") == []


@pytest.mark.subprocess
def test_the_token_from_the_token_endpoint_is_what_the_plugin_is_asked_with(scripted):
    server, env = scripted
    healthy(server)
    server.default("/auth/token", Step(200, {"access_token": "granted", "expires_in": 3600}))

    code, verdicts = online(env, RECONCILER_NETBOX_TOKEN="", RECONCILER_NETBOX_CLIENT_ID="diode-to-netbox",
                            RECONCILER_NETBOX_TOKEN_URL=server.url.replace(PLUGIN_PATH, "/auth/token"),
                            RECONCILER_NETBOX_CLIENT_SECRET="right")

    assert code == 0, verdicts
    [grant] = server.calls("/auth/token")
    assert b"grant_type=client_credentials" in grant.body and b"client_secret=right" in grant.body
    assert server.calls("default-branch/")[0].headers["Authorization"] == "Bearer granted"


@pytest.mark.subprocess
def test_a_plugin_slower_than_the_timeout_is_told_timeout(scripted):
    server, env = scripted
    healthy(server)
    server.default("default-branch/", Step(200, {"branch": None}, delay=3))

    code, verdicts = online(env, RECONCILER_NETBOX_TIMEOUT_SECONDS="1")

    assert code == 1
    assert kinds(verdicts)["default branch"] == diagnosis.TIMEOUT


# --- nothing, or the wrong thing, at the address ---


@pytest.mark.subprocess
def test_a_port_where_nothing_listens_is_told_refused(with_workers):
    code, verdicts = online(with_workers, RECONCILER_NETBOX_URL=f"http://127.0.0.1:{free_port()}{PLUGIN_PATH}")

    assert code == 1
    assert kinds(verdicts)["default branch"] == diagnosis.REFUSED


@pytest.mark.subprocess
def test_a_host_name_that_does_not_resolve_is_told_dns(with_workers):
    code, verdicts = online(with_workers, RECONCILER_NETBOX_URL=f"http://nonexistent.invalid{PLUGIN_PATH}")

    assert code == 1
    assert kinds(verdicts)["default branch"] == diagnosis.DNS


class _PluginLike(BaseHTTPRequestHandler):
    """Answers as a healthy plugin would: no default branch, an empty batch refused in JSON."""

    def do_GET(self) -> None:
        self._send(200, {"branch": None})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._send(400, EMPTY_BATCH_REFUSED)

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def self_signed_plugin(tmp_path):
    """An https plugin stand-in on loopback with a self-signed certificate; its plugin URL."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _PluginLike)
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}{PLUGIN_PATH}"
    server.shutdown()
    server.server_close()


@pytest.mark.subprocess
def test_a_certificate_this_machine_does_not_trust_is_told_tls_naming_verify_tls(with_workers, self_signed_plugin):
    code, verdicts = online(with_workers, RECONCILER_NETBOX_URL=self_signed_plugin)

    assert code == 1
    assert kinds(verdicts)["default branch"] == diagnosis.TLS
    assert "verify_tls" in verdicts["default branch"]["advice"]

    code, verdicts = online(with_workers, RECONCILER_NETBOX_URL=self_signed_plugin,
                            RECONCILER_NETBOX_VERIFY_TLS="false")
    assert code == 0, verdicts


# --- Postgres and Redis ---


@pytest.mark.subprocess
def test_postgres_where_nothing_listens_is_told_refused_and_the_schema_is_not_checked(env):
    code, verdicts = online(env, RECONCILER_POSTGRES_DSN=f"postgresql://postgres@127.0.0.1:{free_port()}/reconciler")

    assert code == 1
    assert kinds(verdicts)["postgres"] == diagnosis.REFUSED
    assert kinds(verdicts)["schema"] == preflight.SKIPPED


@pytest.mark.subprocess
def test_a_database_name_that_does_not_exist_is_told_no_database(env, dsn):
    code, verdicts = online(env, RECONCILER_POSTGRES_DSN=dsn.rsplit("/", 1)[0] + "/reconciler_no_such_database")

    assert code == 1
    assert kinds(verdicts)["postgres"] == diagnosis.NO_DATABASE


@pytest.mark.subprocess
@pytest.mark.parametrize("migrate_on_start, passes", [("false", False), ("true", True)])
def test_a_schema_behind_fails_unless_run_migrates_it_at_start(env, empty_dsn, migrate_on_start, passes):
    code, verdicts = online(env, RECONCILER_POSTGRES_DSN=empty_dsn,
                            RECONCILER_POSTGRES_MIGRATE_ON_START=migrate_on_start)

    assert (code, verdicts["schema"]["ok"]) == ((0, True) if passes else (1, False)), verdicts["schema"]
    assert kinds(verdicts)["schema"] == preflight.SCHEMA_BEHIND


@pytest.mark.subprocess
def test_redis_where_nothing_listens_is_told_refused_and_the_group_is_not_checked(env):
    code, verdicts = online(env, RECONCILER_REDIS_URL=f"redis://127.0.0.1:{free_port()}/1")

    assert code == 1
    assert kinds(verdicts)["redis"] == diagnosis.REFUSED
    assert kinds(verdicts)["consumer group"] == preflight.SKIPPED


@pytest.mark.subprocess
def test_a_redis_user_it_does_not_know_is_told_auth(env, redis_url):
    code, verdicts = online(env, RECONCILER_REDIS_URL=redis_url.replace("redis://", "redis://nobody:wrong@"))

    assert code == 1
    assert kinds(verdicts)["redis"] == diagnosis.AUTH


@pytest.mark.subprocess
def test_the_consumer_group_missing_passes_and_a_key_that_is_no_stream_fails(env, redis_client):
    stream = "diode.v1.ingest-stream"
    redis_client.xadd(stream, {"request": b"x"})
    code, verdicts = online(env)
    assert (code, kinds(verdicts)["consumer group"]) == (0, preflight.NO_GROUP)

    redis_client.xgroup_create(stream, "diode-reconciler", id="0")
    code, verdicts = online(env)
    assert (code, kinds(verdicts)["consumer group"]) == (0, "ok")

    redis_client.delete(stream)
    redis_client.set(stream, "not a stream")
    code, verdicts = online(env)
    assert (code, kinds(verdicts)["consumer group"]) == (1, preflight.NOT_A_STREAM)


@pytest.mark.subprocess
def test_a_configuration_that_does_not_validate_is_one_failing_verdict(env):
    done = cli({**env, "RECONCILER_WORKERS_COUNT": "many"}, "check-config", "--online", "--json")

    assert done.returncode == 1
    assert [(v["name"], v["ok"], v["kind"]) for v in json.loads(done.stdout)] == [
        ("configuration", False, preflight.CONFIG)]


# --- what the diagnosis makes of answers the servers above are not made to give ---

PLUGIN = "http://nb.example" + PLUGIN_PATH
JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize("url, status, headers, body, kind", [
    (f"{PLUGIN}/default-branch/", 301, {"Location": "https://nb.example/api/plugins/diode/default-branch/"}, b"",
     diagnosis.REDIRECT),
    ("http://nb.example/default-branch/", 302, {"Location": "/login/?next=/default-branch/"}, b"", diagnosis.HTML),
    (f"{PLUGIN}/default-branch/", 403, JSON, b'{"detail": "Authentication credentials were not provided."}',
     diagnosis.UNAUTHORIZED),
    (f"{PLUGIN}/bulk-plan/", 429, JSON, b"{}", diagnosis.RATE_LIMITED),
    (f"{PLUGIN}/bulk-plan/", 502, {"Content-Type": "text/html"}, b"<html>Bad Gateway</html>", diagnosis.SERVER_ERROR),
    (f"{PLUGIN}/bulk-plan/", 400, JSON, json.dumps(EMPTY_BATCH_REFUSED).encode(), None),
    (f"{PLUGIN}/default-branch/", 200, JSON, b'{"branch": null}', None),
])
def test_what_a_plugin_answer_says(url, status, headers, body, kind):
    finding = diagnosis.of_response(url, status, headers, body)

    assert (finding and finding.kind) == kind, finding


@pytest.mark.parametrize("status, body, kind", [
    (400, b'{"error": "invalid_scope"}', diagnosis.BAD_SCOPE),
    (400, b'{"error": "unauthorized_client"}', diagnosis.TOKEN_REFUSED),
    (200, b'{"token_type": "Bearer"}', diagnosis.UNEXPECTED),
    (200, b'{"access_token": "a", "expires_in": 3600}', None),
])
def test_what_a_token_endpoint_answer_says(status, body, kind):
    finding = diagnosis.of_token_response("https://diode.example/auth/token", status, JSON, body)

    assert (finding and finding.kind) == kind, finding


@pytest.mark.parametrize("message, kind", [
    ('connection to server at "db.example", port 5432 failed: FATAL:  password authentication failed for user "r"',
     diagnosis.AUTH),
    ('connection to server at "db.example", port 5432 failed: FATAL:  role "r" does not exist', diagnosis.AUTH),
    ('connection to server at "db.example", port 5432 failed: timeout expired', diagnosis.TIMEOUT),
])
def test_what_a_postgres_connection_error_says(message, kind):
    assert diagnosis.of_postgres_error(message).kind == kind
