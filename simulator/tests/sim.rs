//! The simulator against a real Sluice (in this process, port 0, temp data dir), against its
//! own null sink, and against a private mosquitto.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use serde_json::Value;
use sluice_sim::Summary;
use tokio_util::sync::CancellationToken;

fn assert_no_loss(s: &Summary) {
    let v = s.verify.as_ref().expect("--verify ran");
    assert!(s.acked > 0, "nothing was acknowledged");
    assert_eq!(v.acked, s.acked, "every acknowledged reading was checked");
    assert_eq!((v.lost, v.duplicated), (0, 0), "examples: {:?}", v.examples);
    assert_eq!(v.stored, v.acked);
    assert!(s.ok, "problems: {:?}", s.problems);
}

/// Through the binary's own entry point, with --json: nothing lost, and the JSON summary has
/// exactly the documented fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_run_stores_every_acknowledged_reading_and_writes_the_json_summary() {
    let app = spawn_sluice(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("summary.json");
    let url = app.url();
    let args = [
        "sluice-sim",
        "--quiet",
        "--target",
        &url,
        "--transport",
        "http",
        "--devices",
        "30",
        "--rate",
        "100",
        "--duration",
        "2s",
        "--batch",
        "50",
        "--connections",
        "4",
        "--verify",
        "--json",
        json.to_str().unwrap(),
    ];
    let cli = <sluice_sim::Cli as clap::Parser>::try_parse_from(args).unwrap();
    let code = sluice_sim::run_cli(cli, CancellationToken::new()).await;
    assert_eq!(code, 0);

    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let keys: BTreeSet<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    let documented: BTreeSet<&str> = Summary::FIELDS.iter().copied().collect();
    assert_eq!(
        keys, documented,
        "JSON fields vs Summary::FIELDS (documented in README)"
    );
    for k in ["count", "p50", "p90", "p99", "p999", "max", "mean"] {
        assert!(v["latency_ms"][k].is_number(), "latency_ms.{k}");
    }
    for k in ["acked", "stored", "lost", "duplicated", "extra", "devices"] {
        assert!(v["verify"][k].is_u64(), "verify.{k}");
    }
    assert_eq!(v["transport"], "http");
    assert_eq!(v["ok"], true);
    assert_eq!(v["verify"]["lost"], 0);
    assert_eq!(v["verify"]["duplicated"], 0);
    let acked = v["acked"].as_u64().unwrap();
    assert_eq!(v["verify"]["stored"].as_u64(), Some(acked));
    // 30 devices × 100/s for 2 s is 6000 due; the open-loop schedule is kept.
    assert!(acked >= 5000, "acked only {acked}");
    assert_eq!(
        app.metric("sluice_readings_accepted_total", &[("transport", "http")])
            .await as u64,
        acked
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_run_stores_every_acknowledged_reading() {
    let app = spawn_sluice(|_| {}).await;
    let url = app.url();
    let s = sim(&[
        "--target",
        &url,
        "--transport",
        "ws",
        "--devices",
        "20",
        "--rate",
        "60",
        "--duration",
        "2s",
        "--frame-readings",
        "3",
        "--window",
        "4",
        "--verify",
    ])
    .await;
    assert_no_loss(&s);
    assert_eq!(s.connects, 20, "one connection per device, none lost");
    assert_eq!(s.connections_peak, 20);
    assert!(s.acked >= 2000, "acked only {}", s.acked);
    assert_eq!(
        app.metric("sluice_readings_accepted_total", &[("transport", "ws")])
            .await as u64,
        s.acked
    );
}

/// Every injected fault is rejected naming its field, and the summary's rejection counts are
/// the server's `sluice_readings_rejected_total` deltas, reason by reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejections_match_the_server_metrics() {
    let app = spawn_sluice(|_| {}).await;
    let url = app.url();
    for transport in ["http", "ws"] {
        let s = sim(&[
            "--target",
            &url,
            "--transport",
            transport,
            "--devices",
            "10",
            "--rate",
            "100",
            "--duration",
            "1s",
            "--bad-ratio",
            "0.1",
            "--verify",
            "--seed",
            "11",
        ])
        .await;
        assert_no_loss(&s);
        assert!(
            s.bad_sent >= 50,
            "{transport}: only {} faults sent",
            s.bad_sent
        );
        assert_eq!(
            s.rejected, s.bad_sent,
            "{transport}: every fault and nothing else rejected"
        );
        assert_eq!(s.rejected_expected, s.bad_sent);
        assert_eq!(
            (
                s.rejected_wrong_field,
                s.rejected_unexpected,
                s.bad_accepted
            ),
            (0, 0, 0)
        );
        let total = app
            .metric(
                "sluice_readings_rejected_total",
                &[("transport", transport)],
            )
            .await as u64;
        assert_eq!(total, s.rejected, "{transport}: server count");
        let by_reason: BTreeMap<String, u64> = s.rejected_by_reason.clone();
        assert!(
            by_reason.len() >= 5,
            "{transport}: several kinds: {by_reason:?}"
        );
        for (reason, n) in &by_reason {
            let server = app
                .metric(
                    "sluice_readings_rejected_total",
                    &[("transport", transport), ("reason", reason)],
                )
                .await as u64;
            assert_eq!(server, *n, "{transport}: reason {reason}");
        }
    }
}

/// A Sluice that can hold only a few batches and commits slowly sheds load; the simulator
/// backs off as told, sends the same readings again, and nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shed_readings_are_sent_again_and_nothing_is_lost() {
    let app = spawn_sluice(|s| {
        s.limits.max_readings_per_request = 100;
        s.pipeline.queue_capacity = 100;
        s.pipeline.retry_after = Duration::from_millis(50);
        s.storage.commit_delay = Duration::from_millis(20);
    })
    .await;
    let url = app.url();
    for (transport, extra) in [
        ("http", ["--batch", "40"]),
        ("ws", ["--frame-readings", "40"]),
    ] {
        let mut args = vec![
            "--target",
            &url,
            "--transport",
            transport,
            "--mode",
            "max",
            "--devices",
            "8",
            "--connections",
            "8",
            "--window",
            "4",
            "--duration",
            "1500ms",
            "--verify",
        ];
        args.extend(extra);
        let s = sim(&args).await;
        assert!(
            s.shed > 0,
            "{transport}: the server never shed; the test proves nothing"
        );
        assert!(s.resent > 0, "{transport}");
        assert_eq!(s.unacked, 0, "{transport}");
        assert_no_loss(&s);
        let shed = app
            .metric("sluice_readings_shed_total", &[("transport", transport)])
            .await;
        assert!(shed > 0.0, "{transport}");
    }
}

/// The server restarts mid-run (graceful shutdown: in-flight frames acked, then 1001). The
/// devices reconnect to the new instance and resend what was not acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_devices_reconnect_after_a_restart_without_loss() {
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let first = start(addr, dir.path(), |_| {}).await;
    let url = first.url();
    let cfg = sim_config(&[
        "--target",
        &url,
        "--transport",
        "ws",
        "--devices",
        "10",
        "--rate",
        "50",
        "--duration",
        "3s",
        "--window",
        "8",
        "--verify",
    ]);
    let run = tokio::spawn(sluice_sim::run(cfg, CancellationToken::new()));
    wait_until(Duration::from_secs(10), "readings flowing", || async {
        first.metric("sluice_readings_accepted_total", &[]).await > 100.0
    })
    .await;
    first.shutdown().await;
    let second = start(addr, dir.path(), |_| {}).await;
    let s = run.await.unwrap().unwrap();
    println!(
        "{}",
        s.table(&sim_config(&["--target", &url, "--transport", "ws"]))
    );
    assert!(
        s.connects >= 20,
        "every device reconnected: {} connects",
        s.connects
    );
    assert_no_loss(&s);
    assert!(
        second.metric("sluice_readings_accepted_total", &[]).await > 0.0,
        "the second instance took readings"
    );
}

/// Idle connections stay open because they answer pings: with a 400 ms idle timeout, a client
/// that did not would be closed and reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_answer_pings_and_stay_open() {
    let app = spawn_sluice(|s| {
        s.ws.ping_interval = Duration::from_millis(100);
        s.ws.idle_timeout = Duration::from_millis(400);
    })
    .await;
    let url = app.url();
    let cfg = sim_config(&[
        "--target",
        &url,
        "--transport",
        "ws",
        "--devices",
        "50",
        "--rate",
        "0",
        "--duration",
        "3s",
    ]);
    let started = tokio::time::Instant::now();
    let run = tokio::spawn(sluice_sim::run(cfg, CancellationToken::new()));
    wait_until(Duration::from_secs(10), "50 idle connections", || async {
        app.metric("sluice_ws_connections", &[("kind", "device")])
            .await
            == 50.0
    })
    .await;
    // The connections are idle well past the idle timeout (and the server's 1 s wait for a
    // closing handshake): the server keeps all of them open only if their pongs come back.
    // (The client alone could not tell: it never writes.)
    let mut samples = 0;
    while started.elapsed() < Duration::from_millis(2500) {
        let open = app
            .metric("sluice_ws_connections", &[("kind", "device")])
            .await;
        assert_eq!(
            open, 50.0,
            "the server closed idle connections that did not answer pings"
        );
        samples += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(samples > 5);
    let s = run.await.unwrap().unwrap();
    assert_eq!(
        s.connects, 50,
        "no connection was closed for idleness: {:?}",
        s.problems
    );
    assert_eq!((s.errors, s.sent), (0, 0));
    assert!(s.ok);
    wait_until(Duration::from_secs(5), "connections closed", || async {
        app.metric("sluice_ws_connections", &[("kind", "device")])
            .await
            == 0.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ramp_raises_the_rate_and_reports_the_knee() {
    let app = spawn_sluice(|_| {}).await;
    let url = app.url();
    // A bound nothing can meet: the first step already fails.
    let s = sim(&[
        "--target",
        &url,
        "--transport",
        "ws",
        "--mode",
        "ramp",
        "--devices",
        "5",
        "--rate",
        "20",
        "--ramp-step",
        "500ms",
        "--p99-bound",
        "1us",
        "--duration",
        "5s",
    ])
    .await;
    let r = s.ramp.as_ref().unwrap();
    assert_eq!(r.steps.len(), 1);
    assert_eq!(r.knee_rate, None);
    assert!(
        r.stopped_because.contains("over the"),
        "{}",
        r.stopped_because
    );
    // A generous bound: every step passes, the rate doubles, the duration ends the ramp.
    let s = sim(&[
        "--target",
        &url,
        "--transport",
        "ws",
        "--mode",
        "ramp",
        "--devices",
        "5",
        "--rate",
        "20",
        "--ramp-step",
        "1s",
        "--ramp-factor",
        "2",
        "--p99-bound",
        "30s",
        "--duration",
        "2500ms",
        "--verify",
    ])
    .await;
    let r = s.ramp.as_ref().unwrap();
    assert_eq!(r.steps.len(), 2, "{r:?}");
    assert_eq!(r.steps[1].rate_per_device, 40.0);
    assert!(r.steps.iter().all(|st| st.ok), "{r:?}");
    assert_eq!(r.knee_rate, Some(200.0));
    assert_no_loss(&s);
}

/// The simulator against its own null sink: every frame and request is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_sink_answers_http_and_ws() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let sink = tokio::spawn(sluice_sim::null_sink::serve(listener));
    for (transport, extra) in [("http", "--batch"), ("ws", "--frame-readings")] {
        let s = sim(&[
            "--target",
            &url,
            "--transport",
            transport,
            "--mode",
            "max",
            "--devices",
            "4",
            extra,
            "50",
            "--duration",
            "1s",
        ])
        .await;
        assert!(s.acked > 1000, "{transport}: {}", s.acked);
        assert_eq!(s.acked, s.sent, "{transport}");
        assert_eq!(s.accepted, s.sent, "{transport}");
        assert_eq!(
            (s.errors, s.unacked),
            (0, 0),
            "{transport}: {:?}",
            s.problems
        );
    }
    sink.abort();
}

/// `--device-mix random`: requests mix devices from the whole fleet, every device's stored
/// `seq`s are 1, 2, …, n with none missing, and nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_device_mix_keeps_every_device_seq_contiguous() {
    let app = spawn_sluice(|_| {}).await;
    let url = app.url();
    let s = sim(&[
        "--target",
        &url,
        "--transport",
        "http",
        "--mode",
        "max",
        "--device-mix",
        "random",
        "--devices",
        "300",
        "--connections",
        "8",
        "--batch",
        "50",
        "--duration",
        "2s",
        "--seed",
        "11",
        "--device-prefix",
        "mixed",
        "--verify",
    ])
    .await;
    assert_no_loss(&s);
    assert!(s.acked >= 3000, "acked only {}", s.acked);
    let v = s.verify.as_ref().unwrap();
    assert!(
        v.devices >= 290,
        "readings from {} of 300 devices",
        v.devices
    );
    assert_eq!(s.acked_per_s.iter().sum::<u64>(), s.acked);
    let client = reqwest::Client::new();
    let mut total = 0;
    for n in 0..300 {
        let mut seqs = sluice_sim::verify::stored_seqs(&client, &url, &format!("mixed-{n}"))
            .await
            .unwrap();
        seqs.sort_unstable();
        let want: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, want, "mixed-{n}: seqs 1..n, each once");
        total += seqs.len() as u64;
    }
    assert_eq!(total, s.acked);
}

/// Paging by `ts` past one page (10 000 rows), with many readings sharing a millisecond.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_back_pages_past_ten_thousand_rows() {
    let app = spawn_sluice(|_| {}).await;
    let client = reqwest::Client::new();
    let t0 = sluice_sim::transport::now_ms() - 60_000;
    let n = 25_000u64;
    for chunk in (0..n).collect::<Vec<_>>().chunks(5000) {
        let body: Vec<Value> = chunk
            .iter()
            .map(|i| {
                // 7 readings per millisecond.
                serde_json::json!({"device_id": "pager", "seq": i, "ts": t0 + (*i as i64) / 7,
                                   "metrics": {"x": 1}})
            })
            .collect();
        let res = client
            .post(format!("{}/v1/readings", app.url()))
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&body).unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    let seqs = sluice_sim::verify::stored_seqs(&client, &app.url(), "pager")
        .await
        .unwrap();
    assert_eq!(seqs.len() as u64, n, "each row once");
    assert_eq!(
        seqs,
        (0..n).collect::<Vec<_>>(),
        "in order, none skipped or repeated"
    );
}

/// MQTT against a private mosquitto: a subscriber sees every published reading once, with the
/// device in the topic; QoS 1 counts broker PUBACKs, QoS 0 only sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_publishes_every_reading_to_its_device_topic() {
    let broker = Mosquitto::start();
    for qos in ["1", "0"] {
        let (mut rx, sub) = subscribe(
            broker.port,
            &format!("test-sub-{qos}"),
            "devices/+/readings",
        )
        .await;

        let broker_url = format!("mqtt://127.0.0.1:{}", broker.port);
        let prefix = format!("mq{qos}");
        let s = sim(&[
            "--transport",
            "mqtt",
            "--broker",
            &broker_url,
            "--devices",
            "10",
            "--rate",
            "50",
            "--duration",
            "1500ms",
            "--frame-readings",
            "2",
            "--qos",
            qos,
            "--mqtt-clients",
            "5",
            "--device-prefix",
            &prefix,
        ])
        .await;
        assert!(s.ok && s.errors == 0, "{:?}", s.problems);
        assert!(s.sent >= 600, "sent only {}", s.sent);
        if qos == "1" {
            assert_eq!(s.acked, s.sent, "every publish PUBACKed");
            assert!(s.latency_ms.count > 0);
        } else {
            assert_eq!(s.acked, 0, "QoS 0 has no acknowledgement");
        }

        let mut seen: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
        let mut total = 0u64;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while total < s.sent {
            let (topic, payload) = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .unwrap_or_else(|_| panic!("only {total} of {} readings arrived", s.sent))
                .unwrap();
            let readings = match serde_json::from_slice::<Value>(&payload).unwrap() {
                Value::Array(a) => a,
                one => vec![one],
            };
            for r in readings {
                let id = r["device_id"].as_str().unwrap().to_string();
                assert_eq!(topic, format!("devices/{id}/readings"));
                assert!(id.starts_with(&prefix));
                let fresh = seen
                    .entry(id)
                    .or_default()
                    .insert(r["seq"].as_u64().unwrap());
                assert!(fresh, "a reading arrived twice");
                total += 1;
            }
        }
        assert_eq!(total, s.sent);
        assert_eq!(seen.len(), 10, "every device published");
        for (id, seqs) in &seen {
            let want: BTreeSet<u64> = (1..=seqs.len() as u64).collect();
            assert_eq!(seqs, &want, "{id}: consecutive seqs from 1");
        }
        sub.abort();
    }
}

/// A run against no server fails (exit code 1, `result FAILED`, the reason in `problems`)
/// instead of reporting `ok` with every request in error; one that did not `--verify` says so
/// in its result line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_with_nothing_acknowledged_fails_and_an_unverified_one_says_so() {
    let dead = format!("http://127.0.0.1:{}", free_port());
    let args = [
        "sluice-sim",
        "--quiet",
        "--target",
        &dead,
        "--duration",
        "500ms",
        "--drain-timeout",
        "1s",
    ];
    let cli = <sluice_sim::Cli as clap::Parser>::try_parse_from(args).unwrap();
    assert_eq!(sluice_sim::run_cli(cli, CancellationToken::new()).await, 1);

    let app = spawn_sluice(|_| {}).await;
    let s = sim(&[
        "--target",
        &app.url(),
        "--devices",
        "5",
        "--rate",
        "20",
        "--duration",
        "500ms",
    ])
    .await;
    assert!(s.ok && s.acked > 0, "{:?}", s.problems);
    assert!(s.verdict().contains("NOT VERIFIED"), "{}", s.verdict());
}

/// Every `--format` on every transport that carries it, against the null sink: each request,
/// frame or payload is answered for every reading, and the summary records the format and the
/// bytes on the wire (CBOR smaller than JSON for the same readings).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_format_reaches_the_null_sink() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let sink = tokio::spawn(sluice_sim::null_sink::serve(listener));
    let mut bytes = BTreeMap::new();
    for (transport, format) in [
        ("http", "json"),
        ("http", "cbor"),
        ("http", "senml-json"),
        ("http", "senml-cbor"),
        ("http", "line"),
        ("ws", "json"),
        ("ws", "cbor"),
    ] {
        let s = sim(&[
            "--target",
            &url,
            "--transport",
            transport,
            "--format",
            format,
            "--mode",
            "max",
            "--devices",
            "8",
            "--batch",
            "50",
            "--frame-readings",
            "20",
            "--seed",
            "3",
            "--duration",
            "500ms",
        ])
        .await;
        let what = format!("{transport} {format}");
        assert!(s.acked > 200, "{what}: {}", s.acked);
        assert_eq!((s.acked, s.accepted), (s.sent, s.sent), "{what}");
        assert_eq!((s.errors, s.unacked), (0, 0), "{what}: {:?}", s.problems);
        assert_eq!(s.format.name(), format);
        assert!(
            s.bytes_per_reading > 20.0,
            "{what}: {}",
            s.bytes_per_reading
        );
        assert!(s.wire_bytes >= s.sent * 20, "{what}");
        bytes.insert(what, s.bytes_per_reading);
    }
    println!("bytes per reading: {bytes:?}");
    assert!(bytes["http cbor"] < bytes["http json"], "{bytes:?}");
    assert!(bytes["ws cbor"] < bytes["ws json"], "{bytes:?}");
    assert!(
        bytes["http senml-cbor"] < bytes["http senml-json"],
        "{bytes:?}"
    );
    sink.abort();
}

/// Line protocol against the real server (`POST /api/v2/write`): every acknowledged reading is
/// read back, under the metric names `m.<metric>` that --verify expects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn line_protocol_run_stores_every_reading_as_m_dot_metric() {
    let app = spawn_sluice(|_| {}).await;
    let url = app.url();
    let s = sim(&[
        "--target",
        &url,
        "--format",
        "line",
        "--mode",
        "max",
        "--device-mix",
        "random",
        "--devices",
        "50",
        "--connections",
        "4",
        "--batch",
        "100",
        "--metrics",
        "5",
        "--duration",
        "1s",
        "--device-prefix",
        "lp",
        "--verify",
    ])
    .await;
    assert_no_loss(&s);
    assert_eq!(s.verify.as_ref().unwrap().wrong_metrics, 0);
    assert_eq!(
        app.metric("sluice_readings_accepted_total", &[("transport", "http")])
            .await as u64,
        s.acked
    );
    let body = reqwest::get(format!("{url}/v1/devices/lp-4/readings?limit=1"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&body).unwrap();
    let metrics = body["readings"][0]["metrics"].as_object().unwrap();
    let mut names: Vec<&str> = metrics.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        ["m.battery", "m.heading", "m.lat", "m.lon", "m.speed"]
    );
}

/// --verify compares metric names: a JSON run read back as if it had been sent as line
/// protocol (names `m.<metric>`) finds every reading under other names and fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_fails_on_wrong_metric_names() {
    let app = spawn_sluice(|_| {}).await;
    let url = app.url();
    let s = sim(&[
        "--target",
        &url,
        "--devices",
        "3",
        "--rate",
        "20",
        "--duration",
        "500ms",
        "--device-prefix",
        "names",
        "--verify",
    ])
    .await;
    assert_no_loss(&s);
    let log = (0..3)
        .map(|_| {
            let mut r = sluice_sim::verify::Runs::default();
            r.insert(1);
            r
        })
        .collect();
    let names = sluice_sim::verify::MetricNames {
        profile: sluice_sim::fleet::FleetProfile::Mixed,
        metrics: 4,
        format: sluice_sim::config::Format::Line,
    };
    let v = sluice_sim::verify::verify(
        &url,
        "names",
        log,
        Duration::ZERO,
        &names,
        &sluice_sim::auth::Auth::none(),
    )
    .await
    .unwrap();
    assert_eq!(v.lost, 0);
    assert_eq!(v.wrong_metrics, s.acked, "{v:?}");
    assert!(!v.ok());
    assert!(
        v.examples.iter().any(|e| e.contains("wrong metric names")),
        "{:?}",
        v.examples
    );
}

/// Formats that a transport does not carry are refused with the valid pairs (exit code 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_the_transport_does_not_carry_is_a_usage_error() {
    for (transport, format) in [("ws", "line"), ("mqtt", "cbor"), ("ws", "senml-json")] {
        let args = [
            "sluice-sim",
            "--quiet",
            "--transport",
            transport,
            "--format",
            format,
        ];
        let cli = <sluice_sim::Cli as clap::Parser>::try_parse_from(args).unwrap();
        let code = sluice_sim::run_cli(cli, CancellationToken::new()).await;
        assert_eq!(code, sluice_sim::EXIT_USAGE, "{transport} {format}");
    }
}

/// SenML JSON over MQTT: each payload is a pack on the device's topic whose records resolve to
/// `<device>/<metric>`, with the seq record; every publish is PUBACKed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_senml_packs_name_the_device_of_the_topic() {
    let broker = Mosquitto::start();
    let (mut rx, sub) = subscribe(broker.port, "test-sub-senml", "devices/+/readings").await;
    let broker_url = format!("mqtt://127.0.0.1:{}", broker.port);
    let s = sim(&[
        "--transport",
        "mqtt",
        "--format",
        "senml-json",
        "--broker",
        &broker_url,
        "--devices",
        "4",
        "--rate",
        "40",
        "--duration",
        "1s",
        "--frame-readings",
        "2",
        "--device-prefix",
        "sen",
    ])
    .await;
    assert!(s.ok && s.errors == 0, "{:?}", s.problems);
    assert_eq!(s.acked, s.sent);
    let mut seqs: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut total = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while total < s.sent {
        let (topic, payload) = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("every payload arrives")
            .unwrap();
        let pack: Vec<Value> = serde_json::from_slice(&payload).unwrap();
        let device = topic
            .strip_prefix("devices/")
            .and_then(|t| t.strip_suffix("/readings"))
            .unwrap()
            .to_string();
        assert_eq!(pack.len(), 2 * 5, "2 readings × (seq + 4 metrics)");
        let mut times = BTreeSet::new();
        for rec in &pack {
            if let Some(bn) = rec.get("bn") {
                assert_eq!(bn.as_str().unwrap(), format!("{device}/"));
                times.insert(rec["bt"].as_f64().unwrap().to_bits());
                assert_eq!(rec["n"], "seq");
                seqs.entry(device.clone())
                    .or_default()
                    .push(rec["v"].as_u64().unwrap());
                total += 1;
            }
        }
        assert_eq!(
            times.len(),
            2,
            "the two readings of a payload have their own times"
        );
    }
    assert_eq!(seqs.len(), 4);
    for (d, s) in &seqs {
        let want: Vec<u64> = (1..=s.len() as u64).collect();
        assert_eq!(s, &want, "{d}");
    }
    sub.abort();
}

/// CBOR and SenML bodies against the real server, and CBOR binary frames on the WebSocket:
/// every acknowledged reading is read back once, under the metric names the device sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cbor_and_senml_runs_store_every_acknowledged_reading() {
    let app = spawn_sluice(|_| {}).await;
    let url = app.url();
    for (transport, format) in [
        ("http", "cbor"),
        ("http", "senml-json"),
        ("http", "senml-cbor"),
        ("ws", "cbor"),
    ] {
        let prefix = format!("{transport}-{format}");
        let s = sim(&[
            "--target",
            &url,
            "--transport",
            transport,
            "--format",
            format,
            "--mode",
            "max",
            "--device-mix",
            if transport == "http" {
                "random"
            } else {
                "gateway"
            },
            "--devices",
            "20",
            "--connections",
            "4",
            "--batch",
            "100",
            "--frame-readings",
            "10",
            "--metrics",
            "5",
            "--duration",
            "1s",
            "--device-prefix",
            &prefix,
            "--verify",
        ])
        .await;
        assert_no_loss(&s);
        assert_eq!(s.verify.as_ref().unwrap().wrong_metrics, 0, "{prefix}");
        assert_eq!(s.accepted, s.acked, "{prefix}: the server's counts");
        assert_eq!(s.errors, 0, "{prefix}: {:?}", s.problems);
    }
}

/// CBOR faults are rejected naming their field, as in JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cbor_faults_are_rejected_naming_their_field() {
    let app = spawn_sluice(|_| {}).await;
    let url = app.url();
    for transport in ["http", "ws"] {
        let s = sim(&[
            "--target",
            &url,
            "--transport",
            transport,
            "--format",
            "cbor",
            "--devices",
            "10",
            "--rate",
            "50",
            "--frame-readings",
            "5",
            "--duration",
            "1s",
            "--bad-ratio",
            "0.2",
            "--verify",
        ])
        .await;
        assert_no_loss(&s);
        assert!(s.bad_sent > 20, "{transport}: {}", s.bad_sent);
        assert_eq!(
            s.rejected_expected, s.bad_sent,
            "{transport}: {:?}",
            s.problems
        );
    }
}

/// SenML JSON over MQTT into Sluice (through a private mosquitto): every PUBACKed reading is
/// stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_senml_run_stores_every_acknowledged_reading() {
    let broker = Mosquitto::start();
    let broker_url = format!("mqtt://127.0.0.1:{}", broker.port);
    let app = spawn_sluice(|s| {
        s.mqtt.enabled = true;
        s.mqtt.url = broker_url.clone();
        s.mqtt.client_id = format!("sim-senml-{}", std::process::id());
    })
    .await;
    wait_until(
        Duration::from_secs(10),
        "sluice connected to MQTT",
        || async { app.metric("sluice_mqtt_connected", &[]).await == 1.0 },
    )
    .await;
    let url = app.url();
    let s = sim(&[
        "--target",
        &url,
        "--transport",
        "mqtt",
        "--format",
        "senml-json",
        "--broker",
        &broker_url,
        "--devices",
        "10",
        "--rate",
        "20",
        "--frame-readings",
        "2",
        "--duration",
        "1s",
        "--verify",
    ])
    .await;
    assert_no_loss(&s);
    assert_eq!(s.verify.as_ref().unwrap().wrong_metrics, 0);
}
