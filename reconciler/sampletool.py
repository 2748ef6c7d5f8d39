"""`reconciler-sample`: push a realistic sample network into the diode ingest stream.

The network is reconciler.sample's, built with netboxlabs-diode-sdk types: per site a site, its
racks, VLANs and prefixes, access switches (placed in the racks) with their interfaces and IP
addresses, and virtual machines with an interface and an address each. It is packed the way diode
clients and the ingester pack it (IngestRequests of mixed entities, brotli stream entries) and
XADDed to the stream `reconciler run` reads, so it stands in for diode clients plus the ingester.

Deterministic: the same shape, seed and cycle give the same entities (a re-push is deduplicated by
reconciler); a later --cycle re-sends the same inventory with new timestamps, as a discovery agent
does on its next run, and --changed moves that share of the descriptions so NetBox sees updates.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from dataclasses import fields
from typing import Callable

import redis

from . import sample, settings
from .errors import ConfigError
from .progress import Progress
from .streamgroup import redis_client

PROG = "reconciler-sample"
PIPELINE = 100  # XADDs per round trip when not rate limited
PROGRESS_SECONDS = 1.0

DESCRIPTION = """\
Push a realistic sample network, built with netboxlabs-diode-sdk, into the diode ingest stream
that `reconciler run` reads, packed as diode clients and the ingester pack it (IngestRequests of
mixed entities, brotli stream entries). Per site: the site, its racks, VLANs and prefixes, access
switches placed in the racks with their interfaces and IP addresses, and virtual machines with an
interface and an address each. Deterministic: pushing the same network again changes nothing in
NetBox (reconciler deduplicates it); --cycle/--changed make the next discovery run.
"""

EXAMPLES = """\
examples:
  reconciler-sample -c etc/reconciler.ini                  the default small network (1 site, ~650 entities)
  reconciler-sample --first-site 1 --sites 3               three more sites next to the first one
  reconciler-sample --sites 1 --cycle 1 --changed 0.2      the agent's next run: same objects, 20% of
                                                           descriptions changed (updates in NetBox)
  reconciler-sample --sites 20 --devices-per-site 90 --rate 1000 --rate-unit entities
                                                           ~100,000 entities at 1,000 entities/s
  reconciler-sample --dry-run --sites 10                   only print what would be pushed

The Redis URL and stream come from the settings (-c FILE, $RECONCILER_CONFIG,
/etc/reconciler/reconciler.ini, RECONCILER_REDIS_URL / RECONCILER_REDIS_STREAM) unless given here.
Progress goes to stderr; the last line on stdout is
  pushed N entries (M entities, sites dc-AAA..dc-BBB) to STREAM on URL in S s
"""

SHAPE_HELP = {
    "sites": "sites to generate (default %(default)s)",
    "racks_per_site": "racks per site; devices are placed in them (default %(default)s)",
    "devices_per_site": "access switches per site (default %(default)s)",
    "ports_per_device": "access ports per switch, besides 2 uplinks and mgmt0 (default %(default)s)",
    "vlans_per_site": "VLANs per site (default %(default)s)",
    "prefixes_per_site": "/24 prefixes per site (default %(default)s)",
    "vms_per_site": "virtual machines per site, each with an interface and an IP (default %(default)s)",
    "addresses_per_device": "IP addresses per switch, on its last interfaces (default %(default)s)",
}


def _fraction(raw: str) -> float:
    value = float(raw)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {raw}")
    return value


def _non_negative(kind):
    def parse(raw: str):
        value = kind(raw)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {raw}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_argument_group("where to push")
    target.add_argument("-c", "--config", metavar="FILE",
                        help=f"reconciler INI file to take [redis] url and stream from (default: "
                             f"${settings.CONFIG_PATH_ENV} or {settings.DEFAULT_CONFIG_PATH} if present)")
    target.add_argument("--redis-url", metavar="URL", help="Redis URL, db index in the path (default: [redis] url)")
    target.add_argument("--stream", metavar="KEY", help="stream key (default: [redis] stream)")

    shape = parser.add_argument_group("network size")
    defaults = sample.Shape()
    for item in fields(sample.Shape):
        shape.add_argument("--" + item.name.replace("_", "-"), dest=item.name, type=_non_negative(int),
                           default=getattr(defaults, item.name), metavar="N",
                           help=SHAPE_HELP.get(item.name, "(default %(default)s)"))
    shape.add_argument("--first-site", type=_non_negative(int), default=0, metavar="N",
                       help="index of the first site (dc-NNN), to add sites next to earlier ones (default 0)")
    shape.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    content = parser.add_argument_group("re-runs")
    content.add_argument("--cycle", type=_non_negative(int), default=0, metavar="N",
                         help="discovery run number: a later cycle re-sends the same objects with new "
                              "timestamps (default 0)")
    content.add_argument("--changed", type=_fraction, default=0.0, metavar="FRACTION",
                         help="share of prefix and interface descriptions that change with the cycle, "
                              "0..1 (default 0: a re-run changes nothing)")

    packing = parser.add_argument_group("packing and pace")
    packing.add_argument("--per-request", type=int, default=100, metavar="N",
                         help="entities per IngestRequest = per stream entry (1..1000, default %(default)s)")
    packing.add_argument("--brotli", choices=("on", "off", "mixed"), default="on",
                         help="compress entries as the ingester does (on), never (off), or 90%% brotli and "
                              "10%% raw as a mix of ingester versions (mixed) (default %(default)s)")
    packing.add_argument("--rate", type=_non_negative(float), default=0.0, metavar="R",
                         help="at most R stream entries (or entities, see --rate-unit) per second; "
                              "0 = as fast as possible (default)")
    packing.add_argument("--rate-unit", choices=("requests", "entities"), default="requests",
                         help="what --rate counts (default %(default)s)")
    packing.add_argument("--dry-run", action="store_true", help="print what would be pushed; push nothing")
    packing.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return parser


class Pushed:
    """What was pushed so far, shown by the one progress display (progress.py): a line at most every
    PROGRESS_SECONDS, and one at the end."""

    def __init__(self, total_entries: int, total_entities: int, quiet: bool) -> None:
        self.total_entries, self.total_entities = total_entries, total_entities
        self.entries = self.entities = 0
        self.start = time.monotonic()
        self.display = Progress(self._describe, every=PROGRESS_SECONDS, quiet=quiet)

    def _describe(self) -> str:
        rate = self.entities / max(time.monotonic() - self.start, 1e-9)
        return (f"{PROG}: {self.entries}/{self.total_entries} entries, {self.entities}/{self.total_entities} "
                f"entities, {rate:,.0f} entities/s")

    def add(self, entries: int, entities: int) -> None:
        self.entries += entries
        self.entities += entities
        self.display.step()

    def finish(self) -> None:
        self.display.finish()


def _target(args: argparse.Namespace) -> tuple[str, str]:
    if args.redis_url and args.stream:
        return args.redis_url, args.stream
    config = settings.load(args.config, os.environ)
    return args.redis_url or config.redis.url, args.stream or config.redis.stream


def _entries(args: argparse.Namespace, shape: sample.Shape):
    """(fields, entity count) per stream entry, built lazily so ingestion_ts is the push time."""
    entities = sample.network(shape, seed=args.seed, cycle=args.cycle, changed=args.changed,
                              first_site=args.first_site)
    raw_share = {"on": 0.0, "off": 1.0, "mixed": 0.1}[args.brotli]
    rng = random.Random(f"entries:{args.seed}:{args.cycle}:{args.first_site}")
    for request in sample.requests(entities, args.per_request, seed=rng.randrange(1 << 30)):
        compress = rng.random() >= raw_share
        yield sample.stream_fields(request, compress=compress), len(request.entities)


def push(args: argparse.Namespace, client: redis.Redis, stream: str, progress: Pushed,
         clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], object] = time.sleep) -> None:
    """XADD every entry, paced by --rate on `clock` and `sleep` (the tests' own, to check the pace);
    counts what was pushed in `progress`."""
    start = clock()
    batch: list[tuple[dict, int]] = []

    def flush() -> None:
        with client.pipeline(transaction=False) as pipe:
            for fields_, _ in batch:
                pipe.xadd(stream, fields_)
            pipe.execute()
        progress.add(len(batch), sum(count for _, count in batch))
        batch.clear()

    for item in _entries(args, shape_of(args)):
        if args.rate > 0:
            # Wait until what was sent so far fits the rate: N entries never take less than (N-1)/R s.
            sent = progress.entries if args.rate_unit == "requests" else progress.entities
            delay = start + sent / args.rate - clock()
            if delay > 0:
                sleep(delay)
        batch.append(item)
        if args.rate > 0 or len(batch) >= PIPELINE:
            flush()
    if batch:
        flush()


def shape_of(args: argparse.Namespace) -> sample.Shape:
    return sample.Shape(**{item.name: getattr(args, item.name) for item in fields(sample.Shape)})


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 1 <= args.per_request <= 1000:
        parser.error("--per-request must be between 1 and 1000 (the diode.v1 schema's limit)")
    shape = shape_of(args)
    total_entities = shape.entity_count()
    total_entries = math.ceil(total_entities / args.per_request)
    if total_entities == 0:
        parser.error("the network is empty: --sites must be at least 1")
    try:
        url, stream = _target(args)
    except ConfigError as exc:
        print(f"{PROG}: configuration error: {exc}", file=sys.stderr)
        return 2
    shown_url = settings.mask_url_password(url)
    last = args.first_site + args.sites - 1
    sites = f"site dc-{last:03d}" if args.sites == 1 else f"sites dc-{args.first_site:03d}..dc-{last:03d}"
    if args.dry_run:
        print(f"would push {total_entries} entries ({total_entities} entities, {sites}) to {stream} on {shown_url}")
        return 0
    client = redis_client(url, "sample", timeout=10.0)
    progress = Pushed(total_entries, total_entities, args.quiet)
    if not args.quiet:
        pace = f"at most {args.rate:g} {args.rate_unit}/s" if args.rate > 0 else "as fast as possible"
        print(f"{PROG}: pushing {total_entries} entries ({total_entities} entities, {sites}, cycle {args.cycle}) "
              f"to {stream} on {shown_url}, {pace}", file=sys.stderr, flush=True)
    start = time.monotonic()
    code = 0
    try:
        push(args, client, stream, progress)
    except redis.RedisError as exc:
        print(f"{PROG}: Redis at {shown_url}: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        code = 130
    finally:
        client.close()
    progress.finish()
    print(f"pushed {progress.entries} entries ({progress.entities} entities, {sites}) to {stream} on {shown_url} "
          f"in {time.monotonic() - start:.1f} s", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
