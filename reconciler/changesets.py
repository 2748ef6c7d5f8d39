"""The shape of the plugin's change sets, as the worker relies on it: read by the pure decisions
(outcomes.py), by the plugin client, which must not send an unreadable one to apply-change-set/,
and by the review's apply (applier.py), which applies a reviewed plan only if a fresh one makes the
same changes.

A change set is `{"id", "branch": {"id", "name"} | None, "changes": [change, ...]}`; a change is
`{"change_type": "create"|"update"|"noop", "object_type", "object_primary_value", "object_id",
"ref_id", "object_version", "before", "data", "new_refs"}`, any of them possibly missing.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import orjson


def malformed_change_set(change_set: Any) -> str | None:
    """Why the plugin's change set cannot be read as one (None: it can)."""
    if not isinstance(change_set, dict):
        return f"the change set is {type(change_set).__name__}, not an object"
    changes = change_set.get("changes")
    if changes is not None and not isinstance(changes, list):
        return f"its changes are {type(changes).__name__}, not a list"
    if changes and not all(isinstance(change, dict) for change in changes):
        return "one of its changes is not an object"
    return None


def error_leaves(errors: Any, path: str = "") -> list[tuple[str, Any]]:
    """The plugin's error trees ({type: {field: [message]}}, lists nested at any depth) as
    (dotted path, message) pairs: `("dcim.site.name", "too long")`, `("__all__", "db_error")`."""
    if isinstance(errors, dict):
        return [leaf for key, value in errors.items()
                for leaf in error_leaves(value, f"{path}.{key}" if path else str(key))]
    if isinstance(errors, list):
        return [leaf for value in errors for leaf in error_leaves(value, path)]
    return [(path, errors)]


def has_changes(change_set: dict | None) -> bool:
    """A plan counts as changes unless it is empty or only noops (referenced objects that exist)."""
    changes = (change_set or {}).get("changes") or []
    return any(change.get("change_type") != "noop" for change in changes)


def same_changes(reviewed: list[dict], fresh: list[dict]) -> bool:
    """Whether a fresh plan makes the changes a reviewed one made. The plugin checks nothing at apply
    time (the last writer wins, a create that collides binds without storing its fields), so a
    reviewed plan is only applied when planning again now gives the same one: the same changes, each
    creating or updating the same object with the same data; an update also over the same values it
    replaces (its `before`, for the fields it writes: a field edited by hand since the review makes
    it stale, one it does not write does not). Noops compare by the object they name only.

    Change ids and `new_object:` refs are new on every plan, and the plugin orders the creates of one
    dependency level differently from plan to plan: so changes compare as a set, and a ref as the
    object it creates (its type and primary value). Two creates of one type and value in a plan keep
    their raw refs, which never compare equal: such a plan is judged stale rather than guessed at.
    The reviewed plan is read back from Postgres: both sides are compared in the form it stores them
    (a missing label is "", labels are cut to 255 characters, jsonb keeps 1.0 and 1 alike)."""
    return _comparable(reviewed) == _comparable(fresh)


def stored_label(value: Any, limit: int = 255) -> str:
    """A change's type or primary value as the `changes` table keeps it."""
    return str(value or "")[:limit]


def _comparable(changes: list[dict]) -> list[bytes]:
    created = {change["ref_id"]: f"new {stored_label(change.get('object_type'))} "
                                 f"{stored_label(change.get('object_primary_value'))}"
               for change in changes if change.get("change_type") == "create" and isinstance(change.get("ref_id"), str)}
    repeated = {label for label, n in Counter(created.values()).items() if n > 1}
    labels = {ref: label for ref, label in created.items() if label not in repeated}

    def by_label(value: Any) -> Any:
        return with_refs(value, labels, stored_numbers=True)

    comparable = []
    for change in changes:
        kind = change.get("change_type")
        target = [stored_label(kind, 50), stored_label(change.get("object_type")), change.get("object_id"),
                  by_label(change.get("ref_id"))]
        if kind != "noop":
            data = change.get("data") or {}
            before = change.get("before") or {}
            target += [by_label(data), sorted(str(path) for path in change.get("new_refs") or []),
                       by_label({key: before.get(key) for key in data}) if kind == "update" else None]
        comparable.append(orjson.dumps(target, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS))
    return sorted(comparable)


def with_refs(value: Any, refs: dict[str, Any], stored_numbers: bool = False) -> Any:
    """A change's value (data, before), every string that is one of `refs` replaced by what it maps to;
    with `stored_numbers`, a whole float as the int jsonb gives back for it."""
    if isinstance(value, str):
        return refs.get(value, value)
    if stored_numbers and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [with_refs(item, refs, stored_numbers) for item in value]
    if isinstance(value, dict):
        return {key: with_refs(item, refs, stored_numbers) for key, item in value.items()}
    return value


def dropped_fields(apply_warnings: list | None) -> list[dict]:
    """The warnings of an apply that say a create bound to an existing object without storing its
    fields: what was reviewed did not all land, and only a new plan can say what is left."""
    return [warning for warning in apply_warnings or [] if warning.get("fields")]
