"""`reconciler retry`: FAILED and ERRORED rows back to QUEUED, for the poll workers to plan again.

A requeued row looks to a worker like any QUEUED row (claim_batch): no lease, no attempts used, no
due time. Only heads are requeued (see retry_batch in sql/queries.sql). The rows go in batches of
BATCH_ROWS, one short transaction each, so a retry of a million rows never holds one long
transaction (and its locks) against the consumer and the workers.
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass
from typing import Any

from .. import errors, states
from ..db import Database
from ..settings import Config
from . import console

BATCH_ROWS = 1000
STATE_CHOICES = {"failed": states.FAILED, "errored": states.ERRORED}


@dataclass(frozen=True)
class Selection:
    """Which rows an operator asked for."""

    states: tuple[int, ...]
    object_type: str | None = None
    older_than: float | None = None  # seconds since the row failed (updated_at)
    newer_than: float | None = None

    def params(self) -> dict[str, Any]:
        return {"states": list(self.states), "object_type": self.object_type,
                "older_than": self.older_than, "newer_than": self.newer_than}


def preview(db: Database, selection: Selection) -> tuple[Counter, int]:
    """({(state, object type): head rows that match}, matching rows that are not heads)."""
    heads: Counter = Counter()
    others = 0
    for state, object_type, is_head, count in db.fetchall("retry_preview", selection.params()):
        if is_head:
            heads[(state, object_type)] += count
        else:
            others += count
    return heads, others


def requeue(db: Database, selection: Selection, progress: console.Counter | None = None,
            batch: int = BATCH_ROWS) -> Counter:
    """Requeue every matching head row; returns {(former state, object type): rows requeued}."""
    done: Counter = Counter()
    after = 0
    while True:
        with db.transaction() as tx:
            rows = tx.fetchall("retry_batch", {**selection.params(), "after": after, "limit": batch})
        for _, state, object_type in rows:
            done[(state, object_type)] += 1
        if progress is not None:
            progress.add(len(rows))
        if not rows:
            return done
        # Keyset paging: each batch starts after the highest id seen, so rows are visited once.
        after = max(row_id for row_id, _, _ in rows)


# --- the command ---


def selection_from(args: argparse.Namespace) -> Selection:
    chosen = args.state or list(STATE_CHOICES)
    return Selection(tuple(sorted({STATE_CHOICES[name] for name in chosen})), args.object_type,
                     args.older_than, args.newer_than)


def cmd_retry(config: Config, args: argparse.Namespace) -> int:
    return console.with_database(config, "retry", lambda db: _retry(db, args))


def _retry(db: Database, args: argparse.Namespace) -> int:
    selection = selection_from(args)
    heads, others = preview(db, selection)
    if args.dry_run:
        _report(args, heads, others, dry_run=True)
        return errors.RET_OK
    progress = console.Counter("requeued", sum(heads.values()))
    try:
        done = requeue(db, selection, progress)
    finally:
        progress.finish()
    _report(args, done, others, dry_run=False)
    return errors.RET_OK


def _report(args: argparse.Namespace, counts: Counter, others: int, dry_run: bool) -> None:
    rows = [{"state": states.NAMES[state], "object_type": object_type, "rows": count}
            for (state, object_type), count in sorted(counts.items())]
    total = sum(counts.values())
    if args.json:
        console.print_json({"dry_run": dry_run, "requeued": 0 if dry_run else total, "matching": total,
                            "by_state_and_object_type": rows, "not_head_left_alone": others})
        return
    if not total:
        print("no matching FAILED or ERRORED rows to requeue; nothing changed")
    elif dry_run:
        print(f"dry run: would requeue {total} rows to QUEUED (nothing changed):")
    else:
        print(f"requeued {total} rows to QUEUED:")
    if total:
        lines = [[r["state"], r["object_type"], r["rows"]] for r in rows]
        print(console.table(["state", "object type", "rows"], lines))
    if others:
        print(f"{others} matching rows are not the current row of their entity (a newer row exists) and were "
              f"left alone")
