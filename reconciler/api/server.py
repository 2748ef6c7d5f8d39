"""The `api` role: serves the read API (diode.v1.ReconcilerService, service.py) over gRPC, with the
ecosystem's conventions around it: server reflection, the standard health service (grpc.health.v1),
a Prometheus count and duration of every call, and a drain on stop.

The gRPC server runs its own threads, [api] threads of them, each call with one of the role's Postgres
connections (opened after fork, on first use). The role's loop watches: every few seconds it asks
Postgres (the health service says NOT_SERVING while Postgres does not answer) and folds the state
counters (statecounts.py; the consumer does too, and the first to take the lock wins). The API is an
extra, not the pipeline: an address in use or Postgres down never fails the role's boot, which would
make the supervisor give up the whole service; the role says so and tries again.

On SIGTERM the health service turns NOT_SERVING, a load balancer gets a moment to see it, then new
calls are refused and calls already running get the rest of the drain to finish.

Every call to the service, and to reflection (which would otherwise let anyone hold a thread with
an idle stream), passes the guard: the token check of [api] auth (auth.py), then the call; a refusal
or a failure becomes a status code with a reason (refusal.py), and the service's calls are counted by
method, code and duration. Health answers without a token, as probes expect.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .. import metrics, statecounts
from ..db import Database
from ..errors import BootError, DatabaseError, QueryCanceled
from ..roles import Role
from . import auth, reconciler_pb2, reconciler_pb2_grpc, refusal
from .refusal import Refused
from .service import STATEMENT_SECONDS, Connections, ReadService

log = logging.getLogger(__name__)

SERVICE = reconciler_pb2.DESCRIPTOR.services_by_name["ReconcilerService"].full_name
REFLECTION = {reflection.SERVICE_NAME, "grpc.reflection.v1.ServerReflection"}
CHECK_SECONDS = 5.0  # how often the role asks Postgres whether the API can serve
BIND_RETRY_SECONDS = 10.0  # how often an address in use is tried again
DRAIN_NOTICE_SECONDS = 1.0  # NOT_SERVING before calls are refused, for a load balancer polling health
DRAIN_SECONDS = 10.0  # then, at most this for running calls (less when [supervisor] drain_seconds is short)
WAITING_CALLS_PER_THREAD = 8  # calls beyond threads x this are refused with RESOURCE_EXHAUSTED


def failure(exc: Exception, method: str) -> Refused:
    """What the caller of a call that failed on our side is told."""
    if isinstance(exc, QueryCanceled):
        return Refused(grpc.StatusCode.DEADLINE_EXCEEDED, refusal.QUERY_TOO_SLOW,
                       f"the query took longer than the call's deadline or {STATEMENT_SECONDS:g} s: narrow the "
                       f"filters (a state, an object type, a shorter time range)")
    if isinstance(exc, DatabaseError):
        log.warning("%s: cannot read Postgres: %s", method, exc)
        return Refused(grpc.StatusCode.UNAVAILABLE, refusal.DATABASE_UNAVAILABLE,
                       "the reconciler cannot read its database now; retry later")
    log.error("%s failed", method, exc_info=exc)
    return Refused(grpc.StatusCode.INTERNAL, refusal.INTERNAL, "the reconciler failed to answer; its log says why")


class Guard(grpc.ServerInterceptor):
    """Checks the token of every call to the service and to reflection, turns refusals and failures
    into status codes with a reason, and counts the service's calls by method and code."""

    def __init__(self, check: Callable[[str], None]) -> None:
        self.check = check

    def intercept_service(self, continuation, handler_call_details):
        service, _, method = handler_call_details.method.strip("/").partition("/")
        handler = continuation(handler_call_details)
        if handler is None or service not in REFLECTION | {SERVICE}:
            return handler  # health, or nothing: answered as gRPC does
        if service in REFLECTION and handler.stream_stream is not None:
            return self._reflection(handler)
        if service == SERVICE and handler.unary_unary is not None:
            return self._service_call(handler, method)
        return None  # a shape we do not guard is not served: UNIMPLEMENTED

    def _check_token(self, context) -> None:
        """Raises Refused unless the call's bearer token passes [api] auth."""
        self.check(auth.bearer(dict(context.invocation_metadata())))

    def _reflection(self, handler):
        answer = handler.stream_stream

        def guarded(requests, context):
            try:
                self._check_token(context)
            except Refused as refused:
                context.abort_with_status(refused.status())
            yield from answer(requests, context)

        return grpc.stream_stream_rpc_method_handler(guarded, request_deserializer=handler.request_deserializer,
                                                     response_serializer=handler.response_serializer)

    def _service_call(self, handler, method: str):
        answer = handler.unary_unary

        def guarded(request, context):
            started, code = time.perf_counter(), grpc.StatusCode.OK
            try:
                self._check_token(context)
                return answer(request, context)
            except Refused as refused:
                code = refused.code
                context.abort_with_status(refused.status())
            except Exception as exc:  # noqa: BLE001 - every failure becomes a status for the caller
                failed = failure(exc, method)
                code = failed.code
                context.abort_with_status(failed.status())
            finally:
                metrics.api_call(method, code.name, time.perf_counter() - started)

        return grpc.unary_unary_rpc_method_handler(guarded, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)


class ApiServer(Role):
    name = "api"
    db: Database  # boot() opens it (Role.open_database): the role's own checks, not the calls'

    def __init__(self, config) -> None:
        super().__init__(config)
        self.server: grpc.Server | None = None
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self.serving: bool | None = None
        self.counts = statecounts.Folder(config.postgres.schema)
        self._next_check = self._next_bind = self._next_bind_error = 0.0
        self._check: Callable[[str], None]
        self._connections: Connections

    def boot(self) -> None:
        settings = self.config.api
        self.open_database()  # connects on first use: Postgres down is NOT_SERVING, not a failed boot
        try:
            self._check = auth.checker(settings)
        except (OSError, ValueError) as exc:
            raise BootError(f"[api] auth {settings.auth}: {exc}") from exc
        self._connections = self.closes(Connections(self.config.postgres.dsn, self.config.postgres.schema,
                                                    settings.threads))
        self._set_serving(self._database_answers())  # also creates the metrics before any call counts
        self._listen()

    def _listen(self) -> None:
        """Start serving on [api] listen; if the address is taken, say so and try again later."""
        settings = self.config.api
        server = grpc.server(ThreadPoolExecutor(max_workers=settings.threads, thread_name_prefix="api"),
                             interceptors=[Guard(self._check)],
                             maximum_concurrent_rpcs=settings.threads * WAITING_CALLS_PER_THREAD,
                             # gRPC shares a port with any process that asks by default; an address
                             # in use must be told, not split calls with a stranger.
                             options=[("grpc.so_reuseport", 0)])
        reconciler_pb2_grpc.add_ReconcilerServiceServicer_to_server(ReadService(self._connections), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        try:
            port = server.add_insecure_port(settings.listen)
        except RuntimeError as exc:
            self._next_bind = time.monotonic() + BIND_RETRY_SECONDS
            self._cannot_listen(exc)
            return
        server.start()
        self.server = server
        host = settings.listen.rpartition(":")[0]
        log.info("serving %s on %s:%d (auth %s)", SERVICE, host, port, settings.auth,
                 extra={"event": "api_serving", "port": port, "auth": settings.auth})

    def _cannot_listen(self, exc: RuntimeError) -> None:
        now = time.monotonic()
        if now < self._next_bind_error:
            return
        self._next_bind_error = now + self.config.log.outage_reminder_seconds
        log.error("the read API is not served: cannot listen on [api] listen %s (%s; is another process using "
                  "the port?); trying again every %.0f s", self.config.api.listen, exc, BIND_RETRY_SECONDS,
                  extra={"event": "api_cannot_listen"})

    def run_once(self) -> None:
        now = time.monotonic()
        if self.server is None and now >= self._next_bind:
            self._listen()
        if now >= self._next_check:
            self._next_check = now + CHECK_SECONDS
            self._set_serving(self._database_answers())
            self.counts.tick(self.db)
        self.pause(1.0)

    def _database_answers(self) -> bool:
        try:
            self.db.fetchall("ping")
        except DatabaseError as exc:
            if self.serving is not False:
                log.warning("the read API is not serving: cannot read Postgres: %s", exc)
            return False
        return True

    def _set_serving(self, serving: bool) -> None:
        if serving == self.serving:
            return
        if serving and self.serving is False:
            log.info("the read API serves again: Postgres answers")
        self.serving = serving
        status: Any = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE):
            self.health.set(service, status)
        metrics.api_serving(serving)

    def shutdown(self) -> None:
        if self.server is not None:
            self.health.enter_graceful_shutdown()
            metrics.api_serving(False)
            time.sleep(DRAIN_NOTICE_SECONDS)
            self.server.stop(drain_seconds(self.config)).wait()
            log.info("the read API stopped")
        super().shutdown()


def drain_seconds(config) -> float:
    """How long running calls may finish on stop: DRAIN_SECONDS, within half the supervisor's drain
    (the rest covers the notice and closing the connections, whose statements stop within
    STATEMENT_SECONDS)."""
    return max(0.0, min(DRAIN_SECONDS, config.supervisor.drain_seconds / 2 - DRAIN_NOTICE_SECONDS))


PROBE_SECONDS = 3.0


def health_of(listen: str, timeout: float = PROBE_SECONDS) -> str:
    """What grpc.health.v1 at `listen` says of the service (SERVING, NOT_SERVING...); raises
    grpc.RpcError when nothing answers. `reconciler status` asks it."""
    host, _, port = listen.rpartition(":")
    host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "": "127.0.0.1"}.get(host, host)  # wildcard: ask locally
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE),
                                                          timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
