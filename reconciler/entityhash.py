"""The dedup key of an entity, as diode defines it.

sha256 over the deterministic protobuf encoding of an Entity that holds only the oneof payload
(the Entity timestamp is left out) after every field named `metadata` was cleared at any depth.
So the same object seen at another time, or with other metadata, hashes the same.

Clearing `metadata` by walking the message tree in Python costs more than all the other
per-entity work of the consumer together (docs/benchmarks.md). Instead we derive, at import, a
variant of the SDK's own diode.v1 schema with every `metadata` field removed. Parsing an entity
with it turns metadata into unknown fields, which upb's DiscardUnknownFields() drops recursively in
C, for a fraction of that cost. The one difference from a tree walk: unknown fields (members a
newer SDK added) do not count either, which matches what can reach NetBox: protojson, the plugin's
input, cannot carry unknown fields.
"""

from __future__ import annotations

import hashlib

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from netboxlabs.diode.sdk.diode.v1 import ingester_pb2 as pb


def _without_metadata(messages) -> None:
    for message in messages:
        kept = [field for field in message.field if field.name != "metadata"]
        del message.field[:]
        message.field.extend(kept)
        _without_metadata(message.nested_type)


def _add_file(pool: descriptor_pool.DescriptorPool, file, added: set[str]) -> None:
    if file.name in added:
        return
    for dependency in file.dependencies:
        _add_file(pool, dependency, added)
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)
    if file is pb.DESCRIPTOR:
        _without_metadata(proto.message_type)
    pool.Add(proto)
    added.add(file.name)


def _hashing_entity_class():
    pool = descriptor_pool.DescriptorPool()
    _add_file(pool, pb.DESCRIPTOR, set())
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("diode.v1.Entity"))


# Parses an Entity like diode.v1.Entity, validating every field except the Diode-only `metadata`
# ones, which it keeps as unknown fields. The consumer parses each entity once, with this class.
HashingEntity = _hashing_entity_class()


def digest(entity) -> bytes:
    """sha256 (32 bytes) of a HashingEntity's payload without timestamp and metadata. Mutates it."""
    entity.ClearField("timestamp")
    entity.DiscardUnknownFields()
    return hashlib.sha256(entity.SerializeToString(deterministic=True)).digest()
