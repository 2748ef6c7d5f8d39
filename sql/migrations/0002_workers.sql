-- 0002: what the poll workers record.
--
--  * planned_branch: the branch a row was planned in ("<name> (<id>)", '' for main), set when a
--    worker finishes it. Dedup uses it: a new observation of an entity whose current row was
--    planned in another branch than today's default becomes a new row, since that row says
--    nothing about the new branch. Unlike the Go reconciler, which compares the branch of the
--    latest change set, a row not planned yet (QUEUED, in flight) still absorbs observations:
--    it will be planned in today's branch anyway (diode-reconciler.md §10.14).
--  * drift_of: a row created because a re-observed APPLIED row planned changes (drift) points at
--    the APPLIED row it departs from.

ALTER TABLE ingestion_logs
    ADD COLUMN planned_branch text,
    ADD COLUMN drift_of bigint REFERENCES ingestion_logs (id) ON DELETE SET NULL;
