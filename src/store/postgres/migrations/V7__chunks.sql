-- Sluice schema version 7: readings in chunks, one row per device, minute and commit (SPEC §1-3,
-- §13; ARCHITECTURE.md, "Why PostgreSQL looks like this").
--
-- Up to version 6 every reading was a row with two B-tree entries, and dedupe was the unique
-- index under INSERT ... ON CONFLICT: about 28 µs of PostgreSQL CPU per reading in the fleet
-- shape, so one replica topped out near 27 000 readings/s on this machine. A chunk row holds
-- all the readings one commit brings for one device in one minute, in the embedded store's chunk
-- format (src/store/sqlite/chunk.rs), so a commit writes one row and two index entries per
-- device instead of per reading.
--
-- Dedupe stays exact across replicas and all time, without a unique index: every commit locks
-- its devices' rows (SELECT ... FOR UPDATE, in id order) before it decides which readings are
-- new. A seq at or below it (a late reading or a re-send) is looked up through
-- `chunks_device_seq`: every chunk's seqs lie in one block of 16 seq keys, so a chunk holding
-- seq k has its max_seq between k and the end of k's block, and a device stores each seq once,
-- so that range holds at most 16 chunks however long the device's history. Whoever commits a device's chunk holds that device's row lock until its
-- COMMIT, so the lookup sees every chunk committed before.
CREATE TABLE chunks (
    device_id text   COLLATE "C" NOT NULL,
    -- The minute every reading of the chunk falls in: floor(ts_ms / 60 000). Queries walk a
    -- device's minutes in order, and retention drops whole minutes.
    bucket    bigint NOT NULL,
    -- The smallest reading id in the chunk: unique, and the order of chunks within a minute.
    rid       bigint NOT NULL,
    -- The lowest and highest seq of the chunk as order-preserving keys (the u64 with its top
    -- bit flipped, so bigint order is u64 order), both in one block of 16 keys (key >> 4);
    -- NULL when no reading of the chunk has a seq (then none has).
    min_seq   bigint,
    max_seq   bigint,
    -- Every reading's seq, in the chunk's row order, bit-cast from u64 as version 6 stored it
    -- (NULL for a reading without one): what the `readings` view below shows.
    seqs      bigint[] NOT NULL,
    -- How many readings the chunk holds (retention's count).
    n         integer NOT NULL,
    -- The chunk (format version 1), sorted by (ts, rid). Already compressed: stored out of
    -- line as is, never compressed again by TOAST.
    body      bytea  NOT NULL
);
ALTER TABLE chunks ALTER COLUMN body SET STORAGE EXTERNAL;

-- A device's minutes in order: queries (both directions, paged by (bucket, rid)) and retention.
CREATE INDEX chunks_device_bucket ON chunks (device_id, bucket, rid);
-- Dedupe of late readings and re-sends: the chunks whose max_seq lies between a seq and the
-- end of its block (at most 16 per device).
CREATE INDEX chunks_device_seq ON chunks (device_id, max_seq) WHERE max_seq IS NOT NULL;

-- Reading ids: each commit draws one value and numbers its readings below it
-- (rid = value * 2^24 + position in the commit). Version 6's ids came from an identity column;
-- the sequence starts above all of them, so no id is ever reused.
CREATE SEQUENCE reading_commits;
SELECT setval('reading_commits', coalesce((SELECT max(rid) FROM readings), 0) / 16777216 + 1);

-- The device row is also the dedupe lock and high-water mark.
ALTER TABLE devices ADD COLUMN max_seq bigint;
UPDATE devices d SET max_seq =
    (SELECT max(r.seq # (-9223372036854775808)) FROM readings r WHERE r.device_id = d.device_id);
-- The latest values are merged by Sluice, which holds the row lock: plain text, not parsed
-- by PostgreSQL on every write.
ALTER TABLE devices ALTER COLUMN latest TYPE text USING latest::text;
ALTER TABLE devices DROP COLUMN commit_min_ts_ms;
DROP FUNCTION sluice_merge_latest(jsonb, jsonb);

-- Version 6's rows are moved into chunks by Sluice at open, under the migration lock, then
-- this table is dropped (src/store/postgres/chunks.rs, `convert_v6`).
ALTER TABLE readings RENAME TO readings_v6;

-- What is stored, for operators and tests: one row per reading, (device_id, seq).
CREATE VIEW readings AS
    SELECT c.device_id, s.seq FROM chunks c CROSS JOIN LATERAL unnest(c.seqs) AS s(seq);
