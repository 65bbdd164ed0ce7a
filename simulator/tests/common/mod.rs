//! Helpers for the simulator's integration tests: a real Sluice in this process (port 0, temp
//! data dir), a private mosquitto, and the simulator's own command line.
#![allow(dead_code)] // each test binary uses a different subset

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sluice::{Application, Settings};
use sluice_sim::{Cli, RunConfig, Summary};
use tokio_util::sync::CancellationToken;

/// A Sluice running in this process.
pub struct Sluice {
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    /// Removes the data directory when the test ends (None when borrowed from another instance).
    _dir: Option<tempfile::TempDir>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// Starts Sluice on a free port with a fresh data dir, with `tweak` applied, and waits until
/// it is ready.
pub async fn spawn_sluice(tweak: impl FnOnce(&mut Settings)) -> Sluice {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let mut s = start("127.0.0.1:0".parse().unwrap(), &path, tweak).await;
    s._dir = Some(dir);
    s
}

/// Starts Sluice on `addr` with the data dir `data_dir` (to restart one).
pub async fn start(addr: SocketAddr, data_dir: &Path, tweak: impl FnOnce(&mut Settings)) -> Sluice {
    let mut settings = Settings::default();
    settings.server.listen = addr;
    settings.storage.data_dir = data_dir.to_path_buf();
    tweak(&mut settings);
    let app = Application::build(settings).await.expect("sluice builds");
    let addr = app.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until(async move {
        let _ = stopped.await;
    }));
    let s = Sluice {
        addr,
        data_dir: data_dir.to_path_buf(),
        _dir: None,
        stop: Some(stop),
        task: Some(task),
    };
    s.wait_ready().await;
    s
}

impl Sluice {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn wait_ready(&self) {
        let client = reqwest::Client::new();
        let url = format!("{}/readyz", self.url());
        wait_until(Duration::from_secs(10), "sluice ready", || async {
            client
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
    }

    /// Sum of the samples of `name` whose labels include `labels`.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = reqwest::get(format!("{}/metrics", self.url()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        metric_value(&text, name, labels)
    }

    /// Graceful shutdown; the data dir stays (the TempDir is handed back).
    pub async fn shutdown(mut self) -> Option<tempfile::TempDir> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task
            .take()
            .unwrap()
            .await
            .unwrap()
            .expect("clean shutdown");
        self._dir.take()
    }
}

/// Sums samples of `name` whose labels include all of `labels`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            if n != name {
                return None;
            }
            labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// Polls `cond` until it holds, for up to `within`.
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

/// The simulator's configuration from its command line (without the program name).
pub fn sim_config(args: &[&str]) -> RunConfig {
    let mut v = vec!["sluice-sim", "--quiet"];
    v.extend_from_slice(args);
    let cli = <Cli as clap::Parser>::try_parse_from(v).expect("valid command line");
    cli.run.resolve().expect("valid options")
}

/// Runs the simulator with `args` to the end.
pub async fn sim(args: &[&str]) -> Summary {
    let cfg = sim_config(args);
    let summary = sluice_sim::run(cfg.clone(), CancellationToken::new())
        .await
        .expect("the run completes");
    println!("{}", summary.table(&cfg));
    summary
}

/// A free TCP port on loopback (bound, read, released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A private mosquitto on a free port; killed when dropped.
pub struct Mosquitto {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    pub fn start() -> Self {
        let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("mosquitto is installed (scripts/test installs it)");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 max_queued_messages 0\nmax_inflight_messages 0\n"
            ),
        )
        .unwrap();
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto starts");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            port,
            _dir: dir,
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A subscriber on the broker at `127.0.0.1:port` to `filter`, subscribed (SUBACK received)
/// when this returns: each message arrives on the receiver as (topic, payload). Abort the
/// handle when done.
pub async fn subscribe(
    port: u16,
    client_id: &str,
    filter: &str,
) -> (
    tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    tokio::task::JoinHandle<()>,
) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut events) = AsyncClient::new(opts, 100);
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        // Keeps the client (and so the connection) alive with the task.
        let _client = client;
        let mut subscribed_tx = Some(subscribed_tx);
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(t) = subscribed_tx.take() {
                        let _ = t.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
                }
                Ok(_) => {}
                Err(e) => panic!("subscriber: {e}"),
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), subscribed)
        .await
        .expect("SUBACK within 10 s")
        .unwrap();
    (rx, task)
}
