-- 0004: TRUNCATE cascades again. 0003 replaced the foreign keys to ingestion_logs by delete
-- triggers, and delete triggers do not fire on TRUNCATE, so `TRUNCATE ingestion_logs CASCADE` (what
-- an operator types to empty the inbox) left every change set and change behind, pointing at
-- nothing. Statement-level truncate triggers restore what the keys did.

CREATE FUNCTION truncate_change_sets() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE change_sets;  -- whose own trigger below empties changes
    RETURN NULL;
END $$;

CREATE TRIGGER ingestion_logs_truncate_cascade AFTER TRUNCATE ON ingestion_logs
    FOR EACH STATEMENT EXECUTE FUNCTION truncate_change_sets();

CREATE FUNCTION truncate_changes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE changes;
    RETURN NULL;
END $$;

CREATE TRIGGER change_sets_truncate_cascade AFTER TRUNCATE ON change_sets
    FOR EACH STATEMENT EXECUTE FUNCTION truncate_changes();
