"""Decoding stream entries: real SDK-built requests, the dedup hash, and malformed input."""

from __future__ import annotations

import hashlib

import brotli
import pytest
from google.protobuf import json_format
from netboxlabs.diode.sdk import ingester as sdk
from netboxlabs.diode.sdk.diode.v1 import ingester_pb2 as pb

from reconciler import sample, streamentry
from reconciler.objecttypes import ENTITY_ONEOF, OBJECT_TYPES

from . import builders

DEVICE = sdk.Device(name="edge-1", site=sdk.Site(name="dc-1", slug="dc-1"), role="access", serial="SN1",
                    device_type=sdk.DeviceType(model="EX4300", manufacturer=sdk.Manufacturer(name="Juniper")))
INTERFACE = sdk.Interface(device=DEVICE, name="ge-0/0/1", type="1000base-t", enabled=True)


# The decoder is checked against every field a client fills, a UUID id and a stream name included.
CLIENT_FIELDS = dict(id="7f1e1c2a-0000-4000-8000-000000000001", producer_app_name="discovery",
                     producer_app_version="1.0.0", stream="latest")


def request(*entities, **overrides) -> pb.IngestRequest:
    return builders.request(*entities, **{**CLIENT_FIELDS, **overrides})


def decode(fields, limits=streamentry.Limits()) -> streamentry.Message:
    return streamentry.decode_entry(b"1700000000000-0", fields, limits)


def reasons(message: streamentry.Message) -> list[tuple[int | None, str]]:
    return [(r.index, r.reason) for r in message.rejections]


# --- good input ---

@pytest.mark.parametrize("compress", [True, False], ids=["brotli", "plain"])
def test_sdk_built_request_becomes_one_row_per_entity(compress):
    entities = [
        sdk.Entity(site=sdk.Site(name="dc-1", slug="dc-1")),
        sdk.Entity(device=DEVICE),
        sdk.Entity(interface=INTERFACE),
        sdk.Entity(ip_address=sdk.IPAddress(address="10.0.0.1/24", assigned_object_interface=INTERFACE)),
        sdk.Entity(prefix=sdk.Prefix(prefix="10.0.0.0/24", scope_site="dc-1")),
        sdk.Entity(vlan=sdk.VLAN(vid=100, name="users", site="dc-1")),
        sdk.Entity(virtual_machine=sdk.VirtualMachine(name="vm-1", cluster="c1", vcpus=2, memory=4096)),
        sdk.Entity(vm_interface=sdk.VMInterface(virtual_machine="vm-1", name="eth0")),
    ]
    req = request(*entities)
    message = decode(sample.stream_fields(req, compress=compress, ingestion_ts=1795836330827381787))

    assert message.rejections == []
    assert [row.object_type for row in message.rows] == [
        "dcim.site", "dcim.device", "dcim.interface", "ipam.ipaddress", "ipam.prefix", "ipam.vlan",
        "virtualization.virtualmachine", "virtualization.vminterface"]
    assert message.ingestion_ts == 1795836330827381787
    assert (message.request_id, message.producer_app_name, message.producer_app_version,
            message.sdk_name, message.sdk_version) == (req.id, "discovery", "1.0.0", "diode-sdk-python", "1.14.3")
    for row, entity in zip(message.rows, entities):
        assert row.entity == entity.SerializeToString()  # the exact bytes the client sent
        expected_ts = entity.timestamp.seconds * 10**9 + entity.timestamp.nanos
        assert row.source_ts == expected_ts


def test_stored_entity_renders_as_protojson_with_proto_field_names():
    message = decode(sample.stream_fields(request(sdk.Entity(interface=INTERFACE))))
    as_json = json_format.MessageToDict(pb.Entity.FromString(message.rows[0].entity),
                                        preserving_proto_field_name=True)
    assert as_json["interface"]["device"]["device_type"]["model"] == "EX4300"
    assert "timestamp" in as_json


def test_every_entity_member_has_a_netbox_object_type():
    assert len(ENTITY_ONEOF.fields) == 106
    assert set(OBJECT_TYPES) == {member.name for member in ENTITY_ONEOF.fields}
    assert len(set(OBJECT_TYPES.values())) == 106
    assert all(value.count(".") == 1 and value == value.lower() for value in OBJECT_TYPES.values())
    assert OBJECT_TYPES["ip_address"] == "ipam.ipaddress"
    assert OBJECT_TYPES["vm_interface"] == "virtualization.vminterface"
    assert OBJECT_TYPES["device_role"] == "dcim.devicerole" and OBJECT_TYPES["role"] == "ipam.role"


def test_sample_network_decodes_without_rejections():
    shape = sample.Shape(sites=2, devices_per_site=3)
    messages = [decode(fields) for fields in sample.entries(shape)]
    assert sum(len(m.rows) for m in messages) == shape.entity_count()
    assert all(not m.rejections for m in messages)


# --- the dedup hash ---

def _hash(entity: pb.Entity) -> bytes:
    """The hash the consumer computes for this entity, sent alone in a request."""
    [row] = decode(sample.stream_fields(request(entity))).rows
    return row.entity_hash


def _tree_walk_hash(entity: pb.Entity) -> bytes:
    """Independent oracle: the definition read literally (copy, drop timestamp, clear metadata by walking)."""
    def clear(message):
        for field in message.DESCRIPTOR.fields:
            if field.name == "metadata":
                message.ClearField("metadata")
            elif field.message_type is not None and field.message_type.GetOptions().map_entry:
                if field.message_type.fields_by_name["value"].message_type is not None:
                    for value in getattr(message, field.name).values():
                        clear(value)
            elif field.message_type is not None and field.is_repeated:
                for value in getattr(message, field.name):
                    clear(value)
            elif field.message_type is not None and message.HasField(field.name):
                clear(getattr(message, field.name))
    copy = pb.Entity()
    copy.CopyFrom(entity)
    copy.ClearField("timestamp")
    clear(copy)
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).digest()


def test_hash_matches_the_definition_on_a_whole_sample_network():
    for entity in sample.network(sample.Shape(sites=1, devices_per_site=4)):
        assert _hash(entity) == _tree_walk_hash(entity)


def test_hash_ignores_timestamp_and_metadata_at_any_depth():
    plain = sdk.Entity(interface=INTERFACE)
    other = pb.Entity()
    other.CopyFrom(plain)
    other.timestamp.seconds += 3600
    other.interface.metadata.update({"source": "lldp"})
    other.interface.device.metadata.update({"run": 7})
    other.interface.device.site.metadata.update({"x": "y"})
    assert _hash(other) == _hash(plain) == _tree_walk_hash(other)


def test_hash_changes_with_an_attribute():
    changed = pb.Entity()
    changed.CopyFrom(sdk.Entity(interface=INTERFACE))
    changed.interface.description = "uplink"
    assert _hash(changed) != _hash(sdk.Entity(interface=INTERFACE))


def test_hash_ignores_producer_fields_and_request_id():
    entity = sdk.Entity(device=DEVICE)
    one = decode(sample.stream_fields(request(entity, producer_app_name="a", id="1")))
    two = decode(sample.stream_fields(request(entity, producer_app_name="b", id="2")))
    assert one.rows[0].entity_hash == two.rows[0].entity_hash


# --- malformed and negative input: entries and entities from other writers than the ingester,
# or from clients it passes through (no entity type, a member this SDK lacks, nesting Go accepts) ---

GOOD = sample.stream_fields(request(sdk.Entity(device=DEVICE)), compress=False)


@pytest.mark.parametrize("fields, reason", [
    ({b"ingestion_ts": b"1"}, "stream entry has no 'request' field"),
    ({b"request": GOOD[b"request"]}, "stream entry has no 'ingestion_ts' field"),
    ({**GOOD, b"ingestion_ts": b"yesterday"}, "'ingestion_ts' is not a decimal integer: b'yesterday'"),
    ({**GOOD, b"ingestion_ts": b"99999999999999999999"}, "does not fit a 64-bit integer"),
    ({**GOOD, b"encoding": b"br"}, "brotli decompression failed"),
    ({**GOOD, b"request": brotli.compress(GOOD[b"request"])}, "request is not a diode.v1.IngestRequest"),
    ({**GOOD, b"encoding": b"gzip"}, "unknown encoding b'gzip'"),
    ({**GOOD, b"request": GOOD[b"request"][:-7]}, "request is not a diode.v1.IngestRequest: truncated"),
    ({**GOOD, b"request": b"\x8b\x01random junk that is not protobuf"}, "request is not a diode.v1.IngestRequest"),
    ({**GOOD, b"request": b'{"entities": []}'}, "request is not a diode.v1.IngestRequest"),
    ({**GOOD, b"request": b""}, "request carries no entities"),
    ({**GOOD, b"request": brotli.compress(GOOD[b"request"])[:-3], b"encoding": b"br"}, "brotli decompression failed"),
], ids=["no-request", "no-ingestion-ts", "ts-not-numeric", "ts-too-big", "br-on-raw-bytes", "brotli-without-encoding",
        "unknown-encoding", "truncated-mid-field", "random-bytes", "json-text", "empty-request", "truncated-brotli"])
def test_undecodable_entries_are_rejected_whole_with_a_reason(fields, reason):
    message = decode(fields)
    assert message.rows == []
    [(index, text)] = reasons(message)
    assert index is None and reason in text
    assert message.rejections[0].fields is fields  # the raw entry is kept byte for byte


def test_too_many_entities_and_oversized_payloads_are_rejected():
    many = decode(sample.stream_fields(request(*[sdk.Entity(site=f"s{i}") for i in range(1001)])))
    assert reasons(many) == [(None, "request carries 1001 entities; at most 1000 are accepted")]
    big = sdk.Entity(device=sdk.Device(name="d", description="x" * 5000))
    limits = streamentry.Limits(max_request_bytes=4096)
    assert "larger than max_request_bytes (4096) after decompression" in reasons(
        decode(sample.stream_fields(request(big)), limits))[0][1]
    assert "larger than max_request_bytes (4096)" in reasons(
        decode(sample.stream_fields(request(big), compress=False), limits))[0][1]


def _raw_request(*entity_bytes: bytes) -> bytes:
    """An IngestRequest whose entities are given as raw bytes (to embed invalid ones)."""
    out = request().SerializeToString()
    for data in entity_bytes:
        out += b"\x12" + streamentry._varint(len(data)) + data
    return out


def _length_delimited(number: int, data: bytes) -> bytes:
    return streamentry._varint(number << 3 | 2) + streamentry._varint(len(data)) + data


def _nested_interfaces(depth: int) -> bytes:
    """Entity{interface: Interface{parent: Interface{parent: ...}}}, encoded by hand: the Python
    runtime cannot even build a message this deep, but a Go client can send one."""
    data = pb.Interface(name="leaf").SerializeToString()
    parent = pb.Interface.DESCRIPTOR.fields_by_name["parent"].number
    for _ in range(depth):
        data = pb.Interface(name="up").SerializeToString() + _length_delimited(parent, data)
    return _length_delimited(pb.Entity.DESCRIPTOR.fields_by_name["interface"].number, data)


def test_one_bad_entity_never_costs_the_others():
    good = sdk.Entity(device=DEVICE).SerializeToString()
    bad_utf8 = (pb.Entity(site=pb.Site(name="placeholder")).SerializeToString()
                .replace(b"placeholder", b"bad\xff\xfename!"))
    too_deep = _nested_interfaces(120)  # protobuf-python refuses nesting deeper than 100 (Go accepts it)
    no_type = pb.Entity(timestamp={"seconds": 1}).SerializeToString()
    unknown_type = b"\xe2\x06\x02\x08\x01"  # Entity field 108 (a member this schema lacks)
    far_future = pb.Entity(site=pb.Site(name="s"), timestamp={"seconds": 32503680000}).SerializeToString()  # year 3000

    raw = _raw_request(good, bad_utf8, too_deep, no_type, unknown_type, far_future, good)
    message = decode(sample.stream_fields(raw))

    assert [row.index for row in message.rows] == [0, 6]
    got = dict(reasons(message))
    assert got[1].startswith("entity 1 is not a valid diode.v1.Entity")
    assert got[2].startswith("entity 2 is not a valid diode.v1.Entity")
    assert got[3] == "entity 3 has no entity type set"
    assert "does not know (Entity field 108)" in got[4]
    assert "outside what a row can hold" in got[5]


def test_entity_dead_letter_is_a_replayable_entry_of_just_that_entity():
    no_type = pb.Entity(timestamp={"seconds": 1}).SerializeToString()
    raw = _raw_request(sdk.Entity(device=DEVICE).SerializeToString(), no_type)
    message = decode(sample.stream_fields(raw, ingestion_ts=42))
    [rejection] = message.rejections
    replayed = pb.IngestRequest.FromString(rejection.fields[b"request"])
    assert [e.SerializeToString() for e in replayed.entities] == [no_type]
    assert replayed.producer_app_name == "discovery" and replayed.id == request().id
    assert rejection.fields[b"ingestion_ts"] == b"42"


def test_request_truncated_at_an_entity_boundary_keeps_what_arrived():
    entities = [sdk.Entity(site=f"s{i}").SerializeToString() for i in range(5)]
    whole = _raw_request(*entities)
    cut = whole[: len(_raw_request(*entities[:3]))]  # the stream lost the last two entities exactly
    message = decode(sample.stream_fields(cut))
    assert len(message.rows) == 3 and not message.rejections


# --- stream ids and the unexpected ---


@pytest.mark.parametrize("stream_id", [b"9223372036854775807-9223372036854775807", b"9223372036854775808-0",
                                       b"1-9223372036854775808", b"18446744073709551615-18446744073709551615"])
def test_every_entry_id_redis_allows_is_accepted(stream_id):
    """Redis allows each part of an id up to 2**64-1 (an id given explicitly to XADD)."""
    message = streamentry.decode_entry(stream_id, GOOD)
    assert len(message.rows) == 1 and message.rejections == []
    assert streamentry.stream_id_parts(stream_id) == tuple(int(part) for part in stream_id.split(b"-"))


@pytest.mark.parametrize("fields, error", [
    ({b"request": GOOD[b"request"].decode("latin-1"), b"ingestion_ts": b"1"}, "TypeError"),
    ({**GOOD, b"ingestion_ts": 1}, "AttributeError"),
], ids=["request-as-text", "ingestion-ts-as-int"])
def test_an_unexpected_error_rejects_that_entry_whole_naming_the_entry_and_the_error(fields, error):
    """No byte string trips the decoder outside the errors it expects (fuzzed), but values of another
    type (what a client reading with decode_responses=True hands over) do: any such error must cost
    that one entry, as a dead letter saying which entry and what went wrong, never the consumer."""
    message = streamentry.decode_entry(b"1700000000000-7", fields)
    assert message.rows == []
    [(index, text)] = reasons(message)
    assert index is None and "1700000000000-7" in text and error in text
    assert message.rejections[0].fields is fields


def test_a_request_whose_stream_or_metadata_is_not_utf8_keeps_its_entities():
    """Neither is kept in a row, so neither may cost the entities (once the whole entry was dead-lettered)."""
    req = request(sdk.Entity(site=sdk.Site(name="dc-1")))
    req.metadata["note"] = "caf"
    raw = req.SerializeToString()
    assert b"\x0a\x06latest" in raw and b"caf" in raw
    raw = raw.replace(b"\x0a\x06latest", b"\x0a\x06lat\xffst").replace(b"\x03caf", b"\x03ca\xe9")
    message = decode({b"request": raw, b"ingestion_ts": b"1"})
    assert message.rejections == [] and len(message.rows) == 1 and message.cleaned == {}


def test_a_request_field_of_the_wrong_kind_rejects_the_entry():
    raw = request(sdk.Entity(site=sdk.Site(name="dc-1"))).SerializeToString() + b"\x20\x01"  # field 4 as a varint
    [(index, reason)] = reasons(decode({b"request": raw, b"ingestion_ts": b"1"}))
    assert index is None and "field 4 at byte" in reason and "wire type 0, not 2" in reason
