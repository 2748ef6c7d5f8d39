"""`reconciler prune [--dry-run]`: one retention walk now (retention.py), or what it would delete.

The service's retention process does the same every `[retention] interval_seconds`; this is for an
operator who wants the space back now, or to see what the settings would delete before turning
them on (the dry run walks the same steps and deletes nothing).
"""

from __future__ import annotations

import argparse

from .. import errors, retention
from ..db import Database
from ..settings import Config
from . import console


def cmd_prune(config: Config, args: argparse.Namespace) -> int:
    return console.with_database(config, "prune", lambda db: _prune(db, config, args))


def _prune(db: Database, config: Config, args: argparse.Namespace) -> int:
    if args.dry_run:
        counts = retention.prune(db, config, dry_run=True, rest=lambda seconds: True)
    else:
        with retention.exclusive(db, config.postgres.schema) as mine:
            if not mine:
                console.fail("another pruner is walking the inbox now (the service's retention process or another "
                             "`reconciler prune`); nothing was deleted, try again later")
                return console.RET_FAILED
            counts = retention.prune(db, config)
    report = {"dry_run": args.dry_run,
              "kinds": {kind.name: {"keep_days": retention.keep_days(config, kind), "count": counts.get(kind.name)}
                        for kind in retention.KINDS}}
    if args.json:
        console.print_json(report)
    else:
        print(render(report))
    return errors.RET_OK


def render(report: dict) -> str:
    verb = "would delete" if report["dry_run"] else "deleted"
    lines = []
    for kind in retention.KINDS:
        entry = report["kinds"][kind.name]
        if entry["count"] is None:
            lines.append(f"{kind.what}: kept for ever ([retention] {kind.setting} = 0)")
        else:
            lines.append(f"{kind.what}: {verb} {entry['count']:,} (older than {entry['keep_days']:g} days)")
    return "\n".join(lines)
