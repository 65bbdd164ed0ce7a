//! "May this device send, and how fast?" (SPEC §11): request → **access** → handler → codec →
//! **access** (per reading) → admission.
//!
//! - [`guard`], a middleware on every route, answers "who is calling, and may they use this
//!   endpoint?" before any handler runs: the token from `Authorization: Bearer|Token` (or
//!   `?token=` on the two WebSocket upgrades), checked by [`tokens`]; 401 or 403 otherwise. It
//!   leaves a [`Caller`] in the request for the handler.
//! - After parsing, handlers call [`Access::screen`] on the readings: a reading naming a device
//!   the token may not write is rejected by index (`forbidden`), then each device's rate limit
//!   ([`rate_limit`]) rejects what is over it (`rate_limited`). MQTT is authenticated by the
//!   broker; it only waits for the rate limit ([`rate_limit::DeviceLimiter::until_ready`]).
//!
//! Which endpoint needs what ([`Need::of`]):
//!
//! | endpoints | needs |
//! |---|---|
//! | `/healthz`, `/readyz`, `/metrics`, `/`, `/static/*` | nothing |
//! | `POST /v1/readings`, `/write`, `/api/v2/write`, `GET /v1/ws` | a `write` token (its devices) |
//! | `GET /v1/devices…`, `GET /v1/live` | a `read` token, or a `write` token for its own devices |
//! | `GET /v1/alerts`, `/v1/rules`, `/v1/status` (fleet-wide) | a `read` token |
//! | `/v1/admin/tokens…` | `auth.admin_token` |
//!
//! The admin token also reads (it is a `read` token), and is never a device token: it cannot
//! write. With `auth.mode = "none"` every endpoint but the admin API is open, as before.

pub mod rate_limit;
pub mod tokens;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::api::problem::Problem;
use crate::api::AppState;
use crate::config::access::AuthMode;
use crate::config::Settings;
use crate::ingest::http::RejectedItem;
use crate::reading::{DeviceId, ParsedBatch, ReadingError, RejectReason, Rejection};
use crate::store::ReaderSlot;
use crate::telemetry::metrics::{Metrics, Transport};
use rate_limit::{DeviceLimiter, Verdict};
use tokens::{Refused, Scope, TokenInfo, Tokens};

/// The `reason` label values of `sluice_auth_failures_total` (SPEC §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No credentials.
    Missing,
    /// Malformed or unknown token.
    Invalid,
    /// A revoked token.
    Revoked,
    /// A valid token used beyond its rights: wrong scope, or a device it is not bound to.
    Forbidden,
}

impl AuthFailure {
    /// Every reason, for pre-registering series.
    pub const ALL: [AuthFailure; 4] = [
        AuthFailure::Missing,
        AuthFailure::Invalid,
        AuthFailure::Revoked,
        AuthFailure::Forbidden,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Invalid => "invalid",
            AuthFailure::Revoked => "revoked",
            AuthFailure::Forbidden => "forbidden",
        }
    }
}

/// Who is calling, as the guard established it.
#[derive(Debug, Clone)]
pub enum Caller {
    /// `auth.mode = "none"`: anyone may do anything but administer tokens.
    Anyone,
    /// The admin token: administers tokens, and reads everything. Not a device.
    Admin,
    /// A token of the store.
    Token(Arc<TokenInfo>),
}

impl Caller {
    /// Whether it may write readings of `device`.
    pub fn may_write(&self, device: &str) -> bool {
        match self {
            Caller::Anyone => true,
            Caller::Admin => false,
            Caller::Token(t) => t.scope == Scope::Write && t.covers(device),
        }
    }

    /// Whether it may read `device`.
    pub fn may_read(&self, device: &str) -> bool {
        match self {
            Caller::Anyone | Caller::Admin => true,
            Caller::Token(t) => t.scope == Scope::Read || t.covers(device),
        }
    }

    /// The write token's glob when reads are limited to it; `None` when it reads everything.
    pub fn read_glob(&self) -> Option<&str> {
        match self {
            Caller::Token(t) if t.scope == Scope::Write => Some(&t.devices),
            _ => None,
        }
    }

    /// The device a token naming exactly one device binds (SPEC §1: readings may then omit
    /// `device_id`).
    pub fn bound_device(&self) -> Option<&DeviceId> {
        match self {
            Caller::Token(t) => t.bound.as_ref(),
            _ => None,
        }
    }

    /// The token's id, for revocation watches.
    pub fn token_id(&self) -> Option<&str> {
        match self {
            Caller::Token(t) => Some(&t.id),
            _ => None,
        }
    }
}

/// Handlers take the caller the guard left; a route the guard did not see (none today) is
/// refused in token mode rather than opened.
impl FromRequestParts<AppState> for Caller {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        if let Some(c) = parts.extensions.get::<Caller>() {
            return Ok(c.clone());
        }
        match state.access.mode {
            AuthMode::None => Ok(Caller::Anyone),
            AuthMode::Token => Err(unauthorized(AuthFailure::Missing, false)),
        }
    }
}

/// Tokens, the admin token and the rate limiter: one per process, in [`AppState`].
pub struct Access {
    /// `auth.mode`.
    pub mode: AuthMode,
    /// SHA-256 of `auth.admin_token`, if set.
    admin: Option<[u8; 32]>,
    /// Token checks and revocations.
    pub tokens: Arc<Tokens>,
    /// Per-device limits, when `rate_limit.per_device` is set.
    pub limiter: Option<Arc<DeviceLimiter>>,
    /// `sluice_auth_failures_total` and friends.
    metrics: Arc<Metrics>,
}

impl Access {
    /// From the settings; store lookups go through `reader`.
    pub fn new(settings: &Settings, reader: Arc<ReaderSlot>, metrics: Arc<Metrics>) -> Self {
        Self {
            mode: settings.auth.mode,
            admin: settings
                .auth
                .admin_token
                .as_ref()
                .map(|t| tokens::hash_secret(t.expose().trim())),
            tokens: Arc::new(Tokens::new(reader, settings.auth.token_cache)),
            limiter: settings
                .rate_limit
                .rate()
                .map(|r| Arc::new(DeviceLimiter::new(r))),
            metrics,
        }
    }

    /// Counts an authentication failure.
    pub fn failed(&self, transport: Transport, reason: AuthFailure) {
        self.metrics
            .auth_failures
            .with_label_values(&[transport.as_str(), reason.as_str()])
            .inc();
    }

    /// Whether `secret` is the admin token (compared as hashes, without an early exit).
    fn is_admin(&self, secret: &str) -> bool {
        self.admin
            .as_ref()
            .is_some_and(|h| tokens::same_hash(h, &tokens::hash_secret(secret)))
    }

    /// Checks a presented secret: the admin token, or a token of the store.
    async fn authenticate(&self, secret: &str) -> Result<Caller, Result<AuthFailure, Problem>> {
        if self.is_admin(secret) {
            return Ok(Caller::Admin);
        }
        match self.tokens.verify(secret).await {
            Ok(info) => Ok(Caller::Token(info)),
            Err(Ok(Refused::Invalid)) => Err(Ok(AuthFailure::Invalid)),
            Err(Ok(Refused::Revoked)) => Err(Ok(AuthFailure::Revoked)),
            Err(Err(e)) => Err(Err(Problem::unavailable(
                "unavailable",
                "Store unavailable",
                format!("cannot check the token: {e}"),
                Duration::from_secs(1),
            ))),
        }
    }

    /// Screens parsed readings for `caller`, on `transport`: readings of devices it may not
    /// write are rejected (`forbidden`), then readings over their device's rate limit
    /// (`rate_limited`). Rejections keep their index (a reading's position in the batch;
    /// for SenML and line protocol, its position among the readings) and stay in index order.
    /// Counts what it rejects.
    pub fn screen(
        &self,
        caller: &Caller,
        transport: Transport,
        batch: &mut ParsedBatch,
    ) -> Screened {
        let mut out = Screened::default();
        let check_devices = !matches!(caller, Caller::Anyone);
        if !check_devices && self.limiter.is_none() {
            return out;
        }
        // The index of each valid reading: the positions no parse rejection took.
        let mut taken = batch.rejected.iter().map(|r| r.index).collect::<Vec<_>>();
        taken.sort_unstable();
        let mut next_free = 0usize;
        let mut t = 0usize;
        let mut index_of = || {
            while t < taken.len() && taken[t] == next_free {
                t += 1;
                next_free += 1;
            }
            let i = next_free;
            next_free += 1;
            i
        };
        let readings = std::mem::take(&mut batch.readings);
        let mut kept = Vec::with_capacity(readings.len());
        let mut added = Vec::new();
        for r in readings {
            let index = index_of();
            let device = r.device_id.as_str();
            if check_devices && !caller.may_write(device) {
                out.forbidden += 1;
                added.push(Rejection {
                    index,
                    error: ReadingError::new(
                        "device_id",
                        "not allowed for this token",
                        RejectReason::Forbidden,
                    ),
                });
                continue;
            }
            if let Some(limiter) = &self.limiter {
                match limiter.check(device) {
                    Verdict::Allowed { remaining } => {
                        let reset = limiter.reset_after(remaining);
                        if out.lowest.is_none_or(|(r, _)| remaining < r) {
                            out.lowest = Some((remaining, reset));
                        }
                    }
                    Verdict::Limited { retry } => {
                        out.limited += 1;
                        out.retry = Some(out.retry.map_or(retry, |d: Duration| d.max(retry)));
                        out.lowest = Some((0, limiter.reset_after(0).max(retry)));
                        added.push(Rejection {
                            index,
                            error: ReadingError::new(
                                "device_id",
                                format!(
                                    "`{device}` is over rate_limit.per_device; retry in {} ms",
                                    retry.as_millis().max(1)
                                ),
                                RejectReason::RateLimited,
                            ),
                        });
                        continue;
                    }
                }
            }
            kept.push(r);
        }
        batch.readings = kept;
        if !added.is_empty() {
            batch.rejected.extend(added);
            batch.rejected.sort_by_key(|r| r.index);
        }
        if out.forbidden > 0 {
            self.metrics
                .rejected(transport, RejectReason::Forbidden, out.forbidden as u64);
            self.failed(transport, AuthFailure::Forbidden);
        }
        if out.limited > 0 {
            self.metrics
                .rejected(transport, RejectReason::RateLimited, out.limited as u64);
            self.metrics
                .readings_rate_limited
                .with_label_values(&[transport.as_str()])
                .inc_by(out.limited as u64);
        }
        out
    }

    /// Adds `RateLimit-Policy` and `RateLimit` to an ingest answer, when limits are on.
    pub fn rate_headers(&self, screened: &Screened, headers: &mut HeaderMap) {
        let Some(limiter) = &self.limiter else {
            return;
        };
        let (remaining, reset) = screened
            .lowest
            .unwrap_or((limiter.rate().burst, Duration::ZERO));
        for (name, value) in [
            (RATELIMIT_POLICY, limiter.policy_header()),
            (RATELIMIT, limiter.state_header(remaining, reset)),
        ] {
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert(HeaderName::from_static(name), v);
            }
        }
    }

    /// Starts the upkeep task: every second, revocations made on other replicas are polled;
    /// every [`LAST_USED_FLUSH`], last-use times are written; every `rate_limit.sweep_interval`,
    /// rested devices leave the limiter. Stops when `stop` is cancelled, after a last flush.
    pub fn start_upkeep(
        self: &Arc<Self>,
        sweep: Duration,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let access = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_flush = tokio::time::Instant::now();
            let mut last_sweep = tokio::time::Instant::now();
            loop {
                let stopping = tokio::select! {
                    _ = tick.tick() => false,
                    () = stop.cancelled() => true,
                };
                let flush = stopping || last_flush.elapsed() >= LAST_USED_FLUSH;
                let tokens = access.tokens.clone();
                let checked = tokio::task::spawn_blocking(move || {
                    let polled = if stopping {
                        Ok(())
                    } else {
                        tokens.poll_revocations()
                    };
                    let flushed = if flush {
                        tokens.flush_last_used()
                    } else {
                        Ok(())
                    };
                    polled.and(flushed)
                })
                .await;
                if let Ok(Err(e)) = checked {
                    tracing::debug!(error = %e, "token upkeep: store not reachable; retrying");
                }
                if flush {
                    last_flush = tokio::time::Instant::now();
                }
                if let Some(limiter) = &access.limiter {
                    if last_sweep.elapsed() >= sweep {
                        limiter.sweep();
                        last_sweep = tokio::time::Instant::now();
                    }
                    access.metrics.rate_limit_devices.set(limiter.len() as i64);
                }
                if stopping {
                    return;
                }
            }
        })
    }
}

/// How often last-use times are written to the store.
pub const LAST_USED_FLUSH: Duration = Duration::from_secs(10);

/// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers-10).
pub const RATELIMIT_POLICY: &str = "ratelimit-policy";
/// `RateLimit` (same draft).
pub const RATELIMIT: &str = "ratelimit";

/// What [`Access::screen`] rejected.
#[derive(Debug, Default, Clone, Copy)]
pub struct Screened {
    /// Readings naming devices the token may not write.
    pub forbidden: usize,
    /// Readings over their device's rate limit.
    pub limited: usize,
    /// The longest wait among the rate-limited devices: `Retry-After`.
    pub retry: Option<Duration>,
    /// The lowest remaining allowance among the batch's devices, with its reset: `RateLimit`.
    pub lowest: Option<(u32, Duration)>,
}

impl Screened {
    /// The status of an ingest answer where nothing was taken, by what was rejected: 403 when
    /// every rejection is `forbidden`, 429 when every one is `rate_limited` or `forbidden`
    /// (waiting helps), else `None` (the usual 422).
    pub fn status_when_nothing_taken(&self, rejected: usize) -> Option<StatusCode> {
        if rejected == 0 {
            return None;
        }
        if self.forbidden == rejected {
            Some(StatusCode::FORBIDDEN)
        } else if self.limited > 0 && self.forbidden + self.limited == rejected {
            Some(StatusCode::TOO_MANY_REQUESTS)
        } else {
            None
        }
    }
}

/// A problem document with the rejections of the batch as an extension member (RFC 9457
/// §3.2): the 403 and 429 answers of an ingest request where nothing was taken.
#[derive(Serialize)]
struct BatchProblem<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    title: &'static str,
    status: u16,
    detail: String,
    accepted: usize,
    duplicates: usize,
    rejected: &'a [RejectedItem],
}

/// The answer to an ingest request of which nothing was taken for access reasons (403 or
/// 429, see [`Screened::status_when_nothing_taken`]): a problem document that also carries the
/// ingest body's fields, so the rejections by index are there as in a 422.
pub fn batch_refused(
    status: StatusCode,
    screened: &Screened,
    rejected: &[RejectedItem],
) -> Response {
    let (kind, title, detail) = if status == StatusCode::FORBIDDEN {
        (
            "urn:sluice:forbidden",
            "Forbidden",
            "every reading names a device this token may not write".to_string(),
        )
    } else {
        (
            "urn:sluice:rate-limited",
            "Too many requests",
            format!(
                "every reading is over its device's rate limit (or not allowed); retry in {} s",
                screened.retry.map_or(1, rate_limit::retry_after_secs)
            ),
        )
    };
    let body = serde_json::to_vec(&BatchProblem {
        kind,
        title,
        status: status.as_u16(),
        detail,
        accepted: 0,
        duplicates: 0,
        rejected,
    })
    .unwrap_or_default();
    let mut res = (status, body).into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    if status == StatusCode::TOO_MANY_REQUESTS {
        let secs = screened.retry.map_or(1, rate_limit::retry_after_secs);
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    res
}

/// What an endpoint needs from its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Nothing: health, metrics, the page's files, and unknown paths (404).
    Public,
    /// The admin token.
    Admin,
    /// A write token; devices are checked per reading.
    Write,
    /// Any token; devices are checked by the handler.
    ReadDevices,
    /// A read token (or the admin token): fleet-wide views.
    ReadAll,
}

impl Need {
    /// By route template. A route not listed needs a read token: a new endpoint is closed
    /// until someone decides otherwise.
    pub fn of(route: Option<&str>) -> Need {
        match route {
            None => Need::Public,
            Some("/healthz" | "/readyz" | "/metrics" | "/" | "/static/{*path}") => Need::Public,
            Some("/v1/admin/tokens" | "/v1/admin/tokens/{id}") => Need::Admin,
            Some("/v1/readings" | "/write" | "/api/v2/write" | "/v1/ws") => Need::Write,
            Some(
                "/v1/devices"
                | "/v1/devices/{device_id}"
                | "/v1/devices/{device_id}/readings"
                | "/v1/live",
            ) => Need::ReadDevices,
            Some(_) => Need::ReadAll,
        }
    }
}

/// The credentials of a request: `Authorization: Bearer <t>` or `Token <t>`, or, on the
/// WebSocket upgrades only, `?token=<t>` (browsers cannot set headers there). `Err` for an
/// `Authorization` header of another scheme.
fn credentials(
    parts_headers: &HeaderMap,
    query: Option<&str>,
    ws: bool,
) -> Result<Option<String>, ()> {
    if let Some(v) = parts_headers.get(header::AUTHORIZATION) {
        let v = v.to_str().map_err(|_| ())?.trim();
        let (scheme, rest) = v.split_once(' ').ok_or(())?;
        if scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("token") {
            return Ok(Some(rest.trim().to_owned()));
        }
        return Err(());
    }
    if ws {
        for pair in query.unwrap_or("").split('&') {
            if let Some(("token", v)) = pair.split_once('=') {
                let v = percent_encoding::percent_decode_str(v).decode_utf8_lossy();
                return Ok(Some(v.into_owned()));
            }
        }
    }
    Ok(None)
}

/// 401 with `WWW-Authenticate: Bearer` (RFC 6750 §3): `error="invalid_token"` for a token that
/// was given. One body for unknown and revoked tokens.
fn unauthorized(reason: AuthFailure, influx: bool) -> Response {
    let (detail, challenge) = match reason {
        // InfluxDB clients and Telegraf send `Token <token>`; that is what their users configure.
        AuthFailure::Missing if influx => (
            "this endpoint needs a token (auth.mode = \"token\"): send Authorization: Token <token> (Telegraf: token = \"<token>\" in [[outputs.influxdb_v2]])",
            "Bearer realm=\"sluice\"",
        ),
        AuthFailure::Missing => (
            "this endpoint needs a token (auth.mode = \"token\"): send Authorization: Bearer <token> (a ?token= query parameter is taken only on the WebSocket upgrades, /v1/ws and /v1/live)",
            "Bearer realm=\"sluice\"",
        ),
        _ => (
            "the token is not valid: malformed, unknown or revoked",
            "Bearer realm=\"sluice\", error=\"invalid_token\"",
        ),
    };
    let mut res = refusal(StatusCode::UNAUTHORIZED, detail.to_string(), influx);
    res.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    res
}

/// A 401 or 403: a problem document, or InfluxDB's `{"code", "message"}` on its endpoints.
fn refusal(status: StatusCode, detail: String, influx: bool) -> Response {
    if influx {
        let code = if status == StatusCode::UNAUTHORIZED {
            "unauthorized"
        } else {
            "forbidden"
        };
        return (
            status,
            axum::Json(serde_json::json!({ "code": code, "message": detail })),
        )
            .into_response();
    }
    let (slug, title) = if status == StatusCode::UNAUTHORIZED {
        ("unauthorized", "Unauthorized")
    } else {
        ("forbidden", "Forbidden")
    };
    Problem::new(status, slug, title, detail).into_response()
}

/// The 403 of an InfluxDB endpoint where every line named a device the token may not write
/// (already counted by [`Access::screen`]).
pub fn forbidden_influx(detail: &str) -> Response {
    refusal(StatusCode::FORBIDDEN, detail.to_owned(), true)
}

/// A 403 for a valid caller beyond its rights, counted as `forbidden`.
pub fn forbidden(access: &Access, transport: Transport, detail: impl Into<String>) -> Response {
    access.failed(transport, AuthFailure::Forbidden);
    refusal(StatusCode::FORBIDDEN, detail.into(), false)
}

/// The middleware on every route (see the module docs): authenticates, checks the endpoint's
/// [`Need`], and leaves the [`Caller`] in the request's extensions.
pub async fn guard(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let need = Need::of(route.as_deref());
    if need == Need::Public {
        return next.run(req).await;
    }
    let ws = matches!(route.as_deref(), Some("/v1/ws" | "/v1/live"));
    let influx = matches!(route.as_deref(), Some("/write" | "/api/v2/write"));
    let transport = if ws { Transport::Ws } else { Transport::Http };
    let access = state.access.clone();
    if access.mode == AuthMode::None && need != Need::Admin {
        req.extensions_mut().insert(Caller::Anyone);
        return next.run(req).await;
    }
    if need == Need::Admin && access.admin.is_none() {
        return Problem::new(
            StatusCode::FORBIDDEN,
            "auth-disabled",
            "Token administration is off",
            "auth.admin_token is not set (auth.mode is \"none\"): there is no administrator; set auth.admin_token to issue tokens",
        )
        .into_response();
    }
    let secret = match credentials(req.headers(), req.uri().query(), ws) {
        Ok(Some(s)) if !s.is_empty() => s,
        Ok(_) => {
            access.failed(transport, AuthFailure::Missing);
            return unauthorized(AuthFailure::Missing, influx);
        }
        Err(()) => {
            access.failed(transport, AuthFailure::Invalid);
            return unauthorized(AuthFailure::Invalid, influx);
        }
    };
    let caller = match access.authenticate(&secret).await {
        Ok(c) => c,
        Err(Ok(reason)) => {
            access.failed(transport, reason);
            return unauthorized(reason, influx);
        }
        Err(Err(problem)) => return problem.into_response(),
    };
    let refused = match (need, &caller) {
        (Need::Admin, Caller::Admin) => None,
        (Need::Admin, _) => Some("this endpoint needs auth.admin_token"),
        (Need::Write, Caller::Admin) => Some(
            "the admin token is not a device token: create a write token with POST /v1/admin/tokens",
        ),
        (Need::Write, Caller::Token(t)) if t.scope != Scope::Write => {
            Some("a read token cannot write; use a write token")
        }
        (Need::ReadAll, Caller::Token(t)) if t.scope != Scope::Read => {
            Some("this endpoint shows the whole fleet: it needs a read token")
        }
        _ => None,
    };
    if let Some(detail) = refused {
        access.failed(transport, AuthFailure::Forbidden);
        return refusal(StatusCode::FORBIDDEN, detail.into(), influx);
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_come_from_the_header_or_the_websocket_query() {
        let mut h = HeaderMap::new();
        assert_eq!(credentials(&h, Some("token=slc_a"), false), Ok(None));
        assert_eq!(
            credentials(&h, Some("device_id=x&token=slc_a%2Db"), true),
            Ok(Some("slc_a-b".into()))
        );
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Token slc_b"),
        );
        assert_eq!(credentials(&h, None, false), Ok(Some("slc_b".into())));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer slc_c"),
        );
        assert_eq!(credentials(&h, None, false), Ok(Some("slc_c".into())));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic dTpw"),
        );
        assert_eq!(credentials(&h, None, false), Err(()));
    }

    #[test]
    fn every_route_has_a_need() {
        assert_eq!(Need::of(Some("/metrics")), Need::Public);
        assert_eq!(Need::of(Some("/v1/ws")), Need::Write);
        assert_eq!(Need::of(Some("/v1/live")), Need::ReadDevices);
        assert_eq!(Need::of(Some("/v1/status")), Need::ReadAll);
        assert_eq!(Need::of(Some("/v1/something-new")), Need::ReadAll);
    }
}
