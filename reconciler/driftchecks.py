"""The drift-checks role: which unchanged re-observations NetBox needs to see again.

An APPLIED or NO_CHANGES entity seen again unchanged is worth a plan only if NetBox changed under it
since its last plan (someone edited or deleted an object it names by hand). With `[drift] mode`
changes or never, the consumer parks such rows in CHECKING (inbox.write) and this role settles them,
every `[drift] poll_seconds`:

1. mode changes: read NetBox's change log from the high-water mark on (netboxapi.py), keep the keys
   of every change made by anyone but the plugin's user (driftkeys.py), and move the mark to NetBox's
   clock at the start of the read;
2. give each CHECKING row its keys once (from its entity);
3. settle the CHECKING rows seen before the mark (less `[drift] clock_margin_seconds`): back to their
   state, or to QUEUED to be planned again when a kept change met one of their keys since their last
   plan, or their last plan is older than `[drift] max_age_hours`. A row seen after the mark waits
   for the next read: an edit made a second before the re-send is in the change log by then.

When the change log cannot be read (401/403, NetBox down), every CHECKING row is planned again, as
in mode always, and the role says so: a log line when it starts and when it ends, `reconciler
status`, the reconciler_drift_fallback gauge. Without `[netbox] api_token`, or in mode always, the
consumer requeues re-observations itself and this role does not run; the consumer says so at boot
and sends to QUEUED whatever an earlier configuration left in CHECKING (release_checking).
"""

from __future__ import annotations

import datetime
import logging
import time
from collections import defaultdict

from netboxlabs.diode.sdk.diode.v1 import ingester_pb2 as pb

from . import driftkeys, metrics
from .db import Database
from .errors import DatabaseError
from .netboxapi import OWNER_ENDPOINTS, ChangeLogUnreadable, NetBoxAPI
from .roles import Role

log = logging.getLogger(__name__)

SETTLE_BATCH = 5000  # CHECKING rows settled per statement
KEYS_BATCH = 1000  # CHECKING rows given their keys per round trip
PRUNE_INTERVAL = 600.0
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def holds_reobservations(config) -> bool:
    """Whether the consumer parks unchanged re-observations in CHECKING for this role (else it requeues
    them, as mode always)."""
    mode = config.drift.mode
    return mode == "never" or (mode == "changes" and bool(config.netbox.api_token))


def release_checking(db: Database) -> int:
    """Send every CHECKING row to QUEUED, to be planned: what a consumer that does not park
    re-observations does at boot with those an earlier configuration parked, so that none waits for a
    drift-checks process that no longer runs. Returns how many."""
    return sum(settle(db, {"seen_before": None, "trusted_since": EPOCH, "margin": 0.0, "max_age": 0.0,
                           "match": False, "replan_all": True, "limit": SETTLE_BATCH}))


def settle(db: Database, params: dict, role: Role | None = None) -> tuple[int, int]:
    """settle_checks in batches until none is left; (skipped, planned). Each batch is tallied for
    `reconciler status`; a role's stop ends the loop, its heartbeat is kept."""
    skipped = planned = 0
    while role is None or not role.stopping:
        with db.transaction() as tx:
            replans = [replan for replan, in tx.fetchall("settle_checks", params)]
            batch_planned = sum(replans)
            if replans:
                tx.execute("tally_checks", {"skipped": len(replans) - batch_planned, "planned": batch_planned})
        skipped += len(replans) - batch_planned
        planned += batch_planned
        if role is not None:
            role.beat()  # a large backlog takes many batches; each is progress
        if len(replans) < SETTLE_BATCH:
            break
    return skipped, planned


class DriftChecks(Role):
    name = "drift-checks"
    db: Database  # boot() opens it (Role.open_database)

    def __init__(self, config) -> None:
        super().__init__(config)
        self.api: NetBoxAPI | None = None
        self.failing: str | None = None  # why the change log cannot be read, while it cannot
        self._next_poll = 0.0
        self._next_prune = 0.0

    def boot(self) -> None:
        self.open_database()
        self.db.check_schema()
        if self.config.drift.mode == "changes":
            self.api = self.closes(NetBoxAPI(self.config.netbox))
        log.info("drift checks: mode %s, max age %g h", self.config.drift.mode, self.config.drift.max_age_hours)

    def run_once(self) -> None:
        if time.monotonic() >= self._next_poll:
            self._next_poll = time.monotonic() + self.config.drift.poll_seconds
            try:
                self.check_once()
            except DatabaseError as exc:
                log.warning("drift checks skipped this round, Postgres: %s", exc)
        self.pause(min(1.0, max(0.0, self._next_poll - time.monotonic())))

    def check_once(self) -> tuple[int, int]:
        """One round: read the change log (mode changes), settle what can be. (skipped, planned)."""
        high_water = None
        if self.config.drift.mode == "changes":
            high_water = self._read_change_log()
            self._give_keys()
        settled = self._settle(high_water)
        if time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + PRUNE_INTERVAL
            self._prune()
        return settled

    # --- the change log ---

    def _read_change_log(self) -> datetime.datetime | None:
        """Read what is new in the change log; the high-water mark, or None while it cannot be read."""
        drift = self.config.drift
        [(high_water, _, postgres_now)] = self.db.fetchall("change_log_progress")
        read_from, restarted = self._read_from(high_water)
        assert self.api is not None  # mode changes, for which boot() opened it
        try:
            records, server_time = self.api.changes_since(read_from, drift.plugin_user, progress=self.beat)
            self._check_clock(server_time, postgres_now)
            rows = self._keys_of(records)
        except ChangeLogUnreadable as exc:
            self._failed(exc)
            return None
        new: set[int] = set()
        with self.db.transaction() as tx:
            if rows:
                keys, changed_at, change_ids = zip(*rows)
                new = {change_id for change_id, in tx.fetchall("store_netbox_changes", {
                    "keys": list(keys), "changed_at": list(changed_at), "change_ids": list(change_ids)})}
            [(high_water, _)] = tx.fetchall("change_log_read", {
                "high_water": server_time, "restarted": restarted, "read_from": read_from or EPOCH})
        self._recovered()
        metrics.change_log_read(len(new), high_water.timestamp())
        if new:  # each read starts clock_margin_seconds before the last one ended: only the new ones
            log.info("change log: %d new changes by others than %s", len(new), drift.plugin_user)
        return high_water

    def _check_clock(self, server_time: datetime.datetime, postgres_now: datetime.datetime) -> None:
        """NetBox's clock is compared with Postgres' (the rows' times): beyond the margin, changes could
        be judged against the wrong plans, and a clock ahead would carry the high-water mark past
        changes not yet read. (Postgres' now() was taken before the read: NetBox's may be later by as
        long as the read took, never earlier.)"""
        margin = self.config.drift.clock_margin_seconds
        ahead = (server_time - postgres_now).total_seconds()
        if ahead < -margin - 1 or ahead > margin + (datetime.datetime.now(datetime.timezone.utc)
                                                     - postgres_now).total_seconds() + 1:
            raise ChangeLogUnreadable("clock", f"NetBox's clock ({server_time.isoformat()}) is {ahead:+.0f} s from "
                                               f"Postgres' ({postgres_now.isoformat()}), more than [drift] "
                                               f"clock_margin_seconds ({margin:g})")

    def _read_from(self, high_water: datetime.datetime | None) -> tuple[datetime.datetime | None, bool]:
        """Where this read starts, and whether it cannot continue the last one (its first read, or one
        further back than max_age: rows planned before then are planned again by max_age anyway)."""
        drift = self.config.drift
        margin = datetime.timedelta(seconds=drift.clock_margin_seconds)
        floor = None
        if drift.max_age_hours > 0:
            floor = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=drift.max_age_hours)
        if high_water is None:
            return floor, True
        start = high_water - margin
        if floor is not None and start < floor:
            log.warning("the change log was last read up to %s, longer ago than [drift] max_age_hours: reading "
                        "it from %s on; rows planned before then are planned again", high_water.isoformat(),
                        floor.isoformat())
            return floor, True
        return start, False

    def _keys_of(self, records: list[dict]) -> list[tuple[str, datetime.datetime, int]]:
        owner_names: dict[tuple[str, int], set[str]] = defaultdict(set)
        for owner_type, owner_id, name in driftkeys.owner_names_in(records):
            owner_names[(owner_type, owner_id)].add(name)
        self._look_up_owners(records, owner_names)
        rows = []
        for record in records:
            try:
                changed_at = datetime.datetime.fromisoformat(record["time"])
                change_id = int(record["id"])
                keys = driftkeys.change_keys(record, owner_names)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                # One change we cannot judge, and the high-water mark would move past it: read nothing.
                raise ChangeLogUnreadable("unreadable", f"a change-log record NetBox returned cannot be read "
                                                        f"({exc!r}): {str(record)[:300]}") from exc
            rows += [(key, changed_at, change_id) for key in keys]
        return rows

    def _look_up_owners(self, records: list[dict], owner_names: dict[tuple[str, int], set[str]]) -> None:
        """Names of the owners (devices, VMs, sites) of the changed objects. Without read access to them, a
        change meets every object of its type and name: coarser, never wrong."""
        wanted = defaultdict(set)
        for record in records:
            for owner_type, owner_id in driftkeys.owner_ids(record):
                if (owner_type, owner_id) not in owner_names:
                    wanted[owner_type].add(owner_id)
        assert self.api is not None  # mode changes, for which boot() opened it
        for owner_type, ids in wanted.items():
            try:
                for owner_id, name in self.api.names(owner_type, ids).items():
                    owner_names[(owner_type, owner_id)].add(name)
            except ChangeLogUnreadable as exc:
                log.info("cannot read the names of %s (%s): a change to what they own re-plans everything "
                         "of its type and name", OWNER_ENDPOINTS[owner_type], exc)

    def _failed(self, exc: ChangeLogUnreadable) -> None:
        with self.db.transaction() as tx:
            tx.execute("change_log_failed", {"kind": exc.kind, "failure": str(exc)})
        if self.failing is None:
            log.error("cannot read NetBox's change log (%s): %s. Until it can be read, every unchanged "
                      "re-observation is planned again, as in [drift] mode always", exc.kind, exc)
        self.failing = exc.kind
        metrics.drift_fallback(True)

    def _recovered(self) -> None:
        if self.failing is not None:
            log.warning("NetBox's change log can be read again: unchanged re-observations are planned only "
                        "when NetBox changed under them")
        self.failing = None
        metrics.drift_fallback(False)

    # --- CHECKING rows ---

    def _give_keys(self) -> None:
        """Keys for the CHECKING rows that have none yet (each row once: its entity never changes)."""
        while not self.stopping:
            rows = self.db.fetchall("checking_without_keys", {"limit": KEYS_BATCH})
            if not rows:
                return
            with self.db.transaction() as tx:
                tx.execute("store_drift_keys", {"ids": [row_id for row_id, _ in rows],
                                                "keys": ["\n".join(_entity_keys(bytes(entity))) for _, entity in rows]})
            self.beat()  # a large backlog takes many rounds; each is progress
            if len(rows) < KEYS_BATCH:
                return

    def _settle(self, high_water: datetime.datetime | None) -> tuple[int, int]:
        """Mode changes with the change log read up to `high_water` (None: it cannot be read), or never."""
        drift = self.config.drift
        changes = drift.mode == "changes"
        matching = changes and high_water is not None
        [(_, trusted_since, _)] = self.db.fetchall("change_log_progress")
        margin = datetime.timedelta(seconds=drift.clock_margin_seconds)
        skipped, planned = settle(self.db, {
            "seen_before": high_water - margin if matching and high_water is not None else None,
            "trusted_since": trusted_since or EPOCH,
            "margin": drift.clock_margin_seconds, "max_age": drift.max_age_hours * 3600.0, "match": matching,
            "replan_all": changes and not matching, "limit": SETTLE_BATCH}, role=self)
        metrics.reobservations_settled(skipped, planned)
        if planned or skipped:
            log.info("unchanged re-observations: %d skipped, %d planned again", skipped, planned)
        return skipped, planned

    def _prune(self) -> None:
        keep = self.config.drift.max_age_hours * 3600.0 + self.config.drift.clock_margin_seconds
        with self.db.transaction() as tx:
            if self.config.drift.max_age_hours > 0:
                tx.execute("prune_netbox_changes", {"keep_seconds": keep})
            tx.execute("prune_drift_tally")


def _entity_keys(entity: bytes) -> list[str]:
    try:
        return driftkeys.entity_keys(pb.Entity.FromString(entity))
    except Exception:  # a row's entity parsed when it was planned; should it not now, it has no keys
        log.exception("cannot read the entity of a CHECKING row for its keys")
        return []
