-- 0012: retention (reconciler/retention.py) and what the service knows of its dependencies
-- (reconciler/dependencies.py).
--
--  * drift_of loses its foreign key: it only tells where a drift clone came from (nothing reads it
--    to decide anything), and retention deletes superseded rows that clones point at. With the key,
--    every such delete would also UPDATE the clone, a current row a claim or the consumer may be
--    locking, and would scan the table for referrers (drift_of has no index).
--  * ingestion_logs_superseded: the rows that are no longer their entity's current row, the only
--    ones retention may delete, walked in id order without a scan of the table. Rows leave the head
--    index rarely (a drift clone replaces them, or the default branch changed), so it stays small.
--  * pruned: what retention deleted, per kind (rows, change_sets, dead_letters), in the same
--    transaction as the delete: `reconciler status` shows it, for every replica. walked_to: where
--    the walk over change sets ended, so the next one resumes there instead of reading them all.
--  * dependency_health: each replica's view of what it depends on (postgres, redis, plugin,
--    token_endpoint): up or down since when, and while down, what failed (problem) and its kind
--    (reconciler/diagnosis.py). Written on every change and refreshed while it lasts, so `status`
--    can tell a current view (checked_at recent) from one a stopped service left.

ALTER TABLE ingestion_logs DROP CONSTRAINT ingestion_logs_drift_of_fkey;

CREATE INDEX ingestion_logs_superseded ON ingestion_logs (id) WHERE NOT is_head;

CREATE TABLE pruned (
    kind        text PRIMARY KEY,
    deleted     bigint NOT NULL DEFAULT 0,
    last_at     timestamptz,
    walked_to   bigint NOT NULL DEFAULT 0
);

CREATE TABLE dependency_health (
    host        text NOT NULL,
    dependency  text NOT NULL,
    up          boolean NOT NULL,
    since       timestamptz NOT NULL,
    problem     text,
    kind        text,
    checked_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (host, dependency)
);
