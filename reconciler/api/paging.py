"""Page sizes and page tokens of the read API.

A token is opaque to clients (the Go reconciler's is an OFFSET, which skips or repeats rows while
rows arrive, and costs more the deeper it goes). Ours holds the id of the last row served: pages are
newest first, so the next page is the rows below it, found through the primary key at the same cost
on the last page as on the first, and a client walking every page sees each row that existed when it
began exactly once, however many arrive meanwhile. The token also carries a digest of the call's
filters: one reused with other filters is refused rather than silently mixing two listings.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
FIRST = 2 ** 63 - 1  # "below" of a first page: above any id
_FORMAT = ">B Q 8s"  # version, last id served, filters' digest
_VERSION = 1


class BadToken(ValueError):
    """A page token this service did not issue."""


class OtherFilters(BadToken):
    """A page token issued for other filters."""


def page_size(requested: int | None) -> int:
    """What a call asked for, 100 when it did not (or asked for 0 or less), at most 1,000."""
    if not requested or requested <= 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


def digest(*filters: object) -> bytes:
    return hashlib.sha256(repr(filters).encode()).digest()[:8]


def encode(last_id: int, filters_digest: bytes) -> str:
    return base64.urlsafe_b64encode(struct.pack(_FORMAT, _VERSION, last_id, filters_digest)).decode().rstrip("=")


def decode(token: str, filters_digest: bytes) -> int:
    """The id below which the page starts (FIRST for no token); BadToken when it cannot be ours."""
    if not token:
        return FIRST
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        version, last_id, issued_for = struct.unpack(_FORMAT, raw)
    except (binascii.Error, struct.error, ValueError):
        raise BadToken("page_token is not one this service issued: pass next_page_token unchanged") from None
    if version != _VERSION:
        raise BadToken("page_token is not one this service issued: pass next_page_token unchanged")
    if issued_for != filters_digest:
        raise OtherFilters("page_token was issued for other filters: repeat the first call's filters on every page")
    return last_id
