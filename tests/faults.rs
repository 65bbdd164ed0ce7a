//! Overload, graceful shutdown and crash: in each, every reading that got a 200 must be in the
//! store afterwards, compared as sets of `(device_id, seq)`. Also the process setting that keeps
//! memory from ballooning under load (transparent huge pages off).

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;
use serde_json::Value;

type Acked = Arc<Mutex<HashMap<String, BTreeSet<u64>>>>;

/// One device posting batches of `batch` readings with increasing seqs, until `max_requests`
/// or a connection error (the server went away). Records what got a 200.
async fn device_client(
    client: reqwest::Client,
    base: String,
    device: String,
    batch: u64,
    max_requests: u64,
    acked: Acked,
    shed: Arc<Mutex<u64>>,
) {
    let mut seq = 0u64;
    for _ in 0..max_requests {
        let readings: Vec<Value> = (seq..seq + batch).map(|s| reading(&device, s)).collect();
        let res = client
            .post(format!("{base}/v1/readings"))
            .json(&readings)
            .send()
            .await;
        let Ok(res) = res else { return };
        match res.status().as_u16() {
            200 => {
                let body: Value = res.json().await.unwrap();
                assert_eq!(body["accepted"], batch, "{body}");
                acked
                    .lock()
                    .unwrap()
                    .entry(device.clone())
                    .or_default()
                    .extend(seq..seq + batch);
            }
            503 => {
                assert!(
                    res.headers().contains_key("retry-after"),
                    "503 without Retry-After"
                );
                *shed.lock().unwrap() += batch;
            }
            other => panic!(
                "unexpected status {other}: {}",
                res.text().await.unwrap_or_default()
            ),
        }
        seq += batch;
    }
}

async fn assert_all_acked_stored(client: &reqwest::Client, base: &str, acked: &Acked) -> usize {
    let acked = acked.lock().unwrap().clone();
    let mut total = 0;
    for (device, seqs) in &acked {
        let stored = stored_seqs(client, base, device).await;
        let missing: Vec<_> = seqs.difference(&stored).collect();
        assert!(
            missing.is_empty(),
            "{device}: acked but not stored: {missing:?}"
        );
        total += seqs.len();
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_sheds_with_503_and_loses_nothing_acked() {
    let app = spawn_app_with(|s| {
        s.pipeline.queue_capacity = 200;
        s.limits.max_readings_per_request = 50;
        s.pipeline.batch_max = 100;
        s.storage.commit_delay = Duration::from_millis(40);
    })
    .await;
    let acked: Acked = Default::default();
    let shed = Arc::new(Mutex::new(0u64));
    let clients: Vec<_> = (0..12)
        .map(|i| {
            tokio::spawn(device_client(
                app.client.clone(),
                app.url(""),
                format!("load-{i}"),
                50,
                15,
                acked.clone(),
                shed.clone(),
            ))
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    let shed = *shed.lock().unwrap();
    assert!(shed > 0, "a tiny queue and a slow store must shed");
    assert_eq!(
        app.metric("sluice_readings_shed_total", &[("transport", "http")])
            .await,
        shed as f64
    );
    let n = assert_all_acked_stored(&app.client, &app.url(""), &acked).await;
    assert!(n > 0, "some readings must get through");
    // And nothing that was refused was stored: the store holds exactly the acked set.
    for i in 0..12 {
        let device = format!("load-{i}");
        let want = acked
            .lock()
            .unwrap()
            .get(&device)
            .cloned()
            .unwrap_or_default();
        assert_eq!(app.stored_seqs(&device).await, want, "{device}");
    }
    assert_eq!(
        app.metric("sluice_pipeline_queue_depth", &[("stage", "admission")])
            .await,
        0.0
    );
    app.shutdown().await.unwrap();
}

/// Starts the binary, runs clients until `acked_before_fault` readings are acked, then sends
/// `signal`. Returns what was acked and the data dir for the restart.
async fn fault_run(signal: Signal) -> (Acked, tempfile::TempDir, std::process::ExitStatus) {
    let data = tempfile::tempdir().unwrap();
    let mut proc = SluiceProcess::start(data.path(), &[]);
    let client = reqwest::Client::new();
    wait_ready(&client, &format!("{}/readyz", proc.url())).await;
    let acked: Acked = Default::default();
    let shed = Arc::new(Mutex::new(0u64));
    let clients: Vec<_> = (0..4)
        .map(|i| {
            tokio::spawn(device_client(
                client.clone(),
                proc.url(),
                format!("fault-{i}"),
                20,
                100_000,
                acked.clone(),
                shed.clone(),
            ))
        })
        .collect();
    let count = || {
        acked
            .lock()
            .unwrap()
            .values()
            .map(|s| s.len())
            .sum::<usize>()
    };
    wait_until(
        Duration::from_secs(30),
        "readings acked before the fault",
        || async { count() >= 2_000 },
    )
    .await;
    proc.signal(signal);
    let status = tokio::task::spawn_blocking(move || {
        let status = proc.wait_exit(Duration::from_secs(30));
        drop(proc);
        status
    })
    .await
    .unwrap();
    for c in clients {
        c.await.unwrap();
    }
    (acked, data, status)
}

async fn restart_and_check(data: &tempfile::TempDir, acked: &Acked) {
    let proc = SluiceProcess::start(data.path(), &[]);
    let client = reqwest::Client::new();
    wait_ready(&client, &format!("{}/readyz", proc.url())).await;
    let n = assert_all_acked_stored(&client, &proc.url(), acked).await;
    assert!(n >= 2_000);
    // Device state is rebuilt from the store after the restart.
    let res: Value = client
        .get(format!("{}/v1/devices", proc.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        res["devices"].as_array().unwrap().len(),
        acked.lock().unwrap().len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_posting_exits_zero_and_keeps_every_ack() {
    let (acked, data, status) = fault_run(Signal::SIGTERM).await;
    assert!(status.success(), "graceful shutdown exits 0, got {status}");
    restart_and_check(&data, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_posting_keeps_every_ack() {
    let (acked, data, status) = fault_run(Signal::SIGKILL).await;
    assert!(!status.success());
    restart_and_check(&data, &acked).await;
}

#[tokio::test]
async fn config_errors_exit_2_and_check_config_prints_the_effective_config() {
    // Bad config: exit code 2 and the key named.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .env("SLUICE__PIPELINE__BATCH_MAXX", "3")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("batch_maxx"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["--config", "/nonexistent/sluice.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // --check-config prints the effective configuration.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--check-config")
        .env("SLUICE__STORAGE__RETENTION", "2days")
        .env("SLUICE__MQTT__PASSWORD", "hunter2")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("retention = \"2days\""), "{text}");
    assert!(text.contains("[pipeline]"));
    assert!(!text.contains("hunter2"), "secrets are redacted");
}

/// `THP_enabled` in `/proc/<pid>/status` (Linux 5.0+; `pid` may be `self`): `0` once the
/// process turned transparent huge pages off with `PR_SET_THP_DISABLE`.
fn thp_enabled(pid: &str) -> String {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status readable");
    status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(|v| v.trim().to_owned())
        .expect("the kernel reports THP_enabled (Linux 5.0 and later)")
}

/// Sluice turns transparent huge pages off for its process before it allocates what lasts
/// (with them, peak RSS of a fleet-100k run was 44 to 61 MiB higher: `memory.rs`), and
/// leaves them to mimalloc's own option when `MIMALLOC_ALLOW_THP` is set: then the process
/// keeps the setting it inherited, the test runner's.
#[test]
fn transparent_huge_pages_are_off_unless_mimalloc_is_told_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let sluice = SluiceProcess::start(dir.path(), &[]);
    assert_eq!(thp_enabled(&sluice.child.id().to_string()), "0");
    drop(sluice);
    let sluice = SluiceProcess::start(dir.path(), &[("MIMALLOC_ALLOW_THP", "1".into())]);
    assert_eq!(
        thp_enabled(&sluice.child.id().to_string()),
        thp_enabled("self")
    );
}
