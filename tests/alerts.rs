//! Alert rules end to end (SPEC §12): Sluice in process on port 0 with a temp data dir (the
//! same dir again for a restart), readings posted over HTTP, and the events observed where a
//! user would see them: a real HTTP receiver for the webhook (an axum server on port 0 in this
//! test, which checks each signature with its own HMAC), `/v1/live?type=alert`, a private
//! mosquitto for the MQTT action, `GET /v1/alerts`, and the real binary for bad rules.

mod common;
#[path = "common/mqtt_broker.rs"]
mod mqtt_broker;
#[path = "common/pg.rs"]
mod pg;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use common::{metric_value, next_ws_json, run_sluice_to_exit, wait_ready, wait_until};
use serde_json::{json, Value};
use sluice::config::RuleSettings;
use sluice::{Application, Settings};

const SECRET: &str = "s3cret-for-tests";

fn threshold(name: &str, devices: &str, condition: &str, hold_ms: u64) -> RuleSettings {
    RuleSettings {
        name: name.into(),
        devices: devices.into(),
        metric: Some("temperature".into()),
        condition: Some(condition.into()),
        hold_for: Duration::from_millis(hold_ms),
        absent_for: None,
    }
}

fn absence(name: &str, devices: &str, after_ms: u64) -> RuleSettings {
    RuleSettings {
        name: name.into(),
        devices: devices.into(),
        metric: None,
        condition: None,
        hold_for: Duration::ZERO,
        absent_for: Some(Duration::from_millis(after_ms)),
    }
}

/// Sluice in process on a data directory the test owns, so that it can be started again on it.
struct Running {
    addr: SocketAddr,
    client: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    async fn start(dir: &Path, tweak: impl FnOnce(&mut Settings)) -> Self {
        let mut s = common::test_settings(dir);
        s.alerts.evaluation_interval = Duration::from_millis(50);
        s.alerts.webhook_backoff_initial = Duration::from_millis(50);
        s.alerts.webhook_backoff_max = Duration::from_millis(200);
        s.alerts.webhook_timeout = Duration::from_secs(2);
        tweak(&mut s);
        s.validate().expect("valid test settings");
        let app = Application::build(s).await.expect("app builds");
        let addr = app.local_addr();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async move {
            let _ = stopped.await;
        }));
        let client = reqwest::Client::new();
        wait_ready(&client, &format!("http://{addr}/readyz")).await;
        Self {
            addr,
            client,
            stop: Some(stop),
            task: Some(task),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Posts one reading of `temperature`; panics unless it is acknowledged.
    async fn post(&self, device: &str, seq: u64, temperature: f64) {
        let body =
            json!({"device_id": device, "seq": seq, "metrics": {"temperature": temperature}});
        let res = self
            .client
            .post(self.url("/v1/readings"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(
            res.status(),
            200,
            "{}",
            res.text().await.unwrap_or_default()
        );
    }

    async fn get(&self, path: &str) -> Value {
        self.client
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = self
            .client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        metric_value(&text, name, labels)
    }

    /// The state of (rule, device) in `GET /v1/alerts`, if it is pending or firing.
    async fn alert(&self, rule: &str, device: &str) -> Option<Value> {
        let all = self.get("/v1/alerts").await;
        all["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["rule"] == rule && a["device_id"] == device)
            .cloned()
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task
            .take()
            .unwrap()
            .await
            .unwrap()
            .expect("clean shutdown");
    }
}

/// A webhook receiver: an axum server on a free port that records each event it accepts,
/// with whether its signature was right (checked here with the `hmac` crate, independently
/// of Sluice's code). While `down`, it answers 503 to every request.
#[derive(Default)]
struct Hook {
    events: Mutex<Vec<(Value, bool)>>,
    down: AtomicBool,
    attempts: AtomicU64,
    secret: Option<String>,
}

impl Hook {
    async fn start(secret: Option<&str>) -> (Arc<Self>, String) {
        let hook = Arc::new(Hook {
            secret: secret.map(str::to_owned),
            ..Default::default()
        });
        let app = axum::Router::new()
            .route("/hooks/alerts", axum::routing::post(receive))
            .with_state(hook.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (hook, format!("http://{addr}/hooks/alerts"))
    }

    fn events(&self) -> Vec<(Value, bool)> {
        self.events.lock().unwrap().clone()
    }

    async fn wait_for(&self, n: usize, within: Duration) -> Vec<Value> {
        wait_until(within, &format!("{n} webhook events"), || async {
            self.events.lock().unwrap().len() >= n
        })
        .await;
        self.events().into_iter().map(|(v, _)| v).collect()
    }
}

async fn receive(State(hook): State<Arc<Hook>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    hook.attempts.fetch_add(1, Ordering::Relaxed);
    if hook.down.load(Ordering::Acquire) {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let valid = match &hook.secret {
        None => headers.get("x-sluice-signature").is_none(),
        Some(secret) => {
            use hmac::{KeyInit, Mac};
            let mut mac =
                <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(secret.as_bytes()).unwrap();
            mac.update(&body);
            let expected: String = mac
                .finalize()
                .into_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            headers
                .get("x-sluice-signature")
                .and_then(|v| v.to_str().ok())
                == Some(format!("sha256={expected}").as_str())
        }
    };
    let event: Value = serde_json::from_slice(&body).expect("JSON body");
    hook.events.lock().unwrap().push((event, valid));
    StatusCode::OK
}

fn ms(rfc3339: &Value) -> i64 {
    let t = time::OffsetDateTime::parse(
        rfc3339.as_str().expect("a timestamp"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("RFC 3339");
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

fn states(events: &[Value], device: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["device_id"] == device)
        .map(|e| e["state"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threshold_with_for_fires_after_it_resolves_once_and_survives_a_restart() {
    let (hook, url) = Hook::start(None).await;
    let dir = tempfile::tempdir().unwrap();
    let tweak = |s: &mut Settings| {
        s.rules = vec![
            threshold("hot", "g-*", "> 30", 1000),
            threshold("warm", "w-*", ">= 25", 3000),
        ];
        s.alerts.webhook_url = url.clone();
    };
    let app = Running::start(dir.path(), tweak).await;
    let rules = app.get("/v1/rules").await;
    assert_eq!(rules["rules"][0]["name"], "hot");
    assert_eq!(rules["rules"][0]["kind"], "threshold");
    assert_eq!(rules["rules"][0]["condition"]["op"], ">");

    // Pending at once, firing only after `for`.
    let posted = Instant::now();
    app.post("g-1", 1, 35.0).await;
    wait_until(Duration::from_secs(5), "g-1 pending", || async {
        app.alert("hot", "g-1")
            .await
            .is_some_and(|a| a["state"] == "pending")
    })
    .await;
    let events = hook.wait_for(1, Duration::from_secs(10)).await;
    assert!(
        posted.elapsed() >= Duration::from_secs(1),
        "fired after {:?}",
        posted.elapsed()
    );
    let e = &events[0];
    assert_eq!(
        (
            &e["type"],
            &e["rule"],
            &e["device_id"],
            &e["state"],
            &e["value"]
        ),
        (
            &json!("alert"),
            &json!("hot"),
            &json!("g-1"),
            &json!("firing"),
            &json!(35.0)
        )
    );
    assert!(ms(&e["ts"]) - ms(&e["since"]) >= 1000, "{e}");
    assert_eq!(app.alert("hot", "g-1").await.unwrap()["state"], "firing");
    wait_until(Duration::from_secs(5), "the gauge shows it", || async {
        app.metric("sluice_alerts", &[("rule", "hot"), ("state", "firing")])
            .await
            == 1.0
    })
    .await;
    // The status page lists the firing rule (from the same gauge).
    wait_until(
        Duration::from_secs(5),
        "the status page shows it",
        || async { app.get("/v1/status").await["alerts"]["firing"] == json!(["hot"]) },
    )
    .await;

    // Still hot: nothing new. Cold: resolved, once.
    app.post("g-1", 2, 36.0).await;
    app.post("g-1", 3, 20.0).await;
    let events = hook.wait_for(2, Duration::from_secs(5)).await;
    assert_eq!(events[1]["state"], "resolved");
    assert_eq!(events[1]["value"], json!(20.0));
    assert_eq!(ms(&events[1]["since"]), ms(&events[0]["ts"]));

    // Firing again, and a pending alert of a rule with a longer `for`, across a restart.
    app.post("g-1", 4, 40.0).await;
    hook.wait_for(3, Duration::from_secs(10)).await;
    app.post("w-1", 1, 26.0).await;
    wait_until(Duration::from_secs(5), "w-1 pending", || async {
        app.alert("warm", "w-1").await.is_some()
    })
    .await;
    let pending_since = app.alert("warm", "w-1").await.unwrap()["since"].clone();
    app.shutdown().await;

    let app = Running::start(dir.path(), tweak).await;
    wait_until(Duration::from_secs(5), "states restored", || async {
        app.alert("hot", "g-1")
            .await
            .is_some_and(|a| a["state"] == "firing")
    })
    .await;
    // The pending alert fires on time, with no reading after the restart, since it began.
    let events = hook.wait_for(4, Duration::from_secs(10)).await;
    assert_eq!(
        (
            &events[3]["rule"],
            &events[3]["device_id"],
            &events[3]["state"]
        ),
        (&json!("warm"), &json!("w-1"), &json!("firing"))
    );
    assert_eq!(events[3]["since"], pending_since);
    // The firing one is not announced again; it resolves once.
    app.post("g-1", 5, 41.0).await;
    app.post("g-1", 6, 10.0).await;
    let events = hook.wait_for(5, Duration::from_secs(5)).await;
    assert_eq!(
        states(&events, "g-1"),
        ["firing", "resolved", "firing", "resolved"]
    );
    assert!(app.alert("hot", "g-1").await.is_none());
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absence_rule_fires_for_a_device_that_stops_sending_with_no_other_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let app = Running::start(dir.path(), |s| {
        s.rules = vec![absence("silent", "q-*", 1000)];
    })
    .await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!(
        "ws://{}/v1/live?type=alert&device=q-*",
        app.addr
    ))
    .await
    .expect("live stream");
    let posted = Instant::now();
    app.post("q-1", 1, 20.0).await;
    // The first message is the alert: readings are not sent on an alert stream.
    let e = next_ws_json(&mut ws, Duration::from_secs(10)).await;
    assert!(
        posted.elapsed() >= Duration::from_secs(1),
        "{:?}",
        posted.elapsed()
    );
    assert_eq!(
        (
            &e["type"],
            &e["rule"],
            &e["device_id"],
            &e["state"],
            &e["value"]
        ),
        (
            &json!("alert"),
            &json!("silent"),
            &json!("q-1"),
            &json!("firing"),
            &Value::Null
        )
    );
    assert!(ms(&e["ts"]) - ms(&e["since"]) >= 1000, "{e}");
    assert_eq!(app.alert("silent", "q-1").await.unwrap()["state"], "firing");
    app.post("q-1", 2, 20.0).await;
    let e = next_ws_json(&mut ws, Duration::from_secs(5)).await;
    assert_eq!(
        (&e["device_id"], &e["state"]),
        (&json!("q-1"), &json!("resolved"))
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_events_are_signed_in_order_once_and_retried_through_an_outage() {
    let (hook, url) = Hook::start(Some(SECRET)).await;
    hook.down.store(true, Ordering::Release);
    let dir = tempfile::tempdir().unwrap();
    let app = Running::start(dir.path(), |s| {
        s.rules = vec![threshold("hot", "*", "> 30", 0)];
        s.alerts.webhook_url = url.clone();
        s.alerts.webhook_secret = Some(serde_json::from_value(json!(SECRET)).unwrap());
    })
    .await;
    // Three firings and resolutions for each of two devices, while the receiver is down.
    let mut seq = 0;
    for _ in 0..3 {
        for d in ["a", "b"] {
            seq += 1;
            app.post(d, seq, 31.0).await;
            seq += 1;
            app.post(d, seq, 29.0).await;
        }
    }
    wait_until(Duration::from_secs(10), "failed attempts", || async {
        app.metric(
            "sluice_alert_notifications_total",
            &[("action", "webhook"), ("result", "failed")],
        )
        .await
            >= 3.0
    })
    .await;
    assert!(hook.events().is_empty());
    hook.down.store(false, Ordering::Release);
    let events = hook.wait_for(12, Duration::from_secs(10)).await;
    for d in ["a", "b"] {
        assert_eq!(
            states(&events, d),
            ["firing", "resolved", "firing", "resolved", "firing", "resolved"],
            "{d}"
        );
    }
    assert!(
        hook.events().iter().all(|(_, valid)| *valid),
        "every signature checks"
    );
    wait_until(Duration::from_secs(5), "sent counted", || async {
        app.metric(
            "sluice_alert_notifications_total",
            &[("action", "webhook"), ("result", "sent")],
        )
        .await
            == 12.0
    })
    .await;
    assert_eq!(hook.events().len(), 12, "each event once");
    assert_eq!(
        app.metric(
            "sluice_alert_notifications_total",
            &[("action", "webhook"), ("result", "dropped")]
        )
        .await,
        0.0
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_down_past_its_queue_drops_and_counts_while_ingest_is_unaffected() {
    let (hook, url) = Hook::start(None).await;
    hook.down.store(true, Ordering::Release);
    let dir = tempfile::tempdir().unwrap();
    let app = Running::start(dir.path(), |s| {
        s.rules = vec![threshold("hot", "*", "> 30", 0)];
        s.alerts.webhook_url = url.clone();
        s.alerts.queue_capacity = 2;
    })
    .await;
    // 40 devices each fire once; every reading's ack is recorded.
    let mut acked: BTreeSet<(String, u64)> = BTreeSet::new();
    for round in 0..5u64 {
        let batch: Vec<Value> = (0..40)
            .map(|i| json!({"device_id": format!("h-{i}"), "seq": round, "metrics": {"temperature": 31.0 + round as f64}}))
            .collect();
        let res = app
            .client
            .post(app.url("/v1/readings"))
            .json(&batch)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        acked.extend((0..40).map(|i| (format!("h-{i}"), round)));
    }
    wait_until(Duration::from_secs(10), "drops counted", || async {
        app.metric(
            "sluice_alert_notifications_total",
            &[("action", "webhook"), ("result", "dropped")],
        )
        .await
            >= 30.0
    })
    .await;
    wait_until(
        Duration::from_secs(5),
        "the alerts themselves are all there",
        || async {
            app.metric("sluice_alerts", &[("rule", "hot"), ("state", "firing")])
                .await
                == 40.0
        },
    )
    .await;
    let mut stored = BTreeSet::new();
    for i in 0..40 {
        let d = format!("h-{i}");
        stored.extend(
            common::stored_seqs(&app.client, &app.url(""), &d)
                .await
                .into_iter()
                .map(|s| (d.clone(), s)),
        );
    }
    assert_eq!(acked, stored);
    assert!(hook.attempts.load(Ordering::Relaxed) >= 1);
    assert!(hook.events().is_empty());
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mqtt_action_publishes_events_to_the_rule_and_device_topic() {
    let broker = mqtt_broker::Mosquitto::start(false, "");
    let mut watcher =
        mqtt_broker::TestClient::connect(broker.port, &mqtt_broker::client_id("watch")).await;
    watcher.subscribe("alerts/#").await;
    let dir = tempfile::tempdir().unwrap();
    let url = broker.url();
    let app = Running::start(dir.path(), |s| {
        s.rules = vec![threshold("hot", "m-*", "> 30", 0)];
        s.mqtt.enabled = true;
        s.mqtt.url = url;
        s.mqtt.client_id = mqtt_broker::client_id("sluice");
        s.mqtt.keep_alive = Duration::from_secs(5);
        s.alerts.mqtt_topic = "alerts/sluice".into();
    })
    .await;
    app.post("m-1", 1, 35.5).await;
    let got: HashMap<String, Vec<Vec<u8>>> = watcher.messages(1, Duration::from_secs(10)).await;
    let payloads = &got["alerts/sluice/hot/m-1"];
    let e: Value = serde_json::from_slice(&payloads[0]).unwrap();
    assert_eq!(
        (&e["type"], &e["state"], &e["value"]),
        (&json!("alert"), &json!("firing"), &json!(35.5))
    );
    wait_until(Duration::from_secs(5), "sent counted", || async {
        app.metric(
            "sluice_alert_notifications_total",
            &[("action", "mqtt"), ("result", "sent")],
        )
        .await
            == 1.0
    })
    .await;
    app.shutdown().await;
}

#[test]
fn bad_rules_stop_the_start_with_exit_2_naming_the_rule() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "op",
            "name = \"op\"\nmetric = \"t\"\ncondition = \"=> 3\"",
            "unknown operator",
        ),
        (
            "glob",
            "name = \"glob\"\ndevices = \"a/[b]\"\nmetric = \"t\"\ncondition = \"> 3\"",
            "devices glob",
        ),
        (
            "dup",
            "name = \"dup\"\nabsent_for = \"1m\"\n[[rules]]\nname = \"dup\"\nabsent_for = \"2m\"",
            "unique",
        ),
        (
            "Bad Name",
            "name = \"Bad Name\"\nabsent_for = \"1m\"",
            "[a-z0-9_-]",
        ),
        (
            "type",
            "name = \"type\"\nmetric = \"t\"\ncondition = \"> true\"",
            "boolean",
        ),
        (
            "word",
            "name = \"word\"\nmetric = \"t\"\ncondition = \"== hot\"",
            "neither a number nor true/false",
        ),
        (
            "both",
            "name = \"both\"\nmetric = \"t\"\ncondition = \"> 3\"\nabsent_for = \"1m\"",
            "both",
        ),
        ("neither", "name = \"neither\"\nmetric = \"t\"", "neither"),
    ];
    for (name, rule, reason) in cases {
        let path = dir.path().join(format!("{}.toml", name.replace(' ', "_")));
        std::fs::write(&path, format!("[[rules]]\n{rule}\n")).unwrap();
        let (code, stderr) = run_sluice_to_exit(
            &[("SLUICE_CONFIG", path.display().to_string())],
            Duration::from_secs(20),
        );
        assert_eq!(code, Some(2), "{name}: {stderr}");
        assert!(
            stderr.contains(&format!("rules: rule `{name}`")) && stderr.contains(reason),
            "{name}: {stderr}"
        );
    }
}

#[test]
fn check_config_shows_the_rules() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.toml");
    std::fs::write(
        &path,
        "[[rules]]\nname = \"greenhouse-hot\"\ndevices = \"greenhouse-*\"\nmetric = \"temperature\"\ncondition = \"> 30\"\nfor = \"5m\"\n\n[[rules]]\nname = \"device-silent\"\nabsent_for = \"10m\"\n\n[alerts]\nwebhook_url = \"http://127.0.0.1:9/x\"\nwebhook_secret = \"hush-hush\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--check-config")
        .arg("--config")
        .arg(&path)
        .env_clear()
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for expected in [
        "[[rules]]",
        "name = \"greenhouse-hot\"",
        "condition = \"> 30\"",
        "for = \"5m\"",
        "absent_for = \"10m\"",
        "webhook_secret = \"<redacted>\"",
    ] {
        assert!(text.contains(expected), "{expected} in:\n{text}");
    }
    assert!(!text.contains("hush-hush"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_postgres_replicas_announce_an_alert_once() {
    let db = pg::TestDb::new();
    let (hook, url) = Hook::start(None).await;
    let tweak = |s: &mut Settings| {
        s.storage.backend = sluice::config::Backend::Postgres;
        s.storage.postgres.url = sluice::config::DbUrl::new(db.url());
        s.rules = vec![threshold("hot", "*", "> 30", 0)];
        s.alerts.webhook_url = url.clone();
    };
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Running::start(dir_a.path(), tweak).await;
    let b = Running::start(dir_b.path(), tweak).await;
    let state = |app: &Running| {
        let app = app.url("");
        async move {
            let all: Value = reqwest::get(format!("{app}/v1/alerts"))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            all["alerts"][0]["state"].as_str().map(str::to_owned)
        }
    };
    // Both replicas see the device hot: one "firing".
    a.post("d-1", 1, 35.0).await;
    hook.wait_for(1, Duration::from_secs(10)).await;
    b.post("d-1", 2, 36.0).await;
    wait_until(Duration::from_secs(5), "b firing", || async {
        state(&b).await.as_deref() == Some("firing")
    })
    .await;
    assert_eq!(
        b.metric("sluice_alert_events_total", &[("state", "firing")])
            .await,
        0.0,
        "b found the alert already firing in the shared table"
    );
    // Both see it cold: one "resolved".
    b.post("d-1", 3, 20.0).await;
    hook.wait_for(2, Duration::from_secs(10)).await;
    a.post("d-1", 4, 19.0).await;
    wait_until(Duration::from_secs(5), "a resolved", || async {
        state(&a).await.is_none()
    })
    .await;
    assert_eq!(
        a.metric("sluice_alert_events_total", &[("state", "resolved")])
            .await,
        0.0
    );
    assert_eq!(
        states(&hook.wait_for(2, Duration::from_secs(1)).await, "d-1"),
        ["firing", "resolved"]
    );
    assert_eq!(db.sql("SELECT count(*) FROM alert_states"), "0");
    a.shutdown().await;
    b.shutdown().await;
}
