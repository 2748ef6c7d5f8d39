"""`reconciler-sample`, the sample producer, run as the installed console script against the
session's Redis db; its pace checked in-process, on a clock of the test's.

Each test pushes to a stream key of its own, so a reconciler that another test runs on that db (it
consumes and deletes entries of diode.v1.ingest-stream) never takes this test's entries.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from reconciler import sample, sampletool, streamentry

from .support import ROOT

SCRIPT = Path(sys.executable).parent / "reconciler-sample"
SMALL = ["--sites", "2", "--racks-per-site", "2", "--devices-per-site", "3", "--ports-per-device", "4",
         "--vlans-per-site", "3", "--prefixes-per-site", "2", "--vms-per-site", "2", "--addresses-per-device", "2"]
SMALL_SHAPE = sample.Shape(sites=2, racks_per_site=2, devices_per_site=3, ports_per_device=4, vlans_per_site=3,
                           prefixes_per_site=2, vms_per_site=2, addresses_per_device=2)
PUSHED = re.compile(r"^pushed (\d+) entries \((\d+) entities, sites? dc-\d{3}(?:\.\.dc-\d{3})?\) "
                    r"to (\S+) on (\S+) in ([\d.]+) s$")


def run_sample(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    assert SCRIPT.exists(), f"{SCRIPT} is missing: reinstall the project (.venv/bin/pip install -e .)"
    environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "RECONCILER_CONFIG": "/dev/null", **(env or {})}
    return subprocess.run([str(SCRIPT), *args], env=environ, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def pushed(result: subprocess.CompletedProcess) -> tuple[int, int]:
    assert result.returncode == 0, result.stderr
    match = PUSHED.match(result.stdout.strip().splitlines()[-1])
    assert match, result.stdout
    return int(match[1]), int(match[2])


@pytest.fixture
def stream() -> str:
    return f"test-sample-{uuid.uuid4().hex[:12]}"


def decoded(redis_client, stream: str) -> list[streamentry.Message]:
    return [streamentry.decode_entry(entry_id, fields) for entry_id, fields in redis_client.xrange(stream)]


@pytest.mark.subprocess
def test_pushes_the_whole_network_as_entries_that_decode(redis_url, redis_client, stream):
    # URL and stream come from the settings registry (environment over etc/reconciler.ini), as `-c` users get them.
    result = run_sample("-c", "etc/reconciler.ini", *SMALL, "--per-request", "20",
                        env={"RECONCILER_REDIS_URL": redis_url, "RECONCILER_REDIS_STREAM": stream})
    entities = SMALL_SHAPE.entity_count()
    assert pushed(result) == (-(-entities // 20), entities)
    assert f"({entities} entities, sites dc-000..dc-001)" in result.stdout
    assert "entries" in result.stderr and f"{entities}/{entities} entities" in result.stderr  # progress

    messages = decoded(redis_client, stream)
    assert len(messages) == -(-entities // 20)
    assert all(not m.rejections for m in messages)
    assert {m.fields[b"encoding"] for m in messages} == {b"br"}
    rows = [row for m in messages for row in m.rows]
    # Exactly the SDK-built network, entity bytes as sent, in order.
    assert [row.entity for row in rows] == [e.SerializeToString() for e in sample.network(SMALL_SHAPE)]
    counts = {}
    for row in rows:
        counts[row.object_type] = counts.get(row.object_type, 0) + 1
    assert counts == {"dcim.site": 2, "dcim.rack": 4, "ipam.vlan": 6, "ipam.prefix": 4, "dcim.device": 6,
                      "dcim.interface": 6 * (4 + 3), "ipam.ipaddress": 6 * 2 + 4,
                      "virtualization.virtualmachine": 4, "virtualization.vminterface": 4}


@pytest.mark.subprocess
def test_stream_brotli_and_changed_rerun_options(redis_url, redis_client, stream):
    args = ["--redis-url", redis_url, "--stream", stream, *SMALL, "--per-request", "1000"]
    assert pushed(run_sample(*args, "--brotli", "off")) == (1, SMALL_SHAPE.entity_count())
    assert pushed(run_sample(*args, "--cycle", "1", "--changed", "1.0", "-q")) == (1, SMALL_SHAPE.entity_count())
    first, rerun = decoded(redis_client, stream)
    assert b"encoding" not in first.fields and rerun.fields[b"encoding"] == b"br"
    changed = {row.object_type for row, again in zip(first.rows, rerun.rows) if row.entity_hash != again.entity_hash}
    # The descriptions that move with the cycle: interfaces, prefixes, and the addresses on those interfaces.
    # Everything else hashes the same, timestamps aside: reconciler sees the same sites, racks, devices.
    assert changed == {"dcim.interface", "ipam.prefix", "ipam.ipaddress"}
    assert all(row.source_ts != again.source_ts for row, again in zip(first.rows, rerun.rows))


# 101 entities: 6 entries of 20 (the last of 1).
PACED = ["--sites", "1", "--racks-per-site", "1", "--devices-per-site", "2", "--ports-per-device", "40",
         "--vlans-per-site", "2", "--prefixes-per-site", "2", "--vms-per-site", "1", "--addresses-per-device", "2"]


@pytest.mark.parametrize("unit, rate", [("requests", "10"), ("entities", "200")])
@pytest.mark.subprocess
def test_a_paced_push_sends_every_entry_in_order(redis_url, redis_client, stream, unit, rate):
    """The options reach the pace (test_the_pace_of_a_push checks it). Order and counts only: the time it
    took, or the spread Redis's clock saw, failed on a loaded machine (490 ms between the first and the
    last entry against 495 expected: the first XADD left late)."""
    assert sample.Shape(sites=1, racks_per_site=1, devices_per_site=2, ports_per_device=40, vlans_per_site=2,
                        prefixes_per_site=2, vms_per_site=1, addresses_per_device=2).entity_count() == 101
    result = run_sample("--redis-url", redis_url, "--stream", stream, *PACED, "--per-request", "20", "--rate", rate,
                        "--rate-unit", unit)
    assert pushed(result) == (6, 101)
    assert f"at most {rate} {unit}/s" in result.stderr
    entries = decoded(redis_client, stream)
    assert [len(message.rows) for message in entries] == [20] * 5 + [1]


class PaceClock:
    """The pace's clock: it moves only when the push sleeps, or by what the test says a push costs."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.mark.pg
@pytest.mark.parametrize("unit, rate, cost, sent_at", [
    ("requests", "10", 0.0, [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]),  # 6 entries at 10/s: the first at once, then every 0.1 s
    ("entities", "200", 0.0, [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]),  # 20 entities an entry at 200/s: the same
    ("requests", "10", 0.25, [0.0, 0.25, 0.5, 0.75, 1.0, 1.25]),  # XADDs slower than the rate: never slowed further
    ("requests", "0", 0.0, [0.0]),  # unpaced: one pipelined round trip, no wait
], ids=["requests", "entities", "slow-redis", "unpaced"])
def test_the_pace_of_a_push(redis_client, stream, unit, rate, cost, sent_at):
    args = sampletool.build_parser().parse_args([*PACED, "--per-request", "20", "--rate", rate, "--rate-unit", unit])
    clock, pushes = PaceClock(), []

    class Pushes(sampletool.Pushed):
        def add(self, entries: int, entities: int) -> None:
            super().add(entries, entities)
            pushes.append(clock.now)  # when this round trip's XADDs went
            clock.now += cost

    progress = Pushes(6, 101, quiet=True)
    sampletool.push(args, redis_client, stream, progress, clock=clock, sleep=clock.sleep)
    assert pushes == pytest.approx(sent_at)
    assert (clock.slept == []) == (cost > 0 or rate == "0")
    assert (progress.entries, progress.entities) == (6, 101)
    assert [len(message.rows) for message in decoded(redis_client, stream)] == [20] * 5 + [1]


@pytest.mark.subprocess
def test_an_unpaced_push_sends_everything_and_help_documents_the_options(redis_url, stream):
    assert pushed(run_sample("--redis-url", redis_url, "--stream", stream, "--per-request", "50")) == \
        (13, sample.Shape().entity_count())
    help_text = run_sample("--help").stdout
    for option in ("--redis-url", "--stream", "--sites", "--devices-per-site", "--racks-per-site", "--per-request",
                   "--rate", "--rate-unit", "--cycle", "--changed", "--brotli", "-c FILE"):
        assert option in help_text


@pytest.mark.subprocess
def test_bad_settings_and_unreachable_redis_fail_clearly():
    bad = run_sample(env={"RECONCILER_REDIS_URL": "http://nope"})
    assert bad.returncode == 2 and "RECONCILER_REDIS_URL" in bad.stderr
    down = run_sample("--redis-url", "redis://127.0.0.1:1/0", "--sites", "1")
    assert down.returncode == 1 and "Redis at redis://127.0.0.1:1/0" in down.stderr
