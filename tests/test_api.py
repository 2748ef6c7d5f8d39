"""The read API (diode.v1.ReconcilerService) against `reconciler run`, with a real grpcio client built
from the project's .proto (tests/apiclient.py).

The inbox is filled the way the service fills it: a sample network through the stream, planned and
applied by the workers against the scripted plugin, so every row has a change set. A few rows are then
put into the states a filter must tell apart (FAILED with an error, PENDING_RETRY, CHECKING, IGNORED
without a plan, a change set in a branch).
"""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from reconciler import sample, settings, states
from reconciler.api import auth, generate, paging, reconciler_pb2 as pb, refusal, service
from reconciler.api.refusal import Refused
from reconciler.errors import ConfigError

from .apiclient import free_port, gateway_token, health_status, served
from .support import ROOT, cli_json, push, query, reconciler, scalar, wait_until

SHAPE = sample.Shape(sites=1, devices_per_site=4, ports_per_device=24, vlans_per_site=3, prefixes_per_site=3,
                     vms_per_site=4, addresses_per_device=2)
DEVIATIONS = "RetrieveDeviations"
LOGS = "RetrieveIngestionLogs"
BY_ID = "RetrieveDeviationByID"


def applying(env: dict, plugin) -> dict:
    return {**env, "RECONCILER_WORKERS_COUNT": "2", "RECONCILER_NETBOX_URL": plugin.url, "RECONCILER_NETBOX_TOKEN": "t",
            "RECONCILER_METRICS_LISTEN": f"127.0.0.1:{free_port()}"}


def push_network(redis_client, first_site: int = 0, shape: sample.Shape = SHAPE) -> int:
    requests = list(sample.requests(sample.network(shape, first_site=first_site), per_request=50))
    push(redis_client, [sample.stream_fields(request) for request in requests])
    return sum(len(request.entities) for request in requests)


def wait_applied(dsn: str, rows: int, timeout: float = 120) -> None:
    def by_state() -> str:
        return str(query(dsn, "SELECT state, count(*) FROM ingestion_logs GROUP BY 1"))
    wait_until(lambda: scalar(dsn, "SELECT count(*) FROM ingestion_logs WHERE state = 3") >= rows, timeout=timeout,
               interval=0.2, what=lambda: f"{rows} APPLIED rows: {by_state()}")


def external_ids(dsn: str, where: str = "true") -> list[str]:
    """The external ids of the rows `where` selects, newest first: the API's order."""
    selected = query(dsn, f"SELECT external_id::text FROM ingestion_logs AS l WHERE {where} ORDER BY id DESC")
    return [row[0] for row in selected]


HAS_PLAN = "EXISTS (SELECT 1 FROM change_sets AS c WHERE c.ingestion_log_id = l.id)"


def mark_rows(dsn: str) -> dict[str, str]:
    """Put five rows (the oldest, so no worker holds them) into the states the filters tell apart;
    {label: external id}."""
    ids = [row[0] for row in query(dsn, "SELECT id FROM ingestion_logs ORDER BY id LIMIT 5")]
    failed, pending, checking, unplanned, branched = ids
    query(dsn, "UPDATE ingestion_logs SET state = 4, error = '{\"message\": \"boom\", \"code\": \"E_TEST\", "
               "\"details\": {\"field\": \"name\"}}' WHERE id = %s", (failed,))
    query(dsn, "UPDATE ingestion_logs SET state = 9, next_attempt_at = now() + interval '1 day', "
               "error = '{\"message\": \"HTTP 503\", \"code\": \"ERR_PLUGIN_UNAVAILABLE\"}' WHERE id = %s", (pending,))
    query(dsn, "UPDATE ingestion_logs SET state = 10, requeued_from_state = 3, checking_since = now() WHERE id = %s",
          (checking,))
    query(dsn, "DELETE FROM change_sets WHERE ingestion_log_id = %s", (unplanned,))
    query(dsn, "UPDATE ingestion_logs SET state = 6 WHERE id = %s", (unplanned,))
    query(dsn, "UPDATE change_sets SET branch_id = 'feature-x (br1)' WHERE ingestion_log_id = %s", (branched,))
    labels = ("failed", "pending", "checking", "unplanned", "branched")
    return dict(zip(labels, (scalar(dsn, "SELECT external_id::text FROM ingestion_logs WHERE id = %s", (i,))
                             for i in ids)))


def ids_of(items) -> list[str]:
    return [item.id for item in items]


@pytest.mark.subprocess
def test_each_call_and_filter_answers_from_the_inbox(env, tmp_path, dsn, plugin, redis_client):
    run_env = applying(env, plugin)
    with served(run_env, tmp_path) as api:
        wait_applied(dsn, push_network(redis_client))
        marked = mark_rows(dsn)
        token = gateway_token()

        def deviations(**filters) -> list:
            return list(api.walk(DEVIATIONS, pb.RetrieveDeviationsRequest(page_size=37, **filters), token,
                                 "deviations"))

        everything = deviations()
        assert ids_of(everything) == external_ids(dsn, HAS_PLAN)
        assert marked["unplanned"] not in ids_of(everything)

        # States: as stored, but CHECKING goes out as QUEUED and PENDING_RETRY as its own number 9.
        [failed] = deviations(state=[pb.FAILED])
        assert (failed.id, failed.error.message, failed.error.code) == (marked["failed"], "boom", "E_TEST")
        assert failed.error.details == b'{"field": "name"}'
        [pending] = deviations(state=[pb.PENDING_RETRY])
        assert (pending.id, pending.state) == (marked["pending"], 9)
        [checking] = deviations(state=[pb.QUEUED])
        assert (checking.id, checking.state) == (marked["checking"], pb.QUEUED)
        assert ids_of(deviations(state=[pb.FAILED, pb.PENDING_RETRY])) == [marked["pending"], marked["failed"]]
        assert len(deviations(state=[pb.APPLIED])) == len(everything) - 3

        # Object types, branches (as stored, by name, by id), the ingestion time range.
        assert ids_of(deviations(object_type=["dcim.site", "ipam.vlan"])) == \
            external_ids(dsn, f"{HAS_PLAN} AND object_type IN ('dcim.site', 'ipam.vlan')")
        for branch in ("feature-x (br1)", "feature-x", "br1"):
            [branched] = deviations(branch_id=[branch])
            assert (branched.id, branched.branch_id) == (marked["branched"], "feature-x (br1)")
        middle = scalar(dsn, "SELECT ingestion_ts FROM ingestion_logs ORDER BY id OFFSET 100 LIMIT 1")
        assert ids_of(deviations(ingestion_ts_start=middle)) == \
            external_ids(dsn, f"{HAS_PLAN} AND ingestion_ts >= {middle}")
        assert ids_of(deviations(ingestion_ts_end=middle)) == \
            external_ids(dsn, f"{HAS_PLAN} AND ingestion_ts <= {middle}")

        # Page sizes: 100 unless asked, at most 1,000.
        assert len(api.call(DEVIATIONS, pb.RetrieveDeviationsRequest(), token).deviations) == 100
        assert len(api.call(DEVIATIONS, pb.RetrieveDeviationsRequest(page_size=5000), token).deviations) == \
            min(len(everything), paging.MAX_PAGE_SIZE)
        check_bad_requests(api, token)
        check_by_id(api, token, dsn, marked)
        check_ingestion_logs(api, token, dsn, marked)
        check_conventions(api, run_env)


def check_bad_requests(api, token: str) -> None:
    first = api.call(DEVIATIONS, pb.RetrieveDeviationsRequest(page_size=10), token)
    other_filters = pb.RetrieveDeviationsRequest(page_size=10, page_token=first.next_page_token, state=[pb.FAILED])
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert api.refusal(DEVIATIONS, other_filters, token) == (invalid, refusal.FILTERS_CHANGED)
    assert api.refusal(DEVIATIONS, pb.RetrieveDeviationsRequest(page_token="not-a-token"), token) == \
        (invalid, refusal.BAD_PAGE_TOKEN)
    assert api.refusal(DEVIATIONS, pb.RetrieveDeviationsRequest(state=[42]), token) == (invalid, refusal.BAD_ARGUMENT)
    assert api.refusal(DEVIATIONS, pb.RetrieveDeviationsRequest(ingestion_ts_start=10, ingestion_ts_end=5),
                       token) == (invalid, refusal.BAD_ARGUMENT)


def check_by_id(api, token: str, dsn: str, marked: dict[str, str]) -> None:
    row = query(dsn, "SELECT l.external_id::text, l.entity, l.object_type, cs.deviation_name, "
                     "(SELECT count(*) FROM changes WHERE change_set_id = cs.id) FROM ingestion_logs AS l "
                     "JOIN change_sets AS cs ON cs.ingestion_log_id = l.id WHERE l.state = 3 "
                     "ORDER BY l.id DESC LIMIT 1")[0]
    external_id, entity, object_type, name, changes = row
    found = api.call(BY_ID, pb.RetrieveDeviationByIDRequest(id=external_id), token).deviation
    assert (found.id, found.object_type, found.name, len(found.changes)) == (external_id, object_type, name, changes)
    assert found.ingested_entity.SerializeToString(deterministic=True) == bytes(entity)
    stored = query(dsn, "SELECT c.before::text, c.after::text FROM changes AS c JOIN change_sets AS cs "
                        "ON c.change_set_id = cs.id JOIN ingestion_logs AS l ON cs.ingestion_log_id = l.id "
                        "WHERE l.external_id = %s ORDER BY cs.id DESC, c.sequence_number LIMIT 1", (external_id,))[0]
    assert (found.changes[0].before, found.changes[0].after) == tuple((text or "null").encode() for text in stored)
    not_found = grpc.StatusCode.NOT_FOUND
    assert api.refusal(BY_ID, pb.RetrieveDeviationByIDRequest(id=str(uuid.uuid4())), token) == \
        (not_found, refusal.NO_SUCH_ROW)
    assert api.refusal(BY_ID, pb.RetrieveDeviationByIDRequest(id=marked["unplanned"]), token) == \
        (not_found, refusal.NOT_PLANNED)
    assert api.refusal(BY_ID, pb.RetrieveDeviationByIDRequest(id="42"), token) == \
        (grpc.StatusCode.INVALID_ARGUMENT, refusal.BAD_ARGUMENT)


def check_ingestion_logs(api, token: str, dsn: str, marked: dict[str, str]) -> None:
    logs = list(api.walk(LOGS, pb.RetrieveIngestionLogsRequest(page_size=250), token, "logs"))
    assert ids_of(logs) == external_ids(dsn)  # every row, planned or not
    unplanned = next(log for log in logs if log.id == marked["unplanned"])
    assert unplanned.state == pb.IGNORED and not unplanned.HasField("change_set")
    planned = next(log for log in logs if log.id == marked["branched"])
    assert planned.change_set.branch_id == "feature-x (br1)" and b'"branch"' in planned.change_set.data
    [failed] = api.call(LOGS, pb.RetrieveIngestionLogsRequest(state=pb.FAILED), token).logs
    assert failed.id == marked["failed"]
    request_id = scalar(dsn, "SELECT request_id FROM ingestion_logs ORDER BY id LIMIT 1")
    by_request = list(api.walk(LOGS, pb.RetrieveIngestionLogsRequest(request_id=request_id), token, "logs"))
    assert ids_of(by_request) == external_ids(dsn, f"request_id = '{request_id}'")
    typed = api.call(LOGS, pb.RetrieveIngestionLogsRequest(data_type="dcim.site", page_size=1000), token)
    assert ids_of(typed.logs) == external_ids(dsn, "object_type = 'dcim.site'")

    # only_metrics: the counters, once the consumer folded the last writes into them.
    expected = dict(query(dsn, "SELECT state, count(*) FROM ingestion_logs GROUP BY 1"))

    def metrics(**filters):
        return api.call(LOGS, pb.RetrieveIngestionLogsRequest(only_metrics=True, **filters), token).metrics
    wait_until(lambda: metrics().total == sum(expected.values()), what="the counters to catch up")
    counted = metrics()
    assert (counted.total, counted.queued, counted.reconciled, counted.failed, counted.no_changes) == (
        sum(expected.values()), expected.get(10, 0), expected[3], expected[4], 0)
    assert metrics(object_type="dcim.site").total == scalar(dsn, "SELECT count(*) FROM ingestion_logs "
                                                                 "WHERE object_type = 'dcim.site'")
    assert metrics(request_id=request_id).total == len(by_request)  # counted, not from the counters


def listed_services(api, token: str | None) -> set[str]:
    """What server reflection lists, asked with `token` (None: without one)."""
    metadata = None if token is None else [("authorization", f"Bearer {token}")]
    answers = reflection_pb2_grpc.ServerReflectionStub(api.channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=metadata, timeout=10)
    return {service.name for answer in answers for service in answer.list_services_response.service}


def check_reflection_needs_a_token(api) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        listed_services(api, None)
    assert (refused.value.code(), refusal.reason_of(refused.value)) == \
        (grpc.StatusCode.UNAUTHENTICATED, refusal.NO_TOKEN)


def check_conventions(api, env: dict) -> None:
    """Reflection lists the service, health answers without a token, calls are counted, status shows
    the API."""
    assert {"diode.v1.ReconcilerService", "grpc.health.v1.Health"} <= listed_services(api, gateway_token())
    assert health_status(api.channel, "diode.v1.ReconcilerService") == health_pb2.HealthCheckResponse.SERVING
    scraped = urllib.request.urlopen(f"http://{env['RECONCILER_METRICS_LISTEN']}/metrics", timeout=10).read().decode()
    assert 'reconciler_api_requests_total{code="OK",method="RetrieveDeviations"}' in scraped
    assert 'reconciler_api_requests_total{code="INVALID_ARGUMENT",method="RetrieveDeviations"}' in scraped
    status = cli_json({**env, "RECONCILER_API_LISTEN": api.address}, "status", "--json")
    assert status["read_api"] == {"listen": api.address, "auth": "gateway", "serving": True, "health": "SERVING"}


@pytest.mark.subprocess
def test_a_client_walking_every_page_while_rows_arrive_sees_each_row_once(env, tmp_path, dsn, plugin, redis_client):
    """5,000 planned rows are walked page by page; before each page the consumer inserts new rows (and
    the workers plan them) and rows everywhere in the table change state: each row that existed when
    the walk began comes back exactly once."""
    big = sample.Shape(sites=1, devices_per_site=52, ports_per_device=90, vlans_per_site=20, prefixes_per_site=20,
                       vms_per_site=40, addresses_per_device=2)
    with served(applying(env, plugin), tmp_path) as api:
        wait_applied(dsn, push_network(redis_client, 0, big), timeout=300)
        token = gateway_token()
        site = 1
        for method, request, items in ((DEVIATIONS, pb.RetrieveDeviationsRequest(), "deviations"),
                                       (LOGS, pb.RetrieveIngestionLogsRequest(page_size=250), "logs")):
            before = external_ids(dsn, HAS_PLAN if items == "deviations" else "true")
            assert len(before) >= 5000
            seen: list[str] = []
            while True:
                rows = scalar(dsn, "SELECT count(*) FROM ingestion_logs")
                push_network(redis_client, site)
                site += 1
                query(dsn, "UPDATE ingestion_logs SET state = 4 WHERE id IN (SELECT id FROM ingestion_logs "
                           "WHERE state = 3 ORDER BY random() LIMIT 20)")
                wait_until(lambda: scalar(dsn, "SELECT count(*) FROM ingestion_logs") > rows,
                           what="the consumer to insert the next rows")
                response = api.call(method, request, token)
                seen += ids_of(getattr(response, items))
                if not response.next_page_token:
                    break
                request.page_token = response.next_page_token
            assert len(seen) == len(set(seen)), "a row came back twice"
            assert set(before) <= set(seen), f"{len(set(before) - set(seen))} rows were missed"


def introspection_stand_in(port: int) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, str(ROOT / "peer" / "introspect.py"), str(port)])
    wait_until(lambda: _answers(f"http://127.0.0.1:{port}/health"), what="the introspection stand-in")
    return process


def _answers(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=2).status == 200
    except OSError:
        return False


def introspections(port: int) -> int:
    return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read())["introspect_calls"]


@pytest.mark.subprocess
def test_each_auth_mode_accepts_its_token_and_refuses_the_others(env, tmp_path):
    request = pb.RetrieveDeviationsRequest()
    with served(env, tmp_path) as api:  # gateway, the default
        assert api.call(DEVIATIONS, request, gateway_token()).next_page_token == ""
        assert api.call(DEVIATIONS, request, gateway_token("netbox:read diode:read")) is not None
        unauthenticated = grpc.StatusCode.UNAUTHENTICATED
        refusals = {
            None: (unauthenticated, refusal.NO_TOKEN),
            "abc": (unauthenticated, refusal.NOT_A_JWT),
            gateway_token(expires_in=-60): (unauthenticated, refusal.TOKEN_EXPIRED),
            gateway_token("netbox:read"): (grpc.StatusCode.PERMISSION_DENIED, refusal.SCOPE_MISSING),
        }
        for token, refused in refusals.items():
            assert api.refusal(DEVIATIONS, request, token) == refused, token
        check_reflection_needs_a_token(api)

    port = free_port()
    stand_in = introspection_stand_in(port)
    try:
        with served(env, tmp_path, auth="introspect", introspect_url=f"http://127.0.0.1:{port}/auth/introspect") as api:
            api.call(DEVIATIONS, request, "diode-read-1")
            calls = introspections(port)
            api.call(LOGS, pb.RetrieveIngestionLogsRequest(only_metrics=True), "diode-read-1")
            assert introspections(port) == calls, "the active answer is kept until the token expires"
            assert api.refusal(DEVIATIONS, request, "ro-1") == \
                (grpc.StatusCode.PERMISSION_DENIED, refusal.SCOPE_MISSING)  # active, but netbox:read only
            assert api.refusal(DEVIATIONS, request, "invalid-1") == \
                (grpc.StatusCode.UNAUTHENTICATED, refusal.TOKEN_INACTIVE)
            stand_in.terminate()
            stand_in.wait(10)
            assert api.refusal(DEVIATIONS, request, "diode-read-2") == \
                (grpc.StatusCode.UNAVAILABLE, refusal.INTROSPECTION_FAILED)
            api.call(DEVIATIONS, request, "diode-read-1")  # still kept
    finally:
        stand_in.kill()

    token_file = tmp_path / "api-token"
    token_file.write_text("s3cret-reader-token\n")
    with served(env, tmp_path, auth="token", token_file=str(token_file)) as api:
        api.call(DEVIATIONS, request, "s3cret-reader-token")
        assert api.refusal(DEVIATIONS, request, "s3cret") == (grpc.StatusCode.UNAUTHENTICATED, refusal.WRONG_TOKEN)
        assert api.refusal(DEVIATIONS, request, gateway_token()) == \
            (grpc.StatusCode.UNAUTHENTICATED, refusal.WRONG_TOKEN)
        api.run.signal(signal.SIGTERM)
        assert api.run.wait(30) == 0
        assert api.run.events("stopped", role="api")


def test_gateway_mode_is_refused_off_loopback_and_each_mode_needs_its_setting():
    def load(**api) -> None:
        settings.load("/dev/null", {f"RECONCILER_API_{k.upper()}": v for k, v in api.items()})
    load(listen="127.0.0.1:8081")
    load(listen="[::1]:8081")
    load(listen="localhost:8081")
    with pytest.raises(ConfigError, match="not a loopback address"):
        load(listen="0.0.0.0:8081")
    for exposed in ("[::]:8081", ":8081", "192.0.2.10:8081", "reconciler.example:8081"):
        with pytest.raises(ConfigError, match="not a loopback address"):
            load(listen=exposed)
    load(listen="0.0.0.0:8081", auth="introspect", introspect_url="https://auth.example/introspect")
    with pytest.raises(ConfigError, match="must be https"):
        load(auth="introspect", introspect_url="http://auth.example/introspect")
    load(auth="introspect", introspect_url="http://127.0.0.1:8080/introspect")
    with pytest.raises(ConfigError, match="introspect_client_secret_file"):
        load(auth="introspect", introspect_url="https://auth.example/introspect", introspect_client_id="me")
    with pytest.raises(ConfigError, match="introspect_url: required"):
        load(auth="introspect")
    with pytest.raises(ConfigError, match="token_file: required"):
        load(auth="token")
    load(listen="off", auth="token")  # not served: nothing to check


def test_page_tokens_carry_the_last_id_and_are_bound_to_their_filters():
    mine = paging.digest("deviations", "states (4,)")
    token = paging.encode(12345, mine)
    assert paging.decode(token, mine) == 12345
    assert paging.decode("", mine) == paging.FIRST
    for bad in ("%%%", "AAAA", paging.encode(1, paging.digest("other"))):
        with pytest.raises(paging.BadToken):
            paging.decode(bad, mine)
    assert [paging.page_size(n) for n in (None, 0, -5, 1, 100, 1000, 1001)] == [100, 100, 100, 1, 100, 1000, 1000]


def test_the_generated_modules_match_the_proto(tmp_path):
    assert generate.stale() == []
    for name in generate.GENERATED:
        (tmp_path / name).write_text((generate.HERE / name).read_text())
    stale_copy = tmp_path / "reconciler_pb2.py"
    stale_copy.write_text(stale_copy.read_text().replace("PENDING_RETRY", "PENDING"))
    assert generate.stale(tmp_path) == ["reconciler_pb2.py"]


def test_checking_is_sent_as_queued_and_queued_selects_both():
    assert service.stored_states([pb.QUEUED, pb.FAILED], "state") == (states.QUEUED, states.FAILED, states.CHECKING)
    assert service.stored_states([], "state") is None
    with pytest.raises(Refused, match="not a diode.v1.State"):
        service.stored_states([states.CHECKING], "state")


def test_a_page_stops_short_of_what_a_grpc_client_accepts():
    """gRPC clients refuse answers above 4 MiB by default: rows of 1.5 MB go two to a page, and the
    token resumes after the last one sent."""
    rows = [service.Row(*[None] * len(service.Row._fields))._replace(id=row_id) for row_id in (30, 20, 10)]
    digest = paging.digest("deviations", service.Filters())
    page = service.Page(rows, more=False, filters_digest=digest)
    sent, token = page.answer(lambda row: pb.Deviation(name="x" * 1_500_000))
    assert len(sent) == 2 and paging.decode(token, digest) == 20
    sent, token = service.Page(rows[:1], more=True, filters_digest=digest).answer(lambda row: pb.Deviation())
    assert len(sent) == 1 and paging.decode(token, digest) == 30
    assert service.Page(rows, more=False, filters_digest=digest).answer(lambda row: pb.Deviation())[1] == ""


@pytest.mark.subprocess
def test_postgres_down_makes_the_api_not_serving_and_its_calls_unavailable_until_it_is_back(env, tmp_path,
                                                                                              postgres_proxy):
    proxy, proxied = postgres_proxy
    request, token = pb.RetrieveDeviationsRequest(), gateway_token()
    with served({**env, "RECONCILER_POSTGRES_DSN": proxied}, tmp_path) as api:
        api.call(DEVIATIONS, request, token)
        proxy.cut()
        wait_until(lambda: health_status(api.channel) == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=30,
                   what="health NOT_SERVING")
        assert api.refusal(DEVIATIONS, request, token) == \
            (grpc.StatusCode.UNAVAILABLE, refusal.DATABASE_UNAVAILABLE)
        proxy.restore()
        wait_until(lambda: health_status(api.channel) == health_pb2.HealthCheckResponse.SERVING, timeout=30,
                   what="health SERVING again")
        wait_until(lambda: answered(api, request, token), what="calls answered again")


def answered(api, request, token: str) -> bool:
    """Whether the call is answered (a connection the outage broke fails one call, then reconnects)."""
    try:
        api.call(DEVIATIONS, request, token)
    except grpc.RpcError:
        return False
    return True


@pytest.mark.subprocess
def test_an_address_in_use_leaves_the_pipeline_running_and_is_tried_again(env, tmp_path, dsn, redis_client):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    address = f"127.0.0.1:{taken.getsockname()[1]}"
    with reconciler({**env, "RECONCILER_API_LISTEN": address}, tmp_path) as run:
        [cannot] = run.wait_for_event("api_cannot_listen")
        assert cannot["level"] == "error"
        run.wait_for_event("ready")  # the api process booted: the supervisor keeps everything running
        push(redis_client, [sample.stream_fields(request) for request in
                            sample.requests(sample.network(sample.Shape(sites=1, devices_per_site=1)))])
        wait_until(lambda: scalar(dsn, "SELECT count(*) FROM ingestion_logs") > 0, what="the consumer writing")
        taken.close()
        run.wait_for_event("api_serving", timeout=30)
        with grpc.insecure_channel(address) as channel:
            assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        run.signal(signal.SIGTERM)
        assert run.wait(30) == 0


def test_a_tokens_fresh_refusal_is_not_hidden_by_its_expired_grant():
    """A token once active, now refused: the refusal is what is kept. The endpoint here answers nothing,
    so a second introspection would fail as INTROSPECTION_FAILED instead."""
    check = auth.Introspection("http://127.0.0.1:9/introspect", "diode:read", 1)
    key, now = hashlib.sha256(b"token").digest(), time.time()
    check._keep(key, auth._Answer(True, "diode:read", now - 1), now)
    check._keep(key, auth._Answer(False, None, now + 60), now)
    with pytest.raises(Refused) as refused:
        check("token")
    assert refused.value.reason == refusal.TOKEN_INACTIVE
