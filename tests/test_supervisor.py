"""`bin/reconciler run` as operators run it: restarts, clean stops, and giving up instead of spinning."""

from __future__ import annotations

import os
import signal

import psycopg2
import pytest

from reconciler import errors, sample
from reconciler.roles import Role

from .support import STREAM, children_of, push, reconciler, role_pid, scalar, wait_until


@pytest.mark.subprocess
def test_sigterm_drains_and_exits_zero(env, tmp_path):
    with reconciler(env, tmp_path) as run:
        run.wait_for_event("booted")
        run.signal(signal.SIGTERM)
        assert run.wait(timeout=10) == errors.RET_OK  # not RET_KILLED: no child had to be killed at the drain's end
        assert [entry["clean"] for entry in run.events("stopped", role="supervisor")] == [True]


@pytest.mark.subprocess
def test_sigterm_to_the_whole_process_group_is_still_a_clean_stop(env, tmp_path):
    """timeout(1) and `kill -TERM -<pgid>` signal every child as well as the supervisor."""
    with reconciler(env, tmp_path) as run:
        run.wait_for_event("booted")
        os.killpg(run.process.pid, signal.SIGTERM)
        assert run.wait(timeout=10) == errors.RET_OK


@pytest.mark.subprocess
def test_killed_child_is_restarted_and_keeps_consuming(env, tmp_path, redis_client, dsn):
    with reconciler(env, tmp_path) as run:
        run.wait_for_event("booted")
        first = role_pid(run)
        os.kill(first, signal.SIGKILL)
        run.wait_for_event("child_exited", child="consumer", exit_code=-signal.SIGKILL)
        assert "was killed by SIGKILL (perhaps the OOM killer)" in run.log  # what the operator reads
        run.wait_for_event("booted", count=2)
        assert role_pid(run) != first
        push(redis_client, sample.entries(sample.Shape(devices_per_site=1)))
        wait_until(lambda: redis_client.xlen(STREAM) == 0, what="the restarted consumer to consume")
        assert scalar(dsn, "SELECT count(*) FROM ingestion_logs") == sample.Shape(devices_per_site=1).entity_count()
        run.signal(signal.SIGTERM)
        assert run.wait(timeout=10) == errors.RET_OK


@pytest.mark.subprocess
def test_child_failing_at_boot_makes_the_supervisor_give_up_without_spinning(env, tmp_path):
    env = {**env, "RECONCILER_POSTGRES_DSN": "postgresql://postgres@127.0.0.1:1/nothing",
           "RECONCILER_POSTGRES_MIGRATE_ON_START": "false", "RECONCILER_SUPERVISOR_MAX_BOOT_FAILURES": "3"}
    with reconciler(env, tmp_path) as run:
        assert run.wait(timeout=30) == errors.RET_BOOT
    assert len(run.events("boot_failed", role="consumer")) == 3
    assert "cannot connect to Postgres" in run.events("boot_failed")[0]["msg"]
    assert run.events("giving_up", child="consumer")
    # Not a hot loop: it backed off 1 s, then 2 s (the delays it decided, not how long the run took).
    assert [(entry["child"], entry["delay"]) for entry in run.events("restarting")] == [("consumer", 1.0),
                                                                                         ("consumer", 2.0)]


@pytest.mark.subprocess
def test_unreachable_postgres_at_start_exits_with_the_connect_code(env, tmp_path):
    env = {**env, "RECONCILER_POSTGRES_DSN": "postgresql://postgres@127.0.0.1:1/nothing"}
    with reconciler(env, tmp_path) as run:
        assert run.wait(timeout=30) == errors.RET_CONNECT
    assert "cannot migrate the database: cannot connect to Postgres" in run.log


@pytest.mark.subprocess
def test_child_crashing_again_and_again_makes_the_supervisor_give_up(env, tmp_path):
    with reconciler(env, tmp_path) as run:
        for crash in range(6):
            run.wait_for_event("booted", count=crash + 1, timeout=30)
            os.kill(role_pid(run), signal.SIGKILL)
            run.wait_for_event("child_exited", count=crash + 1, exit_code=-signal.SIGKILL)
        assert run.wait(timeout=30) == errors.RET_CRASHLOOP
    assert run.events("giving_up", child="consumer")
    assert "crashed 6 times within 60 s; giving up" in run.log


@pytest.mark.subprocess
def test_hung_child_is_killed_and_replaced(env, tmp_path):
    env = {**env, "RECONCILER_SUPERVISOR_HEARTBEAT_TIMEOUT_SECONDS": "2"}
    with reconciler(env, tmp_path) as run:
        run.wait_for_event("booted")
        hung = role_pid(run)
        os.kill(hung, signal.SIGSTOP)  # stopped: it cannot even write its stacks, and is killed all the same
        run.wait_for_event("child_hung", child="consumer", timeout=15)
        run.wait_for_event("booted", count=2)
        assert role_pid(run) != hung
        run.signal(signal.SIGTERM)
        assert run.wait(timeout=10) == errors.RET_OK


@pytest.mark.subprocess
def test_a_hung_child_writes_its_stacks_to_the_log_before_it_is_killed(env, tmp_path, redis_client, dsn):
    """Hung inside a C call (a Postgres statement waiting on a lock): faulthandler still answers SIGABRT."""
    env = {**env, "RECONCILER_SUPERVISOR_HEARTBEAT_TIMEOUT_SECONDS": "2"}
    with reconciler(env, tmp_path) as run, psycopg2.connect(dsn) as blocker:
        run.wait_for_event("booted")
        hung = role_pid(run)
        blocker.cursor().execute("LOCK TABLE reconciler.ingestion_logs IN ACCESS EXCLUSIVE MODE")
        push(redis_client, sample.entries(sample.Shape(devices_per_site=1)))
        run.wait_for_event("child_hung", child="consumer", timeout=15)
        run.wait_for_event("child_exited", child="consumer", exit_code=-signal.SIGABRT)
        blocker.rollback()
        stacks = run.log.split("made no progress for", 1)[1]
        assert "Fatal Python error: Aborted" in stacks and "inbox.py" in stacks and "consumer.py" in stacks
        run.wait_for_event("booted", count=2)
        assert role_pid(run) != hung
        wait_until(lambda: redis_client.xlen(STREAM) == 0, what="the new consumer to write what the hung one held")
        run.signal(signal.SIGTERM)
        assert run.wait(timeout=10) == errors.RET_OK


@pytest.mark.subprocess
def test_children_do_not_outlive_a_killed_supervisor(env, tmp_path):
    with reconciler(env, tmp_path) as run:
        run.wait_for_event("booted")
        children = children_of(run.process.pid)  # the consumer and the shared cache's Manager
        assert len(children) == 2
        os.kill(run.process.pid, signal.SIGKILL)
        run.process.wait(10)
        wait_until(lambda: all(_is_gone(child) for child in children), timeout=10, what="the orphans to exit")
        run.wait_for_log("is gone; stopping")


def _title(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
        return cmdline.read().split(b"\0")[0].decode()


def _is_gone(pid: int) -> bool:
    """Exited: no such process, or a zombie waiting for init to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.subprocess
def test_a_killed_manager_is_replaced_and_every_process_restarted(env, tmp_path, redis_client, dsn):
    """Its socket file stays behind when it is SIGKILLed: the next Manager must not need its name (the
    supervisor once crashed with "Address already in use")."""
    with reconciler(env, tmp_path) as run:
        run.wait_for_event("booted")
        consumer = role_pid(run)
        [manager] = [pid for pid in children_of(run.process.pid) if pid != consumer]
        assert _title(manager) == "reconciler: shared cache"
        os.kill(manager, signal.SIGKILL)
        run.wait_for_event("manager_died")
        run.wait_for_event("booted", count=2)
        push(redis_client, sample.entries(sample.Shape(devices_per_site=1)))
        wait_until(lambda: scalar(dsn, "SELECT count(*) FROM ingestion_logs") > 0, what="rows from the new consumer")
        run.signal(signal.SIGTERM)
        assert run.wait(timeout=20) == errors.RET_OK


class _Waiting(Role):
    def run_once(self) -> None:
        pass


@pytest.mark.pg
def test_a_role_waiting_for_a_dependency_stops_once_its_supervisor_is_gone(config):
    """The consumer's backoff while Redis was down, and a worker's while Postgres was, ran on after a
    SIGKILLed supervisor: every wait passes through pause(), which now notices."""
    role = _Waiting(config)
    role.parent = os.getppid()
    assert role.pause(0.01) and not role.stopping
    role.parent = -1  # as seen from a process whose supervisor died: reparented to another pid
    assert role.pause(3600) is False and role.stopping
