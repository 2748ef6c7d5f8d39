"""The chaos suite's CI-sized run: bench/chaos.py --short, on a Postgres and a Redis of its own.

No entity lost, none sent while an earlier request carrying it was still in progress, nothing
stuck, every stop clean, under kills of every role, server restarts, plugin faults, two
supervisors and bad input. The suite prints its table and the reasons of any failure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# Its own Postgres cluster and Redis (none of the machine's), killed and restarted; ~6 minutes.
pytestmark = [pytest.mark.subprocess, pytest.mark.chaos]

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 15 * 60  # the suite aims at 5-7 minutes on the project's 2-core machine


def test_chaos_short():
    venv_python = ROOT / ".venv" / "bin" / "python"
    python = str(venv_python) if venv_python.exists() else sys.executable
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
    suite = subprocess.Popen([python, str(ROOT / "bench" / "chaos.py"), "--short"], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = suite.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        suite.send_signal(signal.SIGTERM)  # it stops its servers and services before it exits
        try:
            out, err = suite.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            suite.kill()
            out, err = suite.communicate()
        raise AssertionError(f"bench/chaos.py --short ran longer than {TIMEOUT} s\n{out}\n{err[-20000:]}") from None
    assert suite.returncode == 0, (f"bench/chaos.py --short exited with {suite.returncode}\n"
                                   f"--- table ---\n{out}\n--- progress (end) ---\n{err[-20000:]}")
