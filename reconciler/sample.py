"""A realistic sample network built with netboxlabs-diode-sdk, packed the way diode clients and
the ingester pack it: IngestRequests of mixed entities, stream entries brotli-compressed (mostly).

Used by the tests, the benchmarks and the quick start. Deterministic for a given seed: the same
shape, seed and cycle give the same entities, and a later cycle re-sends the same inventory with
new timestamps (what a discovery agent does every run), changing a few descriptions.
"""

from __future__ import annotations

import datetime
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import brotli
from netboxlabs.diode.sdk import ingester as sdk
from netboxlabs.diode.sdk.diode.v1 import ingester_pb2 as pb

SDK_VERSION = "1.14.3"
PRODUCERS = ("device-discovery", "network-discovery", "vcenter-sync")
DEVICE_MODELS = (  # manufacturer, model, platform
    ("Juniper", "EX4300-48T", "junos"),
    ("Cisco", "C9300-48P", "ios-xe"),
    ("Arista", "DCS-7050SX3-48YC8", "eos"),
    ("Aruba", "CX-6300M", "aos-cx"),
)
RACK_UNITS = 42


@dataclass(frozen=True)
class Shape:
    """How big the network is. The defaults give a small network of about 650 entities."""

    sites: int = 1
    racks_per_site: int = 2
    devices_per_site: int = 10
    ports_per_device: int = 48
    vlans_per_site: int = 20
    prefixes_per_site: int = 10
    vms_per_site: int = 20
    addresses_per_device: int = 3

    def entity_count(self) -> int:
        per_device = 1 + self.ports_per_device + 3 + self.addresses_per_device  # device, ports, 2 uplinks + mgmt, IPs
        per_vm = 3  # VM, its interface, its address
        per_site = 1 + self.racks_per_site + self.vlans_per_site + self.prefixes_per_site
        return self.sites * (per_site + self.devices_per_site * per_device + self.vms_per_site * per_vm)


def _timestamp(cycle: int, rng: random.Random) -> datetime.datetime:
    base = datetime.datetime(2026, 11, 1, tzinfo=datetime.timezone.utc)
    return base + datetime.timedelta(hours=cycle, seconds=rng.randrange(600))


class _Builder:
    """Builds one site's entities, reusing each referenced object like a discovery agent does."""

    def __init__(self, site_index: int, shape: Shape, cycle: int, changed: float, rng: random.Random):
        self.shape, self.cycle, self.changed, self.rng = shape, cycle, changed, rng
        self.index = site_index
        self.site = sdk.Site(name=f"dc-{site_index:03d}", slug=f"dc-{site_index:03d}", status="active")
        role = sdk.RackRole(name="network", slug="network", color="ff9800")
        self.racks = [sdk.Rack(name=f"rack-{site_index:03d}-{r:02d}", site=self.site, status="active", role=role,
                               form_factor="4-post-cabinet", width=19, u_height=RACK_UNITS)
                      for r in range(shape.racks_per_site)]

    def entity(self, **member) -> pb.Entity:
        return sdk.Entity(timestamp=_timestamp(self.cycle, self.rng), **member)

    def description(self, what: str) -> str:
        # A changed share of objects gets a description that moves with the cycle.
        edition = self.cycle if self.rng.random() < self.changed else 0
        return f"{what} (rev {edition})"

    def site_entities(self) -> Iterator[pb.Entity]:
        yield self.entity(site=self.site)
        for rack in self.racks:
            yield self.entity(rack=rack)
        for v in range(self.shape.vlans_per_site):
            yield self.entity(vlan=sdk.VLAN(vid=100 + v, name=f"vlan{100 + v}", site=self.site, status="active"))
        for p in range(self.shape.prefixes_per_site):
            prefix = f"10.{self.index % 250}.{p}.0/24"
            yield self.entity(prefix=sdk.Prefix(prefix=prefix, scope_site=self.site, status="active",
                                                description=self.description(f"prefix {prefix}")))

    def device(self, d: int) -> pb.Device:
        vendor, model, platform = DEVICE_MODELS[d % len(DEVICE_MODELS)]
        manufacturer = sdk.Manufacturer(name=vendor, slug=vendor.lower())
        placement: dict[str, Any] = {}
        if self.racks:  # devices spread over the racks, stacked from the top, one unit each
            rack, slot = self.racks[d % len(self.racks)], d // len(self.racks)
            placement = {"rack": rack}
            if slot < RACK_UNITS:
                placement.update(position=float(RACK_UNITS - slot), face="front")
        return sdk.Device(
            name=f"sw-{self.index:03d}-{d:04d}", serial=f"SN{self.index:03d}{d:06d}", status="active",
            site=self.site, **placement,
            role=sdk.DeviceRole(name="access-switch", slug="access-switch", color="2196f3"),
            device_type=sdk.DeviceType(model=model, slug=model.lower(), manufacturer=manufacturer),
            platform=sdk.Platform(name=platform, slug=platform, manufacturer=manufacturer),
            tags=[sdk.Tag(name="discovered", slug="discovered")])

    def device_entities(self, d: int) -> Iterator[pb.Entity]:
        device = self.device(d)
        yield self.entity(device=device)
        ports = [f"ge-0/0/{p}" for p in range(self.shape.ports_per_device)] + ["xe-0/1/0", "xe-0/1/1", "mgmt0"]
        interfaces = []
        for name in ports:
            interface = sdk.Interface(device=device, name=name, type="1000base-t", enabled=True, mtu=1500,
                                      description=self.description(f"port {name}"))
            interfaces.append(interface)
            yield self.entity(interface=interface)
        for a in range(self.shape.addresses_per_device):
            address = f"10.{self.index % 250}.{200 + a}.{d % 250 + 1}/24"
            yield self.entity(ip_address=sdk.IPAddress(address=address, status="active",
                                                       assigned_object_interface=interfaces[-1 - a]))

    def vm_entities(self, v: int) -> Iterator[pb.Entity]:
        cluster = sdk.Cluster(name=f"cluster-{self.index:03d}", type=sdk.ClusterType(name="VMware", slug="vmware"),
                              scope_site=self.site)
        vm = sdk.VirtualMachine(name=f"vm-{self.index:03d}-{v:04d}", cluster=cluster, status="active",
                                vcpus=4, memory=8192, disk=100)
        yield self.entity(virtual_machine=vm)
        interface = sdk.VMInterface(virtual_machine=vm, name="eth0", enabled=True)
        yield self.entity(vm_interface=interface)
        address = f"172.{16 + self.index % 16}.{v // 250}.{v % 250 + 1}/24"
        yield self.entity(ip_address=sdk.IPAddress(address=address, status="active",
                                                   assigned_object_vm_interface=interface))

    def all(self) -> Iterator[pb.Entity]:
        yield from self.site_entities()  # site, racks, VLANs, prefixes
        for d in range(self.shape.devices_per_site):
            yield from self.device_entities(d)
        for v in range(self.shape.vms_per_site):
            yield from self.vm_entities(v)


def network(shape: Shape = Shape(), seed: int = 0, cycle: int = 0, changed: float = 0.0,
            first_site: int = 0) -> Iterator[pb.Entity]:
    """Every entity of the network, site by site. `changed` = share of descriptions that move per cycle."""
    rng = random.Random(f"{seed}:{cycle}")
    for site in range(first_site, first_site + shape.sites):
        yield from _Builder(site, shape, cycle, changed, rng).all()


def requests(entities: Iterable[pb.Entity], per_request: int = 100, seed: int = 0) -> Iterator[pb.IngestRequest]:
    """Pack entities into IngestRequests as an SDK client does (mixed types, uuid ids)."""
    rng = random.Random(seed)
    batch: list[pb.Entity] = []
    for entity in entities:
        batch.append(entity)
        if len(batch) == per_request:
            yield _request(batch, rng)
            batch = []
    if batch:
        yield _request(batch, rng)


def _request(entities: list[pb.Entity], rng: random.Random) -> pb.IngestRequest:
    return pb.IngestRequest(
        stream="latest", entities=entities, id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        producer_app_name=rng.choice(PRODUCERS), producer_app_version="1.4.0",
        sdk_name="diode-sdk-python", sdk_version=SDK_VERSION)


def stream_fields(request: pb.IngestRequest | bytes, compress: bool = True,
                  ingestion_ts: int | None = None) -> dict[bytes, bytes]:
    """The fields of one stream entry as the ingester writes them (brotli level 1 when compressed)."""
    raw = request if isinstance(request, bytes) else request.SerializeToString()
    fields = {b"ingestion_ts": str(ingestion_ts if ingestion_ts is not None else time.time_ns()).encode()}
    if compress:
        fields[b"request"] = brotli.compress(raw, quality=1)
        fields[b"encoding"] = b"br"
    else:
        fields[b"request"] = raw
    return fields


def entries(shape: Shape = Shape(), seed: int = 0, cycle: int = 0, changed: float = 0.0,
            per_request: int = 100, raw_share: float = 0.1) -> Iterator[dict[bytes, bytes]]:
    """Stream entries for a whole network: mostly brotli, `raw_share` uncompressed as older ingesters wrote."""
    rng = random.Random(f"entries:{seed}:{cycle}")
    for request in requests(network(shape, seed, cycle, changed), per_request, seed=rng.randrange(1 << 30)):
        yield stream_fields(request, compress=rng.random() >= raw_share)
