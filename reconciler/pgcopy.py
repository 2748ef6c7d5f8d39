"""PostgreSQL binary COPY encoding of the few column types we write in bulk.

psycopg2 only streams bytes for COPY; the text format would need escaping of every bytea value
(twice the size, and slower: docs/benchmarks.md), so tuples are packed here. Each helper returns one
field: its int32 length followed by its bytes (length -1 is NULL).
"""

from __future__ import annotations

import struct

HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
TRAILER = struct.pack(">h", -1)
NULL = struct.pack(">i", -1)

_BIGINT = struct.Struct(">iq")
_INTEGER = struct.Struct(">ii")
_LENGTH = struct.Struct(">i")
_FIELD_COUNT = struct.Struct(">h")


def text(value: str) -> bytes:
    data = value.encode("utf-8")
    return _LENGTH.pack(len(data)) + data


def bigint(value: int | None) -> bytes:
    return NULL if value is None else _BIGINT.pack(8, value)


def integer(value: int) -> bytes:
    return _INTEGER.pack(4, value)


def tuple_start(field_count: int) -> bytes:
    return _FIELD_COUNT.pack(field_count)


def stream(tuples: list[bytes]) -> bytes:
    """A complete COPY ... FROM STDIN (FORMAT binary) payload from encoded tuples."""
    return HEADER + b"".join(tuples) + TRAILER


def nullable_text(value: str | None) -> bytes:
    return NULL if value is None else text(value)


_JSONB_VERSION = b"\x01"


def jsonb(document: bytes | None) -> bytes:
    """A JSON document (already serialized, UTF-8) as jsonb: a version byte, then the text."""
    if document is None:
        return NULL
    return _LENGTH.pack(len(document) + 1) + _JSONB_VERSION + document


_TEXT_OID = 25
_ARRAY_HEADER = struct.Struct(">iiiii")  # dimensions, has-nulls flag, element type, length, lower bound


def text_array(values: list[str] | None) -> bytes:
    """A one-dimensional text[] (NULL for None)."""
    if values is None:
        return NULL
    if not values:
        data = struct.pack(">iii", 0, 0, _TEXT_OID)
    else:
        data = _ARRAY_HEADER.pack(1, 0, _TEXT_OID, len(values), 1) + b"".join(text(v) for v in values)
    return _LENGTH.pack(len(data)) + data
