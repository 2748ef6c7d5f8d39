-- 0005: process heartbeats, for `reconciler status` (issue 4).
--
-- The supervisor's own heartbeats (roles.py) live in its memory and tell it which child hangs; an
-- operator on another host, or looking at several replicas, needs them where every replica writes:
-- here. One row per process (host, pid), written by the process itself at most every few seconds
-- (reconciler/heartbeat.py); `status` lists the rows seen recently. A pid reused on the same host
-- takes its dead predecessor's row over.

CREATE TABLE processes (
    host        text NOT NULL,
    pid         integer NOT NULL,
    role        text NOT NULL,
    started_at  timestamptz NOT NULL,
    last_seen   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (host, pid)
);

-- Upsert one process's heartbeat. Versioned name: a later migration can add a _v2 beside it while
-- processes of the previous release still call this one during a rolling deploy. When the process
-- is new (its row was inserted, not updated), rows of processes silent for a day are pruned, so
-- restarts do not grow the table forever; status only shows recent rows anyway.
CREATE FUNCTION process_heartbeat_v1(p_host text, p_pid integer, p_role text, p_started_at timestamptz)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    inserted boolean;
BEGIN
    INSERT INTO processes AS p (host, pid, role, started_at, last_seen)
    VALUES (p_host, p_pid, p_role, p_started_at, now())
    ON CONFLICT (host, pid) DO UPDATE
        SET role = excluded.role, started_at = excluded.started_at, last_seen = excluded.last_seen
    RETURNING (xmax = 0) INTO inserted;
    IF inserted THEN
        DELETE FROM processes WHERE last_seen < now() - interval '1 day';
    END IF;
END $$;
