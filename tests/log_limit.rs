//! Repeating error lines are rate-limited (`telemetry::log_limit`), against the real binary:
//! a store that cannot be opened fails every second, and its line is logged once, then once
//! per 30 s with `suppressed`, and once more when the store recovers, while
//! `sluice_store_errors_total` counts every failure.
//!
//! The store is kept from opening by holding the data directory's `LOCK` (as a second Sluice on
//! the same directory would): the writer retries every second, with "another Sluice process is
//! using this data directory". Releasing the lock lets it open.

mod common;

use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

/// The log lines of `sluice` that contain `what`.
fn lines(sluice: &SluiceProcess, what: &str) -> Vec<String> {
    sluice
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains(what))
        .cloned()
        .collect()
}

/// The integer value of `key=` in a text log line.
fn field(line: &str, key: &str) -> Option<u64> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

async fn store_errors(client: &reqwest::Client, base: &str) -> f64 {
    common::scrape_metric(
        client,
        base,
        "sluice_store_errors_total",
        &[("store", "sqlite")],
    )
    .await
}

#[tokio::test]
async fn a_store_that_stays_down_is_logged_once_then_every_30_s_with_a_count() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(data.join("LOCK"))
        .unwrap();
    let lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| e)
        .expect("the test holds the data directory's lock");

    let mut sluice = SluiceProcess::start(&data, &[]);
    let base = sluice.url();
    let client = reqwest::Client::new();
    const FAILED: &str = "store open failed";

    // Five failures (one a second): one line. Before the limit there were five.
    wait_until(
        Duration::from_secs(20),
        "5 failed opens counted",
        || async { store_errors(&client, &base).await >= 5.0 },
    )
    .await;
    let first = lines(&sluice, FAILED);
    assert_eq!(first.len(), 1, "one line for five failures: {first:#?}");
    assert_eq!(field(&first[0], "suppressed"), Some(0), "{}", first[0]);
    assert!(
        first[0].contains("another Sluice process"),
        "the line says why: {}",
        first[0]
    );

    // The next line comes 30 s after the first, with the failures left out since.
    wait_until(Duration::from_secs(45), "a second line", || async {
        lines(&sluice, FAILED).len() >= 2
    })
    .await;
    let counted = store_errors(&client, &base).await as u64;
    let second = lines(&sluice, FAILED);
    assert_eq!(second.len(), 2, "{second:#?}");
    let suppressed = field(&second[1], "suppressed").expect("a count");
    // 30 s of one failure a second, less scheduling slack; every one of them counted.
    assert!(
        (20..=31).contains(&suppressed),
        "suppressed={suppressed}: {}",
        second[1]
    );
    assert!(
        counted >= suppressed + 2,
        "metric {counted} against {suppressed} left out + 2 logged"
    );

    // Released: the store opens, and the recovery says how many failures it ended.
    drop(lock);
    wait_ready(&client, &format!("{base}/readyz")).await;
    let recovered = lines(&sluice, "store recovered");
    assert_eq!(recovered.len(), 1, "{recovered:#?}");
    let failures = field(&recovered[0], "failures").expect("a count");
    let counted = store_errors(&client, &base).await as u64;
    assert_eq!(
        failures, counted,
        "the streak's failures are the failed opens counted: {}",
        recovered[0]
    );
    assert_eq!(lines(&sluice, FAILED).len(), 2);

    sluice.signal(Signal::SIGTERM);
    assert!(sluice.wait_exit(Duration::from_secs(30)).success());
}
