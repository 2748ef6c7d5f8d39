"""The `api` role: serves the read API (diode.v1.ReconcilerService, service.py) over gRPC, with the
ecosystem's conventions around it: server reflection, the standard health service (grpc.health.v1),
a Prometheus count and duration of every call, and a drain on stop.

The gRPC server runs its own threads, [api] threads of them, each call with one of the role's Postgres
connections (opened after fork, on first use). The role's loop only watches: every few seconds it
asks Postgres, and the health service says NOT_SERVING while Postgres does not answer. On SIGTERM the
health service turns NOT_SERVING at once, new calls are refused, and calls already running get
DRAIN_SECONDS to finish.

Every call to the service passes the guard first: the token check of [api] auth (auth.py), then the
call itself; a refusal or a failure becomes a status code and a message for the caller, and the
method, code and duration are counted. Reflection and health answer without a token, as probes and
tools expect.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .. import metrics
from ..db import Database
from ..errors import BootError, DatabaseError
from ..roles import Role
from . import auth, reconciler_pb2, reconciler_pb2_grpc
from .service import Connections, ReadService

log = logging.getLogger(__name__)

SERVICE = reconciler_pb2.DESCRIPTOR.services_by_name["ReconcilerService"].full_name
CHECK_SECONDS = 5.0  # how often the role asks Postgres whether the API can serve
DRAIN_SECONDS = 10.0  # on stop, how long running calls may finish (they take milliseconds)
WAITING_CALLS_PER_THREAD = 8  # calls beyond threads x this are refused with RESOURCE_EXHAUSTED


class Guard(grpc.ServerInterceptor):
    """Checks the token of every call to the service, turns refusals and failures into status codes,
    and counts each call by method and code."""

    def __init__(self, check: Callable[[str], None]) -> None:
        self.check = check

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        service, _, method = handler_call_details.method.strip("/").partition("/")
        if handler is None or service != SERVICE or handler.unary_unary is None:
            return handler
        answer = handler.unary_unary

        def guarded(request, context):
            started, code = time.perf_counter(), grpc.StatusCode.OK
            try:
                self.check(auth.bearer(dict(context.invocation_metadata())))
                return answer(request, context)
            except auth.Refused as refused:
                code = refused.code
                context.abort(refused.code, refused.message)
            except DatabaseError as exc:
                code = grpc.StatusCode.UNAVAILABLE
                log.warning("%s: cannot read Postgres: %s", method, exc)
                context.abort(code, "the reconciler cannot read its database now; retry later")
            except Exception:
                code = grpc.StatusCode.INTERNAL
                log.exception("%s failed", method)
                context.abort(code, "the reconciler failed to answer; its log says why")
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
        self._next_check = 0.0

    def boot(self) -> None:
        settings = self.config.api
        self.open_database().check_schema()
        try:
            check = auth.checker(settings)
        except (OSError, ValueError) as exc:
            raise BootError(f"[api] auth {settings.auth}: {exc}") from exc
        connections = self.closes(Connections(self.config.postgres.dsn, self.config.postgres.schema, settings.threads))
        server = grpc.server(ThreadPoolExecutor(max_workers=settings.threads, thread_name_prefix="api"),
                             interceptors=[Guard(check)],
                             maximum_concurrent_rpcs=settings.threads * WAITING_CALLS_PER_THREAD,
                             # gRPC shares a port with any process that asks by default; an address
                             # in use must fail the boot instead of splitting calls with a stranger.
                             options=[("grpc.so_reuseport", 0)])
        reconciler_pb2_grpc.add_ReconcilerServiceServicer_to_server(ReadService(connections), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        try:
            port = server.add_insecure_port(settings.listen)
        except RuntimeError as exc:
            raise BootError(f"[api] listen {settings.listen}: cannot listen there ({exc}); is another process "
                            f"using the port?") from exc
        server.start()
        self.server = server
        self._set_serving(True)
        host = settings.listen.rpartition(":")[0]
        log.info("serving %s on %s:%d (auth %s)", SERVICE, host, port, settings.auth,
                 extra={"event": "api_serving", "port": port, "auth": settings.auth})

    def run_once(self) -> None:
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + CHECK_SECONDS
            self._set_serving(self._database_answers())
        self.pause(1.0)

    def _database_answers(self) -> bool:
        try:
            self.db.fetchall("ping")
        except DatabaseError as exc:
            if self.serving:
                log.warning("not serving: cannot read Postgres: %s", exc)
            return False
        return True

    def _set_serving(self, serving: bool) -> None:
        if serving == self.serving:
            return
        if serving and self.serving is False:
            log.info("serving again: Postgres answers")
        self.serving = serving
        status: Any = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE):
            self.health.set(service, status)
        metrics.api_serving(serving)

    def shutdown(self) -> None:
        if self.server is not None:
            self.health.enter_graceful_shutdown()
            metrics.api_serving(False)
            self.server.stop(DRAIN_SECONDS).wait()
            log.info("the read API stopped")
        super().shutdown()


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
