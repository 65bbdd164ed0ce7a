//! The webhook action (SPEC §12): rule engine → outbox → **webhook task** → `POST
//! alerts.webhook_url`.
//!
//! One task delivers the events in the order they were queued (so in order per (rule,
//! device)), one at a time: a POST of the event's JSON, bounded by `alerts.webhook_timeout`
//! (connect, send and answer together). A 2xx answer is `sent`. A connection error, a
//! timeout, a 5xx, 408 or 429 is `failed`, and the same event is tried again after a backoff
//! that starts at `alerts.webhook_backoff_initial` and doubles up to
//! `alerts.webhook_backoff_max`; events behind it wait in the outbox, whose bound
//! (`alerts.queue_capacity`, full-policy `drop_newest`) is what a webhook that stays down
//! costs: new events are dropped and counted. Any other 4xx means the receiver will never
//! take that event: it is counted `failed` and `dropped`, and the next one is sent.
//!
//! With `alerts.webhook_secret`, each request carries `X-Sluice-Signature: sha256=<hex>`,
//! the HMAC-SHA256 of the exact body with the secret as key, so a receiver can check that
//! Sluice sent it (compare in constant time).
//!
//! The HTTP client is hyper's own HTTP/1 connection (`hyper::client::conn::http1`) over a
//! tokio `TcpStream`, kept alive between events and made again after any error: hyper is
//! already built for the server, so this adds no crate. Plain `http://` only.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use prometheus::IntCounter;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::outbox::OutboxReceiver;
use crate::config::rules::{AlertsSettings, WebhookUrl};
use crate::telemetry::log_limit::LogLimit;
use crate::telemetry::metrics::Metrics;

/// The signature header.
pub const SIGNATURE_HEADER: &str = "x-sluice-signature";

/// Most bytes of a receiver's answer that are read (and thrown away) to keep the connection.
const ANSWER_LIMIT: usize = 64 * 1024;

/// `sha256=<hex>`: the HMAC-SHA256 of `body` keyed with `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(secret)
        .expect("HMAC takes a key of any length");
    mac.update(body);
    let code = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in code.iter() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// How one delivery attempt ended.
#[derive(Debug)]
enum Outcome {
    /// 2xx.
    Sent,
    /// Worth trying again: connection error, timeout, 5xx, 408, 429.
    Retry(String),
    /// The receiver refused this event for good (another 4xx, or 3xx).
    Refused(u16),
}

/// The delivery task and its stop signal.
pub struct WebhookOutput {
    /// Cancelled when the shutdown budget is spent: what is left is dropped and counted.
    stop: CancellationToken,
    /// The task; ends when the outbox is closed and empty, or at `stop`.
    task: JoinHandle<()>,
}

/// What the delivery task holds.
struct Delivery {
    /// Where to POST.
    url: WebhookUrl,
    /// The HMAC key, if any.
    secret: Option<Vec<u8>>,
    /// `[alerts]`: timeout and backoff.
    settings: AlertsSettings,
    /// `result="sent"`.
    sent: IntCounter,
    /// `result="failed"`.
    failed: IntCounter,
    /// An open connection, reused while it lasts.
    conn: Option<SendRequest<Full<Bytes>>>,
    /// Failed attempts in a row: logged by the rule of `log_limit`.
    failing: LogLimit,
}

impl WebhookOutput {
    /// Starts delivering from `rx` to `alerts.webhook_url` (already validated).
    pub fn start(
        settings: &AlertsSettings,
        rx: OutboxReceiver<std::sync::Arc<str>>,
        metrics: &Metrics,
    ) -> anyhow::Result<Self> {
        let url = WebhookUrl::parse(&settings.webhook_url)
            .map_err(|e| anyhow::anyhow!("alerts.webhook_url: {e}"))?;
        let stop = CancellationToken::new();
        let delivery = Delivery {
            url,
            secret: settings
                .webhook_secret
                .as_ref()
                .map(|s| s.expose().as_bytes().to_vec()),
            settings: settings.clone(),
            sent: metrics
                .alert_notifications
                .with_label_values(&["webhook", "sent"]),
            failed: metrics
                .alert_notifications
                .with_label_values(&["webhook", "failed"]),
            conn: None,
            failing: LogLimit::new(),
        };
        let task = tokio::spawn(delivery.run(rx, stop.clone()));
        Ok(Self { stop, task })
    }

    /// Delivers what is queued for at most `budget` (the producer must be gone, so that the
    /// queue ends), then drops and counts the rest.
    pub async fn finish(self, budget: Duration) {
        let WebhookOutput { stop, mut task } = self;
        if tokio::time::timeout(budget, &mut task).await.is_err() {
            stop.cancel();
            let _ = task.await;
        }
    }
}

impl Delivery {
    async fn run(mut self, mut rx: OutboxReceiver<std::sync::Arc<str>>, stop: CancellationToken) {
        loop {
            let event = tokio::select! {
                e = rx.recv() => match e { Some(e) => e, None => break },
                () = stop.cancelled() => break,
            };
            let body = Bytes::copy_from_slice(event.as_bytes());
            let mut backoff = self.settings.webhook_backoff_initial;
            loop {
                let attempt = tokio::select! {
                    o = self.attempt(body.clone()) => o,
                    () = stop.cancelled() => {
                        rx.dropped.inc();
                        rx.drop_rest();
                        return;
                    }
                };
                match attempt {
                    Outcome::Sent => {
                        self.sent.inc();
                        if let Some(failures) = self.failing.recovered() {
                            tracing::info!(failures, "alert webhook delivering again");
                        }
                        break;
                    }
                    Outcome::Refused(status) => {
                        self.failed.inc();
                        rx.dropped.inc();
                        tracing::warn!(
                            status,
                            url = %self.settings.webhook_url,
                            "alert webhook refused an event; dropped"
                        );
                        break;
                    }
                    Outcome::Retry(why) => {
                        self.failed.inc();
                        if let Some(suppressed) = self.failing.event() {
                            tracing::warn!(
                                error = %why,
                                url = %self.settings.webhook_url,
                                retry_in_ms = backoff.as_millis() as u64,
                                suppressed,
                                "alert webhook failed; retrying"
                            );
                        }
                        tokio::select! {
                            () = tokio::time::sleep(backoff) => {}
                            () = stop.cancelled() => {
                                rx.dropped.inc();
                                rx.drop_rest();
                                return;
                            }
                        }
                        backoff = (backoff * 2).min(self.settings.webhook_backoff_max);
                    }
                }
            }
        }
        rx.drop_rest();
    }

    /// One POST of `body`, within `alerts.webhook_timeout`.
    async fn attempt(&mut self, body: Bytes) -> Outcome {
        let timeout = self.settings.webhook_timeout;
        match tokio::time::timeout(timeout, self.post(body)).await {
            Ok(Ok(status)) if (200..300).contains(&status) => Outcome::Sent,
            Ok(Ok(status)) if status >= 500 || status == 408 || status == 429 => {
                self.conn = None;
                Outcome::Retry(format!("answered {status}"))
            }
            Ok(Ok(status)) => Outcome::Refused(status),
            Ok(Err(e)) => {
                self.conn = None;
                Outcome::Retry(e)
            }
            Err(_) => {
                self.conn = None;
                Outcome::Retry(format!(
                    "no answer within {}",
                    crate::config::duration::format(timeout)
                ))
            }
        }
    }

    /// Sends the request on the kept connection (or a new one) and reads the answer.
    async fn post(&mut self, body: Bytes) -> Result<u16, String> {
        let reusable = self
            .conn
            .as_ref()
            .is_some_and(|c| !c.is_closed() && c.is_ready());
        if !reusable {
            self.conn = Some(self.connect().await?);
        }
        let conn = self.conn.as_mut().expect("connected above");
        let mut req = hyper::Request::post(self.url.path.as_str())
            .header(hyper::header::HOST, self.url.authority.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(
                hyper::header::USER_AGENT,
                concat!("sluice/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(secret) = &self.secret {
            req = req.header(SIGNATURE_HEADER, signature(secret, &body));
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| format!("request: {e}"))?;
        let res = conn
            .send_request(req)
            .await
            .map_err(|e| format!("send: {e}"))?;
        let status = res.status().as_u16();
        // Read the answer so that the connection can carry the next event.
        if Limited::new(res.into_body(), ANSWER_LIMIT)
            .collect()
            .await
            .is_err()
        {
            self.conn = None;
        }
        Ok(status)
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let stream = tokio::net::TcpStream::connect((self.url.host.as_str(), self.url.port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        // Ends when the sender is dropped or the receiver closes the connection.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_rfc_4231_hmac_sha256() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
