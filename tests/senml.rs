//! SenML (RFC 8428, SPEC §10) end to end: RFC 8428's own §5 examples, as JSON text and encoded
//! by Python's `cbor2` with the integer labels of §6 (tests/clients/cbor_bodies.py), posted as
//! `application/senml+json` and `application/senml+cbor` and published on MQTT, then read back
//! through `/v1/devices/{id}/readings` with the device, metric names, values and times the RFC
//! resolves them to; and bad packs with their specific answers, valid neighbours stored.
//!
//! HTTP binds no device, so over HTTP each example's names get a `<device>/` in front (the
//! metric names stay the RFC's); MQTT binds the topic's device and takes the examples verbatim.

mod common;
#[path = "common/mqtt_broker.rs"]
mod mqtt_broker;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};

use common::{run_client_script, spawn_app_with, unhex, wait_until, TestApp};
use mqtt_broker::{client_id, Mosquitto, TestClient};

/// Long enough for the RFC's 2010 and 2011 times.
const TWENTY_YEARS: Duration = Duration::from_secs(20 * 365 * 86400);

/// When a reading should be: at an exact time, or at the receive time (within the request).
#[derive(Debug, Clone, Copy)]
enum At {
    Ms(i64),
    Received,
    /// Ten seconds before the receive time (a relative time of −10 s).
    ReceivedMinus(i64),
}

/// A device's stored readings as `ts → metrics`.
async fn stored(app: &TestApp, device: &str) -> BTreeMap<i64, Value> {
    let (status, body) = app
        .get_json(&format!("/v1/devices/{device}/readings?limit=10000"))
        .await;
    if status == 404 {
        return BTreeMap::new();
    }
    assert_eq!(status, 200, "{device}: {body}");
    body["readings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["tags"], json!({}), "{r}");
            (
                sluice::reading::parse_ts(r["ts"].as_str().unwrap()).unwrap(),
                r["metrics"].clone(),
            )
        })
        .collect()
}

/// The device holds exactly `want` (as a set of readings), times within `[from, to]` for
/// readings at the receive time.
async fn check(app: &TestApp, device: &str, want: &[(At, Value)], (from, to): (i64, i64)) {
    let got = stored(app, device).await;
    assert_eq!(got.len(), want.len(), "{device}: {got:?}");
    for (at, metrics) in want {
        let found = got.iter().find(|(ts, m)| {
            *m == metrics
                && match *at {
                    At::Ms(ms) => **ts == ms,
                    At::Received => (from..=to).contains(*ts),
                    At::ReceivedMinus(d) => (from - d..=to - d).contains(*ts),
                }
        });
        assert!(found.is_some(), "{device}: {at:?} {metrics} not in {got:?}");
    }
}

/// What RFC 8428 §5.1's examples resolve to: device-less names, so the device is given.
fn rfc_expected(example: &str) -> Vec<(At, Value)> {
    let urn = "urn:dev:ow:10e2073a01080063";
    match example {
        "5.1.1" => vec![(At::Received, json!({urn: 23.1}))],
        "5.1.2" => vec![(
            At::Received,
            json!({format!("{urn}:voltage"): 120.1, format!("{urn}:current"): 1.2}),
        )],
        "5.1.2-timed" => {
            // Tue Jun 8 18:01:16.001 UTC 2010, and each second of the 5 before.
            let bt = 1_276_020_076_001;
            let name = "urn:dev:ow:10e2073a0108006:current";
            let mut want = vec![(
                At::Ms(bt),
                json!({"urn:dev:ow:10e2073a0108006:voltage": 120.1, name: 1.7}),
            )];
            for (i, v) in [1.2, 1.3, 1.4, 1.5, 1.6].into_iter().enumerate() {
                want.push((At::Ms(bt - (5 - i as i64) * 1000), json!({ name: v })));
            }
            want
        }
        // Mon Oct 31 13:24:24 UTC 2011 and later. The lon/lat records differ from the %RH ones
        // only by unit, which Sluice does not keep: they are refused, by index.
        "5.1.3" => {
            let bt = 1_320_067_464_000;
            [
                (0, json!(20)),
                (60, json!(20.3)),
                (120, json!(20.7)),
                (150, json!(98)),
                (180, json!(21.2)),
            ]
            .into_iter()
            .map(|(t, v)| (At::Ms(bt + t * 1000), json!({ urn: v })))
            .collect()
        }
        "5.1.5" => vec![(
            At::Received,
            json!({format!("{urn}:temp"): 23.1, format!("{urn}:open"): false}),
        )],
        other => panic!("{other}"),
    }
}

/// The answer each example gets: readings accepted, and the refused records as
/// `(index, reason)`.
fn rfc_answer(example: &str) -> (u64, Vec<(u64, &'static str)>) {
    match example {
        "5.1.1" | "5.1.2" => (1, vec![]),
        "5.1.2-timed" => (6, vec![]),
        "5.1.3" => (
            5,
            [1, 2, 4, 5, 7, 8, 11, 12]
                .into_iter()
                .map(|i| (i, "invalid_metrics"))
                .collect(),
        ),
        "5.1.5" => (1, vec![(1, "unsupported_value"), (3, "unsupported_value")]),
        "5.1.6" => (2, vec![]),
        other => panic!("{other}"),
    }
}

async fn post(app: &TestApp, content_type: &str, body: Vec<u8>) -> (u16, Value) {
    let res = app.post_raw(content_type, body).await;
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

fn answer_of(body: &Value) -> (u64, Vec<(u64, &str)>) {
    (
        body["accepted"].as_u64().unwrap_or(u64::MAX),
        body["rejected"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|r| (r["index"].as_u64().unwrap(), r["reason"].as_str().unwrap()))
                    .collect()
            })
            .unwrap_or_default(),
    )
}

async fn spawn_rfc_app(tweak: impl FnOnce(&mut sluice::Settings)) -> TestApp {
    spawn_app_with(|s| {
        s.limits.max_age = TWENTY_YEARS;
        s.storage.retention = TWENTY_YEARS;
        tweak(s);
    })
    .await
}

/// The RFC examples over HTTP, once per encoding, each on a fresh Sluice (the examples carry
/// no `seq`, so the same pack posted twice would be two sets of readings).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc_8428_examples_over_http_in_json_and_cbor() {
    let packs =
        tokio::task::spawn_blocking(|| run_client_script("cbor_bodies.py", &["senml", "http"]))
            .await
            .unwrap();
    for (content_type, body_of, device_body_of) in [
        ("application/senml+json", "json", "json_dev"),
        ("application/senml+cbor", "cbor", "cbor_dev"),
    ] {
        let app = spawn_rfc_app(|_| {}).await;
        let bytes = |v: &Value| match body_of {
            "json" => v.as_str().unwrap().as_bytes().to_vec(),
            _ => unhex(v),
        };
        for example in ["5.1.1", "5.1.2", "5.1.2-timed", "5.1.3", "5.1.5"] {
            let p = &packs[example];
            let device = p["device"].as_str().unwrap();
            let from = sluice::reading::now_ms();
            let (status, body) = post(&app, content_type, bytes(&p[device_body_of])).await;
            let to = sluice::reading::now_ms();
            assert_eq!(status, 200, "{content_type} {example}: {body}");
            assert_eq!(
                answer_of(&body),
                rfc_answer(example),
                "{content_type} {example}: {body}"
            );
            check(&app, device, &rfc_expected(example), (from, to)).await;
        }
        // §5.1.6 verbatim: the names hold the devices.
        let (status, body) = post(&app, content_type, bytes(&packs["5.1.6"][body_of])).await;
        assert_eq!(status, 200, "{content_type} 5.1.6: {body}");
        assert_eq!(answer_of(&body), rfc_answer("5.1.6"));
        let bt = 1_320_078_429_000;
        let none = (0, 0);
        check(
            &app,
            "2001:db8::2",
            &[(At::Ms(bt), json!({"temperature": 25.2, "humidity": 30}))],
            none,
        )
        .await;
        check(
            &app,
            "2001:db8::1",
            &[(At::Ms(bt), json!({"temperature": 12.3, "humidity": 67}))],
            none,
        )
        .await;
        // The verbatim §5.1.1 over HTTP: no device in the name and none bound.
        let (status, body) = post(&app, content_type, bytes(&packs["5.1.1"][body_of])).await;
        assert_eq!(status, 422, "{body}");
        assert_eq!(
            body["rejected"][0]["error"],
            "device_id: required (or bound by the transport)"
        );
        assert_eq!(
            app.metric(
                "sluice_readings_rejected_total",
                &[("reason", "unsupported_value")]
            )
            .await,
            2.0,
            "{content_type}"
        );
    }
}

/// Bad packs: mixed `bver` and a label ending in `_` refuse the pack (400, counted as
/// malformed, nothing stored); a `vs`-only record is refused alone (unsupported_value) beside
/// stored neighbours; a relative time of −10 s is stored ten seconds before receipt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_packs_get_their_answers_and_neighbours_are_stored() {
    let packs =
        tokio::task::spawn_blocking(|| run_client_script("cbor_bodies.py", &["senml", "bad"]))
            .await
            .unwrap();
    for (content_type, field) in [
        ("application/senml+json", "json"),
        ("application/senml+cbor", "cbor"),
    ] {
        let app = spawn_rfc_app(|_| {}).await;
        let bytes = |v: &Value| match field {
            "json" => v.as_str().unwrap().as_bytes().to_vec(),
            _ => unhex(v),
        };
        for (pack, detail) in [
            ("mixed_bver", "pack[1].bver: 10 differs from 5 given in pack[0]; one pack has one version"),
            ("must_understand", "pack[1].crit_: a must-understand label (ending in `_`) that Sluice does not know, so the pack cannot be used (RFC 8428 §4.4)"),
        ] {
            let (status, body) = post(&app, content_type, bytes(&packs[pack][field])).await;
            assert_eq!(status, 400, "{content_type} {pack}: {body}");
            assert_eq!(body["detail"], detail, "{content_type} {pack}");
        }
        assert!(stored(&app, "bad-bad").await.is_empty(), "{content_type}");
        assert_eq!(
            app.metric(
                "sluice_readings_rejected_total",
                &[("transport", "http"), ("reason", "malformed")]
            )
            .await,
            2.0
        );

        let from = sluice::reading::now_ms();
        let (status, body) = post(&app, content_type, bytes(&packs["vs_only"][field])).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            answer_of(&body),
            (1, vec![(1, "unsupported_value")]),
            "{body}"
        );
        assert_eq!(
            body["rejected"][0]["error"],
            "pack[1].vs: a string value cannot be stored: Sluice keeps numbers (`v`) and booleans (`vb`)"
        );
        let (status, body) = post(&app, content_type, bytes(&packs["relative"][field])).await;
        assert_eq!(status, 200, "{body}");
        let to = sluice::reading::now_ms();
        check(
            &app,
            "bad-bad",
            &[
                (At::ReceivedMinus(2_000), json!({"a": 1, "b": true})),
                (At::ReceivedMinus(10_000), json!({"rel": 10})),
            ],
            (from, to),
        )
        .await;
        assert_eq!(
            app.metric(
                "sluice_readings_rejected_total",
                &[("transport", "http"), ("reason", "unsupported_value")]
            )
            .await,
            1.0
        );
    }
}

/// RFC 8428's examples verbatim on MQTT: the payloads start with `[{` and have SenML labels,
/// so they are read as SenML, and the topic binds the device their names lack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc_8428_examples_verbatim_over_mqtt() {
    let packs =
        tokio::task::spawn_blocking(|| run_client_script("cbor_bodies.py", &["senml", "mqtt"]))
            .await
            .unwrap();
    let broker = Mosquitto::start(false, "");
    let url = broker.url();
    let app = spawn_rfc_app(|s| {
        s.mqtt.enabled = true;
        s.mqtt.url = url;
        s.mqtt.client_id = client_id("sluice");
        s.mqtt.keep_alive = Duration::from_secs(5);
    })
    .await;
    wait_until(Duration::from_secs(10), "sluice subscribed", || async {
        app.metric("sluice_mqtt_connected", &[]).await == 1.0
    })
    .await;
    let mut client = TestClient::connect(broker.port, &client_id("senml-pub")).await;
    let examples = ["5.1.1", "5.1.2", "5.1.2-timed", "5.1.3", "5.1.5"];
    let from = sluice::reading::now_ms();
    for example in examples {
        let device = format!("mqtt-{}", example.replace('.', "-"));
        let payload = packs[example]["json"].as_str().unwrap().as_bytes().to_vec();
        assert!(
            client
                .publish_acked(&format!("devices/{device}/readings"), payload)
                .await,
            "{example} published"
        );
    }
    for example in examples {
        let device = format!("mqtt-{}", example.replace('.', "-"));
        let want = rfc_expected(example).len();
        wait_until(
            Duration::from_secs(10),
            &format!("{device} stored"),
            || async { stored(&app, &device).await.len() == want },
        )
        .await;
    }
    let to = sluice::reading::now_ms();
    for example in examples {
        let device = format!("mqtt-{}", example.replace('.', "-"));
        check(&app, &device, &rfc_expected(example), (from, to)).await;
    }
    // The records refused by index are counted like any reading refused on MQTT.
    let rejected = |reason: &'static str| {
        let app = &app;
        async move {
            app.metric(
                "sluice_readings_rejected_total",
                &[("transport", "mqtt"), ("reason", reason)],
            )
            .await
        }
    };
    wait_until(Duration::from_secs(10), "rejections counted", || async {
        rejected("unsupported_value").await == 2.0 && rejected("invalid_metrics").await == 8.0
    })
    .await;
}

/// An MQTT array whose first element has a SenML label is read as a SenML pack; a JSON
/// reading after it (`device_id`, `metrics`) and a record of unknown labels only are rejected
/// by index and dead-lettered with their errors, never acknowledged and dropped unseen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_reading_inside_a_pack_is_rejected_not_dropped() {
    let broker = Mosquitto::start(false, "");
    let url = broker.url();
    let app = spawn_rfc_app(|s| {
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
    let mut client = TestClient::connect(broker.port, &client_id("mixed-pub")).await;
    let payload = br#"[{"n":"temp","v":21.5},
        {"device_id":"mqtt-mixed","seq":7,"metrics":{"a":1}},
        {"foo":1}]"#;
    assert!(
        client
            .publish_acked("devices/mqtt-mixed/readings", payload.to_vec())
            .await
    );
    let letters = watcher.messages(1, Duration::from_secs(10)).await;
    let letter: Value = serde_json::from_slice(&letters["dead/mqtt-mixed"][0]).unwrap();
    assert_eq!(letter["taken"], 1, "{letter}");
    let rejected = letter["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 2, "{letter}");
    assert_eq!(rejected[0]["index"], 1, "{letter}");
    assert!(
        rejected[0]["error"]
            .as_str()
            .unwrap()
            .starts_with("pack[1].device_id: a field of Sluice's JSON readings"),
        "{letter}"
    );
    assert_eq!(rejected[1]["index"], 2, "{letter}");
    assert_eq!(
        rejected[1]["error"], "pack[2]: no value: expected `v` or `vb`",
        "{letter}"
    );
    wait_until(
        Duration::from_secs(10),
        "the SenML record stored",
        || async { stored(&app, "mqtt-mixed").await.len() == 1 },
    )
    .await;
    let readings = stored(&app, "mqtt-mixed").await;
    assert_eq!(readings.values().next().unwrap(), &json!({"temp": 21.5}));
}
