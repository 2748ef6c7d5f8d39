"""Decoding of diode ingest-stream entries: fields -> IngestRequest -> one row per entity.

Pure functions, no I/O (but a log line with the traceback of an error nobody foresaw). Every input
gets an answer: a row for each good entity, and a rejection that names what was wrong for everything
else (the consumer stores those as dead letters).

The request is split at its top level by hand (a few lines of wire-format walking) and each
entity is parsed on its own, so one malformed entity (invalid UTF-8, nesting deeper than
protobuf-python's limit of 100) never costs the other entities of its request, and the bytes
kept for an entity are exactly the bytes the client sent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import brotli
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet
from netboxlabs.diode.sdk.diode.v1 import ingester_pb2 as pb

from .entityhash import HashingEntity, digest
from .objecttypes import OBJECT_TYPES
from .text import as_text

log = logging.getLogger(__name__)

ENTITIES_FIELD = 2  # IngestRequest.entities
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
UNEXPECTED_ERROR_CHARS = 300  # of the error's text kept in a dead letter's reason
TEXT_COLUMN_CHARS = 255  # request_id, producer and SDK names are varchar(255) in ingestion_logs
# IngestRequest's text fields that every row of the request records, by field number -> Message attribute.
_REQUEST_TEXT_FIELDS = {pb.IngestRequest.DESCRIPTOR.fields_by_name[name].number: attribute for name, attribute in (
    ("id", "request_id"), ("producer_app_name", "producer_app_name"),
    ("producer_app_version", "producer_app_version"), ("sdk_name", "sdk_name"), ("sdk_version", "sdk_version"))}
# The request's length-delimited fields (wire type 2): strings and messages, which is all of them today.
_LENGTH_DELIMITED = (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_MESSAGE)
_REQUEST_WIRE_TYPES = {f.number: 2 for f in pb.IngestRequest.DESCRIPTOR.fields if f.type in _LENGTH_DELIMITED}


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 16 * 1024 * 1024
    max_entities: int = 1000

    @classmethod
    def of(cls, redis_settings) -> Limits:
        """The limits a deployment set: [redis] max_request_bytes and max_entities."""
        return cls(redis_settings.max_request_bytes, redis_settings.max_entities)


@dataclass(slots=True)
class EntityRow:
    """One entity that becomes (or is counted against) an ingestion_logs row."""

    message: Message
    index: int
    object_type: str
    entity: bytes  # the Entity exactly as sent (protobuf), timestamp included
    entity_hash: bytes  # sha256 digest, see entityhash
    source_ts: int | None  # Entity.timestamp in Unix ns; None when the client sent none


# Why input became a dead letter, as the reconciler_dead_letters metric labels it: set where the
# input is refused, so rewording a reason never moves a label.
UNDECODABLE = "undecodable"  # not protobuf, not a diode.v1 message, bad compression or encoding
TOO_LARGE = "too_large"  # beyond max_request_bytes or max_entities
MALFORMED_ENTRY = "malformed_entry"  # the stream entry lacks or garbles a field the ingester writes
NO_ENTITY_TYPE = "no_entity_type"
UNKNOWN_ENTITY_TYPE = "unknown_entity_type"  # a newer schema than ours
BAD_TIMESTAMP = "bad_timestamp"
POSTGRES_REFUSED = "postgres_refused"  # decoded, but Postgres would not store it (inbox.py)
UNEXPECTED_ERROR = "unexpected_error"  # a bug or an input nobody foresaw
DEAD_LETTER_KINDS = (UNDECODABLE, TOO_LARGE, MALFORMED_ENTRY, NO_ENTITY_TYPE, UNKNOWN_ENTITY_TYPE, BAD_TIMESTAMP,
                     POSTGRES_REFUSED, UNEXPECTED_ERROR)


@dataclass(slots=True)
class Rejection:
    """Input that cannot become a row. `fields` is what a dead letter keeps so it can be replayed."""

    message: Message
    index: int | None  # entity index; None when the whole stream entry was rejected
    reason: str
    fields: dict[bytes, bytes]
    kind: str  # one of DEAD_LETTER_KINDS


@dataclass(slots=True)
class Message:
    """One stream entry after decoding."""

    stream_id: bytes
    fields: dict[bytes, bytes]
    header: bytes = b""  # the serialized request without its entities
    ingestion_ts: int = 0
    request_id: str = ""
    producer_app_name: str = ""
    producer_app_version: str = ""
    sdk_name: str = ""
    sdk_version: str = ""
    cleaned: dict[str, str] = field(default_factory=dict)  # request field -> how it was made storable
    rows: list[EntityRow] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)

    @property
    def entity_count(self) -> int:
        return len(self.rows) + sum(1 for r in self.rejections if r.index is not None)


class Unreadable(Exception):
    """The stream entry as a whole cannot be decoded; the message is the dead letter's reason."""

    def __init__(self, reason: str, kind: str = UNDECODABLE) -> None:
        super().__init__(reason)
        self.kind = kind


def stream_id_parts(stream_id: bytes) -> tuple[int, int]:
    """(ms, seq) of a stream entry id: each part an unsigned 64-bit number, as receipts keep them."""
    ms, _, seq = stream_id.partition(b"-")
    return int(ms), int(seq or 0)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise Unreadable("request is not a diode.v1.IngestRequest: truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise Unreadable("request is not a diode.v1.IngestRequest: varint too long")


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field_end(data: bytes, wire_type: int, pos: int, start: int) -> tuple[int, int]:
    """(payload start, field end) of a field whose key ended at pos."""
    if wire_type == 0:
        return pos, _read_varint(data, pos)[1]
    if wire_type == 1:
        return pos, pos + 8
    if wire_type == 5:
        return pos, pos + 4
    if wire_type == 2:
        length, pos = _read_varint(data, pos)
        return pos, pos + length
    raise Unreadable(f"request is not a diode.v1.IngestRequest: wire type {wire_type} at byte {start}")


def length_delimited(number: int, payload: bytes) -> bytes:
    """One length-delimited field (a string, bytes or a message), encoded."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def fields_of(data: bytes):
    """(field number, wire type, field start, payload start, field end) of each top-level field."""
    pos = 0
    while pos < len(data):
        start = pos
        key, pos = _read_varint(data, pos)
        if key >> 3 == 0:
            raise Unreadable(f"request is not a diode.v1.IngestRequest: field number 0 at byte {start}")
        payload, pos = _field_end(data, key & 7, pos, start)
        if pos > len(data):
            raise Unreadable(f"request is not a diode.v1.IngestRequest: truncated field at byte {start}")
        yield key >> 3, key & 7, start, payload, pos


def split_request(data: bytes) -> tuple[bytes, list[bytes]]:
    """(the request without its entities, [the bytes of each entity]) from a serialized IngestRequest."""
    header = bytearray()
    entities: list[bytes] = []
    for number, wire_type, start, payload, end in fields_of(data):
        if number == ENTITIES_FIELD and wire_type == 2:
            entities.append(data[payload:end])
        else:
            header += data[start:end]
    return bytes(header), entities


def _decompress(data: bytes, limit: int) -> bytes:
    decompressor = brotli.Decompressor()
    try:
        out = decompressor.process(data, output_buffer_limit=limit + 1)
        while not decompressor.is_finished() and len(out) <= limit:
            more = decompressor.process(b"", output_buffer_limit=limit + 1 - len(out))
            if not more:
                raise Unreadable("brotli decompression failed: the compressed request is truncated")
            out += more
    except brotli.error as exc:
        raise Unreadable(f"brotli decompression failed: {exc}") from None
    if len(out) > limit:
        raise Unreadable(f"request is larger than max_request_bytes ({limit}) after decompression", TOO_LARGE)
    return out


def _request_bytes(fields: dict[bytes, bytes], limits: Limits) -> bytes:
    raw = fields.get(b"request")
    if raw is None:
        raise Unreadable("stream entry has no 'request' field", MALFORMED_ENTRY)
    if len(raw) > limits.max_request_bytes:
        raise Unreadable(f"request is {len(raw)} bytes, larger than max_request_bytes ({limits.max_request_bytes})",
                         TOO_LARGE)
    encoding = fields.get(b"encoding")
    if encoding == b"br":
        return _decompress(raw, limits.max_request_bytes)
    if encoding not in (None, b""):
        raise Unreadable(f"unknown encoding {encoding[:40]!r} (expected 'br' or none)")
    return raw


def _ingestion_ts(fields: dict[bytes, bytes]) -> int:
    raw = fields.get(b"ingestion_ts")
    if raw is None:
        raise Unreadable("stream entry has no 'ingestion_ts' field", MALFORMED_ENTRY)
    try:
        value = int(raw.decode("ascii"), 10)
    except (UnicodeDecodeError, ValueError):
        raise Unreadable(f"'ingestion_ts' is not a decimal integer: {raw[:40]!r}", MALFORMED_ENTRY) from None
    if not INT64_MIN <= value <= INT64_MAX:
        raise Unreadable(f"'ingestion_ts' {value} does not fit a 64-bit integer", MALFORMED_ENTRY)
    return value


def _clean_text(raw: bytes) -> tuple[str, list[str]]:
    """A request's text field as a row can hold it (varchar(255), no NUL), and what was changed."""
    value = raw.decode("utf-8", "replace")
    changes = [] if value.encode("utf-8") == raw else ["invalid UTF-8 replaced by U+FFFD"]
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
        changes.append("NUL replaced by U+FFFD")
    if len(value) > TEXT_COLUMN_CHARS:
        changes.append(f"truncated from {len(value)} to {TEXT_COLUMN_CHARS} characters")
        value = value[:TEXT_COLUMN_CHARS]
    return value, changes


def _read_header(message: Message) -> None:
    """The request's own fields. Its id, producer and SDK names are metadata of every row: a value a row
    cannot hold (not UTF-8, a NUL, too long) is cleaned and the row says so (Message.cleaned), rather
    than costing the request's entities. Nothing else of the request (its stream, its metadata) is
    kept, so nothing else of it may cost them either: its fields need only be of their declared kind."""
    texts: dict[str, bytes] = {}
    for number, wire_type, start, payload, end in fields_of(message.header):
        expected = _REQUEST_WIRE_TYPES.get(number)
        if expected is not None and wire_type != expected:
            raise Unreadable(f"request is not a diode.v1.IngestRequest: field {number} at byte {start} has wire "
                             f"type {wire_type}, not {expected}")
        name = _REQUEST_TEXT_FIELDS.get(number)
        if name is not None:
            texts[name] = message.header[payload:end]  # the last occurrence wins, as in protobuf
    for name in _REQUEST_TEXT_FIELDS.values():
        value, changes = _clean_text(texts.get(name, b""))
        setattr(message, name, value)
        if changes:
            message.cleaned[name] = "; ".join(changes)


def _source_ts(entity) -> int | None:
    if not entity.HasField("timestamp"):
        return None
    ts = entity.timestamp
    value = ts.seconds * 1_000_000_000 + ts.nanos
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"timestamp {ts.seconds}s is outside what a row can hold (years 1678-2262)")
    return value


def _untyped_reason(index: int, entity) -> tuple[str, str]:
    unknown = sorted({f.field_number for f in UnknownFieldSet(entity)})
    if unknown:
        numbers = ", ".join(str(n) for n in unknown)
        return (f"entity {index} has an entity type this reconciler's diode.v1 schema does not know "
                f"(Entity field {numbers}); a newer SDK produced it"), UNKNOWN_ENTITY_TYPE
    return f"entity {index} has no entity type set", NO_ENTITY_TYPE


def _entity(message: Message, index: int, data: bytes) -> EntityRow | tuple[str, str]:
    """The row for one entity, or why it cannot be one: (reason, dead-letter kind).

    One parse per entity (the consumer's largest cost), with the hashing variant of the schema: it
    validates every field but the Diode-only `metadata`, which a poll worker validates when it
    renders the entity for the plugin.
    """
    try:
        entity = HashingEntity.FromString(data)
    except (DecodeError, UnicodeDecodeError) as exc:
        return f"entity {index} is not a valid diode.v1.Entity: {exc}", UNDECODABLE
    member = entity.WhichOneof("entity")
    if member is None:
        return _untyped_reason(index, entity)
    try:
        source_ts = _source_ts(entity)
    except ValueError as exc:
        return f"entity {index}: {exc}", BAD_TIMESTAMP
    return EntityRow(message, index, OBJECT_TYPES[member], data, digest(entity), source_ts)


def _one_entity_fields(message: Message, data: bytes) -> dict[bytes, bytes]:
    """A stream entry holding only this entity (plus the request's own fields): replayable alone."""
    request = message.header + length_delimited(ENTITIES_FIELD, data)
    return {b"request": request, b"ingestion_ts": message.fields.get(b"ingestion_ts", b"0")}


def entity_fields(row: EntityRow) -> dict[bytes, bytes]:
    """The replayable stream entry of one entity that Postgres later refused."""
    return _one_entity_fields(row.message, row.entity)


def _decode_entities(message: Message, entities: list[bytes]) -> None:
    for index, data in enumerate(entities):
        outcome = _entity(message, index, data)
        if isinstance(outcome, EntityRow):
            message.rows.append(outcome)
        else:
            reason, kind = outcome
            message.rejections.append(Rejection(message, index, reason, _one_entity_fields(message, data), kind))


def decode_entry(stream_id: bytes, fields: dict[bytes, bytes], limits: Limits = Limits()) -> Message:
    """Decode one stream entry into rows and rejections; never raises.

    Bad input gets the precise reason below. Any other error (a bug, an input nobody foresaw) rejects
    this entry whole, naming it and the error: one entry must never stop the consumer, nor cost the
    other entries of its read.
    """
    try:
        return _decode(stream_id, fields, limits)
    except Exception as exc:
        log.error("unexpected error decoding stream entry %r; it becomes a dead letter", stream_id, exc_info=True)
        message = Message(stream_id=stream_id, fields=fields)
        # repr: escapes what a stored text or a log line cannot carry (NUL, lone surrogates, newlines).
        error = repr(exc)[:UNEXPECTED_ERROR_CHARS]
        reason = f"stream entry {as_text(stream_id)} could not be decoded: unexpected {error}"
        message.rejections.append(Rejection(message, None, reason, fields, UNEXPECTED_ERROR))
        return message


def _decode(stream_id: bytes, fields: dict[bytes, bytes], limits: Limits) -> Message:
    message = Message(stream_id=stream_id, fields=fields)
    try:
        message.ingestion_ts = _ingestion_ts(fields)
        message.header, entities = split_request(_request_bytes(fields, limits))
        _read_header(message)
        if not entities:
            raise Unreadable("request carries no entities", MALFORMED_ENTRY)
        if len(entities) > limits.max_entities:
            raise Unreadable(f"request carries {len(entities)} entities; at most {limits.max_entities} are accepted",
                             TOO_LARGE)
    except Unreadable as exc:
        message.rejections.append(Rejection(message, None, str(exc), fields, exc.kind))
        return message
    _decode_entities(message, entities)
    return message
