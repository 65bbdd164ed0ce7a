//! InfluxDB line protocol on `POST /write` and `POST /api/v2/write` (SPEC §10), written by the
//! official InfluxDB Python clients (`influxdb-client` for v2, `influxdb` for v1, from the venv
//! `scripts/test` makes) and read back exactly through `/v1/devices/{id}/readings`; and the
//! answers InfluxDB's clients act on (204, a partial write's 400, 413, bad parameters), with
//! valid lines stored beside bad ones.

mod common;

use std::io::Write;

use serde_json::Value;

use common::{spawn_app, spawn_app_with, TestApp};

/// Runs tests/clients/influx_write.py and returns its JSON.
fn run_client(mode: &str, base: &str, prefix: &str) -> Value {
    let now = sluice::reading::now_ms().to_string();
    common::run_client_script("influx_write.py", &[mode, base, &now, prefix])
}

/// Every expected reading is stored exactly as the client wrote it.
async fn check_stored(app: &TestApp, expected: &[Value]) {
    for e in expected {
        let device = e["device_id"].as_str().unwrap();
        let (status, body) = app
            .get_json(&format!("/v1/devices/{device}/readings"))
            .await;
        assert_eq!(status, 200, "{device}: {body}");
        let ts = e["ts_ms"].as_i64().unwrap();
        let found: Vec<&Value> = body["readings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| sluice::reading::parse_ts(r["ts"].as_str().unwrap()) == Some(ts))
            .collect();
        assert_eq!(found.len(), 1, "{device} at {ts}: {body}");
        let r = found[0];
        assert_eq!(r["metrics"], e["metrics"], "{device}");
        assert_eq!(r["tags"], e["tags"], "{device}");
        assert_eq!(r["seq"], e["seq"], "{device}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_v2_client_writes_every_type_and_precision() {
    let app = spawn_app().await;
    let base = format!("http://{}", app.addr);
    let out = tokio::task::spawn_blocking(move || run_client("v2", &base, "lp"))
        .await
        .unwrap();
    let expected = out["expected"].as_array().unwrap();
    assert_eq!(expected.len(), 7);
    check_stored(&app, expected).await;
    // The partial write: 400 naming line 2, lines 1 and 3 stored (checked above).
    assert_eq!(out["partial"]["status"], 400, "{out}");
    assert_eq!(out["partial"]["body"]["code"], "invalid");
    assert_eq!(out["partial"]["body"]["line"], 2);
    let msg = out["partial"]["body"]["message"].as_str().unwrap();
    assert!(msg.contains("fields.v") && msg.contains("1.5i"), "{msg}");
    assert!(msg.contains("the other 2 written"), "{msg}");
    // String fields were ignored and counted: one per point of the four precisions.
    assert_eq!(
        app.metric("sluice_line_protocol_ignored_fields_total", &[])
            .await,
        4.0
    );
    assert_eq!(
        app.metric(
            "sluice_readings_rejected_total",
            &[("transport", "http"), ("reason", "invalid_metrics")]
        )
        .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_v1_client_writes_with_host_as_the_device() {
    let app = spawn_app().await;
    let base = format!("http://{}", app.addr);
    let out = tokio::task::spawn_blocking(move || run_client("v1", &base, "lp1"))
        .await
        .unwrap();
    let expected = out["expected"].as_array().unwrap();
    assert_eq!(expected.len(), 6);
    check_stored(&app, expected).await;
    assert_eq!(out["partial"]["status"], 400, "{out}");
    assert_eq!(out["partial"]["body"]["line"], 1);
}

async fn post(
    app: &TestApp,
    path: &str,
    body: Vec<u8>,
    gzip: bool,
) -> (u16, Option<String>, String) {
    let mut req = app
        .client
        .post(app.url(path))
        .header("content-type", "text/plain; charset=utf-8")
        .body(body);
    if gzip {
        req = req.header("content-encoding", "gzip");
    }
    let res = req.send().await.expect("POST");
    let retry = res
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (res.status().as_u16(), retry, res.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_as_influxdb_clients_expect() {
    let app = spawn_app_with(|s| {
        s.limits.max_readings_per_request = 3;
        s.formats.line_protocol.device_tag = "sensor".into();
    })
    .await;
    let now = sluice::reading::now_ms();
    // A Telegraf-style body, gzipped: the configured device tag, nanosecond timestamps.
    let body = format!(
        "mem,sensor=gw-1,host=h1 used=10i,free=5.5 {}\nmem,sensor=gw-1,host=h1 used=11i {}\n",
        (now - 2000) * 1_000_000,
        (now - 1000) * 1_000_000
    );
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(body.as_bytes()).unwrap();
    let (status, _, text) = post(
        &app,
        "/api/v2/write?org=o&bucket=b",
        gz.finish().unwrap(),
        true,
    )
    .await;
    assert_eq!(status, 204, "{text}");
    assert!(text.is_empty());
    let (_, stored) = app.get_json("/v1/devices/gw-1/readings").await;
    let rows = stored["readings"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{stored}");
    assert_eq!(rows[0]["metrics"]["mem.used"], 10);
    assert_eq!(rows[0]["tags"]["host"], "h1");
    // More lines than limits.max_readings_per_request: 413, nothing stored.
    let four = (0..4)
        .map(|i| format!("m,sensor=big v={i}"))
        .collect::<Vec<_>>()
        .join("\n");
    let (status, _, text) = post(&app, "/api/v2/write", four.into_bytes(), false).await;
    assert_eq!(status, 413, "{text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["code"], "request too large");
    let (status, _) = app.get_json("/v1/devices/big/readings").await;
    assert_eq!(status, 404);
    // Bad parameters and precisions, v1 and v2: 400 in InfluxDB's shape.
    for path in [
        "/api/v2/write?precision=m",
        "/write?precision=x",
        "/api/v2/write?bogus=1",
    ] {
        let (status, _, text) = post(&app, path, b"m,sensor=p v=1".to_vec(), false).await;
        assert_eq!(status, 400, "{path}: {text}");
        let body: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(body["code"], "invalid", "{path}");
    }
    let (status, _) = app.get_json("/v1/devices/p/readings").await;
    assert_eq!(status, 404, "nothing stored from a refused request");
    // Every line bad: a 400 that says nothing was written, and a timestamp out of range
    // names the precision as the client wrote it.
    let (status, _, text) = post(
        &app,
        "/write?precision=h",
        b"m,sensor=far v=1 9999999999999".to_vec(),
        false,
    )
    .await;
    assert_eq!(status, 400, "{text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    let msg = body["message"].as_str().unwrap();
    assert!(
        msg.contains("nothing written") && !msg.contains("partial") && msg.contains("precision h"),
        "{msg}"
    );
    // Duplicates (same seq) are a success: 204, stored once.
    for _ in 0..2 {
        let (status, _, text) = post(
            &app,
            "/write?db=x&precision=ms",
            format!("m,sensor=dup v=1,seq=5i {now}").into_bytes(),
            false,
        )
        .await;
        assert_eq!(status, 204, "{text}");
    }
    let (_, stored) = app.get_json("/v1/devices/dup/readings").await;
    assert_eq!(stored["readings"].as_array().unwrap().len(), 1);
    // An empty body is a successful write of nothing.
    let (status, _, _) = post(&app, "/api/v2/write", Vec::new(), false).await;
    assert_eq!(status, 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_is_down_answers_503_with_retry_after() {
    // PostgreSQL on a port where nothing listens: Sluice starts, not ready, and sheds.
    let app = common::spawn_app_unready(|s| {
        s.storage.backend = sluice::config::Backend::Postgres;
        s.storage.postgres.url = sluice::config::DbUrl::new("postgres://postgres@127.0.0.1:9/none");
    })
    .await;
    let (status, retry, text) =
        post(&app, "/api/v2/write", b"m,device_id=a v=1".to_vec(), false).await;
    assert_eq!(status, 503, "{text}");
    assert!(retry.is_some_and(|r| r.parse::<u64>().is_ok_and(|s| s >= 1)));
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["code"], "unavailable");
}
