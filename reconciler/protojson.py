"""diode.v1 entities as protojson dicts with proto field names, the form the plugin reads.

Equal to json_format.MessageToDict(message, preserving_proto_field_name=True), which the tests
check on whole sample networks and on every field kind. MessageToDict inspects every field's
descriptor on every call, which is slow (docs/benchmarks.md); this walks only
the fields that are set and decides how to render each field once. Within a batch, references
repeat (the 48 interfaces of a switch each embed the same device), so nested messages are rendered
once per batch and shared. The diode schema uses strings, int64, bool, double, bytes, nested
messages, string-keyed maps and two well-known types (Timestamp, Struct); anything else falls back
to MessageToDict.
"""

from __future__ import annotations

import base64
import math
from typing import Any, Callable

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

_T = FieldDescriptor


def _double(value: float) -> Any:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _bytes(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _identity(value: Any) -> Any:
    return value


def _timestamp(value) -> str:
    return value.ToJsonString()


def _fallback(value) -> Any:
    return json_format.MessageToDict(value, preserving_proto_field_name=True)


_SCALARS: dict[int, Callable[[Any], Any]] = {
    _T.TYPE_STRING: _identity, _T.TYPE_BOOL: _identity, _T.TYPE_INT64: str, _T.TYPE_DOUBLE: _double,
    _T.TYPE_BYTES: _bytes,
}


def _is_repeated(field: FieldDescriptor) -> bool:
    flag = getattr(field, "is_repeated", None)  # protobuf >= 6.33; `label` is gone in 7
    return flag if flag is not None else field.label == _T.LABEL_REPEATED


def _renderer(field: FieldDescriptor) -> Callable[[Any], Any]:
    """How to render one field's value (decided once per field)."""
    target = field.message_type
    if target is not None and target.GetOptions().map_entry:
        value_field = target.fields_by_name["value"]
        render_value = _single(value_field)
        return lambda value: {str(key): render_value(item) for key, item in value.items()}
    render = _single(field)
    if _is_repeated(field):
        return lambda value: [render(item) for item in value]
    return render


def _single(field: FieldDescriptor) -> Callable[[Any], Any]:
    target = field.message_type
    if target is None:
        return _SCALARS.get(field.type, _identity)
    if target.full_name == "google.protobuf.Timestamp":
        return _timestamp
    if target.full_name.startswith("google.protobuf."):
        return _fallback
    return _nested


_RENDERERS: dict[FieldDescriptor, Callable[[Any], Any]] = {}
_shared: dict[tuple, dict] | None = None  # nested messages rendered in the current batch


def _nested(message) -> dict:
    if _shared is None:
        return to_dict(message)
    key = (message.DESCRIPTOR.full_name, message.SerializeToString())
    rendered = _shared.get(key)
    if rendered is None:
        rendered = _shared[key] = to_dict(message)
    return rendered


def to_dict(message) -> dict:
    """The message as MessageToDict(preserving_proto_field_name=True) renders it."""
    out = {}
    for field, value in message.ListFields():
        render = _RENDERERS.get(field)
        if render is None:
            if field.type not in _SCALARS and field.type != _T.TYPE_MESSAGE:
                return _fallback(message)  # a kind the diode schema does not use (enum, float, int32...)
            render = _RENDERERS[field] = _renderer(field)
        out[field.name] = render(value)
    return out


def batch_to_dicts(messages: list) -> list[dict]:
    """to_dict of each message, rendering nested messages that repeat across the batch once.

    The dicts share their nested parts: treat them as read-only (they are JSON-encoded as they are).
    """
    global _shared
    _shared = {}
    try:
        return [to_dict(message) for message in messages]
    finally:
        _shared = None
