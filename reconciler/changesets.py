"""The shape of the plugin's change sets, as the worker relies on it: read by the pure decisions
(outcomes.py) and by the plugin client, which must not send an unreadable one to apply-change-set/.

A change set is `{"id", "branch": {"id", "name"} | None, "changes": [change, ...]}`; a change is
`{"change_type": "create"|"update"|"noop", "object_type", "object_primary_value", "object_id",
"ref_id", "object_version", "before", "data", "new_refs"}`, any of them possibly missing.
"""

from __future__ import annotations

from typing import Any


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
