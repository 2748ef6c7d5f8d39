"""The supervisor's private scratch directory: the shared cache's socket, and the metrics files when
the operator sets no PROMETHEUS_MULTIPROC_DIR.

One directory per supervisor, `reconciler-run-*` in the temp folder (systemd's RuntimeDirectory when
set), made before the first fork and removed at exit. A supervisor killed by SIGKILL runs no exit
handler, so each directory carries a lock file that the supervisor holds while it lives; its
children inherit the open file, so the lock goes only with the last process of that run. The next
supervisor removes every directory whose lock nobody holds.
"""

from __future__ import annotations

import atexit
import fcntl
import glob
import logging
import os
import shutil
import tempfile

log = logging.getLogger(__name__)

PREFIX = "reconciler-run-"
LOCK_FILE = "supervisor.lock"
UNIX_SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL

_path: str | None = None
_owner: int | None = None
_lock = None  # the open lock file, held for the process's lifetime


def directory() -> str:
    """This supervisor's directory, made (and abandoned ones removed) on first use."""
    global _path, _owner, _lock
    if _path is None or _owner != os.getpid():
        parent = (os.environ.get("RUNTIME_DIRECTORY") or "").split(":")[0] or None
        # Locked under another name, then renamed: a directory that bears PREFIX is locked from the
        # start, so a supervisor starting at the same moment never takes it for an abandoned one.
        unnamed = tempfile.mkdtemp(prefix="reconciler-new-", dir=parent)
        _lock = open(os.path.join(unnamed, LOCK_FILE), "w")
        fcntl.flock(_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path = os.path.join(os.path.dirname(unnamed),
                            PREFIX + os.path.basename(unnamed).removeprefix("reconciler-new-"))
        os.rename(unnamed, path)
        _path, _owner = path, os.getpid()
        atexit.register(_remove, path, _owner)
        _remove_abandoned(os.path.dirname(path))
    return _path


def socket_path(name: str) -> str | None:
    """A Unix socket path in the directory, or None when the path would be too long for one."""
    path = os.path.join(directory(), name)
    return path if len(path.encode()) <= UNIX_SOCKET_PATH_MAX else None


def _remove(path: str, owner: int) -> None:
    if os.getpid() == owner:  # never from a forked child that happens to run atexit
        shutil.rmtree(path, ignore_errors=True)


def _remove_abandoned(parent: str) -> None:
    for other in glob.glob(os.path.join(parent, PREFIX + "*")):
        try:
            with open(os.path.join(other, LOCK_FILE)) as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(other, ignore_errors=True)
        except OSError:
            continue  # held by a live run, made an instant ago, or not one of ours: left alone
        log.info("removed %s, left behind by a supervisor that was killed", other)
