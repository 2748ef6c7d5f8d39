-- 0011: reviewing what plan-only mode leaves OPEN (`reconciler deviations`, reconciler/review.py).
--
--  * change_sets.plan_warnings: the plugin's warnings on the plan (change_set.warnings,
--    {object_type: {field: [message]}}: fields it ignored); apply_warnings: those of the apply
--    ([{object_type, object_id, fields, message}]: a create that resolved onto an existing object
--    without storing the listed fields). NULL when the plugin had none.
--  * reviews: what operators did to rows, one row per action on a row: who (the login name), when,
--    why (ignore's --reason), what came of it (outcome: reconciler/review.py names them) and, for an
--    apply, which change set was applied or found stale. An audit trail: it outlives nothing of the
--    row's on purpose (no foreign key), and retention decides when it goes.
--  * review_selection_v1: the rows an operator's filters select, the same for `deviations list`,
--    `apply --all` and `ignore --all` (reconciler/review.py Filters): in one of the states, minus
--    the OPEN rows a plan-only worker holds (OPEN is its state in flight: nothing to review yet);
--    then, each filter applying only when given: the object type; planned within p_since seconds
--    (planned_at, 0010, or when the row arrived if never planned); the branch it was planned in, by
--    name, id or "main" (no branch); the producer app; p_name, an ILIKE pattern on the name of its
--    latest change set; the ids. With each row, its state, type and latest change set. A plain SQL
--    function, so Postgres inlines it into the statements that page or count its rows (and leaves
--    out the change set lookups a count does not need).
--  * ingestion_logs_reviewable: the rows `deviations list` shows by default (OPEN) and those it
--    is asked for most (IGNORED), newest first, without a scan of the whole table. Rows enter it
--    when they are planned, not when the consumer copies them in (QUEUED), so COPY does not pay for it.

ALTER TABLE change_sets
    ADD COLUMN plan_warnings jsonb,
    ADD COLUMN apply_warnings jsonb;

CREATE TABLE reviews (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ingestion_log_id  bigint NOT NULL,
    change_set_id     bigint,
    action            text NOT NULL CHECK (action IN ('apply', 'ignore', 'unignore')),
    outcome           text NOT NULL,
    operator          text NOT NULL,
    reason            text,
    detail            jsonb,
    at                timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX reviews_ingestion_log_id ON reviews (ingestion_log_id, id);

CREATE INDEX ingestion_logs_reviewable ON ingestion_logs (id DESC) WHERE state IN (2, 6);

CREATE FUNCTION review_selection_v1(p_states smallint[], p_object_type text, p_since float8, p_branch text,
                                    p_producer text, p_name text, p_ids bigint[])
RETURNS TABLE (id bigint, state smallint, object_type text, change_set_id bigint)
LANGUAGE sql STABLE AS $$
    SELECT l.id, l.state, l.object_type::text,
           (SELECT max(c.id) FROM change_sets AS c WHERE c.ingestion_log_id = l.id)
    FROM ingestion_logs AS l
    WHERE l.state = ANY(p_states) AND NOT (l.state = 2 AND l.lease_owner IS NOT NULL)
      AND (p_object_type IS NULL OR l.object_type = p_object_type)
      AND (p_since IS NULL OR coalesce(l.planned_at, l.created_at) >= now() - p_since * interval '1 second')
      AND (p_branch IS NULL
           OR (p_branch = 'main' AND coalesce(l.planned_branch, '') = '')
           OR l.planned_branch = p_branch
           OR substring(l.planned_branch FROM '^(.*) \([^()]*\)$') = p_branch
           OR substring(l.planned_branch FROM '\(([^()]*)\)$') = p_branch)
      AND (p_producer IS NULL OR l.producer_app_name = p_producer)
      AND (p_name IS NULL OR (SELECT c.deviation_name FROM change_sets AS c WHERE c.ingestion_log_id = l.id
                              ORDER BY c.id DESC LIMIT 1) ILIKE p_name)
      AND (p_ids IS NULL OR l.id = ANY(p_ids))
$$;
