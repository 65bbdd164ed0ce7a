//! The embedded store under crashes: the real binary is killed with SIGKILL at random points
//! while it ingests and compacts (with `storage.compaction_pause` stretching each compaction's
//! steps, so kills land inside them). After each restart every acknowledged reading must be
//! stored exactly once, and resending it must be a duplicate. Compared as sets and counts of
//! `(device_id, seq)`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use serde_json::{json, Value};

/// Devices posting; each request mixes all of them, as a gateway would.
const DEVICES: usize = 6;

fn env(pause_ms: u64) -> Vec<(&'static str, String)> {
    vec![
        ("SLUICE__STORAGE__COMPACTION_INTERVAL", "30ms".into()),
        ("SLUICE__STORAGE__JOURNAL_SEAL_READINGS", "300".into()),
        ("SLUICE__STORAGE__COMPACTION_PAUSE", format!("{pause_ms}ms")),
        ("RUST_LOG", "info,sluice::store=debug".into()),
    ]
}

async fn post(client: &reqwest::Client, base: &str, body: &[Value]) -> Option<Value> {
    let res = client
        .post(format!("{base}/v1/readings"))
        .json(&body)
        .send()
        .await
        .ok()?;
    if res.status() != 200 {
        return None;
    }
    res.json().await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_compaction_keeps_every_ack_exactly_once() {
    let data = tempfile::tempdir().expect("tempdir");
    let client = reqwest::Client::new();
    let mut rng = Rng::new();
    let mut acked: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    let mut next_seq = [0u64; DEVICES];
    let rounds = 6;
    for round in 0..rounds {
        let pause = [0, 20, 80][rng.below(3) as usize];
        let proc = SluiceProcess::start(data.path(), &env(pause));
        let base = proc.url();
        wait_ready(&client, &format!("{base}/readyz")).await;
        // Every reading acked so far is still there, once.
        check_exactly_once(&client, &base, &acked).await;
        // Resends of acked readings are duplicates, whatever the store did with them.
        let resend: Vec<Value> = acked
            .iter()
            .flat_map(|(d, seqs)| seqs.iter().rev().take(3).map(move |s| reading(d, *s)))
            .collect();
        if !resend.is_empty() {
            let body = post(&client, &base, &resend)
                .await
                .expect("resend answered");
            assert_eq!(body["accepted"], 0, "round {round}: {body}");
            assert_eq!(body["duplicates"], resend.len(), "round {round}: {body}");
        }
        // Post until a random moment, then SIGKILL.
        let kill_after = Duration::from_millis(150 + rng.below(600));
        let started = Instant::now();
        let mut proc = Some(proc);
        while started.elapsed() < kill_after {
            let batch: Vec<Value> = (0..50)
                .map(|i| {
                    let d = (i + rng.below(DEVICES as u64) as usize) % DEVICES;
                    next_seq[d] += 1;
                    reading(&format!("crash-{d}"), next_seq[d])
                })
                .collect();
            if let Some(body) = post(&client, &base, &batch).await {
                assert_eq!(body["accepted"], 50, "{body}");
                for r in &batch {
                    acked
                        .entry(r["device_id"].as_str().expect("id").to_owned())
                        .or_default()
                        .insert(r["seq"].as_u64().expect("seq"));
                }
            }
        }
        let p = proc.take().expect("running");
        p.signal(Signal::SIGKILL);
        tokio::task::spawn_blocking(move || {
            let mut p = p;
            p.wait_exit(Duration::from_secs(10));
        })
        .await
        .expect("exited");
    }
    let proc = SluiceProcess::start(data.path(), &env(0));
    let base = proc.url();
    wait_ready(&client, &format!("{base}/readyz")).await;
    let n = check_exactly_once(&client, &base, &acked).await;
    assert!(n > 500, "the test acked too little to mean much: {n}");
    // After a final compaction the answer is the same.
    wait_until(Duration::from_secs(20), "journal compacted", || async {
        common::scrape_metric(&client, &base, "sluice_store_journal_readings", &[]).await == 0.0
    })
    .await;
    check_exactly_once(&client, &base, &acked).await;
}

/// Asserts every acked reading is stored exactly once; returns how many were acked.
async fn check_exactly_once(
    client: &reqwest::Client,
    base: &str,
    acked: &BTreeMap<String, BTreeSet<u64>>,
) -> usize {
    let mut total = 0;
    for (device, seqs) in acked {
        let stored = stored_seq_list(client, base, device).await;
        let set: BTreeSet<u64> = stored.iter().copied().collect();
        assert_eq!(
            set.len(),
            stored.len(),
            "{device}: a reading is stored twice"
        );
        let missing: Vec<_> = seqs.difference(&set).collect();
        assert!(
            missing.is_empty(),
            "{device}: acked but not stored: {missing:?}"
        );
        total += seqs.len();
    }
    total
}

/// `GET /v1/devices/{id}` shows the same after a restart: the true `last_seen`, and metrics
/// missing from the newest reading keep their latest values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_state_is_exact_after_restart() {
    let data = tempfile::tempdir().expect("tempdir");
    let client = reqwest::Client::new();
    let proc = SluiceProcess::start(data.path(), &env(0));
    let base = proc.url();
    wait_ready(&client, &format!("{base}/readyz")).await;
    let body = json!([
        {"device_id": "state-1", "seq": 1, "metrics": {"a": 1, "big": 18446744073709551615u64}},
        {"device_id": "state-1", "seq": 2, "metrics": {"b": true}},
    ]);
    post(&client, &base, body.as_array().expect("array"))
        .await
        .expect("posted");
    let before: Value = client
        .get(format!("{base}/v1/devices/state-1"))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(before["metrics"]["big"], json!(18446744073709551615u64));
    proc.signal(Signal::SIGTERM);
    let mut p = proc;
    tokio::task::spawn_blocking(move || {
        p.wait_exit(Duration::from_secs(20));
    })
    .await
    .expect("exited");
    let proc = SluiceProcess::start(data.path(), &env(0));
    let base = proc.url();
    wait_ready(&client, &format!("{base}/readyz")).await;
    let after: Value = client
        .get(format!("{base}/v1/devices/state-1"))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(before, after);
}
