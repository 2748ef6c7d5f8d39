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
