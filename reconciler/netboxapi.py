"""NetBox's own REST API (not the plugin's): its change log, and the names of the devices, virtual
machines and sites the change log refers to by id. Read with `[netbox] api_token`; nothing here writes.

A read that fails raises ChangeLogUnreadable with a `kind`, which the drift checks log and store for
`reconciler status`: `no_token`, `unauthorized` (401), `forbidden` (403), `unreachable` (no answer),
`http_error` (any other status), `unreadable` (an answer or a record that is not what NetBox sends),
`clock` (NetBox's clock too far from Postgres', raised by the drift checks).
"""

from __future__ import annotations

import datetime
import email.utils
from typing import Any, Callable
from urllib.parse import urlencode

import orjson
import urllib3

from .errors import ReconcilerError
from .plugin import http_pool
from .settings import netbox_base_url, plugin_connect_seconds

PAGE_SIZE = 1000  # NetBox's default MAX_PAGE_SIZE
# Where the owners driftkeys.OWNER_FIELDS names are listed.
OWNER_ENDPOINTS = {"dcim.device": "dcim/devices", "virtualization.virtualmachine": "virtualization/virtual-machines",
                   "dcim.site": "dcim/sites"}
IDS_PER_LOOKUP = 100  # ids per name lookup: keeps the query string far below any URL limit


class ChangeLogUnreadable(ReconcilerError):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class NetBoxAPI:
    def __init__(self, netbox) -> None:
        """`netbox` is the [netbox] settings section."""
        self.token = netbox.api_token
        self.base = netbox_base_url(netbox) + "/api/" if self.token else ""
        self.timeout = urllib3.Timeout(connect=plugin_connect_seconds(netbox), read=netbox.timeout_seconds)
        self.pool = http_pool(netbox, size=1)

    def close(self) -> None:
        self.pool.clear()

    def changes_since(self, start: datetime.datetime | None, but_user: str,
                      progress: Callable[[], None] = lambda: None) -> tuple[list[dict], datetime.datetime]:
        """Every change made at or after `start` (None: all there are) by anyone but `but_user`, oldest
        first, and NetBox's clock when it answered the first page (its Date header, second precision,
        rounded down): nothing made before that time is missing from the list, except what was still
        committing. `progress` is called after each page."""
        query = {"user_name__n": but_user, "ordering": "id", "limit": PAGE_SIZE}
        if start is not None:
            query["time_after"] = start.isoformat()
        url: str | None = f"{self.base}core/object-changes/?{urlencode(query)}"
        records: list[dict] = []
        server_time: datetime.datetime | None = None
        while url:
            page, date = self._get(url)
            server_time = server_time or date
            records += page.get("results") or []
            progress()
            url = page.get("next")
        assert server_time is not None  # the first page's: the loop ran at least once
        return records, server_time

    def names(self, owner_type: str, ids: set[int]) -> dict[int, str]:
        """{id: name} of the devices, virtual machines or sites with these ids that exist and can be read."""
        names: dict[int, str] = {}
        ordered = sorted(ids)
        for first in range(0, len(ordered), IDS_PER_LOOKUP):
            chunk = ordered[first:first + IDS_PER_LOOKUP]
            query = urlencode([("id", i) for i in chunk] + [("brief", "true"), ("limit", len(chunk))])
            page, _ = self._get(f"{self.base}{OWNER_ENDPOINTS[owner_type]}/?{query}")
            names.update({row["id"]: row.get("name") for row in page.get("results") or [] if "id" in row})
        return names

    def _get(self, url: str) -> tuple[dict[str, Any], datetime.datetime]:
        if not self.token:
            raise ChangeLogUnreadable("no_token", "no [netbox] api_token is configured")
        try:
            response = self.pool.request("GET", url, timeout=self.timeout, retries=False, headers={
                "Authorization": f"Token {self.token}", "Accept": "application/json"})
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ChangeLogUnreadable("unreachable", f"no answer from NetBox at {_where(url)}: {exc}") from exc
        if response.status != 200:
            kind = {401: "unauthorized", 403: "forbidden"}.get(response.status, "http_error")
            detail = " ".join(response.data[:200].decode("utf-8", "replace").split())
            raise ChangeLogUnreadable(kind, f"NetBox answered {response.status} to GET {_where(url)}: {detail}")
        try:
            page = orjson.loads(response.data)
        except orjson.JSONDecodeError as exc:
            raise ChangeLogUnreadable("unreadable", f"NetBox's answer to GET {_where(url)} is not JSON: {exc}") from exc
        if not isinstance(page, dict):
            raise ChangeLogUnreadable("unreadable", f"NetBox's answer to GET {_where(url)} is not a JSON object")
        return page, _server_time(response.headers.get("Date"))


def _where(url: str) -> str:
    return url.split("?", 1)[0]


def _server_time(header: str | None) -> datetime.datetime:
    """NetBox's clock from the Date header; ours when it has none (the clock margin covers the difference)."""
    if header:
        try:
            return email.utils.parsedate_to_datetime(header).astimezone(datetime.timezone.utc)
        except (TypeError, ValueError):
            pass
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
