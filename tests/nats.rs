//! NATS output (SPEC §13): every committed reading is published once (JetStream's duplicate
//! window and `Nats-Msg-Id`), in order per device, from a durable outbox that survives a NATS
//! outage and a kill -9; and `/v1/live` on one replica streams what another committed.
//!
//! Each test starts its own `nats-server -js` on a free port (tests/common/nats_server.rs).
//! Every check compares the *set* of acknowledged readings with what the stream holds.

mod common;
#[path = "common/nats_server.rs"]
mod nats_server;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use nix::sys::signal::Signal;
use serde_json::{json, Value};
use sluice::config::DbUrl;
use sluice::Settings;
use tokio_tungstenite::tungstenite::Message;

use common::{next_ws_json, spawn_app_with, wait_until, SluiceProcess, TestApp};
use nats_server::{read_stream, stream_len, NatsServer, StreamMessage};

const PREFIX: &str = "sluice.readings";

/// NATS on, and small journal generations compacted quickly, so that readings move from the
/// journal to chunks (and, while unpublished, to the outbox directory) during a test.
fn with_nats(s: &mut Settings, url: String) {
    s.nats.enabled = true;
    s.nats.url = DbUrl::new(url);
    s.storage.journal_seal_readings = 200;
    s.storage.compaction_interval = Duration::from_millis(100);
}

/// The readings a test sent and had acknowledged: device → seqs, plus readings without seq.
#[derive(Default)]
struct Acked {
    seqs: BTreeMap<String, BTreeSet<u64>>,
    unsequenced: usize,
}

impl Acked {
    fn total(&self) -> usize {
        self.seqs.values().map(BTreeSet::len).sum::<usize>() + self.unsequenced
    }
}

/// Posts `batches` batches of 40 readings over 8 devices (seq rising per device), each with
/// one reading without seq and, every third batch, a resend of an acknowledged reading.
async fn post_batches(app: &TestApp, acked: &mut Acked, batches: usize, next: &mut u64) {
    for b in 0..batches {
        let mut batch: Vec<Value> = (0..39)
            .map(|i| {
                *next += 1;
                json!({"device_id": format!("pub-{}", i % 8), "seq": *next,
                       "metrics": {"t": *next as f64 / 10.0}})
            })
            .collect();
        batch.push(json!({"device_id": "pub-noseq", "metrics": {"n": b}}));
        let resend = if b % 3 == 2 {
            acked
                .seqs
                .iter()
                .next()
                .and_then(|(d, s)| s.iter().next().map(|s| (d.clone(), *s)))
        } else {
            None
        };
        if let Some((d, s)) = &resend {
            batch.push(json!({"device_id": d, "seq": s, "metrics": {"t": 0.0}}));
        }
        let res = app.post_json(&json!(batch)).await;
        assert_eq!(res.status(), 200);
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["accepted"], 40, "{body}");
        assert_eq!(body["duplicates"], usize::from(resend.is_some()), "{body}");
        for r in &batch[..39] {
            acked
                .seqs
                .entry(r["device_id"].as_str().unwrap().to_owned())
                .or_default()
                .insert(r["seq"].as_u64().unwrap());
        }
        acked.unsequenced += 1;
    }
}

/// The stream holds exactly the acknowledged readings: one message each, under its device's
/// subject, with its `Nats-Msg-Id`, and in seq order per device.
fn check_stream(msgs: &[StreamMessage], acked: &Acked) {
    let ids: BTreeSet<&str> = msgs.iter().map(|m| m.msg_id.as_str()).collect();
    assert_eq!(
        ids.len(),
        msgs.len(),
        "a Nats-Msg-Id is in the stream twice"
    );
    let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut unsequenced = 0;
    for m in msgs {
        let device = m.body["device_id"].as_str().expect("device_id").to_owned();
        assert_eq!(m.subject, format!("{PREFIX}.{device}"));
        assert_eq!(m.body["type"], "reading");
        match m.body["seq"].as_u64() {
            Some(seq) => {
                assert_eq!(m.msg_id, format!("{device}:{seq}"));
                seen.entry(device).or_default().push(seq);
            }
            None => {
                assert!(m.msg_id.starts_with(&format!("{device}:r")), "{}", m.msg_id);
                unsequenced += 1;
            }
        }
    }
    for (device, seqs) in &seen {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{device}: not in commit order: {seqs:?}"
        );
    }
    let published: BTreeMap<String, BTreeSet<u64>> = seen
        .into_iter()
        .map(|(d, s)| (d, s.into_iter().collect()))
        .collect();
    assert_eq!(
        published, acked.seqs,
        "published set differs from the acknowledged set"
    );
    assert_eq!(unsequenced, acked.unsequenced);
}

async fn wait_published(js: &async_nats::jetstream::Context, want: usize, within: Duration) {
    wait_until(within, "every reading in the stream", || async {
        stream_len(js).await as usize >= want
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_committed_reading_is_published_once_in_order() {
    let nats = NatsServer::start();
    nats.create_stream(PREFIX).await;
    let url = nats.url();
    let app = spawn_app_with(|s| with_nats(s, url)).await;
    let mut acked = Acked::default();
    let mut next = 0;
    post_batches(&app, &mut acked, 30, &mut next).await;
    let js = nats.jetstream().await;
    wait_published(&js, acked.total(), Duration::from_secs(30)).await;
    wait_until(Duration::from_secs(10), "outbox lag 0", || async {
        app.metric("sluice_nats_outbox_lag", &[]).await == 0.0
    })
    .await;
    let msgs = read_stream(&js).await;
    assert_eq!(msgs.len(), acked.total());
    check_stream(&msgs, &acked);
    assert!(app.metric("sluice_nats_published_total", &[]).await >= acked.total() as f64);
    assert_eq!(app.metric("sluice_nats_connected", &[]).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_outage_delays_publication_and_loses_nothing() {
    let mut nats = NatsServer::start();
    nats.create_stream(PREFIX).await;
    let url = nats.url();
    let app = spawn_app_with(|s| with_nats(s, url)).await;
    let mut acked = Acked::default();
    let mut next = 0;
    post_batches(&app, &mut acked, 10, &mut next).await;
    // Stop NATS between batches, not in the middle of one (see the module docs of
    // sluice::outputs::nats on a connection lost mid-batch).
    let js = nats.jetstream().await;
    wait_published(&js, acked.total(), Duration::from_secs(30)).await;
    drop(js);
    nats.stop();
    // Ingest keeps acknowledging while NATS is down.
    post_batches(&app, &mut acked, 30, &mut next).await;
    wait_until(Duration::from_secs(10), "a backlog", || async {
        app.metric("sluice_nats_outbox_lag", &[]).await > 0.0
    })
    .await;
    // Compaction moves generations NATS has not acknowledged into the outbox directory.
    let outbox = app.data_dir.path().join("outbox");
    wait_until(
        Duration::from_secs(20),
        "a kept segment in outbox/",
        || async {
            std::fs::read_dir(&outbox)
                .map(|d| {
                    d.filter_map(Result::ok)
                        .any(|e| e.file_name().to_string_lossy().ends_with(".seg"))
                })
                .unwrap_or(false)
        },
    )
    .await;
    nats.restart();
    let js = nats.jetstream().await;
    wait_published(&js, acked.total(), Duration::from_secs(60)).await;
    wait_until(Duration::from_secs(10), "outbox lag 0", || async {
        app.metric("sluice_nats_outbox_lag", &[]).await == 0.0
    })
    .await;
    let msgs = read_stream(&js).await;
    assert_eq!(msgs.len(), acked.total());
    check_stream(&msgs, &acked);
    // Published segments are deleted.
    wait_until(Duration::from_secs(10), "outbox/ emptied", || async {
        std::fs::read_dir(&outbox)
            .map(|d| {
                !d.filter_map(Result::ok)
                    .any(|e| e.file_name().to_string_lossy().ends_with(".seg"))
            })
            .unwrap_or(true)
    })
    .await;
}

/// In core mode (no stream), the backlog gauge follows an outage: publishing waits while
/// NATS is away instead of blocking on the client's buffer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backlog_gauge_follows_an_outage_in_core_mode() {
    let mut nats = NatsServer::start();
    let url = nats.url();
    let app = spawn_app_with(|s| with_nats(s, url)).await;
    let mut acked = Acked::default();
    let mut next = 0;
    post_batches(&app, &mut acked, 3, &mut next).await;
    wait_until(Duration::from_secs(10), "published", || async {
        app.metric("sluice_nats_outbox_lag", &[]).await == 0.0
            && app.metric("sluice_nats_published_total", &[]).await >= 120.0
    })
    .await;
    nats.stop();
    wait_until(Duration::from_secs(10), "disconnected", || async {
        app.metric("sluice_nats_connected", &[]).await == 0.0
    })
    .await;
    for round in 1..=3 {
        post_batches(&app, &mut acked, 10, &mut next).await;
        let want = (round * 400) as f64;
        wait_until(
            Duration::from_secs(10),
            "the gauge to count the backlog",
            || async { app.metric("sluice_nats_outbox_lag", &[]).await == want },
        )
        .await;
    }
    nats.restart();
    wait_until(Duration::from_secs(30), "the backlog published", || async {
        app.metric("sluice_nats_outbox_lag", &[]).await == 0.0
    })
    .await;
}

/// A reading larger than the server's `max_payload` is skipped and counted, and the readings
/// after it are published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_too_large_for_the_server_does_not_hold_up_the_rest() {
    let nats = NatsServer::start_with("max_payload: 4096\n");
    nats.create_stream(PREFIX).await;
    let url = nats.url();
    let app = spawn_app_with(|s| with_nats(s, url)).await;
    let mut acked = Acked::default();
    let mut next = 0;
    post_batches(&app, &mut acked, 2, &mut next).await;
    // 200 metrics with long names: about 8 KiB of JSON.
    let metrics: serde_json::Map<String, Value> = (0..200)
        .map(|i| (format!("a_rather_long_metric_name_{i:03}"), json!(i)))
        .collect();
    let big = json!([{"device_id": "big-1", "seq": 1, "metrics": metrics}]);
    assert_eq!(app.post_json(&big).await.status(), 200);
    post_batches(&app, &mut acked, 2, &mut next).await;
    let js = nats.jetstream().await;
    wait_published(&js, acked.total(), Duration::from_secs(30)).await;
    check_stream(&read_stream(&js).await, &acked);
    wait_until(Duration::from_secs(10), "the skip counted", || async {
        app.metric("sluice_nats_errors_total", &[("kind", "too_large")])
            .await
            == 1.0
            && app.metric("sluice_nats_outbox_lag", &[]).await == 0.0
    })
    .await;
}

/// Readings without seq from two stores get different message ids, so JetStream keeps both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_without_seq_from_two_stores_are_all_published() {
    let nats = NatsServer::start();
    nats.create_stream(PREFIX).await;
    let (url_a, url_b) = (nats.url(), nats.url());
    let a = spawn_app_with(|s| with_nats(s, url_a)).await;
    let b = spawn_app_with(|s| with_nats(s, url_b)).await;
    for i in 0..5 {
        for app in [&a, &b] {
            let res = app
                .post_json(&json!([{"device_id": "shared-1", "metrics": {"i": i}}]))
                .await;
            assert_eq!(res.status(), 200);
        }
    }
    let js = nats.jetstream().await;
    wait_published(&js, 10, Duration::from_secs(30)).await;
    let msgs = read_stream(&js).await;
    assert_eq!(msgs.len(), 10);
    let ids: BTreeSet<&str> = msgs.iter().map(|m| m.msg_id.as_str()).collect();
    assert_eq!(ids.len(), 10, "{ids:?}");
}

fn process_env(nats: &NatsServer, in_flight: usize) -> Vec<(&'static str, String)> {
    vec![
        ("SLUICE__NATS__ENABLED", "true".into()),
        ("SLUICE__NATS__URL", nats.url()),
        ("SLUICE__NATS__MAX_IN_FLIGHT", in_flight.to_string()),
        ("SLUICE__STORAGE__JOURNAL_SEAL_READINGS", "500".into()),
        ("SLUICE__STORAGE__COMPACTION_INTERVAL", "200ms".into()),
    ]
}

/// Posts `batches` batches of 100 readings over devices `<prefix>-0..devices`, seqs rising
/// from 1, to the Sluice at `base`; every one must be accepted. Returns them.
async fn post_backlog(
    client: &reqwest::Client,
    base: &str,
    prefix: &str,
    devices: u64,
    batches: u64,
) -> Acked {
    let mut acked = Acked::default();
    for b in 0..batches {
        let batch: Vec<Value> = (0..100u64)
            .map(|i| {
                let seq = b * 100 + i + 1;
                json!({"device_id": format!("{prefix}-{}", i % devices), "seq": seq,
                       "metrics": {"v": seq}})
            })
            .collect();
        let body = post_to(client, base, &batch).await;
        assert_eq!(body["accepted"], 100, "{body}");
        for r in &batch {
            acked
                .seqs
                .entry(r["device_id"].as_str().unwrap().into())
                .or_default()
                .insert(r["seq"].as_u64().unwrap());
        }
    }
    acked
}

async fn post_to(client: &reqwest::Client, base: &str, batch: &[Value]) -> Value {
    let res = client
        .post(format!("{base}/v1/readings"))
        .json(&batch)
        .send()
        .await
        .expect("POST");
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_publish_leaves_no_gap_and_no_duplicate() {
    let data = tempfile::tempdir().unwrap();
    let mut nats = NatsServer::start();
    nats.create_stream(PREFIX).await;
    nats.stop();
    let client = reqwest::Client::new();
    // A backlog built while NATS is down, then published slowly (one in flight: 10 000
    // PubAck round trips, so the kill lands mid-publish even on a fast machine).
    let proc = SluiceProcess::start(data.path(), &process_env(&nats, 1));
    let base = proc.url();
    common::wait_ready(&client, &format!("{base}/readyz")).await;
    let acked = post_backlog(&client, &base, "k9", 10, 100).await;
    nats.restart();
    let js = nats.jetstream().await;
    wait_until(Duration::from_secs(30), "publication under way", || async {
        stream_len(&js).await > 0
    })
    .await;
    proc.signal(Signal::SIGKILL);
    let mut proc = proc;
    tokio::task::spawn_blocking(move || {
        proc.wait_exit(Duration::from_secs(10));
    })
    .await
    .unwrap();
    let published_before = stream_len(&js).await as usize;
    assert!(
        published_before < acked.total(),
        "killed too late to test a restart mid-publish ({published_before} of {})",
        acked.total()
    );
    let proc = SluiceProcess::start(data.path(), &process_env(&nats, 256));
    common::wait_ready(&client, &format!("{}/readyz", proc.url())).await;
    wait_published(&js, acked.total(), Duration::from_secs(60)).await;
    // The stream can be whole before the restart has finished re-sending: messages the
    // killed process had sent land after `published_before` was read. Count the restart's
    // publications once its outbox is empty.
    wait_until(
        Duration::from_secs(60),
        "the restart's outbox drained",
        || async {
            common::scrape_metric(&client, &proc.url(), "sluice_nats_outbox_lag", &[]).await == 0.0
        },
    )
    .await;
    let republished =
        common::scrape_metric(&client, &proc.url(), "sluice_nats_published_total", &[]).await;
    // The stream drops re-sends within its duplicate window: exactly one message per reading.
    let msgs = read_stream(&js).await;
    assert_eq!(msgs.len(), acked.total());
    check_stream(&msgs, &acked);
    assert!(
        republished >= (acked.total() - published_before) as f64,
        "the restart published {republished}, fewer than the {} left",
        acked.total() - published_before
    );
}

type LiveStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn live_stream(app: &TestApp, device_glob: &str) -> LiveStream {
    let (live, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/v1/live?device={device_glob}", app.addr))
            .await
            .expect("live stream");
    live
}

/// Posts readings of `device` to `from` until one shows up on `live` (every replica's
/// subscription, and with PostgreSQL the publisher's lock, are in place).
async fn wait_for_link(from: &TestApp, live: &mut LiveStream, device: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seq = 0u64;
    loop {
        seq += 1;
        let res = from
            .post_json(&json!([{"device_id": device, "seq": seq, "metrics": {"p": 1}}]))
            .await;
        assert_eq!(res.status(), 200);
        let got = tokio::time::timeout(Duration::from_millis(300), live.next()).await;
        if let Ok(Some(Ok(Message::Text(t)))) = got {
            let msg: Value = serde_json::from_str(&t).expect("JSON");
            if msg["device_id"] == device {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{device} never reached the live stream"
        );
    }
}

/// The seqs of `device` a live stream shows until it has shown both markers (98 and 99).
async fn live_seqs(live: &mut LiveStream, device: &str) -> Vec<u64> {
    let mut seqs = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(seqs.contains(&98) && seqs.contains(&99)) {
        assert!(Instant::now() < deadline, "live saw only {seqs:?}");
        let msg = next_ws_json(live, Duration::from_secs(30)).await;
        if msg["device_id"] == device {
            seqs.push(msg["seq"].as_u64().unwrap());
        }
    }
    seqs.sort_unstable();
    seqs
}

/// Readings posted to either replica reach `/v1/live` on both, each exactly once.
async fn check_fleet_live(a: &TestApp, b: &TestApp, device: &str) {
    let glob = format!("{device}*");
    let mut live_a = live_stream(a, &glob).await;
    let mut live_b = live_stream(b, &glob).await;
    wait_for_link(b, &mut live_a, &format!("{device}-probe-b")).await;
    wait_for_link(a, &mut live_b, &format!("{device}-probe-a")).await;
    for (app, seq) in [(b, 1), (a, 2), (b, 3), (a, 4), (b, 5), (a, 98), (b, 99)] {
        let res = app
            .post_json(&json!([{"device_id": device, "seq": seq, "metrics": {"v": seq}}]))
            .await;
        assert_eq!(res.status(), 200);
    }
    for (name, live) in [("A", &mut live_a), ("B", &mut live_b)] {
        // The markers come last from each replica: anything a replica echoed of its own
        // would have come before them.
        assert_eq!(
            live_seqs(live, device).await,
            [1, 2, 3, 4, 5, 98, 99],
            "each reading once on {name}'s live stream"
        );
    }
    assert!(a.metric("sluice_nats_live_received_total", &[]).await >= 4.0);
    assert!(b.metric("sluice_nats_live_received_total", &[]).await >= 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_on_one_replica_streams_what_another_committed() {
    // Core NATS only: no stream, so the publisher uses publish + flush (nats.mode = auto).
    let nats = NatsServer::start();
    let (url_a, url_b) = (nats.url(), nats.url());
    let a = spawn_app_with(|s| with_nats(s, url_a)).await;
    let b = spawn_app_with(|s| with_nats(s, url_b)).await;
    check_fleet_live(&a, &b, "fleet-1").await;
}

/// SIGTERM publishes what is left before the process exits (SPEC §9), and records how far it
/// got: the next start re-sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_publishes_the_backlog_before_exiting() {
    let data = tempfile::tempdir().unwrap();
    let mut nats = NatsServer::start();
    nats.create_stream(PREFIX).await;
    nats.stop();
    let client = reqwest::Client::new();
    let proc = SluiceProcess::start(data.path(), &process_env(&nats, 64));
    let base = proc.url();
    common::wait_ready(&client, &format!("{base}/readyz")).await;
    let mut acked = post_backlog(&client, &base, "term", 5, 20).await;
    nats.restart();
    proc.signal(Signal::SIGTERM);
    let mut proc = proc;
    let status = tokio::task::spawn_blocking(move || proc.wait_exit(Duration::from_secs(30)))
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    let js = nats.jetstream().await;
    assert_eq!(
        stream_len(&js).await as usize,
        acked.total(),
        "published before exit"
    );
    let proc = SluiceProcess::start(data.path(), &process_env(&nats, 64));
    common::wait_ready(&client, &format!("{}/readyz", proc.url())).await;
    // One more reading: once it is published, the restart has done all it will.
    let one = [json!({"device_id": "term-0", "seq": 1_000_000, "metrics": {"v": 0}})];
    assert_eq!(post_to(&client, &proc.url(), &one).await["accepted"], 1);
    acked.seqs.get_mut("term-0").unwrap().insert(1_000_000);
    wait_published(&js, acked.total(), Duration::from_secs(30)).await;
    // The counter follows the PubAck a moment after the stream has the message.
    wait_until(Duration::from_secs(10), "the PubAck counted", || async {
        common::scrape_metric(&client, &proc.url(), "sluice_nats_published_total", &[]).await >= 1.0
    })
    .await;
    assert_eq!(
        common::scrape_metric(&client, &proc.url(), "sluice_nats_published_total", &[]).await,
        1.0,
        "the restart re-sent readings published before the SIGTERM"
    );
    check_stream(&read_stream(&js).await, &acked);
}

/// SIGTERM while NATS is away does not spend the whole shutdown budget: after a short wait
/// the rest stays in the outbox, and the next start publishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_nats_away_leaves_the_rest_for_the_next_start() {
    let data = tempfile::tempdir().unwrap();
    let mut nats = NatsServer::start();
    nats.create_stream(PREFIX).await;
    nats.stop();
    let client = reqwest::Client::new();
    let proc = SluiceProcess::start(data.path(), &process_env(&nats, 64));
    common::wait_ready(&client, &format!("{}/readyz", proc.url())).await;
    let batch: Vec<Value> = (1..=100u64)
        .map(|seq| json!({"device_id": "away-1", "seq": seq, "metrics": {"v": seq}}))
        .collect();
    assert_eq!(post_to(&client, &proc.url(), &batch).await["accepted"], 100);
    let stopped = Instant::now();
    proc.signal(Signal::SIGTERM);
    let mut proc = proc;
    let status = tokio::task::spawn_blocking(move || proc.wait_exit(Duration::from_secs(30)))
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        stopped.elapsed() < Duration::from_secs(15),
        "shutdown took {:?} with NATS away (budget 25 s)",
        stopped.elapsed()
    );
    nats.restart();
    let proc = SluiceProcess::start(data.path(), &process_env(&nats, 64));
    common::wait_ready(&client, &format!("{}/readyz", proc.url())).await;
    let js = nats.jetstream().await;
    wait_published(&js, 100, Duration::from_secs(30)).await;
    let mut acked = Acked::default();
    acked.seqs.insert("away-1".into(), (1..=100).collect());
    check_stream(&read_stream(&js).await, &acked);
}

#[path = "common/pg.rs"]
mod pg;

/// A replica on PostgreSQL with NATS on, a small publication window.
fn pg_replica(db_url: String, nats_url: String) -> impl FnOnce(&mut Settings) {
    move |s: &mut Settings| {
        s.storage.backend = sluice::config::Backend::Postgres;
        s.storage.postgres.url = DbUrl::new(db_url);
        s.nats.enabled = true;
        s.nats.url = DbUrl::new(nats_url);
        s.nats.max_in_flight = 8;
    }
}

/// With PostgreSQL one replica publishes every replica's readings; each replica's live
/// stream still shows every reading once (the outbox records who committed each one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replicas_each_stream_every_reading_live_once() {
    let db = pg::TestDb::new();
    let nats = NatsServer::start();
    let a = spawn_app_with(pg_replica(db.url(), nats.url())).await;
    let b = spawn_app_with(pg_replica(db.url(), nats.url())).await;
    check_fleet_live(&a, &b, "pglive").await;
}

/// A replica that cannot reach NATS does not keep the publisher's lock: the one that can
/// publishes everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_replica_without_nats_lets_another_publish() {
    let db = pg::TestDb::new();
    let nats = NatsServer::start();
    nats.create_stream(PREFIX).await;
    let dead = format!("nats://127.0.0.1:{}", nats_server::free_port());
    let cut_off = spawn_app_with(pg_replica(db.url(), dead)).await;
    let good = spawn_app_with(pg_replica(db.url(), nats.url())).await;
    let mut acked = Acked::default();
    let mut next = 0;
    post_batches(&cut_off, &mut acked, 5, &mut next).await;
    post_batches(&good, &mut acked, 5, &mut next).await;
    let js = nats.jetstream().await;
    wait_published(&js, acked.total(), Duration::from_secs(30)).await;
    check_stream(&read_stream(&js).await, &acked);
    assert_eq!(
        cut_off.metric("sluice_nats_published_total", &[]).await,
        0.0
    );
}

/// Replicas on PostgreSQL: each commit copies its new readings to the `outbox` table, and the
/// one replica holding the publisher lock publishes them. When it stops, another takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replicas_publish_every_reading_once_and_take_over() {
    let db = pg::TestDb::new();
    let nats = NatsServer::start();
    nats.create_stream(PREFIX).await;
    let a = spawn_app_with(pg_replica(db.url(), nats.url())).await;
    let b = spawn_app_with(pg_replica(db.url(), nats.url())).await;
    let mut acked = Acked::default();
    let mut next = 0;
    post_batches(&a, &mut acked, 8, &mut next).await;
    post_batches(&b, &mut acked, 8, &mut next).await;
    post_batches(&a, &mut acked, 4, &mut next).await;
    let js = nats.jetstream().await;
    wait_published(&js, acked.total(), Duration::from_secs(30)).await;
    // The counter follows the PubAck a moment after the stream has the message.
    wait_until(Duration::from_secs(10), "every PubAck counted", || async {
        a.metric("sluice_nats_published_total", &[]).await
            + b.metric("sluice_nats_published_total", &[]).await
            >= acked.total() as f64
    })
    .await;
    // Exactly one replica published, each reading once (a window of 8 in flight: rows in
    // flight are not read and sent again).
    let published = [
        a.metric("sluice_nats_published_total", &[]).await,
        b.metric("sluice_nats_published_total", &[]).await,
    ];
    assert!(
        published.iter().filter(|p| **p > 0.0).count() == 1,
        "{published:?}"
    );
    assert_eq!(
        published[0] + published[1],
        acked.total() as f64,
        "re-sent readings"
    );
    // Stop the publisher; the other replica takes over what it commits next.
    let (leader, other) = if published[0] > 0.0 { (a, b) } else { (b, a) };
    leader.shutdown().await.expect("clean shutdown");
    post_batches(&other, &mut acked, 6, &mut next).await;
    wait_published(&js, acked.total(), Duration::from_secs(30)).await;
    wait_until(Duration::from_secs(10), "outbox lag 0", || async {
        other.metric("sluice_nats_outbox_lag", &[]).await == 0.0
    })
    .await;
    let msgs = read_stream(&js).await;
    assert_eq!(msgs.len(), acked.total());
    check_stream(&msgs, &acked);
    let left = db.sql("SELECT count(*) FROM outbox");
    assert_eq!(left.trim(), "0", "published rows are deleted");
}
