"""Which NetBox objects an entity's plan can touch, and which a change in NetBox's change log touched,
as keys that meet when the change could matter to the entity (pure functions, no I/O).

The plugin plans an entity by resolving every object in it (the entity and each nested reference)
to a NetBox object by natural keys, then writing the fields the entity sets. So an edit or delete by
hand can only matter to an entity that names the edited object. Both sides name objects the same
way: their type and their primary value (`name`, `address`, `model`... the SDK's PRIMARY_VALUE_MAP,
which is also what the plugin reports as `object_primary_value`), normalised so that spellings the
plugin treats as one object meet (case, an IP address's mask, MAC separators). Objects are also
qualified by their owner: components (an interface, a VM interface, a console port...) by their
device or virtual machine, devices, racks and VLANs by their site: `ge-0/0/1` exists on every
switch and `core-1` in every site, and an edit of one must not re-plan them all.

The rule may only over-select, never miss. Every doubt widens the match instead of narrowing it:
  `T|?`       every object the entity names carries this; a change whose object's primary value
              cannot be read emits it, and so meets every entity that names an object of type T;
  `T|*`       an object the entity names without a primary value (or by NetBox id alone) meets
              every change of type T, which always emits it;
  `T|n|*`     an object without a known owner: meets every change of a T named n;
  `T|n|o`     an object named n of owner o; it also carries `T|n|?`, which a change emits when it
              cannot tell an owner, so such a change meets every object of type T named n.
Normalising only merges values (never tells apart what the plugin would treat as one), so two
objects that share a key are at worst both re-planned.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Iterator

from google.protobuf.message import Message
from netboxlabs.diode.sdk.diode.v1 import ingester_pb2 as pb
from netboxlabs.diode.sdk.ingester import PRIMARY_VALUE_MAP

from .objecttypes import ENTITY_ONEOF, MEMBERS, object_type_of_message

# Fields that scope a name, by the type they point to: the same name in the diode schema and in
# NetBox's serialized data. A row is qualified by the first of them its message sets.
OWNER_FIELDS = {"device": "dcim.device", "virtual_machine": "virtualization.virtualmachine", "site": "dcim.site"}
OWNER_TYPES = frozenset(OWNER_FIELDS.values())
# Other fields the plugin may match an object of these types by (its part-number fallback binds a
# device type whose model differs from the entity's): names under them are names too.
ALIAS_FIELDS = {"dcim.devicetype": ("part_number",), "dcim.moduletype": ("part_number",)}
_SEPARATORS = re.compile(r"[\s:.\-_]")
_ADDRESS_LIKE = re.compile(r"[0-9a-f:.]+(/\d+)?$")  # worth asking ipaddress whether it is one


def normalise(value, field: str = "name") -> str:
    """One spelling for values the plugin matches as one: case, an IP's mask, MAC separators, and a
    prefix's host bits (NetBox stores 10.0.0.1/24 as 10.0.0.0/24)."""
    text = str(value).strip().lower()
    if _ADDRESS_LIKE.match(text):
        try:
            if field == "prefix":
                return str(ipaddress.ip_network(text, strict=False).network_address)
            return str(ipaddress.ip_interface(text).ip)
        except ValueError:
            pass
    return _SEPARATORS.sub("", text)


def primary_field(object_type: str) -> str:
    """The field NetBox objects of this type are named by, for the plugin and for us."""
    member = MEMBERS.get(object_type)
    if member is None:
        return "name"
    return PRIMARY_VALUE_MAP.get(pb.Entity.DESCRIPTOR.fields_by_name[member].message_type.name, "name")


# --- the entity side ---


def entity_keys(entity: pb.Entity) -> list[str]:
    """The keys of every object an entity names: the entity itself and each nested reference."""
    member = entity.WhichOneof(ENTITY_ONEOF.name)
    if member is None:
        return []
    return sorted(set(_message_keys(getattr(entity, member))))


def _message_keys(message: Message) -> Iterator[str]:
    object_type = object_type_of_message(message.DESCRIPTOR.name)
    if object_type is not None:
        yield from _object_keys(object_type, message)
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        if field.name == "custom_fields":  # a custom field redefined by hand rewrites its values unlogged
            yield "extras.customfield|?"
            yield from (f"extras.customfield|{normalise(name)}|*" for name in value)
        if field.is_repeated:
            values = value.values() if field.message_type.GetOptions().map_entry else value
            for item in values:
                if isinstance(item, Message):
                    yield from _message_keys(item)
        else:
            yield from _message_keys(value)


def _object_keys(object_type: str, message: Message) -> Iterator[str]:
    yield f"{object_type}|?"
    name_field = PRIMARY_VALUE_MAP.get(message.DESCRIPTOR.name, "name")
    name = _set_value(message, name_field)
    if name is None or _has_netbox_id(message):  # matched by pk or by some other field: any change of T
        yield f"{object_type}|*"
        return
    owner = _owner_of(message)
    names = {normalise(name, name_field)}
    names.update(normalise(alias) for alias in (_set_value(message, field) for field in ALIAS_FIELDS.get(
        object_type, ())) if alias is not None)
    for normalised in names:
        if owner is None:
            yield f"{object_type}|{normalised}|*"
        else:
            yield f"{object_type}|{normalised}|{owner}"
            yield f"{object_type}|{normalised}|?"


def _set_value(message: Message, name: str):
    field = message.DESCRIPTOR.fields_by_name.get(name)
    if field is None or field.message_type is not None:
        return None
    value = getattr(message, name)
    return value if value not in ("", None) else None


def _owner_of(message: Message) -> str | None:
    """`<owner type>=<normalised owner name>` of an object, None when it has no known owner."""
    for field_name, owner_type in OWNER_FIELDS.items():
        field = message.DESCRIPTOR.fields_by_name.get(field_name)
        if field is None or field.message_type is None or not message.HasField(field_name):
            continue
        owner = getattr(message, field_name)
        name = _set_value(owner, PRIMARY_VALUE_MAP.get(owner.DESCRIPTOR.name, "name"))
        return None if name is None or _has_netbox_id(owner) else f"{owner_type}={normalise(name)}"
    return None


def _has_netbox_id(message: Message) -> bool:
    field = message.DESCRIPTOR.fields_by_name.get("metadata")
    if field is None or not message.HasField("metadata"):
        return False
    source_match = message.metadata.fields.get("source_match")
    return source_match is not None and source_match.HasField("struct_value") and \
        "netbox_id" in source_match.struct_value.fields


# --- the change log side ---


def change_keys(change: dict, owner_names: dict[tuple[str, int], set[str]]) -> list[str]:
    """The keys an ObjectChange (as NetBox's REST API returns it) meets.

    `owner_names`: {(owner type, NetBox id): its names} for the owners that could be resolved (a
    renamed one has two); a component whose owner is not in it meets every component of its name.
    """
    object_type = change.get("changed_object_type") or ""
    keys = {f"{object_type}|*"}
    # NetBox gives a create no prechange data and a delete none after it: null, or an empty object.
    before, after = (data if isinstance(data, dict) and data else None
                     for data in (change.get("prechange_data"), change.get("postchange_data")))
    snapshots = [data for data in (before, after) if data is not None]
    field = primary_field(object_type)
    names = {normalise(data[field], field) for data in snapshots if data.get(field) not in (None, "")}
    names.update(normalise(data[alias]) for alias in ALIAS_FIELDS.get(object_type, ()) for data in snapshots
                 if data.get(alias) not in (None, ""))
    if not names or (before is None and _action(change) != "create"):
        # Nothing names the object as it was (a script that changed it without NetBox's snapshot):
        # whatever of type T it was, this change may be about it.
        keys.add(f"{object_type}|?")
    for name in names:
        keys.add(f"{object_type}|{name}|*")
        keys.update(f"{object_type}|{name}|{owner}" for owner in _owners(object_type, snapshots, owner_names))
    return sorted(keys)


def _action(change: dict) -> str | None:
    action = change.get("action")
    return action.get("value") if isinstance(action, dict) else action


def _owner_fields(object_type: str) -> list[str]:
    """The owner fields the diode message of this type has, in OWNER_FIELDS order."""
    member = MEMBERS.get(object_type)
    if member is None:
        return []
    fields = pb.Entity.DESCRIPTOR.fields_by_name[member].message_type.fields_by_name
    return [name for name in OWNER_FIELDS if name in fields and fields[name].message_type is not None]


def _owners(object_type: str, snapshots: list[dict], owner_names: dict[tuple[str, int], set[str]]) -> set[str]:
    """The owners of the changed object, by every owner field an entity may qualify it with; `?` when
    one of them is missing from the data or cannot be named (then it meets every owner)."""
    owners: set[str] = set()
    for data in snapshots:
        for field_name in _owner_fields(object_type):
            owner_id = data.get(field_name)
            names = {n for n in owner_names.get((OWNER_FIELDS[field_name], owner_id), ()) if n not in (None, "")} \
                if isinstance(owner_id, int) else set()
            owners.update(f"{OWNER_FIELDS[field_name]}={normalise(name)}" for name in names)
            if not names:
                owners.add("?")
    return owners or {"?"}


def owner_ids(change: dict) -> set[tuple[str, int]]:
    """The (owner type, NetBox id) of the owners of the object a change is about, to resolve into names."""
    found = set()
    for data in (change.get("prechange_data"), change.get("postchange_data")):
        if isinstance(data, dict):
            for field_name, owner_type in OWNER_FIELDS.items():
                if isinstance(data.get(field_name), int):
                    found.add((owner_type, data[field_name]))
    return found


def owner_names_in(records: list[dict]) -> Iterator[tuple[str, int, str]]:
    """(owner type, id, name) of the devices, virtual machines and sites the records themselves describe,
    under each name they had: a device deleted with its interfaces can no longer be looked up, but
    its delete record names it."""
    for record in records:
        object_type = record.get("changed_object_type")
        if object_type in OWNER_TYPES and isinstance(record.get("changed_object_id"), int):
            for data in (record.get("prechange_data"), record.get("postchange_data")):
                if isinstance(data, dict) and data.get("name"):
                    yield object_type, record["changed_object_id"], data["name"]
