"""The service's one policy for turning values into text fit to store, log or print.

- Redis replies and stream ids arrive as bytes (our clients keep binary payloads); `as_text` and
  `as_bytes` convert them, escaping what does not decode rather than failing.
- Postgres text and jsonb cannot hold U+0000, yet an entity, the plugin's echo of it or an
  exception's message may carry one: `without_nul` replaces it with U+FFFD everywhere, so what is
  stored still shows that something was there.
- Values for jsonb parameters (errors, warnings, audit details) go as JSON text through `json_text`.
- Error messages (libpq's span several lines, indented with tabs) go into one-line log fields,
  table cells and status reports through `one_line`.
- Durations and ages (how long an outage lasted, how old a row is) read at a glance through
  `human_seconds`.
"""

from __future__ import annotations

from typing import Any

import orjson


def as_text(value: Any) -> Any:
    """A reply field or stream field name as text (None and non-bytes values stay as they are); bytes
    that are not UTF-8 show as \\xNN escapes, so nothing read is silently lost."""
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value


def as_bytes(value: Any) -> bytes:
    """A stream id or reply field as bytes, whichever form the client returned it in."""
    return value if isinstance(value, bytes) else str(value).encode()


def without_nul(value: Any) -> Any:
    """`value` with U+0000 replaced by U+FFFD throughout (strings, and lists and dicts of them)."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, list):
        return [without_nul(item) for item in value]
    if isinstance(value, dict):
        return {without_nul(key): without_nul(item) for key, item in value.items()}
    return value


def one_line(message: str, width: int | None = None, max_lines: int | None = None) -> str:
    """`message` on one line: its non-blank lines (at most `max_lines`), each with runs of whitespace
    made one space, joined by " | "; cut to `width` characters with an ellipsis when given."""
    lines = [" ".join(line.split()) for line in message.splitlines() if line.strip()][:max_lines]
    line = " | ".join(lines)
    if width is not None and len(line) > width:
        return line[:width - 1] + "…"
    return line


def json_text(value: Any) -> str | None:
    """A value as JSON text for a jsonb parameter; None stays NULL."""
    return None if value is None else orjson.dumps(value).decode()


def human_seconds(seconds: float | None) -> str:
    """`42s`, `5m12s`, `3h04m`, `2d05h`: ages read at a glance."""
    if seconds is None:
        return "-"
    whole = max(0, int(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
