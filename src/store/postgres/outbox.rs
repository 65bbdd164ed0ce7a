//! The PostgreSQL backend's NATS outbox (SPEC §13): commit → `outbox` table → **the one
//! publishing replica** → NATS.
//!
//! Each commit copies its new readings into `outbox` in the same transaction (binary `COPY`,
//! `PgStore::copy_outbox`), so a reading is in the outbox exactly when it is committed. Of
//! all replicas, the one that holds the session advisory lock [`OUTBOX_LOCK`] on its own
//! connection publishes: one publisher keeps the order per device. When it dies, PostgreSQL
//! releases the lock with its connection and another replica takes over within a second.
//!
//! Rows are read in id order and deleted by id once NATS has acknowledged them. Ids are drawn
//! at insert time, so a transaction that commits late may add ids below published ones; they
//! are picked up by the next read, because nothing is skipped by a cursor. A read skips the
//! rows handed out and not yet acknowledged (the publisher keeps a window of them in flight),
//! and `advance` deletes exactly the rows handed out up to the acknowledged one, in the order
//! they were handed out.
//!
//! [`OUTBOX_LOCK`]: super::OUTBOX_LOCK

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tokio_postgres::{Client, NoTls};

use super::{pg_err, stored_row, Driver, OUTBOX_LOCK};
use crate::store::{Outbox, OutboxItem, StoreError};

/// A replica that is not the publisher tries to become it this often.
const TAKE_OVER_EVERY: Duration = Duration::from_secs(1);

/// This replica's side of the publisher lock.
#[derive(Default)]
struct Lock {
    /// The connection that holds (or tries for) the lock. A dead one is dropped.
    client: Option<Client>,
    /// Whether `client` holds the lock.
    held: bool,
    /// When the lock was last tried.
    tried: Option<Instant>,
    /// Outbox ids handed out and not yet acknowledged, in the order they were handed out:
    /// what `advance` deletes, and what a read skips.
    handed: Vec<i64>,
}

/// The outbox table, read by the replica holding the publisher lock.
pub struct PgOutbox {
    /// Drives the connections.
    driver: Arc<Driver>,
    /// For the lock's own connection.
    config: tokio_postgres::Config,
    /// Query connections, for the backlog count.
    pool: Pool,
    /// The lock and what was handed out.
    lock: Mutex<Lock>,
}

impl PgOutbox {
    /// The outbox over the database behind `config` and `pool`.
    pub fn new(driver: Arc<Driver>, config: tokio_postgres::Config, pool: Pool) -> Self {
        Self {
            driver,
            config,
            pool,
            lock: Mutex::new(Lock::default()),
        }
    }

    /// Takes the publisher lock if this replica does not hold it and may try again now.
    async fn lead(&self, lock: &mut Lock) -> Result<bool, StoreError> {
        if lock.client.as_ref().is_some_and(Client::is_closed) {
            *lock = Lock::default(); // the lock went with the connection
        }
        if lock.held {
            return Ok(true);
        }
        if lock.tried.is_some_and(|t| t.elapsed() < TAKE_OVER_EVERY) {
            return Ok(false);
        }
        lock.tried = Some(Instant::now());
        if lock.client.is_none() {
            let (client, conn) = self.config.connect(NoTls).await.map_err(pg_err)?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            lock.client = Some(client);
        }
        let client = lock.client.as_ref().expect("connected above");
        let row = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&OUTBOX_LOCK])
            .await
            .map_err(pg_err)?;
        lock.held = row.get(0);
        if lock.held {
            tracing::info!("this replica publishes the NATS outbox");
        }
        Ok(lock.held)
    }
}

impl Outbox for PgOutbox {
    fn start(&self) -> Result<u64, StoreError> {
        Ok(0)
    }

    /// The oldest rows still in the table; `from` is not needed (published rows are gone).
    /// Empty while another replica publishes.
    fn read(&self, _from: u64, max: usize) -> Result<Vec<OutboxItem>, StoreError> {
        let mut lock = self.lock.lock().expect("outbox lock");
        self.driver.block_on(async {
            let result = async {
                if !self.lead(&mut lock).await? {
                    return Ok(Vec::new());
                }
                let client = lock.client.as_ref().expect("leader has a connection");
                let rows = client
                    .query(
                        "SELECT id, rid, ts, seq, metrics::text, tags::text, device_id, origin
                         FROM outbox WHERE NOT (id = ANY($2)) ORDER BY id LIMIT $1",
                        &[&(max as i64), &lock.handed],
                    )
                    .await
                    .map_err(pg_err)?;
                let mut items = Vec::with_capacity(rows.len());
                for row in &rows {
                    let id: i64 = row.get(0);
                    let stored = stored_row(row, 1)?;
                    lock.handed.push(id);
                    items.push(OutboxItem {
                        device_id: row.get(6),
                        unsequenced_id: stored.rid.to_string(),
                        row: stored,
                        next: id as u64,
                        origin: Some(row.get(7)),
                    });
                }
                Ok(items)
            }
            .await;
            if result.is_err() {
                *lock = Lock::default(); // reconnect (and retake the lock) next time
            }
            result
        })
    }

    /// Deletes the rows handed out up to and including id `to`, in the order they were
    /// handed out (ids are not in commit order across reads).
    fn advance(&self, to: u64) -> Result<(), StoreError> {
        let mut lock = self.lock.lock().expect("outbox lock");
        let Some(upto) = lock.handed.iter().position(|id| *id as u64 == to) else {
            return Ok(()); // not handed out by this replica's current lock: nothing to do
        };
        let done: Vec<i64> = lock.handed[..=upto].to_vec();
        let Some(client) = lock.client.as_ref().filter(|_| lock.held) else {
            return Ok(());
        };
        let result = self.driver.block_on(async {
            client
                .execute("DELETE FROM outbox WHERE id = ANY($1)", &[&done])
                .await
                .map_err(pg_err)
        });
        match result {
            Ok(_) => {
                lock.handed.drain(..=upto);
                Ok(())
            }
            Err(e) => {
                *lock = Lock::default();
                Err(e)
            }
        }
    }

    fn lag(&self) -> Result<u64, StoreError> {
        self.driver.block_on(async {
            let client = self.pool.get().await.map_err(pg_err)?;
            let n: i64 = client
                .query_one("SELECT count(*) FROM outbox", &[])
                .await
                .map_err(pg_err)?
                .get(0);
            Ok(n as u64)
        })
    }

    fn persist(&self) -> Result<(), StoreError> {
        Ok(()) // every advance is a committed DELETE
    }

    fn rewind(&self) {
        self.lock.lock().expect("outbox lock").handed.clear();
    }

    /// Closes the lock's connection (PostgreSQL releases the lock with it) and waits
    /// [`TAKE_OVER_EVERY`] before trying again, so a replica that can reach NATS takes over.
    fn release(&self) {
        let mut lock = self.lock.lock().expect("outbox lock");
        if lock.held {
            tracing::warn!(
                "this replica cannot reach NATS: it lets another replica publish the outbox"
            );
        }
        *lock = Lock {
            tried: Some(Instant::now()),
            ..Lock::default()
        };
    }
}
