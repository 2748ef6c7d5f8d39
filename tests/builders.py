"""Test data shared by the test modules: the stream's names, SDK entities, ingest requests as diode
clients send them, decoded stream entries, QUEUED rows written through the consumer's own inbox code, and
OPEN rows planned through the worker's own claims."""

from __future__ import annotations

import itertools

import psycopg2
from netboxlabs.diode.sdk import ingester as sdk
from netboxlabs.diode.sdk.diode.v1 import ingester_pb2 as pb

from reconciler import claims, inbox, outcomes, sample, states, streamentry
from reconciler.db import Database

from .faultserver import plan_for

STREAM = "diode.v1.ingest-stream"
GROUP = "diode-reconciler"

# The request fields of request(): what a diode client sets (tests that store or show them expect these).
REQUEST_FIELDS = dict(id="req", producer_app_name="disco", producer_app_version="1", sdk_name="diode-sdk-python",
                      sdk_version="1.14.3")

_entry_ids = itertools.count(1)


def next_entry_id() -> str:
    """A stream entry id no other builder call returned in this session (one id is one entry: the inbox
    takes a second entry with an id it has a receipt for as a redelivery)."""
    return f"{next(_entry_ids)}-0"


def site(name: str, **extra) -> pb.Entity:
    return sdk.Entity(site=sdk.Site(name=name, slug=name, **extra))


def sites(*names: str) -> list[pb.Entity]:
    return [site(name) for name in names]


def request(*entities: pb.Entity, **fields) -> pb.IngestRequest:
    """An IngestRequest of these entities; `fields` override REQUEST_FIELDS."""
    return pb.IngestRequest(entities=list(entities), **{**REQUEST_FIELDS, **fields})


def entry(*entities: pb.Entity, **request_fields) -> streamentry.Message:
    """A new stream entry carrying request(*entities, **request_fields), as the consumer decodes it."""
    fields = sample.stream_fields(request(*entities, **request_fields))
    return streamentry.decode_entry(next_entry_id().encode(), fields)


def enqueue(dsn: str, *entities: pb.Entity, **request_fields) -> list[int]:
    """New QUEUED rows through the consumer's own inbox code (one entry of these entities); returns
    the ids of the rows it added."""
    [(before,)] = _query(dsn, "SELECT coalesce(max(id), 0) FROM ingestion_logs")
    database = Database(dsn, "reconciler")
    try:
        inbox.write(database, STREAM, [entry(*entities, **request_fields)])
    finally:
        database.close()
    return [row_id for (row_id,) in _query(dsn, "SELECT id FROM ingestion_logs WHERE id > %s ORDER BY id", (before,))]


def planned(dsn: str, *entities: pb.Entity, branch_scope: str = "", **request_fields) -> list[int]:
    """OPEN rows, as a plan-only worker leaves them: enqueued, claimed and recorded with the plan
    faultserver.plan_for(str(row id)) makes for each (one create), in `branch_scope`. Their ids."""
    ids = enqueue(dsn, *entities, **request_fields)
    database = Database(dsn, "reconciler")
    try:
        rows = claims.claim(database, "builder", states.OPEN, len(ids), 60)
        decisions = [claims.Decision(row.id, states.OPEN, change_set=outcomes.stored_change_set(
            row.object_type, plan_for(str(row.id), object_type=row.object_type))) for row in rows]
        claims.record(database, "builder", branch_scope, decisions, set())
    finally:
        database.close()
    return ids


def _query(dsn: str, sql: str, params: tuple = ()) -> list[tuple]:
    # support.query's twin: support imports this module (STREAM), so this one cannot import support.
    with psycopg2.connect(dsn, options="-c search_path=reconciler") as conn, conn.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    conn.close()
    return rows
