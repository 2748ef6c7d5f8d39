-- 0006: 0004's truncate triggers failed a TRUNCATE that lists the tables they empty as well
-- (`TRUNCATE ingestion_logs, change_sets CASCADE`: "cannot TRUNCATE change_sets because it is being
-- used by active queries"). When the table is already part of the same TRUNCATE, it is empty by
-- the time the AFTER trigger runs; only when it is in use for another reason is a DELETE needed.

CREATE OR REPLACE FUNCTION truncate_change_sets() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE change_sets;  -- whose own trigger empties changes
    RETURN NULL;
EXCEPTION WHEN object_in_use THEN
    DELETE FROM change_sets;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION truncate_changes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE changes;
    RETURN NULL;
EXCEPTION WHEN object_in_use THEN
    DELETE FROM changes;
    RETURN NULL;
END $$;
