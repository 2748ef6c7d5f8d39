"""The poll-worker role: claims QUEUED rows and has the diode plugin plan (and apply) them.

Per iteration: read the shared cache (branch, backpressure); claim up to `batch_size` rows under
a lease and commit; call the plugin with no transaction open (bulk-plan-apply/ when auto_apply,
bulk-plan/ otherwise, never both); decide every row's outcome (outcomes.py); write them in one
transaction (claims.py). Nothing is claimed while the refresher finds the plugin or its token
endpoint down (dependencies.py), and a batch none of whose attempts reached the plugin is given back
uncounted: an outage costs the rows no attempt. Every `LEASE_SWEEP_INTERVAL` it also returns rows
whose lease expired (a dead worker's, here or on another replica) to QUEUED. When a worker process
dies, its supervisor ends its leases at once (release_after_exit), or once NetBox can no longer be
working on a request it sent.

No entity is sent while an earlier request carrying it may still be running: the claim is durable
before the plugin is asked, a request that went unanswered is never repeated (its rows wait in
PENDING_RETRY until NetBox must be done with it), and a dead worker's rows are held as long.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from . import claims, metrics, outcomes, sharedcache, states
from .claims import Claimed, Decision
from .db import Database
from .errors import BootError, ContentRejected, DatabaseError, ReconcilerError
from .outcomes import RetryPolicy
from .plugin import AnswerLost, InDoubt, Item, PluginClient, Unavailable, Unreachable
from .refresher import PROBE_DOWN_SECONDS
from .roles import SUMMARY_INTERVAL, Link, Role
from .settings import check_runnable, claim_lease_seconds, lease_budget_seconds

log = logging.getLogger(__name__)

LEASE_SWEEP_INTERVAL = 10.0
IDLE_PAUSE = 1.0  # empty queue, cold branch cache, backpressure
PARTIAL_BATCH_PAUSE = 0.1  # a batch smaller than batch_size: the queue is nearly empty
PROBE_WAIT = PROBE_DOWN_SECONDS + 1.0  # after the plugin failed us: time for the refresher to ask it


class ProxyGone(ReconcilerError):
    """The shared cache's Manager is gone: the worker exits to be restarted with a new one."""

    @classmethod
    def of(cls, exc: BaseException) -> ProxyGone:
        return cls(f"the shared cache's Manager is gone ({exc!r}); exiting to be restarted")


class Worker(Role):
    db: Database  # boot() opens it (Role.open_database)

    def __init__(self, config, index: int, cache, limiter) -> None:
        super().__init__(config)
        self.name = f"worker {index}"
        self.index, self.cache, self.limiter = index, cache, limiter
        self.apply = config.workers.auto_apply
        self.retry = RetryPolicy.of(config.workers)
        self.plugin: PluginClient  # boot() opens it
        self.owner = ""
        self._next_sweep = 0.0
        self._waiting_for_branch = False
        self._waiting_for_plugin = False
        self._counts: dict[int, int] = {}
        self._unrecorded_until = 0.0  # see in_flight

    def boot(self) -> None:
        check_runnable(self.config)
        self.owner = lease_owner(self.index, os.getpid(), self.link)
        self.open_database()
        self.db.check_schema()
        self.plugin = PluginClient(self.config.netbox, self.limiter, pacer=self)
        try:
            sharedcache.read(self.cache)
        except sharedcache.PROXY_ERRORS as exc:
            raise BootError(f"the shared cache is unreachable: {exc!r}") from exc
        log.info("%s mode, batches of %d, lease %s", "auto-apply" if self.apply else "plan-only",
                 self.config.workers.batch_size, self.owner)

    def run_once(self) -> None:
        view = self._view()
        if view.behind or not self._plugin_usable(view) or not self._branch_known(view):
            self.pause(IDLE_PAUSE)
            return
        try:
            self._sweep_expired_leases()
            deadline = self._lease_deadline()
            rows = self._claim()
        except DatabaseError as exc:
            log.warning("cannot claim rows, will retry: %s", exc)
            self.pause(IDLE_PAUSE)
            return
        if not rows:
            self.pause(IDLE_PAUSE)
        else:
            self._process(rows, view, deadline)
            if len(rows) < self.config.workers.batch_size:
                self.pause(PARTIAL_BATCH_PAUSE)
        self._summarise()

    # --- shared cache ---

    def _view(self) -> sharedcache.View:
        try:
            return sharedcache.read(self.cache)
        except sharedcache.PROXY_ERRORS as exc:
            raise ProxyGone.of(exc) from exc

    def _plugin_usable(self, view: sharedcache.View) -> bool:
        """Whether the plugin and its token endpoint answer, as the refresher last found: while either is
        down, nothing is claimed, so rows wait QUEUED without spending attempts (the refresher logs the
        outage; this worker says once that it waits)."""
        if view.outages:
            if not self._waiting_for_plugin:
                log.info("claiming nothing while %s", " and ".join(sorted(view.outages)) + " cannot be used")
            self._waiting_for_plugin = True
            return False
        if self._waiting_for_plugin:
            log.info("the plugin answers again; claiming")
        self._waiting_for_plugin = False
        return True

    def _branch_known(self, view: sharedcache.View) -> bool:
        if not view.branch_known:
            if not self._waiting_for_branch:
                log.warning("default branch not yet known; claiming nothing until it is")
            self._waiting_for_branch = True
            return False
        self._waiting_for_branch = False
        return True

    # --- claims ---

    def _sweep_expired_leases(self) -> None:
        if time.monotonic() < self._next_sweep:
            return
        self._next_sweep = time.monotonic() + LEASE_SWEEP_INTERVAL
        released = claims.sweep(self.db, self.retry.max_attempts)
        if released:
            owners = ", ".join(sorted({row.owner for row in released}))
            given_up = [row.id for row in released if row.state == states.ERRORED]
            if len(given_up) < len(released):
                log.warning("%d rows outlived their lease (held by %s); back to QUEUED",
                            len(released) - len(given_up), owners)
            if given_up:
                log.error("%d rows outlived their lease %d times (each kills or hangs whoever plans it) and are "
                          "now ERRORED: %s", len(given_up), self.retry.max_attempts, given_up[:10])

    def _lease_deadline(self) -> float:
        """When plugin requests for a claim made now must have finished (read before the claim, so it
        errs early)."""
        return time.monotonic() + lease_budget_seconds(self.config.workers)

    def _claim(self) -> list[Claimed]:
        in_flight = states.APPLYING if self.apply else states.OPEN
        return claims.claim(self.db, self.owner, in_flight, self.config.workers.batch_size,
                            claim_lease_seconds(self.config))

    # --- one batch ---

    def _process(self, rows: list[Claimed], view: sharedcache.View, deadline: float) -> None:
        metrics.claimed(row.object_type for row in rows)
        entities, decisions = outcomes.entities(rows)
        items = [Item(row.id, row.object_type, entities[row.id]) for row in rows if row.id in entities]
        if items:
            decisions += self._ask_plugin(items, rows, view, deadline)
        unrecorded = self._persist(decisions, view, {row.id for row in rows if row.planned_before},
                                   {row.id: row.object_type for row in rows}) if decisions else set()
        if unrecorded:  # they return after their lease; if this process dies first, they wait as long
            self._unrecorded_until = max(self._unrecorded_until, self.link.request_until.value)
        else:  # whatever a request left in doubt is on the rows now
            self.link.sent.value = False
            self.in_flight(0.0)

    def in_flight(self, until: float) -> None:
        """Role.in_flight, never below a request whose outcome could not be recorded; and a request
        going out marks the claim as sent (the supervisor tells a dead worker's rows that were never
        sent from those whose answer it lost)."""
        if until:
            self.link.sent.value = True
        super().in_flight(max(until, self._unrecorded_until))

    def _ask_plugin(self, items: list[Item], rows: list[Claimed], view: sharedcache.View,
                    deadline: float) -> list[Decision]:
        """The decisions for the rows asked about. On a stop, the rows without an outcome are given
        back uncounted instead (per entity, those not sent; in bulk, the whole batch), unless the
        plugin got them: those are recorded, and those it may still be working on are held."""
        by_id = {row.id: row for row in rows}
        asked = [by_id[item.id] for item in items]
        try:
            call = self.plugin.plan_apply if self.apply else self.plugin.plan
            results = call(items, view.branch_id, deadline)
        except Unreachable as exc:  # it never reached the plugin: the rows spend no attempt
            self._give_back(asked, str(exc))
            self._suspect_plugin()
            return []
        except InDoubt as exc:
            log.warning("no answer for a batch of %d: %s", len(asked), exc)
            running_for = exc.until - time.time()
            return [outcomes.in_doubt(row, str(exc), running_for, len(asked), self.retry) for row in asked]
        except Unavailable as exc:
            lost = isinstance(exc, AnswerLost)
            if self.stopping and not lost:  # NotSent included: it is only raised on a stop
                self._give_back(asked, f"stopping: {exc}")
                return []
            log.warning("plugin unavailable for a batch of %d: %s", len(asked), exc)
            return [outcomes.unavailable(row, str(exc), self.retry, answer_lost=lost) for row in asked]
        unsent = {row.id for row in asked if (result := results.get(row.id)) and not result.sent}
        if unsent:
            self._give_back([by_id[row_id] for row_id in sorted(unsent)], results[min(unsent)].unavailable)
        entities = {item.id: item.entity for item in items}
        now = time.time()
        return [outcomes.decide(row, results.get(row.id), self.apply, entities[row.id], view.branch_id,
                                self.retry, now) for row in asked if row.id not in unsent]

    def _suspect_plugin(self) -> None:
        """Have the refresher ask the plugin now, and wait for its verdict: until it says the plugin is
        down, another claim would only fail the same way."""
        try:
            self.cache[sharedcache.PROBE_REQUESTED] = True
        except sharedcache.PROXY_ERRORS as exc:
            raise ProxyGone.of(exc) from exc
        self.pause(PROBE_WAIT)

    def _give_back(self, rows: list[Claimed], reason: str | None) -> None:
        """Release claimed rows that were never sent, uncounted, for the next claim. (Rows the plugin got
        are never given back: _ask_plugin records them, and holds those it may still be working on.)"""
        try:
            claims.release(self.db, self.owner, [row.id for row in rows])
        except DatabaseError as exc:
            log.warning("could not give %d claimed rows back (%s); they return after their lease", len(rows), exc)
            return
        log.info("gave %d claimed rows back without an outcome: %s", len(rows), reason)

    def _persist(self, decisions: list[Decision], view: sharedcache.View, planned_before: set[int],
                 object_types: dict[int, str]) -> set[int]:
        """Record the decisions; the ids of rows left unrecorded (planned again after their lease)."""
        written, unrecorded = self._record(decisions, view.branch_scope, planned_before)
        done = {d.row_id for d in written} | unrecorded
        lost = [d.row_id for d in decisions if d.row_id not in done]
        if lost:
            log.warning("%d rows were taken over by another worker after our lease expired; their outcome "
                        "is theirs to record: %s", len(lost), lost[:10])
        recorded = []
        for decision in written:
            state = decision.drift_state if decision.drift_state is not None else decision.state
            self._counts[state] = self._counts.get(state, 0) + 1
            recorded.append((object_types[decision.row_id], state))
        metrics.decided(recorded)
        stored = [d.change_set for d in written if d.change_set is not None]
        metrics.warned([cs.plan_warnings for cs in stored if cs.plan_warnings],
                       [cs.apply_warnings for cs in stored if cs.apply_warnings])
        return unrecorded

    def _record(self, decisions: list[Decision], branch_scope: str,
                planned_before: set[int]) -> tuple[list[Decision], set[int]]:
        """Write the outcomes: (the decisions written, ids of rows left unrecorded, to be planned again
        after their lease). Rows missing from both were taken over by another worker.

        Outages are waited out: the plugin's work is done, and our lease protects the rows. Content
        Postgres refuses is bisected down to the row that carries it, which is then recorded without
        its change set (outcomes.unstorable), so it costs no other row.
        """
        degraded = False
        while True:
            try:
                written = claims.record(self.db, self.owner, branch_scope, decisions, planned_before)
                return [d for d in decisions if d.row_id in written], set()
            except ContentRejected as exc:
                if len(decisions) > 1:
                    middle = len(decisions) // 2
                    first = self._record(decisions[:middle], branch_scope, planned_before)
                    second = self._record(decisions[middle:], branch_scope, planned_before)
                    return first[0] + second[0], first[1] | second[1]
                if degraded:
                    log.error("cannot record row %d even without its change set (%s); it returns after its lease "
                              "and is planned again", decisions[0].row_id, exc)
                    return [], {decisions[0].row_id}
                log.error("Postgres refused the outcome of row %d (%s); recording it without its change set",
                          decisions[0].row_id, exc)
                decisions, degraded = [outcomes.unstorable(decisions[0], str(exc))], True
            except DatabaseError as exc:
                log.warning("cannot record the outcome of %d rows, will retry: %s", len(decisions), exc)
                if not self.pause(2.0):
                    log.error("stopping before the outcome of %d rows was recorded; they return after their "
                              "lease and are planned again", len(decisions))
                    return [], {d.row_id for d in decisions}

    def _summarise(self) -> None:
        if not self.summary_due():
            return
        if self._counts:
            log.info("last %.0f s: %s", SUMMARY_INTERVAL,
                     ", ".join(f"{n} {states.NAMES[s]}" for s, n in sorted(self._counts.items())))
        self._counts = {}


def lease_owner(index: int, pid: int, link: Link) -> str:
    """The lease owner a worker process writes on its claims. Host names and pids repeat across
    containers (and pids across restarts); the link's token keeps two workers' leases apart."""
    return f"{socket.gethostname()}:{pid}:worker-{index}:{link.token}"


def release_after_exit(config, index: int, pid: int, link: Link) -> None:
    """In the supervisor, once worker `index` (process `pid`) is gone: end its leases now, or once NetBox
    can no longer be working on a request it sent, so its rows need not wait for their lease."""
    # Short timeouts: this runs in the supervisor's loop; if Postgres does not answer, the lease still ends.
    db = Database(config.postgres.dsn, config.postgres.schema, "reconciler supervisor", connect_timeout=2,
                  statement_timeout_ms=5_000)
    owner = lease_owner(index, pid, link)
    try:
        ended, released = claims.end_leases(db, owner, max(0.0, link.request_until.value - time.time()),
                                            config.workers.max_attempts, sent=link.sent.value)
    except DatabaseError as exc:
        log.warning("could not release the claims of worker %d (pid %d): %s; they return after their lease",
                    index, pid, exc)
        return
    finally:
        db.close()
    if ended:
        held = len(ended) - len({row.id for row in released} & ended)
        log.info("worker %d (pid %d) held %d claimed rows: %d released%s", index, pid, len(ended), len(ended) - held,
                 f", {held} once NetBox can no longer be working on its last request" if held else "")
