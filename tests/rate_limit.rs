//! Per-device rate limits (SPEC §11, issue 12) against the real service: HTTP rejects by index
//! and answers 429 with `Retry-After` and the IETF `RateLimit-Policy` / `RateLimit` headers,
//! (the InfluxDB endpoints refuse a batch with any line over whole), a device at its limit does
//! not slow another, a WebSocket client honouring `retry_after_ms` gets everything stored, an
//! MQTT flood within `rate_limit.mqtt_max_wait` is stored completely (its PUBACKs withheld until
//! the device is under its limit), and a backlog beyond it is dead-lettered, checked by set.

mod common;
#[path = "common/mqtt_broker.rs"]
mod mqtt_broker;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

fn limited(per_device: &str, burst: u32) -> impl FnOnce(&mut sluice::Settings) {
    let per_device = per_device.to_owned();
    move |s| {
        s.rate_limit.per_device = per_device;
        s.rate_limit.burst = burst;
    }
}

fn batch(device: &str, seqs: std::ops::Range<u64>) -> Value {
    Value::Array(seqs.map(|s| reading(device, s)).collect())
}

/// A structured-field item's integer parameter: `key` in `"per-device";q=5;w=1`.
fn param(header: &str, key: &str) -> u64 {
    assert!(header.starts_with("\"per-device\""), "{header}");
    header
        .split(';')
        .find_map(|p| p.trim().strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {header}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn http_rejects_by_index_then_429_with_headers_of_the_configured_policy() {
    let app = spawn_app_with(limited("5/s", 5)).await;
    let res = app.post_json(&batch("d-1", 1..9)).await;
    assert_eq!(res.status(), 200);
    let policy = res.headers()["ratelimit-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!((param(&policy, "q"), param(&policy, "w")), (5, 1));
    let state = res.headers()["ratelimit"].to_str().unwrap().to_owned();
    assert_eq!(param(&state, "r"), 0, "{state}");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["accepted"], 5);
    let rejected = body["rejected"].as_array().unwrap();
    let indexes: Vec<u64> = rejected
        .iter()
        .map(|r| r["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, [5, 6, 7]);
    assert!(
        rejected.iter().all(|r| r["reason"] == "rate_limited"),
        "{body}"
    );

    // Everything over: 429, Retry-After in whole seconds, the same policy.
    let res = app.post_json(&batch("d-1", 9..12)).await;
    assert_eq!(res.status(), 429);
    let retry: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    let policy = res.headers()["ratelimit-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!((param(&policy, "q"), param(&policy, "w")), (5, 1));
    let state = res.headers()["ratelimit"].to_str().unwrap().to_owned();
    assert_eq!(param(&state, "r"), 0);
    assert!(param(&state, "t") >= 1);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["type"], "urn:sluice:rate-limited");
    assert_eq!(body["rejected"].as_array().unwrap().len(), 3);

    // InfluxDB endpoints: 429 with Retry-After too.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let res = app
        .client
        .post(app.url("/api/v2/write?precision=ms"))
        .body(format!("m,device_id=d-1 t=1,seq=20i {now}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    assert!(res.headers().contains_key("retry-after"));
    assert_eq!(
        res.json::<Value>().await.unwrap()["code"],
        "too many requests"
    );
    // One line over its limit beside one under: still 429, and nothing of the batch stored, so
    // that the client's retry of the whole batch stores each line once.
    let res = app
        .client
        .post(app.url("/write?db=x&precision=ms"))
        .body(format!(
            "m,device_id=d-1 t=1,seq=21i {now}\nm,device_id=d-fresh t=1,seq=1i {now}"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    assert!(res.headers().contains_key("retry-after"));
    let retry_after: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body: Value = res.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("1 of 2 line(s) are over their device's rate limit"),
        "{body}"
    );

    assert_eq!(
        app.metric(
            "sluice_readings_rate_limited_total",
            &[("transport", "http")]
        )
        .await,
        9.0
    );
    assert_eq!(
        app.metric(
            "sluice_readings_rejected_total",
            &[("transport", "http"), ("reason", "rate_limited")]
        )
        .await,
        9.0
    );
    assert!(app.stored_seqs("d-fresh").await.is_empty());
    // The client's side: after Retry-After the same batch goes through whole.
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    let res = app
        .client
        .post(app.url("/write?db=x&precision=ms"))
        .body(format!(
            "m,device_id=d-1 t=1,seq=21i {now}\nm,device_id=d-fresh t=1,seq=1i {now}"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204, "{:?}", res.text().await);
    assert_eq!(app.stored_seqs("d-fresh").await, BTreeSet::from([1]));
    // More lines of one device than its burst can never go through whole: 413 (Telegraf then
    // splits the batch), nothing stored, no allowance taken.
    let six: Vec<String> = (30..36)
        .map(|seq| format!("m,device_id=d-big t=1,seq={seq}i {now}"))
        .collect();
    let res = app
        .client
        .post(app.url("/api/v2/write?precision=ms"))
        .body(six.join("\n"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 413);
    let body: Value = res.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("rate_limit.burst (5)"),
        "{body}"
    );
    let res = app
        .client
        .post(app.url("/api/v2/write?precision=ms"))
        .body(six[..5].join("\n"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204, "the 413 took no allowance");
    assert_eq!(
        app.stored_seqs("d-big").await,
        (30..35).collect::<BTreeSet<_>>()
    );
    assert_eq!(
        app.stored_seqs("d-1").await,
        (1..6).chain([21]).collect::<BTreeSet<_>>()
    );
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_device_at_its_limit_does_not_slow_another() {
    let app = spawn_app_with(limited("10/min", 20)).await;
    assert_eq!(app.post_json(&batch("hog", 0..20)).await.status(), 200);
    assert_eq!(app.post_json(&batch("hog", 20..21)).await.status(), 429);
    // The other device's whole burst goes through at once, and as fast as the first one did.
    let started = Instant::now();
    let res = app.post_json(&batch("calm", 0..20)).await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["accepted"], 20, "{body}");
    assert!(started.elapsed() < Duration::from_secs(2));
    // Without limits configured, no header is sent (mode none behaves as before).
    let plain = spawn_app().await;
    let res = plain.post_json(&reading("x", 1)).await;
    assert!(!res.headers().contains_key("ratelimit-policy"));
    plain.shutdown().await.unwrap();
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_websocket_client_honouring_retry_after_ms_gets_everything_stored() {
    let app = spawn_app_with(limited("40/s", 8)).await;
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/v1/ws?device_id=w-1", app.addr))
            .await
            .unwrap();
    let frame = |seqs: &[u64]| {
        Message::text(
            Value::Array(
                seqs.iter()
                    .map(|s| json!({"seq": s, "metrics": {"t": *s}}))
                    .collect(),
            )
            .to_string(),
        )
    };
    // 100 readings in frames of 10, each frame sent again (or its rate-limited readings)
    // after the wait the server asks for.
    let mut pending: Vec<Vec<u64>> = (0..10).map(|f| (f * 10..f * 10 + 10).collect()).collect();
    let mut limited_acks = 0;
    while let Some(seqs) = pending.first().cloned() {
        ws.send(frame(&seqs)).await.unwrap();
        let ack = next_ws_json(&mut ws, Duration::from_secs(10)).await;
        pending.remove(0);
        let wait = ack["retry_after_ms"].as_u64();
        if ack["error"]["code"] == "rate_limited" {
            limited_acks += 1;
            pending.insert(0, seqs);
        } else {
            let again: Vec<u64> = ack["rejected"]
                .as_array()
                .unwrap()
                .iter()
                .inspect(|r| assert_eq!(r["reason"], "rate_limited", "{ack}"))
                .map(|r| seqs[r["index"].as_u64().unwrap() as usize])
                .collect();
            if !again.is_empty() {
                limited_acks += 1;
                assert!(wait.is_some(), "{ack}");
                pending.insert(0, again);
            }
        }
        if let Some(ms) = wait {
            // The client's side of the contract: wait as told.
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }
    assert!(limited_acks > 0, "the limit was never reached");
    assert_eq!(
        app.stored_seqs("w-1").await,
        (0..100).collect::<BTreeSet<_>>()
    );
    assert!(
        app.metric("sluice_readings_rate_limited_total", &[("transport", "ws")])
            .await
            > 0.0
    );
    let _ = ws.close(None).await;
    while let Some(Ok(_)) = ws.next().await {}
    app.shutdown().await.unwrap();
}

/// A frame with nothing taken, where some readings are over the limit and others are invalid:
/// an ordinary ack that lists every rejection and the wait, not an error that hides the rest.
#[tokio::test]
async fn a_websocket_ack_lists_other_rejections_beside_rate_limited_ones() {
    let app = spawn_app_with(limited("1/min", 2)).await;
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/v1/ws?device_id=w-3", app.addr))
            .await
            .unwrap();
    let send = |v: Value| Message::text(v.to_string());
    ws.send(send(
        json!([{"seq": 1, "metrics": {"t": 1}}, {"seq": 2, "metrics": {"t": 2}}]),
    ))
    .await
    .unwrap();
    let ack = next_ws_json(&mut ws, Duration::from_secs(10)).await;
    assert_eq!(ack["accepted"], 2, "{ack}");
    ws.send(send(
        json!([{"seq": 3, "metrics": {}}, {"seq": 4, "metrics": {"t": 4}}]),
    ))
    .await
    .unwrap();
    let ack = next_ws_json(&mut ws, Duration::from_secs(10)).await;
    assert!(ack.get("error").is_none(), "{ack}");
    assert_eq!(ack["accepted"], 0, "{ack}");
    let reasons: Vec<&str> = ack["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["invalid_metrics", "rate_limited"], "{ack}");
    assert!(ack["retry_after_ms"].as_u64().unwrap() > 1000, "{ack}");
    // Only rate-limited: the error ack that asks for the whole frame again.
    ws.send(send(json!([{"seq": 5, "metrics": {"t": 5}}])))
        .await
        .unwrap();
    let ack = next_ws_json(&mut ws, Duration::from_secs(10)).await;
    assert_eq!(ack["error"]["code"], "rate_limited", "{ack}");
    assert_eq!(app.stored_seqs("w-3").await, BTreeSet::from([1, 2]));
    let _ = ws.close(None).await;
    while let Some(Ok(_)) = ws.next().await {}
    app.shutdown().await.unwrap();
}

/// Sluice subscribed to `broker` with 100 readings/s per device, a burst of 10,
/// `rate_limit.mqtt_max_wait = max_wait` and dead letters on the topic `dead`.
async fn rate_limited_mqtt_app(broker: &mqtt_broker::Mosquitto, max_wait: Duration) -> TestApp {
    let url = broker.url();
    let app = spawn_app_with(|s| {
        s.mqtt.enabled = true;
        s.mqtt.url = url;
        s.mqtt.client_id = mqtt_broker::client_id("sluice");
        s.mqtt.keep_alive = Duration::from_secs(5);
        s.mqtt.dead_letter_topic = "dead".into();
        s.rate_limit.per_device = "100/s".into();
        s.rate_limit.burst = 10;
        s.rate_limit.mqtt_max_wait = max_wait;
    })
    .await;
    wait_until(Duration::from_secs(10), "sluice subscribed", || async {
        app.metric("sluice_mqtt_connected", &[]).await == 1.0
    })
    .await;
    app
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_flood_within_mqtt_max_wait_is_stored_completely_with_pubacks_withheld() {
    let broker = mqtt_broker::Mosquitto::start(false, "");
    // The whole flood fits: 290 readings past the burst wait at most 2.9 s.
    let app = rate_limited_mqtt_app(&broker, Duration::from_secs(10)).await;
    let mut publisher =
        mqtt_broker::TestClient::connect(broker.port, &mqtt_broker::client_id("flood")).await;
    // 300 messages of one device at once: three seconds' worth at its limit.
    let messages: Vec<(String, Vec<u8>)> = (0..300u64)
        .map(|seq| {
            (
                "devices/m-1/readings".to_owned(),
                format!(r#"{{"seq":{seq},"metrics":{{"t":{seq}}}}}"#).into_bytes(),
            )
        })
        .collect();
    let started = Instant::now();
    publisher.publish_all(messages).await;
    wait_until(Duration::from_secs(30), "every reading stored", || async {
        app.stored_seqs("m-1").await.len() == 300
    })
    .await;
    // Paced by the limit: 290 readings past the burst at 100/s take about 2.9 s.
    assert!(
        started.elapsed() >= Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        app.stored_seqs("m-1").await,
        (0..300).collect::<BTreeSet<_>>()
    );
    assert_eq!(app.metric("sluice_mqtt_dead_letters_total", &[]).await, 0.0);
    assert!(
        app.metric(
            "sluice_readings_rate_limited_total",
            &[("transport", "mqtt")]
        )
        .await
            > 0.0
    );
    app.shutdown().await.unwrap();
}

/// A backlog that would wait longer than `rate_limit.mqtt_max_wait` for its device's allowance
/// is not held (holding it would hold every later PUBACK on the connection, other devices'
/// too): what is over goes to the dead-letter topic with reason `rate_limited`, its payload
/// inside, and is PUBACKed. Every message is either stored or dead-lettered, never both, and
/// a quiet device publishing behind the flood is stored whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_backlog_beyond_mqtt_max_wait_is_dead_lettered_and_others_still_stored() {
    let broker = mqtt_broker::Mosquitto::start(false, "");
    let app = rate_limited_mqtt_app(&broker, Duration::from_millis(300)).await;
    let mut watcher =
        mqtt_broker::TestClient::connect(broker.port, &mqtt_broker::client_id("watch")).await;
    watcher.subscribe("dead/#").await;
    let mut publisher =
        mqtt_broker::TestClient::connect(broker.port, &mqtt_broker::client_id("flood")).await;
    let message = |device: &str, seq: u64| {
        (
            format!("devices/{device}/readings"),
            format!(r#"{{"seq":{seq},"metrics":{{"t":{seq}}}}}"#).into_bytes(),
        )
    };
    let mut messages: Vec<_> = (0..300u64).map(|seq| message("m-1", seq)).collect();
    messages.extend((0..5u64).map(|seq| message("q-1", seq)));
    // One message of more readings than the burst, from a device with its allowance whole:
    // the burst at once, the rest within mqtt_max_wait, all stored.
    let big: Vec<Value> = (0..15u64)
        .map(|seq| json!({"seq": seq, "metrics": {"t": seq}}))
        .collect();
    messages.push((
        "devices/big-1/readings".to_owned(),
        Value::Array(big).to_string().into_bytes(),
    ));
    publisher.publish_all(messages).await;
    wait_until(
        Duration::from_secs(30),
        "every message stored or dead-lettered",
        || async {
            let dead = app.metric("sluice_mqtt_dead_letters_total", &[]).await as usize;
            app.stored_seqs("m-1").await.len() + dead == 300
                && app.stored_seqs("q-1").await.len() == 5
                && app.stored_seqs("big-1").await.len() == 15
        },
    )
    .await;
    let stored = app.stored_seqs("m-1").await;
    let dead = 300 - stored.len();
    assert!(stored.len() >= 10 && dead > 0, "stored {}", stored.len());
    let letters = watcher.messages(dead, Duration::from_secs(10)).await;
    assert_eq!(letters.keys().collect::<Vec<_>>(), ["dead/m-1"]);
    let mut dead_seqs = BTreeSet::new();
    for letter in &letters["dead/m-1"] {
        let letter: Value = serde_json::from_slice(letter).unwrap();
        assert_eq!(letter["error"]["reason"], "rate_limited", "{letter}");
        assert!(
            letter["error"]["detail"]
                .as_str()
                .unwrap()
                .contains("rate_limit.mqtt_max_wait"),
            "{letter}"
        );
        let payload: Value = serde_json::from_str(letter["payload"].as_str().unwrap()).unwrap();
        assert!(
            dead_seqs.insert(payload["seq"].as_u64().unwrap()),
            "{letter}"
        );
    }
    assert!(stored.is_disjoint(&dead_seqs));
    assert_eq!(
        stored.union(&dead_seqs).copied().collect::<BTreeSet<_>>(),
        (0..300).collect::<BTreeSet<_>>()
    );
    assert_eq!(
        app.stored_seqs("q-1").await,
        (0..5).collect::<BTreeSet<_>>()
    );
    assert_eq!(
        app.metric(
            "sluice_readings_rejected_total",
            &[("transport", "mqtt"), ("reason", "rate_limited")]
        )
        .await,
        dead as f64
    );
    app.shutdown().await.unwrap();
}
