"""A real grpcio client of the read API, against `reconciler run` serving it on a port of its own
(test_api.py, test_api_wire.py)."""

from __future__ import annotations

import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import grpc
import jwt
from grpc_health.v1 import health_pb2, health_pb2_grpc

from reconciler.api import reconciler_pb2_grpc
from reconciler.api.refusal import reason_of

from .support import Reconciler, reconciler

SCOPE = "diode:read"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gateway_token(scope: str = SCOPE, expires_in: float | None = 3600) -> str:
    """A JWT as the diode gateway passes it on; the key is the issuer's, which the reconciler never sees."""
    claims: dict = {"sub": "reader", "scope": scope}
    if expires_in is not None:
        claims["exp"] = int(time.time() + expires_in)
    return jwt.encode(claims, "the issuer's key, unknown to the reconciler", algorithm="HS256")


@dataclass
class Served:
    run: Reconciler
    address: str
    channel: grpc.Channel

    @property
    def stub(self) -> reconciler_pb2_grpc.ReconcilerServiceStub:
        return reconciler_pb2_grpc.ReconcilerServiceStub(self.channel)

    def call(self, method: str, request, token: str | None = None):
        """One call with `authorization: Bearer <token>` (none when token is None)."""
        metadata = None if token is None else [("authorization", f"Bearer {token}")]
        return getattr(self.stub, method)(request, metadata=metadata, timeout=30)

    def refusal(self, method: str, request, token: str | None = None) -> tuple[grpc.StatusCode, str | None]:
        """The status code and reason (google.rpc.ErrorInfo) of a call that must fail."""
        try:
            self.call(method, request, token)
        except grpc.RpcError as error:
            return error.code(), reason_of(error)
        raise AssertionError(f"{method} was answered, not refused")

    def walk(self, method: str, request, token: str, items: str) -> Iterator:
        """Every item of every page, following next_page_token."""
        while True:
            response = self.call(method, request, token)
            yield from getattr(response, items)
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token


def health_status(channel: grpc.Channel, service: str = "") -> int:
    """What grpc.health.v1 on `channel` says of `service` ("": the server as a whole)."""
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


@contextmanager
def served(env: dict[str, str], tmp_path: Path, **settings: str) -> Iterator[Served]:
    """`reconciler run` with the read API on a free loopback port (RECONCILER_API_* from `settings`)."""
    address = f"127.0.0.1:{free_port()}"
    environ = {**env, "RECONCILER_API_LISTEN": address,
               **{f"RECONCILER_API_{key.upper()}": value for key, value in settings.items()}}
    with reconciler(environ, tmp_path) as run:
        run.wait_for_event("api_serving")
        channel = grpc.insecure_channel(address)
        try:
            yield Served(run, address, channel)
        finally:
            channel.close()
