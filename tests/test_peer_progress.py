"""The NetBox peer's progress lines during its first install (peer/netbox.py), without NetBox: the
line counters against recorded output, and `_run` with a stand-in for a long command. Needs no server.
"""

from __future__ import annotations

import re

import pytest

from peer import netbox as peer

# Shortened output in the form of `netbox showmigrations --plan` on an empty database and of the
# `netbox migrate --no-input` that follows (Django's formats; not a recording): migrate writes
# "  Applying <migration>..." when one starts and " OK" when it is applied, so a line is complete
# only once the migration is.
SHOWMIGRATIONS_PLAN = """\
[ ]  contenttypes.0001_initial
[ ]  auth.0001_initial
[ ]  contenttypes.0002_remove_content_type_name
[ ]  auth.0002_alter_permission_name_max_length
[X]  admin.0001_initial
[ ]  users.0001_squashed_0011
"""

MIGRATE_OUTPUT = """\
Operations to perform:
  Apply all migrations: account, admin, auth, circuits, contenttypes, core, dcim, django_rq, extras, ipam
Running migrations:
  Applying contenttypes.0001_initial... OK
  Applying auth.0001_initial... OK
  Applying contenttypes.0002_remove_content_type_name... OK
  Applying auth.0002_alter_permission_name_max_length... OK
  Applying users.0001_squashed_0011... OK
"""

REPORT = re.compile(r"^\[peer\] netbox migrate: \d+m\d\ds elapsed, migrations applied (\d) of 3$")


def test_pending_migrations_counts_the_unapplied_lines_of_the_plan():
    assert peer.pending_migrations(SHOWMIGRATIONS_PLAN) == 5
    assert peer.pending_migrations("") == 0


def test_migrate_progress_counts_applied_migrations_of_the_total():
    progress = peer.MigrateProgress(5)
    assert progress.detail() == "migrations applied 0 of 5"
    for line in MIGRATE_OUTPUT.splitlines(keepends=True):
        progress.feed(line)
    assert progress.detail() == "migrations applied 5 of 5"
    assert re.fullmatch(r"netbox migrate: 0m0\ds elapsed, migrations applied 5 of 5", progress.report())
    assert peer.MigrateProgress(None).detail() == "migrations applied 0"  # the plan could not be read


def test_pip_progress_counts_collected_then_installed_packages():
    progress = peer.PipProgress()
    for line in ["Collecting netbox==4.7.3\n", "  Downloading netbox-4.7.3-py3-none-any.whl (12.1 MB)\n",
                 "Collecting Django<5.3,>=5.2\n"]:
        progress.feed(line)
    assert progress.detail() == "2 packages collected"
    progress.feed("Installing collected packages: pytz, Django, netbox\n")
    assert progress.detail() == "2 packages collected, installing 3"


def test_a_long_command_reports_plain_progress_lines_as_it_runs(tmp_path, capsys):
    progress = peer.MigrateProgress(3, every=0.3)
    script = "for i in 1 2 3; do printf '  Applying a.000%s...' $i; sleep 0.5; echo ' OK'; done; echo oops >&2"
    stdout = peer._run(["sh", "-c", script], tmp_path / "migrate.log", progress=progress)
    assert stdout.count("... OK\n") == 3
    assert progress.detail() == "migrations applied 3 of 3"
    lines = capsys.readouterr().err.splitlines()
    assert "\r" not in "".join(lines)  # a journal or CI log gets whole lines
    counts = [int(REPORT.match(line)[1]) for line in lines]
    assert len(counts) >= 3 and counts == sorted(counts) and counts[-1] >= 1, lines
    log = (tmp_path / "migrate.log").read_text()
    assert "  Applying a.0003... OK" in log and "oops" in log  # stdout and stderr both kept in the log


def test_a_failing_command_with_progress_raises_with_the_log_tail(tmp_path):
    with pytest.raises(peer.PeerError, match=r"(?s)sh exited 3.*broken"):
        peer._run(["sh", "-c", "echo broken; exit 3"], tmp_path / "x.log", progress=peer.Progress("x", every=5))


FAKE_NETBOX = """#!/bin/sh
# Stands in for the peer venv's `netbox` command: `showmigrations --plan`, then a slow `migrate`.
case "$1" in
    showmigrations) [ -n "$FAKE_PLAN_FAILS" ] && exit 1
                    printf '[X]  contenttypes.0001_initial\\n[ ]  dcim.0001\\n[ ]  dcim.0002\\n[ ]  ipam.0001\\n' ;;
    migrate) echo 'Running migrations:'
             for m in dcim.0001 dcim.0002 ipam.0001; do printf '  Applying %s...' $m; sleep 0.4; echo ' OK'; done ;;
esac
"""


@pytest.fixture
def fake_netbox(tmp_path, monkeypatch):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "netbox").write_text(FAKE_NETBOX)
    (venv / "bin" / "netbox").chmod(0o755)
    monkeypatch.setattr(peer, "VENV", venv)
    monkeypatch.setattr(peer, "LOGS", tmp_path)
    monkeypatch.setattr(peer, "NETBOX_ROOT", tmp_path / "root")
    monkeypatch.setattr(peer, "PROGRESS_SECONDS", 0.3)
    return tmp_path


def test_migrate_says_how_many_of_the_plan_are_applied(fake_netbox, capsys):
    peer._migrate()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("[peer] netbox migrate: 3 migrations to apply"), lines
    assert lines[-1] == "[peer] netbox migrate: migrations applied 3 of 3", lines
    assert [line for line in lines[1:-1] if REPORT.match(line)], lines
    assert "  Applying ipam.0001... OK" in (fake_netbox / "migrate.log").read_text()


def test_migrate_without_a_plan_still_counts(fake_netbox, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_PLAN_FAILS", "1")
    peer._migrate()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("[peer] netbox migrate: cannot count the migrations to apply"), lines
    assert lines[-1] == "[peer] netbox migrate: migrations applied 3", lines
