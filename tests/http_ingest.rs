//! HTTP ingest against a real Sluice on port 0: round trips, every bad input the foundation
//! issue lists, and duplicates.

mod common;
#[path = "common/pg.rs"]
mod pg;

use std::io::Write;

use common::*;
use serde_json::{json, Value};

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

#[tokio::test]
async fn round_trip_json_ndjson_gzip_and_device_state() {
    let app = spawn_app().await;

    let res = app
        .post_json(&json!([
            {"device_id": "greenhouse-7", "seq": 1, "ts": "2026-11-24T12:00:00.123Z",
             "metrics": {"temperature": 21.5, "humidity": 40, "door_open": false},
             "tags": {"site": "north"}},
            {"device_id": "greenhouse-7", "seq": 2, "metrics": {"temperature": 22.0}}
        ]))
        .await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(
        body,
        json!({"accepted": 2, "duplicates": 0, "rejected": []})
    );

    // A single object works too.
    let res = app
        .post_json(&json!({"device_id": "greenhouse-7", "seq": 3, "metrics": {"temperature": 23}}))
        .await;
    assert_eq!(res.status(), 200);

    // NDJSON.
    let nd = (10..13)
        .map(|s| reading("ndjson-1", s).to_string())
        .collect::<Vec<_>>()
        .join("\n");
    let res = app.post_raw("application/x-ndjson", nd.into_bytes()).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap()["accepted"], 3);

    // gzip.
    let body = json!([reading("gz-1", 1), reading("gz-1", 2)]).to_string();
    let res = app
        .client
        .post(app.url("/v1/readings"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(gzip(body.as_bytes()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap()["accepted"], 2);

    // Read back: values as given, ts as RFC 3339, tags kept.
    let res = app
        .client
        .get(app.url("/v1/devices/greenhouse-7/readings"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/json");
    let body: Value = res.json().await.unwrap();
    let readings = body["readings"].as_array().unwrap();
    assert_eq!(readings.len(), 3);
    assert_eq!(readings[0]["ts"], "2026-11-24T12:00:00.123Z");
    assert_eq!(
        readings[0]["metrics"],
        json!({"temperature": 21.5, "humidity": 40, "door_open": false})
    );
    assert_eq!(readings[0]["tags"], json!({"site": "north"}));
    assert_eq!(app.stored_seqs("ndjson-1").await, [10, 11, 12].into());
    assert_eq!(app.stored_seqs("gz-1").await, [1, 2].into());

    // Query parameters: order, limit, metric, from/to.
    let (_, body) = app
        .get_json("/v1/devices/greenhouse-7/readings?order=desc&limit=1")
        .await;
    assert_eq!(body["readings"].as_array().unwrap().len(), 1);
    assert_eq!(body["readings"][0]["seq"], 3);
    let (_, body) = app
        .get_json("/v1/devices/greenhouse-7/readings?metric=humidity")
        .await;
    assert_eq!(body["readings"].as_array().unwrap().len(), 1);
    assert_eq!(body["readings"][0]["metrics"], json!({"humidity": 40}));
    let (_, body) = app
        .get_json("/v1/devices/greenhouse-7/readings?from=2026-11-24T12:00:00.124Z")
        .await;
    assert_eq!(body["readings"].as_array().unwrap().len(), 2);
    let (_, body) = app
        .get_json("/v1/devices/greenhouse-7/readings?to=2026-11-24T12:00:00.124Z")
        .await;
    assert_eq!(body["readings"].as_array().unwrap().len(), 1);
    let (status, body) = app
        .get_json("/v1/devices/greenhouse-7/readings?limit=10001")
        .await;
    assert_eq!(status, 400);
    assert!(body["detail"].as_str().unwrap().starts_with("limit:"));
    let (status, _) = app.get_json("/v1/devices/nobody/readings").await;
    assert_eq!(status, 404);

    // Device state.
    let (status, body) = app.get_json("/v1/devices").await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = body["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["greenhouse-7", "gz-1", "ndjson-1"]);
    let (status, body) = app.get_json("/v1/devices/greenhouse-7").await;
    assert_eq!(status, 200);
    assert_eq!(body["metrics"]["temperature"], 23);
    assert_eq!(body["metrics"]["humidity"], 40);
    let (status, body) = app.get_json("/v1/devices/unknown-device").await;
    assert_eq!(status, 404);
    assert_eq!(body["type"], "urn:sluice:not-found");

    assert_eq!(
        app.metric("sluice_readings_accepted_total", &[("transport", "http")])
            .await,
        8.0
    );
    app.shutdown().await.unwrap();
}

/// Posts `body` and checks the status, the problem type (for request-level errors) and the
/// rejected-counter delta for `reason`.
async fn expect_request_rejected(
    app: &TestApp,
    res: reqwest::Response,
    status: u16,
    problem_type: &str,
    reason: &str,
    before: f64,
) -> Value {
    assert_eq!(res.status(), status, "status");
    assert_eq!(
        res.headers()["content-type"],
        "application/problem+json",
        "problem document"
    );
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["type"], problem_type, "{body}");
    assert_eq!(body["status"], status);
    assert!(!body["detail"].as_str().unwrap().is_empty());
    let after = app
        .metric(
            "sluice_readings_rejected_total",
            &[("transport", "http"), ("reason", reason)],
        )
        .await;
    assert!(after > before, "{reason} not counted: {before} -> {after}");
    body
}

async fn rejected(app: &TestApp, reason: &str) -> f64 {
    app.metric(
        "sluice_readings_rejected_total",
        &[("transport", "http"), ("reason", reason)],
    )
    .await
}

#[tokio::test]
async fn request_level_errors_get_problem_documents_and_are_counted() {
    let app = spawn_app_with(|s| s.limits.max_body_bytes = 64 * 1024).await;

    // Not JSON, with line and column.
    let before = rejected(&app, "malformed").await;
    let res = app.post_raw("application/json", b"hello".to_vec()).await;
    let body =
        expect_request_rejected(&app, res, 400, "urn:sluice:malformed", "malformed", before).await;
    assert!(
        body["detail"].as_str().unwrap().contains("line 1 column"),
        "{body}"
    );

    // Truncated JSON.
    let before = rejected(&app, "malformed").await;
    let res = app
        .post_raw(
            "application/json",
            br#"[{"device_id":"a","metrics":{"x":1}}, {"dev"#.to_vec(),
        )
        .await;
    expect_request_rejected(&app, res, 400, "urn:sluice:malformed", "malformed", before).await;

    // Nested 10 000 deep: rejected, and the service survives.
    let before = rejected(&app, "malformed").await;
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let res = app.post_raw("application/json", deep.into_bytes()).await;
    assert_eq!(res.status(), 422);
    assert!(rejected(&app, "malformed").await > before);
    let deep = "[".repeat(10_000);
    let res = app.post_raw("application/json", deep.into_bytes()).await;
    assert_eq!(res.status(), 400);

    // One byte over the body limit.
    let before = rejected(&app, "too_large").await;
    let res = app
        .post_raw("application/json", vec![b' '; 64 * 1024 + 1])
        .await;
    expect_request_rejected(
        &app,
        res,
        413,
        "urn:sluice:payload-too-large",
        "too_large",
        before,
    )
    .await;
    // Exactly at the limit is read (and then judged on content).
    let mut at_limit = json!([reading("limit-ok", 1)]).to_string().into_bytes();
    at_limit.resize(64 * 1024, b' ');
    assert_eq!(
        app.post_raw("application/json", at_limit).await.status(),
        200
    );

    // A gzip bomb: small on the wire, over the limit once expanded.
    let before = rejected(&app, "too_large").await;
    let bomb = gzip(&vec![b' '; 10 * 1024 * 1024]);
    assert!(bomb.len() < 64 * 1024);
    let res = app
        .client
        .post(app.url("/v1/readings"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(bomb)
        .send()
        .await
        .unwrap();
    let body = expect_request_rejected(
        &app,
        res,
        413,
        "urn:sluice:payload-too-large",
        "too_large",
        before,
    )
    .await;
    assert!(body["detail"].as_str().unwrap().contains("decompression"));

    // Not gzip at all, though the header says so.
    let before = rejected(&app, "malformed").await;
    let res = app
        .client
        .post(app.url("/v1/readings"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body("[]")
        .send()
        .await
        .unwrap();
    let body =
        expect_request_rejected(&app, res, 400, "urn:sluice:malformed", "malformed", before).await;
    assert!(body["detail"].as_str().unwrap().contains("gzip"), "{body}");

    // Wrong content type, wrong encoding.
    let before = rejected(&app, "unsupported_media_type").await;
    let res = app.post_raw("text/plain", b"{}".to_vec()).await;
    expect_request_rejected(
        &app,
        res,
        415,
        "urn:sluice:unsupported-media-type",
        "unsupported_media_type",
        before,
    )
    .await;
    let before = rejected(&app, "unsupported_media_type").await;
    let res = app
        .client
        .post(app.url("/v1/readings"))
        .header("content-type", "application/json")
        .header("content-encoding", "br")
        .body("[]")
        .send()
        .await
        .unwrap();
    expect_request_rejected(
        &app,
        res,
        415,
        "urn:sluice:unsupported-media-type",
        "unsupported_media_type",
        before,
    )
    .await;

    // The service is still healthy and valid data still flows.
    let res = app.post_json(&json!([reading("after-errors", 1)])).await;
    assert_eq!(res.status(), 200);
    assert_eq!(app.stored_seqs("after-errors").await, [1].into());
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn too_many_readings_is_413() {
    let app = spawn_app().await;
    let before = rejected(&app, "too_many_readings").await;
    let batch: Vec<Value> = (0..10_001).map(|i| reading("many", i)).collect();
    let res = app.post_json(&Value::Array(batch)).await;
    let body = expect_request_rejected(
        &app,
        res,
        413,
        "urn:sluice:too-many-readings",
        "too_many_readings",
        before,
    )
    .await;
    assert!(body["detail"].as_str().unwrap().contains("10001"), "{body}");
    assert_eq!(rejected(&app, "too_many_readings").await - before, 10_001.0);
    // 10 000 is fine.
    let batch: Vec<Value> = (0..10_000).map(|i| reading("many", i)).collect();
    let res = app.post_json(&Value::Array(batch)).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap()["accepted"], 10_000);
    assert!(app.metric("sluice_readings_rejected_total", &[]).await >= 10_001.0);
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn invalid_readings_are_rejected_by_index_and_neighbours_stored() {
    let app = spawn_app().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let year = 365 * 86_400_000i64;
    let many_metrics: serde_json::Map<String, Value> =
        (0..257).map(|i| (format!("m{i}"), json!(i))).collect();
    // (bad reading, expected error prefix, expected reason label)
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            json!({"seq": 1, "metrics": {"x": 1}}),
            "device_id: required",
            "invalid_device_id",
        ),
        (
            json!({"device_id": "a/b", "metrics": {"x": 1}}),
            "device_id: '/' is not allowed",
            "invalid_device_id",
        ),
        (
            json!({"device_id": "a+b", "metrics": {"x": 1}}),
            "device_id: '+' is not allowed",
            "invalid_device_id",
        ),
        (
            json!({"device_id": "a#b", "metrics": {"x": 1}}),
            "device_id: '#' is not allowed",
            "invalid_device_id",
        ),
        (
            json!({"device_id": "a b", "metrics": {"x": 1}}),
            "device_id: ' ' is not allowed",
            "invalid_device_id",
        ),
        (
            json!({"device_id": "d".repeat(129), "metrics": {"x": 1}}),
            "device_id: must be at most 128",
            "invalid_device_id",
        ),
        (
            json!({"device_id": "a", "ts": "last tuesday", "metrics": {"x": 1}}),
            "ts: `last tuesday` is not an RFC 3339",
            "invalid_ts",
        ),
        (
            json!({"device_id": "a", "ts": now + year, "metrics": {"x": 1}}),
            "ts: ",
            "invalid_ts",
        ),
        (
            json!({"device_id": "a", "ts": now - year, "metrics": {"x": 1}}),
            "ts: ",
            "invalid_ts",
        ),
        (
            json!({"device_id": "a", "metrics": {"x": "warm"}}),
            "metrics.x: expected a finite number or a boolean",
            "invalid_metrics",
        ),
        (
            json!({"device_id": "a", "metrics": {"x": null}}),
            "metrics.x: expected a finite number or a boolean",
            "invalid_metrics",
        ),
        (
            json!({"device_id": "a", "metrics": many_metrics}),
            "metrics: at most 256",
            "invalid_metrics",
        ),
        (
            json!({"device_id": "a", "metrics": {"x": 1}, "colour": "red"}),
            "colour: unknown field",
            "unknown_field",
        ),
        (
            json!({"device_id": "a", "metrics": {}}),
            "metrics: at least one metric",
            "invalid_metrics",
        ),
    ];
    let mut before = std::collections::HashMap::new();
    for (_, _, reason) in &cases {
        before.insert(*reason, rejected(&app, reason).await);
    }
    // Interleave: good, bad, good, bad, ..., good.
    let mut items: Vec<String> = Vec::new();
    let mut good = 0u64;
    for (bad, _, _) in &cases {
        items.push(reading("neighbour", good).to_string());
        good += 1;
        items.push(bad.to_string());
    }
    items.push(reading("neighbour", good).to_string());
    good += 1;
    // 1e400 can only be written as raw JSON text.
    items.push(r#"{"device_id":"a","metrics":{"x":1e400}}"#.to_string());
    let body = format!("[{}]", items.join(","));
    let res = app.post_raw("application/json", body.into_bytes()).await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["accepted"], good);
    let rejected_list = body["rejected"].as_array().unwrap();
    assert_eq!(rejected_list.len(), cases.len() + 1);
    for (i, (_, want, reason)) in cases.iter().enumerate() {
        let r = &rejected_list[i];
        assert_eq!(r["index"], 2 * i + 1, "{r}");
        // `reason` is the value the rejected counter is labelled with (checked below).
        assert_eq!(r["reason"], *reason, "case {i}: {r}");
        let err = r["error"].as_str().unwrap();
        assert!(
            err.starts_with(want),
            "case {i}: got `{err}`, want `{want}…`"
        );
    }
    let last = rejected_list.last().unwrap();
    assert_eq!(
        last["error"],
        "metrics.x: expected a finite number or a boolean"
    );
    assert_eq!(last["reason"], "invalid_metrics");
    assert!(last["error"].as_str().unwrap().starts_with("metrics.x"));

    for (reason, b) in &before {
        let n = cases.iter().filter(|c| c.2 == *reason).count() as f64
            + if *reason == "invalid_metrics" {
                1.0
            } else {
                0.0
            };
        assert_eq!(rejected(&app, reason).await - b, n, "{reason}");
    }
    assert_eq!(app.stored_seqs("neighbour").await, (0..good).collect());

    // All bad: 422 with the same body shape.
    let res = app
        .post_json(&json!([{"device_id": "a"}, {"metrics": {"x": 1}}]))
        .await;
    assert_eq!(res.status(), 422);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["accepted"], 0);
    assert_eq!(body["rejected"].as_array().unwrap().len(), 2);
    assert_eq!(body["rejected"][0]["reason"], "invalid_metrics", "{body}");
    assert_eq!(body["rejected"][1]["reason"], "invalid_device_id", "{body}");
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn duplicates_are_stored_once_and_reported() {
    let app = spawn_app().await;
    let res = app
        .post_json(&json!([
            reading("dup", 1),
            reading("dup", 2),
            reading("dup", 1)
        ]))
        .await;
    assert_eq!(
        res.json::<Value>().await.unwrap(),
        json!({"accepted": 2, "duplicates": 1, "rejected": []})
    );
    let res = app
        .post_json(&json!([reading("dup", 1), reading("dup", 3)]))
        .await;
    assert_eq!(
        res.json::<Value>().await.unwrap(),
        json!({"accepted": 1, "duplicates": 1, "rejected": []})
    );
    let (_, body) = app.get_json("/v1/devices/dup/readings").await;
    let seqs: Vec<u64> = body["readings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs.len(), 3, "each (device, seq) stored once: {seqs:?}");
    assert_eq!(
        app.metric("sluice_readings_duplicate_total", &[("transport", "http")])
            .await,
        2.0
    );
    // Readings without seq are never duplicates.
    let r = json!({"device_id": "noseq", "metrics": {"x": 1}});
    for _ in 0..2 {
        let res = app.post_json(&r).await;
        assert_eq!(res.json::<Value>().await.unwrap()["accepted"], 1);
    }
    app.shutdown().await.unwrap();
}

/// A store that cannot open once the data directory has passed the start-up check (here its
/// `journal` is a file where a directory must be) is not a configuration error: Sluice
/// serves, `/readyz` and ingest answer 503 problem documents, and the store opens as soon as
/// it can. (A data directory that cannot be created or written stops the start with exit
/// code 2: tests/input_edges.rs.)
#[tokio::test]
async fn a_store_that_cannot_open_answers_503_and_recovers() {
    let blocker = std::sync::Arc::new(std::sync::Mutex::new(None));
    let path = blocker.clone();
    let app = spawn_app_unready(move |s| {
        let journal = s.storage.journal_dir();
        std::fs::write(&journal, b"not a directory").unwrap();
        *path.lock().unwrap() = Some(journal);
    })
    .await;
    wait_until(
        std::time::Duration::from_secs(10),
        "a store error",
        || async { app.metric("sluice_store_errors_total", &[]).await >= 1.0 },
    )
    .await;
    let res = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let res = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(res.status(), 503);
    assert!(res.headers().contains_key("retry-after"));
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["type"], "urn:sluice:not-ready", "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .starts_with("not ready: store unavailable"),
        "{body}"
    );
    let res = app.post_json(&json!([reading("nowhere", 1)])).await;
    assert_eq!(res.status(), 503);
    assert!(res.headers().contains_key("retry-after"));
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["type"], "urn:sluice:unavailable");
    assert_eq!(
        app.metric("sluice_readings_shed_total", &[("transport", "http")])
            .await,
        1.0
    );
    assert_eq!(app.metric("sluice_readings_accepted_total", &[]).await, 0.0);

    // The obstacle goes: the writer's next probe opens the store, and ingest is taken.
    let journal = blocker.lock().unwrap().take().unwrap();
    std::fs::remove_file(journal).unwrap();
    app.wait_ready().await;
    let res = app.post_json(&json!([reading("nowhere", 1)])).await;
    assert_eq!(res.status(), 200);
    assert_eq!(app.stored_seqs("nowhere").await, [1].into());
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn metrics_and_probes() {
    let app = spawn_app().await;
    app.post_json(&json!([reading("m", 1)])).await;
    let text = app.scrape().await;
    for name in [
        "sluice_readings_received_total",
        "sluice_readings_accepted_total",
        "sluice_readings_duplicate_total",
        "sluice_readings_rejected_total",
        "sluice_readings_shed_total",
        "sluice_pipeline_queue_depth",
        "sluice_pipeline_queue_capacity",
        "sluice_batch_size_bucket",
        "sluice_store_commit_seconds_bucket",
        "sluice_store_errors_total",
        "sluice_ack_latency_seconds_bucket",
        "sluice_http_requests_total",
        "sluice_http_request_duration_seconds_bucket",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        assert!(text.contains(name), "missing {name}");
    }
    assert!(!text.contains("device_id="), "no device id label");
    assert!(!text.contains("\"m\""), "no device id in label values");
    assert_eq!(
        metric_value(
            &text,
            "sluice_pipeline_queue_capacity",
            &[("stage", "admission")]
        ),
        100_000.0
    );
    assert_eq!(
        metric_value(
            &text,
            "sluice_http_requests_total",
            &[("route", "/v1/readings"), ("status", "200")]
        ),
        1.0
    );
    let res = app.client.get(app.url("/nope")).send().await.unwrap();
    assert_eq!(res.status(), 404);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    app.shutdown().await.unwrap();
}

/// `GET /v1/devices` pages (SPEC §3): `limit`, `cursor` from `next`, `prefix` (taken
/// literally: `_` is no wildcard), 400 for unknown or bad parameters; the same answers from
/// memory (SQLite) and from the shared device table (PostgreSQL).
#[tokio::test]
async fn devices_come_a_page_at_a_time() {
    let db = pg::TestDb::new();
    let url = db.url();
    let sqlite = spawn_app().await;
    let postgres = spawn_app_with(move |s| {
        s.storage.backend = sluice::config::Backend::Postgres;
        s.storage.postgres.url = sluice::config::DbUrl::new(url);
    })
    .await;
    let ids = [
        "a-1", "a-2", "a-3", "a-4", "a-5", "b-1", "b-2", "x_1", "xa1",
    ];
    for app in [&sqlite, &postgres] {
        let batch: Vec<Value> = ids.iter().map(|id| reading(id, 1)).collect();
        assert_eq!(app.post_json(&json!(batch)).await.status(), 200);
        let page = |path: String| async move {
            let (status, body) = app.get_json(&path).await;
            assert_eq!(status, 200, "{path}: {body}");
            let ids: Vec<String> = body["devices"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["device_id"].as_str().unwrap().to_string())
                .collect();
            (
                ids,
                body.get("next")
                    .and_then(|n| n.as_str())
                    .map(str::to_string),
            )
        };
        // Every device, two at a time, by following `next`.
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                None => "/v1/devices?limit=2".to_string(),
                Some(c) => format!("/v1/devices?limit=2&cursor={c}"),
            };
            let (got, next) = page(path).await;
            assert!(got.len() <= 2);
            seen.extend(got);
            match next {
                Some(n) => cursor = Some(n),
                None => break,
            }
        }
        assert_eq!(seen, ids, "pages in id order, each device once");
        assert_eq!(
            page("/v1/devices?prefix=a-&limit=3".into()).await,
            (
                vec!["a-1".into(), "a-2".into(), "a-3".into()],
                Some("a-3".into())
            )
        );
        assert_eq!(
            page("/v1/devices?prefix=a-&cursor=a-3".into()).await,
            (vec!["a-4".into(), "a-5".into()], None)
        );
        assert_eq!(
            page("/v1/devices?prefix=x_".into()).await,
            (vec!["x_1".into()], None)
        );
        assert_eq!(page("/v1/devices?prefix=zz".into()).await, (vec![], None));
        let (_, one) = app.get_json("/v1/devices/x_1").await;
        assert_eq!(one["device_id"], "x_1");
        for (path, names) in [
            ("/v1/devices?bogus=1", "bogus"),
            ("/v1/devices?limit=0", "limit"),
            ("/v1/devices?limit=10001", "limit"),
            ("/v1/devices?prefix=a%20b", "prefix"),
            ("/v1/devices?prefix=-x", "prefix"),
            ("/v1/devices?prefix=a.b", "prefix"),
            ("/v1/devices?cursor=-", "cursor"),
            ("/v1/devices?cursor=a.b", "cursor"),
        ] {
            let (status, body) = app.get_json(path).await;
            assert_eq!(status, 400, "{path}: {body}");
            let kind = if path.contains("bogus") {
                "urn:sluice:unknown-parameter"
            } else {
                "urn:sluice:malformed"
            };
            assert_eq!(body["type"], kind, "{path}: {body}");
            assert!(
                body["detail"].as_str().unwrap().contains(names),
                "{path}: {body}"
            );
        }
        let (status, _) = app.get_json("/v1/devices/nobody").await;
        assert_eq!(status, 404);
    }
}

/// `GET /v1/devices/{id}/readings` pages with `next` and `cursor` on both backends (SPEC §3):
/// readings that share a timestamp are split across pages and none is seen twice; `next` is
/// absent when the page holds the rest; a cursor this server did not give is a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_come_a_page_at_a_time() {
    let db = pg::TestDb::new();
    let url = db.url();
    let sqlite = spawn_app().await;
    let postgres = spawn_app_with(move |s| {
        s.storage.backend = sluice::config::Backend::Postgres;
        s.storage.postgres.url = sluice::config::DbUrl::new(url);
    })
    .await;
    let ts = sluice::reading::now_ms() - 60_000;
    // Seven readings, three at each of the first two timestamps.
    let batch: Vec<Value> = (1..=7u64)
        .map(|seq| {
            json!({"device_id": "pager", "seq": seq, "ts": ts + (seq as i64 - 1) / 3,
                   "metrics": {"v": seq}})
        })
        .collect();
    for app in [&sqlite, &postgres] {
        assert_eq!(app.post_json(&json!(batch)).await.status(), 200);
        for (order, want) in [
            ("asc", vec![1, 2, 3, 4, 5, 6, 7]),
            ("desc", vec![7, 6, 5, 4, 3, 2, 1]),
        ] {
            let mut seen = Vec::new();
            let mut pages = 0;
            let mut cursor: Option<String> = None;
            loop {
                let mut path = format!("/v1/devices/pager/readings?limit=2&order={order}");
                if let Some(c) = &cursor {
                    path.push_str(&format!("&cursor={c}"));
                }
                let (status, body) = app.get_json(&path).await;
                assert_eq!(status, 200, "{path}: {body}");
                let page = body["readings"].as_array().unwrap();
                assert!(page.len() <= 2, "{path}: {body}");
                pages += 1;
                seen.extend(page.iter().map(|r| r["seq"].as_u64().unwrap()));
                match body.get("next").and_then(Value::as_str) {
                    Some(n) => cursor = Some(n.to_owned()),
                    None => break,
                }
            }
            assert_eq!(seen, want, "{order}");
            assert_eq!(pages, 4, "{order}: 2+2+2+1");
        }
        // A page that holds exactly the rest has no `next`.
        let (_, body) = app.get_json("/v1/devices/pager/readings?limit=7").await;
        assert_eq!(body["readings"].as_array().unwrap().len(), 7);
        assert!(body.get("next").is_none(), "{body}");
        let (_, body) = app.get_json("/v1/devices/pager/readings?limit=6").await;
        assert!(body["next"].is_string(), "{body}");
        for bad in ["x", "12", "1.-1", "1.2.3", "%20"] {
            let path = format!("/v1/devices/pager/readings?cursor={bad}");
            let (status, body) = app.get_json(&path).await;
            assert_eq!(status, 400, "{path}: {body}");
            assert_eq!(body["type"], "urn:sluice:malformed", "{path}: {body}");
            assert!(
                body["detail"].as_str().unwrap().contains("cursor"),
                "{path}: {body}"
            );
        }
    }
}
