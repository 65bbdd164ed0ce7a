-- Sluice schema version 4: rollups (SPEC §12). With PostgreSQL they need no table: an agg
-- query aggregates its range of `readings` through the (device_id, ts) index of V1, in one
-- REPEATABLE READ transaction (src/store/postgres/rollups.rs). Rollup rows updated in each
-- commit would add at least one upserted row per device and level to every group commit on the
-- one primary all replicas share (ARCHITECTURE.md, "Rollups"). This version is kept so that the
-- schema history stays contiguous (V5, the alert states, landed with it), and a later fold of
-- committed readings into rollup rows can be a version of its own.
SELECT 1;
