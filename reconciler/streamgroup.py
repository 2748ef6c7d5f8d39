"""What Redis says about a consumer group, read in one place for the consumer, the refresher and
`reconciler status`.

Our clients keep redis-py's bytes replies (stream payloads are binary), so XINFO names arrive as
bytes; they are compared as text here.
"""

from __future__ import annotations

import redis


def text(value):
    """A reply field as text (None stays None): XINFO names and ids are ASCII in practice."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def group_info(client: redis.Redis, stream: str, group: str) -> dict | None:
    """The XINFO GROUPS entry of `group` on `stream` (fields as redis-py returns them), or None."""
    for info in client.xinfo_groups(stream):
        if text(info["name"]) == group:
            return info
    return None
