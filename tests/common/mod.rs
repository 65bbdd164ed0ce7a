//! Shared helpers for integration tests: start the real Sluice (in-process on port 0, or the
//! real binary), post readings, read them back, and scrape metrics.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice::{Application, Settings};

/// A Sluice running in this process on a free port, with its own data directory.
pub struct TestApp {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    pub data_dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// Settings for a test: port 0 on loopback, a fresh temp data dir, quiet logs.
pub fn test_settings(data_dir: &Path) -> Settings {
    let mut s = Settings::default();
    s.server.listen = "127.0.0.1:0".parse().unwrap();
    s.storage.data_dir = data_dir.to_path_buf();
    s
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Starts Sluice with `tweak` applied to the test settings, and waits until it is ready.
pub async fn spawn_app_with(tweak: impl FnOnce(&mut Settings)) -> TestApp {
    let app = spawn_app_unready(tweak).await;
    app.wait_ready().await;
    app
}

/// Starts Sluice without waiting for readiness.
pub async fn spawn_app_unready(tweak: impl FnOnce(&mut Settings)) -> TestApp {
    let data_dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(data_dir.path());
    tweak(&mut settings);
    let app = Application::build(settings).await.expect("app builds");
    let addr = app.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until(async move {
        let _ = stopped.await;
    }));
    TestApp {
        addr,
        client: reqwest::Client::new(),
        data_dir,
        stop: Some(stop),
        task: Some(task),
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn wait_ready(&self) {
        wait_ready(&self.client, &self.url("/readyz")).await
    }

    /// POSTs a JSON body to /v1/readings.
    pub async fn post_json(&self, body: &Value) -> reqwest::Response {
        self.post_raw("application/json", body.to_string().into_bytes())
            .await
    }

    pub async fn post_raw(&self, content_type: &str, body: Vec<u8>) -> reqwest::Response {
        self.client
            .post(self.url("/v1/readings"))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("request sent")
    }

    /// `(seq)` of every stored reading of `device`, via the query API.
    pub async fn stored_seqs(&self, device: &str) -> BTreeSet<u64> {
        stored_seqs(&self.client, &self.url(""), device).await
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let res = self.client.get(self.url(path)).send().await.unwrap();
        let status = res.status().as_u16();
        let body = res.json::<Value>().await.unwrap_or(Value::Null);
        (status, body)
    }

    /// The text of `GET /metrics`.
    pub async fn scrape(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics body")
    }

    /// Value of one sample from /metrics, e.g. `metric("sluice_readings_rejected_total", &[("reason","malformed")])`.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.scrape().await, name, labels)
    }

    /// Graceful shutdown; returns what `run_until` returned.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take().unwrap().await.unwrap()
    }
}

/// Sums samples of `name` whose labels include all of `labels`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            let ok = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            ok.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Polls `url` until it answers 200, for up to 10 s.
pub async fn wait_ready(client: &reqwest::Client, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(r) = client.get(url).send().await {
            if r.status().is_success() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{url} not ready within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `cond` until it is true, for up to `within`.
pub async fn wait_until<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every stored seq of `device`, paging through the query API.
pub async fn stored_seqs(client: &reqwest::Client, base: &str, device: &str) -> BTreeSet<u64> {
    stored_seq_list(client, base, device)
        .await
        .into_iter()
        .collect()
}

/// Every stored seq of `device` in the store's order, repeats kept (so "stored exactly once"
/// can be checked), following `next` from page to page. Empty for an unknown device.
pub async fn stored_seq_list(client: &reqwest::Client, base: &str, device: &str) -> Vec<u64> {
    let mut seqs = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{base}/v1/devices/{device}/readings?limit=10000");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let res = client.get(url).send().await.expect("query sent");
        if res.status() == 404 {
            return seqs;
        }
        assert!(res.status().is_success(), "query failed: {}", res.status());
        let body: Value = res.json().await.unwrap();
        seqs.extend(
            body["readings"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["seq"].as_u64().expect("seq")),
        );
        match body["next"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return seqs,
        }
    }
}

/// A reading for `device` with `seq`.
pub fn reading(device: &str, seq: u64) -> Value {
    json!({"device_id": device, "seq": seq, "metrics": {"temperature": 20.0 + seq as f64 / 10.0, "ok": true}})
}

/// The real `sluice` binary, started with env overrides; stderr is scanned for its address.
pub struct SluiceProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl SluiceProcess {
    pub fn start(data_dir: &Path, env: &[(&str, String)]) -> Self {
        let dir = data_dir.to_string_lossy().into_owned();
        // The caller's values come last, so they win.
        let mut all = vec![
            ("SLUICE__STORAGE__DATA_DIR", dir),
            ("RUST_LOG", "info".into()),
        ];
        all.extend(env.iter().cloned());
        let mut cmd = sluice_command(&all);
        let mut child = cmd.spawn().expect("sluice binary starts");
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(i) = line.find("addr=") {
                    let addr = line[i + 5..].split_whitespace().next().unwrap_or("");
                    let _ = tx.send(addr.parse::<SocketAddr>());
                }
                log2.lock().unwrap().push(line);
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("sluice printed its address")
            .expect("address parses");
        Self { child, addr, log }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig)
            .expect("signal sent");
    }

    /// Waits for exit, up to `within`.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "sluice did not exit within {within:?}; log:\n{}",
                    self.log.lock().unwrap().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for SluiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn temp_path(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// The next text message of a WebSocket, as JSON, skipping pings and pongs. Panics on close,
/// on an error, on another kind of message, or when none comes `within`.
pub async fn next_ws_json<S>(ws: &mut S, within: Duration) -> Value
where
    S: futures_util::Stream<
            Item = Result<
                tokio_tungstenite::tungstenite::Message,
                tokio_tungstenite::tungstenite::Error,
            >,
        > + Unpin,
{
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        let msg = tokio::time::timeout(within, ws.next())
            .await
            .unwrap_or_else(|_| panic!("a message within {within:?}"))
            .expect("stream open")
            .expect("no error");
        match msg {
            Message::Text(t) => return serde_json::from_str(&t).expect("JSON"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected message: {other:?}"),
        }
    }
}

/// Runs the real `sluice` binary with `env` (over a cleared environment, on port 0) until it
/// exits, for up to `within`; kills it after that. Returns its exit code (`None` when it had
/// to be killed, i.e. it did not stop by itself) and its stderr.
pub fn run_sluice_to_exit(env: &[(&str, String)], within: Duration) -> (Option<i32>, String) {
    let mut child = sluice_command(env).spawn().expect("sluice binary starts");
    let mut stderr = child.stderr.take().unwrap();
    // Read to the end on a thread of its own, so the child never blocks on a full pipe.
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        text
    });
    let deadline = Instant::now() + within;
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (code, reader.join().unwrap_or_default())
}

/// The real `sluice` binary with a clean environment: `PATH`, a free loopback port, stdin and
/// stdout closed, stderr piped, then `env`.
fn sluice_command(env: &[(&str, String)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SLUICE__SERVER__LISTEN", "127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// One value of `name{labels}` scraped from `{base}/metrics` (0 when absent).
pub async fn scrape_metric(
    client: &reqwest::Client,
    base: &str,
    name: &str,
    labels: &[(&str, &str)],
) -> f64 {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("metrics text");
    metric_value(&text, name, labels)
}

/// The Python of a venv `scripts/test` makes under `~/.cache/sluice/<venv>` (or `$var`), for
/// tests that drive client libraries this team did not write. Panics, saying how to get it,
/// when it is missing.
pub fn venv_python(var: &str, venv: &str, what: &str) -> PathBuf {
    let python = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(|| PathBuf::from("/root/.cache"));
        cache.join("sluice").join(venv).join("bin/python")
    });
    assert!(
        python.exists(),
        "{} is missing: run scripts/test, which creates the venv with {what} (or set {var} \
         to a Python that has it)",
        python.display()
    );
    python
}

/// Runs `tests/clients/<script>` with the clients venv's Python (libraries this team did not
/// write, from `tests/clients/requirements.txt`) and `args`; its stdout is JSON. Panics with
/// the script's stderr when it fails.
pub fn run_client_script(script: &str, args: &[&str]) -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(script);
    let python = venv_python(
        "SLUICE_CLIENTS_PYTHON",
        "venv-clients",
        "the client libraries of tests/clients/requirements.txt",
    );
    let out = std::process::Command::new(python)
        .arg(path)
        .args(args)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "{script} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON from the client script")
}

/// The bytes of a hex string a client script printed.
pub fn unhex(v: &serde_json::Value) -> Vec<u8> {
    let s = v.as_str().expect("hex");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit"))
        .collect()
}

/// A tiny deterministic generator (xorshift64), seeded from the clock and printed, so a failing
/// randomised run can be replayed with `SLUICE_TEST_SEED=<seed>`.
pub struct Rng(u64);

impl Rng {
    /// Seeded from `SLUICE_TEST_SEED`, else the clock; prints the seed to stderr.
    pub fn new() -> Self {
        let seed = std::env::var("SLUICE_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
                    | 1
            });
        eprintln!("SLUICE_TEST_SEED={seed}");
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}
