//! Access tokens in the embedded store: admin API and token checks (`access::tokens`) →
//! **`tokens`** (SPEC §11). Not on the commit path: the access layer reads a token by its hash
//! when its in-memory cache has no fresh entry, and writes only when a token is created or
//! revoked, and `last_used_ms` in one batch every few seconds.
//!
//! The table is schema version 4 (`schema.rs`), in `sluice.db` beside the chunks, written on a
//! reader connection. Only the SHA-256 of a secret is stored.

use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::reading::now_ms;
use crate::store::{StoreError, TokenRow};

/// What schema version 4 adds. Idempotent.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tokens (
    id           TEXT    PRIMARY KEY,
    hash         BLOB    NOT NULL UNIQUE,
    name         TEXT    NOT NULL,
    scope        TEXT    NOT NULL,
    devices      TEXT    NOT NULL,
    created_ms   INTEGER NOT NULL,
    last_used_ms INTEGER,
    revoked_ms   INTEGER
);
CREATE INDEX IF NOT EXISTS tokens_revoked ON tokens (revoked_ms) WHERE revoked_ms IS NOT NULL;
";

const COLUMNS: &str = "id, hash, name, scope, devices, created_ms, last_used_ms, revoked_ms";

fn row(r: &Row<'_>) -> rusqlite::Result<TokenRow> {
    let hash: Vec<u8> = r.get(1)?;
    let mut h = [0u8; 32];
    // A stored hash of another length matches nothing; it cannot be written by this code.
    if hash.len() == 32 {
        h.copy_from_slice(&hash);
    }
    Ok(TokenRow {
        id: r.get(0)?,
        hash: h,
        name: r.get(2)?,
        scope: r.get(3)?,
        devices: r.get(4)?,
        created_ms: r.get(5)?,
        last_used_ms: r.get(6)?,
        revoked_ms: r.get(7)?,
    })
}

/// Inserts a new token.
pub(super) fn create(conn: &Connection, t: &TokenRow) -> Result<(), StoreError> {
    conn.execute(
        &format!("INSERT INTO tokens ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"),
        params![
            t.id,
            &t.hash[..],
            t.name,
            t.scope,
            t.devices,
            t.created_ms,
            t.last_used_ms,
            t.revoked_ms
        ],
    )?;
    Ok(())
}

/// Every active token, oldest first.
pub(super) fn list(conn: &Connection) -> Result<Vec<TokenRow>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM tokens WHERE revoked_ms IS NULL ORDER BY created_ms, id"
    ))?;
    let rows = stmt.query_map([], row)?.collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// The token with this hash, revoked or not.
pub(super) fn by_hash(conn: &Connection, hash: &[u8; 32]) -> Result<Option<TokenRow>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!("SELECT {COLUMNS} FROM tokens WHERE hash = ?1"))?;
    Ok(stmt.query_row(params![&hash[..]], row).optional()?)
}

/// Revokes the active token `id` now; whether there was one.
pub(super) fn revoke(conn: &Connection, id: &str) -> Result<bool, StoreError> {
    let n = conn.execute(
        "UPDATE tokens SET revoked_ms = ?2 WHERE id = ?1 AND revoked_ms IS NULL",
        params![id, now_ms()],
    )?;
    Ok(n > 0)
}

/// Tokens revoked at or after `since_ms`.
pub(super) fn revoked_since(
    conn: &Connection,
    since_ms: i64,
) -> Result<Vec<(String, i64)>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, revoked_ms FROM tokens WHERE revoked_ms IS NOT NULL AND revoked_ms >= ?1",
    )?;
    let rows = stmt
        .query_map(params![since_ms], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Raises `last_used_ms` of each token to the given time, in one transaction.
pub(super) fn touch(conn: &Connection, used: &[(String, i64)]) -> Result<(), StoreError> {
    let tx = conn.unchecked_transaction()?;
    {
        let mut stmt = tx.prepare_cached(
            "UPDATE tokens SET last_used_ms = ?2
             WHERE id = ?1 AND (last_used_ms IS NULL OR last_used_ms < ?2)",
        )?;
        for (id, ms) in used {
            stmt.execute(params![id, ms])?;
        }
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_by_hash_and_revoke_once() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        let t = TokenRow {
            id: "tok_1".into(),
            hash: [7; 32],
            name: "gh".into(),
            scope: "write".into(),
            devices: "greenhouse-*".into(),
            created_ms: 1,
            last_used_ms: None,
            revoked_ms: None,
        };
        create(&conn, &t).unwrap();
        assert_eq!(by_hash(&conn, &[7; 32]).unwrap(), Some(t.clone()));
        assert_eq!(by_hash(&conn, &[8; 32]).unwrap(), None);
        touch(&conn, &[("tok_1".into(), 50), ("tok_x".into(), 9)]).unwrap();
        touch(&conn, &[("tok_1".into(), 40)]).unwrap();
        assert_eq!(list(&conn).unwrap()[0].last_used_ms, Some(50));
        assert!(revoke(&conn, "tok_1").unwrap());
        assert!(!revoke(&conn, "tok_1").unwrap());
        assert!(list(&conn).unwrap().is_empty());
        let revoked = by_hash(&conn, &[7; 32]).unwrap().unwrap();
        assert!(revoked.revoked_ms.is_some());
        assert_eq!(revoked_since(&conn, 0).unwrap()[0].0, "tok_1");
    }
}
