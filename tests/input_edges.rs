//! Edges of the input contract (SPEC §1), end to end on every transport: one leading UTF-8
//! byte-order mark is ignored and any other stray byte is named in the error; integers from
//! −2^63 to 2^64−1 read back exactly from the store, device state, the live stream and MQTT dead
//! letters, and an integer outside that range is rejected by index with its field named.

mod common;
#[path = "common/mqtt_broker.rs"]
mod mqtt_broker;

use std::io::Write;
use std::time::Duration;

use common::{next_ws_json, spawn_app, spawn_app_with, wait_until, TestApp};
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
        (1, "metrics.d: integer 18446744073709551616 is outside -9223372036854775808..18446744073709551615"),
        (2, "metrics.d: integer -9223372036854775809 is outside"),
        (3, "seq: invalid value: 18446744073709551616 is outside 0..18446744073709551615"),
        (4, "seq: invalid value: -1"),
        (5, "seq: invalid type: floating point"),
    ];
    assert_eq!(rejected.len(), want.len(), "{v}");
    for (r, (index, prefix)) in rejected.iter().zip(want) {
        assert_eq!(r["index"], index, "{r}");
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
