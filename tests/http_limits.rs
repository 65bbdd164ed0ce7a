//! Slow and idle HTTP clients, and the connection limit (issue 11, SPEC §3 and §8), against a
//! real Sluice on port 0 with short timeouts. The slow and idle clients are raw sockets, so
//! that what reaches the server is exactly the bytes written, when they are written.
//!
//! What Sluice does, and what each test checks:
//! - headers that do not complete within `server.request_timeout`: the connection is closed,
//!   with no answer (hyper's header-read timer);
//! - a body that does not complete within `server.request_timeout` after the headers: 408
//!   `urn:sluice:request-timeout`, then the connection is closed;
//! - a keep-alive connection idle for `server.keep_alive_timeout` (or `request_timeout`, if
//!   shorter): closed;
//! - past `server.max_connections`, a new connection waits in the listen backlog and is served
//!   once another closes; `sluice_http_connections` counts the open ones; an upgraded
//!   WebSocket leaves the count (it is bounded by `ws.max_connections`);
//! - at shutdown, idle connections close at once; one still sending headers is ended by the
//!   header-read timer or, if that comes later, at half of `server.shutdown_timeout`.
//!
//! Meanwhile valid readings posted on other connections are acked and stored.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

/// Slack for the server's timers to fire and the close to arrive, on a loaded 2-core machine.
const MARGIN: Duration = Duration::from_secs(3);

/// A raw client connection, split so that one task can write slowly while the test reads.
struct Raw {
    read: OwnedReadHalf,
    write: Option<OwnedWriteHalf>,
    /// Bytes read but not yet consumed by a parsed response.
    buf: Vec<u8>,
}

/// What a read that waits for the server to close saw.
#[derive(Debug, PartialEq)]
enum End {
    /// EOF, or a reset (the server closed with our unread bytes in its buffer).
    Closed,
    /// Still open when the wait ran out.
    Open,
}

/// One parsed HTTP response.
#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

impl Raw {
    async fn connect(app: &TestApp) -> Self {
        let (read, write) = TcpStream::connect(app.addr)
            .await
            .expect("TCP connects")
            .into_split();
        Self {
            read,
            write: Some(write),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        let write = self.write.as_mut().expect("write half kept");
        write.write_all(bytes).await.expect("bytes sent");
    }

    /// Hands the write half to a task that sends `bytes` one at a time, one every `every`,
    /// and stops at the first error (the server closed). A deliberately slow client.
    fn trickle(&mut self, bytes: Vec<u8>, every: Duration) -> JoinHandle<()> {
        let mut write = self.write.take().expect("write half kept");
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            for b in bytes {
                tick.tick().await;
                if write.write_all(&[b]).await.is_err() {
                    return;
                }
            }
        })
    }

    /// Reads more bytes; `Ok(0)` on EOF.
    async fn fill(&mut self) -> std::io::Result<usize> {
        let mut chunk = [0u8; 4096];
        let n = self.read.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// The next response, if it arrives within `within`.
    async fn response(&mut self, within: Duration) -> Option<Response> {
        tokio::time::timeout(within, self.read_response())
            .await
            .ok()
    }

    async fn read_response(&mut self) -> Response {
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            assert!(
                self.fill().await.expect("read") > 0,
                "closed before a response"
            );
        };
        let head = String::from_utf8(self.buf[..head_end].to_vec()).expect("ASCII head");
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .expect("a status line");
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.parse().expect("a length"))
            .expect("every answer here has a content-length");
        while self.buf.len() < head_end + len {
            assert!(self.fill().await.expect("read") > 0, "closed mid-body");
        }
        let body = self.buf[head_end..head_end + len].to_vec();
        self.buf.drain(..head_end + len);
        Response {
            status,
            headers,
            body,
        }
    }

    /// Waits up to `within` for the server to close the connection. Any byte that arrives
    /// instead is kept in `buf` for the caller to look at.
    async fn end(&mut self, within: Duration) -> End {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.fill()).await {
                Err(_) => return End::Open,
                Ok(Ok(0)) | Ok(Err(_)) => return End::Closed,
                Ok(Ok(_)) => continue,
            }
        }
    }
}

fn get(path: &str, close: bool) -> Vec<u8> {
    let connection = if close { "close" } else { "keep-alive" };
    format!("GET {path} HTTP/1.1\r\nHost: sluice\r\nConnection: {connection}\r\n\r\n").into_bytes()
}

fn post_readings(body: &Value) -> Vec<u8> {
    let body = body.to_string();
    format!(
        "POST /v1/readings HTTP/1.1\r\nHost: sluice\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Posts valid readings of one device, one request at a time on its own client, until
/// stopped. Returns the seqs that were acked with 200.
struct Poster {
    stop: Arc<AtomicBool>,
    task: JoinHandle<BTreeSet<u64>>,
}

impl Poster {
    fn start(app: &TestApp, device: &'static str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let url = app.url("/v1/readings");
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut acked = BTreeSet::new();
            let mut seq = 0;
            while !stopped.load(Ordering::Relaxed) {
                seq += 1;
                let sent = client
                    .post(&url)
                    .json(&json!([reading(device, seq)]))
                    .send()
                    .await;
                if let Ok(res) = sent {
                    if res.status() == 200 {
                        let body: Value = res.json().await.expect("ack body");
                        assert_eq!(body["accepted"], 1, "{body}");
                        acked.insert(seq);
                    }
                }
            }
            acked
        });
        Self { stop, task }
    }

    /// Stops posting and checks that every acked reading is stored (and nothing else).
    async fn finish(self, app: &TestApp, device: &str) {
        self.stop.store(true, Ordering::Relaxed);
        let acked = self.task.await.expect("poster");
        assert!(!acked.is_empty(), "the poster got no ack at all");
        let stored = stored(app, device).await;
        assert!(
            acked.is_subset(&stored),
            "acked but not stored: {:?}",
            acked.difference(&stored).collect::<Vec<_>>()
        );
        let max = *acked.iter().max().unwrap() + 1;
        assert!(
            stored.iter().all(|s| *s <= max),
            "stored what was never sent"
        );
    }
}

/// Starts Sluice and waits until it is ready, over raw connections that are closed after each
/// answer, so that no pooled client connection holds one of the few slots a test allows.
async fn spawn(tweak: impl FnOnce(&mut sluice::Settings)) -> TestApp {
    let app = spawn_app_unready(tweak).await;
    wait_until(Duration::from_secs(10), "Sluice to be ready", || async {
        let mut raw = Raw::connect(&app).await;
        raw.send(&get("/readyz", true)).await;
        matches!(raw.response(MARGIN).await, Some(r) if r.status == 200)
    })
    .await;
    app
}

/// `GET /metrics` on a connection of its own, closed after the answer. That connection is
/// one of those `sluice_http_connections` counts.
async fn scrape(app: &TestApp) -> String {
    let mut raw = Raw::connect(app).await;
    raw.send(&get("/metrics", true)).await;
    let res = raw.response(MARGIN).await.expect("metrics served");
    assert_eq!(res.status, 200);
    String::from_utf8(res.body).expect("UTF-8 metrics")
}

/// Waits until the only open HTTP connection is the scrape's own. A connection the client
/// has just closed may take a moment to leave the count.
async fn wait_for_no_other_connection(app: &TestApp) {
    wait_until(MARGIN, "the scrape's to be the only connection", || async {
        metric_value(&scrape(app).await, "sluice_http_connections", &[]) == 1.0
    })
    .await;
}

/// Every stored seq of `device`, on a client dropped afterwards.
async fn stored(app: &TestApp, device: &str) -> BTreeSet<u64> {
    stored_seqs(&reqwest::Client::new(), &app.url(""), device).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_closed_after_the_request_timeout() {
    let timeout = Duration::from_secs(1);
    let app = spawn(|s| {
        s.server.request_timeout = timeout;
        s.server.keep_alive_timeout = Duration::from_secs(30);
    })
    .await;
    let poster = Poster::start(&app, "steady-headers");

    // The client: a request line and a first header, then one header byte at a time,
    // each well within any per-read timeout. Twenty of them at once.
    let started = Instant::now();
    let mut slow = Vec::new();
    let mut tricklers = Vec::new();
    for _ in 0..20 {
        let mut raw = Raw::connect(&app).await;
        raw.send(b"POST /v1/readings HTTP/1.1\r\nHost: x\r\n").await;
        tricklers.push(raw.trickle(vec![b'a'; 200], Duration::from_millis(100)));
        slow.push(raw);
    }
    // And one that connects and sends nothing at all.
    let mut silent = Raw::connect(&app).await;
    for raw in slow.iter_mut().chain([&mut silent]) {
        assert_eq!(raw.end(timeout + MARGIN).await, End::Closed);
        assert!(
            raw.buf.is_empty(),
            "no answer is sent, the connection is closed"
        );
    }
    let took = started.elapsed();
    assert!(
        took >= timeout.mul_f64(0.9),
        "closed after {took:?}, before the timeout: something else closed it"
    );
    for t in tricklers {
        t.abort();
    }

    poster.finish(&app, "steady-headers").await;
    wait_for_no_other_connection(&app).await;
    app.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_gets_408_and_the_connection_is_closed() {
    let timeout = Duration::from_secs(1);
    let app = spawn(|s| {
        s.server.request_timeout = timeout;
        s.server.keep_alive_timeout = Duration::from_secs(30);
    })
    .await;
    let poster = Poster::start(&app, "steady-body");

    // Complete headers, then the body a byte every 100 ms: never a pause as long as the
    // timeout, so only a bound on the whole body stops it.
    let body = json!([reading("slow-body", 1)]).to_string().repeat(20);
    let mut raw = Raw::connect(&app).await;
    raw.send(
        format!(
            "POST /v1/readings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    let started = Instant::now();
    let trickler = raw.trickle(body.into_bytes(), Duration::from_millis(100));
    let res = raw
        .response(timeout + MARGIN)
        .await
        .expect("an answer within the timeout");
    let took = started.elapsed();
    assert!(took >= timeout.mul_f64(0.9), "answered after {took:?}");
    assert_eq!(res.status, 408);
    assert_eq!(res.header("content-type"), Some("application/problem+json"));
    assert_eq!(res.header("connection"), Some("close"));
    let problem = res.json();
    assert_eq!(problem["type"], "urn:sluice:request-timeout", "{problem}");
    assert_eq!(problem["status"], 408);
    assert_eq!(problem["title"], "Request timeout");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("server.request_timeout"),
        "{problem}"
    );
    assert_eq!(raw.end(MARGIN).await, End::Closed);
    trickler.abort();

    let metrics = scrape(&app).await;
    assert_eq!(
        metric_value(
            &metrics,
            "sluice_http_requests_total",
            &[("route", "/v1/readings"), ("status", "408")]
        ),
        1.0
    );
    assert!(stored(&app, "slow-body").await.is_empty());
    poster.finish(&app, "steady-body").await;
    wait_for_no_other_connection(&app).await;
    app.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout() {
    let keep_alive = Duration::from_secs(1);
    let app = spawn(|s| {
        s.server.request_timeout = Duration::from_secs(30);
        s.server.keep_alive_timeout = keep_alive;
    })
    .await;
    let poster = Poster::start(&app, "steady-idle");

    let mut raw = Raw::connect(&app).await;
    // Keep-alive works: two requests on one connection.
    for _ in 0..2 {
        raw.send(&get("/healthz", false)).await;
        let res = raw.response(MARGIN).await.expect("an answer");
        assert_eq!(res.status, 200);
    }
    let idle_since = Instant::now();
    assert_eq!(raw.end(keep_alive + MARGIN).await, End::Closed);
    let idle = idle_since.elapsed();
    assert!(idle >= keep_alive.mul_f64(0.9), "closed after {idle:?}");
    assert!(
        raw.buf.is_empty(),
        "an idle connection is closed without an answer"
    );

    poster.finish(&app, "steady-idle").await;
    wait_for_no_other_connection(&app).await;
    app.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_a_new_connection_waits_until_one_closes() {
    let app = spawn(|s| {
        s.server.max_connections = 3;
        s.server.request_timeout = Duration::from_secs(20);
        s.server.keep_alive_timeout = Duration::from_secs(20);
    })
    .await;

    // Two connections served and kept open.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut raw = Raw::connect(&app).await;
        raw.send(&get("/healthz", false)).await;
        assert_eq!(raw.response(MARGIN).await.expect("served").status, 200);
        held.push(raw);
    }
    // A third reads the gauge, counting itself, and closes. (The readiness check's last
    // connection may still be leaving the count: wait for it.)
    wait_until(MARGIN, "the gauge to count three connections", || async {
        metric_value(&scrape(&app).await, "sluice_http_connections", &[]) == 3.0
    })
    .await;
    let mut third = Raw::connect(&app).await;
    third.send(&get("/healthz", false)).await;
    assert_eq!(third.response(MARGIN).await.expect("served").status, 200);
    held.push(third);

    // Full: a fourth connects (the kernel's backlog takes it) and posts readings, but is
    // not served...
    let mut waiting = Raw::connect(&app).await;
    waiting
        .send(&post_readings(&json!([
            reading("waiting-1", 1),
            reading("waiting-1", 2),
            reading("waiting-1", 3)
        ])))
        .await;
    assert!(
        waiting.response(Duration::from_millis(500)).await.is_none(),
        "served past server.max_connections"
    );
    // ...until one of the three closes.
    drop(held.remove(0));
    let res = waiting
        .response(MARGIN)
        .await
        .expect("served once a slot frees");
    assert_eq!(res.status, 200);
    assert_eq!(res.json()["accepted"], 3);

    drop(waiting);
    drop(held);
    wait_for_no_other_connection(&app).await;
    assert_eq!(stored(&app, "waiting-1").await, [1, 2, 3].into());
    app.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_work_and_leave_the_http_count() {
    let app = spawn(|s| {
        s.server.max_connections = 2;
        s.server.request_timeout = Duration::from_secs(1);
        s.server.keep_alive_timeout = Duration::from_secs(1);
    })
    .await;
    // More WebSockets than HTTP slots: an upgraded connection gives its slot back, and stays
    // open past the HTTP timeouts (the WebSocket has its own idle timeout and pings).
    let mut sockets = Vec::new();
    for i in 1..=4u64 {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/v1/ws", app.addr))
            .await
            .expect("the upgrade succeeds");
        ws.send(Message::Text(reading("ws-limits", i).to_string().into()))
            .await
            .unwrap();
        sockets.push(ws);
    }
    for ws in &mut sockets {
        let ack = next_ws_json(ws, MARGIN).await;
        assert_eq!(ack["accepted"], 1, "{ack}");
    }
    let metrics = scrape(&app).await;
    assert_eq!(
        metric_value(&metrics, "sluice_ws_connections", &[("kind", "device")]),
        4.0
    );
    wait_for_no_other_connection(&app).await;

    // Past the HTTP keep-alive timeout (an idle HTTP connection closed by it is the clock),
    // every WebSocket is still open and answers a second frame.
    let mut idle = Raw::connect(&app).await;
    idle.send(&get("/healthz", false)).await;
    assert_eq!(idle.response(MARGIN).await.expect("served").status, 200);
    assert_eq!(idle.end(Duration::from_secs(1) + MARGIN).await, End::Closed);
    for (i, ws) in sockets.iter_mut().enumerate() {
        ws.send(Message::Text(
            reading("ws-limits", 10 + i as u64).to_string().into(),
        ))
        .await
        .expect("still open");
        let ack = next_ws_json(ws, MARGIN).await;
        assert_eq!(ack["accepted"], 1, "{ack}");
        ws.close(None).await.unwrap();
    }
    assert_eq!(
        stored(&app, "ws-limits").await,
        [1, 2, 3, 4, 10, 11, 12, 13].into()
    );
    app.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_idle_connections_at_once_and_waits_out_slow_headers() {
    let timeout = Duration::from_secs(2);
    let app = spawn(|s| {
        s.server.request_timeout = timeout;
        s.server.keep_alive_timeout = Duration::from_secs(30);
    })
    .await;
    // An idle keep-alive connection, and one still sending its headers.
    let mut idle = Raw::connect(&app).await;
    idle.send(&get("/healthz", false)).await;
    assert_eq!(idle.response(MARGIN).await.expect("served").status, 200);
    let mut slow = Raw::connect(&app).await;
    slow.send(b"POST /v1/readings HTTP/1.1\r\nHost: x\r\n")
        .await;
    let trickler = slow.trickle(vec![b'a'; 200], Duration::from_millis(100));

    let started = Instant::now();
    let shutdown = tokio::spawn(app.shutdown());
    // The idle one closes well before the timer could have closed it.
    assert_eq!(idle.end(timeout / 2).await, End::Closed);
    // The slow one is not in flight and not idle: hyper's timer ends it, and the shutdown.
    assert_eq!(slow.end(timeout + MARGIN).await, End::Closed);
    trickler.abort();
    tokio::time::timeout(timeout + MARGIN, shutdown)
        .await
        .expect("shutdown within the request timeout")
        .unwrap()
        .expect("clean shutdown");
    assert!(started.elapsed() < timeout + MARGIN);
}

/// A request timeout longer than the shutdown (30 s against 25 s by default): a client still
/// sending its headers at SIGTERM is dropped at half the shutdown budget, and the shutdown
/// ends cleanly in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_a_request_timeout_longer_than_itself() {
    let shutdown_timeout = Duration::from_secs(4);
    let app = spawn(|s| {
        s.server.request_timeout = Duration::from_secs(60);
        s.server.shutdown_timeout = shutdown_timeout;
    })
    .await;
    let mut slow = Raw::connect(&app).await;
    slow.send(b"POST /v1/readings HTTP/1.1\r\nHost: x\r\n")
        .await;
    let trickler = slow.trickle(vec![b'a'; 2000], Duration::from_millis(100));
    let started = Instant::now();
    let shutdown = tokio::spawn(app.shutdown());
    assert_eq!(slow.end(shutdown_timeout / 2 + MARGIN).await, End::Closed);
    trickler.abort();
    tokio::time::timeout(shutdown_timeout, shutdown)
        .await
        .expect("shutdown within server.shutdown_timeout")
        .unwrap()
        .expect("clean shutdown");
    assert!(
        started.elapsed() < shutdown_timeout,
        "{:?}",
        started.elapsed()
    );
}
