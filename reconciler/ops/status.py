"""`reconciler status`: the inbox, the drift checks, the stream, the plugin's default branch, the read
API and live processes.

Each section is read on its own and a section that cannot be read says what failed instead: a
status command is what an operator runs when something is down, so Redis, NetBox or a missing
table must not hide the rest. Only an unreachable Postgres makes the exit code non-zero
(errors.RET_CONNECT), since then the inbox, the service's state, is unknown.
"""

from __future__ import annotations

import argparse
import datetime
from typing import Any, Callable

import redis

from .. import dependencies, errors, processes, retention, states
from ..db import Database, latest_version
from ..errors import DatabaseError
from ..plugin import QUICK_PROBE_SECONDS, Unavailable, probe_client
from ..settings import Config
from ..streamgroup import group_info, redis_client
from ..text import as_text, one_line
from . import console

SOON_SECONDS = 60  # "PENDING_RETRY due soon": what the workers will pick up within a minute
REDIS_TIMEOUT_SECONDS = 5.0
POSTGRES_SECTIONS = ("schema", "inbox", "dead_letters", "drift", "retention", "dependencies", "processes")
LABEL_WIDTH = 22


def cmd_status(config: Config, args: argparse.Namespace) -> int:
    report, postgres_reachable = collect(config)
    if args.json:
        console.print_json(report)
    else:
        print(render(report))
    return errors.RET_OK if postgres_reachable else errors.RET_CONNECT


# --- collecting ---


def collect(config: Config) -> tuple[dict[str, Any], bool]:
    """The status report, one key per section, and whether Postgres could be reached."""
    report: dict[str, Any] = {"generated_at": datetime.datetime.now(datetime.timezone.utc)}
    db = console.database(config, "status")
    try:
        reachable = _postgres_sections(db, config, report)
    finally:
        db.close()
    report["stream"] = {"name": config.redis.stream, **_section(lambda: _stream(config), redis.RedisError, OSError)}
    report["default_branch"] = _default_branch(config)
    report["read_api"] = _read_api(config)
    return report, reachable


def _section(read: Callable[[], dict], *failures: type[BaseException]) -> dict:
    """A section's content, or {"error": what failed}."""
    try:
        return read()
    except failures as exc:
        return {"error": one_line(str(exc) or type(exc).__name__)}


def _postgres_sections(db: Database, config: Config, report: dict[str, Any]) -> bool:
    try:
        db.connect()
    except DatabaseError as exc:
        report["postgres"] = {"reachable": False, "error": one_line(str(exc))}
        report.update({name: {"error": report["postgres"]["error"]} for name in POSTGRES_SECTIONS})
        return False
    report["postgres"] = {"reachable": True}
    report["schema"] = _section(lambda: _schema(db, config), DatabaseError)
    report["inbox"] = _section(lambda: _inbox(db), DatabaseError)
    report["dead_letters"] = _section(lambda: _dead_letters(db), DatabaseError)
    report["drift"] = _section(lambda: _drift(db, config), DatabaseError)
    report["retention"] = _section(lambda: _retention(db, config), DatabaseError)
    report["dependencies"] = _section(lambda: _dependencies(db), DatabaseError)
    report["processes"] = _section(lambda: _processes(db, config), DatabaseError)
    return True


def _schema(db: Database, config: Config) -> dict:
    return {"name": config.postgres.schema, "version": db.schema_version(), "wanted": latest_version()}


def _inbox(db: Database) -> dict:
    counts = dict(db.fetchall("status_rows_per_state"))
    [(oldest,)] = db.fetchall("status_oldest_queued")
    [(in_flight, expired)] = db.fetchall("status_leases")
    [(retries, due)] = db.fetchall("status_retries", {"soon_seconds": SOON_SECONDS})
    return {"states": {name: counts.get(state, 0) for state, name in sorted(states.NAMES.items())},
            "total": sum(counts.values()), "oldest_queued_seconds": oldest,
            "in_flight": in_flight, "expired_leases": expired,
            "pending_retry": retries, "pending_retry_due_soon": due, "due_soon_seconds": SOON_SECONDS}


def _dead_letters(db: Database) -> dict:
    [(count, oldest, newest)] = db.fetchall("status_dead_letters")
    return {"count": count, "oldest": oldest, "newest": newest}


def _drift(db: Database, config: Config) -> dict:
    [(high_water, trusted_since, read_at, failing_since, failure_kind, failure, skipped, planned, checking,
      age)] = db.fetchall("status_drift")
    mode = config.drift.mode
    fallback = None
    if mode == "changes" and not config.netbox.api_token:  # then no drift-checks process runs
        fallback = "no [netbox] api_token is configured"
    elif mode == "changes" and failing_since is not None:
        fallback = f"the change log cannot be read since {failing_since:%Y-%m-%d %H:%M:%S UTC}: {failure}"
    return {"mode": mode, "max_age_hours": config.drift.max_age_hours,
            "fallback_to_always": fallback, "failure_kind": failure_kind if failing_since else None,
            "high_water": high_water,
            "high_water_age_seconds": age.total_seconds() if age is not None else None,
            "trusted_since": trusted_since, "last_read_at": read_at, "checking": checking,
            "last_hour": {"skipped": skipped, "planned": planned}}


def _retention(db: Database, config: Config) -> dict:
    pruned = {kind: (deleted, at) for kind, deleted, at in db.fetchall("status_retention")}
    storage = db.fetchall("status_storage")
    kinds = {kind.name: {"keep_days": retention.keep_days(config, kind), "deleted": pruned.get(kind.name, (0, None))[0],
                         "last_deleted_at": pruned.get(kind.name, (0, None))[1]} for kind in retention.KINDS}
    return {"kinds": kinds, "oldest_row": storage[0][0],
            "tables": {name: {"bytes": total, "index_bytes": indexes} for _, name, total, indexes in storage}}


def _dependencies(db: Database) -> dict:
    """Each replica's view of Postgres, Redis, the plugin and its token endpoint (dependencies.py)."""
    seen = [{"host": host, "dependency": dependency, "up": up, "since": since, "problem": problem, "kind": kind,
             "checked_seconds_ago": ago, "stale": ago > dependencies.STALE_SECONDS}
            for host, dependency, up, since, problem, kind, ago in db.fetchall("dependency_health")]
    return {"stale_after_seconds": dependencies.STALE_SECONDS, "seen": seen}


def _processes(db: Database, config: Config) -> dict:
    # A process that has not beaten for the supervisor's hang timeout is dead or about to be
    # killed as hung: beyond it a row says nothing about the present.
    within = config.supervisor.heartbeat_timeout_seconds
    live = [p._asdict() for p in processes.live_processes(db, within)]
    return {"within_seconds": within, "live": live}


def _stream(config: Config) -> dict:
    stream, group = config.redis.stream, config.redis.group
    client = redis_client(config.redis.url, "status", REDIS_TIMEOUT_SECONDS)
    try:
        if not client.exists(stream):
            return {"name": stream, "exists": False, "length": 0, "group": {"name": group, "exists": False}}
        return {"name": stream, "exists": True, "length": client.xlen(stream),
                "group": _group(group, group_info(client, stream, group))}
    finally:
        client.close()


def _group(name: str, info: dict | None) -> dict:
    if info is None:
        return {"name": name, "exists": False}
    # `lag` came with Redis 7.0, and even there is null when entries were deleted before the group
    # read them: None means unknown, never zero.
    return {"name": name, "exists": True, "lag": info.get("lag"), "pending": info["pending"],
            "consumers": info["consumers"], "last_delivered_id": as_text(info.get("last-delivered-id"))}


def _read_api(config: Config) -> dict:
    """Whether the read API of this host's configuration answers, as its health service says."""
    api = config.api
    if not api.listen:
        return {"listen": "", "serving": False}
    import grpc

    from ..api.server import health_of  # only here: the other sections need none of the API's modules
    try:
        health = health_of(api.listen)
    except grpc.RpcError as exc:
        return {"listen": api.listen, "auth": api.auth, "serving": False, "error": one_line(exc.details() or str(exc))}
    return {"listen": api.listen, "auth": api.auth, "serving": health == "SERVING", "health": health}


def _default_branch(config: Config) -> dict:
    """The plugin's answer, with one short attempt: the workers' retries are not the operator's."""
    netbox = config.netbox
    if not (netbox.token or netbox.token_url):
        return {"error": "no [netbox] token or token_url is configured"}
    try:
        client = probe_client(config, timeout=QUICK_PROBE_SECONDS)
        try:
            return {"branch": client.default_branch()}
        finally:
            client.pool.clear()
    except (Unavailable, OSError) as exc:
        return {"error": one_line(str(exc))}


# --- rendering ---


def render(report: dict[str, Any]) -> str:
    stamp = report["generated_at"].strftime("%Y-%m-%d %H:%M:%S UTC")
    if report["postgres"]["reachable"]:
        inbox, processes = _render_inbox(report), _render_processes(report["processes"])
    else:
        inbox = "\n".join(["Postgres inbox", _failed(report["postgres"])])
        processes = "\n".join(["Live processes", _line("unavailable:", "Postgres cannot be reached")])
    parts = [f"reconciler status at {stamp}", inbox, _render_drift(report["drift"], report["default_branch"]),
             _render_retention(report["retention"], report["generated_at"]), _render_stream(report["stream"]),
             _render_branch(report["default_branch"]), _render_read_api(report["read_api"]),
             _render_dependencies(report["dependencies"]), processes]
    return "\n\n".join(parts)


def _line(label: str, value: Any) -> str:
    return f"  {label:<{LABEL_WIDTH}}{value}"


def _failed(section: dict) -> str:
    return _line("unavailable:", section["error"])


def _render_schema(schema: dict) -> str:
    if "error" in schema:
        return f"schema unknown ({schema['error']})"
    if schema["version"] == schema["wanted"]:
        return f"schema {schema['name']}, version {schema['version']}"
    return (f"schema {schema['name']} at version {schema['version']}, this reconciler needs "
            f"{schema['wanted']}: run `reconciler migrate`")


def _render_inbox(report: dict[str, Any]) -> str:
    inbox, heading = report["inbox"], f"Postgres inbox ({_render_schema(report['schema'])})"
    if "error" in inbox:
        dead_letters = _render_dead_letters(report["dead_letters"], report["generated_at"])
        return "\n".join([heading, _failed(inbox), dead_letters])
    rows = [[name, count] for name, count in inbox["states"].items()] + [["total", inbox["total"]]]
    return "\n".join([
        heading, console.table(["state", "rows"], rows), "",
        _line("oldest QUEUED", console.human_seconds(inbox["oldest_queued_seconds"])),
        _line("in flight", f"{inbox['in_flight']} ({inbox['expired_leases']} with an expired lease)"),
        _line("PENDING_RETRY", f"{inbox['pending_retry']} ({inbox['pending_retry_due_soon']} due within "
                               f"{inbox['due_soon_seconds']}s)"),
        _render_dead_letters(report["dead_letters"], report["generated_at"])])


def _render_dead_letters(section: dict, now: datetime.datetime) -> str:
    if "error" in section:
        return _line("dead letters", f"unavailable: {section['error']}")
    if not section["count"]:
        return _line("dead letters", 0)
    newest = console.human_seconds((now - section["newest"]).total_seconds())
    return _line("dead letters", f"{section['count']} (newest {newest} ago; see `reconciler dead-letters list`)")


def _render_drift(section: dict, branch: dict) -> str:
    if "error" in section:
        return "\n".join(["Drift checks", _failed(section)])
    floor = f"{section['max_age_hours']:g} h" if section["max_age_hours"] > 0 else "none"
    lines = [f"Drift checks (mode {section['mode']}, max age {floor})"]
    fallback = section["fallback_to_always"]
    if not fallback and section["mode"] == "changes" and branch.get("branch"):
        fallback = f"plans go to branch {branch['branch']['name']}, whose changes are not in main's change log"
    if fallback:
        lines.append(_line("FALLBACK", f"every re-observation is planned again, as mode always: {fallback}"))
    if section["mode"] == "changes" and section["high_water"] is not None:
        age = console.human_seconds(section["high_water_age_seconds"])
        lines.append(_line("change log read up to", f"{section['high_water']:%Y-%m-%d %H:%M:%S UTC} ({age} ago)"))
    elif section["mode"] == "changes":
        lines.append(_line("change log read up to", "never read yet"))
    last_hour = section["last_hour"]
    lines.append(_line("last hour", f"{last_hour['skipped']} re-observations skipped, {last_hour['planned']} "
                                    f"planned again"))
    lines.append(_line("CHECKING", f"{section['checking']} waiting for the next read"))
    return "\n".join(lines)


def _render_retention(section: dict, now: datetime.datetime) -> str:
    if "error" in section:
        return "\n".join(["Retention", _failed(section)])
    lines = ["Retention (`reconciler prune --dry-run` shows what would go now)"]
    for kind in retention.KINDS:
        entry = section["kinds"][kind.name]
        kept = f"kept {entry['keep_days']:g} days" if entry["keep_days"] > 0 else "kept for ever"
        last = entry["last_deleted_at"]
        deleted = f"{entry['deleted']:,} deleted" + (
            f", last {console.human_seconds((now - last).total_seconds())} ago" if last else "")
        lines.append(_line(kind.what, f"{kept}; {deleted}"))
    oldest = section["oldest_row"]
    lines.append(_line("oldest row", f"{oldest.astimezone(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
                       if oldest else "-"))
    sizes = ", ".join(f"{name} {_size(table['bytes'])} ({_size(table['index_bytes'])} of it indexes)"
                      for name, table in section["tables"].items())
    lines.append(_line("on disk", sizes))
    return "\n".join(lines)


def _size(size: float) -> str:
    """`12.3 MB`: a table's size at a glance."""
    units = ("bytes", "kB", "MB", "GB", "TB")
    step = 0
    while size >= 1024 and step < len(units) - 1:
        size, step = size / 1024, step + 1
    return f"{size:.0f} bytes" if step == 0 else f"{size:.1f} {units[step]}"


def _render_stream(section: dict) -> str:
    if "error" in section:
        return "\n".join([f"Redis stream {section['name']}", _failed(section)])
    group = section["group"]
    if not group["exists"]:
        described = f"{group['name']}: does not exist yet (the consumer creates it)"
    else:
        lag = "unknown" if group["lag"] is None else group["lag"]
        described = f"{group['name']}: lag {lag}, pending {group['pending']}, consumers {group['consumers']}"
    return "\n".join([f"Redis stream {section['name']}", _line("length", section["length"]),
                      _line("consumer group", described)])


def _render_branch(section: dict) -> str:
    if "error" in section:
        value = f"unknown ({section['error']})"
    elif section["branch"] is None:
        value = "none (main)"
    else:
        value = f"{section['branch']['name']} ({section['branch']['id']})"
    return "\n".join(["NetBox plugin", _line("default branch", value)])


def _render_read_api(section: dict) -> str:
    heading = "Read API (diode.v1.ReconcilerService)"
    if not section["listen"]:
        return "\n".join([heading, "  off ([api] listen is empty)"])
    if "error" in section:
        value = f"not answering: {section['error']}"
    else:
        value = f"serving, auth {section['auth']}" if section["serving"] else f"answers {section['health']}"
    return "\n".join([heading, _line(section["listen"], value)])


def _render_dependencies(section: dict) -> str:
    heading = "Dependencies, as the service last saw them"
    if "error" in section:
        return "\n".join([heading, _failed(section)])
    if not section["seen"]:
        return "\n".join([heading, "  none reported (the service has not run with this schema yet)"])
    hosts = {entry["host"] for entry in section["seen"]}
    lines = [heading]
    for entry in section["seen"]:
        label = f"{entry['host']} {entry['dependency']}" if len(hosts) > 1 else entry["dependency"]
        since = entry["since"].timestamp()
        if entry["up"]:
            value = f"up since {dependencies.clock(since)}"
        else:
            value = dependencies.down_since(since, entry["problem"])
        if entry["stale"]:
            value += (f" (last confirmed {console.human_seconds(entry['checked_seconds_ago'])} ago: is the service "
                      f"running?)")
        lines.append(_line(label, value))
    return "\n".join(lines)


def _render_processes(section: dict) -> str:
    if "error" in section:
        return "\n".join(["Live processes", _failed(section)])
    heading = f"Live processes (heartbeat within {console.human_seconds(section['within_seconds'])})"
    if not section["live"]:
        return "\n".join([heading, "  none"])
    now = datetime.datetime.now(datetime.timezone.utc)
    rows = [[p["host"], p["pid"], p["role"], console.human_seconds((now - p["started_at"]).total_seconds()),
             f"{console.human_seconds(p['seconds_since_seen'])} ago"] for p in section["live"]]
    return "\n".join([heading, console.table(["host", "pid", "role", "up", "last seen"], rows)])
