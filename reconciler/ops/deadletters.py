"""`reconciler dead-letters list | show | replay | purge`.

A dead letter (migration 0001, inbox.py, streamentry.py) keeps what could not become a row as stream
fields, byte for byte: the whole stream entry, or for an entity-level letter a replayable entry of
just that entity (its request's fields around it). It does not keep rows.

Replay therefore re-injects the fields with XADD into the configured stream, and the consumer takes
them through its normal path (decode, dedup against the current rows, receipts, and a new dead
letter for whatever is still bad) rather than this command writing rows itself: only that path
turns fields into rows correctly. A letter is locked, its fields XADDed, and it is deleted in the
same transaction, after the XADD succeeded, so no path loses anything:
- XADD fails: the transaction rolls back, the letter stays.
- the commit fails after the XADD: the letter stays although its entry was replayed; replaying it
  again only adds another observation of the same entities, which dedup absorbs (duplicate_count).
- the entry is still bad: the consumer stores it as a new dead letter (a new stream id).
dead_letters.replayed_at stays unused: a letter whose entry fails again comes back as a new letter,
so a kept and marked copy would only be a second record of the same input.
Letters go in chunks of at most CHUNK_LETTERS letters and CHUNK_BYTES bytes (a letter may hold a
16 MiB request), each chunk one short transaction, so a replay or purge of everything neither holds
one long transaction nor loads every payload at once.
"""

from __future__ import annotations

import argparse
import datetime
from dataclasses import dataclass, field
from typing import Any, Iterator

import redis

from .. import errors, streamentry
from ..db import Database
from ..errors import DatabaseError
from ..settings import Config
from ..streamgroup import redis_client
from ..text import as_text, one_line
from . import console
from .show import entity_json, hex_preview

PAGE = 1000  # ids (no payloads) read per page of a selection
CHUNK_LETTERS = 100
CHUNK_BYTES = 32 * 1024 * 1024
REASON_WIDTH = 70
LISTED_IN_DRY_RUN = 20
REDIS_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class Selector:
    """Dead letters an operator named: ids (None: all), optionally only those older than some seconds."""

    ids: list[int] | None = None
    older_than: float | None = None


@dataclass
class Tally:
    """What a replay or purge did (or would do)."""

    done: list[int] = field(default_factory=list)
    size: int = 0
    new_stream_ids: list[str] = field(default_factory=list)
    skipped_locked: list[int] = field(default_factory=list)  # held by a concurrent replay or purge
    not_found: list[int] = field(default_factory=list)


# --- reading ---


def list_letters(db: Database, limit: int | None) -> tuple[int, list[dict[str, Any]]]:
    """(how many there are, the first `limit` of them, oldest first; None: all)."""
    [(count, _, _)] = db.fetchall("status_dead_letters")
    rows = db.fetchall("list_dead_letters", {"limit": limit})
    keys = ("id", "stream_id", "entity_index", "reason", "created_at", "size")
    return count, [dict(zip(keys, row)) for row in rows]


def get_letter(db: Database, letter_id: int, limits: streamentry.Limits) -> dict[str, Any] | None:
    """One dead letter with its fields described and its payload decoded; None if absent."""
    found = db.fetchall("get_dead_letter", {"id": letter_id})
    if not found:
        return None
    *meta, names, values = found[0]
    letter = dict(zip(("id", "stream", "stream_id", "entity_index", "reason", "created_at", "replayed_at"), meta))
    fields = {bytes(name): bytes(value) for name, value in zip(names, values)}
    letter["fields"] = {as_text(name): _field_view(value) for name, value in fields.items()}
    letter["payload"] = decode_payload(fields, limits)
    return letter


def _field_view(value: bytes) -> Any:
    """Short printable fields (ingestion_ts, encoding) as text; payloads by their size."""
    if len(value) <= 200:
        try:
            text = value.decode("utf-8")
            if text.isprintable():
                return text
        except UnicodeDecodeError:
            pass
    return {"size": len(value)}


def decode_payload(fields: dict[bytes, bytes], limits: streamentry.Limits) -> dict[str, Any]:
    """The request as the consumer would decode it today: its fields and each entity as protojson,
    or why an entity (or the whole entry) cannot become a row, with the bytes in hex."""
    message = streamentry.decode_entry(b"0-0", fields, limits)
    whole = [rejection for rejection in message.rejections if rejection.index is None]
    if whole:
        return {"decodable": False, "error": whole[0].reason, "request": hex_preview(fields.get(b"request", b""))}
    entities = [{"index": row.index, "object_type": row.object_type, "entity": entity_json(row.entity)}
                for row in message.rows]
    entities += [{"index": rejection.index, "error": rejection.reason,
                  "entity": hex_preview(_rejected_entity(rejection))} for rejection in message.rejections]
    return {"decodable": True, "request": {
        "id": message.request_id, "producer_app_name": message.producer_app_name,
        "producer_app_version": message.producer_app_version, "sdk_name": message.sdk_name,
        "sdk_version": message.sdk_version, "ingestion_ts": message.ingestion_ts},
        "accepted_entities": len(message.rows), "rejected_entities": len(message.rejections),
        "entities": sorted(entities, key=lambda entity: entity["index"])}


def _rejected_entity(rejection: streamentry.Rejection) -> bytes:
    """The entity's own bytes (its rejection's replayable entry wraps them in the request's fields)."""
    _, entities = streamentry.split_request(rejection.fields[b"request"])
    return entities[0] if entities else b""


# --- selecting, replaying, purging ---


def pages(db: Database, selector: Selector) -> Iterator[list[tuple[int, int]]]:
    """Pages of (id, size) of the selected letters that exist now, in id order; each page read in its
    own transaction."""
    after = 0
    [(upto,)] = db.fetchall("newest_dead_letter")
    while True:
        page = db.fetchall("select_dead_letters", {"after": after, "upto": upto, "ids": selector.ids,
                                                            "older_than": selector.older_than, "limit": PAGE})
        if not page:
            return
        yield page
        after = page[-1][0]


def chunks(page: list[tuple[int, int]]) -> Iterator[list[int]]:
    """Ids of a page in chunks of at most CHUNK_LETTERS letters and CHUNK_BYTES bytes (at least one)."""
    chunk: list[int] = []
    size = 0
    for letter_id, letter_size in page:
        if chunk and (len(chunk) >= CHUNK_LETTERS or size + letter_size > CHUNK_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(letter_id)
        size += letter_size
    if chunk:
        yield chunk


def preview(db: Database, selector: Selector) -> Tally:
    """What a replay or purge of the selection would touch; changes nothing."""
    tally = Tally()
    for page in pages(db, selector):
        tally.done += [letter_id for letter_id, _ in page]
        tally.size += sum(size for _, size in page)
    _note_missing(tally, selector)
    return tally


def _note_missing(tally: Tally, selector: Selector) -> None:
    if selector.ids is not None:
        seen = set(tally.done) | set(tally.skipped_locked)
        tally.not_found = [letter_id for letter_id in selector.ids if letter_id not in seen]


def replay(db: Database, client: redis.Redis, stream: str, selector: Selector,
           progress: console.Counter | None = None) -> Tally:
    """XADD the selected letters' fields to `stream` and delete them (see the module docstring)."""
    tally = Tally()
    for page in pages(db, selector):
        sizes = dict(page)
        for chunk in chunks(page):
            replayed = _replay_chunk(db, client, stream, chunk)
            tally.done += [letter_id for letter_id, _ in replayed]
            tally.new_stream_ids += [entry_id for _, entry_id in replayed]
            tally.size += sum(sizes[letter_id] for letter_id, _ in replayed)
            tally.skipped_locked += sorted(set(chunk) - {letter_id for letter_id, _ in replayed})
            if progress is not None:
                progress.add(len(replayed))
    _note_missing(tally, selector)
    return tally


def _replay_chunk(db: Database, client: redis.Redis, stream: str, ids: list[int]) -> list[tuple[int, str]]:
    """[(letter id, new stream id)] of the letters of `ids` this call replayed and deleted."""
    added: list[str] = []
    try:
        with db.transaction() as tx:
            letters = tx.fetchall("lock_dead_letters", {"ids": ids})
            if not letters:
                return []
            added = _xadd(client, stream, letters)
            tx.execute("delete_dead_letters", {"ids": [letter_id for letter_id, _, _ in letters]})
    except DatabaseError as exc:
        if added:
            raise DatabaseError(f"{exc}; dead letters {[row[0] for row in letters]} were replayed but not deleted "
                                f"(replaying them again is harmless: dedup absorbs the repeat)") from exc
        raise
    return [(letter_id, entry_id) for (letter_id, _, _), entry_id in zip(letters, added)]


def _xadd(client: redis.Redis, stream: str, letters: list[tuple]) -> list[str]:
    # MULTI/EXEC: a chunk's entries are added together; a failure raises before any letter is deleted.
    with client.pipeline(transaction=True) as pipe:
        for _, names, values in letters:
            pipe.xadd(stream, {bytes(name): bytes(value) for name, value in zip(names, values)})
        return [as_text(entry_id) for entry_id in pipe.execute()]


def purge(db: Database, selector: Selector, progress: console.Counter | None = None) -> Tally:
    """Delete the selected letters, a page per transaction."""
    tally = Tally()
    for page in pages(db, selector):
        with db.transaction() as tx:
            deleted = [row[0] for row in tx.fetchall("delete_dead_letters", {"ids": [i for i, _ in page]})]
        sizes = dict(page)
        tally.done += deleted
        tally.size += sum(sizes[letter_id] for letter_id in deleted)
        if progress is not None:
            progress.add(len(deleted))
    _note_missing(tally, selector)
    return tally


# --- the commands ---


def cmd_list(config: Config, args: argparse.Namespace) -> int:
    return console.with_database(config, "dead-letters list", lambda db: _list(db, args))


def _list(db: Database, args: argparse.Namespace) -> int:
    count, letters = list_letters(db, args.limit or None)
    if args.json:
        console.print_json({"count": count, "dead_letters": letters})
        return errors.RET_OK
    if not letters:
        print("no dead letters")
        return errors.RET_OK
    rows = [[letter["id"], letter["stream_id"], "-" if letter["entity_index"] is None else letter["entity_index"],
             _utc(letter["created_at"]), letter["size"], one_line(letter["reason"], REASON_WIDTH)]
            for letter in letters]
    print(console.table(["id", "stream id", "entity", "time", "size", "reason"], rows))
    if count > len(letters):
        print(f"({len(letters)} of {count} shown; --limit 0 for all)")
    return errors.RET_OK


def _utc(moment: datetime.datetime) -> str:
    return f"{moment.astimezone(datetime.timezone.utc):%Y-%m-%d %H:%M:%S} UTC"


def cmd_show(config: Config, args: argparse.Namespace) -> int:
    return console.with_database(config, "dead-letters show", lambda db: _show(db, config, args))


def _show(db: Database, config: Config, args: argparse.Namespace) -> int:
    letter = get_letter(db, args.id, streamentry.Limits.of(config.redis))
    if letter is None:
        console.fail(f"no dead letter with id {args.id}")
        return console.RET_FAILED
    if args.json:
        console.print_json(letter)
        return errors.RET_OK
    entity = "the whole stream entry" if letter["entity_index"] is None else f"entity {letter['entity_index']}"
    print(f"dead letter {letter['id']}: {entity} of stream entry {letter['stream_id']} ({letter['stream']}), "
          f"{_utc(letter['created_at'])}")
    print(f"reason: {letter['reason']}")
    print("fields: " + ", ".join(f"{name}={value if isinstance(value, str) else str(value['size']) + ' bytes'}"
                                 for name, value in letter["fields"].items()))
    print("payload (as the consumer would decode it now):")
    console.print_json(letter["payload"])
    return errors.RET_OK


def selector_from(args: argparse.Namespace) -> Selector | None:
    """The letters named on the command line; None when none were (an explicit choice is required)."""
    if args.ids and args.all:
        return None
    if args.ids:
        return Selector(sorted(set(args.ids)), getattr(args, "older_than", None))
    if args.all or getattr(args, "older_than", None) is not None:
        return Selector(None, getattr(args, "older_than", None))
    return None


def cmd_replay(config: Config, args: argparse.Namespace) -> int:
    return _with_selector(config, args, "replay", _replay)


def cmd_purge(config: Config, args: argparse.Namespace) -> int:
    return _with_selector(config, args, "purge", _purge)


def _with_selector(config: Config, args: argparse.Namespace, verb: str, action) -> int:
    selector = selector_from(args)
    if selector is None:
        options = "IDs, --all or --older-than" if verb == "purge" else "IDs or --all"
        console.fail(f"dead-letters {verb}: name the dead letters: {options} (one of them)")
        return errors.RET_CONFIG
    return console.with_database(config, f"dead-letters {verb}", lambda db: action(db, config, args, selector))


def _replay(db: Database, config: Config, args: argparse.Namespace, selector: Selector) -> int:
    if args.dry_run:
        _report(args, "replay", preview(db, selector), dry_run=True, stream=config.redis.stream)
        return errors.RET_OK
    client = redis_client(config.redis.url, "replay", REDIS_TIMEOUT_SECONDS)
    progress = console.Counter("replayed", len(selector.ids) if selector.ids else None)
    try:
        tally = replay(db, client, config.redis.stream, selector, progress)
    except (redis.RedisError, OSError) as exc:
        progress.finish()
        console.fail(f"replay stopped, Redis failed: {exc}; {progress.done} dead letters were replayed and deleted "
                     f"before, the others are untouched")
        return errors.RET_CONNECT
    finally:
        progress.finish()
        client.close()
    _report(args, "replay", tally, dry_run=False, stream=config.redis.stream)
    return errors.RET_OK if not tally.not_found else console.RET_FAILED


def _purge(db: Database, config: Config, args: argparse.Namespace, selector: Selector) -> int:
    if args.dry_run:
        _report(args, "purge", preview(db, selector), dry_run=True)
        return errors.RET_OK
    progress = console.Counter("purged", len(selector.ids) if selector.ids else None)
    try:
        tally = purge(db, selector, progress)
    finally:
        progress.finish()
    _report(args, "purge", tally, dry_run=False)
    return errors.RET_OK if not tally.not_found else console.RET_FAILED


_DONE = {"replay": "replayed", "purge": "purged"}


def _report(args: argparse.Namespace, verb: str, tally: Tally, dry_run: bool, stream: str | None = None) -> None:
    if args.json:
        console.print_json({"dry_run": dry_run, "action": verb, "ids": tally.done, "count": len(tally.done),
                            "bytes": tally.size, "stream": stream, "new_stream_ids": tally.new_stream_ids,
                            "skipped_locked": tally.skipped_locked, "not_found": tally.not_found})
        return
    count = len(tally.done)
    into = f" into {stream}" if stream else ""
    if dry_run:
        shown = ", ".join(str(i) for i in tally.done[:LISTED_IN_DRY_RUN]) + (", …" if count > LISTED_IN_DRY_RUN else "")
        print(f"dry run: would {verb} {count} dead letters ({tally.size} bytes){into}; nothing changed"
              + (f": {shown}" if count else ""))
    else:
        deleted = " and deleted them" if verb == "replay" else ""
        print(f"{_DONE[verb]} {count} dead letters ({tally.size} bytes){into}{deleted}")
        if tally.new_stream_ids:
            print(f"new stream entries: {tally.new_stream_ids[0]} .. {tally.new_stream_ids[-1]}")
    if tally.skipped_locked:
        print(f"skipped {len(tally.skipped_locked)} dead letters another replay or purge holds: "
              f"{tally.skipped_locked[:LISTED_IN_DRY_RUN]}")
    if tally.not_found:
        print(f"not found: {', '.join(str(i) for i in tally.not_found)}")
