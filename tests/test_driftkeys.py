"""The keys that decide whether a change in NetBox's change log can matter to an entity (pure)."""

from __future__ import annotations

import pytest
from netboxlabs.diode.sdk import ingester as sdk

from reconciler import driftkeys, sample
from reconciler.objecttypes import OBJECT_TYPES

SHAPE = sample.Shape(sites=2, devices_per_site=3, ports_per_device=4, vms_per_site=2)


def meets(entity, change: dict, owners: dict | None = None) -> bool:
    return bool(set(driftkeys.entity_keys(entity)) & set(driftkeys.change_keys(change, owners or {})))


def change(object_type: str, before: dict | None, after: dict | None = None, object_id: int = 1) -> dict:
    return {"id": 1, "time": "2026-12-02T10:00:00+00:00", "changed_object_type": object_type,
            "changed_object_id": object_id, "prechange_data": before, "postchange_data": after}


def interface_entity(device: str, name: str):
    return sdk.Entity(interface=sdk.Interface(name=name, device=sdk.Device(name=device, site=sdk.Site(name="s"))))


def test_an_interface_edited_on_one_switch_meets_that_switchs_interface_and_not_the_others_of_its_name():
    edit = change("dcim.interface", {"name": "ge-0/0/1", "device": 7, "description": "a"},
                  {"name": "ge-0/0/1", "device": 7, "description": "by hand"})
    owners = {("dcim.device", 7): {"sw-1"}}
    assert meets(interface_entity("sw-1", "ge-0/0/1"), edit, owners)
    assert not meets(interface_entity("sw-2", "ge-0/0/1"), edit, owners)
    assert not meets(interface_entity("sw-1", "ge-0/0/2"), edit, owners)


def test_a_device_edited_in_one_site_does_not_meet_its_namesake_in_another():
    edit = change("dcim.device", {"name": "core-1", "site": 3, "serial": "A"}, {"name": "core-1", "site": 3})
    in_site = lambda site: sdk.Entity(device=sdk.Device(name="core-1", site=sdk.Site(name=site)))  # noqa: E731
    assert meets(in_site("dc-1"), edit, {("dcim.site", 3): {"dc-1"}})
    assert not meets(in_site("dc-2"), edit, {("dcim.site", 3): {"dc-1"}})
    assert meets(in_site("dc-2"), edit)  # the site cannot be named: every core-1


def test_a_deleted_interface_of_a_named_switch_meets_only_that_switchs_interface():
    deleted = change("dcim.interface", {"name": "ge-0/0/1", "device": 7}, {})  # NetBox's delete: {} after
    owners = {("dcim.device", 7): {"sw-1"}}
    assert meets(interface_entity("sw-1", "ge-0/0/1"), deleted, owners)
    assert not meets(interface_entity("sw-2", "ge-0/0/1"), deleted, owners)


def test_an_interface_whose_switch_cannot_be_named_meets_every_interface_of_its_name():
    edit = change("dcim.interface", {"name": "ge-0/0/1", "device": 7})
    assert meets(interface_entity("sw-1", "ge-0/0/1"), edit)
    assert meets(interface_entity("sw-2", "ge-0/0/1"), edit)
    assert not meets(interface_entity("sw-2", "ge-0/0/2"), edit)


def test_a_device_edited_or_deleted_meets_its_own_entity_and_every_entity_that_names_it():
    device = sdk.Device(name="SW-1", site=sdk.Site(name="s"))
    interface = sdk.Interface(name="ge-0/0/1", device=device)
    address = sdk.Entity(ip_address=sdk.IPAddress(address="10.0.0.1/24", assigned_object_interface=interface))
    deleted = change("dcim.device", {"name": "sw-1", "serial": "X"}, None)
    for entity in (sdk.Entity(device=device), sdk.Entity(interface=interface), address):
        assert meets(entity, deleted)
    assert not meets(sdk.Entity(device=sdk.Device(name="sw-2", site=sdk.Site(name="s"))), deleted)


def test_a_rename_by_hand_meets_the_entities_of_the_old_name():
    renamed = change("dcim.site", {"name": "dc-1"}, {"name": "dc-one"})
    assert meets(sdk.Entity(site=sdk.Site(name="dc-1")), renamed)


def test_an_address_meets_whatever_its_mask_and_spelling():
    entity = sdk.Entity(ip_address=sdk.IPAddress(address="2001:DB8:0::1/64"))
    assert meets(entity, change("ipam.ipaddress", {"address": "2001:db8::1/128"}))
    assert not meets(entity, change("ipam.ipaddress", {"address": "2001:db8::2/64"}))


def test_a_change_whose_object_has_no_readable_name_meets_every_entity_naming_its_type():
    nameless = change("dcim.site", None, None)
    assert meets(sdk.Entity(site=sdk.Site(name="dc-1")), nameless)
    assert meets(interface_entity("sw-1", "ge-0/0/1"), nameless)  # its device's site
    assert not meets(sdk.Entity(prefix=sdk.Prefix(prefix="10.0.0.0/8")), nameless)


def test_an_object_named_by_netbox_id_or_without_a_name_meets_every_change_of_its_type():
    by_id = sdk.Entity(site=sdk.Site(name="dc-1", metadata={"source_match": {"netbox_id": 12}}))
    unnamed = sdk.Entity(device=sdk.Device(site=sdk.Site(name="dc-1")))
    assert meets(by_id, change("dcim.site", {"name": "elsewhere"}))
    assert meets(unnamed, change("dcim.device", {"name": "anything"}))


@pytest.mark.parametrize("entity", list(sample.network(SHAPE)), ids=lambda e: e.WhichOneof("entity"))
def test_an_edit_of_any_object_an_entity_names_meets_it(entity):
    """Never miss, over a whole sample network: build, for each object the entity names, the change
    record NetBox would write when someone edits it (its primary value before, its owner by id)."""
    for object_type, name, owner in _named_objects(getattr(entity, entity.WhichOneof("entity"))):
        before = {driftkeys.primary_field(object_type): name}
        owners = {}
        if owner is not None:
            field, owner_type, owner_name = owner
            before[field] = 99
            owners = {(owner_type, 99): {owner_name}}
        assert meets(entity, change(object_type, before), owners), (object_type, name)
        assert meets(entity, change(object_type, before), {}), (object_type, name)  # owner unresolved


def _named_objects(message):
    """(object type, primary value, owner) of every object in a message, the sample's way."""
    from reconciler.objecttypes import object_type_of_message
    object_type = object_type_of_message(message.DESCRIPTOR.name)
    if object_type is not None:
        field = driftkeys.primary_field(object_type)
        name = getattr(message, field, None) if field in message.DESCRIPTOR.fields_by_name else None
        owner = None
        for owner_field, owner_type in driftkeys.OWNER_FIELDS.items():
            if owner_field in message.DESCRIPTOR.fields_by_name and message.HasField(owner_field):
                owner = (owner_field, owner_type, getattr(message, owner_field).name)
        if name:
            yield object_type, name, owner
    for field, value in message.ListFields():
        if field.message_type is not None:
            for item in (value if field.is_repeated else [value]):
                yield from _named_objects(item)


@pytest.mark.parametrize("member", sorted(OBJECT_TYPES))
def test_an_entity_without_its_primary_value_meets_every_change_of_its_type(member):
    entity = sdk.Entity(**{member: {}})
    assert meets(entity, change(OBJECT_TYPES[member], {"name": "x", "address": "10.0.0.1", "model": "m"}))


def test_a_prefix_meets_netbox_s_spelling_of_it_without_host_bits():
    assert meets(sdk.Entity(prefix=sdk.Prefix(prefix="10.0.0.1/24")), change("ipam.prefix", {"prefix": "10.0.0.0/24"}))


def test_a_custom_field_redefined_by_hand_meets_every_entity_that_sets_it():
    entity = sdk.Entity(site=sdk.Site(name="dc-1", custom_fields={"owner_team": sdk.CustomFieldValue(text="net")}))
    assert meets(entity, {**change("extras.customfield", {"name": "owner_team"}, None), "action": {"value": "delete"}})
    assert not meets(entity, {**change("extras.customfield", {"name": "other"}, None), "action": {"value": "delete"}})


def test_an_update_without_netbox_s_snapshot_before_it_meets_every_entity_naming_its_type():
    renamed = {**change("dcim.interface", {}, {"name": "renamed", "device": 7}), "action": {"value": "update"}}
    assert meets(interface_entity("sw-1", "ge-0/0/1"), renamed, {("dcim.device", 7): {"sw-9"}})


def test_a_device_type_bound_by_part_number_meets_the_entities_of_its_model():
    edited = change("dcim.devicetype", {"model": "Catalyst 3850 48P", "part_number": "WS-C3850-48P"})
    entity = sdk.Entity(device_type=sdk.DeviceType(model="WS-C3850-48P", manufacturer=sdk.Manufacturer(name="Cisco")))
    assert meets(entity, edited)
