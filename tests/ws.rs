//! Device WebSocket ingest and live streams, against a real Sluice with a real WebSocket client.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn connect(app: &TestApp, path: &str) -> Ws {
    let url = format!("ws://{}{}", app.addr, path);
    tokio_tungstenite::connect_async(url)
        .await
        .expect("ws connects")
        .0
}

/// A client whose socket buffers are tiny, so that back-pressure shows quickly.
async fn connect_small_buffers(app: &TestApp, path: &str) -> WebSocketStream<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.set_send_buffer_size(4096).unwrap();
    let stream = socket.connect(app.addr).await.unwrap();
    let url = format!("ws://{}{}", app.addr, path);
    tokio_tungstenite::client_async(url, stream)
        .await
        .expect("ws handshake")
        .0
}

/// Reads until the close frame and returns its code.
async fn close_code<S>(ws: &mut WebSocketStream<S>) -> u16
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    close_code_or_gone(ws, false).await
}

/// As `close_code`, but returns 0 if the connection errors first (see the caller).
async fn close_code_or_gone<S>(ws: &mut WebSocketStream<S>, tolerate_io_error: bool) -> u16
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(frame))))) => return frame.code.into(),
            Ok(Some(Ok(Message::Close(None)))) => return 1005,
            Ok(Some(Ok(_))) => continue,
            // A peer that was not reading may fail writing its queued pongs once the server
            // has closed; the server-side close is then checked through the gauge.
            Ok(Some(Err(_))) if tolerate_io_error => return 0,
            Ok(Some(Err(e))) => panic!("error before close: {e}"),
            Ok(None) => panic!("stream ended without a close frame"),
            Err(_) => panic!("no close within 10 s"),
        }
    }
}

async fn send_text(ws: &mut Ws, v: &Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

#[tokio::test]
async fn round_trip_with_ordered_acks_and_envelope_ids() {
    let app = spawn_app().await;
    let mut ws = connect(&app, "/v1/ws").await;
    send_text(&mut ws, &reading("ws-1", 1)).await;
    send_text(
        &mut ws,
        &json!([reading("ws-1", 2), reading("ws-1", 3), reading("ws-1", 2)]),
    )
    .await;
    send_text(&mut ws, &json!({"id": "batch-a", "readings": [reading("ws-1", 4), {"device_id": "ws-1", "metrics": {"x": "bad"}}]})).await;

    let a1 = next_ws_json(&mut ws, Duration::from_secs(10)).await;
    assert_eq!(
        a1,
        json!({"ack": 1, "accepted": 1, "duplicates": 0, "rejected": []})
    );
    let a2 = next_ws_json(&mut ws, Duration::from_secs(10)).await;
    assert_eq!(
        a2,
        json!({"ack": 2, "accepted": 2, "duplicates": 1, "rejected": []})
    );
    let a3 = next_ws_json(&mut ws, Duration::from_secs(10)).await;
    assert_eq!(a3["ack"], 3);
    assert_eq!(a3["id"], "batch-a");
    assert_eq!(a3["accepted"], 1);
    assert_eq!(a3["rejected"][0]["index"], 1);
    assert_eq!(a3["rejected"][0]["reason"], "invalid_metrics");
    assert_eq!(
        a3["rejected"][0]["error"],
        "metrics.x: expected a finite number or a boolean"
    );
    assert_eq!(app.stored_seqs("ws-1").await, [1, 2, 3, 4].into());
    assert_eq!(
        app.metric("sluice_readings_accepted_total", &[("transport", "ws")])
            .await,
        4.0
    );
    assert_eq!(
        app.metric("sluice_ws_connections", &[("kind", "device")])
            .await,
        1.0
    );
    ws.close(None).await.unwrap();
    wait_until(
        Duration::from_secs(5),
        "the connection gauge to drop",
        || async {
            app.metric("sluice_ws_connections", &[("kind", "device")])
                .await
                == 0.0
        },
    )
    .await;
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_thousand_pipelined_frames_are_acked_in_order() {
    let app = spawn_app().await;
    let mut ws = connect(&app, "/v1/ws?device_id=pipe-1").await;
    let (mut tx, mut rx) = ws.split();
    let sender = tokio::spawn(async move {
        for seq in 0..1000u64 {
            let frame = json!({"seq": seq, "metrics": {"v": seq}});
            tx.send(Message::Text(frame.to_string().into()))
                .await
                .unwrap();
        }
        tx
    });
    let mut n = 0u64;
    while n < 1000 {
        let msg = tokio::time::timeout(Duration::from_secs(20), rx.next())
            .await
            .expect("ack within 20 s")
            .unwrap()
            .unwrap();
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(&t).unwrap();
            n += 1;
            assert_eq!(v["ack"], n, "acks in frame order");
            assert_eq!(v["accepted"], 1, "{v}");
        }
    }
    let tx = sender.await.unwrap();
    ws = tx.reunite(rx).unwrap();
    assert_eq!(app.stored_seqs("pipe-1").await, (0..1000).collect());
    ws.close(None).await.unwrap();
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_frames_get_error_acks_and_the_connection_survives() {
    let app = spawn_app().await;
    let mut ws = connect(&app, "/v1/ws?device_id=bound-1").await;

    // Not JSON.
    ws.send(Message::Text("this is not json".into()))
        .await
        .unwrap();
    let a = next_ws_json(&mut ws, Duration::from_secs(10)).await;
    assert_eq!(a["ack"], 1);
    assert_eq!(a["error"]["code"], "malformed");
    assert!(
        a["error"]["detail"]
            .as_str()
            .unwrap()
            .contains("line 1 column"),
        "{a}"
    );

    // 10 001 readings in one frame.
    let many: Vec<Value> = (0..10_001)
        .map(|i| json!({"seq": i, "metrics": {"v": 1}}))
        .collect();
    send_text(&mut ws, &json!({"id": "big", "readings": many})).await;
    let a = next_ws_json(&mut ws, Duration::from_secs(10)).await;
    assert_eq!(a["ack"], 2);
    assert_eq!(a["id"], "big");
    assert_eq!(a["error"]["code"], "too_many_readings");

    // A bound connection naming another device: a per-reading error, neighbours taken.
    send_text(&mut ws, &json!([{"device_id": "other-9", "seq": 1, "metrics": {"v": 1}}, {"seq": 2, "metrics": {"v": 2}}])).await;
    let a = next_ws_json(&mut ws, Duration::from_secs(10)).await;
    assert_eq!(a["ack"], 3);
    assert_eq!(a["accepted"], 1);
    assert_eq!(a["rejected"][0]["index"], 0);
    assert_eq!(a["rejected"][0]["reason"], "device_mismatch");
    assert!(a["rejected"][0]["error"]
        .as_str()
        .unwrap()
        .starts_with("device_id: `other-9` does not match"));

    // Still alive.
    send_text(&mut ws, &json!({"seq": 3, "metrics": {"v": 3}})).await;
    assert_eq!(
        next_ws_json(&mut ws, Duration::from_secs(10)).await["accepted"],
        1
    );
    assert_eq!(app.stored_seqs("bound-1").await, [2, 3].into());
    assert_eq!(app.stored_seqs("other-9").await, BTreeSet::new());
    let m = |reason: &'static str| {
        let app = &app;
        async move {
            app.metric(
                "sluice_readings_rejected_total",
                &[("transport", "ws"), ("reason", reason)],
            )
            .await
        }
    };
    assert_eq!(m("malformed").await, 1.0);
    assert_eq!(m("too_many_readings").await, 10_001.0);
    assert_eq!(m("device_mismatch").await, 1.0);
    ws.close(None).await.unwrap();
    app.shutdown().await.unwrap();
}

/// Each `rejected[]` entry carries `reason`, the label value its reading was counted under in
/// `sluice_readings_rejected_total`, beside `error`: the same entries over HTTP and over a
/// WebSocket, for every kind of bad reading (SPEC §3).
#[tokio::test]
async fn rejected_entries_carry_the_metric_reason_over_http_and_ws() {
    let app = spawn_app().await;
    let now = sluice::reading::now_ms();
    let many_tags: serde_json::Map<String, Value> =
        (0..17).map(|i| (format!("t{i}"), json!("v"))).collect();
    // (bad reading, its reason, the start of its error)
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            json!({"device_id": "a/b", "metrics": {"x": 1}}),
            "invalid_device_id",
            "device_id: '/' is not allowed",
        ),
        (
            json!({"device_id": "why-1", "metrics": {"x": "warm"}}),
            "invalid_metrics",
            "metrics.x: expected a finite number or a boolean",
        ),
        (
            json!({"device_id": "why-1", "metrics": {"bad name": 1}}),
            "invalid_metrics",
            "metrics.bad name: ",
        ),
        (
            json!({"device_id": "why-1", "ts": now + 3_600_000, "metrics": {"x": 1}}),
            "invalid_ts",
            "ts: ",
        ),
        (
            json!({"device_id": "why-1", "seq": -1, "metrics": {"x": 1}}),
            "invalid_seq",
            "seq: ",
        ),
        (
            json!({"device_id": "why-1", "metrics": {"x": 1}, "tags": {"site": 7}}),
            "invalid_tags",
            "tags: ",
        ),
        (
            json!({"device_id": "why-1", "metrics": {"x": 1}, "tags": many_tags}),
            "invalid_tags",
            "tags: at most 16 tags",
        ),
        (
            json!({"device_id": "why-1", "metrics": {"x": 1}, "tags": {"bad key": "x"}}),
            "invalid_tags",
            "tags.bad key: ",
        ),
        (
            json!({"device_id": "why-1", "metrics": {"x": 1}, "tags": {"site": "n".repeat(129)}}),
            "invalid_tags",
            "tags.site: value longer than 128 characters",
        ),
        (
            json!({"device_id": "why-1", "metrics": {"x": 1}, "colour": "red"}),
            "unknown_field",
            "colour: unknown field",
        ),
    ];
    // An integer outside −2^63..2^64−1 can only be written as raw JSON text.
    let out_of_range = r#"{"device_id":"why-1","metrics":{"d":18446744073709551616}}"#;
    let mut items: Vec<String> = vec![reading("why-1", 1).to_string()];
    items.extend(cases.iter().map(|(bad, _, _)| bad.to_string()));
    items.push(out_of_range.to_owned());
    let mut want: Vec<(usize, &str, &str)> = cases
        .iter()
        .enumerate()
        .map(|(i, (_, reason, error))| (i + 1, *reason, *error))
        .collect();
    want.push((
        cases.len() + 1,
        "invalid_metrics",
        "metrics.d: integer 18446744073709551616 is outside",
    ));
    let check = |answer: &Value, want: &[(usize, &str, &str)], transport: &str| {
        let got = answer["rejected"].as_array().unwrap();
        assert_eq!(got.len(), want.len(), "{transport}: {answer}");
        for (r, (index, reason, error)) in got.iter().zip(want) {
            assert_eq!(r["index"], *index, "{transport}: {r}");
            assert_eq!(r["reason"], *reason, "{transport}: {r}");
            let e = r["error"].as_str().unwrap();
            assert!(
                e.starts_with(error),
                "{transport}: `{e}` should start with `{error}`"
            );
        }
    };

    let res = app
        .post_raw(
            "application/json",
            format!("[{}]", items.join(",")).into_bytes(),
        )
        .await;
    assert_eq!(res.status(), 200);
    let answer: Value = res.json().await.unwrap();
    assert_eq!(answer["accepted"], 1, "{answer}");
    check(&answer, &want, "http");

    // Over a connection bound to `why-1`, naming another device is one more kind.
    let mut ws = connect(&app, "/v1/ws?device_id=why-1").await;
    items[0] = reading("why-1", 2).to_string();
    items.push(json!({"device_id": "other-1", "metrics": {"x": 1}}).to_string());
    want.push((
        items.len() - 1,
        "device_mismatch",
        "device_id: `other-1` does not match",
    ));
    let rejected_ws = |reason: &'static str| {
        let app = &app;
        async move {
            app.metric(
                "sluice_readings_rejected_total",
                &[("transport", "ws"), ("reason", reason)],
            )
            .await
        }
    };
    ws.send(Message::Text(format!("[{}]", items.join(",")).into()))
        .await
        .unwrap();
    let answer = next_ws_json(&mut ws, Duration::from_secs(10)).await;
    assert_eq!(answer["accepted"], 1, "{answer}");
    check(&answer, &want, "ws");
    // Each reason is the label its reading was counted under.
    for reason in BTreeSet::from_iter(want.iter().map(|w| w.1)) {
        let n = want.iter().filter(|w| w.1 == reason).count() as f64;
        assert_eq!(rejected_ws(reason).await, n, "{reason}");
    }
    assert_eq!(app.stored_seqs("why-1").await, [1, 2].into());

    // A frame that fails as a whole has no `rejected[]`: an error ack, counted by its reason.
    let long_id = "i".repeat(65);
    send_text(
        &mut ws,
        &json!({"id": long_id, "readings": [reading("why-1", 3)]}),
    )
    .await;
    let answer = next_ws_json(&mut ws, Duration::from_secs(10)).await;
    assert_eq!(answer["error"]["code"], "malformed", "{answer}");
    assert_eq!(answer["error"]["detail"], "id: longer than 64 characters");
    assert_eq!(rejected_ws("malformed").await, 1.0);
    ws.close(None).await.unwrap();
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn protocol_violations_close_with_the_spec_codes() {
    let app = spawn_app().await;

    // A 2 MiB message: 1009.
    let mut ws = connect(&app, "/v1/ws").await;
    let big = format!("[{}]", " ".repeat(2 * 1024 * 1024));
    let _ = ws.send(Message::Text(big.into())).await;
    assert_eq!(close_code(&mut ws).await, 1009);

    // A binary frame that is not one CBOR item (the integer 1, then two stray bytes): 1003.
    let mut ws = connect(&app, "/v1/ws").await;
    ws.send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    assert_eq!(close_code(&mut ws).await, 1003);

    // Invalid UTF-8 in a text frame: 1007.
    let mut ws = connect(&app, "/v1/ws").await;
    let frame = Frame::message(vec![0xff, 0xfe, 0x22], OpCode::Data(Data::Text), true);
    ws.send(Message::Frame(frame)).await.unwrap();
    assert_eq!(close_code(&mut ws).await, 1007);

    // An invalid ?device_id= is refused before the upgrade.
    let res = app
        .client
        .get(app.url("/v1/ws?device_id=a%20b"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["type"], "urn:sluice:malformed", "{body}");
    assert!(
        body["detail"].as_str().unwrap().starts_with("device_id: "),
        "{body}"
    );

    // The service survives all of it.
    let mut ws = connect(&app, "/v1/ws").await;
    send_text(&mut ws, &reading("after-violations", 1)).await;
    assert_eq!(
        next_ws_json(&mut ws, Duration::from_secs(10)).await["accepted"],
        1
    );
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_peer_that_never_answers_pings_is_closed_after_the_idle_timeout() {
    let app = spawn_app_with(|s| {
        s.ws.ping_interval = Duration::from_millis(200);
        s.ws.idle_timeout = Duration::from_millis(800);
    })
    .await;
    // This client never polls its stream, so it never answers a ping.
    let mut silent = connect(&app, "/v1/ws").await;
    // A live client that reads (and so answers pings) stays open meanwhile.
    let mut lively = connect(&app, "/v1/ws").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        // Reading keeps the lively client answering pings.
        let _ = tokio::time::timeout(Duration::from_millis(50), lively.next()).await;
        if app
            .metric("sluice_ws_connections", &[("kind", "device")])
            .await
            == 1.0
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the silent peer was not closed"
        );
    }
    let code = close_code_or_gone(&mut silent, true).await;
    assert!(code == 1001 || code == 0, "{code}");
    send_text(&mut lively, &reading("lively", 1)).await;
    assert_eq!(
        next_ws_json(&mut lively, Duration::from_secs(10)).await["accepted"],
        1
    );
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_peer_that_never_reads_acks_is_no_longer_read() {
    let app = spawn_app_with(|s| s.ws.max_in_flight = 8).await;
    let mut ws = connect_small_buffers(&app, "/v1/ws?device_id=deaf-1").await;
    // Frames whose acks are large (100 rejected readings each), so socket buffers fill fast.
    let bad: Vec<Value> = (0..100).map(|_| json!({"metrics": {"v": "x"}})).collect();
    let frame = Message::Text(Value::Array(bad).to_string().into());
    let mut sent = 0u64;
    loop {
        match tokio::time::timeout(Duration::from_secs(2), ws.send(frame.clone())).await {
            Ok(Ok(())) => sent += 1,
            Ok(Err(e)) => panic!("send failed: {e}"),
            Err(_) => break, // the server stopped reading: our send is stuck
        }
        assert!(sent < 1_000_000, "the server never pushed back");
    }
    let read = app
        .metric("sluice_readings_received_total", &[("transport", "ws")])
        .await
        / 100.0;
    assert!(read < sent as f64, "server read {read} of {sent} frames");
    // It stays stopped: no more frames are read while the acks are not consumed.
    let again = app
        .metric("sluice_readings_received_total", &[("transport", "ws")])
        .await
        / 100.0;
    assert_eq!(read, again);
    assert_eq!(
        app.metric("sluice_ws_connections", &[("kind", "device")])
            .await,
        1.0
    );
    // Other devices are unaffected.
    let mut other = connect(&app, "/v1/ws").await;
    send_text(&mut other, &reading("not-deaf", 1)).await;
    assert_eq!(
        next_ws_json(&mut other, Duration::from_secs(10)).await["accepted"],
        1
    );
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn connection_over_the_limit_is_closed_with_1013() {
    let app = spawn_app_with(|s| s.ws.max_connections = 1000).await;
    let mut open = Vec::with_capacity(1000);
    for _ in 0..1000 {
        open.push(connect(&app, "/v1/ws").await);
    }
    wait_until(Duration::from_secs(20), "1000 open connections", || async {
        app.metric("sluice_ws_connections", &[("kind", "device")])
            .await
            == 1000.0
    })
    .await;
    let mut extra = connect(&app, "/v1/ws").await;
    assert_eq!(close_code(&mut extra).await, 1013);
    // Closing one frees a slot.
    let mut first = open.pop().unwrap();
    first.close(None).await.unwrap();
    let _ = close_code(&mut first).await;
    wait_until(Duration::from_secs(10), "a free slot", || async {
        app.metric("sluice_ws_connections", &[("kind", "device")])
            .await
            == 999.0
    })
    .await;
    let mut again = connect(&app, "/v1/ws").await;
    send_text(&mut again, &reading("slot", 1)).await;
    assert_eq!(
        next_ws_json(&mut again, Duration::from_secs(10)).await["accepted"],
        1
    );
    drop(open);
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn live_subscribers_see_matching_committed_readings() {
    let app = spawn_app().await;
    let mut live = connect(&app, "/v1/live?device=green*&metric=temp*").await;
    wait_until(Duration::from_secs(5), "the subscriber", || async {
        app.metric("sluice_ws_connections", &[("kind", "live")])
            .await
            == 1.0
    })
    .await;
    app.post_json(&json!([
        {"device_id": "greenhouse-1", "seq": 1, "metrics": {"temperature": 21.5}},
        {"device_id": "barn-1", "seq": 1, "metrics": {"temperature": 18.0}},
        {"device_id": "greenhouse-2", "seq": 1, "metrics": {"humidity": 40}},
        {"device_id": "greenhouse-3", "seq": 7, "metrics": {"temp_soil": 12, "humidity": 30}}
    ]))
    .await;
    let first = next_ws_json(&mut live, Duration::from_secs(10)).await;
    assert_eq!(first["type"], "reading");
    assert_eq!(first["device_id"], "greenhouse-1");
    assert_eq!(first["metrics"]["temperature"], 21.5);
    let second = next_ws_json(&mut live, Duration::from_secs(10)).await;
    assert_eq!(second["device_id"], "greenhouse-3");
    assert_eq!(second["seq"], 7);
    // Nothing else matched: the next message is from a later post.
    app.post_json(&json!({"device_id": "greenhouse-9", "seq": 1, "metrics": {"temperature": 1}}))
        .await;
    assert_eq!(
        next_ws_json(&mut live, Duration::from_secs(10)).await["device_id"],
        "greenhouse-9"
    );
    app.shutdown().await.unwrap();
}

/// Posts `n` readings in batches of 1000; returns readings/s.
async fn ingest(app: &TestApp, device: &str, n: u64) -> f64 {
    let started = std::time::Instant::now();
    for start in (0..n).step_by(1000) {
        let batch: Vec<Value> = (start..start + 1000).map(|s| reading(device, s)).collect();
        let res = app.post_json(&Value::Array(batch)).await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.json::<Value>().await.unwrap()["accepted"], 1000);
    }
    n as f64 / started.elapsed().as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_live_subscriber_gets_lagged_and_does_not_slow_ingest() {
    let app = spawn_app_with(|s| s.ws.live_buffer = 16).await;
    let without = ingest(&app, "warmup", 20_000).await;

    let mut slow = connect_small_buffers(&app, "/v1/live").await;
    wait_until(Duration::from_secs(5), "the subscriber", || async {
        app.metric("sluice_ws_connections", &[("kind", "live")])
            .await
            == 1.0
    })
    .await;
    let with = ingest(&app, "busy", 20_000).await;
    eprintln!("ingest: {without:.0} readings/s without a stuck subscriber, {with:.0} with one");
    // A loose bound: a subscriber that never reads must not throttle ingest to its pace.
    assert!(
        with > without / 4.0,
        "ingest slowed from {without:.0}/s to {with:.0}/s"
    );
    assert!(
        app.metric("sluice_readings_accepted_total", &[("transport", "http")])
            .await
            >= 40_000.0
    );

    // When it finally reads, it is told how much it missed.
    let mut missed = 0u64;
    let mut readings = 0u64;
    while missed == 0 {
        let msg = tokio::time::timeout(Duration::from_secs(10), slow.next())
            .await
            .expect("a message")
            .unwrap()
            .unwrap();
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(&t).unwrap();
            match v["type"].as_str().unwrap() {
                "lagged" => missed = v["missed"].as_u64().unwrap(),
                "reading" => readings += 1,
                other => panic!("unexpected {other}"),
            }
        }
    }
    assert!(missed > 0);
    assert!(readings + missed <= 20_000, "{readings} + {missed}");
    app.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_every_frame_then_closes_1001_and_keeps_acked_readings() {
    let data = tempfile::tempdir().unwrap();
    let proc = SluiceProcess::start(data.path(), &[]);
    let client = reqwest::Client::new();
    wait_ready(&client, &format!("{}/readyz", proc.url())).await;
    let (ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/v1/ws?device_id=term-1", proc.addr))
            .await
            .unwrap();
    let (mut tx, mut rx) = ws.split();
    const FRAMES: u64 = 300;
    for f in 0..FRAMES {
        let frame: Vec<Value> = (0..10)
            .map(|i| json!({"seq": f * 10 + i, "metrics": {"v": i}}))
            .collect();
        tx.send(Message::Text(Value::Array(frame).to_string().into()))
            .await
            .unwrap();
    }
    tx.flush().await.unwrap();
    proc.signal(nix::sys::signal::Signal::SIGTERM);

    let mut answered = Vec::new();
    let mut acked = BTreeSet::new();
    let code = loop {
        let msg = tokio::time::timeout(Duration::from_secs(20), rx.next())
            .await
            .expect("answers within 20 s")
            .expect("a close frame before the end")
            .expect("no error");
        match msg {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                let n = v["ack"].as_u64().unwrap();
                if v.get("error").is_none() {
                    assert_eq!(v["accepted"], 10, "{v}");
                    acked.extend((n - 1) * 10..n * 10);
                } else {
                    assert!(v["retry_after_ms"].as_u64().is_some(), "{v}");
                }
                answered.push(n);
            }
            Message::Close(frame) => break frame.map(|f| u16::from(f.code)).unwrap_or(1005),
            _ => {}
        }
    };
    assert_eq!(code, 1001);
    assert_eq!(
        answered,
        (1..=FRAMES).collect::<Vec<_>>(),
        "every frame answered, in order"
    );
    let mut proc = proc;
    let status = tokio::task::spawn_blocking(move || proc.wait_exit(Duration::from_secs(30)))
        .await
        .unwrap();
    assert!(status.success(), "{status}");

    let proc = SluiceProcess::start(data.path(), &[]);
    wait_ready(&client, &format!("{}/readyz", proc.url())).await;
    let stored = stored_seqs(&client, &proc.url(), "term-1").await;
    let missing: Vec<_> = acked.difference(&stored).collect();
    assert!(missing.is_empty(), "acked but not stored: {missing:?}");
    assert!(!acked.is_empty());
}
