"""bin/quickstart end to end, as the README's first command: real NetBox (peer), `reconciler run`,
reconciler-sample, progress until applied, then Ctrl-C stops reconciler cleanly.

Pointed at this test's database and Redis db through RECONCILER_* variables (which the quick start
honours), on a site of its own (dc-030). About 20 s once the peer is built and cached.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading

import pytest

from peer import netbox as peer

from .support import ROOT

pytestmark = pytest.mark.netbox

SAMPLE_ARGS = ("--first-site 30 --racks-per-site 2 --devices-per-site 3 --ports-per-device 4 --vlans-per-site 2 "
               "--prefixes-per-site 2 --vms-per-site 2 --addresses-per-device 1")


@pytest.fixture(scope="module")
def netbox():
    """The peer NetBox, left as found: stopped again at the end only if this module started it."""
    was_running = peer.status()["netbox_ready"]
    yield peer.up()
    if not was_running:
        peer.down()


def test_quickstart_applies_the_sample_network_and_stops_cleanly_on_ctrl_c(env, netbox, tmp_path):
    environ = {**env, "HOME": os.environ.get("HOME", "/root"), "RECONCILER_WORKERS_COUNT": "2",
               "QUICKSTART_SAMPLE_ARGS": SAMPLE_ARGS, "QUICKSTART_TIMEOUT": "180",
               "QUICKSTART_LOG": str(tmp_path / "reconciler.log")}
    process = subprocess.Popen([str(ROOT / "bin" / "quickstart")], env=environ, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    killer = threading.Timer(300, process.kill)  # a hung quick start fails the test instead of hanging it
    killer.start()
    output = []
    try:
        for line in process.stdout:
            output.append(line)
            if "Ctrl-C stops reconciler" in line or "FAILED at step" in line:
                break
        text = "".join(output)
        assert "Ctrl-C stops reconciler" in text, text
        process.send_signal(signal.SIGINT)
        text += process.stdout.read()
        assert process.wait(60) == 0, text
    finally:
        killer.cancel()
        if process.poll() is None:
            process.kill()
    steps = re.findall(r"^==> \[(\d)/8\]", text, re.M)
    assert steps == [str(n) for n in range(1, 9)], text
    pushed = re.search(r"^pushed \d+ entries \((\d+) entities, site dc-030\)", text, re.M)
    # APPLIED, or NO_CHANGES where an earlier run already put dc-030 into this NetBox; never FAILED.
    assert pushed and re.search(rf"^all {pushed[1]} entities finished: ", text, re.M), text
    assert "log in as admin / admin" in text and f"{netbox.netbox_url}/dcim/devices/?site=dc-030" in text
    assert "reconciler stopped cleanly (exit 0)" in text, text
    devices = peer.rest_get("/api/dcim/devices/", params={"site": "dc-030"})["results"]
    assert sorted((d["rack"]["name"], d["position"]) for d in devices) == [
        ("rack-030-00", 41.0), ("rack-030-00", 42.0), ("rack-030-01", 42.0)]
