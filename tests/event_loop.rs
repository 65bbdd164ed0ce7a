//! Event-loop load metrics (SPEC §7) react to real load: a deliberately blocked event loop
//! shows in the lag histogram and the busy counters; task families count their work; and
//! `telemetry.runtime = false` really turns the collectors off.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{metric_value, reading, spawn_app_with, wait_until};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

const WORKERS: usize = 2;
const BLOCK: Duration = Duration::from_millis(300);

/// Observations of `sluice_event_loop_lag_seconds` above 100 ms.
fn lag_over_100ms(text: &str) -> f64 {
    metric_value(text, "sluice_event_loop_lag_seconds_count", &[])
        - metric_value(
            text,
            "sluice_event_loop_lag_seconds_bucket",
            &[("le", "0.1")],
        )
}

fn busy(text: &str, worker: usize) -> f64 {
    metric_value(
        text,
        "sluice_runtime_worker_busy_seconds_total",
        &[("worker", &worker.to_string())],
    )
}

/// Blocks every worker of the runtime at once for `BLOCK`, as a CPU-bound or blocking call on
/// the event loop would. The tasks are spawned from the test's own thread, so they go through
/// the global queue and idle workers pick them up; each waits (bounded) until all have
/// started, so they really run on different workers at the same time.
async fn block_every_worker() {
    let started = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..WORKERS)
        .map(|_| {
            let started = started.clone();
            tokio::spawn(async move {
                started.fetch_add(1, Ordering::SeqCst);
                let give_up = Instant::now() + Duration::from_secs(5);
                while started.load(Ordering::SeqCst) < WORKERS && Instant::now() < give_up {
                    std::thread::sleep(Duration::from_millis(1));
                }
                std::thread::sleep(BLOCK);
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("blocking task");
    }
    assert_eq!(started.load(Ordering::SeqCst), WORKERS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_event_loop_shows_in_lag_and_busy_time() {
    let app = spawn_app_with(|_| {}).await;
    wait_until(
        Duration::from_secs(10),
        "the lag probe to record",
        || async {
            metric_value(
                &app.scrape().await,
                "sluice_event_loop_lag_seconds_count",
                &[],
            ) >= 3.0
        },
    )
    .await;
    let before = app.scrape().await;
    assert_eq!(
        metric_value(&before, "sluice_runtime_workers", &[]),
        WORKERS as f64
    );

    block_every_worker().await;

    // The probe's 100 ms period falls inside the 300 ms block, so it woke >= 200 ms late; and
    // each worker spent the 300 ms busy.
    wait_until(
        Duration::from_secs(10),
        "a lag sample over 100 ms and 0.25 s more busy time on every worker",
        || async {
            let now = app.scrape().await;
            lag_over_100ms(&now) > lag_over_100ms(&before)
                && (0..WORKERS).all(|w| busy(&now, w) - busy(&before, w) >= 0.25)
        },
    )
    .await;
    let after = app.scrape().await;
    let lag_sum = |t: &str| metric_value(t, "sluice_event_loop_lag_seconds_sum", &[]);
    assert!(
        lag_sum(&after) - lag_sum(&before) >= 0.19,
        "the lag sum should hold the 200-300 ms delay: {} -> {}",
        lag_sum(&before),
        lag_sum(&after)
    );
    app.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_families_count_their_polls() {
    let app = spawn_app_with(|_| {}).await;
    for r in 0..10 {
        let batch: Vec<_> = (0..10).map(|i| reading("fam-1", r * 10 + i)).collect();
        let res = app.post_json(&json!(batch)).await;
        assert_eq!(res.status(), 200);
    }
    // One WebSocket frame, answered after its commit.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/v1/ws", app.addr))
        .await
        .expect("ws connects");
    ws.send(Message::text(reading("fam-ws", 1).to_string()))
        .await
        .unwrap();
    let ack = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => break t.to_string(),
            Ok(Some(Ok(_))) => continue,
            other => panic!("no ack: {other:?}"),
        }
    };
    assert!(ack.contains("\"accepted\":1"), "{ack}");
    let text = app.scrape().await;
    let polls = |task: &str| metric_value(&text, "sluice_task_polls_total", &[("task", task)]);
    // Each of the 10 requests ran the ingest handler; the batches went through the batcher and
    // the store writer; the WebSocket connection's reader and writer ran.
    assert!(polls("ingest") >= 10.0, "ingest polls: {}", polls("ingest"));
    assert!(polls("batcher") >= 1.0);
    assert!(polls("store") >= 1.0);
    assert!(polls("ws") >= 2.0, "ws polls: {}", polls("ws"));
    assert!(
        metric_value(
            &text,
            "sluice_task_poll_seconds_total",
            &[("task", "ingest")]
        ) > 0.0
    );
    // Every family is exported from the start, zeros included, so dashboards see them.
    for name in [
        "sluice_task_scheduled_seconds_total",
        "sluice_task_schedules_total",
        "sluice_task_poll_seconds_total",
        "sluice_task_polls_total",
        "sluice_task_slow_polls_total",
    ] {
        for task in ["ingest", "batcher", "store", "mqtt", "ws"] {
            assert!(
                text.contains(&format!("{name}{{task=\"{task}\"}}")),
                "{name}{{task={task}}} missing"
            );
        }
    }
    app.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_telemetry_can_be_turned_off() {
    let app = spawn_app_with(|s| s.telemetry.runtime = false).await;
    assert_eq!(app.post_json(&reading("off-1", 1)).await.status(), 200);
    let text = app.scrape().await;
    assert_eq!(
        metric_value(
            &text,
            "sluice_readings_accepted_total",
            &[("transport", "http")]
        ),
        1.0
    );
    for name in [
        "sluice_runtime_",
        "sluice_event_loop_lag_seconds",
        "sluice_task_",
    ] {
        assert!(
            !text.lines().any(|l| l.starts_with(name)),
            "{name}* exported with telemetry.runtime = false"
        );
    }
    app.shutdown().await.expect("clean shutdown");
}
