"""NetBox object types (`app_label.model`) for every member of the diode.v1 Entity oneof.

The model name is the member's message name in lower case (`ip_address` -> IPAddress -> ipaddress);
only the app label has to be known. The table is checked against the SDK's descriptor in the tests,
so an SDK that adds a member fails loudly instead of producing rows of unknown type.
"""

from __future__ import annotations

import re

from netboxlabs.diode.sdk.diode.v1 import ingester_pb2 as pb

_APP_MODELS = {
    "circuits": "circuit circuitgroup circuitgroupassignment circuittermination circuittype provider "
                "provideraccount providernetwork virtualcircuit virtualcircuittermination virtualcircuittype",
    "dcim": "cable cablebundle cablepath cabletermination consoleport consoleserverport coolingfeed "
            "coolingintake coolingoutflow coolingsource device devicebay deviceconfig devicerole devicetype "
            "frontport interface inventoryitem inventoryitemrole location macaddress manufacturer module "
            "modulebay modulebaytype moduletype moduletypeprofile platform powerfeed poweroutlet powerpanel "
            "powerport rack rackgroup rackreservation rackrole racktype rearport region site sitegroup "
            "virtualchassis virtualdevicecontext",
    "extras": "customfield customfieldchoiceset customlink journalentry scriptmodule tag",
    "ipam": "aggregate asn asnrange fhrpgroup fhrpgroupassignment ipaddress iprange prefix rir role "
            "routetarget service vlan vlangroup vlantranslationpolicy vlantranslationrule vrf",
    "tenancy": "contact contactassignment contactgroup contactrole tenant tenantgroup",
    "users": "owner ownergroup user",
    "virtualization": "cluster clustergroup clustertype virtualdisk virtualmachine virtualmachinetype vminterface",
    "vpn": "ikepolicy ikeproposal ipsecpolicy ipsecprofile ipsecproposal l2vpn l2vpntermination tunnel "
           "tunnelgroup tunneltermination",
    "wireless": "wirelesslan wirelesslangroup wirelesslink",
}

_APP_OF_MODEL = {model: app for app, models in _APP_MODELS.items() for model in models.split()}

ENTITY_ONEOF = pb.Entity.DESCRIPTOR.oneofs_by_name["entity"]


def _object_type(member) -> str:
    model = member.message_type.name.lower()
    return f"{_APP_OF_MODEL[model]}.{model}"


def object_type_of_message(message_name: str) -> str | None:
    """The NetBox object type of a diode.v1 message (`VMInterface` -> `virtualization.vminterface`),
    None for messages that are not NetBox objects (a custom field value, a timestamp)."""
    model = message_name.lower()
    app = _APP_OF_MODEL.get(model)
    return f"{app}.{model}" if app else None


# oneof member name (e.g. "ip_address") -> NetBox object type (e.g. "ipam.ipaddress")
OBJECT_TYPES: dict[str, str] = {member.name: _object_type(member) for member in ENTITY_ONEOF.fields}

def _words(message_name: str) -> str:
    """CamelCase message name to words: IPAddress -> IP Address, VMInterface -> VM Interface."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", message_name)


# NetBox object type -> how people name it (for deviation names): "dcim.devicetype" -> "Device Type"
DISPLAY_NAMES: dict[str, str] = {_object_type(m): _words(m.message_type.name) for m in ENTITY_ONEOF.fields}

# NetBox object type -> the oneof member (the entity key the plugin reads): "ipam.ipaddress" -> "ip_address"
MEMBERS: dict[str, str] = {object_type: member for member, object_type in OBJECT_TYPES.items()}
