//! A fresh PostgreSQL database per test on the machine's server (127.0.0.1:5432, trust auth),
//! dropped when the test ends. `scripts/test` starts the cluster if it is down.
//!
//! `SLUICE_TEST_PG` overrides the server (a libpq URL without a database name, default
//! `postgres://postgres@127.0.0.1:5432`).
#![allow(dead_code)] // each test binary uses a different subset

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// One database, created on `new` and dropped (with its connections) on drop.
pub struct TestDb {
    /// Its name: `sluice_test_<pid>_<n>`.
    pub name: String,
    /// The server, without a database.
    server: String,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

fn server() -> String {
    std::env::var("SLUICE_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// Runs one SQL statement against the `postgres` database of `server` with psql.
pub fn psql(server: &str, database: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-d"])
        .arg(format!("{server}/{database}"))
        .args(["-c", sql])
        .output()
        .expect("psql runs (Debian package postgresql-client)");
    assert!(
        out.status.success(),
        "psql `{sql}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl TestDb {
    /// Creates a fresh, empty database.
    pub fn new() -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("sluice_test_{}_{n}", std::process::id());
        let server = server();
        psql(
            &server,
            "postgres",
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        );
        psql(&server, "postgres", &format!("CREATE DATABASE {name}"));
        Self { name, server }
    }

    /// The URL Sluice connects with (`storage.postgres.url`).
    pub fn url(&self) -> String {
        format!("{}/{}", self.server, self.name)
    }

    /// Runs SQL in this database and returns psql's unaligned output.
    pub fn sql(&self, sql: &str) -> String {
        psql(&self.server, &self.name, sql)
    }
}

impl Default for TestDb {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args(["-X", "-q", "-d"])
            .arg(format!("{}/postgres", self.server))
            .args([
                "-c",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            ])
            .output();
    }
}
