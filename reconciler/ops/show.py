"""`reconciler show ID`: one ingestion_logs row as JSON, its entity as protojson, with its change sets.

The inbox stores entities as the protobuf bytes the client sent (migration 0001), which no operator
can read; this is the JSON view of them, the form the plugin receives.
"""

from __future__ import annotations

import argparse
from typing import Any

from google.protobuf.message import DecodeError
from netboxlabs.diode.sdk.diode.v1 import ingester_pb2 as pb

from .. import errors, protojson, states
from ..db import Database
from ..settings import Config
from . import console

HEX_PREVIEW_BYTES = 256


def hex_preview(data: bytes) -> dict[str, Any]:
    """Bytes that do not decode: their size and the first HEX_PREVIEW_BYTES as hex."""
    return {"size": len(data), "hex": data[:HEX_PREVIEW_BYTES].hex(),
            "hex_truncated": len(data) > HEX_PREVIEW_BYTES}


def entity_json(data: bytes) -> dict[str, Any]:
    """A diode.v1.Entity as protojson with proto field names, or why it does not parse and its bytes."""
    try:
        return protojson.to_dict(pb.Entity.FromString(data))
    except (DecodeError, UnicodeDecodeError, RecursionError) as exc:
        return {"undecodable": f"not a valid diode.v1.Entity: {exc}", **hex_preview(data)}


def row_view(db: Database, row_id: int) -> dict[str, Any] | None:
    """The row, its entity and its change sets (oldest first, with their changes); None if absent."""
    found = db.fetchall("get_ingestion_log", {"id": row_id})
    if not found:
        return None
    entity, entity_hash, columns = found[0]
    view: dict[str, Any] = {}
    for name, value in columns.items():
        if name == "entity":
            continue  # bytea as JSON is hex of protobuf: replaced by its protojson below
        view[name] = entity_hash if name == "entity_hash" else value
        if name in ("state", "requeued_from_state"):
            view[f"{name}_name"] = states.NAMES.get(value)
    view["entity"] = entity_json(bytes(entity))
    view["change_sets"] = [{**change_set, "changes": changes} for change_set, changes
                           in db.fetchall("change_sets_of_row", {"id": row_id})]
    return view


def cmd_show(config: Config, args: argparse.Namespace) -> int:
    return console.with_database(config, "show", lambda db: _show(db, args.id))


def _show(db: Database, row_id: int) -> int:
    view = row_view(db, row_id)
    if view is None:
        console.fail(f"no ingestion log row with id {row_id}")
        return console.RET_FAILED
    console.print_json(view)
    return errors.RET_OK
