-- 0013: what the read API (reconciler/api/, diode.v1.ReconcilerService) needs to answer from a table
-- of millions of rows while the consumer and the workers write it.
--
--  * ingestion_logs_external_id: RetrieveDeviationByID looks a row up by its external id. Rows the
--    consumer writes (QUEUED) are left out, so the COPY of every batch maintains no extra index; a
--    row enters the index with its first change of state, which already writes every index entry
--    (state is in the predicates of the partial indexes, so no such update is HOT). The API finds a
--    QUEUED row through ingestion_logs_queued instead.
--  * ingestion_logs_troubled: FAILED and ERRORED rows, newest first. They are few and the ones asked
--    for; without it a page of them walks the primary key past every other row.
--  * state_counts: rows per (state, object type), so RetrieveIngestionLogs' only_metrics reads a few
--    rows instead of counting the table. Statement triggers append each statement's net change to
--    state_count_deltas (insert only: writers never wait for one another on a counter row), and
--    the consumer or the api role folds the deltas into state_counts every few seconds
--    (reconciler/statecounts.py). A count is state_counts plus the deltas not folded yet.

-- The read API's filters besides the state, shared by the ways a page is read (sql/queries.sql):
-- NULL (0 for a time) is "not asked". api_row_matches_v1 is a plain expression, which Postgres inlines
-- into each query (and folds away what was not asked). api_branch_matches_v1 reads the row's latest
-- change set, so it is called per row; queries call it only when branches are asked for. A branch
-- matches as stored ("<name> (<id>)"), by its name or by its id.
CREATE FUNCTION api_row_matches_v1(l ingestion_logs, p_object_types text[], p_since bigint, p_until bigint)
RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT (p_object_types IS NULL OR l.object_type = ANY(p_object_types))
       AND (p_since = 0 OR l.ingestion_ts >= p_since)
       AND (p_until = 0 OR l.ingestion_ts <= p_until)
$$;

CREATE FUNCTION api_branch_matches_v1(p_id bigint, p_branches text[])
RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1
                   FROM (SELECT c.branch_id FROM change_sets AS c WHERE c.ingestion_log_id = p_id
                         ORDER BY c.id DESC LIMIT 1) AS latest
                   WHERE latest.branch_id = ANY(p_branches)
                      OR substring(latest.branch_id FROM '^(.*) \([^()]*\)$') = ANY(p_branches)
                      OR substring(latest.branch_id FROM '\(([^()]*)\)$') = ANY(p_branches))
$$;

CREATE INDEX ingestion_logs_external_id ON ingestion_logs (external_id) WHERE state <> 1;

CREATE INDEX ingestion_logs_troubled ON ingestion_logs (id) WHERE state IN (4, 7);

CREATE TABLE state_counts (
    state        smallint NOT NULL,
    object_type  varchar(255) NOT NULL,
    n            bigint NOT NULL,
    PRIMARY KEY (state, object_type)
);

CREATE TABLE state_count_deltas (
    state        smallint NOT NULL,
    object_type  varchar(255) NOT NULL,
    n            bigint NOT NULL
);

CREATE FUNCTION count_inserted_rows() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO state_count_deltas (state, object_type, n)
    SELECT state, object_type, count(*) FROM inserted_rows GROUP BY state, object_type;
    RETURN NULL;
END $$;

CREATE FUNCTION count_updated_rows() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Most updates keep the state (a lease, a re-observation's count): they net to nothing.
    INSERT INTO state_count_deltas (state, object_type, n)
    SELECT state, object_type, sum(n)
    FROM (SELECT state, object_type, -1 AS n FROM old_rows
          UNION ALL
          SELECT state, object_type, 1 FROM new_rows) AS changed
    GROUP BY state, object_type
    HAVING sum(n) <> 0;
    RETURN NULL;
END $$;

CREATE FUNCTION count_deleted_rows() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO state_count_deltas (state, object_type, n)
    SELECT state, object_type, -count(*) FROM deleted_rows GROUP BY state, object_type;
    RETURN NULL;
END $$;

-- TRUNCATE waits for a fold in progress (a DELETE would miss the rows it is inserting); as in 0006,
-- a table the same statement is already truncating is in use, and empty by now: DELETE then.
CREATE FUNCTION forget_state_counts() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE state_counts, state_count_deltas;
    RETURN NULL;
EXCEPTION WHEN object_in_use THEN
    DELETE FROM state_counts;
    DELETE FROM state_count_deltas;
    RETURN NULL;
END $$;

CREATE TRIGGER ingestion_logs_count_inserted AFTER INSERT ON ingestion_logs
    REFERENCING NEW TABLE AS inserted_rows FOR EACH STATEMENT EXECUTE FUNCTION count_inserted_rows();
CREATE TRIGGER ingestion_logs_count_updated AFTER UPDATE ON ingestion_logs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION count_updated_rows();
CREATE TRIGGER ingestion_logs_count_deleted AFTER DELETE ON ingestion_logs
    REFERENCING OLD TABLE AS deleted_rows FOR EACH STATEMENT EXECUTE FUNCTION count_deleted_rows();
CREATE TRIGGER ingestion_logs_count_truncated AFTER TRUNCATE ON ingestion_logs
    FOR EACH STATEMENT EXECUTE FUNCTION forget_state_counts();

-- The rows already there. CREATE TRIGGER locked ingestion_logs against writes until this
-- migration's transaction commits, so no write slips between the triggers and this count.
INSERT INTO state_counts (state, object_type, n)
SELECT state, object_type, count(*) FROM ingestion_logs GROUP BY state, object_type;
