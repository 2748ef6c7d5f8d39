"""Plumbing of the operator commands (status, retry, dead-letters, show): their Postgres
connection and transactions, exit codes, durations, tables, JSON, progress on stderr."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any, Callable, Iterable, Iterator, TextIO

import orjson

from .. import errors
from ..db import Database
from ..errors import DatabaseError
from ..progress import Progress
from ..settings import Config
from ..text import human_seconds  # noqa: F401 (the commands' name for it)

# An operator command that could not do what it was asked (nothing matched, a row does not exist,
# a statement failed). Postgres or Redis unreachable is errors.RET_CONNECT, a bad configuration
# errors.RET_CONFIG, as for `reconciler run`.
RET_FAILED = 1

# A statement of an operator command waiting this long (for a lock a stuck transaction holds) is
# cancelled instead of hanging the operator's shell.
STATEMENT_TIMEOUT_MS = 30_000

JSON_OPTIONS = orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def duration(raw: str) -> float:
    """Seconds of `90`, `90s`, `15m`, `1h30m`, `2d`, `1w` (an argparse type)."""
    text = raw.strip().lower().replace(" ", "")
    parts = _DURATION_PART.findall(text)
    if not text or "".join(number + unit for number, unit in parts) != text:
        raise argparse.ArgumentTypeError(f"expected a duration like 90s, 15m, 1h30m, 2d; got {raw!r}")
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def table(headers: list[str], rows: list[list[Any]], indent: str = "  ") -> str:
    """Text columns: numbers right-aligned, everything else left-aligned."""
    return "\n".join(table_pages(headers, [rows], indent))


def table_pages(headers: list[str], pages: Iterable[list[list[Any]]], indent: str = "  ") -> Iterator[str]:
    """The lines of a table read page by page, so a long one is never held whole: the first page sets
    the columns' widths and alignment (a later, wider cell pushes its line out rather than the page
    waiting for the last row)."""
    widths: list[int] | None = None
    numeric: list[bool] = []
    for rows in pages:
        cells = [["" if value is None else str(value) for value in row] for row in rows]
        if widths is None:
            widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
            numeric = [bool(rows) and all(isinstance(row[i], int) for row in rows) for i in range(len(headers))]
            yield _table_line(headers, widths, numeric, indent)
        yield from (_table_line(row, widths, numeric, indent) for row in cells)


def _table_line(values: list[str], widths: list[int], numeric: list[bool], indent: str) -> str:
    padded = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
    return (indent + "  ".join(padded)).rstrip()


def print_json(value: Any, out: TextIO | None = None) -> None:
    """One JSON document (datetimes as RFC 3339), for scripts."""
    out = out or sys.stdout
    out.write(orjson.dumps(value, option=JSON_OPTIONS).decode() + "\n")


def print_json_array(items: Iterable[Any], out: TextIO | None = None) -> None:
    """A JSON array written item by item, laid out as print_json would: a long one is never held whole."""
    out = out or sys.stdout
    empty = True
    for item in items:
        text = orjson.dumps(item, option=JSON_OPTIONS).decode().replace("\n", "\n  ")
        out.write(("[\n  " if empty else ",\n  ") + text)
        empty = False
    out.write("[]\n" if empty else "\n]\n")


def indented_json(value: Any, indent: str) -> str:
    """A JSON document for a person to read, every line indented."""
    text = orjson.dumps(value, option=JSON_OPTIONS).decode()
    return "\n".join(indent + line for line in text.splitlines())


class Counter:
    """Rows done by an operator command, shown as `<verb> done/total` (progress.py: redrawn on a
    terminal only; an operator command prints its own summary at the end)."""

    def __init__(self, verb: str, total: int | None = None, stream: TextIO | None = None) -> None:
        self.verb, self.total, self.done = verb, total, 0
        self.display = Progress(self._describe, stream=stream)

    def _describe(self) -> str:
        return f"{self.verb} {self.done}" + (f"/{self.total}" if self.total is not None else "")

    def add(self, count: int) -> None:
        self.done += count
        self.display.step()

    def finish(self) -> None:
        self.display.finish()


def fail(message: str) -> None:
    print(f"reconciler: {message}", file=sys.stderr)


def database(config: Config, command: str) -> Database:
    """The connection of an operator command: its statements give up after STATEMENT_TIMEOUT_MS."""
    return Database(config.postgres.dsn, config.postgres.schema, f"reconciler {command}",
                    statement_timeout_ms=STATEMENT_TIMEOUT_MS)


def with_database(config: Config, command: str, action: Callable[[Database], int]) -> int:
    """Run `action` on a connection of its own: RET_CONNECT when Postgres cannot be reached, and a
    failed statement reported in a line (RET_FAILED) rather than as a traceback."""
    db = database(config, command)
    try:
        db.connect()
    except DatabaseError as exc:
        fail(str(exc))
        return errors.RET_CONNECT
    try:
        return action(db)
    except DatabaseError as exc:
        fail(f"{command} failed: {exc}")
        return RET_FAILED
    finally:
        db.close()
