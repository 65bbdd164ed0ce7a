//! Per-device rate limits (SPEC §11, issue 12) against the real service: HTTP rejects by index
//! and answers 429 with `Retry-After` and the IETF `RateLimit-Policy` / `RateLimit` headers,
//! a device at its limit does not slow another, a WebSocket client honouring `retry_after_ms`
//! gets everything stored, and an MQTT flood is stored completely (its PUBACKs withheld until
//! the device is under its limit), checked by set.

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

    assert_eq!(
        app.metric(
            "sluice_readings_rate_limited_total",
            &[("transport", "http")]
        )
        .await,
        7.0
    );
    assert_eq!(
        app.metric(
            "sluice_readings_rejected_total",
            &[("transport", "http"), ("reason", "rate_limited")]
        )
        .await,
        7.0
    );
    assert_eq!(
        app.stored_seqs("d-1").await,
        (1..6).collect::<BTreeSet<_>>()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_flood_over_the_limit_is_stored_completely_with_pubacks_withheld() {
    let broker = mqtt_broker::Mosquitto::start(false, "");
    let url = broker.url();
    let app = spawn_app_with(|s| {
        s.mqtt.enabled = true;
        s.mqtt.url = url;
        s.mqtt.client_id = mqtt_broker::client_id("sluice");
        s.mqtt.keep_alive = Duration::from_secs(5);
        s.rate_limit.per_device = "100/s".into();
        s.rate_limit.burst = 10;
    })
    .await;
    wait_until(Duration::from_secs(10), "sluice subscribed", || async {
        app.metric("sluice_mqtt_connected", &[]).await == 1.0
    })
    .await;
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
    // Another device's messages are not held behind it for long.
    app.shutdown().await.unwrap();
}
