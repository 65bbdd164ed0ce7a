//! The simulator against a Sluice with tokens and rate limits (SPEC §11): minted tokens, per
//! device and per gateway, let every reading through and `--verify` read them back; a run
//! without a token stops at once saying why; rate-limited readings are sent again until stored.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use sluice::config::access::{AuthSettings, RateLimitSettings};
use sluice_sim::Summary;
use tokio_util::sync::CancellationToken;

const ADMIN: &str = "sim-test-admin-token-0123456789abcdef0123456789abcdef";

fn token_mode(s: &mut sluice::Settings) {
    s.auth = serde_json::from_value::<AuthSettings>(serde_json::json!({
        "mode": "token",
        "admin_token": ADMIN,
    }))
    .expect("auth settings");
}

fn assert_no_loss(s: &Summary) {
    let v = s.verify.as_ref().expect("--verify ran");
    assert!(s.acked > 0, "nothing was acknowledged: {:?}", s.problems);
    assert_eq!(v.acked, s.acked, "every acknowledged reading was checked");
    assert_eq!((v.lost, v.duplicated), (0, 0), "examples: {:?}", v.examples);
    assert_eq!(v.stored, v.acked);
    assert_eq!(s.auth_failures, 0, "{:?}", s.problems);
    assert!(s.ok, "problems: {:?}", s.problems);
}

/// `sluice-sim tokens` through the binary's entry point; returns its exit code.
async fn mint(url: &str, prefix: &str, devices: u32, gateway: bool, out: &Path) -> i32 {
    let devices = devices.to_string();
    let mut args = vec![
        "sluice-sim",
        "tokens",
        "--target",
        url,
        "--admin-token",
        ADMIN,
        "--devices",
        &devices,
        "--device-prefix",
        prefix,
        "--out",
        out.to_str().unwrap(),
    ];
    if gateway {
        args.push("--gateway");
    }
    let cli = <sluice_sim::Cli as clap::Parser>::try_parse_from(args).unwrap();
    sluice_sim::run_cli(cli, CancellationToken::new()).await
}

/// One write token per device, minted through the admin API: HTTP (each request one device's
/// readings, both device mixes) and WebSocket runs store everything, and `--verify` reads each
/// device back with its own token. The file is private and holds one line per device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_device_tokens_store_everything_and_verify_reads_back() {
    let app = spawn_sluice(token_mode).await;
    let url = app.url();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.txt");
    assert_eq!(mint(&url, "own", 12, false, &file).await, 0);
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the tokens file is private");
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(lines.len(), 12);
    assert!(lines.iter().any(|l| l.starts_with("own-11 ")));
    let path = file.to_str().unwrap();
    for mix in ["gateway", "random"] {
        let s = sim(&[
            "--target",
            &url,
            "--device-prefix",
            "own",
            "--devices",
            "12",
            "--tokens-file",
            path,
            "--mode",
            "max",
            "--device-mix",
            mix,
            "--batch",
            "20",
            "--connections",
            "4",
            "--duration",
            "1s",
            "--seq-start",
            if mix == "gateway" { "1" } else { "100000" },
            "--verify",
        ])
        .await;
        assert_no_loss(&s);
        assert!(
            s.auth.contains("12 distinct tokens for 12 devices"),
            "{}",
            s.auth
        );
    }
    let s = sim(&[
        "--target",
        &url,
        "--transport",
        "ws",
        "--device-prefix",
        "own",
        "--devices",
        "12",
        "--tokens-file",
        path,
        "--rate",
        "50",
        "--duration",
        "1s",
        "--seq-start",
        "200000",
        "--verify",
    ])
    .await;
    assert_no_loss(&s);
    assert_eq!(s.connects, 12);
    assert_eq!(
        app.metric("sluice_auth_failures_total", &[]).await,
        0.0,
        "no request was refused"
    );
}

/// One gateway token whose glob covers the fleet: requests keep mixing devices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_token_covers_a_mixed_fleet() {
    let app = spawn_sluice(token_mode).await;
    let url = app.url();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.txt");
    assert_eq!(mint(&url, "gw", 50, true, &file).await, 0);
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(lines.len(), 1);
    assert!(lines[0].starts_with("gw-* "), "{}", lines[0]);
    let s = sim(&[
        "--target",
        &url,
        "--device-prefix",
        "gw",
        "--devices",
        "50",
        "--tokens-file",
        file.to_str().unwrap(),
        "--mode",
        "max",
        "--device-mix",
        "random",
        "--duration",
        "1s",
        "--verify",
    ])
    .await;
    assert_no_loss(&s);
    assert!(
        s.auth.contains("1 distinct token for 50 devices"),
        "{}",
        s.auth
    );
    // The same token sent with --token.
    let token = lines[0].split_whitespace().nth(1).unwrap();
    let cfg = sim_config(&[
        "--target",
        &url,
        "--device-prefix",
        "gw",
        "--devices",
        "50",
        "--token",
        token,
        "--duration",
        "1s",
        "--rate",
        "20",
        "--seq-start",
        "100000",
        "--verify",
    ]);
    assert!(
        !format!("{cfg:?}").contains(token),
        "the configuration's Debug shows the token"
    );
    let s = sluice_sim::run(cfg, CancellationToken::new())
        .await
        .unwrap();
    assert_no_loss(&s);
    // A token that does not cover the devices: every batch is refused.
    let s = sim(&[
        "--target",
        &url,
        "--device-prefix",
        "other",
        "--devices",
        "5",
        "--token",
        token,
        "--duration",
        "3s",
        "--rate",
        "20",
    ])
    .await;
    assert!(!s.ok && s.auth_failures > 0, "{:?}", s.problems);
    assert!(
        s.problems.iter().any(|p| p.contains("403")),
        "{:?}",
        s.problems
    );
    assert!(s.problems.iter().all(|p| !p.contains(token)));
}

/// Without a token against token mode every answer is 401: the run stops at once, fails, and
/// says what to pass, for HTTP and WebSocket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_without_a_token_stops_at_once_and_says_why() {
    let app = spawn_sluice(token_mode).await;
    let url = app.url();
    for transport in ["http", "ws"] {
        let started = Instant::now();
        let s = sim(&[
            "--target",
            &url,
            "--transport",
            transport,
            "--devices",
            "10",
            "--rate",
            "20",
            "--duration",
            "30s",
        ])
        .await;
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{transport}: ran for {:?} although every answer was 401",
            started.elapsed()
        );
        assert!(!s.ok, "{transport}");
        assert!(s.auth_failures >= 5, "{transport}: {}", s.auth_failures);
        assert!(
            s.problems[0].contains("refused the credentials"),
            "{transport}: {:?}",
            s.problems
        );
        assert!(
            s.problems.iter().any(|p| p.contains("--token")),
            "{transport}: {:?}",
            s.problems
        );
        assert_eq!(s.verdict(), "FAILED");
    }
    // A tokens file that does not name the run's devices is a usage error, before any request.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("t.txt");
    std::fs::write(&file, "elsewhere-0 slc_x\n").unwrap();
    let cli = <sluice_sim::Cli as clap::Parser>::try_parse_from([
        "sluice-sim",
        "--target",
        &url,
        "--tokens-file",
        file.to_str().unwrap(),
    ])
    .unwrap();
    assert_eq!(
        sluice_sim::run_cli(cli, CancellationToken::new()).await,
        sluice_sim::EXIT_USAGE
    );
    // Minting with a wrong admin token fails, and writes nothing.
    let out = dir.path().join("minted.txt");
    let cli = <sluice_sim::Cli as clap::Parser>::try_parse_from([
        "sluice-sim",
        "tokens",
        "--target",
        &url,
        "--admin-token",
        "not-the-admin-token-0123456789abcdef0123",
        "--device-prefix",
        "x",
        "--devices",
        "2",
        "--out",
        out.to_str().unwrap(),
    ])
    .unwrap();
    assert_eq!(
        sluice_sim::run_cli(cli, CancellationToken::new()).await,
        sluice_sim::EXIT_FAILED
    );
    assert!(!out.exists());
}

/// A per-device rate limit far below what the simulator sends: HTTP (429s, and readings
/// rejected by index as `rate_limited` in mixed batches; line protocol's partial writes naming
/// a `rate_limited` line) and WebSocket (`rate_limited` error acks, and readings of a frame
/// rejected by index) back off, send the same readings again, and everything acknowledged is
/// stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_readings_are_sent_again_until_stored() {
    let app = spawn_sluice(|s| {
        s.rate_limit = serde_json::from_value::<RateLimitSettings>(serde_json::json!({
            "per_device": "200/s",
            "burst": 20,
        }))
        .expect("rate limit settings");
    })
    .await;
    let url = app.url();
    for (transport, mix, format) in [
        ("http", "random", "json"),
        ("http", "gateway", "json"),
        ("http", "random", "line"),
        ("ws", "gateway", "json"),
    ] {
        let prefix = format!("rl-{transport}-{mix}-{format}");
        let mut args = vec![
            "--target",
            &url,
            "--transport",
            transport,
            "--device-prefix",
            &prefix,
            "--devices",
            "4",
            "--mode",
            "max",
            "--duration",
            "1500ms",
            "--drain-timeout",
            "20s",
            "--format",
            format,
            "--verify",
        ];
        if transport == "http" {
            args.extend(["--device-mix", mix, "--batch", "40", "--connections", "2"]);
        } else {
            args.extend(["--frame-readings", "10", "--window", "4"]);
        }
        let s = sim(&args).await;
        assert!(
            s.rate_limited > 0,
            "{prefix}: never rate-limited; the test proves nothing"
        );
        assert_eq!(s.unacked, 0, "{prefix}: {:?}", s.problems);
        assert_eq!(s.rejected, 0, "{prefix}");
        assert_no_loss(&s);
    }
    assert!(app.metric("sluice_readings_rate_limited_total", &[]).await > 0.0);
}
