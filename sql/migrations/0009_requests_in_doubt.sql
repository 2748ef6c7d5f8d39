-- 0009: requests whose answer never came.
--
--  * answer_lost_at: when a plugin request carrying this row last went unanswered (read timeout,
--    dropped connection, a proxy's 502/504) or its worker died holding the claim. NetBox may have
--    planned and applied the entity all the same. Kept while the row waits for its next attempt; on
--    an APPLIED row it records that the apply was made by that attempt (its change set was lost with
--    its answer, so a re-plan found nothing to do); cleared by any other outcome.
--  * timeouts: claims in a row whose request went unanswered. A batch that timed out is sent again
--    in halves (claim_batch): 2^timeouts times smaller, down to one entity.

ALTER TABLE ingestion_logs
    ADD COLUMN answer_lost_at timestamptz,
    ADD COLUMN timeouts smallint NOT NULL DEFAULT 0;
