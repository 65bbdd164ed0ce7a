//! CBOR (SPEC §10) end to end: bodies built by Python's `cbor2` (tests/clients/cbor_bodies.py,
//! from the venv `scripts/test` makes), posted as `application/cbor` and sent as binary
//! WebSocket frames to a real Sluice, then read back through `/v1/devices/{id}/readings` and
//! compared exactly, as sets: the integer extremes, floats, booleans, tags and every form of
//! `ts`. Bodies that are not CBOR (cut short, an indefinite-length map with no end) and CBOR
//! the decoder refuses (nested 10 000 deep, an unassigned simple value) get their specific
//! answer and are counted as malformed; readings refused one by one (a negative bignum beyond
//! 128 bits among them) leave their neighbours stored; a body of more readings than
//! `limits.max_readings_per_request` is a 413 whatever their size.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use common::{run_client_script, spawn_app, unhex, TestApp};

/// One reading as a canonical string (`serde_json` sorts object keys), for set comparison.
fn canonical(ts_ms: i64, r: &Value) -> String {
    json!({"ts": ts_ms, "seq": r["seq"], "metrics": r["metrics"], "tags": r["tags"]}).to_string()
}

/// Every stored reading of `device`, canonical; empty when the device has none.
async fn stored(app: &TestApp, device: &str) -> BTreeSet<String> {
    let (status, body) = app
        .get_json(&format!("/v1/devices/{device}/readings?limit=10000"))
        .await;
    if status == 404 {
        return BTreeSet::new();
    }
    assert_eq!(status, 200, "{device}: {body}");
    body["readings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let ts = sluice::reading::parse_ts(r["ts"].as_str().unwrap()).unwrap();
            canonical(ts, r)
        })
        .collect()
}

/// The readings stored for each device are exactly `expected` (the script's lists).
async fn check_stored(app: &TestApp, expected: &[&Value]) {
    let mut by_device: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for e in expected.iter().flat_map(|list| list.as_array().unwrap()) {
        by_device
            .entry(e["device_id"].as_str().unwrap().to_owned())
            .or_default()
            .insert(canonical(e["ts_ms"].as_i64().unwrap(), e));
    }
    for (device, want) in by_device {
        assert_eq!(stored(app, &device).await, want, "{device}");
    }
}

async fn post_cbor(app: &TestApp, body: Vec<u8>) -> (u16, Value) {
    let res = app.post_raw("application/cbor", body).await;
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

async fn malformed_count(app: &TestApp, transport: &str) -> f64 {
    app.metric(
        "sluice_readings_rejected_total",
        &[("transport", transport), ("reason", "malformed")],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cbor2_bodies_over_http_read_back_exactly() {
    let app = spawn_app().await;
    let now = sluice::reading::now_ms().to_string();
    let cases = tokio::task::spawn_blocking(move || {
        run_client_script("cbor_bodies.py", &["cbor", &now, "http"])
    })
    .await
    .unwrap();

    for (name, accepted) in [("array", 3), ("single", 1), ("envelope", 1)] {
        let (status, body) = post_cbor(&app, unhex(&cases[name]["body"])).await;
        assert_eq!(status, 200, "{name}: {body}");
        assert_eq!(body["accepted"], accepted, "{name}: {body}");
        assert_eq!(body["rejected"], json!([]), "{name}: {body}");
    }
    // Values JSON cannot carry: those readings are refused by index, neighbours stored.
    let (status, body) = post_cbor(&app, unhex(&cases["mixed"]["body"])).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accepted"], 2, "{body}");
    let rejected: Vec<(u64, &str, &str)> = body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["index"].as_u64().unwrap(),
                r["reason"].as_str().unwrap(),
                r["error"].as_str().unwrap(),
            )
        })
        .collect();
    let finite = "metrics.t: expected a finite number or a boolean";
    assert_eq!(
        rejected,
        vec![
            (1, "invalid_metrics", finite),
            (2, "invalid_metrics", finite),
            (3, "invalid_metrics", finite),
            (4, "invalid_metrics", "metrics.t: integer 18446744073709551616 is outside -9223372036854775808..18446744073709551615, the range kept exactly"),
        ]
    );
    check_stored(
        &app,
        &[
            &cases["array"]["expected"],
            &cases["single"]["expected"],
            &cases["envelope"]["expected"],
            &cases["mixed"]["expected"],
        ],
    )
    .await;
    assert_eq!(
        app.metric(
            "sluice_readings_rejected_total",
            &[("transport", "http"), ("reason", "invalid_metrics")]
        )
        .await,
        4.0
    );

    // Not CBOR: a 400 naming the fault, counted as malformed, nothing stored.
    let before = malformed_count(&app, "http").await;
    for (name, detail) in [
        ("truncated", "truncated CBOR: the body ends inside an item"),
        ("deep", "CBOR nested deeper than 16 levels"),
        (
            "unterminated_map",
            "truncated CBOR: the body ends inside an item",
        ),
    ] {
        let (status, body) = post_cbor(&app, unhex(&cases[name]["body"])).await;
        assert_eq!(status, 400, "{name}: {body}");
        let got = body["detail"].as_str().unwrap_or_default();
        assert!(got.starts_with(detail), "{name}: {body}");
    }
    assert_eq!(malformed_count(&app, "http").await - before, 3.0);
    assert!(stored(&app, "http-bad").await.is_empty());
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(app: &TestApp, device: &str) -> Ws {
    let url = format!("ws://{}/v1/ws?device_id={device}", app.addr);
    tokio_tungstenite::connect_async(url)
        .await
        .expect("ws connects")
        .0
}

/// The next message: a binary ack decoded from CBOR, or the close code and reason.
async fn next_answer(ws: &mut Ws) -> Result<Value, (u16, String)> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("an answer within 10 s")
            .expect("stream open")
            .expect("no error");
        match msg {
            Message::Binary(b) => return Ok(ciborium::from_reader(b.as_ref()).expect("a CBOR ack")),
            Message::Close(Some(f)) => return Err((f.code.into(), f.reason.to_string())),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected message: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cbor2_frames_over_websocket_get_cbor_acks() {
    let app = spawn_app().await;
    let now = sluice::reading::now_ms().to_string();
    let cases = tokio::task::spawn_blocking(move || {
        run_client_script("cbor_bodies.py", &["cbor", &now, "ws"])
    })
    .await
    .unwrap();
    let ws_case = &cases["ws"];
    let device = ws_case["device"].as_str().unwrap();
    let frames: Vec<Vec<u8>> = ws_case["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(unhex)
        .collect();

    let mut ws = connect(&app, device).await;
    for frame in &frames[..2] {
        ws.send(Message::Binary(frame.clone().into()))
            .await
            .unwrap();
    }
    let ack = next_answer(&mut ws).await.unwrap();
    assert_eq!(
        ack,
        json!({"ack": 1, "accepted": 1, "duplicates": 0, "rejected": []})
    );
    let ack = next_answer(&mut ws).await.unwrap();
    assert_eq!(ack["ack"], 2, "{ack}");
    assert_eq!(ack["id"], "frame-2", "{ack}");
    assert_eq!(ack["accepted"], 1, "{ack}");
    assert_eq!(ack["rejected"].as_array().unwrap().len(), 1, "{ack}");
    assert_eq!(ack["rejected"][0]["index"], 1, "{ack}");
    assert_eq!(
        ack["rejected"][0]["error"],
        "metrics.f: expected a finite number or a boolean"
    );
    // Well-formed CBOR with an envelope id too long: an error ack, and the socket stays open.
    ws.send(Message::Binary(frames[5].clone().into()))
        .await
        .unwrap();
    let ack = next_answer(&mut ws).await.unwrap();
    assert_eq!(
        ack,
        json!({"ack": 3, "error": {"code": "malformed", "detail": "id: longer than 64 characters"}})
    );
    check_stored(&app, &[&ws_case["expected"]]).await;

    // Valid CBOR this decoder refuses (nested 10 000 deep): an error ack, the socket stays
    // open and goes on taking frames.
    ws.send(Message::Binary(frames[3].clone().into()))
        .await
        .unwrap();
    let ack = next_answer(&mut ws).await.unwrap();
    assert_eq!(ack["ack"], 4, "{ack}");
    assert_eq!(ack["error"]["code"], "malformed", "{ack}");
    assert_eq!(
        ack["error"]["detail"], "CBOR nested deeper than 16 levels",
        "{ack}"
    );

    // Not CBOR: the connection closes with 1003, saying why.
    let before = malformed_count(&app, "ws").await;
    for (i, reason) in [
        (2, "truncated CBOR: the body ends inside an item"),
        (4, "truncated CBOR: the body ends inside an item"),
    ] {
        let mut ws = connect(&app, device).await;
        ws.send(Message::Binary(frames[i].clone().into()))
            .await
            .unwrap();
        let (code, got) = next_answer(&mut ws).await.unwrap_err();
        assert_eq!(code, 1003, "frame {i}: {got}");
        assert!(got.starts_with(reason), "frame {i}: {got}");
    }
    assert_eq!(malformed_count(&app, "ws").await - before, 2.0);
    // Nothing of those frames was stored.
    check_stored(&app, &[&ws_case["expected"]]).await;
}

/// A CBOR head (RFC 8949 §3) with a 4-byte argument, for hand-built bodies.
fn head(major: u8, n: u32) -> Vec<u8> {
    let mut out = vec![(major << 5) | 26];
    out.extend_from_slice(&n.to_be_bytes());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_cbor_is_refused_by_count_or_by_reading() {
    let app = spawn_app().await;
    let now = sluice::reading::now_ms();

    // 10 001 empty maps (one byte each): a 413 from the heads alone, before anything is built.
    let mut many = head(4, 10_001);
    many.extend(std::iter::repeat_n(0xa0, 10_001));
    let (status, body) = post_cbor(&app, many.clone()).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(
        body["detail"], "10001 readings exceed the limit of 10000 per request",
        "{body}"
    );
    // The same inside an envelope.
    let mut envelope = vec![0xa1, 0x68];
    envelope.extend_from_slice(b"readings");
    envelope.extend_from_slice(&many);
    let (status, body) = post_cbor(&app, envelope).await;
    assert_eq!(status, 413, "{body}");

    // A negative bignum below -2^127 (tag 3 on sixteen 0xff bytes) refuses its own reading;
    // its neighbour is stored.
    let reading = |seq: u64, value: &[u8]| {
        let mut out = vec![0xa4];
        for (k, v) in [("device_id", &b"\x68cbor-big"[..]), ("ts", &[][..])] {
            out.push(0x60 | k.len() as u8);
            out.extend_from_slice(k.as_bytes());
            if k == "ts" {
                out.push(0x1b);
                out.extend_from_slice(&(now as u64).to_be_bytes());
            } else {
                out.extend_from_slice(v);
            }
        }
        out.extend_from_slice(&[0x63, b's', b'e', b'q', 0x18, seq as u8]);
        out.extend_from_slice(&[0x67]);
        out.extend_from_slice(b"metrics");
        out.extend_from_slice(&[0xa1, 0x61, b'v']);
        out.extend_from_slice(value);
        out
    };
    let mut bignum = vec![0xc3, 0x50];
    bignum.extend_from_slice(&[0xff; 16]);
    let mut body = vec![0x82];
    body.extend(reading(1, &bignum));
    body.extend(reading(2, &[0x18, 42]));
    let (status, answer) = post_cbor(&app, body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["accepted"], 1, "{answer}");
    assert_eq!(answer["rejected"][0]["index"], 0, "{answer}");
    assert_eq!(
        answer["rejected"][0]["reason"], "invalid_metrics",
        "{answer}"
    );
    let error = answer["rejected"][0]["error"].as_str().unwrap();
    assert!(error.starts_with("metrics.v: integer"), "{answer}");
    assert!(error.contains("outside"), "{answer}");
    assert_eq!(app.stored_seqs("cbor-big").await, BTreeSet::from([2]));

    // An unassigned simple value (simple 16) is valid CBOR the decoder cannot hold: the
    // body is refused with a 400 naming it; over WebSocket an error ack, not a 1003.
    let (status, answer) = post_cbor(&app, vec![0xf0]).await;
    assert_eq!(status, 400, "{answer}");
    let mut ws = connect(&app, "cbor-simple").await;
    ws.send(Message::Binary(vec![0xf0].into())).await.unwrap();
    let ack = next_answer(&mut ws).await.unwrap();
    assert_eq!(ack["ack"], 1, "{ack}");
    assert_eq!(ack["error"]["code"], "malformed", "{ack}");
    // A text string that is not UTF-8 is not valid CBOR (RFC 8949 §5.3.1): 1003.
    ws.send(Message::Binary(vec![0x62, 0xff, 0xfe].into()))
        .await
        .unwrap();
    let (code, reason) = next_answer(&mut ws).await.unwrap_err();
    assert_eq!(code, 1003, "{reason}");
    assert!(reason.contains("not UTF-8"), "{reason}");
}
