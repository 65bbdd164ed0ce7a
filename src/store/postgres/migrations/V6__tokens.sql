-- Access tokens (SPEC §11): one row per token an administrator created, shared by every
-- replica, so a token created or revoked on one is seen by all. Only the SHA-256 of the secret
-- is stored; a copy of this table grants nothing. Revoked rows stay (lookups by hash find them
-- and refuse them on the same path as an unknown token), and `revoked_ms` (the database's
-- clock) lets replicas poll for revocations to close open WebSocket connections.
CREATE TABLE tokens (
    id           text   PRIMARY KEY,
    hash         bytea  NOT NULL UNIQUE CHECK (length(hash) = 32),
    name         text   NOT NULL,
    scope        text   NOT NULL CHECK (scope IN ('write', 'read')),
    devices      text   NOT NULL,
    created_ms   bigint NOT NULL,
    last_used_ms bigint,
    revoked_ms   bigint
);
CREATE INDEX tokens_revoked ON tokens (revoked_ms) WHERE revoked_ms IS NOT NULL;
