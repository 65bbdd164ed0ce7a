//! Alert states in the shared database: rule engine (on every replica) → **`alert_states`**
//! (migration `V5__alert_states.sql`, SPEC §12).
//!
//! Each replica evaluates rules over the readings it commits itself and applies its state
//! changes here in one transaction. A change applies only when it changes the stored state
//! (an upsert `… ON CONFLICT … DO UPDATE … WHERE` the state differs, never demoting `firing`
//! to `pending`; a delete of the row in the state left), and only the replica whose change
//! applied announces the event: an alert that several replicas decide on is announced once.

use tokio_postgres::types::ToSql;

use super::{pg_err, PgReader};
use crate::store::{
    alert_value_from_text, alert_value_text, AlertChange, AlertRow, AlertState, StoreError,
};

const SET: &str =
    "INSERT INTO alert_states (rule, device_id, state, since_ms, fired_ms, value, ts_ms)
     VALUES ($1, $2, $3, $4, $5, $6, $7)
     ON CONFLICT (rule, device_id) DO UPDATE SET
        state = excluded.state, since_ms = excluded.since_ms, fired_ms = excluded.fired_ms,
        value = excluded.value, ts_ms = excluded.ts_ms
     WHERE alert_states.state <> excluded.state
       AND NOT (alert_states.state = 'firing' AND excluded.state = 'pending')";

const CLEAR: &str = "DELETE FROM alert_states WHERE rule = $1 AND device_id = $2 AND state = $3";

impl PgReader {
    /// Every stored state.
    pub(super) fn load_alert_states(&self) -> Result<Vec<AlertRow>, StoreError> {
        self.driver.block_on(async {
            let client = self.pool.get().await.map_err(pg_err)?;
            let rows = client
                .query(
                    "SELECT rule, device_id, state, since_ms, fired_ms, value, ts_ms FROM alert_states",
                    &[],
                )
                .await
                .map_err(pg_err)?;
            Ok(rows
                .iter()
                .filter_map(|r| {
                    Some(AlertRow {
                        rule: r.get(0),
                        device_id: r.get(1),
                        state: AlertState::parse(r.get(2))?,
                        since_ms: r.get(3),
                        fired_ms: r.get(4),
                        value: alert_value_from_text(r.get(5)),
                        ts_ms: r.get(6),
                    })
                })
                .collect())
        })
    }

    /// Applies `changes` in one transaction; per change, whether it took effect.
    pub(super) fn apply_alerts(&self, changes: &[AlertChange]) -> Result<Vec<bool>, StoreError> {
        self.driver.block_on(async {
            let mut client = self.pool.get().await.map_err(pg_err)?;
            let tx = client.transaction().await.map_err(pg_err)?;
            let set = tx.prepare(SET).await.map_err(pg_err)?;
            let clear = tx.prepare(CLEAR).await.map_err(pg_err)?;
            let mut applied = Vec::with_capacity(changes.len());
            for c in changes {
                let n = match c {
                    AlertChange::Set(r) => {
                        let value = alert_value_text(&r.value);
                        let params: [&(dyn ToSql + Sync); 7] = [
                            &r.rule,
                            &r.device_id,
                            &r.state.as_str(),
                            &r.since_ms,
                            &r.fired_ms,
                            &value,
                            &r.ts_ms,
                        ];
                        tx.execute(&set, &params).await.map_err(pg_err)?
                    }
                    AlertChange::Clear {
                        rule,
                        device_id,
                        was,
                    } => tx
                        .execute(&clear, &[rule, device_id, &was.as_str()])
                        .await
                        .map_err(pg_err)?,
                };
                applied.push(n > 0);
            }
            tx.commit().await.map_err(pg_err)?;
            Ok(applied)
        })
    }
}
