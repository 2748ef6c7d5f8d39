"""How the read API says no: a gRPC status code, a message for the person reading it, and a reason
for the program reading it (google.rpc.ErrorInfo in the status details, gRPC's convention for
machine-readable errors: `grpc_status.rpc_status.from_call` on the client side). Clients decide by
the reason, never by the message."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "reconciler.diode.v1"

# reasons
NO_TOKEN = "NO_TOKEN"  # no `authorization: Bearer` metadata
NOT_A_JWT = "NOT_A_JWT"  # gateway mode: the token cannot be read as a JWT
TOKEN_EXPIRED = "TOKEN_EXPIRED"
TOKEN_INACTIVE = "TOKEN_INACTIVE"  # introspection: not active (expired, revoked, unknown)
WRONG_TOKEN = "WRONG_TOKEN"  # token mode: not the configured token
SCOPE_MISSING = "SCOPE_MISSING"  # a good token without [api] scope
INTROSPECTION_FAILED = "INTROSPECTION_FAILED"  # the introspection endpoint gave no usable answer
BAD_ARGUMENT = "BAD_ARGUMENT"  # a field of the request is invalid (metadata `field` names it)
BAD_PAGE_TOKEN = "BAD_PAGE_TOKEN"  # not a token this service issued
FILTERS_CHANGED = "FILTERS_CHANGED"  # a page token reused with other filters
NO_SUCH_ROW = "NO_SUCH_ROW"  # RetrieveDeviationByID: no row has the id
NOT_PLANNED = "NOT_PLANNED"  # RetrieveDeviationByID: the row has no plan yet, so it is no deviation
DATABASE_UNAVAILABLE = "DATABASE_UNAVAILABLE"  # Postgres did not answer; retry later
QUERY_TOO_SLOW = "QUERY_TOO_SLOW"  # the call's query ran out of time; narrow the filters
INTERNAL = "INTERNAL"  # a bug: the log has the traceback


class Refused(Exception):
    """A call refused or failed: its gRPC status code, reason and the message the caller gets."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str, **metadata: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.metadata = code, reason, message, metadata

    def status(self) -> grpc.Status:
        """For context.abort_with_status: the code, the message and the reason as an ErrorInfo."""
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=self.metadata))
        return rpc_status.to_status(status_pb2.Status(code=self.code.value[0], message=self.message, details=[info]))


def invalid(field: str, message: str, reason: str = BAD_ARGUMENT) -> Refused:
    return Refused(grpc.StatusCode.INVALID_ARGUMENT, reason, f"{field}: {message}", field=field)


def reason_of(error: grpc.RpcError) -> str | None:
    """The reason of a refused call, on the client side (tests, tools)."""
    status = rpc_status.from_call(error)
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return None
