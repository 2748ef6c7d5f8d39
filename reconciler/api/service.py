"""diode.v1.ReconcilerService: the read API's three calls, from request to rows to messages.

Each call borrows one of the role's Postgres connections and reads in one read-only snapshot: the
page's ids (sql/queries.sql: api_deviation_ids or api_planned_ids, api_ingestion_log_ids), then those
rows with their latest change set (api_rows). Bad input is refused with INVALID_ARGUMENT naming the
field; nothing here writes.

States go out as diode.v1.State numbers. CHECKING (10, a re-observation waiting for the change log)
is not one: it goes out as QUEUED, which is what the Go reconciler would have made of that row, and
a filter on QUEUED matches both. PENDING_RETRY (9) goes out as 9.
"""

from __future__ import annotations

import queue
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple

import grpc
import orjson
from google.protobuf.message import Message

from .. import statecounts, states
from ..db import Database, Tx
from . import paging, reconciler_pb2 as pb, reconciler_pb2_grpc, refusal
from .refusal import Refused, invalid

INT32_MAX = 2 ** 31 - 1
# gRPC clients refuse answers above 4 MiB unless told otherwise: a page stops short of it (framing kept).
MAX_ANSWER_BYTES = 4 * 1024 * 1024 - 64 * 1024
# States with a partial index on id: a page of them is read through it (api_deviation_ids); any other
# selection walks the rows that have a plan (api_planned_ids), which a backlog of QUEUED rows never slows.
INDEXED_STATES = frozenset({states.QUEUED, states.CHECKING, states.OPEN, states.IGNORED, states.FAILED,
                            states.ERRORED, states.PENDING_RETRY})
SENT_AS = {states.CHECKING: states.QUEUED}  # stored state -> the diode.v1.State sent for it
STORED_AS = {states.QUEUED: (states.QUEUED, states.CHECKING)}  # a diode.v1.State filter -> stored states


STATEMENT_SECONDS = 5.0  # the longest one statement of a call may run: pages take milliseconds


class Connections:
    """The role's Postgres connections, one per call answered at once ([api] threads); opened on first
    use, in the process that serves. No statement runs longer than STATEMENT_SECONDS, or than the
    caller's deadline: a slow count must not hold a snapshot (which keeps vacuum off the queue
    table) or a thread long after its caller gave up."""

    def __init__(self, dsn: str, schema: str, size: int) -> None:
        self._free: queue.LifoQueue[Database] = queue.LifoQueue()
        self._all = [Database(dsn, schema, "reconciler api", statement_timeout_ms=int(STATEMENT_SECONDS * 1000))
                     for _ in range(size)]
        for database in self._all:
            self._free.put(database)

    @contextmanager
    def snapshot(self, seconds_left: float | None) -> Iterator[Tx]:
        """A read-only transaction on one snapshot, its statements cut off at the caller's deadline."""
        database = self._free.get()
        try:
            with database.transaction() as tx:
                tx.execute("read_snapshot")
                if seconds_left is not None and seconds_left < STATEMENT_SECONDS:
                    tx.execute("limit_statement_time", {"ms": str(max(1, int(seconds_left * 1000)))})
                yield tx
        finally:
            self._free.put(database)

    def close(self) -> None:
        for database in self._all:
            database.close()


class Row(NamedTuple):
    """A row of api_rows."""

    id: int
    external_id: str
    state: int
    object_type: str
    request_id: str
    ingestion_ts: int
    source_ts: int | None
    updated_ns: int
    producer_app_name: str
    producer_app_version: str
    sdk_name: str
    sdk_version: str
    entity: bytes
    error_message: str | None
    error_code: str | None
    error_details: str | None
    change_set_id: str | None
    branch_id: str | None
    deviation_name: str | None
    changes: str | None  # JSON array of [id, object type, primary value, change type, before, after] (Deviations)
    change_set: str | None  # JSON: the change set as the plugin gave it (IngestionLogs)


@dataclass(frozen=True)
class Filters:
    """What a call selects, as the queries take it: None (0 for a time) for "not asked"."""

    states: tuple[int, ...] | None = None
    object_types: tuple[str, ...] | None = None
    since: int = 0
    until: int = 0
    branches: tuple[str, ...] | None = None
    request_id: str | None = None

    def params(self) -> dict:
        return {"states": _listed(self.states), "object_types": _listed(self.object_types), "since": self.since,
                "until": self.until, "branches": _listed(self.branches), "request_id": self.request_id}


def _listed(values: tuple | None) -> list | None:
    return None if values is None else list(values)


def stored_states(requested: list[int], field: str) -> tuple[int, ...] | None:
    """The stored states a filter on diode.v1.State values selects (None: no filter)."""
    if not requested:
        return None
    unknown = [value for value in requested if value not in states.NAMES or value == states.CHECKING]
    if unknown:
        raise invalid(field, f"{unknown[0]} is not a diode.v1.State (1 QUEUED ... 9 PENDING_RETRY)")
    return tuple(sorted({stored for value in requested for stored in STORED_AS.get(value, (value,))}))


def time_range(start: int, end: int) -> tuple[int, int]:
    if start < 0 or end < 0:
        raise invalid("ingestion_ts_start" if start < 0 else "ingestion_ts_end", "Unix nanoseconds, not negative")
    if start and end and end < start:
        raise invalid("ingestion_ts_end", f"{end} is before ingestion_ts_start ({start})")
    return start, end


@dataclass(frozen=True)
class Page:
    rows: list[Row]
    more: bool  # rows follow the last one
    filters_digest: bytes

    def answer(self, build: Callable[[Row], Message]) -> tuple[list[Message], str]:
        """The rows as messages and the next page's token ("" after the last page). A page stops
        early where it would outgrow MAX_ANSWER_BYTES (one row alone always goes): the next page
        starts there."""
        messages: list[Message] = []
        size = 0
        for row in self.rows:
            message = build(row)
            size += message.ByteSize()
            if messages and size > MAX_ANSWER_BYTES:
                return messages, paging.encode(self.rows[len(messages) - 1].id, self.filters_digest)
            messages.append(message)
        return messages, paging.encode(self.rows[-1].id, self.filters_digest) if self.more else ""


def _page(tx: Tx, query: str, filters: Filters, token: str, size: int, what: str,
          with_change_set: bool = False) -> Page:
    """The rows of one page: `size` of them below the token's id, those `query` selects."""
    filters_digest = paging.digest(what, filters)
    try:
        below = paging.decode(token, filters_digest)
    except paging.OtherFilters as exc:
        raise invalid("page_token", str(exc), refusal.FILTERS_CHANGED) from None
    except paging.BadToken as exc:
        raise invalid("page_token", str(exc), refusal.BAD_PAGE_TOKEN) from None
    ids = [row[0] for row in tx.fetchall(query, {**filters.params(), "below": below, "limit": size + 1})]
    return Page(_rows(tx, ids[:size], with_change_set), len(ids) > size, filters_digest)


def deviations_query(filters: Filters) -> str:
    if filters.states is not None and INDEXED_STATES.issuperset(filters.states):
        return "api_deviation_ids"
    return "api_planned_ids"


def _rows(tx: Tx, ids: list[int], with_change_set: bool = False) -> list[Row]:
    if not ids:
        return []
    return [Row(*row) for row in tx.fetchall("api_rows", {"ids": ids, "with_change_set_data": with_change_set})]


# --- rows -> messages ---


def _wire_state(stored: int) -> Any:  # Any: the generated types want the enum, which is an int
    return SENT_AS.get(stored, stored)


def _error(row: Row) -> pb.DeviationError | None:
    if row.error_message is None and row.error_code is None:
        return None
    return pb.DeviationError(message=row.error_message or "", code=row.error_code or "",
                             details=(row.error_details or "").encode())


def _changes(row: Row) -> list[pb.Change]:
    return [pb.Change(id=change_id, object_type=object_type, object_primary_value=primary_value,
                      change_type=change_type, before=(before or "null").encode(), after=(after or "null").encode())
            for change_id, object_type, primary_value, change_type, before, after in orjson.loads(row.changes or "[]")]


def deviation(row: Row) -> pb.Deviation:
    message = pb.Deviation(id=row.external_id, ingestion_ts=row.ingestion_ts, last_update_ts=row.updated_ns,
                           name=row.deviation_name or "", source=row.producer_app_name,
                           state=_wire_state(row.state), object_type=row.object_type,
                           error=_error(row), changes=_changes(row), source_ts=row.source_ts or 0)
    if row.branch_id is not None:
        message.branch_id = row.branch_id
    message.ingested_entity.MergeFromString(row.entity)
    return message


def ingestion_log(row: Row) -> pb.IngestionLog:
    message = pb.IngestionLog(id=row.external_id, data_type=row.object_type, state=_wire_state(row.state),
                              request_id=row.request_id, ingestion_ts=row.ingestion_ts,
                              producer_app_name=row.producer_app_name, producer_app_version=row.producer_app_version,
                              sdk_name=row.sdk_name, sdk_version=row.sdk_version, error=_error(row),
                              object_type=row.object_type, source_ts=row.source_ts or 0)
    message.entity.MergeFromString(row.entity)
    if row.change_set_id is not None:
        message.change_set.id = row.change_set_id
        message.change_set.data = (row.change_set or "").encode()
        if row.branch_id is not None:
            message.change_set.branch_id = row.branch_id
        if row.deviation_name is not None:
            message.change_set.deviation_name = row.deviation_name
    return message


def metrics(counts: dict[int, int]) -> pb.IngestionMetrics:
    def n(*stored: int) -> int:
        return min(sum(counts.get(state, 0) for state in stored), INT32_MAX)
    return pb.IngestionMetrics(total=n(*counts), queued=n(states.QUEUED, states.CHECKING),
                               reconciled=n(states.APPLIED), failed=n(states.FAILED), no_changes=n(states.NO_CHANGES))


# --- the calls ---


class ReadService(reconciler_pb2_grpc.ReconcilerServiceServicer):
    def __init__(self, connections: Connections) -> None:
        self.connections = connections

    def RetrieveDeviations(self, request, context):
        since, until = time_range(request.ingestion_ts_start, request.ingestion_ts_end)
        filters = Filters(states=stored_states(list(request.state), "state"),
                          object_types=tuple(request.object_type) or None, since=since, until=until,
                          branches=tuple(request.branch_id) or None)
        size = paging.page_size(request.page_size)  # unset reads as 0: the default
        with self.connections.snapshot(context.time_remaining()) as tx:
            page = _page(tx, deviations_query(filters), filters, request.page_token, size, "deviations")
        deviations, next_token = page.answer(deviation)
        return pb.RetrieveDeviationsResponse(deviations=deviations, next_page_token=next_token)

    def RetrieveDeviationByID(self, request, context):
        try:
            external_id = str(uuid.UUID(request.id))
        except ValueError:
            raise invalid("id", f"{request.id!r} is not a deviation id (a UUID)") from None
        with self.connections.snapshot(context.time_remaining()) as tx:
            found = tx.fetchall("api_row_of_external_id", {"external_id": external_id})
            rows = _rows(tx, [found[0][0]]) if found else []
        if not rows:
            raise Refused(grpc.StatusCode.NOT_FOUND, refusal.NO_SUCH_ROW, f"no row has the id {external_id}")
        if rows[0].change_set_id is None:
            raise Refused(grpc.StatusCode.NOT_FOUND, refusal.NOT_PLANNED,
                          f"row {external_id} is {states.NAMES[rows[0].state]} and has no plan yet: it is not a "
                          f"deviation")
        return pb.RetrieveDeviationByIDResponse(deviation=deviation(rows[0]))

    def RetrieveIngestionLogs(self, request, context):
        since, until = time_range(request.ingestion_ts_start, request.ingestion_ts_end)
        object_type = request.object_type or request.data_type
        filters = Filters(states=stored_states([request.state] if request.HasField("state") else [], "state"),
                          object_types=(object_type,) if object_type else None, since=since, until=until,
                          request_id=request.request_id or None)
        if request.only_metrics:
            return pb.RetrieveIngestionLogsResponse(metrics=metrics(self._counts(filters, context.time_remaining())))
        size = paging.page_size(request.page_size)
        with self.connections.snapshot(context.time_remaining()) as tx:
            page = _page(tx, "api_ingestion_log_ids", filters, request.page_token, size, "ingestion logs",
                         with_change_set=True)
        logs, next_token = page.answer(ingestion_log)
        # The Go reconciler's metrics of a page: its size, in total and in the field of the state asked for.
        page_counts = {state: len(logs) for state in (filters.states or ())[:1]} or {0: len(logs)}
        return pb.RetrieveIngestionLogsResponse(logs=logs, metrics=metrics(page_counts), next_page_token=next_token)

    def _counts(self, filters: Filters, seconds_left: float | None) -> dict[int, int]:
        """Rows per stored state: from the counters (statecounts.py) unless a filter needs a count."""
        with self.connections.snapshot(seconds_left) as tx:
            if filters.request_id is None and not filters.since and not filters.until:
                counted = dict(statecounts.by_state_in(tx, _listed(filters.object_types)))
            else:
                counted = dict(tx.fetchall("api_count_ingestion_logs", {**filters.params()}))
        if filters.states is not None:
            counted = {state: n for state, n in counted.items() if state in filters.states}
        return counted
