-- 0007: how often a row's claim outlived its lease since a worker last lived through planning it
-- (finish_rows clears it; a re-observation keeps it; `reconciler retry` clears it). Counted apart
-- from `attempts` (every claim): a row whose claim expired [workers] max_attempts times kills or
-- hangs whoever plans it and becomes ERRORED instead of cycling through QUEUED for ever, while a row
-- that met an unreachable plugin and then one worker crash is not given up on. A row with a count
-- above 0 is claimed alone (claim_batch), so that the row that kills its worker spends this budget
-- and the rows that happened to share its batch are not taken down with it.
ALTER TABLE ingestion_logs ADD COLUMN lease_expiries integer NOT NULL DEFAULT 0;
