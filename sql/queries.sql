-- Every statement reconciler runs, by name. A block starts with a line `-- name --`; the comment
-- lines after it describe the statement. Parameters are %(name)s; {schema} is a quoted identifier.

-- migrate_lock --
-- Serialises migrations of one schema across replicas starting at the same time (session lock).
SELECT pg_advisory_lock(hashtextextended(%(key)s, 0));

-- migrate_unlock --
SELECT pg_advisory_unlock(hashtextextended(%(key)s, 0));

-- create_schema --
CREATE SCHEMA IF NOT EXISTS {schema};

-- create_migrations_table --
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- migrations_table_exists --
SELECT to_regclass('schema_migrations') IS NOT NULL;

-- applied_migrations --
SELECT version, name, checksum FROM schema_migrations ORDER BY version;

-- record_migration --
INSERT INTO schema_migrations (version, name, checksum) VALUES (%(version)s, %(name)s, %(checksum)s);

-- claim_receipts --
-- Marks stream entries as committed by this transaction. Entries another transaction already
-- committed are not returned: their rows exist, so this delivery is a redelivery and a no-op.
-- A concurrent transaction holding the same entry makes this one wait for its outcome.
INSERT INTO stream_receipts (stream, ms, seq, entities)
SELECT %(stream)s, u.ms, u.seq, u.entities
FROM unnest(%(ms)s::bigint[], %(seq)s::bigint[], %(entities)s::integer[]) AS u (ms, seq, entities)
ON CONFLICT DO NOTHING
RETURNING ms, seq;

-- lock_heads --
-- The current row of each entity hash (%(hashes)s: the 32-byte digests concatenated), locked in
-- id order, the order every writer uses. The OFFSET 0 fence makes it one probe of the head index
-- per hash: unfenced, the planner hashes the whole table once it expects a thousand hashes.
-- is_head is checked again once the row is locked, in case a concurrent writer replaced it.
SELECT id, entity_hash, state
FROM ingestion_logs
WHERE id IN (SELECT found.id
             FROM generate_series(0, length(%(hashes)s::bytea) / 32 - 1) AS n,
                  LATERAL (SELECT id FROM ingestion_logs
                           WHERE is_head AND entity_hash = substring(%(hashes)s::bytea FROM n * 32 + 1 FOR 32)
                           OFFSET 0) AS found)
  AND is_head
ORDER BY id
FOR UPDATE;

-- copy_ingestion_logs --
-- New QUEUED rows (binary COPY; pgcopy encodes the tuples in exactly this column order).
COPY ingestion_logs (request_id, ingestion_ts, producer_app_name, producer_app_version, sdk_name,
                     sdk_version, object_type, source_ts, entity, entity_hash, duplicate_count)
FROM STDIN WITH (FORMAT binary);

-- mark_duplicates --
-- Another observation of rows we already have: count it, and send finished rows (APPLIED,
-- FAILED, NO_CHANGES, ERRORED) back to QUEUED so they are planned again, remembering where they
-- came from. Rows that are queued, in flight, OPEN or IGNORED keep their state.
UPDATE ingestion_logs AS l
SET duplicate_count = l.duplicate_count + d.increment,
    last_seen = now(),
    updated_at = now(),
    state = CASE WHEN l.state IN (3, 4, 5, 7) THEN 1 ELSE l.state END,
    requeued_from_state = CASE WHEN l.state IN (3, 4, 5, 7) THEN l.state ELSE l.requeued_from_state END,
    error = CASE WHEN l.state IN (3, 4, 5, 7) THEN NULL ELSE l.error END,
    attempts = CASE WHEN l.state IN (3, 4, 5, 7) THEN 0 ELSE l.attempts END,
    next_attempt_at = CASE WHEN l.state IN (3, 4, 5, 7) THEN NULL ELSE l.next_attempt_at END
FROM unnest(%(ids)s::bigint[], %(increments)s::integer[]) AS d (id, increment)
WHERE l.id = d.id;

-- insert_dead_letters --
INSERT INTO dead_letters (stream, stream_id, entity_index, reason, field_names, field_values) VALUES %s;

-- prune_receipts --
-- Receipts of entries before the group's oldest pending entry can never be needed by a Redis
-- redelivery. They are kept a while longer anyway: a replica that took an entry over during a
-- Postgres outage may still hold it in memory, retrying, after the original owner committed,
-- acknowledged and would have pruned it.
DELETE FROM stream_receipts
WHERE stream = %(stream)s AND (ms, seq) < (%(ms)s, %(seq)s)
  AND committed_at < now() - %(keep_seconds)s * interval '1 second';

-- autovacuum_enabled --
SELECT current_setting('autovacuum')::boolean;

-- queue_table_needs_vacuum --
-- The threshold migration 0001 gives autovacuum for this table: 1,000 rows + 1% of the table.
SELECT EXISTS (SELECT FROM pg_stat_user_tables
               WHERE relid = 'ingestion_logs'::regclass AND n_dead_tup > 1000 + 0.01 * n_live_tup);

-- vacuum_queue_table --
VACUUM (ANALYZE) ingestion_logs;

-- savepoint --
SAVEPOINT copy_attempt;

-- rollback_to_savepoint --
ROLLBACK TO SAVEPOINT copy_attempt;

-- release_savepoint --
RELEASE SAVEPOINT copy_attempt;
