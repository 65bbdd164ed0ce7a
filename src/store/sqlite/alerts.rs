//! Alert states in the embedded store: rule engine → **`alert_states`** (SPEC §12). Not on
//! the commit path: the rule engine reads the table once at start and writes it, on a
//! reader connection from its own blocking thread, only when a (rule, device) changes state.
//!
//! The table lives in `sluice.db` beside the chunks. It is created by the first engine that
//! runs (`CREATE TABLE IF NOT EXISTS`), so files without rules never have it and the schema
//! version does not change. A write may wait for a compaction transaction (SQLite has one
//! writer; the connection's busy timeout is 5 s); commits never do, since they touch no
//! SQLite page.

use rusqlite::{params, Connection};

use crate::store::{
    alert_value_from_text, alert_value_text, AlertChange, AlertRow, AlertState, StoreError,
};

const TABLE: &str = "
CREATE TABLE IF NOT EXISTS alert_states (
    rule      TEXT    NOT NULL,
    device_id TEXT    NOT NULL,
    state     TEXT    NOT NULL,
    since_ms  INTEGER NOT NULL,
    fired_ms  INTEGER NOT NULL,
    value     TEXT,
    ts_ms     INTEGER NOT NULL,
    PRIMARY KEY (rule, device_id)
) WITHOUT ROWID;
";

/// Every stored state (creating the table if this file has none).
pub(super) fn load(conn: &Connection) -> Result<Vec<AlertRow>, StoreError> {
    conn.execute_batch(TABLE)?;
    let mut stmt = conn.prepare(
        "SELECT rule, device_id, state, since_ms, fired_ms, value, ts_ms FROM alert_states",
    )?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, Option<String>>(5)?,
                r.get::<_, i64>(6)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows
        .into_iter()
        .filter_map(
            |(rule, device_id, state, since_ms, fired_ms, value, ts_ms)| {
                Some(AlertRow {
                    rule,
                    device_id,
                    state: AlertState::parse(&state)?,
                    since_ms,
                    fired_ms,
                    value: alert_value_from_text(value),
                    ts_ms,
                })
            },
        )
        .collect())
}

/// Applies `changes` in one transaction; per change, whether it took effect.
///
/// The transaction is not synced (`synchronous = NORMAL` on this connection, which only alert
/// states write through): it survives a crash of Sluice, not a power loss, and costs no fsync
/// beside the journal's. Measured with `scripts/bench-rules`: syncing each save took the
/// journal's disk from ingest (see ARCHITECTURE.md, "Alert rules").
pub(super) fn apply(conn: &Connection, changes: &[AlertChange]) -> Result<Vec<bool>, StoreError> {
    conn.execute_batch(TABLE)?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    let tx = conn.unchecked_transaction()?;
    let mut applied = Vec::with_capacity(changes.len());
    {
        let mut set = tx.prepare_cached(
            "INSERT INTO alert_states (rule, device_id, state, since_ms, fired_ms, value, ts_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (rule, device_id) DO UPDATE SET
                state = excluded.state, since_ms = excluded.since_ms,
                fired_ms = excluded.fired_ms, value = excluded.value, ts_ms = excluded.ts_ms
             WHERE alert_states.state <> excluded.state
               AND NOT (alert_states.state = 'firing' AND excluded.state = 'pending')",
        )?;
        let mut clear = tx.prepare_cached(
            "DELETE FROM alert_states WHERE rule = ?1 AND device_id = ?2 AND state = ?3",
        )?;
        for c in changes {
            let n = match c {
                AlertChange::Set(r) => set.execute(params![
                    r.rule,
                    r.device_id,
                    r.state.as_str(),
                    r.since_ms,
                    r.fired_ms,
                    alert_value_text(&r.value),
                    r.ts_ms
                ])?,
                AlertChange::Clear {
                    rule,
                    device_id,
                    was,
                } => clear.execute(params![rule, device_id, was.as_str()])?,
            };
            applied.push(n > 0);
        }
    }
    tx.commit()?;
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::MetricValue;

    #[test]
    fn changes_apply_once_and_round_trip() {
        let conn = Connection::open_in_memory().unwrap();
        assert!(load(&conn).unwrap().is_empty());
        let row = |state| AlertRow {
            rule: "hot".into(),
            device_id: "d".into(),
            state,
            since_ms: 1,
            fired_ms: 2,
            value: Some(MetricValue::Float(31.5)),
            ts_ms: 3,
        };
        let set = |state| AlertChange::Set(row(state));
        let clear = |was| AlertChange::Clear {
            rule: "hot".into(),
            device_id: "d".into(),
            was,
        };
        assert_eq!(
            apply(&conn, &[set(AlertState::Pending), set(AlertState::Firing)]).unwrap(),
            [true, true]
        );
        // Another replica's firing is not announced again, nor demoted to pending.
        assert_eq!(
            apply(&conn, &[set(AlertState::Firing), set(AlertState::Pending)]).unwrap(),
            [false, false]
        );
        assert_eq!(load(&conn).unwrap(), [row(AlertState::Firing)]);
        assert_eq!(
            apply(
                &conn,
                &[
                    clear(AlertState::Pending),
                    clear(AlertState::Firing),
                    clear(AlertState::Firing)
                ]
            )
            .unwrap(),
            [false, true, false]
        );
        assert!(load(&conn).unwrap().is_empty());
    }
}
