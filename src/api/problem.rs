//! RFC 9457 problem documents (`application/problem+json`), the shape of every HTTP error
//! except per-reading rejections (SPEC §3).

use std::time::Duration;

use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// An HTTP error answer.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// `urn:sluice:<slug>`, stable for clients to match on.
    #[serde(rename = "type")]
    pub kind: String,
    /// Short, fixed summary of the type.
    pub title: &'static str,
    /// The HTTP status, repeated in the body.
    pub status: u16,
    /// What happened in this case.
    pub detail: String,
    /// Sent as `Retry-After` (whole seconds, at least 1).
    #[serde(skip)]
    pub retry_after: Option<Duration>,
    /// Sends `Connection: close`: the connection is not reused after this answer (a request
    /// whose body was not read to its end).
    #[serde(skip)]
    pub close: bool,
}

impl Problem {
    /// A problem with the given status, type slug, title and detail.
    pub fn new(
        status: StatusCode,
        slug: &str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            kind: format!("urn:sluice:{slug}"),
            title,
            status: status.as_u16(),
            detail: detail.into(),
            retry_after: None,
            close: false,
        }
    }

    /// Adds a `Retry-After`.
    pub fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// 400: the body is not JSON / NDJSON, or a parameter is invalid.
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "malformed",
            "Malformed request",
            detail,
        )
    }

    /// 400: a query parameter the endpoint does not take (see [`super::params`]).
    pub fn unknown_parameter(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "unknown-parameter",
            "Unknown query parameter",
            detail,
        )
    }

    /// 404.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", "Not found", detail)
    }

    /// 405: the path exists, the method does not (axum adds the `Allow` header).
    pub fn method_not_allowed(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            "Method not allowed",
            detail,
        )
    }

    /// The problem for an axum extractor's rejection (a path that does not decode, a
    /// WebSocket handshake that is not one), which axum would answer in plain text: its status
    /// and text, with the type of that status.
    pub fn rejected(status: StatusCode, detail: impl Into<String>) -> Self {
        match status {
            StatusCode::BAD_REQUEST => Self::bad_request(detail),
            StatusCode::NOT_FOUND => Self::not_found(detail),
            StatusCode::METHOD_NOT_ALLOWED => Self::method_not_allowed(detail),
            StatusCode::PAYLOAD_TOO_LARGE => {
                Self::new(status, "payload-too-large", "Payload too large", detail)
            }
            StatusCode::UPGRADE_REQUIRED => {
                Self::new(status, "upgrade-required", "Upgrade required", detail)
            }
            _ => Self::new(status, "error", "Request refused", detail),
        }
    }

    /// 408: the body did not arrive within `server.request_timeout`. With `Connection: close`
    /// (RFC 9110 §15.5.9): the rest of the body is never read, so the connection cannot be
    /// reused.
    pub fn request_timeout(detail: impl Into<String>) -> Self {
        let mut problem = Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "request-timeout",
            "Request timeout",
            detail,
        );
        problem.close = true;
        problem
    }

    /// 413.
    pub fn too_large(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            "Payload too large",
            detail,
        )
    }

    /// 415.
    pub fn unsupported(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Unsupported media type",
            detail,
        )
    }

    /// 503 with `Retry-After`.
    pub fn unavailable(
        slug: &str,
        title: &'static str,
        detail: impl Into<String>,
        after: Duration,
    ) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, slug, title, detail).retry_after(after)
    }
}

/// The router's fallback: no route has this path.
pub async fn no_route(uri: Uri) -> Problem {
    Problem::not_found(format!(
        "no endpoint at `{}`; see the README for the API",
        uri.path()
    ))
}

/// The router's method fallback: a route has this path, but not with this method.
pub async fn wrong_method(method: Method, uri: Uri) -> Problem {
    Problem::method_not_allowed(format!(
        "{method} is not allowed on `{}`; the Allow header lists the methods that are",
        uri.path()
    ))
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut res = (status, body).into_response();
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(after) = self.retry_after {
            let secs = after.as_secs_f64().ceil().max(1.0) as u64;
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.close {
            res.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        res
    }
}
