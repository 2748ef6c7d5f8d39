"""The wheel an operator installs holds every module and every SQL file of the source tree:
setup.cfg lists its packages one by one, and an editable install (what the tests run) would not
notice one missing."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.subprocess
def test_a_built_wheel_contains_every_module_and_sql_file(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    [wheel] = tmp_path.glob("reconciler-*.whl")
    packaged = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(path.relative_to(ROOT)) for path in (ROOT / "reconciler").rglob("*.py")}
    statements = {"reconciler/sql/" + str(path.relative_to(ROOT / "sql")) for path in (ROOT / "sql").rglob("*.sql")}
    assert modules - packaged == set()
    assert statements - packaged == set()
