-- The NATS outbox (SPEC §13): with nats.enabled, each commit also copies its new readings
-- here, in the same transaction, and the replica that holds the publisher lock publishes them
-- in id order and deletes each once NATS has acknowledged it.
--
-- A copy rather than a reference to `readings`: the publisher reads it without a join (and
-- without an index on readings.rid that every commit would pay for), and retention may delete
-- a reading that is still unpublished without losing its publication.
CREATE TABLE outbox (
    -- Publication order. Ids are drawn when a row is inserted, so a transaction that commits
    -- late may add ids below ones already published: rows are deleted by id once acknowledged,
    -- never "everything below a cursor".
    id        bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The reading's id in `readings`: the Nats-Msg-Id of a reading without seq.
    rid       bigint      NOT NULL,
    device_id text        COLLATE "C" NOT NULL,
    seq       bigint,
    ts        timestamptz NOT NULL,
    metrics   json        NOT NULL,
    tags      json,
    -- The replica that committed it (its Sluice-Replica id), so that the one replica that
    -- publishes can say whose reading it is, and each replica's fleet-wide live stream can
    -- tell its own readings from others'.
    origin    text        NOT NULL
);
