-- 0010: re-plan an unchanged entity only when NetBox changed under it ([drift] mode = changes).
--
--  * state 10 CHECKING: an APPLIED or NO_CHANGES head seen again, unchanged, waiting for the change
--    log to be read past the moment it was first seen so (checking_since; later observations while it
--    waits do not push that back). The change-log reader then sends it back to requeued_from_state
--    (nothing in NetBox that it names changed) or to QUEUED (planned again). Not a diode.v1.State.
--  * claimed_at: when the row's current claim was made; planned_at: the claim time of the last plan
--    that produced a plan (finish_rows copies it). A change in NetBox at or after planned_at may not be
--    in that plan. NULL: planned before 0010, so it is planned again on its next observation.
--  * drift_keys: the keys of the objects its entity names (reconciler/driftkeys.py), filled by the
--    change-log reader the first time the row waits in CHECKING.
--  * netbox_changes: the keys of changes made in NetBox by anyone but the plugin, one row per key
--    and change, kept while they can still matter (max_age), with when NetBox stamped the change
--    (changed_at, NetBox's clock) and when we first read it (read_at, ours): a change stamped before a
--    plan but committed after it (a long NetBox transaction) is first read after the plan.
--  * change_log: one row, the reader's progress. high_water is NetBox's clock when the last read
--    started: every change made before it (less a margin for commits in flight) has been read.
--    trusted_since: since when the reading has been continuous; a row planned before it cannot be
--    judged by what was read, and is planned again. failure_kind/failure: why the last read failed.
--  * drift_tally: how many settled re-observations were skipped and planned, per settling batch,
--    for `reconciler status` (the last hour); pruned after an hour.

ALTER TABLE ingestion_logs DROP CONSTRAINT ingestion_logs_state_check;
ALTER TABLE ingestion_logs ADD CONSTRAINT ingestion_logs_state_check CHECK (state BETWEEN 1 AND 10);
ALTER TABLE ingestion_logs
    ADD COLUMN checking_since timestamptz,
    ADD COLUMN claimed_at timestamptz,
    ADD COLUMN planned_at timestamptz,
    ADD COLUMN drift_keys text[];

CREATE INDEX ingestion_logs_checking ON ingestion_logs (id) WHERE state = 10;

CREATE TABLE netbox_changes (
    key        text NOT NULL,
    changed_at timestamptz NOT NULL,
    change_id  bigint NOT NULL,
    read_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (key, change_id)
);
CREATE INDEX netbox_changes_read_at ON netbox_changes (read_at);

CREATE TABLE change_log (
    singleton     boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    high_water    timestamptz,
    trusted_since timestamptz,
    read_at       timestamptz,
    failing_since timestamptz,
    failure_kind  text,
    failure       text
);
INSERT INTO change_log DEFAULT VALUES;

CREATE TABLE drift_tally (
    at      timestamptz NOT NULL DEFAULT now(),
    skipped integer NOT NULL,
    planned integer NOT NULL
);
