"""Wire compatibility of the read API with the Go reconciler's diode.v1.ReconcilerService.

tests/wire/go_reconciler.proto is the Go service's schema, written from the reference document and
not from our .proto. It is compiled here into a pool of its own, so its classes stand in for a Go
client: each answer is taken as raw bytes, decoded with those classes and with ours, and the two must
agree field for field (a field number, type or presence that differs shows up as a difference or as
an unknown field). Requests are built with the Go classes, so the request side is checked too.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from grpc_tools import protoc

from reconciler import sample
from reconciler.api import reconciler_pb2 as ours
from reconciler.api.generate import sdk_descriptor_set

from .apiclient import gateway_token, served
from .support import push, query, wait_until

pytestmark = pytest.mark.subprocess

WIRE = Path(__file__).resolve().parent / "wire"
SHAPE = sample.Shape(sites=1, devices_per_site=2, ports_per_device=2, vlans_per_site=1, prefixes_per_site=1,
                     vms_per_site=1, addresses_per_device=1)
FAILED, PENDING_RETRY, QUEUED = 4, 9, 1  # diode.v1.State numbers (9 is unknown to the Go enum)
BRANCH = "feature (b1)"
BEFORE = {"name": "old", "n": 1}


@functools.cache
def go_pool() -> descriptor_pool.DescriptorPool:
    """The Go-style .proto compiled now, against the SDK's own descriptor of ingester.proto (the SDK
    ships no .proto), into a pool apart from the default one, where our generated module already
    registered diode.v1."""
    with tempfile.TemporaryDirectory() as scratch:
        sdk, compiled = Path(scratch) / "sdk.pb", Path(scratch) / "go.pb"
        sdk.write_bytes(sdk_descriptor_set())
        code = protoc.main(["protoc", f"--descriptor_set_in={sdk}", f"-I{WIRE}",
                            f"--descriptor_set_out={compiled}", "go_reconciler.proto"])
        assert code == 0, "protoc could not compile tests/wire/go_reconciler.proto"
        pool = descriptor_pool.DescriptorPool()
        for path in (sdk, compiled):  # dependencies first
            for file in descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes()).file:
                pool.Add(file)
    return pool


def go_class(name: str):
    """The Go client's class of diode.v1.<name>."""
    return message_factory.GetMessageClass(go_pool().FindMessageTypeByName(f"diode.v1.{name}"))


def as_dict(message) -> dict:
    # States as numbers: the Go enum has no name for 9, and names are not what goes on the wire.
    return json_format.MessageToDict(message, preserving_proto_field_name=True, use_integers_for_enums=True)


def same_message(name: str, data: bytes):
    """`data` decoded as the Go client and as we do: they must agree; the Go-style message."""
    go, mine = go_class(name).FromString(data), getattr(ours, name).FromString(data)
    assert as_dict(go) == as_dict(mine), name
    # Nothing left over as an unknown field on either side: both re-encode to the same bytes.
    assert go.SerializeToString(deterministic=True) == mine.SerializeToString(deterministic=True), name
    return go


def call(server, method: str, **fields):
    """One call with a request built by the Go client, sent and answered as raw bytes."""
    request = go_class(f"{method}Request")(**fields).SerializeToString()
    same_message(f"{method}Request", request)
    rpc = server.channel.unary_unary(f"/diode.v1.ReconcilerService/{method}", request_serializer=None,
                                     response_deserializer=lambda raw: raw)
    answer = rpc(request, metadata=[("authorization", f"Bearer {gateway_token()}")], timeout=30)
    return same_message(f"{method}Response", answer)


def walk(server, method: str, items: str, **fields) -> list:
    """Every item of every page, following next_page_token as a Go client does."""
    found, token = [], ""
    while True:
        response = call(server, method, page_token=token, **fields)
        found += getattr(response, items)
        token = response.next_page_token
        if not token:
            return found


def vary(dsn: str) -> dict[str, str]:
    """Turn four APPLIED rows into the cases the wire has to carry; their external ids by case."""
    ids = [row_id for row_id, in query(dsn, "SELECT id FROM ingestion_logs ORDER BY id LIMIT 4")]
    cases = dict(zip(("failed", "retry", "checking", "branch"), ids))
    query(dsn, """UPDATE ingestion_logs SET state = 4, error = '{"message": "boom", "code": "E_X",
                  "details": {"k": 1}}' WHERE id = %s""", (cases["failed"],))
    # A retry due tomorrow: the worker leaves it alone while the test reads it.
    query(dsn, "UPDATE ingestion_logs SET state = 9, next_attempt_at = now() + interval '1 day' WHERE id = %s",
          (cases["retry"],))
    # CHECKING is ours (10); no drift-checks role runs without [netbox] api_token, so it stays.
    query(dsn, "UPDATE ingestion_logs SET state = 10, requeued_from_state = 3, checking_since = now() WHERE id = %s",
          (cases["checking"],))
    query(dsn, "UPDATE change_sets SET branch_id = %s WHERE ingestion_log_id = %s", (BRANCH, cases["branch"]))
    query(dsn, "UPDATE changes SET before = %s WHERE change_set_id IN (SELECT id FROM change_sets "
               "WHERE ingestion_log_id = %s)", (json.dumps(BEFORE), cases["branch"]))
    return {case: query(dsn, "SELECT external_id::text FROM ingestion_logs WHERE id = %s", (row_id,))[0][0]
            for case, row_id in cases.items()}


@pytest.fixture
def api(env, tmp_path, plugin, redis_client, dsn):
    """The service with every entity of a small network planned and applied, then four rows varied."""
    entities = list(sample.network(SHAPE))
    applying = {**env, "RECONCILER_WORKERS_COUNT": "1", "RECONCILER_NETBOX_URL": plugin.url,
                "RECONCILER_NETBOX_TOKEN": "t"}
    with served(applying, tmp_path) as server:
        push(redis_client, [sample.stream_fields(r) for r in sample.requests(entities, per_request=20)])
        wait_until(lambda: query(dsn, "SELECT state, count(*) FROM ingestion_logs GROUP BY 1") == [(3, len(entities))],
                   timeout=60, interval=0.2, what=lambda: f"{len(entities)} APPLIED rows: "
                   f"{query(dsn, 'SELECT state, count(*) FROM ingestion_logs GROUP BY 1')}")
        yield server, vary(dsn), len(entities)


def test_every_deviation_decodes_field_for_field(api, dsn):
    server, cases, rows = api
    deviations = {d.id: d for d in walk(server, "RetrieveDeviations", "deviations", page_size=5)}
    assert len(deviations) == rows  # every row was planned, so every row is a deviation, once
    failed, retry, checking, branch = (deviations[cases[c]] for c in ("failed", "retry", "checking", "branch"))
    assert (failed.state, failed.error.message, failed.error.code) == (FAILED, "boom", "E_X")
    assert json.loads(failed.error.details) == {"k": 1}
    assert retry.state == PENDING_RETRY  # the Go enum has no name for it: the number survives
    assert checking.state == QUEUED  # stored CHECKING is sent as what Go would have made of the row
    assert branch.HasField("branch_id") and branch.branch_id == BRANCH
    assert [json.loads(change.before) for change in branch.changes] == [BEFORE]
    assert not failed.HasField("branch_id")
    [(entity,)] = query(dsn, "SELECT entity FROM ingestion_logs WHERE external_id = %s", (cases["failed"],))
    assert failed.ingested_entity.SerializeToString() == bytes(entity)
    assert failed.ingested_entity.WhichOneof("entity")


def test_a_go_request_with_filters_is_honoured(api):
    server, cases, _ = api
    troubled = [call(server, "RetrieveDeviationByID", id=cases[c]).deviation for c in ("failed", "retry")]
    kinds = sorted({d.object_type for d in troubled})
    # page_size 1: two pages, the second through the next_page_token of the first.
    found = walk(server, "RetrieveDeviations", "deviations", state=[FAILED, PENDING_RETRY], object_type=kinds,
                 page_size=1)
    assert [d.id for d in found] == [cases["retry"], cases["failed"]]  # newest first
    queued = walk(server, "RetrieveDeviations", "deviations", state=[QUEUED])
    assert [d.id for d in queued] == [cases["checking"]]  # a QUEUED filter matches CHECKING rows
    in_branch = walk(server, "RetrieveDeviations", "deviations", branch_id=[BRANCH])
    assert [d.id for d in in_branch] == [cases["branch"]]


def test_retrieve_deviation_by_id(api):
    server, cases, _ = api
    listed = {d.id: d for d in walk(server, "RetrieveDeviations", "deviations")}
    for case, external_id in cases.items():
        deviation = call(server, "RetrieveDeviationByID", id=external_id).deviation
        assert deviation.id == external_id, case
        assert as_dict(deviation) == as_dict(listed[external_id]), case


def test_ingestion_logs_and_metrics(api):
    server, cases, rows = api
    logs = {log.id: log for log in walk(server, "RetrieveIngestionLogs", "logs", page_size=7)}
    assert len(logs) == rows
    assert logs[cases["retry"]].state == PENDING_RETRY and logs[cases["checking"]].state == QUEUED
    assert logs[cases["failed"]].error.code == "E_X"
    change_set = logs[cases["branch"]].change_set
    assert change_set.HasField("branch_id") and change_set.branch_id == BRANCH
    assert json.loads(change_set.data)["branch"] == {"id": "b1", "name": "feature"}
    only_failed = call(server, "RetrieveIngestionLogs", state=FAILED)
    assert [log.id for log in only_failed.logs] == [cases["failed"]]
    assert (only_failed.metrics.total, only_failed.metrics.failed) == (1, 1)  # Go: the page's size
    counts = call(server, "RetrieveIngestionLogs", only_metrics=True)
    assert not counts.logs
    assert as_dict(counts.metrics) == {"total": rows, "queued": 1, "reconciled": rows - 3, "failed": 1}
