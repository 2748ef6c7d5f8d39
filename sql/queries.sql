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
FROM unnest(%(ms)s::numeric[], %(seq)s::numeric[], %(entities)s::integer[]) AS u (ms, seq, entities)
ON CONFLICT DO NOTHING
RETURNING ms, seq;

-- lock_heads --
-- The current row of each entity hash (%(hashes)s: the 32-byte digests concatenated), with the
-- branch it was planned in and whether it waits for a request NetBox may still run, locked in
-- id order, the order every writer uses. The OFFSET 0 fence makes it one probe of the head index
-- per hash: unfenced, the planner hashes the whole table once it expects a thousand hashes.
-- is_head is checked again once the row is locked, in case a concurrent writer replaced it.
SELECT id, entity_hash, state, planned_branch, coalesce(next_attempt_at > now(), false)
FROM ingestion_logs
WHERE id IN (SELECT found.id
             FROM generate_series(0, length(%(hashes)s::bytea) / 32 - 1) AS n,
                  LATERAL (SELECT id FROM ingestion_logs
                           WHERE is_head AND entity_hash = substring(%(hashes)s::bytea FROM n * 32 + 1 FOR 32)
                           OFFSET 0) AS found)
  AND is_head
ORDER BY id
FOR UPDATE;

-- demote_heads --
-- Rows planned in another branch than today's default stop being the current row of their hash:
-- a new observation becomes a new row, planned in today's branch.
UPDATE ingestion_logs SET is_head = false, updated_at = now() WHERE id = ANY(%(ids)s::bigint[]);

-- copy_ingestion_logs --
-- New QUEUED rows (binary COPY; pgcopy encodes the tuples in exactly this column order).
COPY ingestion_logs (request_id, ingestion_ts, producer_app_name, producer_app_version, sdk_name,
                     sdk_version, source_metadata, object_type, source_ts, entity, entity_hash, duplicate_count)
FROM STDIN WITH (FORMAT binary);

-- mark_duplicates --
-- Another observation of rows we already have: count it, and send the rows flagged in
-- %(requeue)s back to QUEUED so they are planned again, remembering where they came from; those
-- also flagged in %(check)s (APPLIED and NO_CHANGES ones, in [drift] mode changes or never) go to
-- CHECKING instead (0010), where the change-log reader decides whether they need a plan, and keep
-- their error and attempts in case it gives them back their state. The
-- caller flags the finished ones (states.REQUEUE_ON_DUPLICATE: APPLIED, FAILED, NO_CHANGES,
-- ERRORED) from the states lock_heads locked, so that set is written down once, in Python. Rows
-- that are queued, in flight, OPEN or IGNORED keep their state. lease_expiries is kept: a row that
-- killed its workers is still claimed alone, and given up on after one more expiry. An ERRORED row
-- that gave up on a request NetBox may still be working on waits for it (PENDING_RETRY until its
-- next_attempt_at, 0009): a re-observation must not have it sent meanwhile.
UPDATE ingestion_logs AS l
SET duplicate_count = l.duplicate_count + d.increment,
    last_seen = now(),
    updated_at = now(),
    state = CASE WHEN NOT d.requeue THEN l.state WHEN d.checked THEN 10 /* CHECKING */ WHEN l.next_attempt_at > now() THEN 9 /* PENDING_RETRY */ ELSE 1 /* QUEUED */ END,
    checking_since = CASE WHEN d.checked THEN now() ELSE l.checking_since END,
    -- An ERRORED drift check (requeued from APPLIED, then the plugin stayed unreachable) keeps its
    -- APPLIED origin: its object is still in NetBox, so the next plan is still a drift check.
    requeued_from_state = CASE WHEN NOT d.requeue THEN l.requeued_from_state
                               WHEN l.state = 7 /* ERRORED */ AND l.requeued_from_state = 3 /* APPLIED */ THEN 3 /* APPLIED */
                               ELSE l.state END,
    error = CASE WHEN d.requeue AND NOT d.checked THEN NULL ELSE l.error END,
    attempts = CASE WHEN d.requeue AND NOT d.checked THEN 0 ELSE l.attempts END,
    next_attempt_at = CASE WHEN NOT d.requeue OR l.next_attempt_at > now() THEN l.next_attempt_at END
FROM unnest(%(ids)s::bigint[], %(increments)s::integer[], %(requeue)s::boolean[], %(check)s::boolean[])
     AS d (id, increment, requeue, checked)
WHERE l.id = d.id;

-- insert_dead_letters --
INSERT INTO dead_letters (stream, stream_id, entity_index, reason, field_names, field_values) VALUES %s;

-- prune_receipts --
-- Receipts of entries before the group's oldest pending entry can never be needed by a Redis
-- redelivery. They are kept a while longer anyway: a replica that took an entry over during a
-- Postgres outage may still hold it in memory, retrying, after the original owner committed,
-- acknowledged and would have pruned it.
DELETE FROM stream_receipts
WHERE stream = %(stream)s AND (ms, seq) < (%(ms)s::numeric, %(seq)s::numeric)
  AND committed_at < now() - %(keep_seconds)s * interval '1 second';

-- release_expired_leases --
-- Rows whose claim outlived its lease (the worker died or hung) go back to QUEUED for another
-- worker. Live claims have unexpired leases and are not touched, nor rows another transaction holds.
-- A row whose claim expired %(max_attempts)s times becomes ERRORED instead: it kills or hangs
-- whoever plans it, and must not cycle for ever (an operator can `reconciler retry` it). The answer
-- of whatever the dead claim sent is lost: answer_lost_at says so (0009), unless the claim is of
-- %(unsent_owner)s, a dead worker its supervisor knows sent nothing for it.
WITH expired AS (
    SELECT id, lease_owner FROM ingestion_logs
    WHERE lease_owner IS NOT NULL AND lease_expires_at <= now()
    ORDER BY id
    FOR UPDATE SKIP LOCKED
)
UPDATE ingestion_logs AS l
SET lease_expiries = l.lease_expiries + 1,
    state = CASE WHEN l.lease_expiries + 1 >= %(max_attempts)s THEN 7 /* ERRORED */ ELSE 1 /* QUEUED */ END,
    error = CASE WHEN l.lease_expiries + 1 >= %(max_attempts)s
                 THEN jsonb_build_object(
                     'message', format('gave up: its claim outlived the lease %%s times, planned alone after '
                                       'the first (a worker holding it died, hung or was killed; most likely '
                                       'planning this row does that)', l.lease_expiries + 1),
                     'code', 'ERR_LEASE_EXPIRED', 'details', NULL)
                 ELSE l.error END,
    answer_lost_at = CASE WHEN expired.lease_owner = %(unsent_owner)s THEN l.answer_lost_at
                          ELSE coalesce(l.answer_lost_at, now()) END,
    lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
FROM expired
WHERE l.id = expired.id
RETURNING l.id, expired.lease_owner, l.state;

-- end_leases_of --
-- The claims of a worker process that is gone (its supervisor reaped it) need not wait for their
-- lease: it ends once a plugin request the process sent can no longer be running in NetBox, in
-- %(request_seconds)s seconds (0: none was in flight; counted on this server's clock).
UPDATE ingestion_logs
SET lease_expires_at = now() + %(request_seconds)s * interval '1 second'
WHERE lease_owner = %(owner)s AND lease_expires_at > now() + %(request_seconds)s * interval '1 second'
RETURNING id;

-- claim_batch --
-- Up to %(limit)s rows for one worker: PENDING_RETRY rows that are due first, then the oldest
-- QUEUED ones. Committed (synchronously: a claim lost in a crash would let another worker send the
-- rows while this one's request still runs) before the plugin is asked, so no lock is held while it
-- works on them; the lease (owner, expiry) marks them in flight. attempts counts claims, for the
-- retry budget. A suspect is a row whose claim outlived its lease since a worker last lived through
-- planning it (lease_expiries > 0: its worker died, hung or was killed holding it). It may be what
-- kills or hangs a worker, so it is claimed alone: only it spends its lease budget (0007), not the
-- rows that would share its batch. A row whose request went unanswered `timeouts` times in a row
-- is sent in a batch 2^timeouts times smaller (0009): a batch that keeps timing out is split rather
-- than sent whole again. The batch is sized for its first row; rows split further than it wait until
-- they lead a batch.
WITH due AS (
    SELECT id, 0 AS rank, lease_expiries > 0 AS suspect, timeouts FROM ingestion_logs
    WHERE state = 9 /* PENDING_RETRY */ AND next_attempt_at <= now()
    ORDER BY next_attempt_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), queued AS (
    SELECT id, 1 AS rank, lease_expiries > 0 AS suspect, timeouts FROM ingestion_logs
    WHERE state = 1 /* QUEUED */
    ORDER BY id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), picked AS (
    SELECT id, suspect, timeouts, row_number() OVER (ORDER BY rank, id) AS position
    FROM (SELECT * FROM due UNION ALL SELECT * FROM queued) AS candidates
    ORDER BY rank, id
    LIMIT %(limit)s
), lead AS (
    SELECT timeouts FROM picked WHERE position = 1
), chosen AS (
    SELECT id FROM picked
    WHERE CASE WHEN EXISTS (SELECT FROM picked WHERE suspect) THEN id = (SELECT min(id) FROM picked WHERE suspect)
               ELSE timeouts <= (SELECT timeouts FROM lead) END
    ORDER BY position
    LIMIT (SELECT greatest(1, %(limit)s::integer >> least(timeouts, 30)) FROM lead)
)
UPDATE ingestion_logs AS l
SET state = %(state)s, lease_owner = %(owner)s,
    lease_expires_at = now() + %(lease_seconds)s::float8 * interval '1 second',
    attempts = l.attempts + 1, claimed_at = now(), updated_at = now()
FROM chosen
WHERE l.id = chosen.id
RETURNING l.id, l.object_type, l.entity, l.requeued_from_state, l.attempts, l.answer_lost_at, l.timeouts;

-- release_claims --
-- A worker that stops before it could ask the plugin gives its rows back (the claim did not count).
UPDATE ingestion_logs
SET state = 1 /* QUEUED */, lease_owner = NULL, lease_expires_at = NULL, attempts = greatest(attempts - 1, 0), updated_at = now()
WHERE id = ANY(%(ids)s::bigint[]) AND lease_owner = %(owner)s;

-- finish_rows --
-- The outcome of a batch. Only rows this worker still holds are written (a row whose lease expired
-- and that another worker took over is left to it: the lease test is re-checked on the row's latest
-- version); the ids written are returned, and only their change sets are stored. PENDING_RETRY and
-- ERRORED keep requeued_from_state (a later attempt still follows the drift rules); final states
-- clear it. A drift prior stops being the head: its clone is. A row the plugin planned (any state
-- but PENDING_RETRY and ERRORED, which mean it could not be asked) did not kill this worker:
-- lease_expiries is cleared (0007), so rows that only shared a killed batch are claimed in batches
-- again, while a suspect the plugin never got to stays one. planned_at (0010) is when the claim that
-- got a plan (%(planned)s: not a drift check whose plan failed) was made: a change in NetBox after it
-- may not be in the plan. next_attempt_at is %(retry_in)s seconds
-- from now, by this server's clock. answer_lost_at (0009) is set now, kept (NULL) or cleared, as the
-- worker decided; timeouts counts unanswered requests in a row, kept while the plugin says nothing
-- about the row (7, 9), cleared once it does; a batch that went unanswered and will be split gets its
-- claim back (%(refund)s), since splitting, not the entity, is the remedy. No explicit row lock first: it
-- would write a WAL record per row before the update rewrites the row anyway (docs/benchmarks.md);
-- the rows come locked in the order of the id array, which is sorted.
UPDATE ingestion_logs AS l
SET state = u.state,
    error = u.error,
    next_attempt_at = now() + u.retry_in * interval '1 second',
    requeued_from_state = CASE WHEN u.state IN (7 /* ERRORED */, 9 /* PENDING_RETRY */) THEN l.requeued_from_state END,
    is_head = l.is_head AND NOT u.superseded,
    planned_branch = CASE WHEN u.state IN (7 /* ERRORED */, 9 /* PENDING_RETRY */) THEN l.planned_branch ELSE %(branch)s END,
    planned_at = CASE WHEN u.planned AND u.state NOT IN (7 /* ERRORED */, 9 /* PENDING_RETRY */) THEN l.claimed_at ELSE l.planned_at END,
    lease_owner = NULL,
    lease_expires_at = NULL,
    lease_expiries = CASE WHEN u.state IN (7 /* ERRORED */, 9 /* PENDING_RETRY */) THEN l.lease_expiries ELSE 0 END,
    answer_lost_at = CASE WHEN u.answer_lost THEN now() WHEN u.answer_lost IS NULL THEN l.answer_lost_at END,
    timeouts = CASE WHEN u.timed_out THEN l.timeouts + 1 WHEN u.state IN (7 /* ERRORED */, 9 /* PENDING_RETRY */) THEN l.timeouts ELSE 0 END,
    attempts = CASE WHEN u.refund THEN greatest(l.attempts - 1, 0) ELSE l.attempts END,
    updated_at = now()
FROM unnest(%(ids)s::bigint[], %(states)s::smallint[], %(errors)s::jsonb[], %(retry_in)s::float8[],
            %(superseded)s::boolean[], %(answer_lost)s::boolean[], %(timed_out)s::boolean[], %(refund)s::boolean[],
            %(planned)s::boolean[])
     AS u (id, state, error, retry_in, superseded, answer_lost, timed_out, refund, planned)
WHERE l.id = u.id AND l.lease_owner = %(owner)s
RETURNING l.id;

-- clone_for_drift --
-- New rows for re-observed APPLIED rows whose plan has changes (drift): a copy of the prior row in
-- its new state, the new head of its entity hash.
INSERT INTO ingestion_logs (object_type, request_id, ingestion_ts, source_ts, producer_app_name, producer_app_version,
                            sdk_name, sdk_version, entity, entity_hash, source_metadata, state, error, planned_branch,
                            drift_of, planned_at, drift_keys)
SELECT p.object_type, p.request_id, %(now_ns)s, p.source_ts, p.producer_app_name, p.producer_app_version,
       p.sdk_name, p.sdk_version, p.entity, p.entity_hash, p.source_metadata, u.state, u.error, %(branch)s, p.id,
       p.claimed_at, p.drift_keys
FROM ingestion_logs AS p
JOIN unnest(%(ids)s::bigint[], %(states)s::smallint[], %(errors)s::jsonb[]) AS u (id, state, error) ON p.id = u.id
ORDER BY p.id
RETURNING id, drift_of;

-- allocate_change_set_ids --
-- The first id of a block of 10,000 (migration 0003): the batch's change sets take ids from it.
SELECT nextval(pg_get_serial_sequence('change_sets', 'id'));

-- copy_change_sets --
-- Warnings are NULL when the plugin gave none (migration 0011).
COPY change_sets (id, external_id, ingestion_log_id, branch_id, deviation_name, plan_warnings, apply_warnings)
FROM STDIN WITH (FORMAT binary);

-- copy_changes --
COPY changes (external_id, change_set_id, change_type, object_type, object_primary_value, object_id, ref_id,
              object_version, before, after, new_refs, sequence_number)
FROM STDIN WITH (FORMAT binary);

-- keep_latest_change_sets --
-- At most %(keep)s change sets per row, the newest (in the same transaction as the new ones).
DELETE FROM change_sets
WHERE id IN (SELECT id FROM (SELECT id, row_number() OVER (PARTITION BY ingestion_log_id ORDER BY id DESC) AS rank
                             FROM change_sets WHERE ingestion_log_id = ANY(%(ids)s::bigint[])) AS ranked
             WHERE rank > %(keep)s);

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

-- status_rows_per_state --
-- Rows per state: a scan of the whole table, for an operator's `status`, never on a hot path.
SELECT state, count(*) FROM ingestion_logs GROUP BY state;

-- status_oldest_queued --
-- Seconds the longest-waiting QUEUED row has waited since its last change (queued, requeued,
-- re-observed), over the partial index of QUEUED rows; NULL when nothing is queued.
SELECT extract(epoch FROM now() - min(updated_at))::float8 FROM ingestion_logs WHERE state = 1 /* QUEUED */;

-- status_leases --
-- Rows in flight (claimed under a lease) and those whose lease expired (their worker died or
-- hangs; the next lease sweep returns them to QUEUED), over the partial index of leased rows.
SELECT count(*), count(*) FILTER (WHERE lease_expires_at < now())
FROM ingestion_logs WHERE lease_owner IS NOT NULL;

-- status_retries --
-- PENDING_RETRY rows, and those due within %(soon_seconds)s (overdue ones included).
SELECT count(*), count(*) FILTER (WHERE next_attempt_at <= now() + %(soon_seconds)s * interval '1 second')
FROM ingestion_logs WHERE state = 9 /* PENDING_RETRY */;

-- status_dead_letters --
SELECT count(*), min(created_at), max(created_at) FROM dead_letters;

-- process_heartbeat --
-- One process's heartbeat (migration 0005).
SELECT process_heartbeat_v1(%(host)s, %(pid)s, %(role)s, %(started_at)s);

-- live_processes --
-- Processes whose heartbeat is recent; the age of the last one, in seconds, comes along.
SELECT host, pid, role, started_at, last_seen, extract(epoch FROM now() - last_seen)::float8
FROM processes
WHERE last_seen > now() - %(within_seconds)s * interval '1 second'
ORDER BY host, role, pid;

-- retry_preview --
-- What `reconciler retry` matches, by state, object type and whether the row is the head (the
-- current row of its entity hash). Age is the time since the row last changed: when it failed.
SELECT state, object_type, is_head, count(*)
FROM ingestion_logs
WHERE state = ANY(%(states)s::smallint[])
  AND (%(object_type)s::text IS NULL OR object_type = %(object_type)s::text)
  AND (%(older_than)s::float8 IS NULL OR updated_at < now() - %(older_than)s::float8 * interval '1 second')
  AND (%(newer_than)s::float8 IS NULL OR updated_at >= now() - %(newer_than)s::float8 * interval '1 second')
GROUP BY state, object_type, is_head
ORDER BY state, object_type, is_head;

-- retry_batch --
-- Up to %(limit)s matching head rows after id %(after)s back to QUEUED, as a worker finds a fresh
-- row: no lease, no attempts, no due time, no error. Only heads: a superseded row requeued beside
-- its entity's current row would have the entity planned twice. requeued_from_state records where
-- the row came from, as a re-observation does (mark_duplicates); an ERRORED drift check keeps its
-- APPLIED origin, so its plan is still judged as a drift check. Locked in id order (the order every
-- writer uses); a row a concurrent writer changed is re-checked after its lock is granted. A row
-- that gave up on a request NetBox may still be working on keeps waiting for it (PENDING_RETRY until
-- then: its next_attempt_at, 0009), so a retry never overlaps that request.
WITH picked AS (
    SELECT id, state FROM ingestion_logs
    WHERE state = ANY(%(states)s::smallint[]) AND is_head AND id > %(after)s
      AND (%(object_type)s::text IS NULL OR object_type = %(object_type)s::text)
      AND (%(older_than)s::float8 IS NULL OR updated_at < now() - %(older_than)s::float8 * interval '1 second')
      AND (%(newer_than)s::float8 IS NULL OR updated_at >= now() - %(newer_than)s::float8 * interval '1 second')
    ORDER BY id
    LIMIT %(limit)s
    FOR UPDATE
)
UPDATE ingestion_logs AS l
SET state = CASE WHEN l.next_attempt_at > now() THEN 9 /* PENDING_RETRY */ ELSE 1 /* QUEUED */ END,
    requeued_from_state = CASE WHEN picked.state = 7 /* ERRORED */ THEN coalesce(l.requeued_from_state, 7 /* ERRORED */) ELSE picked.state END,
    error = NULL, attempts = 0, lease_expiries = 0, timeouts = 0, lease_owner = NULL, lease_expires_at = NULL,
    next_attempt_at = CASE WHEN l.next_attempt_at > now() THEN l.next_attempt_at END, updated_at = now()
FROM picked
WHERE l.id = picked.id
RETURNING l.id, picked.state, l.object_type;

-- list_dead_letters --
-- The first %(limit)s dead letters (all with NULL), oldest first, with the size of their fields.
SELECT id, stream_id, entity_index, reason, created_at,
       (SELECT coalesce(sum(octet_length(value)), 0) FROM unnest(field_values) AS value)::bigint
FROM dead_letters
ORDER BY id
LIMIT %(limit)s;

-- get_dead_letter --
SELECT id, stream, stream_id, entity_index, reason, created_at, replayed_at, field_names, field_values
FROM dead_letters WHERE id = %(id)s;

-- newest_dead_letter --
-- Where a replay or purge ends: letters written while it runs (a replayed entry that is still bad
-- comes back as a new letter) are not its business, or a replay would chase its own output.
SELECT coalesce(max(id), 0) FROM dead_letters;

-- select_dead_letters --
-- A page of the dead letters an operator selected (ids, or all, optionally only those older
-- than %(older_than)s seconds) after id %(after)s and up to id %(upto)s, with their sizes but not
-- their payloads.
SELECT id, (SELECT coalesce(sum(octet_length(value)), 0) FROM unnest(field_values) AS value)::bigint
FROM dead_letters
WHERE id > %(after)s AND id <= %(upto)s
  AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]))
  AND (%(older_than)s::float8 IS NULL OR created_at < now() - %(older_than)s::float8 * interval '1 second')
ORDER BY id
LIMIT %(limit)s;

-- lock_dead_letters --
-- The fields of dead letters about to be replayed, locked until the replay's transaction ends; a
-- letter another replay holds is skipped, so two operators never replay one letter twice.
SELECT id, field_names, field_values FROM dead_letters
WHERE id = ANY(%(ids)s::bigint[])
ORDER BY id
FOR UPDATE SKIP LOCKED;

-- delete_dead_letters --
DELETE FROM dead_letters WHERE id = ANY(%(ids)s::bigint[]) RETURNING id;

-- get_ingestion_log --
-- One row: the entity as bytes (the caller renders it as protojson), the hash in hex, and every
-- column as JSON in table order (json, not jsonb, keeps the order).
SELECT l.entity, encode(l.entity_hash, 'hex'), row_to_json(l)
FROM ingestion_logs AS l WHERE l.id = %(id)s;

-- change_sets_of_row --
-- A row's change sets, oldest first, each with its changes in sequence order.
SELECT row_to_json(cs), coalesce((SELECT json_agg(row_to_json(c) ORDER BY c.sequence_number)
                                  FROM changes AS c WHERE c.change_set_id = cs.id), '[]'::json)
FROM change_sets AS cs
WHERE cs.ingestion_log_id = %(id)s
ORDER BY cs.id;

-- ping --
-- /readyz: Postgres answers, within the probe's statement timeout.
SELECT 1;

-- change_log_progress --
-- With Postgres' clock, which NetBox's is checked against.
SELECT high_water, trusted_since, now() FROM change_log;

-- change_log_read --
-- A read of NetBox's change log that went through: the changes it found, then its progress. The
-- high-water mark only moves forward (two replicas may read at once); trusted_since moves when the
-- read could not start where the last one ended (its first, or after a gap longer than max_age).
UPDATE change_log
SET high_water = greatest(high_water, %(high_water)s),
    trusted_since = CASE WHEN %(restarted)s OR trusted_since IS NULL THEN %(read_from)s ELSE trusted_since END,
    read_at = now(), failing_since = NULL, failure_kind = NULL, failure = NULL
RETURNING high_water, trusted_since;

-- change_log_failed --
UPDATE change_log SET failing_since = coalesce(failing_since, now()), failure_kind = %(kind)s, failure = %(failure)s;

-- store_netbox_changes --
-- Reads overlap (each starts clock_margin_seconds before the last high-water mark): what is kept
-- already is left alone, and the ids of the changes new to us are returned.
INSERT INTO netbox_changes (key, changed_at, change_id)
SELECT * FROM unnest(%(keys)s::text[], %(changed_at)s::timestamptz[], %(change_ids)s::bigint[])
ON CONFLICT DO NOTHING
RETURNING change_id;

-- prune_netbox_changes --
-- Changes older than any plan a CHECKING row may still be judged by: older plans are re-planned by
-- max_age anyway.
DELETE FROM netbox_changes WHERE read_at < now() - %(keep_seconds)s::float8 * interval '1 second'
                             AND changed_at < now() - %(keep_seconds)s::float8 * interval '1 second';

-- checking_without_keys --
SELECT id, entity FROM ingestion_logs WHERE state = 10 /* CHECKING */ AND drift_keys IS NULL ORDER BY id LIMIT %(limit)s;

-- store_drift_keys --
-- Keys joined by newlines: unnest cannot take an array of arrays of different lengths.
UPDATE ingestion_logs AS l SET drift_keys = string_to_array(k.keys, E'\n')
FROM unnest(%(ids)s::bigint[], %(keys)s::text[]) AS k (id, keys)
WHERE l.id = k.id AND l.state = 10 /* CHECKING */;

-- settle_checks --
-- Rows in CHECKING since no later than %(seen_before)s (NULL: any) go back to the state they were
-- seen in (requeued_from_state), or to QUEUED to be planned again when: %(replan_all)s (the change
-- log cannot be read), they were never planned since 0010, or planned in a branch (whose changes
-- are not in main's change log), their last plan is older than %(max_age)s seconds (0: no floor),
-- or, with %(match)s, it came before the change log was read continuously, their entity could not
-- be given keys, or a change in NetBox by someone other than the plugin met one of their keys and
-- was stamped or first read at or after their last plan (less %(margin)s seconds). A row without
-- keys yet waits for them when changes are matched. Locked in id order, like every other writer of many rows. The keys are
-- matched as one join of the batch's keys with the kept changes (a hash join, whatever the size of
-- either), not as a probe per row and key, which Postgres may run as a scan of netbox_changes per
-- row (docs/benchmarks.md, bench/driftsettle.py).
WITH waiting AS (
    SELECT id FROM ingestion_logs
    WHERE state = 10 /* CHECKING */ AND (%(seen_before)s::timestamptz IS NULL OR checking_since <= %(seen_before)s::timestamptz)
      AND (drift_keys IS NOT NULL OR NOT %(match)s OR %(replan_all)s)
    ORDER BY id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), met AS (
    SELECT DISTINCT l.id
    FROM ingestion_logs AS l
    JOIN waiting ON l.id = waiting.id
    CROSS JOIN LATERAL unnest(l.drift_keys) AS k (key)
    JOIN netbox_changes AS c ON c.key = k.key
    WHERE %(match)s AND greatest(c.changed_at, c.read_at) >= l.planned_at - %(margin)s * interval '1 second'
), judged AS (
    SELECT l.id, (%(replan_all)s OR l.planned_at IS NULL OR l.planned_branch IS DISTINCT FROM ''
                  OR (%(max_age)s > 0 AND l.planned_at < now() - %(max_age)s * interval '1 second')
                  OR (%(match)s AND (l.planned_at < %(trusted_since)s::timestamptz + %(margin)s * interval '1 second'
                                     OR cardinality(l.drift_keys) = 0 OR l.id IN (SELECT id FROM met))))
           AS replan
    FROM ingestion_logs AS l JOIN waiting ON l.id = waiting.id
)
UPDATE ingestion_logs AS l
SET state = CASE WHEN j.replan THEN 1 /* QUEUED */ ELSE l.requeued_from_state END,
    requeued_from_state = CASE WHEN j.replan THEN l.requeued_from_state END,
    error = CASE WHEN j.replan THEN NULL ELSE l.error END,
    attempts = CASE WHEN j.replan THEN 0 ELSE l.attempts END,
    updated_at = now()
FROM judged AS j
WHERE l.id = j.id
RETURNING j.replan;

-- tally_checks --
INSERT INTO drift_tally (skipped, planned) VALUES (%(skipped)s, %(planned)s);

-- prune_drift_tally --
DELETE FROM drift_tally WHERE at < now() - interval '1 hour';

-- status_drift --
SELECT c.high_water, c.trusted_since, c.read_at, c.failing_since, c.failure_kind, c.failure,
       (SELECT coalesce(sum(skipped), 0) FROM drift_tally WHERE at >= now() - interval '1 hour'),
       (SELECT coalesce(sum(planned), 0) FROM drift_tally WHERE at >= now() - interval '1 hour'),
       (SELECT count(*) FROM ingestion_logs WHERE state = 10 /* CHECKING */),
       now() - c.high_water
FROM change_log AS c;

-- deviations_page --
-- `reconciler deviations list` (and the rows `apply --all` and `ignore --all` act on): the rows
-- review_selection_v1 (migration 0011) matches, newest first, %(limit)s of them (NULL: all) before
-- id %(before)s (NULL: from the newest) and planned before %(planned_before)s (NULL: whenever), each
-- with its latest change set: its name, branch,
-- warnings and changes counted by type (noops left out: they change nothing). "Planned" is when the
-- claim that made its plan was taken (planned_at, 0010), or when the row arrived if never planned.
SELECT l.id, l.state, l.object_type, cs.deviation_name, l.planned_branch, l.producer_app_name,
       coalesce(l.planned_at, l.created_at), extract(epoch FROM now() - coalesce(l.planned_at, l.created_at))::float8,
       l.is_head, cs.id,
       coalesce((SELECT json_object_agg(t.change_type, t.n ORDER BY t.change_type)
                 FROM (SELECT change_type, count(*) AS n FROM changes
                       WHERE change_set_id = cs.id AND change_type <> 'noop' GROUP BY change_type) AS t), '{}'::json),
       cs.plan_warnings IS NOT NULL OR cs.apply_warnings IS NOT NULL
FROM review_selection_v1(%(states)s::smallint[], %(object_type)s, %(since)s::float8, %(branch)s, %(producer)s,
                         %(name)s, %(ids)s::bigint[]) AS m
JOIN ingestion_logs AS l ON l.id = m.id
LEFT JOIN change_sets AS cs ON cs.id = m.change_set_id
WHERE (%(before)s::bigint IS NULL OR m.id < %(before)s::bigint)
  AND (%(planned_before)s::timestamptz IS NULL OR coalesce(l.planned_at, l.created_at) < %(planned_before)s::timestamptz)
ORDER BY m.id DESC
LIMIT %(limit)s::bigint;

-- deviations_tally --
-- How many rows review_selection_v1 matches, by state and object type.
SELECT state, object_type, count(*)
FROM review_selection_v1(%(states)s::smallint[], %(object_type)s, %(since)s::float8, %(branch)s, %(producer)s,
                         %(name)s, %(ids)s::bigint[])
GROUP BY state, object_type
ORDER BY state, object_type;

-- review_targets --
-- The rows an operator named by id, as they are now: whether they exist, their state, whether
-- they are the current row of their entity and whether a worker or an apply holds them.
SELECT l.id, l.state, l.is_head, l.lease_owner IS NOT NULL,
       (SELECT max(c.id) FROM change_sets AS c WHERE c.ingestion_log_id = l.id)
FROM ingestion_logs AS l WHERE l.id = ANY(%(ids)s::bigint[]);

-- database_now --
SELECT now();

-- claim_for_apply --
-- OPEN rows for one `deviations apply` run, leased like a worker's claim (claim_batch) and committed
-- before the plugin is asked, so no worker, no other apply and no ignore can act on them meanwhile;
-- a row someone else holds is skipped (SKIP LOCKED, and a lease), and so is a row planned again
-- since the operator saw it (%(expected)s: the change set id reviewed, NULL: whichever is latest).
-- APPLYING while the apply may be
-- in flight: if the run dies holding them, the lease sweep sends them to QUEUED with answer_lost_at,
-- to be planned afresh, never applied again. attempts start again at 0: what they counted (plan
-- attempts) is done. The row's latest change set, the one reviewed, comes along.
WITH picked AS (
    SELECT l.id FROM ingestion_logs AS l
    JOIN unnest(%(ids)s::bigint[], %(expected)s::bigint[]) AS u (id, expected) ON u.id = l.id
    WHERE l.state = 2 /* OPEN */ AND l.lease_owner IS NULL
      AND (u.expected IS NULL OR u.expected = (SELECT max(c.id) FROM change_sets AS c WHERE c.ingestion_log_id = l.id))
    ORDER BY l.id
    FOR UPDATE OF l SKIP LOCKED
)
UPDATE ingestion_logs AS l
SET state = 8 /* APPLYING */, lease_owner = %(owner)s,
    lease_expires_at = now() + %(lease_seconds)s::float8 * interval '1 second',
    attempts = 0, claimed_at = now(), updated_at = now()
FROM picked
WHERE l.id = picked.id
RETURNING l.id, l.object_type, l.entity, coalesce(l.planned_branch, ''), l.answer_lost_at,
          (SELECT row_to_json(cs) FROM (SELECT id, external_id, branch_id, deviation_name FROM change_sets
                                        WHERE ingestion_log_id = l.id ORDER BY id DESC LIMIT 1) AS cs),
          (SELECT coalesce(json_agg(row_to_json(c) ORDER BY c.sequence_number), '[]'::json)
           FROM changes AS c
           WHERE c.change_set_id = (SELECT max(id) FROM change_sets WHERE ingestion_log_id = l.id));

-- lock_rows --
-- Rows about to be written by one transaction in several statements, locked first in id order, the
-- order every writer uses (lock_heads, finish_rows), so that none of them deadlocks with it.
SELECT id FROM ingestion_logs WHERE id = ANY(%(ids)s::bigint[]) ORDER BY id FOR UPDATE;

-- release_apply_claims --
-- Claimed rows an apply did not change (the plugin could not be asked, or refused the apply in a
-- way that rolled it back) go back to OPEN as they were, if the apply still holds them.
UPDATE ingestion_logs
SET state = 2 /* OPEN */, lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
WHERE id = ANY(%(ids)s::bigint[]) AND lease_owner = %(owner)s
RETURNING id;

-- note_apply_warnings --
-- What an apply reported on the change set it applied (migration 0011).
UPDATE change_sets AS cs SET apply_warnings = u.warnings, updated_at = now()
FROM unnest(%(ids)s::bigint[], %(warnings)s::jsonb[]) AS u (id, warnings)
WHERE cs.id = u.id;

-- record_reviews --
-- The audit trail of what operators did (migration 0011), one row per action on a row.
INSERT INTO reviews (ingestion_log_id, change_set_id, action, outcome, operator, reason, detail)
SELECT u.log_id, u.change_set_id, %(action)s, u.outcome, %(operator)s, %(reason)s, u.detail
FROM unnest(%(ids)s::bigint[], %(change_sets)s::bigint[], %(outcomes)s::text[], %(details)s::jsonb[])
     AS u (log_id, change_set_id, outcome, detail);

-- ignore_rows --
-- OPEN and FAILED rows an operator ignores: IGNORED (6), which a new observation of the same entity
-- leaves alone (mark_duplicates only counts it). Rows a worker or an apply holds are left out;
-- locked in id order, a concurrent change re-checked once the lock is granted. Returns the rows
-- ignored, with the state they had and their latest change set, for the audit trail.
WITH picked AS (
    SELECT id, state FROM ingestion_logs
    WHERE id = ANY(%(ids)s::bigint[]) AND state IN (2 /* OPEN */, 4 /* FAILED */) AND lease_owner IS NULL
    ORDER BY id
    FOR UPDATE
)
UPDATE ingestion_logs AS l
SET state = 6 /* IGNORED */, next_attempt_at = NULL, updated_at = now()
FROM picked
WHERE l.id = picked.id
RETURNING l.id, picked.state, (SELECT max(id) FROM change_sets WHERE ingestion_log_id = l.id);

-- unignore_rows --
-- IGNORED rows back to QUEUED, planned again as a fresh row would be (retry_batch does the same for
-- FAILED rows), requeued_from_state 6. Only the current row of its entity: a superseded one
-- requeued beside it would have the entity planned twice.
WITH picked AS (
    SELECT id FROM ingestion_logs
    WHERE id = ANY(%(ids)s::bigint[]) AND state = 6 /* IGNORED */ AND is_head
    ORDER BY id
    FOR UPDATE
)
UPDATE ingestion_logs AS l
SET state = 1 /* QUEUED */, requeued_from_state = 6 /* IGNORED */, error = NULL, attempts = 0, lease_expiries = 0,
    timeouts = 0, next_attempt_at = NULL, updated_at = now()
FROM picked
WHERE l.id = picked.id
RETURNING l.id, (SELECT max(id) FROM change_sets WHERE ingestion_log_id = l.id);

-- reviews_of_row --
-- A row's audit trail, oldest first.
SELECT action, outcome, operator, reason, at, change_set_id, detail FROM reviews
WHERE ingestion_log_id = %(id)s ORDER BY id;

-- prune_superseded_rows --
-- One step of retention's walk over the rows that are no longer their entity's current row, in id
-- order from %(after)s: of the next %(limit)s, those finished (APPLIED, FAILED, NO_CHANGES,
-- IGNORED, ERRORED), unclaimed and unchanged for %(keep_days)s days go, with their change sets and
-- changes (0003's triggers). Rows someone holds are skipped, never waited for (SKIP LOCKED; the
-- conditions are checked again on the locked row). %(dry_run)s: count them, delete nothing.
-- Returns the last id looked at (NULL: the walk is over), whether the walk reached rows too
-- recent to go (never, here: superseded rows are not in time order), and how many went.
WITH batch AS (SELECT id FROM ingestion_logs WHERE NOT is_head AND id > %(after)s ORDER BY id LIMIT %(limit)s),
     doomed AS (SELECT l.id FROM ingestion_logs AS l
                WHERE l.id IN (SELECT id FROM batch) AND NOT l.is_head
                  AND l.state IN (3 /* APPLIED */, 4 /* FAILED */, 5 /* NO_CHANGES */, 6 /* IGNORED */, 7 /* ERRORED */)
                  AND l.lease_owner IS NULL AND l.updated_at < now() - %(keep_days)s * interval '1 day'
                FOR UPDATE SKIP LOCKED),
     gone AS (DELETE FROM ingestion_logs WHERE id IN (SELECT id FROM doomed) AND NOT %(dry_run)s RETURNING id)
SELECT (SELECT max(id) FROM batch), false, (SELECT count(*) FROM doomed);

-- prune_superseded_change_sets --
-- One step of retention's walk over change sets in id order (their creation order: ids are taken as
-- batches are recorded), resumed where the last walk ended (pruned.walked_to): each change set made
-- more than %(keep_days)s days ago has superseded its row's previous one that long, and that one goes,
-- with its changes (each change set is superseded by the next of its row: the one before that went
-- when its own successor was walked). The step ends before the first change set younger than that, where the next walk
-- resumes, so each change set is walked once however large the table grows. A row's latest change
-- set is never deleted (the review compares against it). Returns the last change set walked (NULL:
-- none), whether the walk reached one too young, and how many went.
WITH batch AS (SELECT id, ingestion_log_id, created_at FROM change_sets WHERE id > %(after)s ORDER BY id
               LIMIT %(limit)s),
     young AS (SELECT min(id) AS id FROM batch WHERE created_at >= now() - %(keep_days)s * interval '1 day'),
     crossed AS (SELECT id, ingestion_log_id FROM batch
                 WHERE id < coalesce((SELECT id FROM young), 9223372036854775807)),
     doomed AS (SELECT c.id FROM change_sets AS c
                WHERE c.id IN (SELECT (SELECT older.id FROM change_sets AS older
                                       WHERE older.ingestion_log_id = crossed.ingestion_log_id
                                         AND older.id < crossed.id
                                       ORDER BY older.id DESC LIMIT 1)
                               FROM crossed)
                FOR UPDATE SKIP LOCKED),
     gone AS (DELETE FROM change_sets WHERE id IN (SELECT id FROM doomed) AND NOT %(dry_run)s RETURNING id)
SELECT (SELECT max(id) FROM crossed), (SELECT id FROM young) IS NOT NULL, (SELECT count(*) FROM doomed);

-- prune_dead_letters --
-- One step of retention's walk over dead letters in id order (their arrival order): of the next
-- %(limit)s after %(after)s, those older than %(keep_days)s days go, replayed or not. The walk ends at the
-- first one younger than that.
WITH batch AS (SELECT id, created_at FROM dead_letters WHERE id > %(after)s ORDER BY id LIMIT %(limit)s),
     doomed AS (SELECT d.id FROM dead_letters AS d JOIN batch AS b ON b.id = d.id
                WHERE b.created_at < now() - %(keep_days)s * interval '1 day'
                FOR UPDATE OF d SKIP LOCKED),
     gone AS (DELETE FROM dead_letters WHERE id IN (SELECT id FROM doomed) AND NOT %(dry_run)s RETURNING id)
SELECT (SELECT max(id) FROM batch), coalesce((SELECT max(created_at) >= now() - %(keep_days)s * interval '1 day' FROM batch), false),
       (SELECT count(*) FROM doomed);

-- commit_without_waiting --
-- For retention's steps: their commits need not wait for the WAL flush (a step lost in a crash is
-- walked again), so they add no flush of their own to what the claims' commits wait for.
SET LOCAL synchronous_commit = off;

-- tally_pruned --
-- What one step deleted, and for a walk that resumes, how far it got (%(walked_to)s; NULL: no change).
INSERT INTO pruned (kind, deleted, last_at, walked_to)
VALUES (%(kind)s, %(deleted)s, CASE WHEN %(deleted)s > 0 THEN now() END, coalesce(%(walked_to)s, 0))
ON CONFLICT (kind) DO UPDATE
SET deleted = pruned.deleted + excluded.deleted,
    last_at = CASE WHEN excluded.deleted > 0 THEN now() ELSE pruned.last_at END,
    walked_to = coalesce(%(walked_to)s, pruned.walked_to);

-- pruned_walked_to --
-- Where the last walk of a kind that resumes ended (0: it never walked).
SELECT coalesce((SELECT walked_to FROM pruned WHERE kind = %(kind)s), 0);

-- pruner_lock --
-- One pruner at a time across replicas (session level: held for a whole walk, released if the
-- process dies). True when taken.
SELECT pg_try_advisory_lock(hashtext(%(key)s));

-- pruner_unlock --
SELECT pg_advisory_unlock(hashtext(%(key)s));

-- status_retention --
-- What retention deleted so far, per kind, and when it last deleted something.
SELECT kind, deleted, last_at FROM pruned ORDER BY kind;

-- status_storage --
-- The oldest row (the lowest id: ids follow arrival) and each growing table's size with its
-- indexes and TOAST, and its indexes alone, in bytes.
SELECT (SELECT created_at FROM ingestion_logs ORDER BY id LIMIT 1),
       t.name, pg_total_relation_size(t.name::regclass), pg_indexes_size(t.name::regclass)
FROM unnest(ARRAY['ingestion_logs', 'change_sets', 'changes', 'dead_letters']) AS t (name);

-- report_dependency --
-- One process's view of one dependency (migration 0012), written by its owner (dependencies.py). Views
-- nobody confirmed for a day go: a host renamed or gone (a new container) leaves its rows behind.
WITH forgotten AS (DELETE FROM dependency_health WHERE checked_at < now() - interval '1 day')
INSERT INTO dependency_health (host, dependency, up, since, problem, kind, checked_at)
VALUES (%(host)s, %(dependency)s, %(up)s, %(since)s, %(problem)s, %(kind)s, now())
ON CONFLICT (host, dependency) DO UPDATE
SET up = excluded.up, since = excluded.since, problem = excluded.problem, kind = excluded.kind,
    checked_at = excluded.checked_at;

-- dependency_health --
-- Every replica's view of its dependencies, with how long ago each was last confirmed.
SELECT host, dependency, up, since, problem, kind, extract(epoch FROM now() - checked_at)::float8
FROM dependency_health ORDER BY host, dependency;

-- take_fold_turn --
-- One folder at a time (every replica's consumer and api fold): the others find it taken and leave
-- the deltas to it. Held until the fold's transaction ends.
SELECT pg_try_advisory_xact_lock(hashtext(%(key)s));

-- fold_state_counts --
-- Moves the counters' deltas into state_counts (migration 0013), by whoever has the turn; upserts
-- in key order.
WITH moved AS (DELETE FROM state_count_deltas RETURNING state, object_type, n),
     summed AS (SELECT state, object_type, sum(n) AS n FROM moved GROUP BY state, object_type)
INSERT INTO state_counts AS s (state, object_type, n)
SELECT state, object_type, n FROM summed ORDER BY state, object_type
ON CONFLICT (state, object_type) DO UPDATE SET n = s.n + excluded.n;

-- drop_empty_state_counts --
DELETE FROM state_counts WHERE n = 0;

-- state_counts --
-- Rows per stored state, of the object types given (NULL: all), from the counters.
SELECT state, sum(n)::bigint
FROM (SELECT state, object_type, n FROM state_counts
      UNION ALL
      SELECT state, object_type, n FROM state_count_deltas) AS c
WHERE %(object_types)s::text[] IS NULL OR object_type = ANY(%(object_types)s::text[])
GROUP BY state;

-- read_snapshot --
-- The read API's statements of one call see one snapshot: a page's rows and their change sets agree.
SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY;

-- limit_statement_time --
-- A call whose caller gives up sooner than the connection's statement_timeout: its statements stop then.
SELECT set_config('statement_timeout', %(ms)s, true);

-- api_deviation_ids --
-- RetrieveDeviations filtered on states that each have a partial index on id (QUEUED and CHECKING,
-- OPEN and IGNORED, FAILED and ERRORED, PENDING_RETRY): a page of rows that have a plan, newest first,
-- below the page token's id.
SELECT l.id
FROM ingestion_logs AS l
WHERE l.id < %(below)s
  AND l.state = ANY(%(states)s::smallint[])
  AND EXISTS (SELECT 1 FROM change_sets AS c WHERE c.ingestion_log_id = l.id)
  AND api_row_matches_v1(l, %(object_types)s::text[], %(since)s::bigint, %(until)s::bigint)
  AND (%(branches)s::text[] IS NULL OR api_branch_matches_v1(l.id, %(branches)s::text[]))
ORDER BY l.id DESC
LIMIT %(limit)s;

-- api_planned_ids --
-- RetrieveDeviations otherwise: the same page, found by walking down from the token's id through the
-- rows that have a plan, one step of change_sets' index each, so rows never planned (a backlog of
-- QUEUED rows, the newest of all) cost nothing. Each step yields the next lower id, so they come out
-- newest first by construction; the filters are a scalar subquery on that walk (an EXISTS would be
-- turned into a join, free to reorder it).
WITH RECURSIVE planned (id) AS (
    SELECT (SELECT max(c.ingestion_log_id) FROM change_sets AS c WHERE c.ingestion_log_id < %(below)s)
    UNION ALL
    SELECT (SELECT max(c.ingestion_log_id) FROM change_sets AS c WHERE c.ingestion_log_id < p.id)
    FROM planned AS p
    WHERE p.id IS NOT NULL
)
SELECT p.id
FROM planned AS p
WHERE p.id IS NOT NULL
  AND (SELECT true
       FROM ingestion_logs AS l
       WHERE l.id = p.id
         AND (%(states)s::smallint[] IS NULL OR l.state = ANY(%(states)s::smallint[]))
         AND api_row_matches_v1(l, %(object_types)s::text[], %(since)s::bigint, %(until)s::bigint)
         AND (%(branches)s::text[] IS NULL OR api_branch_matches_v1(l.id, %(branches)s::text[])))
LIMIT %(limit)s;

-- api_ingestion_log_ids --
-- RetrieveIngestionLogs: a page of rows, newest first, below the page token's id.
SELECT l.id
FROM ingestion_logs AS l
WHERE l.id < %(below)s
  AND (%(states)s::smallint[] IS NULL OR l.state = ANY(%(states)s::smallint[]))
  AND (%(request_id)s::text IS NULL OR l.request_id = %(request_id)s::text)
  AND api_row_matches_v1(l, %(object_types)s::text[], %(since)s::bigint, %(until)s::bigint)
ORDER BY l.id DESC
LIMIT %(limit)s;

-- api_count_ingestion_logs --
-- only_metrics with a filter the counters do not keep (a request id, a time range): counted.
SELECT l.state, count(*)
FROM ingestion_logs AS l
WHERE (%(states)s::smallint[] IS NULL OR l.state = ANY(%(states)s::smallint[]))
  AND (%(request_id)s::text IS NULL OR l.request_id = %(request_id)s::text)
  AND api_row_matches_v1(l, %(object_types)s::text[], %(since)s::bigint, %(until)s::bigint)
GROUP BY l.state;

-- api_row_of_external_id --
-- The row an API id names. QUEUED rows are not in ingestion_logs_external_id (migration 0013): they
-- are looked for among the queued ones only when no other row has the id.
SELECT id FROM (
    SELECT id FROM ingestion_logs WHERE external_id = %(external_id)s::uuid AND state <> 1 /* QUEUED */
    UNION ALL
    SELECT id FROM ingestion_logs WHERE external_id = %(external_id)s::uuid AND state = 1 /* QUEUED */
) AS found
LIMIT 1;

-- api_rows --
-- The rows of a page, newest first, each with its latest change set (none: NULLs), and either that
-- change set's changes as a JSON array of [id, object type, primary value, change type, before,
-- after], before and after as JSON text (a Deviation's), or with %(with_change_set_data)s the whole
-- change set as the plugin gave it, as JSON text (an IngestionLog's).
SELECT l.id, l.external_id::text, l.state, l.object_type, l.request_id, l.ingestion_ts, l.source_ts,
       (extract(epoch FROM l.updated_at) * 1000000)::bigint * 1000,
       l.producer_app_name, l.producer_app_version, l.sdk_name, l.sdk_version, l.entity,
       l.error ->> 'message', l.error ->> 'code', (l.error -> 'details')::text,
       cs.external_id, cs.branch_id, cs.deviation_name,
       CASE WHEN NOT %(with_change_set_data)s THEN (
           SELECT json_agg(json_build_array(c.external_id, c.object_type, c.object_primary_value, c.change_type,
                                            c.before::text, c.after::text) ORDER BY c.sequence_number)
           FROM changes AS c WHERE c.change_set_id = cs.id)::text END,
       CASE WHEN %(with_change_set_data)s AND cs.id IS NOT NULL THEN json_build_object(
           'id', cs.external_id,
           'branch', CASE WHEN cs.branch_id IS NOT NULL THEN json_build_object(
               'id', substring(cs.branch_id FROM '\(([^()]*)\)$'),
               'name', substring(cs.branch_id FROM '^(.*) \([^()]*\)$')) END,
           'changes', coalesce((SELECT json_agg(json_build_object(
               'change_type', c.change_type, 'object_type', c.object_type,
               'object_primary_value', c.object_primary_value, 'object_id', c.object_id, 'ref_id', c.ref_id,
               'object_version', c.object_version, 'before', c.before, 'data', c.after, 'new_refs', c.new_refs)
               ORDER BY c.sequence_number) FROM changes AS c WHERE c.change_set_id = cs.id), '[]'::json))::text END
FROM ingestion_logs AS l
LEFT JOIN LATERAL (SELECT c.id, c.external_id, c.branch_id, c.deviation_name FROM change_sets AS c
                   WHERE c.ingestion_log_id = l.id ORDER BY c.id DESC LIMIT 1) AS cs ON true
WHERE l.id = ANY(%(ids)s::bigint[])
ORDER BY l.id DESC;
