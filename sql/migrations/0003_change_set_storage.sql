-- 0003: cheaper change-set storage, measured with bench/process.py (one worker, instant plugin:
-- 3,250 -> 4,970 rows/s together with finish_rows no longer locking rows before updating them).
--
--  * changes are keyed by (change_set_id, sequence_number), their natural key: one index instead
--    of an identity sequence plus two indexes. Nothing refers to changes.id.
--  * the foreign keys changes -> change_sets -> ingestion_logs are replaced by cascading delete
--    triggers. A foreign key checks (and KEY SHARE-locks) the referenced row for every inserted
--    row: four checks per planned entity, a fifth of the worker's Postgres time. Both sides are
--    always written in one transaction (reconciler/outbox.py); what the keys still gave, deleting
--    a row's change sets and their changes with it, the triggers keep, once per statement.
--  * change_sets ids come in blocks: the sequence advances by 10,000, so one nextval reserves the
--    ids of a whole batch of change sets (a batch is at most [workers] batch_size <= 10,000) instead
--    of one nextval per change set. Any other insert takes a block of its own: ranges never overlap.

ALTER TABLE change_sets ALTER COLUMN id SET INCREMENT BY 10000;

ALTER TABLE changes DROP CONSTRAINT changes_change_set_id_fkey;
ALTER TABLE change_sets DROP CONSTRAINT change_sets_ingestion_log_id_fkey;

ALTER TABLE changes DROP CONSTRAINT changes_pkey;
DROP INDEX changes_change_set_id;
ALTER TABLE changes DROP COLUMN id;
ALTER TABLE changes ADD PRIMARY KEY (change_set_id, sequence_number);

CREATE FUNCTION delete_change_sets_of_deleted_logs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM change_sets WHERE ingestion_log_id IN (SELECT id FROM deleted_logs);
    RETURN NULL;
END $$;

CREATE TRIGGER ingestion_logs_cascade AFTER DELETE ON ingestion_logs
    REFERENCING OLD TABLE AS deleted_logs FOR EACH STATEMENT
    EXECUTE FUNCTION delete_change_sets_of_deleted_logs();

CREATE FUNCTION delete_changes_of_deleted_change_sets() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM changes WHERE change_set_id IN (SELECT id FROM deleted_sets);
    RETURN NULL;
END $$;

CREATE TRIGGER change_sets_cascade AFTER DELETE ON change_sets
    REFERENCING OLD TABLE AS deleted_sets FOR EACH STATEMENT
    EXECUTE FUNCTION delete_changes_of_deleted_change_sets();
