//! `sluice-sim null-sink`: a server that parses readings and acknowledges them at once.
//!
//! It speaks just enough of Sluice's ingest API for the simulator — `POST /v1/readings` (JSON
//! or NDJSON) and `GET /v1/ws` — so that the simulator can be measured alone: if the simulator
//! drives the sink at twice what Sluice stores, it is not the bottleneck of a benchmark.
//! Each body or frame is parsed with serde_json (every value visited, nothing kept) and
//! answered `{"accepted": n, "duplicates": 0, "rejected": []}`, with no validation and no store.

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::DefaultBodyLimit;
use axum::http::{header::CONTENT_TYPE, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::de::IgnoredAny;
use serde::Deserialize;

/// Largest body or frame the sink takes.
const MAX_BODY: usize = 64 << 20;

/// The sink's routes.
pub fn router() -> Router {
    Router::new()
        .route("/v1/readings", post(ingest))
        .route("/v1/ws", get(ws))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(MAX_BODY))
}

/// Serves the sink on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener) -> std::io::Result<()> {
    axum::serve(listener, router()).await
}

/// An envelope frame, `{"id": ..., "readings": [...]}`.
#[derive(Deserialize)]
struct Envelope {
    #[serde(default)]
    id: Option<String>,
    readings: Vec<IgnoredAny>,
}

/// Readings in a JSON text: an array, an envelope, or one reading.
fn count_json(body: &[u8]) -> Result<(usize, Option<String>), serde_json::Error> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => Ok((serde_json::from_slice::<Vec<IgnoredAny>>(body)?.len(), None)),
        _ => match serde_json::from_slice::<Envelope>(body) {
            Ok(env) => Ok((env.readings.len(), env.id)),
            Err(_) => serde_json::from_slice::<IgnoredAny>(body).map(|_| (1, None)),
        },
    }
}

fn answer(accepted: usize) -> String {
    format!(r#"{{"accepted":{accepted},"duplicates":0,"rejected":[]}}"#)
}

async fn ingest(headers: HeaderMap, body: Bytes) -> Response {
    let ndjson = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-ndjson"));
    let counted = if ndjson {
        body.split(|b| *b == b'\n')
            .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
            .try_fold(0, |n, line| {
                serde_json::from_slice::<IgnoredAny>(line).map(|_| n + 1)
            })
    } else {
        count_json(&body).map(|(n, _)| n)
    };
    match counted {
        Ok(n) => (
            StatusCode::OK,
            [(CONTENT_TYPE, "application/json")],
            answer(n),
        )
            .into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

async fn ws(upgrade: WebSocketUpgrade) -> Response {
    upgrade
        .max_message_size(MAX_BODY)
        .on_upgrade(frames)
        .into_response()
}

async fn frames(mut socket: WebSocket) {
    let mut n: u64 = 0;
    while let Some(Ok(msg)) = socket.recv().await {
        let text = match msg {
            Message::Text(t) => t,
            Message::Close(_) => break,
            _ => continue,
        };
        n += 1;
        let reply = match count_json(text.as_bytes()) {
            Ok((count, id)) => {
                let id = id
                    .map(|i| format!(r#","id":{}"#, serde_json::Value::String(i)))
                    .unwrap_or_default();
                format!(r#"{{"ack":{n}{id},"accepted":{count},"duplicates":0,"rejected":[]}}"#)
            }
            Err(e) => format!(
                r#"{{"ack":{n},"error":{{"code":"malformed","detail":{}}}}}"#,
                serde_json::Value::String(e.to_string())
            ),
        };
        if socket.send(Message::Text(reply.into())).await.is_err() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_arrays_envelopes_and_single_readings() {
        assert_eq!(count_json(br#"[{"a":1},{"b":[1,2]}]"#).unwrap(), (2, None));
        assert_eq!(
            count_json(br#"{"id":"x","readings":[{},{},{}]}"#).unwrap(),
            (3, Some("x".into()))
        );
        assert_eq!(
            count_json(br#"{"device_id":"d","metrics":{"t":1}}"#).unwrap(),
            (1, None)
        );
        assert!(count_json(b"[1,").is_err());
        assert!(count_json(b"nope").is_err());
    }
}
