"""sd_notify(3) over a stdlib datagram socket: readiness, status and watchdog for systemd.

Under `Type=notify`, systemd passes $NOTIFY_SOCKET; the supervisor tells it when every child has
booted (READY=1), what the service is doing (STATUS=, shown by `systemctl status`), when it
reloads or stops, and, with `WatchdogSec=`, that its loop still turns (WATCHDOG=1). Without
$NOTIFY_SOCKET (a terminal, the tests' plain runs) every call is a no-op.

The variables are taken out of the environment at start, as sd_notify's unset_environment does,
so that the forked children, which must not speak for the service, do not see them.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import MutableMapping

log = logging.getLogger(__name__)


def _socket_address(raw: str) -> str | bytes:
    # A leading '@' names a socket in the abstract namespace, whose real name starts with NUL.
    return b"\0" + raw[1:].encode() if raw.startswith("@") else raw


def _watchdog_interval(environ: MutableMapping[str, str]) -> float | None:
    """Half of WatchdogSec= (as systemd recommends), if the watchdog is meant for this process."""
    usec, pid = environ.pop("WATCHDOG_USEC", None), environ.pop("WATCHDOG_PID", None)
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 1e6 / 2


def status_line(running: list[str], expected: int, restarts: int, rejected_reload: str | None) -> str:
    """The STATUS= line `systemctl status` shows: which processes run (workers counted, not listed),
    how many are being restarted, restarts since start, and a refused reload until one succeeds
    (`systemctl reload` itself returns at once, so this line is where the operator sees it)."""
    workers = sum(1 for name in running if name.startswith("worker"))
    parts = [name for name in running if not name.startswith("worker")]
    if workers:
        parts.append(f"{workers} worker{'s' if workers != 1 else ''}")
    line = "running: " + (", ".join(parts) or "nothing")
    if expected > len(running):
        line += f"; {expected - len(running)} restarting"
    line += f"; {restarts} restarts since start"
    if rejected_reload:
        line = f"reload rejected, running the previous configuration: {rejected_reload}; {line}"
    return line


class Notifier:
    """The supervisor's line to systemd. Sends are best effort: systemd gone is not our failure."""

    def __init__(self, environ: MutableMapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        raw = environ.pop("NOTIFY_SOCKET", None)
        self._address = _socket_address(raw) if raw else None
        self._socket: socket.socket | None = None
        self.watchdog_interval = _watchdog_interval(environ) if self._address else None
        self._next_watchdog = 0.0
        self._status: str | None = None

    def _send(self, *assignments: str) -> None:
        if self._address is None:
            return
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto("\n".join(assignments).encode(), self._address)
        except OSError as exc:
            log.debug("sd_notify failed: %s", exc)

    def ready(self, status: str) -> None:
        self._status = status
        self._send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets Type=notify-reload match this RELOADING=1 to the reload it asked for.
        self._send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self._send("STOPPING=1", "STATUS=stopping: draining children")

    def status(self, text: str) -> None:
        """A one-line summary for `systemctl status`; sent only when it changed."""
        if text != self._status:
            self._status = text
            self._send(f"STATUS={text}")

    def watchdog(self) -> None:
        """Called from every turn of the supervisor's loop; pings at half the watchdog interval."""
        if self.watchdog_interval is None:
            return
        now = time.monotonic()
        if now >= self._next_watchdog:
            self._next_watchdog = now + self.watchdog_interval
            self._send("WATCHDOG=1")
