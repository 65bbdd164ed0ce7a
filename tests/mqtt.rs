//! MQTT source, end to end: a private Mosquitto per test, a real publishing client, and Sluice
//! (in process on port 0, or the real binary for kill -9) with a temp data dir. What a test
//! checks is what the store holds, compared as sets of `(device_id, seq)`.

#[path = "common/mqtt_broker.rs"]
mod mqtt_broker;

use std::collections::BTreeSet;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use mqtt_broker::{client_id, Mosquitto, TestClient};
use sluice::{Application, Settings};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// One reading of four metrics, bound to the topic's device.
fn reading(seq: u64) -> Vec<u8> {
    format!(r#"{{"seq":{seq},"metrics":{{"temperature":21.5,"humidity":40,"door_open":false,"battery":3.3}}}}"#)
        .into_bytes()
}

fn topic(device: &str) -> String {
    format!("devices/{device}/readings")
}

/// Polls `check` until it holds, or panics with `what` after `within`.
async fn wait_for<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Talks to a running Sluice over HTTP.
#[derive(Clone)]
struct Http {
    base: String,
    client: reqwest::Client,
}

impl Http {
    fn new(port: u16) -> Self {
        Self {
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
        }
    }

    /// A metric's value; `labels` must all appear on the series. 0 when absent.
    async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let Ok(resp) = self
            .client
            .get(format!("{}/metrics", self.base))
            .send()
            .await
        else {
            return f64::NAN;
        };
        let text = resp.text().await.unwrap_or_default();
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                l.split(['{', ' ']).next() == Some(name)
                    && labels
                        .iter()
                        .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .next()
            .unwrap_or(0.0)
    }

    /// Every stored `seq` of a device (empty if the device is unknown), with repeats.
    async fn seqs(&self, device: &str) -> Vec<u64> {
        let url = format!("{}/v1/devices/{device}/readings?limit=10000", self.base);
        let Ok(resp) = self.client.get(url).send().await else {
            return Vec::new();
        };
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Vec::new();
        }
        let body: serde_json::Value = resp.json().await.expect("readings JSON");
        body["readings"]
            .as_array()
            .expect("readings array")
            .iter()
            .map(|r| r["seq"].as_u64().expect("seq"))
            .collect()
    }

    async fn seq_set(&self, device: &str) -> BTreeSet<u64> {
        self.seqs(device).await.into_iter().collect()
    }

    async fn connected(&self) -> bool {
        self.metric("sluice_mqtt_connected", &[]).await == 1.0
    }
}

/// Sluice running in this process.
struct App {
    http: Http,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
    _data: tempfile::TempDir,
}

impl App {
    /// Starts Sluice with MQTT on `broker`, and waits until it is subscribed.
    async fn spawn(broker: &Mosquitto, tweak: impl FnOnce(&mut Settings)) -> App {
        if let Ok(level) = std::env::var("SLUICE_TEST_LOG") {
            // Opt-in logs for debugging a failing test.
            sluice::telemetry::logging::init(&sluice::config::LogSettings {
                level,
                ..Default::default()
            });
        }
        let data = tempfile::tempdir().expect("tempdir");
        let mut s = Settings::default();
        s.server.listen = "127.0.0.1:0".parse().unwrap();
        s.storage.data_dir = data.path().to_path_buf();
        s.mqtt.enabled = true;
        s.mqtt.url = broker.url();
        s.mqtt.client_id = client_id("sluice");
        s.mqtt.keep_alive = Duration::from_secs(5);
        tweak(&mut s);
        s.validate().expect("valid settings");
        let app = Application::build(s).await.expect("build");
        let http = Http::new(app.port());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async move {
            let _ = rx.await;
        }));
        let h = http.clone();
        wait_for("sluice subscribed", Duration::from_secs(10), || {
            let h = h.clone();
            async move { h.connected().await }
        })
        .await;
        App {
            http,
            stop: Some(tx),
            task,
            _data: data,
        }
    }

    /// Graceful shutdown; returns what `run_until` returned.
    async fn shutdown(mut self) -> anyhow::Result<()> {
        let _ = self.stop.take().expect("running").send(());
        tokio::time::timeout(Duration::from_secs(30), &mut self.task)
            .await
            .expect("shutdown in time")
            .expect("app task")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_and_qos0_messages_are_stored_under_the_topic_device() {
    let broker = Mosquitto::start(false, "");
    let app = App::spawn(&broker, |_| {}).await;
    let mut publisher = TestClient::connect(broker.port, &client_id("pub")).await;

    assert!(publisher.publish_acked(&topic("dev-a"), reading(1)).await);
    publisher.publish_qos0(&topic("dev-a"), reading(2)).await;
    let batch = br#"[{"device_id":"dev-b","seq":1,"metrics":{"x":1}},{"seq":2,"metrics":{"x":2.5,"on":true}}]"#;
    assert!(
        publisher
            .publish_acked(&topic("dev-b"), batch.to_vec())
            .await
    );

    let h = app.http.clone();
    wait_for("4 readings stored", Duration::from_secs(10), || {
        let h = h.clone();
        async move {
            h.seq_set("dev-a").await == BTreeSet::from([1, 2])
                && h.seq_set("dev-b").await == BTreeSet::from([1, 2])
        }
    })
    .await;
    let mqtt = [("transport", "mqtt")];
    assert_eq!(h.metric("sluice_readings_received_total", &mqtt).await, 4.0);
    assert_eq!(h.metric("sluice_readings_accepted_total", &mqtt).await, 4.0);
    // Every QoS 1 message is PUBACKed once committed.
    wait_for("nothing left unacked", Duration::from_secs(5), || {
        let h = h.clone();
        async move { h.metric("sluice_mqtt_unacked_messages", &[]).await == 0.0 }
    })
    .await;
    // Readings read back as given, under the topic's device id.
    let body: serde_json::Value = reqwest::get(format!("{}/v1/devices/dev-b/readings", h.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["device_id"], "dev-b");
    assert_eq!(body["readings"][1]["metrics"]["on"], true);

    app.shutdown().await.expect("clean shutdown");
    // Shutdown ends with a DISCONNECT, not a dropped socket.
    let log = broker.log();
    assert!(
        log.lines()
            .any(|l| l.contains("disconnected.") && l.contains("sluice-")),
        "broker log shows no clean disconnect:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_payloads_are_dead_lettered_and_good_neighbours_stored() {
    let broker = Mosquitto::start(false, "");
    let app = App::spawn(&broker, |s| {
        s.limits.max_body_bytes = 64 * 1024;
        s.mqtt.dead_letter_topic = "dead".into();
    })
    .await;
    let mut watcher = TestClient::connect(broker.port, &client_id("watch")).await;
    watcher.subscribe("dead/#").await;
    let mut publisher = TestClient::connect(broker.port, &client_id("pub")).await;

    let long_level = "a".repeat(200);
    let huge = {
        let mut v = br#"{"seq":1,"metrics":{"x":1},"tags":{"pad":""#.to_vec();
        v.resize(1 << 20, b'p');
        v.extend_from_slice(br#""}}"#);
        v
    };
    let huge_len = huge.len();
    let cases: Vec<(String, Vec<u8>)> = vec![
        (topic("d1"), b"this is not json".to_vec()),
        (
            topic("d1"),
            br#"{"device_id":"other","seq":1,"metrics":{"x":1}}"#.to_vec(),
        ),
        (
            topic("d2"),
            br#"[{"seq":1,"metrics":{"x":1}},{"seq":2,"metrics":{"x":"hot"}},{"seq":3,"metrics":{"x":3}}]"#
                .to_vec(),
        ),
        (topic("d3"), huge),
        (topic(&long_level), reading(1)),
        (topic("d1"), reading(7)),
    ];
    for (t, p) in cases {
        assert!(publisher.publish_acked(&t, p).await, "broker took {t}");
    }

    let letters = watcher.messages(5, Duration::from_secs(10)).await;
    let one = |topic: &str| -> serde_json::Value {
        let v = letters
            .get(topic)
            .unwrap_or_else(|| panic!("no dead letter on {topic}: {letters:?}"));
        serde_json::from_slice(&v[0]).expect("dead letter JSON")
    };
    let d1 = &letters["dead/d1"];
    assert_eq!(d1.len(), 2, "two dead letters for d1");
    let d1: Vec<serde_json::Value> = d1
        .iter()
        .map(|b| serde_json::from_slice(b).unwrap())
        .collect();
    assert_eq!(d1[0]["error"]["reason"], "malformed");
    assert!(d1[0]["error"]["detail"]
        .as_str()
        .unwrap()
        .contains("line 1 column"));
    assert_eq!(d1[0]["payload"], "this is not json");
    assert_eq!(d1[0]["topic"], "devices/d1/readings");
    assert_eq!(d1[1]["rejected"][0]["reason"], "device_mismatch");
    assert_eq!(d1[1]["taken"], 0);

    let d2 = one("dead/d2");
    assert_eq!(d2["rejected"].as_array().unwrap().len(), 1);
    assert_eq!(d2["rejected"][0]["index"], 1);
    assert_eq!(d2["rejected"][0]["reason"], "invalid_metrics");
    assert_eq!(
        d2["rejected"][0]["error"],
        "metrics.x: expected a finite number or a boolean"
    );
    assert_eq!(d2["taken"], 2);

    let d3 = one("dead/d3");
    assert_eq!(d3["error"]["reason"], "too_large");
    assert_eq!(d3["payload_bytes"], huge_len);
    assert!(
        d3.get("payload").is_none(),
        "oversized payload is not echoed"
    );

    let invalid = one("dead/_invalid");
    assert_eq!(invalid["error"]["reason"], "invalid_device_id");
    assert!(invalid["device_id"].is_null());
    assert!(invalid["error"]["detail"]
        .as_str()
        .unwrap()
        .contains("at most 128"));

    let h = app.http.clone();
    wait_for("good readings stored", Duration::from_secs(10), || {
        let h = h.clone();
        async move {
            h.seq_set("d1").await == BTreeSet::from([7])
                && h.seq_set("d2").await == BTreeSet::from([1, 3])
        }
    })
    .await;
    assert!(h.seqs("d3").await.is_empty());
    let rejected = |reason: &'static str| {
        let h = h.clone();
        async move {
            h.metric(
                "sluice_readings_rejected_total",
                &[("transport", "mqtt"), ("reason", reason)],
            )
            .await
        }
    };
    assert_eq!(rejected("malformed").await, 1.0);
    assert_eq!(rejected("device_mismatch").await, 1.0);
    assert_eq!(rejected("invalid_metrics").await, 1.0);
    assert_eq!(rejected("too_large").await, 1.0);
    assert_eq!(rejected("invalid_device_id").await, 1.0);
    assert_eq!(h.metric("sluice_mqtt_dead_letters_total", &[]).await, 5.0);
    wait_for("every message PUBACKed", Duration::from_secs(5), || {
        let h = h.clone();
        async move { h.metric("sluice_mqtt_unacked_messages", &[]).await == 0.0 }
    })
    .await;
    app.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_loses_nothing_the_broker_acknowledged() {
    let mut broker = Mosquitto::start(true, "");
    let app = App::spawn(&broker, |s| {
        // Keep some messages in flight (taken, not yet committed) when the broker goes away.
        s.storage.commit_delay = Duration::from_millis(5);
        // A plain subscription: mosquitto 2.0.11 does not restore *shared* subscriptions
        // from its persistence file, so a shared group misses what is published between the
        // broker's restart and Sluice's resubscription (a broker limitation, see ARCHITECTURE.md).
        s.mqtt.shared_group = String::new();
    })
    .await;
    let mut publisher = TestClient::connect(broker.port, &client_id("pub")).await;

    let total = 400u64;
    let mut acked = BTreeSet::new();
    let mut restarted = false;
    for seq in 0..total {
        if seq == total / 3 {
            broker.restart();
            restarted = true;
        }
        // Retry until the broker takes it: the publisher reconnects by itself.
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while !publisher.publish_acked(&topic("r1"), reading(seq)).await {
            assert!(
                std::time::Instant::now() < deadline,
                "broker never took seq {seq}"
            );
        }
        acked.insert(seq);
    }
    assert!(restarted);

    let h = app.http.clone();
    let expected = acked.clone();
    wait_for(
        "every acknowledged reading stored",
        Duration::from_secs(20),
        || {
            let h = h.clone();
            let expected = expected.clone();
            async move { h.seq_set("r1").await.is_superset(&expected) }
        },
    )
    .await;
    let stored = h.seqs("r1").await;
    let stored_set: BTreeSet<u64> = stored.iter().copied().collect();
    assert_eq!(stored.len(), stored_set.len(), "a reading was stored twice");
    assert!(
        stored_set.is_subset(&(0..total).collect()),
        "unknown readings stored"
    );
    assert!(h.metric("sluice_mqtt_reconnects_total", &[]).await >= 1.0);
    assert!(h.connected().await);
    app.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_store_withholds_pubacks_without_losing_or_disconnecting() {
    let broker = Mosquitto::start(false, "");
    let app = App::spawn(&broker, |s| {
        // Each commit stalls longer than the broker waits for a silent client (1.5 x 1 s).
        s.storage.commit_delay = Duration::from_millis(2500);
        s.mqtt.keep_alive = Duration::from_secs(1);
        s.mqtt.max_unacked = 40;
    })
    .await;
    let h = app.http.clone();
    let mut publisher = TestClient::connect(broker.port, &client_id("pub")).await;

    let total = 120u64;
    publisher
        .publish_all((0..total).map(|s| (topic("s1"), reading(s))).collect())
        .await;
    // The publisher is done while Sluice has committed at most one slow batch: the broker
    // holds the rest for Sluice, PUBACKs are withheld, nothing is dropped.
    assert!(h.seqs("s1").await.len() < total as usize);

    let mut max_unacked = 0.0f64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let unacked = h.metric("sluice_mqtt_unacked_messages", &[]).await;
        max_unacked = max_unacked.max(unacked);
        assert!(unacked <= 40.0, "Sluice held {unacked} unacked messages");
        assert!(
            h.connected().await,
            "connection dropped while the store was stalled"
        );
        if h.seq_set("s1").await == (0..total).collect() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not everything was stored"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        max_unacked > 0.0,
        "never saw a message waiting for its commit"
    );
    assert_eq!(
        h.seqs("s1").await.len(),
        total as usize,
        "a reading was stored twice"
    );
    // Never lost the connection: the event loop kept pinging through every stalled commit.
    assert_eq!(h.metric("sluice_mqtt_reconnects_total", &[]).await, 0.0);
    let log = broker.log();
    assert!(
        !log.contains("exceeded timeout"),
        "keep-alive expired:\n{log}"
    );
    app.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_over_the_byte_budget_are_left_for_redelivery() {
    // No broker-side window at all: the broker sends everything at once.
    let broker = Mosquitto::start(false, "max_inflight_messages 0");
    let app = App::spawn(&broker, |s| {
        s.storage.commit_delay = Duration::from_millis(20);
        s.mqtt.max_unacked_bytes = 1000;
    })
    .await;
    let h = app.http.clone();
    let mut publisher = TestClient::connect(broker.port, &client_id("pub")).await;
    let total = 150u64;
    publisher
        .publish_all((0..total).map(|s| (topic("o1"), reading(s))).collect())
        .await;
    // Payloads are 85 to 87 bytes: at most 11 fit in 1000 bytes.
    let most = (1000 / reading(0).len()) as f64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while h.seq_set("o1").await != (0..total).collect() {
        let unacked = h.metric("sluice_mqtt_unacked_messages", &[]).await;
        assert!(unacked <= most, "Sluice held {unacked} unacked messages");
        assert!(
            tokio::time::Instant::now() < deadline,
            "not everything was stored"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(h.metric("sluice_mqtt_not_taken_total", &[]).await > 0.0);
    let stored = h.seqs("o1").await;
    assert_eq!(stored.len(), total as usize, "a reading was stored twice");
    app.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscription_splits_the_load_and_stores_each_message_once() {
    let broker = Mosquitto::start(false, "");
    // Two instances with separate stores, as two replicas on two machines would have.
    let group = |s: &mut Settings| s.mqtt.shared_group = "sluice-test".into();
    let a = App::spawn(&broker, group).await;
    let b = App::spawn(&broker, group).await;
    let mut publisher = TestClient::connect(broker.port, &client_id("pub")).await;

    let devices = ["g1", "g2", "g3"];
    let per_device = 100u64;
    let messages = (0..per_device)
        .flat_map(|s| devices.iter().map(move |d| (topic(d), reading(s))))
        .collect();
    publisher.publish_all(messages).await;

    let all: BTreeSet<(String, u64)> = devices
        .iter()
        .flat_map(|d| (0..per_device).map(move |s| (d.to_string(), s)))
        .collect();
    let stored = |h: Http| async move {
        let mut out = Vec::new();
        for d in ["g1", "g2", "g3"] {
            out.extend(h.seqs(d).await.into_iter().map(|s| (d.to_string(), s)));
        }
        out
    };
    let (ha, hb) = (a.http.clone(), b.http.clone());
    wait_for(
        "the union of both stores holds every message",
        Duration::from_secs(20),
        || {
            let (ha, hb, all) = (ha.clone(), hb.clone(), all.clone());
            async move {
                let mut union: BTreeSet<_> = stored(ha).await.into_iter().collect();
                union.extend(stored(hb).await);
                union == all
            }
        },
    )
    .await;
    let in_a = stored(a.http.clone()).await;
    let in_b = stored(b.http.clone()).await;
    assert!(
        !in_a.is_empty() && !in_b.is_empty(),
        "one instance got nothing: a={} b={}",
        in_a.len(),
        in_b.len()
    );
    assert_eq!(
        in_a.len() + in_b.len(),
        all.len(),
        "a message was stored twice"
    );
    let set_a: BTreeSet<_> = in_a.into_iter().collect();
    assert!(set_a.is_disjoint(&in_b.into_iter().collect()));
    a.shutdown().await.expect("clean shutdown");
    b.shutdown().await.expect("clean shutdown");
}

/// The real binary, configured through `SLUICE__*` variables.
struct Binary {
    child: Child,
    http: Http,
}

impl Binary {
    fn start(broker: &Mosquitto, data: &std::path::Path, client: &str) -> Binary {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .env("SLUICE__SERVER__LISTEN", "127.0.0.1:0")
            .env("SLUICE__STORAGE__DATA_DIR", data)
            .env("SLUICE__STORAGE__COMMIT_DELAY", "5ms")
            .env("SLUICE__MQTT__ENABLED", "true")
            .env("SLUICE__MQTT__URL", broker.url())
            .env("SLUICE__MQTT__CLIENT_ID", client)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run sluice");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("addr=").nth(1) {
                    if line.contains("sluice listening") {
                        let port = addr
                            .split(|c: char| c.is_whitespace())
                            .next()
                            .and_then(|a| a.rsplit(':').next())
                            .and_then(|p| p.parse::<u16>().ok());
                        if let (Some(port), Some(tx)) = (port, tx.take()) {
                            let _ = tx.send(port);
                        }
                    }
                }
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(15))
            .expect("sluice printed its address");
        Binary {
            child,
            http: Http::new(port),
        }
    }

    fn kill9(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill -9");
        let _ = self.child.wait();
    }

    fn terminate(mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        self.child.wait().expect("wait")
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sluice_kill_9_loses_nothing_and_stores_nothing_twice() {
    let broker = Mosquitto::start(false, "");
    let data = tempfile::tempdir().expect("tempdir");
    let id = client_id("sluice-bin");
    let first = Binary::start(&broker, data.path(), &id);
    let h = first.http.clone();
    wait_for("first sluice subscribed", Duration::from_secs(15), || {
        let h = h.clone();
        async move { h.connected().await }
    })
    .await;

    let total = 800u64;
    let port = broker.port;
    let publishing = tokio::spawn(async move {
        let mut publisher = TestClient::connect(port, &client_id("pub")).await;
        publisher
            .publish_all((0..total).map(|s| (topic("k1"), reading(s))).collect())
            .await;
    });
    // Kill it mid-stream: some readings committed, more in flight and queued at the broker.
    wait_for("some readings stored", Duration::from_secs(15), || {
        let h = h.clone();
        async move { h.seqs("k1").await.len() >= 100 }
    })
    .await;
    first.kill9();
    publishing.await.expect("publisher");

    // Same client id and data dir: the broker redelivers the persistent session's backlog.
    let second = Binary::start(&broker, data.path(), &id);
    let h = second.http.clone();
    wait_for(
        "every published reading stored",
        Duration::from_secs(30),
        || {
            let h = h.clone();
            async move { h.seq_set("k1").await == (0..total).collect() }
        },
    )
    .await;
    let stored = h.seqs("k1").await;
    assert_eq!(stored.len(), total as usize, "a reading was stored twice");
    let status = second.terminate();
    assert!(status.success(), "graceful exit: {status}");
}

#[test]
fn check_config_redacts_the_mqtt_password() {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--check-config")
        .env("SLUICE__MQTT__PASSWORD", "hunter2")
        .env("SLUICE__MQTT__USERNAME", "sluice")
        .env("SLUICE__MQTT__MAX_UNACKED", "64")
        .output()
        .expect("run sluice");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("hunter2"), "{text}");
    assert!(text.contains("<redacted>"), "{text}");
    assert!(text.contains("max_unacked = 64"), "{text}");

    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--check-config")
        .env("SLUICE__MQTT__URL", "mqtts://broker:8883")
        .output()
        .expect("run sluice");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mqtt.url") && err.contains("TLS"), "{err}");
}
