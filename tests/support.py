"""Helpers shared by the tests: waiting, stream pushes, and running bin/reconciler as a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import psycopg2

from .builders import STREAM

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "bin" / "reconciler"


def wait_until(predicate: Callable[[], object], timeout: float = 20.0, interval: float = 0.05,
               what: str | Callable[[], str] = "condition"):
    """Poll until predicate() is truthy; fail the test naming `what` (text, or a callable) after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what() if callable(what) else what}")
        time.sleep(interval)


def cli(env: dict[str, str], *args: str, stderr=subprocess.PIPE, timeout: float = 60) -> subprocess.CompletedProcess:
    """bin/reconciler with these arguments, as an operator runs it: its output as text."""
    return subprocess.run([sys.executable, str(BIN), *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=stderr, text=True, timeout=timeout)


def cli_json(env: dict[str, str], *args: str, timeout: float = 60):
    """bin/reconciler ... --json, which must succeed: its output parsed."""
    done = cli(env, *args, "--json", timeout=timeout)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout)


def query(dsn: str, sql: str, params=None) -> list[tuple]:
    with psycopg2.connect(dsn, options="-c search_path=reconciler") as conn, conn.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall() if cursor.description else []
    conn.close()
    return rows


def scalar(dsn: str, sql: str, params=None):
    return query(dsn, sql, params)[0][0]


def push(redis_client, entries) -> list[bytes]:
    """XADD stream entries; returns their ids."""
    with redis_client.pipeline(transaction=False) as pipe:
        for fields in entries:
            pipe.xadd(STREAM, fields)
        return pipe.execute()


def children_of(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


class Reconciler:
    """`bin/reconciler run` in its own session, stderr captured to a file the test can read.

    It logs JSON (unless the test's env says otherwise), so tests check lifecycle events by their
    `event` field (`events`, `wait_for_event`) rather than by the wording of a message; `log` renders
    the lines as text for the checks that are about what an operator reads.
    """

    def __init__(self, env: dict[str, str], args: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen([sys.executable, str(BIN), *args], env={"RECONCILER_LOG_FORMAT": "json", **env},
                                        stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)

    def _entries(self) -> list[dict | str]:
        """Each line of the log: its JSON object, or the raw text (a traceback faulthandler wrote, a
        line from before logging was set up)."""
        entries: list[dict | str] = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                entry = line
            entries.append(entry if isinstance(entry, dict) and "msg" in entry else line)
        return entries

    @property
    def log(self) -> str:
        return "\n".join(_as_text(entry) for entry in self._entries())

    def events(self, event: str, **fields) -> list[dict]:
        """The log entries of `event` whose fields match `fields`."""
        return [entry for entry in self._entries() if isinstance(entry, dict) and entry.get("event") == event
                and all(entry.get(name) == value for name, value in fields.items())]

    def wait_for_event(self, event: str, timeout: float = 20.0, count: int = 1, **fields) -> list[dict]:
        wait_until(lambda: len(self.events(event, **fields)) >= count, timeout,
                   what=lambda: f"{count} {event!r} events {fields or ''} in the log:\n{self.log}")
        return self.events(event, **fields)

    def wait_for_log(self, text: str, timeout: float = 20.0, count: int = 1) -> None:
        wait_until(lambda: self.log.count(text) >= count, timeout, what=lambda: f"{text!r} in the log:\n{self.log}")

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def kill_all(self) -> None:
        """SIGKILL the supervisor and every child (its whole session)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(10)

    def close(self) -> None:
        if self.process.poll() is None:
            self.kill_all()
        self._log.close()


def _as_text(entry: dict | str) -> str:
    if isinstance(entry, str):
        return entry
    text = f"{entry['level'].upper()} {entry['role']}[{entry['pid']}] {entry['logger']}: {entry['msg']}"
    return text + ("\n" + entry["exc"] if "exc" in entry else "")


def role_pid(run, role: str = "consumer") -> int:
    """The pid of the live process of a role, as the supervisor logged it when it started the process."""
    def latest():
        found = [entry["child_pid"] for entry in run.events("child_started", child=role)]
        return found and found[-1] in children_of(run.process.pid) and found[-1]
    return wait_until(latest, what=f"a running {role} process")


@contextmanager
def reconciler(env: dict[str, str], tmp_path: Path, *args: str) -> Iterator[Reconciler]:
    run = Reconciler(env, ["run", *args], tmp_path / f"reconciler-{time.monotonic_ns()}.log")
    try:
        yield run
    finally:
        run.close()
