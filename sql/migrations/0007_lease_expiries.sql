-- 0007: how often a row's claim outlived its lease, counted apart from `attempts` (every claim).
-- A row whose claim expired [workers] max_attempts times kills or hangs whoever plans it: it becomes
-- ERRORED instead of cycling through QUEUED for ever. Counting claims instead would also end rows
-- that only met an unreachable plugin and then one worker crash. A row with a count above 0 is
-- claimed alone (claim_batch), so that the row that kills its worker spends this budget and the
-- rows that happened to share its batch are not taken down with it.
ALTER TABLE ingestion_logs ADD COLUMN lease_expiries integer NOT NULL DEFAULT 0;
