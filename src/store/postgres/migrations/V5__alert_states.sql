-- Alert rule states (SPEC §12): one row per (rule, device) that is pending or firing, so that
-- a restart neither announces a firing alert again nor forgets a pending one. Every replica
-- evaluates rules over its own commits and writes here; a change applies only when it changes
-- the stored state, and only the replica whose change applied announces the event, so an
-- alert that two replicas decide on is announced once.
--
-- V5, not V4: V4 is left to the rollups of the same issue, which land at the same time.
CREATE TABLE alert_states (
    rule      text   NOT NULL,
    device_id text   COLLATE "C" NOT NULL,
    state     text   NOT NULL CHECK (state IN ('pending', 'firing')),
    -- Server time (epoch ms) the condition began to hold; when it fired (0 while pending).
    since_ms  bigint NOT NULL,
    fired_ms  bigint NOT NULL,
    -- The metric value as JSON text (31.5, true), none for absence rules.
    value     text,
    -- The reading ts (epoch ms) of that value.
    ts_ms     bigint NOT NULL,
    PRIMARY KEY (rule, device_id)
);
