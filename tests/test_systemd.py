"""`bin/reconciler run` under systemd's contract: sd_notify readiness and watchdog on a test socket,
SIGHUP reloads (a changed worker count, a rejected file, a stop during the reload), process titles."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from reconciler import errors, sample, settings, states, systemd

from .faultserver import FaultServer, Step, converge
from .support import ROOT, children_of, push, query, reconciler, role_pid, scalar, wait_until


class NotifySocket:
    """The datagram socket systemd listens on for sd_notify messages."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []

    def receive(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                return
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))

    def wait_for(self, key: str, value: str | None = None, count: int = 1, timeout: float = 20) -> dict:
        def seen():
            self.receive()
            found = [m for m in self.messages if key in m and (value is None or m[key] == value)]
            return found[count - 1] if len(found) >= count else None
        return wait_until(seen, timeout, what=lambda: f"{key}={value} x{count} among {self.messages}")


@pytest.fixture
def notify(tmp_path):
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.sock.close()


def write_ini(tmp_path: Path, workers: int, extra: str = "") -> Path:
    path = tmp_path / "reconciler.ini"
    path.write_text(f"[workers]\ncount = {workers}\n{extra}")
    return path


def worker_env(env: dict, plugin: FaultServer) -> dict:
    env = {key: value for key, value in env.items() if key != "RECONCILER_WORKERS_COUNT"}  # the INI decides
    return {**env, "RECONCILER_NETBOX_URL": plugin.url, "RECONCILER_NETBOX_TOKEN": "t"}


def process_title(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


@pytest.mark.subprocess
def test_ready_is_notified_once_every_process_has_booted(env, tmp_path, notify, plugin):
    env = {**worker_env(env, plugin), "NOTIFY_SOCKET": notify.path}
    ini = write_ini(tmp_path, workers=2)
    with reconciler(env, tmp_path, "-c", str(ini)) as run:
        ready = notify.wait_for("READY", "1")
        assert run.log.count("booted") == 4  # consumer, refresher, 2 workers: all before READY=1
        assert ready["STATUS"] == "running: consumer, refresher, 2 workers; 0 restarts since start"
        assert int(ready["MAINPID"]) == run.process.pid
        run.signal(signal.SIGTERM)
        assert run.wait(20) == errors.RET_OK
    notify.wait_for("STOPPING", "1")


@pytest.mark.subprocess
def test_watchdog_is_pinged_at_half_the_interval(env, tmp_path, notify):
    env = {**env, "NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "2000000"}
    with reconciler(env, tmp_path) as run:
        notify.wait_for("READY", "1")
        assert notify.wait_for("WATCHDOG", "1")
        notify.wait_for("WATCHDOG", "1", count=3, timeout=10)  # not once: every ~1 s (the pace: the test below)
        run.signal(signal.SIGTERM)
        assert run.wait(20) == errors.RET_OK


def test_the_watchdog_pace_is_half_its_interval_however_often_the_loop_turns(monkeypatch):
    """The supervisor calls watchdog() on every turn of its loop; with WatchdogSec=2 s it pings at once,
    then once a second: neither once only nor in a hot loop. (On a clock of the test's.)"""
    now = [0.0]
    monkeypatch.setattr(systemd, "time", SimpleNamespace(monotonic=lambda: now[0]))
    notifier = systemd.Notifier({"NOTIFY_SOCKET": "/nonexistent/notify.sock", "WATCHDOG_USEC": "2000000"})
    sent = []
    monkeypatch.setattr(notifier, "_send", lambda *assignments: sent.append((now[0], assignments)))
    for turn in range(301):  # 3 s of turns 10 ms apart
        now[0] = turn / 100
        notifier.watchdog()
    assert sent == [(second, ("WATCHDOG=1",)) for second in (0.0, 1.0, 2.0, 3.0)]


@pytest.mark.subprocess
def test_processes_are_titled_by_role(env, tmp_path, plugin):
    ini = write_ini(tmp_path, workers=2)
    with reconciler(worker_env(env, plugin), tmp_path, "-c", str(ini)) as run:
        for role in ("consumer", "refresher", "worker 1", "worker 2"):
            pid = role_pid(run, role)  # logged at fork, before the child has renamed itself
            wait_until(lambda: process_title(pid) == f"reconciler: {role}",
                       what=lambda: f"the title of {role}, now {process_title(pid)!r}")
        wait_until(lambda: process_title(run.process.pid) == "reconciler: supervisor", what="the supervisor's title")
        run.signal(signal.SIGTERM)
        assert run.wait(20) == errors.RET_OK


@pytest.mark.subprocess
def test_sighup_applies_a_changed_worker_count_without_losing_a_row(env, tmp_path, notify, plugin, redis_client, dsn):
    env = {**worker_env(env, plugin), "NOTIFY_SOCKET": notify.path}
    ini = write_ini(tmp_path, workers=1)
    shape = sample.Shape(sites=4, devices_per_site=5)
    entries = list(sample.entries(shape))
    with reconciler(env, tmp_path, "-c", str(ini)) as run:
        notify.wait_for("READY", "1")
        push(redis_client, entries[:len(entries) // 2])
        write_ini(tmp_path, workers=3)
        run.signal(signal.SIGHUP)
        notify.wait_for("RELOADING", "1")
        push(redis_client, entries[len(entries) // 2:])  # arrives while the old generation drains
        ready = notify.wait_for("READY", "1", count=2, timeout=40)
        assert ready["STATUS"].startswith("running: consumer, refresher, 3 workers")
        for n in (1, 2, 3):
            role_pid(run, f"worker {n}")
        wait_until(lambda: scalar(dsn, "SELECT count(*) FROM ingestion_logs WHERE state = %s", (states.APPLIED,))
                   == shape.entity_count(), timeout=60, what="every row applied")
        run.signal(signal.SIGTERM)
        assert run.wait(20) == errors.RET_OK
    assert run.events("reloading")
    assert scalar(dsn, "SELECT count(*) FROM ingestion_logs") == shape.entity_count()
    assert query(dsn, "SELECT count(*), count(DISTINCT ingestion_log_id) FROM change_sets") == \
        [(shape.entity_count(), shape.entity_count())]  # each row applied once
    assert scalar(dsn, "SELECT count(*) FROM dead_letters") == 0


@pytest.mark.subprocess
def test_sighup_with_a_broken_file_keeps_the_running_configuration(env, tmp_path, plugin, notify):
    ini = write_ini(tmp_path, workers=1)
    with reconciler({**worker_env(env, plugin), "NOTIFY_SOCKET": notify.path}, tmp_path, "-c", str(ini)) as run:
        worker = role_pid(run, "worker 1")
        notify.wait_for("READY", "1")
        # Valid INI, but not runnable: OAuth2 without a client id. A start would refuse it; so must a reload.
        write_ini(tmp_path, workers=1, extra="[netbox]\ntoken_url = http://127.0.0.1:1/token\n")
        run.signal(signal.SIGHUP)
        [rejection] = run.wait_for_event("reload_rejected")
        assert "[netbox] client_id: required" in rejection["msg"]
        rejected = "reload rejected, running the previous configuration: [netbox] client_id: required"
        wait_until(lambda: notify.receive() or any(m.get("STATUS", "").startswith(rejected) for m in notify.messages),
                   what=lambda: f"{rejected!r} in STATUS (what `systemctl status` shows) among {notify.messages}")
        time.sleep(1.5)  # a few turns of the supervisor's loop: the line must stay, not flash by
        notify.receive()
        assert [m for m in notify.messages if "STATUS" in m][-1]["STATUS"].startswith(rejected)
        assert worker in children_of(run.process.pid)
        run.signal(signal.SIGTERM)
        assert run.wait(20) == errors.RET_OK


@pytest.mark.subprocess
def test_sigterm_during_a_reload_stops_instead_of_restarting(env, tmp_path, plugin, redis_client, notify):
    plugin.default("bulk-plan-apply/", Step(answer=converge, delay=3))  # keeps the worker's batch in flight
    ini = write_ini(tmp_path, workers=1)
    env = {**worker_env(env, plugin), "NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"}
    with reconciler(env, tmp_path, "-c", str(ini)) as run:
        notify.wait_for("READY", "1")
        push(redis_client, sample.entries(sample.Shape(devices_per_site=1)))
        wait_until(lambda: plugin.calls("bulk-plan-apply/"), what="a batch in flight")
        run.signal(signal.SIGHUP)
        run.wait_for_event("reloading")
        run.signal(signal.SIGTERM)
        assert run.wait(30) == errors.RET_OK
    assert len(run.events("stop_requested")) == 1  # taken during the reload's drain
    assert len(run.events("booted")) == 3  # no second generation was started
    # The watchdog kept being fed while the drain waited for the batch in flight (~3 s, WatchdogSec=1):
    notify.receive()
    reloading = next(i for i, m in enumerate(notify.messages) if m.get("RELOADING") == "1")
    stopping = next(i for i, m in enumerate(notify.messages) if m.get("STOPPING") == "1")
    assert sum(1 for m in notify.messages[reloading:stopping] if m.get("WATCHDOG") == "1") >= 3


@pytest.mark.subprocess
def test_the_unit_file_passes_systemd_analyze_verify(tmp_path):
    """The unit as shipped, with /opt/reconciler pointed at this checkout (verify checks ExecStart exists)."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is part of this machine's image; CI must have it"
    unit = tmp_path / "reconciler.service"
    unit.write_text((ROOT / "etc/systemd/reconciler.service").read_text().replace("/opt/reconciler", str(ROOT)))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_unit_keeps_its_promises_to_the_supervisor():
    """TimeoutStopSec must outlast the default drain, and exit code 2 (bad config) must not be restarted."""
    unit = dict(line.split("=", 1) for line in (ROOT / "etc/systemd/reconciler.service").read_text().splitlines()
                if "=" in line and not line.startswith("#"))
    assert float(unit["TimeoutStopSec"]) > settings.BY_NAME["supervisor.drain_seconds"].default
    assert unit["RestartPreventExitStatus"] == str(errors.RET_CONFIG)
    assert unit["Type"] == "notify" and unit["KillMode"] == "mixed" and unit["Restart"] == "on-failure"


@pytest.mark.subprocess
def test_a_sighup_during_a_reload_reads_the_file_again(env, tmp_path, plugin, redis_client, notify):
    plugin.default("bulk-plan-apply/", Step(answer=converge, delay=3))  # keeps the first reload draining
    ini = write_ini(tmp_path, workers=1)
    env = {**worker_env(env, plugin), "NOTIFY_SOCKET": notify.path}
    with reconciler(env, tmp_path, "-c", str(ini)) as run:
        notify.wait_for("READY", "1")
        push(redis_client, sample.entries(sample.Shape(devices_per_site=1)))
        wait_until(lambda: plugin.calls("bulk-plan-apply/"), what="a batch in flight")
        run.signal(signal.SIGHUP)  # reads workers = 1, then drains for ~3 s
        run.wait_for_event("reloading")
        write_ini(tmp_path, workers=2)  # the operator's second edit, and its reload
        run.signal(signal.SIGHUP)
        run.wait_for_event("reload_queued")
        # The generation of the first reload may not get to READY before the second reload replaces it.
        wait_until(lambda: notify.receive() or any(m.get("READY") == "1" and m["STATUS"].startswith(
            "running: consumer, refresher, 2 workers") for m in notify.messages), timeout=40,
            what=lambda: f"READY with 2 workers among {notify.messages}")
        run.signal(signal.SIGTERM)
        assert run.wait(30) == errors.RET_OK
