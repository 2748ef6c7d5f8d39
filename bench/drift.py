"""Benchmark of [drift] mode changes against mode always, on a real NetBox (peer/netbox.py).

    .venv/bin/python bench/drift.py [--edited 0.05] [--changed 0.05]

Two `reconciler run`s, one per mode, each with its own database, Redis db and sites, work one at a
time on the same NetBox, cycle by cycle:
  cycle 0: the sample network (643 entities per site), fresh;
  cycle 1: the same inventory again, unchanged (new timestamps, as a discovery agent re-sends it);
  cycle 2: --edited of the objects of each type edited by hand in NetBox first (REST PATCH as the
           admin: a device's serial, an interface's MTU, a VLAN's, prefix's or address's status, a
           VM's vCPUs), then the inventory again with --changed of its descriptions changed at the source.
Per cycle and mode: requests the plugin answered (NetBox's access log), NetBox time (the sum of the
plugin requests' durations, from each reconciler's own histogram), seconds from the first XADD until
every row is final, and after cycle 2 the hand edits that were not put back (must be 0). The ratio
always/changes of NetBox time is the saving; both modes run in the same minutes, so NetBox's drift
between runs cancels out. Settings are the defaults but for [drift] mode and [netbox] api_token.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peer import netbox as peer  # noqa: E402
from reconciler import sample  # noqa: E402

STREAM = "diode.v1.ingest-stream"
SHAPE = sample.Shape()
NOT_FINAL = (1, 8, 9, 10)  # QUEUED, APPLYING, PENDING_RETRY, CHECKING
# What is edited by hand, per NetBox list: (REST path, filter of the site, field, edited value, source value)
EDITS = (
    ("/api/dcim/devices/", "site", "serial", "EDITED-BY-HAND", None),  # source value: the sample's serial
    ("/api/dcim/interfaces/", "site", "mtu", 9000, 1500),
    ("/api/ipam/vlans/", "site", "status", "reserved", "active"),
    ("/api/virtualization/virtual-machines/", "site", "vcpus", 8, 4),
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Mode:
    name: str
    site: int
    dsn: str
    redis_url: str
    metrics_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def site_name(self) -> str:
        return f"dc-{self.site:03d}"

    def sql(self, statement: str, params=None) -> list[tuple]:
        with psycopg2.connect(self.dsn) as conn, conn.cursor() as cur:
            cur.execute("SET search_path TO reconciler")
            cur.execute(statement, params)
            return cur.fetchall() if cur.description else []

    def netbox_seconds(self) -> tuple[float, int]:
        """(seconds, requests) of bulk plugin requests so far, from this reconciler's /metrics."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        seconds = count = 0.0
        for line in text.splitlines():
            match = re.match(r'reconciler_plugin_request_duration_seconds_(sum|count)\{endpoint="bulk-plan[^"]*"\} '
                             r'(\S+)', line)
            if match:
                if match.group(1) == "sum":
                    seconds += float(match.group(2))
                else:
                    count += float(match.group(2))
        return seconds, int(count)


def start(mode: Mode, nb: peer.Peer, log_dir: Path) -> None:
    env = {"PATH": os.environ["PATH"], **nb.env(), **{f"RECONCILER_{k}": v for k, v in {
        "POSTGRES_DSN": mode.dsn, "REDIS_URL": mode.redis_url, "WORKERS_COUNT": "2",
        "METRICS_LISTEN": f"127.0.0.1:{mode.metrics_port}", "DRIFT_MODE": mode.name,
        "NETBOX_API_TOKEN": nb.netbox_token}.items()}}
    log = open(log_dir / f"bench-drift-{mode.name}.log", "wb")
    subprocess.run([sys.executable, str(ROOT / "bin" / "reconciler"), "migrate"], env=env, check=True,
                   stdout=log, stderr=subprocess.STDOUT)
    mode.process = subprocess.Popen([sys.executable, str(ROOT / "bin" / "reconciler"), "run"], env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)


def stop(mode: Mode) -> None:
    if mode.process is not None:
        os.killpg(mode.process.pid, signal.SIGTERM)
        mode.process.wait(120)


def plans(mode: Mode) -> dict:
    """Rows planned so far, by why: new rows (first plan), drift checks that found drift (clones), and
    the drift checks' own tally of skipped and re-planned re-observations (mode changes)."""
    [(rows, clones, skipped, replanned)] = mode.sql(
        "SELECT (SELECT count(*) FROM ingestion_logs WHERE drift_of IS NULL), "
        "(SELECT count(*) FROM ingestion_logs WHERE drift_of IS NOT NULL), "
        "(SELECT coalesce(sum(skipped), 0) FROM drift_tally), (SELECT coalesce(sum(planned), 0) FROM drift_tally)")
    return {"new_rows": rows, "drift_found": clones, "skipped": skipped, "replanned": replanned}


def run_cycle(mode: Mode, cycle: int, changed: float) -> dict:
    client = redis.Redis.from_url(mode.redis_url)
    requests_before, (seconds_before, _) = peer.plugin_requests(), mode.netbox_seconds()
    plans_before = plans(mode)
    started = time.perf_counter()
    for fields in _site_entries(mode.site, cycle, changed if cycle == 2 else 0.0):
        client.xadd(STREAM, fields)
    while client.xlen(STREAM) or mode.sql("SELECT count(*) FROM ingestion_logs WHERE state = ANY(%s)",
                                          (list(NOT_FINAL),))[0][0]:
        time.sleep(0.2)
    wall = time.perf_counter() - started
    seconds_after, _ = mode.netbox_seconds()
    states = dict(mode.sql("SELECT state, count(*) FROM ingestion_logs WHERE is_head GROUP BY 1"))
    counts = {key: value - plans_before[key] for key, value in plans(mode).items()}
    return {"requests": peer.plugin_requests() - requests_before, "netbox_seconds": seconds_after - seconds_before,
            "wall_seconds": wall, "states": states, **counts}


def _site_entries(site: int, cycle: int, changed: float):
    entities = sample.network(SHAPE, cycle=cycle, changed=changed, first_site=site)
    return [sample.stream_fields(r) for r in sample.requests(entities, per_request=100)]


def edit_by_hand(mode: Mode, share: float, rng: random.Random) -> list[tuple]:
    """Edit `share` of each kind of object of the mode's site; (path, id, field, source value) of each."""
    edited = []
    for path, site_filter, field_name, value, source in EDITS:
        objects = peer.rest_get(path, params={site_filter: mode.site_name, "limit": 1000})["results"]
        for obj in rng.sample(objects, math.ceil(len(objects) * share)):
            peer.rest_patch(f"{path}{obj['id']}/", {field_name: value})
            edited.append((path, obj["id"], field_name, _value(obj[field_name]) if source is None else source))
    return edited


def missed(edits: list[tuple]) -> list[tuple]:
    return [(path, object_id, name) for path, object_id, name, source in edits
            if _value(peer.rest_get(f"{path}{object_id}/")[name]) != source]


def _value(field):
    """A field as NetBox's REST API shows it: choices come as {"value", "label"}."""
    return field["value"] if isinstance(field, dict) and "value" in field else field


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edited", type=float, default=0.05, help="share of each kind of object edited by hand")
    parser.add_argument("--changed", type=float, default=0.05, help="share of descriptions changed at the source")
    parser.add_argument("--admin-dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    args = parser.parse_args()

    peer.up()
    nb = peer.reset()
    modes = [Mode("always", 300, "", ""), Mode("changes", 301, "", "")]
    for number, mode in enumerate(modes):
        database = f"bench_drift_{mode.name}"
        admin = psycopg2.connect(args.admin_dsn)
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
            cur.execute(f"CREATE DATABASE {database}")
        admin.close()
        mode.dsn = args.admin_dsn.rsplit("/", 1)[0] + "/" + database
        mode.redis_url = f"{args.redis_url}/{12 + number}"
        redis.Redis.from_url(mode.redis_url).flushdb()
        start(mode, nb, Path("/tmp"))
    time.sleep(5)  # boot, the refresher's first answer, the first read of the change log
    rng = random.Random(2026)
    results: dict[tuple[int, str], dict] = {}
    missed_edits: dict[str, list] = {}
    try:
        for cycle in (0, 1, 2):
            for mode in modes:
                edits = edit_by_hand(mode, args.edited, random.Random(rng.random())) if cycle == 2 else []
                results[(cycle, mode.name)] = result = run_cycle(mode, cycle, args.changed)
                result["edited"] = len(edits)
                if edits:
                    missed_edits[mode.name] = missed(edits)
                print(f"cycle {cycle} {mode.name:8}: {result}", flush=True)
    finally:
        for mode in modes:
            stop(mode)
    report(results, missed_edits, args)


def report(results: dict, missed_edits: dict, args) -> None:
    print(f"\nsample network: {SHAPE.entity_count()} entities per mode; cycle 2: {args.edited:.0%} of each kind of "
          f"object edited by hand, {args.changed:.0%} of descriptions changed at the source\n")
    print("| cycle | mode | plugin requests | NetBox time (s) | seconds until final | new rows | re-observations "
          "skipped / planned | drift found | hand edits | not put back |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (cycle, mode), r in results.items():
        lost = len(missed_edits.get(mode, [])) if cycle == 2 else "-"
        checks = f"{r['skipped']} / {r['replanned']}" if mode == "changes" else "- / all"
        print(f"| {cycle} | {mode} | {r['requests']} | {r['netbox_seconds']:.1f} | {r['wall_seconds']:.1f} | "
              f"{r['new_rows']} | {checks} | {r['drift_found']} | {r['edited'] or '-'} | {lost} |")
    print()
    for cycle in (1, 2):
        always, changes = results[(cycle, "always")], results[(cycle, "changes")]
        ratio = always["netbox_seconds"] / changes["netbox_seconds"] if changes["netbox_seconds"] else math.inf
        print(f"cycle {cycle}: NetBox time always/changes = {ratio:.1f}x "
              f"({always['requests']} vs {changes['requests']} plugin requests)")
    for mode, edits in missed_edits.items():
        if edits:
            print(f"MISSED in {mode}: {edits}")


if __name__ == "__main__":
    main()
