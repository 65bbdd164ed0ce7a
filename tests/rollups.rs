//! Rollups and aggregation queries (SPEC §12) against the real service: every answer of
//! `GET /v1/devices/{id}/readings?agg=&step=` is checked against the same aggregate computed
//! here from the raw readings (`GET …/readings`, page by page). The kill -9 test runs the real
//! binary and kills it at random moments while it ingests and compacts (as
//! `compaction_faults.rs` does), then compares every bucket of every level.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use serde_json::{json, Value};

const MINUTE: i64 = 60_000;
const HOUR: i64 = 3_600_000;
const FUNCS: [&str; 7] = ["avg", "min", "max", "sum", "count", "first", "last"];

/// Every stored reading of `device` as `(ts ms, metrics)`, in the store's `(ts, rid)` order.
async fn raw(client: &reqwest::Client, base: &str, device: &str) -> Vec<(i64, Value)> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{base}/v1/devices/{device}/readings?limit=10000");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let res = client.get(url).send().await.expect("query");
        if res.status() == 404 {
            return out;
        }
        assert_eq!(res.status(), 200);
        let body: Value = res.json().await.expect("json");
        for r in body["readings"].as_array().expect("readings") {
            let ts = sluice::reading::parse_ts(r["ts"].as_str().expect("ts")).expect("rfc 3339");
            out.push((ts, r["metrics"].clone()));
        }
        match body["next"].as_str() {
            Some(n) => cursor = Some(n.to_owned()),
            None => return out,
        }
    }
}

fn number(v: &Value) -> f64 {
    match v {
        Value::Bool(b) => f64::from(u8::from(*b)),
        other => other.as_f64().expect("number"),
    }
}

/// The answer `agg=func&step=step_ms` must give, computed from raw readings: bucket start →
/// metric → value.
fn expected(
    rows: &[(i64, Value)],
    func: &str,
    step_ms: i64,
    metric: Option<&str>,
) -> BTreeMap<i64, BTreeMap<String, Value>> {
    // count, sum, min, max, first, last
    type Acc = (u64, f64, Value, Value, Value, Value);
    let mut acc: BTreeMap<i64, BTreeMap<String, Acc>> = BTreeMap::new();
    for (ts, metrics) in rows {
        let bucket = ts.div_euclid(step_ms) * step_ms;
        for (name, v) in metrics.as_object().expect("metrics") {
            if metric.is_some_and(|m| m != name) {
                continue;
            }
            let a = acc
                .entry(bucket)
                .or_default()
                .entry(name.clone())
                .or_insert((0, 0.0, v.clone(), v.clone(), v.clone(), v.clone()));
            a.0 += 1;
            a.1 += number(v);
            if number(v) < number(&a.2) {
                a.2 = v.clone();
            }
            if number(v) > number(&a.3) {
                a.3 = v.clone();
            }
            a.5 = v.clone();
        }
    }
    acc.into_iter()
        .map(|(b, m)| {
            let m = m
                .into_iter()
                .map(|(name, (n, sum, min, max, first, last))| {
                    let v = match func {
                        "avg" => json!(sum / n as f64),
                        "sum" => json!(sum),
                        "count" => json!(n),
                        "min" => min,
                        "max" => max,
                        "first" => first,
                        "last" => last,
                        other => panic!("{other}"),
                    };
                    (name, v)
                })
                .collect();
            (b, m)
        })
        .collect()
}

/// `GET …/readings?agg=&step=` as bucket start → metric → value (asserting a 200).
async fn agg(
    client: &reqwest::Client,
    base: &str,
    device: &str,
    query: &str,
) -> BTreeMap<i64, BTreeMap<String, Value>> {
    let url = format!("{base}/v1/devices/{device}/readings?{query}");
    let res = client.get(&url).send().await.expect("agg query");
    let status = res.status();
    if status == 404 {
        return BTreeMap::new();
    }
    let body: Value = res.json().await.expect("json");
    assert_eq!(status, 200, "{url}: {body}");
    body["series"]
        .as_array()
        .expect("series")
        .iter()
        .map(|b| {
            let ts = sluice::reading::parse_ts(b["ts"].as_str().expect("ts")).expect("ts");
            let m = b["metrics"]
                .as_object()
                .expect("metrics")
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            (ts, m)
        })
        .collect()
}

/// Asserts that every function at every `steps` agrees with raw readings for `device`.
async fn check_device(
    client: &reqwest::Client,
    base: &str,
    device: &str,
    steps: &[(i64, &str)],
    range: (i64, i64),
) -> usize {
    let rows = raw(client, base, device).await;
    let mut buckets = 0;
    for (step_ms, step) in steps {
        for func in FUNCS {
            let q = format!(
                "agg={func}&step={step}&from={}&to={}&limit=10000",
                range.0, range.1
            );
            let got = agg(client, base, device, &q).await;
            let want = expected(&rows, func, *step_ms, None);
            assert_eq!(got, want, "{device}: agg={func} step={step}");
            buckets += got.len();
        }
    }
    buckets
}

/// Readings whose sums are exact in binary (quarters, small integers), so that level and raw
/// answers can be compared bit for bit whatever order they were added in.
fn reading_at(device: &str, seq: u64, ts: i64) -> Value {
    json!({
        "device_id": device,
        "seq": seq,
        "ts": ts,
        "metrics": {"i": (seq % 97) as i64 - 40, "f": (seq % 13) as f64 * 0.25, "b": seq % 3 == 0}
    })
}

async fn post(client: &reqwest::Client, base: &str, body: &[Value]) -> Option<Value> {
    let res = client
        .post(format!("{base}/v1/readings"))
        .json(&body)
        .send()
        .await
        .ok()?;
    if res.status() != 200 {
        return None;
    }
    res.json().await.ok()
}

/// kill -9 at random moments under load (compaction steps stretched so kills land inside
/// them), with late readings and resent duplicates: after each restart, and again once
/// everything is compacted, every bucket of every level equals the aggregate of the stored
/// raw readings, and the 1m and 1h steps are served from their levels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_equal_raw_aggregates_after_kill_9() {
    const DEVICES: u64 = 3;
    let data = tempfile::tempdir().expect("tempdir");
    let client = reqwest::Client::new();
    let mut rng = Rng::new();
    // Readings spread over about three hours, ending an hour ago.
    let now = sluice::reading::now_ms();
    let base_ts = (now - 4 * HOUR).div_euclid(HOUR) * HOUR;
    let range = (base_ts - HOUR, now + HOUR);
    let steps = [(MINUTE, "1m"), (HOUR, "1h")];
    let env = |pause_ms: u64| {
        vec![
            ("SLUICE__STORAGE__COMPACTION_INTERVAL", "30ms".to_string()),
            ("SLUICE__STORAGE__JOURNAL_SEAL_READINGS", "200".into()),
            ("SLUICE__STORAGE__COMPACTION_PAUSE", format!("{pause_ms}ms")),
        ]
    };
    let mut next_seq = [0u64; DEVICES as usize];
    let mut acked: Vec<Value> = Vec::new();
    for round in 0..4 {
        let pause = [0, 20, 60][rng.below(3) as usize];
        let proc = SluiceProcess::start(data.path(), &env(pause));
        let base = proc.url();
        wait_ready(&client, &format!("{base}/readyz")).await;
        // Right after a crash, with generations still in the journal: the gap is covered.
        for d in 0..DEVICES {
            check_device(&client, &base, &format!("roll-{d}"), &steps, range).await;
        }
        let kill_after = Duration::from_millis(200 + rng.below(500));
        let started = Instant::now();
        while started.elapsed() < kill_after {
            let mut batch: Vec<Value> = (0..40)
                .map(|_| {
                    let d = rng.below(DEVICES) as usize;
                    next_seq[d] += 1;
                    let seq = next_seq[d];
                    // Mostly in order, one in eight late (up to three hours back).
                    let ts = if rng.below(8) == 0 {
                        base_ts + rng.below(3 * HOUR as u64) as i64
                    } else {
                        base_ts + (seq as i64 * 1_500).min(3 * HOUR)
                    };
                    reading_at(&format!("roll-{d}"), seq, ts)
                })
                .collect();
            // Resends of acked readings: duplicates that must not count.
            for _ in 0..3 {
                if !acked.is_empty() {
                    let r = acked[rng.below(acked.len() as u64) as usize].clone();
                    batch.push(r);
                }
            }
            if let Some(body) = post(&client, &base, &batch).await {
                assert_eq!(body["accepted"], 40, "{body}");
                acked.extend(batch.into_iter().take(40));
            }
        }
        let p = proc;
        p.signal(Signal::SIGKILL);
        tokio::task::spawn_blocking(move || {
            let mut p = p;
            p.wait_exit(Duration::from_secs(10));
        })
        .await
        .expect("exited");
        eprintln!("round {round}: {} acked", acked.len());
    }
    let proc = SluiceProcess::start(data.path(), &env(0));
    let base = proc.url();
    wait_ready(&client, &format!("{base}/readyz")).await;
    wait_until(Duration::from_secs(30), "journal compacted", || async {
        scrape_metric(&client, &base, "sluice_store_journal_readings", &[]).await == 0.0
    })
    .await;
    let level_before = scrape_metric(
        &client,
        &base,
        "sluice_rollup_queries_total",
        &[("source", "level")],
    )
    .await;
    let mut buckets = 0;
    let mut stored = 0;
    for d in 0..DEVICES {
        let device = format!("roll-{d}");
        stored += raw(&client, &base, &device).await.len();
        buckets += check_device(&client, &base, &device, &steps, range).await;
    }
    // A batch killed between its commit and its answer is stored without an ack.
    assert!(
        stored >= acked.len(),
        "every acked reading stored: {stored} < {}",
        acked.len()
    );
    assert!(stored > 300, "too little was acked to mean much: {stored}");
    assert!(buckets > 100, "too few buckets compared: {buckets}");
    let level_after = scrape_metric(
        &client,
        &base,
        "sluice_rollup_queries_total",
        &[("source", "level")],
    )
    .await;
    assert_eq!(
        level_after - level_before,
        (DEVICES as usize * steps.len() * FUNCS.len()) as f64,
        "1m and 1h steps are served from their levels"
    );
}

/// Settings for the in-process tests: quick compaction.
fn quick(s: &mut sluice::Settings) {
    s.storage.compaction_interval = Duration::from_millis(20);
}

async fn compacted(app: &TestApp) {
    wait_until(Duration::from_secs(20), "journal compacted", || async {
        app.metric("sluice_store_journal_readings", &[]).await == 0.0
    })
    .await;
}

/// A late reading into an old, already rolled-up bucket updates it; a duplicate never counts;
/// a boolean's avg is the fraction true and its sum the count of true; 5m is served from the
/// 1m level and 7s from raw readings, both equal to the raw aggregate; empty buckets are left
/// out.
#[tokio::test]
async fn late_duplicate_boolean_and_steps() {
    let app = spawn_app_with(quick).await;
    let base = app.url("");
    let t0 = (sluice::reading::now_ms() - 2 * HOUR).div_euclid(HOUR) * HOUR;
    let at = |seq: u64, ts: i64, t: f64, ok: bool| json!({"device_id": "r1", "seq": seq, "ts": ts, "metrics": {"t": t, "ok": ok}});
    // Minutes 0, 1 and 7: the buckets in between stay empty.
    let body = json!([
        at(1, t0 + 1_000, 20.5, true),
        at(2, t0 + 30_000, 21.0, false),
        at(3, t0 + MINUTE + 5_000, 22.25, true),
        at(4, t0 + MINUTE + 6_000, 19.75, true),
        at(5, t0 + 7 * MINUTE, 18.0, false),
    ]);
    assert_eq!(app.post_json(&body).await.status(), 200);
    compacted(&app).await;
    let range = format!("from={}&to={}", t0, t0 + HOUR);
    let avg = series(&app, format!("agg=avg&step=1m&{range}")).await;
    assert_eq!(
        avg.keys().copied().collect::<Vec<_>>(),
        [t0, t0 + MINUTE, t0 + 7 * MINUTE]
    );
    assert_eq!(avg[&t0]["ok"], json!(0.5));
    assert_eq!(avg[&(t0 + MINUTE)]["ok"], json!(1.0));
    assert_eq!(avg[&t0]["t"], json!(20.75));
    let sum = series(&app, format!("agg=sum&step=1h&metric=ok&{range}")).await;
    assert_eq!(sum[&t0], BTreeMap::from([("ok".to_string(), json!(3.0))]));

    // A late reading in the (compacted) first minute, and a duplicate of seq 2 with another
    // value and time.
    let late = json!([
        at(6, t0 + 10_000, 30.0, true),
        at(2, t0 + 2 * MINUTE, 99.0, true)
    ]);
    let res: Value = app.post_json(&late).await.json().await.expect("json");
    assert_eq!(
        (res["accepted"].clone(), res["duplicates"].clone()),
        (json!(1), json!(1))
    );
    // Before compaction (the journal covers the gap) and after.
    for pass in 0..2 {
        let count = series(&app, format!("agg=count&step=1m&{range}")).await;
        assert_eq!(count[&t0]["t"], json!(3), "pass {pass}");
        assert!(
            !count.contains_key(&(t0 + 2 * MINUTE)),
            "the duplicate never counts"
        );
        let max = series(&app, format!("agg=max&step=1m&{range}")).await;
        assert_eq!(max[&t0]["t"], json!(30.0));
        let first = series(&app, format!("agg=first&step=1h&{range}")).await;
        assert_eq!(first[&t0]["t"], json!(20.5));
        let last = series(&app, format!("agg=last&step=1m&{range}")).await;
        assert_eq!(last[&t0]["t"], json!(21.0), "last by time, not by arrival");
        compacted(&app).await;
    }

    // Every function at 5m (from the 1m level) and 7s (raw) equals the raw aggregate.
    let rows = raw(&app.client, &base, "r1").await;
    for (step, step_ms, source) in [("5m", 5 * MINUTE, "level"), ("7s", 7_000, "raw")] {
        for func in FUNCS {
            let before = app
                .metric("sluice_rollup_queries_total", &[("source", source)])
                .await;
            let got = series(&app, format!("agg={func}&step={step}&{range}")).await;
            assert_eq!(got, expected(&rows, func, step_ms, None), "{func} {step}");
            let after = app
                .metric("sluice_rollup_queries_total", &[("source", source)])
                .await;
            assert_eq!(after - before, 1.0, "{func} {step} served from {source}");
        }
    }
    // Open ranges cover the stored extent; desc gives the newest bucket first.
    let open = agg(&app.client, &base, "r1", "agg=count&step=1m&order=desc").await;
    assert_eq!(open.len(), 3);
    let (status, body) = app
        .get_json("/v1/devices/r1/readings?agg=count&step=1m&order=desc&metric=ok")
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        body["series"][0]["ts"],
        json!(sluice::reading::format_ts(t0 + 7 * MINUTE))
    );
    assert_eq!(body["series"][0]["metrics"], json!({"ok": 1}));
    assert_eq!(body["step"], "1m");
    assert_eq!(body["agg"], "count");
    assert!(body.get("next").is_none());
    app.shutdown().await.expect("clean shutdown");
}

/// Bad aggregation parameters are 400 problems that say what is wrong.
#[tokio::test]
async fn bad_aggregation_queries_are_refused() {
    let app = spawn_app_with(quick).await;
    let body = json!([{"device_id": "q1", "seq": 1, "metrics": {"v": 1}}]);
    assert_eq!(app.post_json(&body).await.status(), 200);
    let day = 86_400_000i64;
    let t = (sluice::reading::now_ms() / day) * day;
    for (query, says) in [
        (
            format!("agg=avg&step=1s&from={}&to={}", t - day, t),
            "86400 buckets, more than limit 1000",
        ),
        (
            format!("agg=avg&step=1s&from={}&to={}&limit=200000", t - day, t),
            "from 1 to 100000",
        ),
        ("agg=avg".to_string(), "agg needs step"),
        ("step=1m".to_string(), "step needs agg"),
        (
            "agg=median&step=1m".to_string(),
            "must be one of avg, min, max, sum, count, first, last",
        ),
        ("agg=avg&step=soon".to_string(), "step: `soon`"),
        ("agg=avg&step=500us".to_string(), "whole milliseconds"),
        ("agg=avg&step=60".to_string(), "has no unit"),
        (
            "agg=avg&step=18446744073709551615s".to_string(),
            "longer than 36525days",
        ),
        ("agg=avg&step=1m&cursor=5.5".to_string(), "never paged"),
    ] {
        let (status, problem) = app
            .get_json(&format!("/v1/devices/q1/readings?{query}"))
            .await;
        assert_eq!(status, 400, "{query}: {problem}");
        let detail = problem["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(says), "{query}: {detail}");
    }
    let (status, problem) = app
        .get_json(&format!(
            "/v1/devices/q1/readings?agg=avg&step=1s&from={}&to={}",
            t - day,
            t
        ))
        .await;
    assert_eq!(status, 400);
    assert_eq!(problem["type"], "urn:sluice:too-many-buckets");
    let (status, _) = app
        .get_json("/v1/devices/nobody/readings?agg=avg&step=1m")
        .await;
    assert_eq!(status, 404);
    app.shutdown().await.expect("clean shutdown");
}

/// Rollups outlive raw readings (`rollups.retention` apart from `storage.retention`), which also
/// shows where an answer comes from: after raw retention dropped the chunks, a 5 min step
/// still answers (from the 1m level) while a 7 s step (raw) and the readings are empty.
#[tokio::test]
async fn rollups_outlive_raw_retention() {
    let app = spawn_app_with(|s| {
        quick(s);
        s.storage.retention = Duration::from_secs(3600);
        s.storage.retention_interval = Duration::from_millis(50);
    })
    .await;
    let t0 = (sluice::reading::now_ms() - 3 * HOUR).div_euclid(HOUR) * HOUR;
    let body: Vec<Value> = (0..30)
        .map(|i| json!({"device_id": "old", "seq": i, "ts": t0 + i * 20_000, "metrics": {"v": i}}))
        .collect();
    assert_eq!(app.post_json(&json!(body)).await.status(), 200);
    compacted(&app).await;
    wait_until(Duration::from_secs(20), "raw retention", || async {
        app.metric("sluice_retention_deleted_total", &[]).await >= 30.0
    })
    .await;
    let base = app.url("");
    assert!(raw(&app.client, &base, "old").await.is_empty());
    let range = format!("from={t0}&to={}", t0 + HOUR);
    let five = agg(
        &app.client,
        &base,
        "old",
        &format!("agg=count&step=5m&{range}"),
    )
    .await;
    assert_eq!(
        five.values()
            .map(|m| m["v"].as_u64().unwrap_or(0))
            .sum::<u64>(),
        30
    );
    assert_eq!(five[&t0]["v"], json!(15));
    let seven = agg(
        &app.client,
        &base,
        "old",
        &format!("agg=count&step=7s&{range}"),
    )
    .await;
    assert!(
        seven.is_empty(),
        "7s is computed from raw readings, which are gone: {seven:?}"
    );
    app.shutdown().await.expect("clean shutdown");
}

/// An aggregation of device `r1` (see [`agg`]).
async fn series(app: &TestApp, q: String) -> BTreeMap<i64, BTreeMap<String, Value>> {
    agg(&app.client, &app.url(""), "r1", &q).await
}
