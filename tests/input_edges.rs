//! Edges of the input contract (SPEC §1), end to end on every transport: one leading UTF-8
//! byte-order mark is ignored and any other stray byte is named in the error; integers from
//! −2^63 to 2^64−1 read back exactly from the store, device state, the live stream and MQTT dead
//! letters, and an integer outside that range is rejected by index with its field named.
//!
//! And the edges of the request around the readings (SPEC §3, §8): an unknown query parameter
//! on any endpoint is a 400 that names it; every error answer Sluice writes is a problem
//! document (hyper's own 414 and 431 are not: README, Known limits); a data directory that
//! cannot be created or written stops the start with exit code 2, naming the key.

mod common;
#[path = "common/mqtt_broker.rs"]
mod mqtt_broker;

use std::io::Write;
use std::time::Duration;

use common::{
    next_ws_json, run_sluice_to_exit, spawn_app, spawn_app_with, wait_until, SluiceProcess, TestApp,
};
use futures_util::SinkExt;
use mqtt_broker::{client_id, Mosquitto, TestClient};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const BOM: &[u8] = b"\xEF\xBB\xBF";
const BOM_NAMED: &str = "unexpected byte 0xEF (a UTF-8 byte-order mark?)";

fn with_bom(n: usize, body: &str) -> Vec<u8> {
    let mut v = BOM.repeat(n);
    v.extend_from_slice(body.as_bytes());
    v
}

/// A reading of `device` with the extreme integers in its metrics.
fn extremes(device: &str, seq: u64) -> String {
    format!(
        r#"{{"device_id":"{device}","seq":{seq},"metrics":{{"max":18446744073709551615,"min":-9223372036854775808,"big":9223372036854775808,"f":0.1}}}}"#
    )
}

/// Asserts that `metrics` holds the extremes exactly (as integers, not floats).
fn assert_extremes(metrics: &Value, context: &str) {
    assert_eq!(
        metrics["max"].as_u64(),
        Some(u64::MAX),
        "{context}: {metrics}"
    );
    assert_eq!(
        metrics["min"].as_i64(),
        Some(i64::MIN),
        "{context}: {metrics}"
    );
    assert_eq!(
        metrics["big"].as_u64(),
        Some(1 << 63),
        "{context}: {metrics}"
    );
    assert_eq!(metrics["f"].as_f64(), Some(0.1), "{context}: {metrics}");
}

/// The stored readings of `device` (the query API).
async fn stored(app: &TestApp, device: &str) -> Vec<Value> {
    let (status, body) = app
        .get_json(&format!("/v1/devices/{device}/readings"))
        .await;
    if status != 200 {
        return Vec::new();
    }
    body["readings"].as_array().cloned().unwrap_or_default()
}

async fn problem_detail(res: reqwest::Response) -> (u16, String) {
    let status = res.status().as_u16();
    let body: Value = res.json().await.unwrap();
    (
        status,
        body["detail"].as_str().unwrap_or_default().to_owned(),
    )
}

#[tokio::test]
async fn http_json_ignores_one_leading_bom_and_names_any_other() {
    let app = spawn_app().await;
    let one = r#"{"device_id":"bom-1","seq":1,"metrics":{"x":1}}"#;
    let array = r#"[{"device_id":"bom-1","seq":2,"metrics":{"x":2}},{"device_id":"bom-1","seq":3,"metrics":{"x":3}}]"#;

    let res = app.post_raw("application/json", with_bom(1, one)).await;
    assert_eq!(res.status(), 200);
    let res = app.post_raw("application/json", with_bom(1, array)).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap()["accepted"], 2);
    assert_eq!(app.stored_seqs("bom-1").await, [1, 2, 3].into());

    // Gzip: the mark is looked for after decompression.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&with_bom(
        1,
        r#"{"device_id":"bom-1","seq":4,"metrics":{"x":4}}"#,
    ))
    .unwrap();
    let res = app
        .client
        .post(app.url("/v1/readings"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(gz.finish().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    // Only one is ignored: the second is named, with where it is.
    let (status, detail) =
        problem_detail(app.post_raw("application/json", with_bom(2, array)).await).await;
    assert_eq!(status, 400);
    assert!(
        detail.contains(BOM_NAMED) && detail.contains("line 1 column 1"),
        "{detail}"
    );
    // Inside the array.
    let (status, detail) = problem_detail(
        app.post_raw("application/json", format!("[\u{feff}{one}]").into_bytes())
            .await,
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        detail.contains(BOM_NAMED) && detail.contains("line 1 column 2"),
        "{detail}"
    );
    // Other invisible bytes are named too.
    let (_, detail) =
        problem_detail(app.post_raw("application/json", b"[1,\x01]".to_vec()).await).await;
    assert!(
        detail.contains("unexpected byte 0x01 (a control character)"),
        "{detail}"
    );
    let (_, detail) = problem_detail(
        app.post_raw("application/json", "[1,\u{a0}]".as_bytes().to_vec())
            .await,
    )
    .await;
    assert!(detail.contains("unexpected byte 0xC2"), "{detail}");
    let (status, detail) =
        problem_detail(app.post_raw("application/json", b"[1,\xFF]".to_vec()).await).await;
    assert_eq!(status, 400);
    assert!(
        detail.contains("not UTF-8: invalid byte 0xFF at offset 3"),
        "{detail}"
    );
    // Each of those five bodies counted as one malformed reading, and nothing else was.
    assert_eq!(
        app.metric(
            "sluice_readings_rejected_total",
            &[("transport", "http"), ("reason", "malformed")]
        )
        .await,
        5.0
    );
    assert_eq!(app.stored_seqs("bom-1").await, [1, 2, 3, 4].into());
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn http_ndjson_ignores_one_leading_bom_and_names_one_on_a_later_line() {
    let app = spawn_app().await;
    let body = "{\"device_id\":\"nd-1\",\"seq\":1,\"metrics\":{\"x\":1}}\n\u{feff}{\"device_id\":\"nd-1\",\"seq\":2,\"metrics\":{\"x\":2}}\n{\"device_id\":\"nd-1\",\"seq\":3,\"metrics\":{\"x\":3}}\n";
    let res = app
        .post_raw("application/x-ndjson", with_bom(1, body))
        .await;
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["accepted"], 2, "{v}");
    assert_eq!(v["rejected"][0]["index"], 1, "{v}");
    assert_eq!(v["rejected"][0]["reason"], "malformed", "{v}");
    let error = v["rejected"][0]["error"].as_str().unwrap();
    assert!(
        error.starts_with(&format!("line 2: {BOM_NAMED} at column 1")),
        "{error}"
    );
    assert_eq!(app.stored_seqs("nd-1").await, [1, 3].into());

    // Two leading marks: the first line is rejected, naming the second mark.
    let res = app
        .post_raw(
            "application/x-ndjson",
            with_bom(
                2,
                "{\"device_id\":\"nd-1\",\"seq\":4,\"metrics\":{\"x\":4}}\n",
            ),
        )
        .await;
    assert_eq!(res.status(), 422);
    let v: Value = res.json().await.unwrap();
    let error = v["rejected"][0]["error"].as_str().unwrap();
    assert!(error.contains(BOM_NAMED), "{error}");
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn websocket_frames_ignore_one_leading_bom() {
    let app = spawn_app().await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/v1/ws", app.addr))
        .await
        .unwrap();
    let text =
        |n: usize, body: &str| Message::Text(format!("{}{body}", "\u{feff}".repeat(n)).into());
    ws.send(text(
        1,
        r#"{"device_id":"ws-bom","seq":1,"metrics":{"x":1}}"#,
    ))
    .await
    .unwrap();
    ws.send(text(
        1,
        r#"{"id":"env","readings":[{"device_id":"ws-bom","seq":2,"metrics":{"x":2}}]}"#,
    ))
    .await
    .unwrap();
    ws.send(text(
        2,
        r#"[{"device_id":"ws-bom","seq":3,"metrics":{"x":3}}]"#,
    ))
    .await
    .unwrap();
    // An out-of-range integer: rejected by index, with its field named; its neighbour is taken.
    ws.send(text(
        0,
        r#"[{"device_id":"ws-bom","seq":4,"metrics":{"x":4}},{"device_id":"ws-bom","seq":5,"metrics":{"x":-9223372036854775809}}]"#,
    ))
    .await
    .unwrap();

    assert_eq!(
        next_ws_json(&mut ws, Duration::from_secs(10)).await,
        json!({"ack": 1, "accepted": 1, "duplicates": 0, "rejected": []})
    );
    let a2 = next_ws_json(&mut ws, Duration::from_secs(10)).await;
    assert_eq!(
        (
            a2["ack"].as_u64(),
            a2["id"].as_str(),
            a2["accepted"].as_u64()
        ),
        (Some(2), Some("env"), Some(1)),
        "{a2}"
    );
    let a3 = next_ws_json(&mut ws, Duration::from_secs(10)).await;
    assert_eq!(a3["error"]["code"], "malformed", "{a3}");
    let detail = a3["error"]["detail"].as_str().unwrap();
    assert!(detail.contains(BOM_NAMED), "{detail}");
    let a4 = next_ws_json(&mut ws, Duration::from_secs(10)).await;
    assert_eq!(a4["accepted"], 1, "{a4}");
    assert_eq!(a4["rejected"][0]["index"], 1, "{a4}");
    assert_eq!(a4["rejected"][0]["reason"], "invalid_metrics", "{a4}");
    let error = a4["rejected"][0]["error"].as_str().unwrap();
    assert!(
        error.starts_with("metrics.x: integer -9223372036854775809 is outside"),
        "{error}"
    );
    assert_eq!(app.stored_seqs("ws-bom").await, [1, 2, 4].into());
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn integers_read_back_exactly_everywhere_and_out_of_range_ones_are_named() {
    // A data directory of our own, so that a second start restores device state from it.
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_path_buf();
    let app = spawn_app_with(|s| s.storage.data_dir = data_dir.clone()).await;
    let (mut live, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/v1/live?device=int-*", app.addr))
            .await
            .unwrap();
    wait_until(Duration::from_secs(5), "the live subscriber", || async {
        app.metric("sluice_ws_connections", &[("kind", "live")])
            .await
            == 1.0
    })
    .await;

    let body = format!(
        r#"[{},
            {{"device_id":"int-1","seq":2,"metrics":{{"d":18446744073709551616}}}},
            {{"device_id":"int-1","seq":3,"metrics":{{"ok":1,"d":-9223372036854775809}}}},
            {{"device_id":"int-1","seq":18446744073709551616,"metrics":{{"x":1}}}},
            {{"device_id":"int-1","seq":-1,"metrics":{{"x":1}}}},
            {{"device_id":"int-1","seq":1e3,"metrics":{{"x":1}}}},
            {{"device_id":"int-1","metrics":{{"d":18446744073709551616.0,"e":-9.3e18}}}}]"#,
        extremes("int-1", u64::MAX)
    );
    let res = app.post_raw("application/json", body.into_bytes()).await;
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["accepted"], 2, "{v}");
    let rejected = v["rejected"].as_array().unwrap();
    let want = [
        (1, "invalid_metrics", "metrics.d: integer 18446744073709551616 is outside -9223372036854775808..18446744073709551615"),
        (2, "invalid_metrics", "metrics.d: integer -9223372036854775809 is outside"),
        (3, "invalid_seq", "seq: invalid value: 18446744073709551616 is outside 0..18446744073709551615"),
        (4, "invalid_seq", "seq: invalid value: -1"),
        (5, "invalid_seq", "seq: invalid type: floating point"),
    ];
    assert_eq!(rejected.len(), want.len(), "{v}");
    for (r, (index, reason, prefix)) in rejected.iter().zip(want) {
        assert_eq!(r["index"], index, "{r}");
        assert_eq!(r["reason"], reason, "{r}");
        let error = r["error"].as_str().unwrap();
        assert!(
            error.starts_with(prefix),
            "{error} should start with {prefix}"
        );
    }

    // The store.
    let rows = stored(&app, "int-1").await;
    let exact = rows
        .iter()
        .find(|r| r["seq"].as_u64() == Some(u64::MAX))
        .unwrap_or_else(|| panic!("seq u64::MAX stored exactly: {rows:?}"));
    assert_extremes(&exact["metrics"], "store");
    // Float literals stay floats, however large.
    let floats = rows.iter().find(|r| r["seq"].is_null()).unwrap();
    assert_eq!(
        floats["metrics"]["d"].as_f64(),
        Some(18446744073709551616.0)
    );
    assert!(floats["metrics"]["d"].is_f64(), "{floats}");

    // Device state: the latest values, through a device whose only reading holds the extremes.
    app.post_raw("application/json", extremes("int-2", 1).into_bytes())
        .await;
    let (status, device) = app.get_json("/v1/devices/int-2").await;
    assert_eq!(status, 200);
    assert_extremes(&device["metrics"], "device state");

    // The live stream.
    let mut seen = None;
    for _ in 0..3 {
        let m = next_ws_json(&mut live, Duration::from_secs(10)).await;
        if m["device_id"] == "int-2" {
            seen = Some(m);
            break;
        }
        if m["seq"].as_u64() == Some(u64::MAX) {
            assert_extremes(&m["metrics"], "live int-1");
        }
    }
    let m = seen.expect("int-2 on the live stream");
    assert_extremes(&m["metrics"], "live");
    assert_eq!(m["seq"], 1);
    app.shutdown().await.unwrap();

    // Device state restored from the store at the next start.
    let app = spawn_app_with(|s| s.storage.data_dir = data_dir.clone()).await;
    let (status, device) = app.get_json("/v1/devices/int-2").await;
    assert_eq!(status, 200);
    assert_extremes(&device["metrics"], "device state after a restart");
    let rows = stored(&app, "int-1").await;
    assert!(
        rows.iter().any(|r| r["seq"].as_u64() == Some(u64::MAX)),
        "{rows:?}"
    );
    app.shutdown().await.unwrap();
}

fn mqtt_topic(device: &str) -> String {
    format!("devices/{device}/readings")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_payloads_ignore_one_leading_bom_and_dead_letters_keep_integers_exact() {
    let broker = Mosquitto::start(false, "");
    let url = broker.url();
    let app = spawn_app_with(|s| {
        s.mqtt.enabled = true;
        s.mqtt.url = url;
        s.mqtt.client_id = client_id("sluice");
        s.mqtt.keep_alive = Duration::from_secs(5);
        s.mqtt.dead_letter_topic = "dead".into();
    })
    .await;
    wait_until(Duration::from_secs(10), "sluice subscribed", || async {
        app.metric("sluice_mqtt_connected", &[]).await == 1.0
    })
    .await;
    let mut watcher = TestClient::connect(broker.port, &client_id("watch")).await;
    watcher.subscribe("dead/#").await;
    let mut publisher = TestClient::connect(broker.port, &client_id("pub")).await;

    let partial = format!(
        r#"[{},{{"seq":2,"metrics":{{"d":18446744073709551616}}}}]"#,
        extremes("mq-2", 1)
    );
    let cases: Vec<(String, Vec<u8>)> = vec![
        (
            mqtt_topic("mq-1"),
            with_bom(1, r#"{"seq":1,"metrics":{"x":1}}"#),
        ),
        (
            mqtt_topic("mq-1"),
            with_bom(1, r#"[{"seq":2,"metrics":{"x":2}}]"#),
        ),
        (
            mqtt_topic("mq-1"),
            with_bom(2, r#"{"seq":3,"metrics":{"x":3}}"#),
        ),
        (mqtt_topic("mq-2"), partial.clone().into_bytes()),
    ];
    for (t, p) in cases {
        assert!(publisher.publish_acked(&t, p).await, "broker took {t}");
    }
    let letters = watcher.messages(2, Duration::from_secs(10)).await;
    let letter = |topic: &str| -> Value {
        let bodies = letters
            .get(topic)
            .unwrap_or_else(|| panic!("no dead letter on {topic}: {letters:?}"));
        assert_eq!(bodies.len(), 1, "{topic}");
        serde_json::from_slice(&bodies[0]).unwrap()
    };

    let d1 = letter("dead/mq-1");
    assert_eq!(d1["error"]["reason"], "malformed", "{d1}");
    let detail = d1["error"]["detail"].as_str().unwrap();
    assert!(detail.contains(BOM_NAMED), "{detail}");

    let d2 = letter("dead/mq-2");
    assert_eq!(d2["taken"], 1, "{d2}");
    assert_eq!(d2["rejected"][0]["index"], 1, "{d2}");
    assert_eq!(d2["rejected"][0]["reason"], "invalid_metrics", "{d2}");
    let error = d2["rejected"][0]["error"].as_str().unwrap();
    assert!(
        error.starts_with("metrics.d: integer 18446744073709551616 is outside"),
        "{error}"
    );
    // The payload is carried as sent: every digit of the extremes is still there.
    assert_eq!(d2["payload"].as_str(), Some(partial.as_str()));
    let payload: Value = serde_json::from_str(d2["payload"].as_str().unwrap()).unwrap();
    assert_extremes(&payload[0]["metrics"], "dead letter payload");

    wait_until(Duration::from_secs(10), "MQTT readings stored", || async {
        app.stored_seqs("mq-1").await.len() == 2 && app.stored_seqs("mq-2").await.len() == 1
    })
    .await;
    assert_eq!(app.stored_seqs("mq-1").await, [1, 2].into());
    assert_extremes(&stored(&app, "mq-2").await[0]["metrics"], "MQTT store");
    app.shutdown().await.unwrap();
}

/// Checks a problem document: status, `application/problem+json`, its `type`, and that the
/// detail holds each of `says`. Returns the detail.
async fn assert_problem(res: reqwest::Response, status: u16, kind: &str, says: &[&str]) -> String {
    let what = format!("{} {}", res.status(), res.url());
    assert_eq!(res.status(), status, "{what}");
    assert_eq!(
        res.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/problem+json"),
        "{what}"
    );
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["type"], kind, "{what}: {body}");
    assert_eq!(body["status"], status, "{what}: {body}");
    assert!(body["title"].is_string(), "{what}: {body}");
    let detail = body["detail"].as_str().unwrap_or_default().to_owned();
    for s in says {
        assert!(detail.contains(s), "{what}: `{detail}` should say `{s}`");
    }
    detail
}

#[tokio::test]
async fn unknown_query_parameters_get_a_400_that_names_them_on_every_endpoint() {
    let app = spawn_app().await;
    // Every route of the router: (method, target, the unknown names, what else the detail says).
    let cases: &[(&str, &str, &[&str], &str)] = &[
        (
            "POST",
            "/v1/readings?device_id=q-1",
            &["device_id"],
            "this endpoint takes none",
        ),
        (
            "GET",
            "/v1/ws?device=q-1",
            &["device"],
            "(did you mean `device_id`?)",
        ),
        (
            "GET",
            "/v1/live?device_id=q-*&metrics=t",
            &["device_id", "metrics"],
            "(did you mean `device`?)",
        ),
        (
            "GET",
            "/v1/devices?bogus=1&limt=2",
            &["bogus", "limt"],
            "(did you mean `limit`?)",
        ),
        (
            "GET",
            "/v1/devices/q-1?limit=1",
            &["limit"],
            "this endpoint takes none",
        ),
        (
            "GET",
            "/v1/devices/q-1/readings?form=1&metric=x",
            &["form"],
            "this endpoint takes `from`, `to`, `metric`, `limit`, `order`, `cursor`",
        ),
        (
            "GET",
            "/v1/status?verbose=1",
            &["verbose"],
            "this endpoint takes none",
        ),
        (
            "GET",
            "/healthz?probe=1",
            &["probe"],
            "this endpoint takes none",
        ),
        ("GET", "/readyz?full", &["full"], "this endpoint takes none"),
        (
            "GET",
            "/metrics?name%5B%5D=sluice_batch_size",
            &["name[]"],
            "this endpoint takes none",
        ),
        ("GET", "/?token=x", &["token"], "this endpoint takes none"),
        (
            "GET",
            "/static/app.js?v=2",
            &["v"],
            "this endpoint takes none",
        ),
    ];
    let reading = r#"{"device_id":"q-1","seq":1,"metrics":{"x":1}}"#;
    for (method, target, unknown, also) in cases {
        let url = app.url(target);
        let req = match *method {
            "POST" => app
                .client
                .post(url)
                .header("content-type", "application/json")
                .body(reading),
            _ => app.client.get(url),
        };
        let named: Vec<String> = unknown
            .iter()
            .map(|u| format!("unknown query parameter `{u}`"))
            .collect();
        let mut says: Vec<&str> = named.iter().map(String::as_str).collect();
        says.push(also);
        assert_problem(
            req.send().await.unwrap(),
            400,
            "urn:sluice:unknown-parameter",
            &says,
        )
        .await;
    }
    // The refused ingest took nothing, and counted no reading.
    assert_eq!(stored(&app, "q-1").await.len(), 0);
    assert_eq!(
        app.metric("sluice_readings_received_total", &[("transport", "http")])
            .await,
        0.0
    );

    // A real WebSocket handshake is refused before the upgrade: no connection that would then
    // reject every reading without `device_id`.
    for (target, says) in [
        ("/v1/ws?device=q-1", "did you mean `device_id`?"),
        ("/v1/live?device_id=q-*", "did you mean `device`?"),
    ] {
        let url = format!("ws://{}{target}", app.addr);
        match tokio_tungstenite::connect_async(url).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(res)) => {
                assert_eq!(res.status(), 400, "{target}");
                let body: Value =
                    serde_json::from_slice(res.body().as_deref().unwrap_or_default()).unwrap();
                assert_eq!(body["type"], "urn:sluice:unknown-parameter", "{body}");
                assert!(body["detail"].as_str().unwrap().contains(says), "{body}");
            }
            other => panic!("{target}: the handshake should get a 400, got {other:?}"),
        }
    }
    assert_eq!(app.metric("sluice_ws_connections", &[]).await, 0.0);
    // The parameter it meant binds the connection.
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/v1/ws?device_id=q-2", app.addr))
            .await
            .unwrap();
    ws.send(Message::Text(r#"{"seq":1,"metrics":{"x":1}}"#.into()))
        .await
        .unwrap();
    let ack = next_ws_json(&mut ws, Duration::from_secs(10)).await;
    assert_eq!(ack["accepted"], 1, "{ack}");
    ws.close(None).await.unwrap();
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn every_error_answer_is_a_problem_document() {
    let app = spawn_app().await;
    let c = &app.client;
    // An unknown path.
    assert_problem(
        c.get(app.url("/v1/nope")).send().await.unwrap(),
        404,
        "urn:sluice:not-found",
        &["no endpoint at `/v1/nope`"],
    )
    .await;
    // A known path with another method: 405, with `Allow`.
    for (method, path, allow) in [
        (reqwest::Method::POST, "/v1/devices", "GET"),
        (reqwest::Method::GET, "/v1/readings", "POST"),
        (reqwest::Method::DELETE, "/metrics", "GET"),
        (reqwest::Method::PUT, "/v1/devices/d-1", "GET"),
        (reqwest::Method::POST, "/v1/ws", "GET"),
        (reqwest::Method::POST, "/static/app.js", "GET"),
    ] {
        let res = c
            .request(method.clone(), app.url(path))
            .send()
            .await
            .unwrap();
        let allowed = res.headers()["allow"].to_str().unwrap().to_owned();
        assert!(allowed.contains(allow), "{method} {path}: Allow: {allowed}");
        let not = format!("{method} is not allowed on `{path}`");
        assert_problem(res, 405, "urn:sluice:method-not-allowed", &[&not]).await;
    }
    // A GET of a WebSocket endpoint that is no handshake.
    for path in ["/v1/ws", "/v1/live"] {
        assert_problem(
            c.get(app.url(path)).send().await.unwrap(),
            400,
            "urn:sluice:malformed",
            &["not a WebSocket handshake", "upgrade"],
        )
        .await;
        // HEAD is no handshake either: 405 saying what is allowed (RFC 9110 §15.5.6).
        let res = c.head(app.url(path)).send().await.unwrap();
        assert_eq!(res.status(), 405, "HEAD {path}");
        assert_eq!(res.headers()["allow"], "GET", "HEAD {path}");
    }
    // A path segment that does not decode.
    for path in ["/v1/devices/%FF", "/v1/devices/%FF/readings"] {
        assert_problem(
            c.get(app.url(path)).send().await.unwrap(),
            400,
            "urn:sluice:malformed",
            &["UTF-8"],
        )
        .await;
    }

    // hyper answers a request head over its limits itself, before any routing, with a status
    // and no body: README, Known limits. 101 headers (hyper's limit is 100) and a 70 000-byte
    // target (its limit is 65 534).
    let mut many_headers = String::from("GET /healthz HTTP/1.1\r\nHost: x\r\n");
    for i in 0..101 {
        many_headers.push_str(&format!("x-h{i}: 1\r\n"));
    }
    many_headers.push_str("\r\n");
    let long_target = format!(
        "GET /healthz?{} HTTP/1.1\r\nHost: x\r\n\r\n",
        "a".repeat(70_000)
    );
    for (request, status) in [(many_headers, 431), (long_target, 414)] {
        let (got, head, body) = raw_exchange(app.addr, request.as_bytes()).await;
        assert_eq!(got, status, "{head}");
        assert!(body.is_empty(), "{status}: hyper sent a body: {body:?}");
        assert!(!head.contains("problem+json"), "{head}");
    }
    app.shutdown().await.unwrap();
}

/// Writes `request` on a new connection and reads the answer until the server closes it:
/// (status, head, body).
async fn raw_exchange(addr: std::net::SocketAddr, request: &[u8]) -> (u16, String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("the server closes the connection")
        .expect("read");
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete head");
    let head = String::from_utf8_lossy(&answer[..split]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head, answer[split + 4..].to_vec())
}

/// A data directory that cannot be created or written is a configuration error (issue 11):
/// the real binary exits with code 2 and names `storage.data_dir` and the path, rather than
/// serving `/healthz` while the store fails every second.
#[test]
fn an_unusable_data_directory_stops_the_start_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    // A file where the directory should be, and a file used as a parent directory.
    let mut unusable = vec![file.clone(), file.join("sub")];
    // The newcomer's case, where /proc is procfs (there, nothing can be created).
    if std::path::Path::new("/proc/self/status").exists() {
        unusable.push("/proc/nope".into());
    }
    for data_dir in unusable {
        let shown = data_dir.display().to_string();
        let (code, stderr) = run_sluice_to_exit(
            &[("SLUICE__STORAGE__DATA_DIR", shown.clone())],
            Duration::from_secs(20),
        );
        assert_eq!(code, Some(2), "{shown}: {stderr}");
        assert!(
            stderr.contains("storage.data_dir") && stderr.contains(&shown),
            "{shown}: {stderr}"
        );
    }
    // A directory that does not exist yet is no error: it is created, and Sluice listens.
    let fresh = dir.path().join("new/data");
    let sluice = SluiceProcess::start(&fresh, &[]);
    assert!(fresh.is_dir());
    drop(sluice);
}
