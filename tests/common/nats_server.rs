//! Test helpers for NATS: a private `nats-server` per test (Debian's package, with JetStream
//! and its store in a temp dir) on a free port, stopped on drop, and a reader of a JetStream
//! stream. The machine's own server on 4222 is never used.

#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures_util::StreamExt;

/// The Debian binary.
pub const NATS_SERVER: &str = "/usr/sbin/nats-server";

/// The stream the tests create over Sluice's default subjects.
pub const STREAM: &str = "READINGS";

/// A private nats-server.
pub struct NatsServer {
    /// The port, kept across restarts.
    pub port: u16,
    /// JetStream's store.
    dir: tempfile::TempDir,
    /// The running server, if any.
    child: Option<Child>,
    /// Extra configuration lines (a config file is written when there are any).
    conf: String,
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl NatsServer {
    /// Starts a server with JetStream on a free port.
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// Starts a server with JetStream and extra configuration lines, e.g. `max_payload: 4096`.
    pub fn start_with(conf: &str) -> Self {
        let mut s = NatsServer {
            port: free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
            child: None,
            conf: conf.to_owned(),
        };
        s.restart();
        s
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts it again on the same port and store (after [`NatsServer::stop`]).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut cmd = Command::new(NATS_SERVER);
        if !self.conf.is_empty() {
            let path = self.dir.path().join("nats.conf");
            std::fs::write(&path, &self.conf).expect("config written");
            cmd.arg("-c").arg(path);
        }
        let child = cmd
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts (apt-get install nats-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops it gracefully (SIGTERM: JetStream flushes its store) and waits.
    ///
    /// Not SIGKILL: nats-server 2.9 writes its stream files lazily, so a killed server may
    /// lose or reorder messages it had acknowledged (Jepsen's NATS analysis, 2025). That is
    /// the server's durability, which Sluice cannot fix; these tests check Sluice's.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.wait();
        }
    }

    /// A client and JetStream context.
    pub async fn jetstream(&self) -> jetstream::Context {
        let client = async_nats::connect(self.url()).await.expect("connect");
        jetstream::new(client)
    }

    /// Creates the stream `READINGS` over `<prefix>.>` with a two-minute duplicate window.
    pub async fn create_stream(&self, prefix: &str) {
        self.jetstream()
            .await
            .create_stream(jetstream::stream::Config {
                name: STREAM.into(),
                subjects: vec![format!("{prefix}.>")],
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .expect("stream created");
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One message of the stream: its subject, `Nats-Msg-Id`, and JSON payload.
#[derive(Debug, Clone)]
pub struct StreamMessage {
    pub subject: String,
    pub msg_id: String,
    pub body: serde_json::Value,
}

/// How many messages the stream holds.
pub async fn stream_len(js: &jetstream::Context) -> u64 {
    match js.get_stream(STREAM).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// Every message of the stream, in stream order.
pub async fn read_stream(js: &jetstream::Context) -> Vec<StreamMessage> {
    let stream = js.get_stream(STREAM).await.expect("stream");
    let want = stream_len(js).await as usize;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            ack_policy: jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut out = Vec::with_capacity(want);
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.len() < want {
        assert!(Instant::now() < deadline, "read {} of {want}", out.len());
        let mut batch = consumer
            .fetch()
            .max_messages(1000)
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .expect("fetch");
        while let Some(m) = batch.next().await {
            let m = m.expect("message");
            let msg_id = m
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default();
            out.push(StreamMessage {
                subject: m.subject.to_string(),
                msg_id,
                body: serde_json::from_slice(&m.payload).expect("JSON payload"),
            });
        }
    }
    out
}
