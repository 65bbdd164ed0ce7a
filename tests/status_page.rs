//! The status page (SPEC §14): `GET /`, `GET /static/…` and `GET /v1/status`.
//!
//! - In process: `/v1/status` against `/metrics` at the same moment, bad input, the assets.
//! - In a real browser: Debian's Chromium, driven by Playwright (`tests/browser/status_page.py`)
//!   against the real binary, which this test starts, loads, stops and restarts on the same
//!   port when the browser script asks. `scripts/test` installs Chromium and the Playwright
//!   venv; without them the browser test fails and says how to get them.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{metric_value, reading, spawn_app, wait_until, SluiceProcess, TestApp};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// Posts batches of readings from `devices` devices every `every` until `stop` is cancelled.
/// Returns how many readings were acknowledged.
fn start_load(
    base: String,
    devices: usize,
    every: Duration,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        let mut seq = 0u64;
        let mut acked = 0u64;
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return acked,
                _ = tick.tick() => {}
            }
            seq += 1;
            let batch: Vec<Value> = (0..devices)
                .map(|d| reading(&format!("load-{d}"), seq))
                .collect();
            if let Ok(res) = client
                .post(format!("{base}/v1/readings"))
                .json(&batch)
                .send()
                .await
            {
                if res.status().is_success() {
                    acked += devices as u64;
                }
            }
        }
    })
}

async fn status(app: &TestApp) -> Value {
    let (code, body) = app.get_json("/v1/status").await;
    assert_eq!(code, 200, "GET /v1/status: {body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_agrees_with_metrics_at_the_same_moment() {
    let app = spawn_app().await;
    let stop = CancellationToken::new();
    let load = start_load(app.url(""), 20, Duration::from_millis(10), stop.clone());
    // A reading rejected and one duplicate, so those counters move too.
    let bad = app
        .post_json(&json!([{"device_id": "x", "metrics": {}}]))
        .await;
    assert_eq!(bad.status(), 422);
    for _ in 0..2 {
        let r = app.post_json(&json!([reading("dup-1", 1)])).await;
        assert_eq!(r.status(), 200);
    }
    // The first call opens the window; rates need a second call ≥ 0.9 s later.
    assert!(status(&app).await["window_seconds"].is_null());
    wait_until(
        Duration::from_secs(5),
        "a status with a rate window",
        || async { status(&app).await["window_seconds"].is_number() },
    )
    .await;

    let before = app.scrape().await;
    let s = status(&app).await;
    let after = app.scrape().await;
    stop.cancel();
    assert!(load.await.unwrap() > 0, "the load got no acknowledgement");

    // Every counter lies between the scrape before and the scrape after: the same handles.
    let between = |name: &str, labels: &[(&str, &str)], got: &Value| {
        let lo = metric_value(&before, name, labels);
        let hi = metric_value(&after, name, labels);
        let got = got
            .as_f64()
            .unwrap_or_else(|| panic!("{name}{labels:?}: not a number in /v1/status: {got}"));
        assert!(
            lo <= got && got <= hi,
            "{name}{labels:?}: /v1/status says {got}, /metrics said {lo} before and {hi} after"
        );
    };
    for t in ["http", "ws", "mqtt"] {
        let total = &s["transports"][t]["total"];
        let l = [("transport", t)];
        between("sluice_readings_received_total", &l, &total["received"]);
        between("sluice_readings_accepted_total", &l, &total["accepted"]);
        between("sluice_readings_duplicate_total", &l, &total["duplicate"]);
        between("sluice_readings_rejected_total", &l, &total["rejected"]);
        between("sluice_readings_shed_total", &l, &total["shed"]);
        between(
            "sluice_readings_rate_limited_total",
            &l,
            &total["rate_limited"],
        );
    }
    let http = &s["transports"]["http"];
    assert!(http["total"]["accepted"].as_u64().unwrap() > 0);
    assert!(http["total"]["rejected"].as_u64().unwrap() >= 1);
    assert!(http["total"]["duplicate"].as_u64().unwrap() >= 1);
    assert!(
        http["per_second"]["accepted"].as_f64().unwrap() > 0.0,
        "accepted/s under load: {http}"
    );
    assert_eq!(s["transports"]["ws"]["per_second"]["accepted"], 0.0);
    between(
        "sluice_store_commit_seconds_count",
        &[],
        &s["commits"]["total"],
    );
    let (p50, p99) = (
        s["commits"]["p50_seconds"]
            .as_f64()
            .expect("p50 under load"),
        s["commits"]["p99_seconds"]
            .as_f64()
            .expect("p99 under load"),
    );
    assert!(0.0 < p50 && p50 <= p99, "p50 {p50}, p99 {p99}");
    between(
        "sluice_store_errors_total",
        &[],
        &s["store"]["errors_total"],
    );

    // Gauges that do not move while nothing connects are equal.
    for stage in ["admission", "store"] {
        let l = [("stage", stage)];
        assert_eq!(
            s["queues"][stage]["capacity"].as_f64(),
            Some(metric_value(&after, "sluice_pipeline_queue_capacity", &l)),
            "capacity of {stage}"
        );
        let fill = s["queues"][stage]["fill"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&fill), "{stage} fill {fill}");
    }
    for kind in ["device", "live"] {
        assert_eq!(
            s["connections"][format!("ws_{kind}")].as_f64(),
            Some(metric_value(
                &after,
                "sluice_ws_connections",
                &[("kind", kind)]
            )),
            "{kind} connections"
        );
    }
    assert_eq!(
        s["store"]["journal_capacity_readings"].as_f64(),
        Some(metric_value(
            &after,
            "sluice_store_journal_capacity_readings",
            &[]
        ))
    );
    assert_eq!(s["store"]["up"], true);
    assert_eq!(s["ready"], true);
    assert_eq!(
        s["event_loop"]["workers"].as_f64(),
        Some(metric_value(&after, "sluice_runtime_workers", &[]))
    );
    let busy = s["event_loop"]["busy_ratio"].as_f64().expect("busy ratio");
    assert!((0.0..=1.0).contains(&busy), "busy ratio {busy}");
    assert!(s["event_loop"]["lag_p99_seconds"].as_f64().is_some());
    // Open HTTP connections: at least the one this request came on.
    assert!(s["connections"]["http"].as_u64() >= Some(1), "{s}");
    assert!(s["alerts"].is_null());

    // At rest, nothing moves between the scrapes, so every figure is exactly what /metrics
    // says: a field read from the wrong series cannot hide in the movement.
    let before = app.scrape().await;
    let s = status(&app).await;
    let after = app.scrape().await;
    for t in ["http", "ws", "mqtt"] {
        let l = [("transport", t)];
        for (field, name) in [
            ("received", "sluice_readings_received_total"),
            ("accepted", "sluice_readings_accepted_total"),
            ("duplicate", "sluice_readings_duplicate_total"),
            ("rejected", "sluice_readings_rejected_total"),
            ("shed", "sluice_readings_shed_total"),
        ] {
            let (lo, hi) = (
                metric_value(&before, name, &l),
                metric_value(&after, name, &l),
            );
            assert_eq!(lo, hi, "{name}{l:?} moved at rest");
            assert_eq!(
                s["transports"][t]["total"][field].as_f64(),
                Some(lo),
                "{t} {field} at rest against {name}"
            );
        }
    }
    assert_eq!(
        s["commits"]["total"].as_f64(),
        Some(metric_value(
            &after,
            "sluice_store_commit_seconds_count",
            &[]
        ))
    );
    for stage in ["admission", "store"] {
        assert_eq!(
            s["queues"][stage]["depth"].as_f64(),
            Some(metric_value(
                &after,
                "sluice_pipeline_queue_depth",
                &[("stage", stage)]
            )),
            "depth of {stage} at rest"
        );
    }
    assert_eq!(
        s["store"]["journal_readings"].as_f64(),
        Some(metric_value(&after, "sluice_store_journal_readings", &[]))
    );

    // Devices come from device state: the same count as GET /v1/devices.
    let (_, devices) = app.get_json("/v1/devices").await;
    assert_eq!(
        s["devices"]["count"].as_u64(),
        Some(devices["devices"].as_array().unwrap().len() as u64)
    );
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_new_device_is_listed_first_with_its_latest_values() {
    let app = spawn_app().await;
    for d in ["old-1", "old-2"] {
        assert_eq!(app.post_json(&json!([reading(d, 1)])).await.status(), 200);
    }
    // The first call seeds the list from device state (newest first) and starts following.
    let s = status(&app).await;
    assert_eq!(s["devices"]["count"], 2);
    let ids = |s: &Value| -> Vec<String> {
        s["devices"]["recent"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["device_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let mut seeded = ids(&s);
    seeded.sort();
    assert_eq!(seeded, ["old-1", "old-2"], "{s}");

    let r =
        json!([{"device_id": "new-1", "seq": 7, "metrics": {"temperature": 21.5, "door": true}}]);
    assert_eq!(app.post_json(&r).await.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(3);
    let s = loop {
        let s = status(&app).await;
        if ids(&s).first().map(String::as_str) == Some("new-1") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "new-1 not listed first within 3 s of its ack: {}",
            s["devices"]
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(s["devices"]["count"], 3);
    let first = &s["devices"]["recent"][0];
    assert_eq!(first["metrics"], json!({"temperature": 21.5, "door": true}));
    assert!(first["last_seen"].as_str().unwrap().ends_with('Z'));
    assert_eq!(ids(&s).len(), 3, "no repeats: {:?}", ids(&s));
    app.shutdown().await.unwrap();
}

/// Sends a GET of `target` as written (an HTTP client would normalise `..` away), and
/// returns the status, the lower-cased head and the body.
fn raw_get(addr: std::net::SocketAddr, target: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {target} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, head.to_ascii_lowercase(), body.to_owned())
}

#[tokio::test]
async fn the_page_and_its_assets_are_built_in_and_bad_paths_are_refused() {
    let app = spawn_app().await;
    let get = |path: &str| app.client.get(app.url(path)).send();

    let page = get("/").await.unwrap();
    assert_eq!(page.status(), 200);
    let headers = page.headers().clone();
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    assert!(headers["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("default-src 'self'"));
    let html = page.text().await.unwrap();
    assert!(html.contains("<title>Sluice status</title>"));
    for (path, kind) in [
        ("/static/app.js", "text/javascript"),
        ("/static/style.css", "text/css"),
        ("/static/vendor/uplot/uPlot.iife.min.js", "text/javascript"),
        ("/static/vendor/uplot/uPlot.min.css", "text/css"),
        ("/static/vendor/uplot/LICENSE", "text/plain"),
    ] {
        let res = get(path).await.unwrap();
        assert_eq!(res.status(), 200, "{path}");
        let ct = res.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(ct.starts_with(kind), "{path}: {ct}");
        assert!(!res.bytes().await.unwrap().is_empty(), "{path} is empty");
        assert!(
            html.contains(path) || path.ends_with("LICENSE"),
            "{path} unused"
        );
    }

    // Each refusal is a problem document that says what was wrong.
    let problem = |code: u16, head: &str, body: &str, says: &str, target: &str| {
        assert!(
            head.contains("content-type: application/problem+json"),
            "{target}: {head}"
        );
        let doc: Value = serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("{target}: not a problem document ({e}): {body}"));
        assert_eq!(doc["status"], code, "{target}: {doc}");
        let detail = doc["detail"].as_str().unwrap();
        assert!(detail.contains(says), "{target}: {detail}");
    };
    for (target, code, says) in [
        ("/static/../Cargo.toml", 400, "`..`"),
        ("/static/%2e%2e/Cargo.toml", 400, "`..`"),
        ("/static/vendor/..%2f..%2fCargo.toml", 400, "`..`"),
        ("/static/./app.js", 400, "`..` or `.`"),
        ("/static/vendor//uplot/LICENSE", 400, "empty segment"),
        ("/static/vendor%5c..%5capp.js", 400, "`..`"),
        ("/static/nope.js", 404, "no static file `nope.js`"),
        ("/static/vendor/uplot/README.md", 404, "no static file"),
        (
            "/v1/status?verbose=1",
            400,
            "unknown query parameter `verbose`",
        ),
        ("/?token=x&y", 400, "unknown query parameter `token`"),
        ("/static/app.js?v=2", 400, "unknown query parameter `v`"),
    ] {
        let addr = app.addr;
        let (got, head, body) = tokio::task::spawn_blocking(move || raw_get(addr, target))
            .await
            .unwrap();
        assert_eq!(got, code, "{target}: {body}");
        problem(code, &head, &body, says, target);
    }
    // The refusals are counted under their route templates, never under the raw path.
    let metrics = app.scrape().await;
    assert!(metrics.contains("route=\"/static/{*path}\""), "{metrics}");
    assert!(!metrics.contains("Cargo.toml"));
    app.shutdown().await.unwrap();
}

/// The Python of the venv `scripts/test` creates, with Playwright in it.
fn browser_python() -> PathBuf {
    let python = common::venv_python("SLUICE_BROWSER_PYTHON", "venv-browser", "Playwright");
    let chromium = std::env::var("SLUICE_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "{chromium} is missing: run scripts/test, which installs Debian's chromium"
    );
    python
}

/// A port free now, so Sluice can be restarted on the same one.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_in_chromium_shows_load_devices_the_tail_and_survives_a_restart() {
    let python = browser_python();
    let data_dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let env = [("SLUICE__SERVER__LISTEN", format!("127.0.0.1:{port}"))];
    let start = || {
        let p = tokio::task::block_in_place(|| SluiceProcess::start(data_dir.path(), &env));
        assert_eq!(
            p.addr.port(),
            port,
            "Sluice must come back on the same port"
        );
        p
    };
    let mut sluice = Some(start());
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    common::wait_ready(&client, &format!("{base}/readyz")).await;

    let artefacts = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("status-page");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser/status_page.py");
    let mut browser = Command::new(&python)
        .arg(&script)
        .arg("--url")
        .arg(&base)
        .arg("--artefacts")
        .arg(&artefacts)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let mut to_browser = browser.stdin.take().unwrap();
    let (tx, mut commands) = tokio::sync::mpsc::unbounded_channel();
    let stdout = browser.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let stderr = browser.stderr.take().unwrap();
    let said = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let said2 = said.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            said2.lock().unwrap().push(line);
        }
    });

    let deadline = Instant::now() + Duration::from_secs(120);
    let mut load: Option<(CancellationToken, tokio::task::JoinHandle<u64>)> = None;
    let mut seq = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match tokio::time::timeout(left, commands.recv()).await {
            Ok(Some(line)) => line,
            Ok(None) => break, // the script ended
            Err(_) => {
                let _ = browser.kill();
                panic!(
                    "the browser script did not finish within 120 s; it said:\n{}",
                    said.lock().unwrap().join("\n")
                );
            }
        };
        let Some(command) = line.strip_prefix('@') else {
            eprintln!("[browser stdout] {line}");
            continue;
        };
        let answer: Result<(), String> = match command.split_once(' ').unwrap_or((command, "")) {
            ("load", "on") => {
                let stop = CancellationToken::new();
                let task = start_load(base.clone(), 20, Duration::from_millis(20), stop.clone());
                load = Some((stop, task));
                Ok(())
            }
            ("load", "off") => match load.take() {
                Some((stop, task)) => {
                    stop.cancel();
                    let acked = task.await.unwrap();
                    if acked > 0 {
                        Ok(())
                    } else {
                        Err("the load got no acknowledgement".into())
                    }
                }
                None => Err("no load running".into()),
            },
            ("post", device) => {
                seq += 1;
                let body = json!([{"device_id": device, "seq": seq, "metrics": {"temperature": 21.5, "door_open": false}}]);
                match client
                    .post(format!("{base}/v1/readings"))
                    .json(&body)
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 200 => Ok(()),
                    Ok(r) => Err(format!("POST answered {}", r.status())),
                    Err(e) => Err(format!("POST failed: {e}")),
                }
            }
            ("stop", _) => {
                let mut p = sluice.take().expect("Sluice is running");
                p.signal(nix::sys::signal::Signal::SIGTERM);
                let status = tokio::task::block_in_place(|| p.wait_exit(Duration::from_secs(30)));
                if status.success() {
                    Ok(())
                } else {
                    Err(format!("Sluice exited with {status}"))
                }
            }
            ("start", _) => {
                sluice = Some(start());
                common::wait_ready(&client, &format!("{base}/readyz")).await;
                Ok(())
            }
            _ => Err(format!("unknown command `{command}`")),
        };
        let reply = match &answer {
            Ok(()) => "ok\n".to_owned(),
            Err(why) => format!("error {why}\n"),
        };
        if to_browser.write_all(reply.as_bytes()).is_err() {
            break;
        }
        let _ = to_browser.flush();
    }
    let status = tokio::task::block_in_place(|| browser.wait()).unwrap();
    let said = said.lock().unwrap().join("\n");
    assert!(
        status.success(),
        "the status page failed in Chromium ({status}):\n{said}\n--- Sluice log (last 30 lines) ---\n{}",
        sluice
            .as_ref()
            .map(|p| {
                let log = p.log.lock().unwrap();
                log[log.len().saturating_sub(30)..].join("\n")
            })
            .unwrap_or_default()
    );
    assert!(said.contains("[browser] PASS"), "{said}");
    for shot in [
        "status-page.png",
        "status-page-phone.png",
        "status-page-after-restart.png",
    ] {
        let len = std::fs::metadata(artefacts.join(shot))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(
            len > 10_000,
            "screenshot {shot} missing or empty in {}",
            artefacts.display()
        );
    }
    eprintln!("screenshots in {}", artefacts.display());
}
