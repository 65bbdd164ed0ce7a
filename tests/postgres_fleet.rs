//! Replicas on PostgreSQL (SPEC §13, issue "More than one machine"): real `sluice` processes
//! commit to one shared database, and the fleet as a whole keeps the acknowledgement contract
//! of SPEC §2. A replica killed with SIGKILL mid-load (HTTP and MQTT), or the database itself
//! restarted under load, loses no acknowledged reading and stores none twice; `(device_id,
//! seq)` duplicates are found across replicas and counted exactly; queries and device state
//! answer the same through every replica.
//!
//! Each test starts its own binaries on 127.0.0.1:0 against a fresh database (`pg::TestDb`,
//! or a private cluster for the restart test) and compares, as sets of `(device_id, seq)`,
//! what was acknowledged with what the database holds. Every reading sent over HTTP carries
//! the id of its request (`metrics.req`), so each stored row names the request whose commit
//! stored it, and each 200's `accepted` is checked against exactly those rows.
//!
//! Schema migration (empty database, older schema, concurrent starts) is covered by
//! `tests/store_conformance.rs`, not here.

mod common;
#[path = "common/mqtt_broker.rs"]
mod mqtt_broker;
#[path = "common/pg.rs"]
mod pg;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use common::{metric_value, stored_seq_list, wait_until, SluiceProcess};
use mqtt_broker::{client_id, free_port, Mosquitto, TestClient};
use nix::sys::signal::Signal;
use pg::{psql, TestDb};
use serde_json::{json, Value};
use sluice::reading::{format_ts, now_ms};
use tokio::task::JoinHandle;

/// `(device_id, seq)`: what identifies a reading.
type Key = (String, u64);

// ---------------------------------------------------------------------------------------------
// Replicas
// ---------------------------------------------------------------------------------------------

/// One real `sluice` on PostgreSQL, with a data directory of its own (unused by this backend,
/// as a pod's emptyDir would be). Prints the tail of its log if the test fails.
struct Replica {
    name: String,
    proc: SluiceProcess,
    _dir: tempfile::TempDir,
}

impl Replica {
    /// Starts the binary on `db_url` with `extra` settings; returns once it printed its
    /// address (not yet ready: see [`Replica::wait_ready`]).
    fn start(name: &str, db_url: &str, extra: &[(&str, String)]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut env = vec![
            ("SLUICE__STORAGE__BACKEND", "postgres".to_string()),
            ("SLUICE__STORAGE__POSTGRES__URL", db_url.to_string()),
        ];
        env.extend(extra.iter().map(|(k, v)| (*k, v.clone())));
        let proc = tokio::task::block_in_place(|| SluiceProcess::start(dir.path(), &env));
        Self {
            name: name.into(),
            proc,
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        self.proc.url()
    }

    async fn wait_ready(&self, client: &reqwest::Client) {
        common::wait_ready(client, &format!("{}/readyz", self.url())).await
    }

    /// The status of `GET /readyz`, or 0 when it does not answer.
    async fn readyz(&self, client: &reqwest::Client) -> u16 {
        match client.get(format!("{}/readyz", self.url())).send().await {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        }
    }

    /// One sample of `/metrics` (summed over series matching `labels`); -1 when unreachable.
    async fn metric(&self, client: &reqwest::Client, name: &str, labels: &[(&str, &str)]) -> f64 {
        match client.get(format!("{}/metrics", self.url())).send().await {
            Ok(r) => metric_value(&r.text().await.unwrap_or_default(), name, labels),
            Err(_) => -1.0,
        }
    }

    /// SIGKILL, and waits for the process to be gone.
    fn kill9(&mut self) {
        self.proc.signal(Signal::SIGKILL);
        let status = tokio::task::block_in_place(|| self.proc.wait_exit(Duration::from_secs(10)));
        assert!(
            !status.success(),
            "{} survived SIGKILL: {status}",
            self.name
        );
    }

    /// SIGTERM, and checks the graceful exit (SPEC §9).
    fn stop(&mut self) {
        self.proc.signal(Signal::SIGTERM);
        let status = tokio::task::block_in_place(|| self.proc.wait_exit(Duration::from_secs(30)));
        assert!(
            status.success(),
            "{} exited with {status} on SIGTERM",
            self.name
        );
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.proc.log.lock().map(|l| l.clone()).unwrap_or_default();
            let tail = &log[log.len().saturating_sub(40)..];
            eprintln!(
                "--- log tail of replica {} ---\n{}",
                self.name,
                tail.join("\n")
            );
        }
    }
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .expect("HTTP client")
}

// ---------------------------------------------------------------------------------------------
// HTTP load with a ledger of every request and its answer
// ---------------------------------------------------------------------------------------------

/// What one request got back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// 200: every reading in it is committed (SPEC §2).
    Acked { accepted: u64, duplicates: u64 },
    /// 503 with `Retry-After`: nothing acknowledged.
    Refused,
    /// The connection was refused: the request never reached a replica.
    Unreached,
    /// No answer (the replica died, or the answer broke off): outcome unknown.
    Lost,
}

fn is_acked(a: &Answer) -> bool {
    matches!(a, Answer::Acked { .. })
}

/// One request: its id (in each reading's `metrics.req`), the replica, and what it carried.
struct Sent {
    req: u64,
    replica: String,
    keys: Vec<Key>,
    answer: Answer,
}

/// Many concurrent clients posting to two replicas (slots 0 and 1), each request recorded.
struct Load {
    client: reqwest::Client,
    /// `(name, base URL)` per slot; a replacement process takes over its slot.
    targets: RwLock<Vec<(String, String)>>,
    sent: Mutex<Vec<Sent>>,
    next_req: AtomicU64,
    acked_readings: AtomicU64,
    stop: AtomicBool,
    /// Device ids start with this.
    prefix: String,
}

impl Load {
    fn new(client: reqwest::Client, prefix: &str, replicas: [&Replica; 2]) -> Arc<Self> {
        Arc::new(Self {
            client,
            targets: RwLock::new(replicas.iter().map(|r| (r.name.clone(), r.url())).collect()),
            sent: Mutex::new(Vec::new()),
            next_req: AtomicU64::new(1),
            acked_readings: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            prefix: prefix.into(),
        })
    }

    /// Points `slot` at `replica` from the next request on.
    fn replace(&self, slot: usize, replica: &Replica) {
        self.targets.write().unwrap()[slot] = (replica.name.clone(), replica.url());
    }

    /// Readings in requests answered 200 (new and duplicates alike, repeats counted).
    fn acked(&self) -> u64 {
        self.acked_readings.load(Ordering::Relaxed)
    }

    /// How many requests to `replica` got `answer` (compared by kind).
    fn count(&self, replica: &str, answer: fn(&Answer) -> bool) -> usize {
        let sent = self.sent.lock().unwrap();
        sent.iter()
            .filter(|s| (replica.is_empty() || s.replica == replica) && answer(&s.answer))
            .count()
    }

    /// Posts `keys` once to the replica in `slot`.
    async fn send(&self, slot: usize, keys: &[Key]) -> (String, Answer) {
        let (name, base) = self.targets.read().unwrap()[slot].clone();
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let body: Vec<Value> = keys
            .iter()
            .map(|(d, s)| json!({"device_id": d, "seq": s, "metrics": {"req": req, "v": *s as f64 / 4.0}}))
            .collect();
        let res = self
            .client
            .post(format!("{base}/v1/readings"))
            .json(&body)
            .send()
            .await;
        let answer = match res {
            Err(e) if e.is_connect() => Answer::Unreached,
            Err(_) => Answer::Lost,
            Ok(res) => match res.status().as_u16() {
                200 => match res.json::<Value>().await {
                    Ok(b) => {
                        assert_eq!(b["rejected"], json!([]), "{name}: readings rejected: {b}");
                        let accepted = b["accepted"].as_u64().expect("accepted");
                        let duplicates = b["duplicates"].as_u64().expect("duplicates");
                        assert_eq!(
                            accepted + duplicates,
                            keys.len() as u64,
                            "{name}: request {req} of {} readings answered {b}",
                            keys.len()
                        );
                        self.acked_readings
                            .fetch_add(keys.len() as u64, Ordering::Relaxed);
                        Answer::Acked {
                            accepted,
                            duplicates,
                        }
                    }
                    // The answer broke off: no acknowledgement seen.
                    Err(_) => Answer::Lost,
                },
                503 => {
                    assert!(
                        res.headers().contains_key("retry-after"),
                        "{name}: 503 without Retry-After"
                    );
                    Answer::Refused
                }
                other => panic!(
                    "{name}: unexpected status {other}: {}",
                    res.text().await.unwrap_or_default()
                ),
            },
        };
        self.sent.lock().unwrap().push(Sent {
            req,
            replica: name.clone(),
            keys: keys.to_vec(),
            answer,
        });
        (name, answer)
    }

    /// Sends `keys` until a replica answers 200, switching replicas after each failure, as a
    /// client behind a load balancer retries. Returns `(replica, accepted, duplicates)`.
    async fn deliver(&self, mut slot: usize, keys: &[Key]) -> (String, u64, u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (name, answer) = self.send(slot, keys).await;
            if let Answer::Acked {
                accepted,
                duplicates,
            } = answer
            {
                return (name, accepted, duplicates);
            }
            assert!(
                Instant::now() < deadline,
                "readings from {:?} on were not acknowledged by any replica within 30 s",
                keys[0]
            );
            slot = 1 - slot;
            // Pacing between retries (the loop itself waits for a 200).
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// One client: two devices of its own, 10 seqs each per batch, in rounds of three kinds:
/// a plain batch to one replica; two batches overlapping by half sent to both replicas at
/// once (the same readings racing through two replicas); and a batch sent again to the other
/// replica after its 200 (a retry across replicas, which must be all duplicates).
async fn client_task(load: Arc<Load>, id: usize) {
    let devices = [
        format!("{}{id}-a", load.prefix),
        format!("{}{id}-b", load.prefix),
    ];
    let keys = |from: u64, n: u64| -> Vec<Key> {
        (from..from + n)
            .flat_map(|s| devices.iter().map(move |d| (d.clone(), s)))
            .collect()
    };
    let mut next = 0u64;
    let mut round = 0usize;
    while !load.stop.load(Ordering::Relaxed) {
        let slot = (id + round) % 2;
        match round % 3 {
            0 => {
                load.deliver(slot, &keys(next, 10)).await;
                next += 10;
            }
            1 => {
                let (first, second) = (keys(next, 10), keys(next + 5, 10));
                tokio::join!(load.deliver(slot, &first), load.deliver(1 - slot, &second));
                next += 15;
            }
            _ => {
                let batch = keys(next, 10);
                load.deliver(slot, &batch).await;
                let (name, accepted, duplicates) = load.deliver(1 - slot, &batch).await;
                assert!(
                    accepted == 0 && duplicates == batch.len() as u64,
                    "{name}: readings acked before were sent again and answered accepted={accepted} \
                     duplicates={duplicates}, want 0 and {}",
                    batch.len()
                );
                next += 10;
            }
        }
        round += 1;
    }
}

/// Waits for `cond` while the clients run; a client that panicked fails the test with its
/// own message.
async fn wait_while_loading<F, Fut>(
    within: Duration,
    what: &str,
    tasks: &mut [JoinHandle<()>],
    mut cond: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        for t in tasks.iter_mut() {
            if t.is_finished() {
                if let Err(e) = t.await {
                    std::panic::resume_unwind(e.into_panic());
                }
                panic!("a client stopped early while waiting for {what}");
            }
        }
        if cond().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Stops the clients (each finishes its current batch) and re-raises a client's panic.
async fn stop_load(load: &Load, tasks: Vec<JoinHandle<()>>) {
    load.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        if let Err(e) = t.await {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}

/// Every stored reading as `(device_id, seq, metrics.req)` in the database at `url`, read
/// through Sluice's own PostgreSQL reader (readings are chunk blobs that only Sluice decodes),
/// page by page, on a thread of its own (the reader blocks on its own runtime).
fn stored_rows(url: &str) -> Vec<(String, u64, u64)> {
    use sluice::store::{Order, ReadingsQuery};
    let url = url.to_string();
    std::thread::spawn(move || {
        let mut settings = sluice::config::StorageSettings {
            backend: sluice::config::Backend::Postgres,
            ..Default::default()
        };
        settings.postgres.url = sluice::config::DbUrl::new(url);
        let metrics = Arc::new(sluice::telemetry::metrics::Metrics::new());
        let opened = sluice::store::open(&settings, &metrics).expect("store opens");
        let reader = opened.store.reader();
        let mut rows = Vec::new();
        for device in &opened.devices {
            let mut q = ReadingsQuery {
                device_id: device.device_id.clone(),
                from_ms: i64::MIN,
                to_ms: i64::MAX,
                metric: None,
                limit: 10_000,
                order: Order::Asc,
                after: None,
            };
            loop {
                let page = reader.readings(&q).expect("query").expect("known device");
                for r in &page {
                    let req = r
                        .metrics
                        .iter()
                        .find(|(n, _)| n == "req")
                        .and_then(|(_, v)| match v {
                            sluice::reading::MetricValue::Int(i) => u64::try_from(*i).ok(),
                            sluice::reading::MetricValue::UInt(u) => Some(*u),
                            _ => None,
                        })
                        .expect("metrics.req");
                    rows.push((device.device_id.clone(), r.seq.expect("seq"), req));
                }
                match page.last() {
                    Some(last) if page.len() == q.limit => q.after = Some((last.ts_ms, last.rid)),
                    _ => break,
                }
            }
        }
        rows
    })
    .join()
    .expect("reader thread")
}

/// What the final comparison found.
#[derive(Debug)]
struct Tally {
    stored: usize,
    acked_requests: usize,
    accepted: u64,
    stored_by_refused: usize,
    stored_by_lost: usize,
}

/// The exact bookkeeping, from the ledger and the rows the database holds:
/// - no `(device_id, seq)` is stored twice, every acked reading is stored, nothing unsent is
///   stored, and (every batch having been delivered in the end) nothing unacked is stored;
/// - each row was stored by a request that carried it;
/// - each 200's `accepted` equals the number of rows its own commit stored, so the sum of
///   `accepted` counts every reading stored by an acknowledged request exactly once;
/// - rows stored by requests without a 200 are only those of lost answers, plus, when
///   `refused_may_commit` (the database went away during a `COMMIT`), of 503s.
fn verify(load: &Load, rows: &[(String, u64, u64)], refused_may_commit: bool) -> Tally {
    let sent = load.sent.lock().unwrap();
    let by_req: HashMap<u64, &Sent> = sent.iter().map(|s| (s.req, s)).collect();
    let mut stored: HashMap<Key, u64> = HashMap::new();
    for (d, s, req) in rows {
        if let Some(first) = stored.insert((d.clone(), *s), *req) {
            panic!("({d}, {s}) is stored twice: by requests {first} and {req}");
        }
    }
    let sent_keys: HashSet<&Key> = sent.iter().flat_map(|s| &s.keys).collect();
    let acked: HashSet<&Key> = sent
        .iter()
        .filter(|s| matches!(s.answer, Answer::Acked { .. }))
        .flat_map(|s| &s.keys)
        .collect();
    let missing: Vec<_> = acked.iter().filter(|k| !stored.contains_key(**k)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acked readings are not stored, e.g. {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)]
    );
    let unknown: Vec<_> = stored.keys().filter(|k| !sent_keys.contains(k)).collect();
    assert!(unknown.is_empty(), "stored but never sent: {unknown:?}");
    let unacked: Vec<_> = stored.keys().filter(|k| !acked.contains(k)).collect();
    assert!(
        unacked.is_empty(),
        "{} stored readings never got a 200 although every batch was retried until one: {:?}",
        unacked.len(),
        &unacked[..unacked.len().min(5)]
    );

    let mut stored_by: HashMap<u64, u64> = HashMap::new();
    for (key, req) in &stored {
        let s = by_req
            .get(req)
            .unwrap_or_else(|| panic!("{key:?} stored with unknown request id {req}"));
        assert!(
            s.keys.contains(key),
            "{key:?} stored by request {req}, which did not carry it"
        );
        *stored_by.entry(*req).or_default() += 1;
    }
    let mut tally = Tally {
        stored: stored.len(),
        acked_requests: 0,
        accepted: 0,
        stored_by_refused: 0,
        stored_by_lost: 0,
    };
    for s in sent.iter() {
        let by_this = stored_by.get(&s.req).copied().unwrap_or(0);
        match s.answer {
            Answer::Acked { accepted, .. } => {
                assert_eq!(
                    accepted,
                    by_this,
                    "{}: request {} answered accepted={accepted}, but its commit stored {by_this} \
                     of its {} readings",
                    s.replica,
                    s.req,
                    s.keys.len()
                );
                tally.acked_requests += 1;
                tally.accepted += accepted;
            }
            Answer::Refused => {
                assert!(
                    refused_may_commit || by_this == 0,
                    "{}: request {} got 503, but {by_this} of its readings were stored by it \
                     although the database never failed",
                    s.replica,
                    s.req
                );
                tally.stored_by_refused += by_this as usize;
            }
            Answer::Unreached => assert_eq!(
                by_this, 0,
                "{}: request {} never connected, yet stored {by_this} readings",
                s.replica, s.req
            ),
            Answer::Lost => tally.stored_by_lost += by_this as usize,
        }
    }
    assert_eq!(
        tally.accepted as usize + tally.stored_by_refused + tally.stored_by_lost,
        tally.stored,
        "sum of accepted over all 200s plus rows stored by unanswered requests must be every \
         stored reading: {tally:?}"
    );
    tally
}

/// Every device's stored seqs, from the rows.
fn by_device(rows: &[(String, u64, u64)]) -> BTreeMap<String, BTreeSet<u64>> {
    let mut out: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    for (d, s, _) in rows {
        out.entry(d.clone()).or_default().insert(*s);
    }
    out
}

/// The query API of `replica` lists each device's stored readings, each once.
async fn assert_api_lists(
    client: &reqwest::Client,
    replica: &Replica,
    stored: &BTreeMap<String, BTreeSet<u64>>,
) {
    for (device, seqs) in stored {
        let list = stored_seq_list(client, &replica.url(), device).await;
        assert_eq!(
            list.len(),
            seqs.len(),
            "{}: {device} lists {} rows for {} stored readings",
            replica.name,
            list.len(),
            seqs.len()
        );
        let set: BTreeSet<u64> = list.into_iter().collect();
        assert_eq!(&set, seqs, "{}: {device} lists other seqs", replica.name);
    }
}

// ---------------------------------------------------------------------------------------------
// 1. HTTP: kill -9 a replica under load
// ---------------------------------------------------------------------------------------------

/// Two replicas on one database under HTTP load from six concurrent clients, whose readings
/// also race through both replicas at once and are resent across replicas. One replica is
/// killed with SIGKILL while it holds uncommitted readings, the load goes on through the
/// other, and a new process takes its place on the same database. Every acked reading is then
/// stored exactly once, nothing else is stored, every resend was answered as duplicates, and
/// each 200's `accepted` equals the rows its own commit stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_replicas_survive_kill_9_and_store_every_ack_once() {
    let db = TestDb::new();
    let url = db.url();
    let client = http_client();
    // The first A commits slowly, so that the kill finds readings taken and not yet answered.
    let mut a1 = Replica::start(
        "a1",
        &url,
        &[("SLUICE__STORAGE__COMMIT_DELAY", "20ms".into())],
    );
    let b = Replica::start("b", &url, &[]);
    a1.wait_ready(&client).await;
    b.wait_ready(&client).await;

    let load = Load::new(client.clone(), "h", [&a1, &b]);
    let mut tasks: Vec<_> = (0..6)
        .map(|i| tokio::spawn(client_task(load.clone(), i)))
        .collect();
    let acked_by = |name: &str| load.count(name, is_acked);
    wait_while_loading(
        Duration::from_secs(30),
        "3 000 readings acked through both replicas",
        &mut tasks,
        || async { load.acked() >= 3_000 && acked_by("a1") > 0 && acked_by("b") > 0 },
    )
    .await;
    wait_while_loading(
        Duration::from_secs(20),
        "a1 holding readings not yet answered",
        &mut tasks,
        || async {
            a1.metric(
                &client,
                "sluice_pipeline_queue_depth",
                &[("stage", "admission")],
            )
            .await
                > 0.0
        },
    )
    .await;
    a1.kill9();

    let at_kill = load.acked();
    let b_at_kill = acked_by("b");
    wait_while_loading(
        Duration::from_secs(30),
        "2 000 more readings acked through b while a1 is dead",
        &mut tasks,
        || async { load.acked() >= at_kill + 2_000 && acked_by("b") > b_at_kill },
    )
    .await;

    // A replacement process on the same database, as a new pod would be.
    let a2 = Replica::start("a2", &url, &[]);
    a2.wait_ready(&client).await;
    load.replace(0, &a2);
    let at_restart = load.acked();
    wait_while_loading(
        Duration::from_secs(30),
        "a2 acking, and 2 000 more readings acked",
        &mut tasks,
        || async { acked_by("a2") >= 20 && load.acked() >= at_restart + 2_000 },
    )
    .await;
    stop_load(&load, tasks).await;

    let in_flight_at_kill = load.count("a1", |a| *a == Answer::Lost);
    assert!(
        in_flight_at_kill >= 1,
        "the kill found no request in flight at a1"
    );
    let rows = tokio::task::block_in_place(|| stored_rows(&db.url()));
    let tally = verify(&load, &rows, false);
    assert_eq!(
        db.sql("SELECT count(*) = count(DISTINCT (device_id, seq)) FROM readings"),
        "t",
        "a (device_id, seq) is stored twice"
    );
    let per_device = by_device(&rows);
    assert_eq!(per_device.len(), 12, "six clients of two devices each");
    for r in [&b, &a2] {
        assert_api_lists(&client, r, &per_device).await;
    }
    eprintln!(
        "kill -9 under HTTP load: {tally:?}; answers a1={} b={} a2={}; lost at a1={in_flight_at_kill}; \
         503s={}",
        acked_by("a1"),
        acked_by("b"),
        acked_by("a2"),
        load.count("", |a| *a == Answer::Refused)
    );
}

// ---------------------------------------------------------------------------------------------
// 2. MQTT: kill -9 a replica of a shared subscription mid-flood
// ---------------------------------------------------------------------------------------------

/// The settings of a replica on MQTT, in shared group `fleet`.
fn mqtt_env(
    broker: &Mosquitto,
    id: &str,
    extra: &[(&'static str, String)],
) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("SLUICE__MQTT__ENABLED", "true".to_string()),
        ("SLUICE__MQTT__URL", broker.url()),
        ("SLUICE__MQTT__CLIENT_ID", id.to_string()),
        ("SLUICE__MQTT__SHARED_GROUP", "fleet".to_string()),
    ];
    env.extend_from_slice(extra);
    env
}

/// Two replicas split a QoS 1 flood through a shared subscription on a private mosquitto
/// (`max_queued_messages 0`: the broker drops nothing it acked). One is killed with SIGKILL
/// while it holds messages it has not PUBACKed; the other keeps storing. mosquitto 2.0.11
/// does not hand a member's in-flight or queued messages to the rest of the group (it keeps
/// routing a share of the flood to the dead member's persistent session), so the killed one
/// comes back under its client id (a StatefulSet pod, see deploy/k8s) and the broker
/// delivers what its session held. Every message the broker acked to the publisher is then
/// stored exactly once, and redelivered ones already committed count as duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_shared_group_survives_kill_9_and_stores_every_message_once() {
    let broker = Mosquitto::start(false, "");
    let db = TestDb::new();
    let url = db.url();
    let client = http_client();
    let id_a = client_id("sluice-a");
    // A commits slowly, so that the kill finds messages taken and not yet PUBACKed.
    let mut a1 = Replica::start(
        "a1",
        &url,
        &mqtt_env(
            &broker,
            &id_a,
            &[("SLUICE__STORAGE__COMMIT_DELAY", "10ms".into())],
        ),
    );
    let b = Replica::start("b", &url, &mqtt_env(&broker, &client_id("sluice-b"), &[]));
    let subscribed = |r: &Replica| {
        let (client, r) = (client.clone(), r.url());
        async move {
            let Ok(res) = client.get(format!("{r}/metrics")).send().await else {
                return false;
            };
            metric_value(
                &res.text().await.unwrap_or_default(),
                "sluice_mqtt_connected",
                &[],
            ) == 1.0
        }
    };
    wait_until(
        Duration::from_secs(15),
        "both replicas subscribed",
        || async { subscribed(&a1).await && subscribed(&b).await },
    )
    .await;

    let devices = ["m0", "m1", "m2", "m3"];
    let per_device = 1_000u64;
    let total = devices.len() as u64 * per_device;
    let messages: Vec<(String, Vec<u8>)> = (0..per_device)
        .flat_map(|s| {
            devices.iter().map(move |d| {
                (
                    format!("devices/{d}/readings"),
                    format!(r#"{{"seq":{s},"metrics":{{"v":{s}}}}}"#).into_bytes(),
                )
            })
        })
        .collect();
    let port = broker.port;
    let publishing = tokio::spawn(async move {
        let mut publisher = TestClient::connect(port, &client_id("pub")).await;
        // About 1 000 messages/s, so that the flood is still coming in after the kill. Each
        // chunk waits until the broker has PUBACKed all of it (it panics otherwise).
        let mut messages = messages.into_iter().peekable();
        while messages.peek().is_some() {
            publisher
                .publish_all(messages.by_ref().take(40).collect())
                .await;
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    });

    let mqtt = [("transport", "mqtt")];
    wait_until(
        Duration::from_secs(20),
        "a1 storing and holding unacked messages",
        || async {
            a1.metric(&client, "sluice_readings_accepted_total", &mqtt)
                .await
                >= 200.0
                && a1
                    .metric(&client, "sluice_mqtt_unacked_messages", &[])
                    .await
                    > 0.0
        },
    )
    .await;
    a1.kill9();
    let count = || -> u64 {
        tokio::task::block_in_place(|| db.sql("SELECT count(*) FROM readings"))
            .parse()
            .expect("count")
    };
    let stored_at_kill = count();
    assert!(
        stored_at_kill < total,
        "the flood was over before the kill ({stored_at_kill} of {total} stored)"
    );
    let b_at_kill = b
        .metric(&client, "sluice_readings_accepted_total", &mqtt)
        .await;
    publishing.await.expect("the broker acked every message");
    wait_until(
        Duration::from_secs(20),
        "b storing after the kill",
        || async {
            b.metric(&client, "sluice_readings_accepted_total", &mqtt)
                .await
                > b_at_kill
        },
    )
    .await;
    let stored_before_restart = count();

    // Back under the same client id: the broker resumes its session.
    let a2 = Replica::start("a2", &url, &mqtt_env(&broker, &id_a, &[]));
    wait_until(
        Duration::from_secs(30),
        "every published message stored",
        || async { count() >= total },
    )
    .await;

    let rows = tokio::task::block_in_place(|| stored_rows_plain(&db));
    let stored: BTreeSet<Key> = rows.iter().cloned().collect();
    assert_eq!(rows.len(), stored.len(), "a message was stored twice");
    let published: BTreeSet<Key> = devices
        .iter()
        .flat_map(|d| (0..per_device).map(move |s| (d.to_string(), s)))
        .collect();
    assert_eq!(
        stored.len(),
        published.len(),
        "stored {} readings for {} published",
        stored.len(),
        published.len()
    );
    assert_eq!(
        stored, published,
        "stored set differs from the published set"
    );
    let per_device_set: BTreeMap<String, BTreeSet<u64>> = devices
        .iter()
        .map(|d| (d.to_string(), (0..per_device).collect()))
        .collect();
    for r in [&b, &a2] {
        assert_api_lists(&client, r, &per_device_set).await;
    }
    let a2_received = a2
        .metric(&client, "sluice_readings_received_total", &mqtt)
        .await;
    let a2_duplicates = a2
        .metric(&client, "sluice_readings_duplicate_total", &mqtt)
        .await;
    assert!(
        a2_received > 0.0,
        "the broker delivered nothing to a1's resumed session (mosquitto keeps a shared \
         group's messages for an offline member's session)"
    );
    eprintln!(
        "kill -9 under MQTT flood: stored at kill {stored_at_kill}, before restart \
         {stored_before_restart}, of {total}; a2 received {a2_received} ({a2_duplicates} duplicates)"
    );
}

/// Every row of `readings` as `(device_id, seq)`, repeats kept.
fn stored_rows_plain(db: &TestDb) -> Vec<Key> {
    db.sql("SELECT device_id, seq FROM readings")
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (d, s) = l.split_once('|').expect("device|seq");
            (d.to_string(), s.parse().expect("seq"))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 3. PostgreSQL restarted under load (a private cluster)
// ---------------------------------------------------------------------------------------------

/// A private PostgreSQL cluster in a temp dir on a free port (trust auth, loopback and a
/// socket in its own dir), stopped with `-m immediate` and removed on drop. The machine's
/// shared cluster is never touched.
struct PrivateCluster {
    dir: tempfile::TempDir,
    port: u16,
}

/// Whether this process runs as root (initdb and postgres refuse to).
fn running_as_root() -> bool {
    let out = Command::new("id").arg("-u").output().expect("id runs");
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

/// The Debian server binaries.
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

impl PrivateCluster {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let cluster = PrivateCluster { dir, port: 0 };
        if running_as_root() {
            // initdb and postgres refuse to run as root.
            let status = Command::new("chown")
                .arg("postgres:postgres")
                .arg(cluster.dir.path())
                .status()
                .expect("chown runs");
            assert!(status.success(), "chown postgres {:?}", cluster.dir.path());
        }
        let out = cluster
            .command("initdb")
            .arg("-D")
            .arg(cluster.data())
            .args(["--auth=trust", "-U", "postgres", "-E", "UTF8", "--no-sync"])
            .output()
            .expect("initdb runs (Debian package postgresql-15)");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut cluster = cluster;
        let mut last = String::new();
        // The port is free when picked; another process may take it first, so retry.
        for _ in 0..5 {
            cluster.port = free_port();
            match cluster.try_start() {
                Ok(()) => return cluster,
                Err(e) => last = e,
            }
        }
        panic!("private PostgreSQL did not start: {last}");
    }

    /// A server binary, run as `postgres` when we are root.
    fn command(&self, program: &str) -> Command {
        let path = format!("{PG_BIN}/{program}");
        let mut cmd = if running_as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", &path]);
            c
        } else {
            Command::new(path)
        };
        cmd.stdin(Stdio::null());
        cmd
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `postgres://postgres@127.0.0.1:<port>`.
    fn server(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<(), String> {
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(args)
            .output()
            .map_err(|e| format!("cannot run pg_ctl: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            let log =
                std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
            Err(format!(
                "pg_ctl {args:?}: {}{}\nserver log:\n{log}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Starts the server and waits until it accepts connections.
    fn try_start(&self) -> Result<(), String> {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log");
        self.pg_ctl(&[
            "-w",
            "-t",
            "30",
            "-l",
            log.to_str().expect("utf-8 path"),
            "-o",
            &opts,
            "start",
        ])
    }

    fn start_server(&self) {
        self.try_start().expect("private PostgreSQL starts again");
    }

    /// `pg_ctl restart -m fast`: stops (rolling back open transactions and closing every
    /// connection) and starts again with the same options (kept in `postmaster.opts`).
    fn restart_server(&self) {
        let log = self.dir.path().join("server.log");
        self.pg_ctl(&[
            "-w",
            "-t",
            "30",
            "-m",
            "fast",
            "-l",
            log.to_str().expect("utf-8 path"),
            "restart",
        ])
        .expect("private PostgreSQL restarts");
    }

    /// `pg_ctl stop -m <mode>`, waiting until the server is gone.
    fn stop_server(&self, mode: &str) {
        self.pg_ctl(&["-w", "-t", "30", "-m", mode, "stop"])
            .expect("private PostgreSQL stops");
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        if self.port != 0 {
            let _ = self.pg_ctl(&["-w", "-t", "30", "-m", "immediate", "stop"]);
        }
    }
}

/// Two replicas under HTTP load while their PostgreSQL (a private cluster) is shut down
/// (`pg_ctl stop -m fast`) and started again: during the outage both turn `/readyz` 503 and
/// answer POSTs 503, and no request gets a 200; once it is back, both become ready and ack
/// again by themselves. No acked reading is lost, none is stored twice, and each 200's
/// `accepted` is exact (a 503 whose COMMIT had landed before the connection died is
/// allowed: its retry is a duplicate). Then a quick `pg_ctl restart -m fast`: every pooled
/// connection dies, and both replicas ack again without being restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_under_load_loses_no_ack_and_recovers_by_itself() {
    let cluster = tokio::task::block_in_place(PrivateCluster::start);
    let server = cluster.server();
    tokio::task::block_in_place(|| psql(&server, "postgres", "CREATE DATABASE fleet"));
    let url = format!("{server}/fleet");
    let client = http_client();
    let a = Replica::start("a", &url, &[]);
    let b = Replica::start("b", &url, &[]);
    a.wait_ready(&client).await;
    b.wait_ready(&client).await;

    let load = Load::new(client.clone(), "r", [&a, &b]);
    let mut tasks: Vec<_> = (0..4)
        .map(|i| tokio::spawn(client_task(load.clone(), i)))
        .collect();
    let refused = || load.count("", |a| *a == Answer::Refused);
    let acked_answers = |name: &str| load.count(name, is_acked);
    wait_while_loading(
        Duration::from_secs(30),
        "1 000 readings acked",
        &mut tasks,
        || async { load.acked() >= 1_000 },
    )
    .await;

    tokio::task::block_in_place(|| cluster.stop_server("fast"));
    let refused_at_stop = refused();
    wait_while_loading(
        Duration::from_secs(20),
        "both replicas not ready, and POSTs refused",
        &mut tasks,
        || async {
            a.readyz(&client).await == 503
                && b.readyz(&client).await == 503
                && refused() > refused_at_stop
        },
    )
    .await;
    // From here on, nothing can commit: no 200 until the database is back.
    let acked_in_outage = acked_answers("");
    let refused_in_outage = refused();
    wait_while_loading(
        Duration::from_secs(20),
        "100 more 503s during the outage",
        &mut tasks,
        || async { refused() >= refused_in_outage + 100 },
    )
    .await;
    assert_eq!(
        acked_answers(""),
        acked_in_outage,
        "a 200 while PostgreSQL was down"
    );
    for r in [&a, &b] {
        let res = client
            .get(format!("{}/readyz", r.url()))
            .send()
            .await
            .expect("readyz answers");
        let status = res.status().as_u16();
        let body = res.text().await.unwrap_or_default();
        assert_eq!(status, 503, "{}: /readyz during the outage: {body}", r.name);
        assert!(
            body.contains("not ready"),
            "{}: /readyz says why: {body}",
            r.name
        );
    }

    tokio::task::block_in_place(|| cluster.start_server());
    let refused_at_start = refused();
    let (a_at_start, b_at_start, at_start) = (acked_answers("a"), acked_answers("b"), load.acked());
    wait_while_loading(
        Duration::from_secs(30),
        "both replicas ready and acking again",
        &mut tasks,
        || async {
            a.readyz(&client).await == 200
                && b.readyz(&client).await == 200
                && acked_answers("a") >= a_at_start + 10
                && acked_answers("b") >= b_at_start + 10
                && load.acked() >= at_start + 500
        },
    )
    .await;

    // A quick restart, over before the replicas may notice: every pooled connection is dead
    // and must be replaced, and acks resume without anyone restarting Sluice.
    let refused_at_restart = refused();
    tokio::task::block_in_place(|| cluster.restart_server());
    let (a_at_restart, b_at_restart, at_restart) =
        (acked_answers("a"), acked_answers("b"), load.acked());
    wait_while_loading(
        Duration::from_secs(30),
        "both replicas acking after a fast restart",
        &mut tasks,
        || async {
            a.readyz(&client).await == 200
                && b.readyz(&client).await == 200
                && acked_answers("a") >= a_at_restart + 10
                && acked_answers("b") >= b_at_restart + 10
                && load.acked() >= at_restart + 500
        },
    )
    .await;
    stop_load(&load, tasks).await;

    let rows = tokio::task::block_in_place(|| stored_rows(&format!("{server}/fleet")));
    let tally = verify(&load, &rows, true);
    let per_device = by_device(&rows);
    assert_eq!(per_device.len(), 8, "four clients of two devices each");
    for r in [&a, &b] {
        assert_api_lists(&client, r, &per_device).await;
    }
    eprintln!(
        "PostgreSQL restart under load: {tally:?}; 503s: {refused_at_stop} until `pg_ctl stop` returned, {} \
         from the stop to the start, {} around the fast restart",
        refused_at_start - refused_at_stop,
        refused() - refused_at_restart
    );
    let (mut a, mut b) = (a, b);
    a.stop();
    b.stop();
}

/// SPEC §3: `/readyz` answers 200 only "when ingest is accepted". A replica with no ingest
/// traffic whose PostgreSQL goes down must turn not ready by itself, within a few probe
/// periods, and not only once a POST has failed (an orchestrator would keep routing to it).
/// (`PgStore::maintain` checks the server once a second.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_replica_turns_not_ready_when_postgres_goes_down() {
    let cluster = tokio::task::block_in_place(PrivateCluster::start);
    let server = cluster.server();
    tokio::task::block_in_place(|| psql(&server, "postgres", "CREATE DATABASE fleet"));
    let client = http_client();
    let a = Replica::start("a", &format!("{server}/fleet"), &[]);
    a.wait_ready(&client).await;
    let post = |seq: u64| {
        let (client, url) = (client.clone(), a.url());
        async move {
            client
                .post(format!("{url}/v1/readings"))
                .json(&json!([{"device_id": "idle", "seq": seq, "metrics": {"v": 1}}]))
                .send()
                .await
                .expect("POST answered")
                .status()
                .as_u16()
        }
    };
    assert_eq!(post(1).await, 200);

    tokio::task::block_in_place(|| cluster.stop_server("fast"));
    wait_until(
        Duration::from_secs(10),
        "/readyz 503 without ingest traffic while PostgreSQL is down",
        || async { a.readyz(&client).await == 503 },
    )
    .await;
    assert_eq!(post(2).await, 503, "ingest while PostgreSQL is down");

    tokio::task::block_in_place(|| cluster.start_server());
    wait_until(Duration::from_secs(10), "/readyz 200 again", || async {
        a.readyz(&client).await == 200
    })
    .await;
    assert_eq!(post(2).await, 200, "ingest once PostgreSQL is back");
}

/// `GET path` through one replica: its status and JSON.
async fn get_on(client: &reqwest::Client, r: &Replica, path: &str) -> (u16, Value) {
    let res = client
        .get(format!("{}{path}", r.url()))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{}: GET {path}: {e}", r.name));
    let status = res.status().as_u16();
    (status, res.json::<Value>().await.unwrap_or(Value::Null))
}

/// `GET path` through both replicas: the same status and the same JSON (returned).
async fn same(client: &reqwest::Client, a: &Replica, b: &Replica, path: &str) -> (u16, Value) {
    let (sa, ba) = get_on(client, a, path).await;
    let (sb, bb) = get_on(client, b, path).await;
    assert_eq!(sa, sb, "{path}: a answered {sa}, b {sb}");
    assert_eq!(ba, bb, "{path}: a and b answer differently");
    (sa, ba)
}

// ---------------------------------------------------------------------------------------------
// 4. Every replica answers the same
// ---------------------------------------------------------------------------------------------

/// After readings of several devices were posted alternately through two replicas, each
/// replica sees the other's commits at once (read-your-writes through the other replica), and
/// `GET /v1/devices`, `GET /v1/devices/{id}` and `GET /v1/devices/{id}/readings` (plain,
/// `desc` with a limit, a time range, a metric) answer identically through both, with the
/// readings and latest values that were posted, including those posted only through one of
/// them and those without a `seq`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_and_devices_answer_the_same_through_every_replica() {
    let db = TestDb::new();
    let url = db.url();
    let client = http_client();
    let a = Replica::start("a", &url, &[]);
    let b = Replica::start("b", &url, &[]);
    a.wait_ready(&client).await;
    b.wait_ready(&client).await;
    let replicas = [&a, &b];

    let base_ts = now_ms() - 3_600_000;
    let reading = |d: usize, seq: Option<u64>, ts: i64| -> Value {
        let s = seq.unwrap_or(0);
        let mut r = json!({
            "device_id": format!("q{d}"),
            "ts": ts,
            "metrics": {"temperature": 20.0 + s as f64 / 10.0, "count": s, "on": s % 2 == 0},
        });
        if let Some(seq) = seq {
            r["seq"] = json!(seq);
        }
        if s % 2 == 0 {
            r["tags"] = json!({"site": "north"});
        }
        r
    };
    // Devices q0..q3 through both replicas, q4 only through b, q5 only through a.
    let per_device = 30u64;
    let mut expected: BTreeMap<String, Vec<(i64, Option<u64>)>> = BTreeMap::new();
    let mut batches: Vec<(usize, Vec<Value>)> = Vec::new();
    for d in 0..6usize {
        for chunk in 0..per_device / 10 {
            let via = match d {
                4 => 1,
                5 => 0,
                _ => (d + chunk as usize) % 2,
            };
            let mut batch = Vec::new();
            for seq in chunk * 10..chunk * 10 + 10 {
                let ts = base_ts + seq as i64 * 1_000 + d as i64;
                let mut r = reading(d, Some(seq), ts);
                if seq == per_device - 1 {
                    r["metrics"]["big"] = json!(u64::MAX);
                }
                batch.push(r);
                expected
                    .entry(format!("q{d}"))
                    .or_default()
                    .push((ts, Some(seq)));
            }
            // One reading without a seq per batch, between two others in time.
            let ts = base_ts + (chunk * 10) as i64 * 1_000 + 500;
            batch.push(reading(d, None, ts));
            expected
                .entry(format!("q{d}"))
                .or_default()
                .push((ts, None));
            batches.push((via, batch));
        }
    }
    for (via, batch) in &batches {
        let (to, other) = (replicas[*via], replicas[1 - via]);
        let res = client
            .post(format!("{}/v1/readings", to.url()))
            .json(batch)
            .send()
            .await
            .expect("POST");
        assert_eq!(res.status(), 200, "{}", to.name);
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["accepted"], batch.len(), "{}: {body}", to.name);
        // Acked through one replica: already visible through the other.
        let device = batch[0]["device_id"].as_str().unwrap();
        let (status, seen) = get_on(
            &client,
            other,
            &format!("/v1/devices/{device}/readings?limit=10000"),
        )
        .await;
        assert_eq!(status, 200, "{}: {device}: {seen}", other.name);
        let seen: BTreeSet<u64> = seen["readings"]
            .as_array()
            .expect("readings")
            .iter()
            .filter_map(|r| r["seq"].as_u64())
            .collect();
        for r in batch.iter().filter(|r| r.get("seq").is_some()) {
            let seq = r["seq"].as_u64().unwrap();
            assert!(
                seen.contains(&seq),
                "{device} seq {seq} acked by {} but not visible through {}",
                to.name,
                other.name
            );
        }
    }
    // A retry of acked readings through the other replica: all duplicates (without the
    // seq-less reading, which would be a new one).
    let (via, batch) = &batches[0];
    let with_seq: Vec<&Value> = batch.iter().filter(|r| r.get("seq").is_some()).collect();
    let other = replicas[1 - via];
    let res = client
        .post(format!("{}/v1/readings", other.url()))
        .json(&with_seq)
        .send()
        .await
        .expect("POST");
    let body: Value = res.json().await.unwrap();
    assert_eq!(
        (body["accepted"].as_u64(), body["duplicates"].as_u64()),
        (Some(0), Some(with_seq.len() as u64)),
        "{}: resend answered {body}",
        other.name
    );

    let (status, list) = same(&client, &a, &b, "/v1/devices").await;
    assert_eq!(status, 200);
    let listed: Vec<&str> = list["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| d["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["q0", "q1", "q2", "q3", "q4", "q5"]);
    for (device, rows) in &expected {
        let (status, one) = same(&client, &a, &b, &format!("/v1/devices/{device}")).await;
        assert_eq!(status, 200, "{device}");
        let in_list = list["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["device_id"] == *device)
            .unwrap();
        assert_eq!(&one, in_list, "{device}: /v1/devices/{{id}} vs the list");
        let last = per_device - 1;
        let last_ts = rows.iter().map(|(ts, _)| *ts).max().unwrap();
        assert_eq!(one["last_ts"], format_ts(last_ts), "{device}");
        assert_eq!(
            one["metrics"],
            json!({"temperature": 20.0 + last as f64 / 10.0, "count": last, "on": false, "big": u64::MAX}),
            "{device}: latest values"
        );

        let mut in_order = rows.clone();
        in_order.sort();
        let (status, all) = same(&client, &a, &b, &format!("/v1/devices/{device}/readings")).await;
        assert_eq!(status, 200, "{device}");
        let got: Vec<(String, Option<u64>)> = all["readings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["ts"].as_str().unwrap().to_string(), r["seq"].as_u64()))
            .collect();
        let want: Vec<(String, Option<u64>)> = in_order
            .iter()
            .map(|(ts, s)| (format_ts(*ts), *s))
            .collect();
        assert_eq!(got, want, "{device}: readings in ts order");
        assert_eq!(
            all["readings"][0]["tags"],
            json!({"site": "north"}),
            "{device}: tags"
        );

        let (_, desc) = same(
            &client,
            &a,
            &b,
            &format!("/v1/devices/{device}/readings?order=desc&limit=7"),
        )
        .await;
        let desc_seqs: Vec<Option<u64>> = desc["readings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["seq"].as_u64())
            .collect();
        let want_desc: Vec<Option<u64>> = in_order.iter().rev().take(7).map(|(_, s)| *s).collect();
        assert_eq!(desc_seqs, want_desc, "{device}: desc, limit 7");

        let (from, to) = (in_order[5].0, in_order[20].0);
        let (_, range) = same(
            &client,
            &a,
            &b,
            &format!("/v1/devices/{device}/readings?from={from}&to={to}"),
        )
        .await;
        assert_eq!(
            range["readings"].as_array().unwrap().len(),
            15,
            "{device}: [from, to) holds 15 readings"
        );
        let (_, metric) = same(
            &client,
            &a,
            &b,
            &format!("/v1/devices/{device}/readings?metric=big"),
        )
        .await;
        assert_eq!(
            metric["readings"].as_array().unwrap().len(),
            1,
            "{device}: one reading carries `big`: {metric}"
        );
    }
    let (status, _) = same(&client, &a, &b, "/v1/devices/nope").await;
    assert_eq!(status, 404);
    let (status, _) = same(&client, &a, &b, "/v1/devices/nope/readings").await;
    assert_eq!(status, 404);
}
