//! Access tokens in the shared database: admin API and token checks (`access::tokens`, on
//! every replica) → **`tokens`** (migration `V6__tokens.sql`, SPEC §11).
//!
//! Not on the commit path: queries use the query pool. A revocation takes the database's
//! clock (`revoked_ms`), so every replica polls for revocations against one clock, whatever
//! their own clocks say. Only the SHA-256 of a secret is stored.

use tokio_postgres::Row;

use super::{pg_err, PgReader};
use crate::store::{StoreError, TokenRow};

const COLUMNS: &str = "id, hash, name, scope, devices, created_ms, last_used_ms, revoked_ms";

/// The database's clock in epoch milliseconds.
const NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

fn token(r: &Row) -> TokenRow {
    let bytes: Vec<u8> = r.get(1);
    let mut hash = [0u8; 32];
    // The column's CHECK keeps it at 32 bytes.
    if bytes.len() == 32 {
        hash.copy_from_slice(&bytes);
    }
    TokenRow {
        id: r.get(0),
        hash,
        name: r.get(2),
        scope: r.get(3),
        devices: r.get(4),
        created_ms: r.get(5),
        last_used_ms: r.get(6),
        revoked_ms: r.get(7),
    }
}

impl PgReader {
    /// Inserts a new token.
    pub(super) fn insert_token(&self, t: &TokenRow) -> Result<(), StoreError> {
        self.driver.block_on(async {
            let client = self.pool.get().await.map_err(pg_err)?;
            client
                .execute(
                    &format!(
                        "INSERT INTO tokens ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
                    ),
                    &[
                        &t.id,
                        &&t.hash[..],
                        &t.name,
                        &t.scope,
                        &t.devices,
                        &t.created_ms,
                        &t.last_used_ms,
                        &t.revoked_ms,
                    ],
                )
                .await
                .map_err(pg_err)?;
            Ok(())
        })
    }

    /// Every active token, oldest first.
    pub(super) fn list_tokens(&self) -> Result<Vec<TokenRow>, StoreError> {
        self.driver.block_on(async {
            let client = self.pool.get().await.map_err(pg_err)?;
            let rows = client
                .query(
                    &format!(
                        "SELECT {COLUMNS} FROM tokens WHERE revoked_ms IS NULL ORDER BY created_ms, id"
                    ),
                    &[],
                )
                .await
                .map_err(pg_err)?;
            Ok(rows.iter().map(token).collect())
        })
    }

    /// The token with this hash, revoked or not.
    pub(super) fn find_token(&self, hash: &[u8; 32]) -> Result<Option<TokenRow>, StoreError> {
        self.driver.block_on(async {
            let client = self.pool.get().await.map_err(pg_err)?;
            let row = client
                .query_opt(
                    &format!("SELECT {COLUMNS} FROM tokens WHERE hash = $1"),
                    &[&&hash[..]],
                )
                .await
                .map_err(pg_err)?;
            Ok(row.as_ref().map(token))
        })
    }

    /// Revokes the active token `id` at the database's clock.
    pub(super) fn revoke(&self, id: &str) -> Result<bool, StoreError> {
        self.driver.block_on(async {
            let client = self.pool.get().await.map_err(pg_err)?;
            let n = client
                .execute(
                    &format!(
                        "UPDATE tokens SET revoked_ms = {NOW_MS} WHERE id = $1 AND revoked_ms IS NULL"
                    ),
                    &[&id],
                )
                .await
                .map_err(pg_err)?;
            Ok(n > 0)
        })
    }

    /// Tokens revoked at or after `since_ms`.
    pub(super) fn revoked_since(&self, since_ms: i64) -> Result<Vec<(String, i64)>, StoreError> {
        self.driver.block_on(async {
            let client = self.pool.get().await.map_err(pg_err)?;
            let rows = client
                .query(
                    "SELECT id, revoked_ms FROM tokens WHERE revoked_ms IS NOT NULL AND revoked_ms >= $1",
                    &[&since_ms],
                )
                .await
                .map_err(pg_err)?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    /// Raises `last_used_ms` of each token to the given time, in one statement.
    pub(super) fn touch(&self, used: &[(String, i64)]) -> Result<(), StoreError> {
        let ids: Vec<&str> = used.iter().map(|(id, _)| id.as_str()).collect();
        let times: Vec<i64> = used.iter().map(|(_, ms)| *ms).collect();
        self.driver.block_on(async {
            let client = self.pool.get().await.map_err(pg_err)?;
            client
                .execute(
                    "UPDATE tokens t SET last_used_ms = u.ms
                     FROM unnest($1::text[], $2::bigint[]) AS u(id, ms)
                     WHERE t.id = u.id AND (t.last_used_ms IS NULL OR t.last_used_ms < u.ms)",
                    &[&ids, &times],
                )
                .await
                .map_err(pg_err)?;
            Ok(())
        })
    }
}
