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

fn process_env(nats: &NatsServer, in_flight: usize) -> Vec<(&'static str, String)> {
    vec![
        ("SLUICE__NATS__ENABLED", "true".into()),
        ("SLUICE__NATS__URL", nats.url()),
        ("SLUICE__NATS__MAX_IN_FLIGHT", in_flight.to_string()),
        ("SLUICE__STORAGE__JOURNAL_SEAL_READINGS", "500".into()),
        ("SLUICE__STORAGE__COMPACTION_INTERVAL", "200ms".into()),
    ]
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
    // A backlog built while NATS is down, then published slowly (8 in flight).
    let proc = SluiceProcess::start(data.path(), &process_env(&nats, 8));
    let base = proc.url();
    common::wait_ready(&client, &format!("{base}/readyz")).await;
    let mut acked = Acked::default();
    for b in 0..100u64 {
        let batch: Vec<Value> = (0..100u64)
            .map(|i| {
                let seq = b * 100 + i + 1;
                json!({"device_id": format!("k9-{}", i % 10), "seq": seq, "metrics": {"v": seq}})
            })
            .collect();
        let body = post_to(&client, &base, &batch).await;
        assert_eq!(body["accepted"], 100, "{body}");
        for r in &batch {
            acked
                .seqs
                .entry(r["device_id"].as_str().unwrap().into())
                .or_default()
                .insert(r["seq"].as_u64().unwrap());
        }
    }
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
    let text = client
        .get(format!("{}/metrics", proc.url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let republished = common::metric_value(&text, "sluice_nats_published_total", &[]);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_on_one_replica_streams_what_another_committed() {
    // Core NATS only: no stream, so the publisher uses publish + flush (nats.mode = auto).
    let nats = NatsServer::start();
    let (url_a, url_b) = (nats.url(), nats.url());
    let a = spawn_app_with(|s| with_nats(s, url_a)).await;
    let b = spawn_app_with(|s| with_nats(s, url_b)).await;
    let (mut live, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/v1/live?device=fleet-*", a.addr))
            .await
            .expect("live stream");
    // Wait until both replicas' subscriptions are in place: a reading from B shows up on A.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut probe = 0u64;
    loop {
        probe += 1;
        let res = b
            .post_json(&json!([{"device_id": "fleet-probe", "seq": probe, "metrics": {"p": 1}}]))
            .await;
        assert_eq!(res.status(), 200);
        let got = tokio::time::timeout(Duration::from_millis(300), live.next()).await;
        if let Ok(Some(Ok(Message::Text(t)))) = got {
            let msg: Value = serde_json::from_str(&t).expect("JSON");
            if msg["device_id"] == "fleet-probe" {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "B's readings never reached A's live"
        );
    }
    // Drain late probe copies, then send the real readings: three to B, two to A.
    for (app, seq) in [(&b, 1), (&a, 2), (&b, 3), (&a, 4), (&b, 5)] {
        let res = app
            .post_json(&json!([{"device_id": "fleet-1", "seq": seq, "metrics": {"v": seq}}]))
            .await;
        assert_eq!(res.status(), 200);
    }
    let mut seqs = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while seqs.len() < 5 || !seqs.contains(&99) {
        assert!(Instant::now() < deadline, "live saw only {seqs:?}");
        let msg = next_ws_json(&mut live, Duration::from_secs(20)).await;
        if msg["device_id"] == "fleet-1" {
            seqs.push(msg["seq"].as_u64().unwrap());
            if seqs.len() == 5 {
                // A marker through B: anything A echoed of its own would come before it.
                let res = b
                    .post_json(&json!([{"device_id": "fleet-1", "seq": 99, "metrics": {"v": 0}}]))
                    .await;
                assert_eq!(res.status(), 200);
            }
        }
    }
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        [1, 2, 3, 4, 5, 99],
        "each reading once on A's live stream"
    );
    assert!(a.metric("sluice_nats_live_received_total", &[]).await >= 4.0);
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
    let mut acked = Acked::default();
    for b in 0..20u64 {
        let batch: Vec<Value> = (0..100u64)
            .map(|i| {
                let seq = b * 100 + i + 1;
                json!({"device_id": format!("term-{}", i % 5), "seq": seq, "metrics": {"v": seq}})
            })
            .collect();
        assert_eq!(post_to(&client, &base, &batch).await["accepted"], 100);
        for r in &batch {
            acked
                .seqs
                .entry(r["device_id"].as_str().unwrap().into())
                .or_default()
                .insert(r["seq"].as_u64().unwrap());
        }
    }
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
    let text = client
        .get(format!("{}/metrics", proc.url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        common::metric_value(&text, "sluice_nats_published_total", &[]),
        1.0,
        "the restart re-sent readings published before the SIGTERM"
    );
    check_stream(&read_stream(&js).await, &acked);
}

#[path = "common/pg.rs"]
mod pg;

/// Replicas on PostgreSQL: each commit copies its new readings to the `outbox` table, and the
/// one replica holding the publisher lock publishes them. When it stops, another takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replicas_publish_every_reading_once_and_take_over() {
    let db = pg::TestDb::new();
    let nats = NatsServer::start();
    nats.create_stream(PREFIX).await;
    let replica = |db_url: String, nats_url: String| {
        move |s: &mut Settings| {
            s.storage.backend = sluice::config::Backend::Postgres;
            s.storage.postgres.url = DbUrl::new(db_url);
            s.nats.enabled = true;
            s.nats.url = DbUrl::new(nats_url);
        }
    };
    let a = spawn_app_with(replica(db.url(), nats.url())).await;
    let b = spawn_app_with(replica(db.url(), nats.url())).await;
    let mut acked = Acked::default();
    let mut next = 0;
    post_batches(&a, &mut acked, 8, &mut next).await;
    post_batches(&b, &mut acked, 8, &mut next).await;
    post_batches(&a, &mut acked, 4, &mut next).await;
    let js = nats.jetstream().await;
    wait_published(&js, acked.total(), Duration::from_secs(30)).await;
    // Exactly one replica published.
    let published = [
        a.metric("sluice_nats_published_total", &[]).await,
        b.metric("sluice_nats_published_total", &[]).await,
    ];
    assert!(
        published.iter().filter(|p| **p > 0.0).count() == 1,
        "{published:?}"
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
