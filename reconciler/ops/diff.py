"""A change set as a diff a person can review (`reconciler deviations show`): each change's type and
object, then field by field what NetBox has and what the change writes.

- create: every field it sets;
- update: the fields whose value changes, `before → after`; the fields it writes unchanged are
  named on one line (an update carries every field the producer sent, not only the changed ones);
- noop: one line, the object exists and needs nothing.

A `new_object:` reference to an object created earlier in the same change set is shown as that
object (`new dcim.site "DC-West"`), not as the opaque ref. Colour only on a terminal (or when asked).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from ..changesets import with_refs

MARKS = {"create": "+", "update": "~", "noop": "="}
_RED, _GREEN, _YELLOW, _DIM, _BOLD, _RESET = "\033[31m", "\033[32m", "\033[33m", "\033[2m", "\033[1m", "\033[0m"
_HEADER_COLOURS = {"create": _GREEN, "update": _YELLOW, "noop": _DIM}


class NewObject(str):
    """How a reference to an object the change set creates is shown."""


@dataclass(frozen=True)
class FieldChange:
    field: str
    before: Any
    after: Any


def field_changes(change: dict, refs: dict[str, str]) -> tuple[list[FieldChange], list[str]]:
    """(the fields a change sets or changes, the fields it writes with the value they already have)."""
    data = change.get("data") or {}
    before = change.get("before") or {}
    kind = change.get("change_type")
    changed, unchanged = [], []
    for name in sorted(data):
        if name == "id":
            continue  # an update's own pk, which never changes
        after = with_refs(data[name], refs)
        if kind == "update" and name in before and before[name] == data[name]:
            unchanged.append(name)
        else:
            changed.append(FieldChange(name, before.get(name) if kind == "update" else None, after))
    return changed, unchanged


def created_refs(changes: list[dict]) -> dict[str, str]:
    """{new_object ref: how to show the object it creates}."""
    return {change["ref_id"]: NewObject(f"new {change.get('object_type')} "
                                        f"{_quoted(change.get('object_primary_value'))}")
            for change in changes
            if change.get("change_type") == "create" and isinstance(change.get("ref_id"), str)}


def as_json(changes: list[dict]) -> list[dict]:
    """The diff in --json form."""
    refs = created_refs(changes)
    diff = []
    for change in changes:
        changed, unchanged = field_changes(change, refs)
        diff.append({"change_type": change.get("change_type"), "object_type": change.get("object_type"),
                     "object_id": change.get("object_id"), "object": change.get("object_primary_value"),
                     "fields": [{"field": f.field, "before": f.before, "after": f.after} for f in changed],
                     "unchanged_fields": unchanged})
    return diff


def render(changes: list[dict], colour: bool) -> str:
    """The diff as text lines."""
    paint = _painter(colour)
    refs = created_refs(changes)
    lines = []
    for change in changes:
        kind = str(change.get("change_type"))
        target = " ".join(part for part in (str(change.get("object_type")), _object_id(change),
                                             _quoted(change.get("object_primary_value"))) if part)
        lines.append(paint(_HEADER_COLOURS.get(kind, _BOLD), f"{MARKS.get(kind, '?')} {kind} {target}"))
        if kind == "noop":
            continue
        changed, unchanged = field_changes(change, refs)
        for f in changed:
            if kind == "update":
                lines.append(f"    {f.field}: {paint(_RED, _value(f.before))} → {paint(_GREEN, _value(f.after))}")
            else:
                lines.append(f"    {f.field}: {paint(_GREEN, _value(f.after))}")
        if unchanged:
            lines.append(paint(_DIM, f"    (written unchanged: {', '.join(unchanged)})"))
    return "\n".join(lines)


def _painter(colour: bool):
    def paint(code: str, text: str) -> str:
        return f"{code}{text}{_RESET}" if colour else text
    return paint


def _object_id(change: dict) -> str:
    object_id = change.get("object_id")
    return f"#{object_id}" if object_id is not None else ""


def _quoted(value: Any) -> str:
    return "" if value in (None, "") else f'"{value}"'


def _value(value: Any) -> str:
    """A field's value in one line: JSON, except a reference to a new object, shown as that object."""
    if value is None:
        return "(none)"
    if isinstance(value, NewObject):
        return value
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
