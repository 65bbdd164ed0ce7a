//! Test helpers for MQTT: a private Mosquitto per test, and real MQTT clients (rumqttc) to
//! publish and to watch dead letters.
//!
//! Each [`Mosquitto`] runs the Debian binary (`/usr/sbin/mosquitto`, package `mosquitto`) with
//! its own config file on a free port bound to 127.0.0.1, and is killed on drop. The system
//! broker on 1883 is never used.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The Debian broker binary.
pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// A unique client id for this test process.
pub fn client_id(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A free TCP port on 127.0.0.1 (free when asked; the broker binds it right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A private Mosquitto.
pub struct Mosquitto {
    /// The port it listens on, kept across restarts.
    pub port: u16,
    /// Holds the config, the persistence file and the log.
    dir: tempfile::TempDir,
    /// The running broker, if any.
    child: Option<Child>,
}

impl Mosquitto {
    /// Starts a broker. `extra` is appended to its config (e.g. `max_inflight_messages 50`).
    /// With `persistence`, it keeps sessions and queued messages across [`Mosquitto::restart`].
    pub fn start(persistence: bool, extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        // Mosquitto started as root drops privileges; let it write its persistence file.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
                .expect("chmod tempdir");
        }
        let mut broker = Mosquitto {
            port: 0,
            dir,
            child: None,
        };
        let mut last_err = String::new();
        // The port is free when picked; another process may still take it first, so retry.
        for _ in 0..5 {
            broker.port = free_port();
            let mut conf = format!(
                "listener {} 127.0.0.1\nallow_anonymous true\n\
                 # Never drop queued QoS 1 messages in tests: the broker's own queue limit\n\
                 # would otherwise lose what the publisher had PUBACKed.\n\
                 max_queued_messages 0\n",
                broker.port
            );
            if persistence {
                conf.push_str(&format!(
                    "persistence true\npersistence_location {}/\n",
                    broker.dir.path().display()
                ));
            }
            conf.push_str(extra);
            conf.push('\n');
            std::fs::write(broker.conf(), conf).expect("write conf");
            match broker.spawn() {
                Ok(()) => return broker,
                Err(e) => last_err = e,
            }
        }
        panic!("mosquitto did not start: {last_err}");
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("mosquitto.conf")
    }

    /// Starts the binary and waits until it accepts connections.
    fn spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("mosquitto.log"))
            .map_err(|e| e.to_string())?;
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(self.conf())
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run {MOSQUITTO} (apt-get install mosquitto): {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!("exited with {status}: {}", self.log()));
            }
            if Instant::now() > deadline {
                return Err(format!("not listening after 10s: {}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// `mqtt://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Stops the broker gracefully (SIGTERM, which also writes its persistence file) and waits
    /// for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = child.wait();
        }
    }

    /// Stops and starts the broker again on the same port with the same config.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => panic!("mosquitto restart: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a test client's event loop reports.
#[derive(Debug)]
enum ClientEvent {
    Connected,
    Sent(u16),
    Acked(u16),
    Message(String, Vec<u8>),
    Lost,
}

/// A real MQTT client (rumqttc, clean session) whose event loop runs in its own task and
/// reconnects by itself.
pub struct TestClient {
    /// Publish / subscribe handle.
    pub client: AsyncClient,
    events: mpsc::UnboundedReceiver<ClientEvent>,
    task: JoinHandle<()>,
}

impl TestClient {
    /// Connects to `port` and waits for the CONNACK.
    pub async fn connect(port: u16, id: &str) -> Self {
        let mut options = MqttOptions::new(id, "127.0.0.1", port);
        options
            .set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(4 << 20, 4 << 20)
            .set_inflight(200);
        let (client, mut eventloop) = AsyncClient::new(options, 1000);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let ev = match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => ClientEvent::Connected,
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => ClientEvent::Sent(pkid),
                    Ok(Event::Incoming(Packet::PubAck(a))) => ClientEvent::Acked(a.pkid),
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        ClientEvent::Message(p.topic, p.payload.to_vec())
                    }
                    Ok(_) => continue,
                    Err(_) => {
                        // Pace reconnect attempts while the broker is down.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        ClientEvent::Lost
                    }
                };
                if tx.send(ev).is_err() {
                    return;
                }
            }
        });
        let mut c = TestClient {
            client,
            events,
            task,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(deadline.into(), c.events.recv()).await {
                Ok(Some(ClientEvent::Connected)) => return c,
                Ok(Some(_)) => {}
                _ => panic!("test client {id} could not connect to port {port}"),
            }
        }
    }

    /// Publishes at QoS 1 and waits for the broker's PUBACK. `false` if it did not come in
    /// time or the connection was lost meanwhile (the caller may retry).
    pub async fn publish_acked(&mut self, topic: &str, payload: Vec<u8>) -> bool {
        while self.events.try_recv().is_ok() {}
        if self
            .client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .is_err()
        {
            return false;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        let mut pkid = None;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                // pkid 0 is a QoS 0 publish sent earlier.
                Ok(Some(ClientEvent::Sent(p))) if pkid.is_none() && p != 0 => pkid = Some(p),
                Ok(Some(ClientEvent::Acked(p))) if Some(p) == pkid => return true,
                Ok(Some(ClientEvent::Lost)) => return false,
                Ok(Some(_)) => {}
                _ => return false,
            }
        }
    }

    /// Publishes every message at QoS 1 (pipelined) and waits until the broker has PUBACKed
    /// them all. For runs without broker faults.
    pub async fn publish_all(&mut self, messages: Vec<(String, Vec<u8>)>) {
        let n = messages.len();
        for (topic, payload) in messages {
            self.client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .expect("queue publish");
        }
        let mut acked = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while acked < n {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(ClientEvent::Acked(_))) => acked += 1,
                Ok(Some(ClientEvent::Lost)) => panic!("publisher lost its connection"),
                Ok(Some(_)) => {}
                _ => panic!("broker PUBACKed only {acked} of {n} messages"),
            }
        }
    }

    /// Publishes at QoS 0 (no ack).
    pub async fn publish_qos0(&self, topic: &str, payload: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtMostOnce, false, payload)
            .await
            .expect("queue publish");
    }

    /// Subscribes at QoS 1 and waits until the broker has confirmed it.
    pub async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("queue subscribe");
        // The SUBACK is not forwarded; a QoS 1 round trip through the broker after it proves
        // the subscription is in place (the broker handles one client's packets in order).
        assert!(
            self.publish_acked("sluice-test/ping", b"ping".to_vec())
                .await,
            "subscribe round trip"
        );
    }

    /// Collects messages until `n` have arrived (keyed by topic, in arrival order), or panics at
    /// the deadline.
    pub async fn messages(&mut self, n: usize, within: Duration) -> HashMap<String, Vec<Vec<u8>>> {
        let mut out: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
        let mut got = 0;
        let deadline = tokio::time::Instant::now() + within;
        while got < n {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(ClientEvent::Message(topic, payload))) => {
                    got += 1;
                    out.entry(topic).or_default().push(payload);
                }
                Ok(Some(_)) => {}
                _ => panic!("only {got} of {n} messages arrived: {out:?}"),
            }
        }
        out
    }
}

impl Drop for TestClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The Debian publishing client (package `mosquitto-clients`).
pub const MOSQUITTO_PUB: &str = "/usr/bin/mosquitto_pub";

/// Runs `mosquitto_pub -h 127.0.0.1 -p <port> -q 1 -t <topic> -l <args…>`, one message per
/// payload (stdin, one per line), and returns whether the broker took them all: a refused
/// connection (bad credentials, TLS) exits non-zero. `args` adds e.g. `-u`/`-P` or `--cafile`.
pub fn mosquitto_pub(port: u16, args: &[&str], topic: &str, payloads: &[Vec<u8>]) -> bool {
    use std::io::Write;
    let mut child = Command::new(MOSQUITTO_PUB)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-q",
            "1",
            "-t",
            topic,
            "-l",
        ])
        .args(args)
        .arg("-i")
        .arg(client_id("pub"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run {MOSQUITTO_PUB} (apt-get install mosquitto-clients): {e}")
        });
    let mut stdin = child.stdin.take().expect("stdin");
    for p in payloads {
        assert!(!p.contains(&b'\n'), "one payload per line");
        stdin
            .write_all(p)
            .and_then(|()| stdin.write_all(b"\n"))
            .expect("write to mosquitto_pub");
    }
    drop(stdin);
    child.wait().expect("mosquitto_pub exits").success()
}
