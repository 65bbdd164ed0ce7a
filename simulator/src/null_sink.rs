//! `sluice-sim null-sink`: a server that parses readings and acknowledges them at once.
//!
//! It speaks just enough of Sluice's ingest API for the simulator — `POST /v1/readings` (JSON,
//! NDJSON, CBOR, SenML JSON and CBOR), `POST /api/v2/write` and `/write` (line protocol) and
//! `GET /v1/ws` (text and binary frames) — so that the simulator can be measured alone: if the
//! simulator drives the sink at twice what Sluice stores, it is not the bottleneck of a
//! benchmark. Each body or frame is parsed (serde_json or ciborium, every value visited,
//! nothing kept) and answered `{"accepted": n, "duplicates": 0, "rejected": []}` (a binary
//! frame with the same fields in CBOR; line protocol with 204), with no validation and no
//! store. SenML packs count one reading per resolved (device, time), as Sluice groups them.

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
        .route("/api/v2/write", post(line_write))
        .route("/write", post(line_write))
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

/// Readings in a CBOR item: an array, an envelope (`readings`), or one reading.
fn count_cbor(body: &[u8]) -> Result<(usize, Option<String>), String> {
    let v: ciborium::Value = ciborium::from_reader(body).map_err(|e| e.to_string())?;
    Ok(match &v {
        ciborium::Value::Array(a) => (a.len(), None),
        ciborium::Value::Map(m) => {
            let field = |name: &str| m.iter().find(|(k, _)| k.as_text() == Some(name));
            match field("readings") {
                Some((_, ciborium::Value::Array(a))) => (
                    a.len(),
                    field("id").and_then(|(_, v)| v.as_text().map(str::to_string)),
                ),
                _ => (1, None),
            }
        }
        _ => (1, None),
    })
}

/// One SenML record's base name, base time, name and time, whatever the encoding.
#[derive(Default)]
struct Record {
    bn: Option<String>,
    bt: Option<f64>,
    n: Option<String>,
    t: Option<f64>,
}

/// Readings in a SenML pack: distinct resolved (device, time), RFC 8428 §4.6.
fn count_senml(records: impl Iterator<Item = Record>) -> usize {
    let (mut bn, mut bt) = (String::new(), 0.0);
    let mut seen = std::collections::HashSet::new();
    for r in records {
        if let Some(b) = r.bn {
            bn = b;
        }
        if let Some(b) = r.bt {
            bt = b;
        }
        let name = format!("{bn}{}", r.n.unwrap_or_default());
        let device = name.rsplit_once('/').map_or("", |(d, _)| d).to_string();
        let ms = ((bt + r.t.unwrap_or(0.0)) * 1000.0).round() as i64;
        seen.insert((device, ms));
    }
    seen.len()
}

fn senml_json(body: &[u8]) -> Result<usize, String> {
    let pack: Vec<serde_json::Map<String, serde_json::Value>> =
        serde_json::from_slice(body).map_err(|e| e.to_string())?;
    Ok(count_senml(pack.into_iter().map(|r| Record {
        bn: r.get("bn").and_then(|v| v.as_str()).map(str::to_string),
        bt: r.get("bt").and_then(|v| v.as_f64()),
        n: r.get("n").and_then(|v| v.as_str()).map(str::to_string),
        t: r.get("t").and_then(|v| v.as_f64()),
    })))
}

fn senml_cbor(body: &[u8]) -> Result<usize, String> {
    use crate::encode::senml::label;
    let v: ciborium::Value = ciborium::from_reader(body).map_err(|e| e.to_string())?;
    let pack = v.as_array().ok_or("a SenML pack is an array")?;
    let number = |v: &ciborium::Value| {
        v.as_float().or_else(|| {
            v.as_integer()
                .and_then(|i| i64::try_from(i).ok())
                .map(|i| i as f64)
        })
    };
    Ok(count_senml(pack.iter().map(|rec| {
        let mut r = Record::default();
        for (k, v) in rec.as_map().map(Vec::as_slice).unwrap_or_default() {
            match k.as_integer().and_then(|i| i64::try_from(i).ok()) {
                Some(label::BN) => r.bn = v.as_text().map(str::to_string),
                Some(label::BT) => r.bt = number(v),
                Some(label::N) => r.n = v.as_text().map(str::to_string),
                Some(6) => r.t = number(v),
                _ => {}
            }
        }
        r
    })))
}

fn answer(accepted: usize) -> String {
    format!(r#"{{"accepted":{accepted},"duplicates":0,"rejected":[]}}"#)
}

async fn ingest(headers: HeaderMap, body: Bytes) -> Response {
    let ct = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let counted = if ct.starts_with("application/x-ndjson") {
        body.split(|b| *b == b'\n')
            .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
            .try_fold(0, |n, line| {
                serde_json::from_slice::<IgnoredAny>(line).map(|_| n + 1)
            })
            .map_err(|e| e.to_string())
    } else if ct.starts_with("application/senml+json") {
        senml_json(&body)
    } else if ct.starts_with("application/senml+cbor") {
        senml_cbor(&body)
    } else if ct.starts_with("application/cbor") {
        count_cbor(&body).map(|(n, _)| n)
    } else {
        count_json(&body).map(|(n, _)| n).map_err(|e| e.to_string())
    };
    match counted {
        Ok(n) => (
            StatusCode::OK,
            [(CONTENT_TYPE, "application/json")],
            answer(n),
        )
            .into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, e).into_response(),
    }
}

/// Line protocol: every line that is not blank or a comment is a reading; 204.
async fn line_write(body: Bytes) -> Response {
    match std::str::from_utf8(&body) {
        Ok(text) => {
            let n = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .count();
            std::hint::black_box(n);
            StatusCode::NO_CONTENT.into_response()
        }
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
            Message::Binary(b) => {
                n += 1;
                if socket
                    .send(Message::Binary(cbor_ack(n, &b).into()))
                    .await
                    .is_err()
                {
                    break;
                }
                continue;
            }
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

/// The ack of binary frame `n`, in CBOR: the JSON ack's fields.
fn cbor_ack(n: u64, frame: &[u8]) -> Vec<u8> {
    use crate::encode::cbor;
    let mut out = Vec::with_capacity(48);
    match count_cbor(frame) {
        Ok((count, id)) => {
            cbor::map(&mut out, if id.is_some() { 5 } else { 4 });
            cbor::text(&mut out, "ack");
            cbor::uint(&mut out, n);
            if let Some(id) = id {
                cbor::text(&mut out, "id");
                cbor::text(&mut out, &id);
            }
            cbor::text(&mut out, "accepted");
            cbor::uint(&mut out, count as u64);
            cbor::text(&mut out, "duplicates");
            cbor::uint(&mut out, 0);
            cbor::text(&mut out, "rejected");
            cbor::array(&mut out, 0);
        }
        Err(e) => {
            cbor::map(&mut out, 2);
            cbor::text(&mut out, "ack");
            cbor::uint(&mut out, n);
            cbor::text(&mut out, "error");
            cbor::map(&mut out, 2);
            cbor::text(&mut out, "code");
            cbor::text(&mut out, "malformed");
            cbor::text(&mut out, "detail");
            cbor::text(&mut out, &e);
        }
    }
    out
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

    #[test]
    fn counts_cbor_and_senml_readings() {
        use crate::encode::{Encoder, Format};
        use crate::fleet::{FleetProfile, FleetSpec};
        for format in [Format::Cbor, Format::SenmlJson, Format::SenmlCbor] {
            let mut devs = FleetSpec {
                prefix: "ns".into(),
                devices: 2,
                profile: FleetProfile::Mixed,
                metrics: 3,
                seed: 1,
                seq_start: 1,
                bad_ratio: 0.0,
                distinct_ts: format.needs_distinct_ts(),
            }
            .build();
            let mut enc = Encoder::new(format, true, true, 7, 3);
            for i in 0..7 {
                enc.push(&mut devs[i % 2], 1_795_000_000_000);
            }
            let body = enc.finish().bytes;
            let n = match format {
                Format::Cbor => count_cbor(&body).unwrap().0,
                Format::SenmlJson => senml_json(&body).unwrap(),
                _ => senml_cbor(&body).unwrap(),
            };
            assert_eq!(n, 7, "{format:?}");
        }
        let ack = cbor_ack(3, &[0x82, 0x01, 0x02]);
        let v: ciborium::Value = ciborium::from_reader(&ack[..]).unwrap();
        let m = v.as_map().unwrap();
        assert_eq!(m[0].0.as_text(), Some("ack"));
        assert_eq!(m[1].0.as_text(), Some("accepted"));
        assert_eq!(m[1].1.as_integer(), Some(2.into()));
    }
}
