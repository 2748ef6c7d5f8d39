"""diode.v1.State values as stored in ingestion_logs.state, and CHECKING, which is ours (0010)."""

QUEUED = 1
OPEN = 2
APPLIED = 3
FAILED = 4
NO_CHANGES = 5
IGNORED = 6
ERRORED = 7
APPLYING = 8
PENDING_RETRY = 9
CHECKING = 10  # seen again unchanged; the change log decides whether it is planned (driftchecks.py)

NAMES = {QUEUED: "QUEUED", OPEN: "OPEN", APPLIED: "APPLIED", FAILED: "FAILED", NO_CHANGES: "NO_CHANGES",
         IGNORED: "IGNORED", ERRORED: "ERRORED", APPLYING: "APPLYING", PENDING_RETRY: "PENDING_RETRY",
         CHECKING: "CHECKING"}

# Finished rows that a new observation of the same entity sends back to QUEUED (mark_duplicates).
REQUEUE_ON_DUPLICATE = frozenset({APPLIED, FAILED, NO_CHANGES, ERRORED})
# Of those, the ones that wait in CHECKING instead when the change log decides ([drift] mode).
CHECK_ON_DUPLICATE = frozenset({APPLIED, NO_CHANGES})
