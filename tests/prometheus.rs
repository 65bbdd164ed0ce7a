//! The dashboards and alerts agree with what Sluice exports, checked against a real Prometheus.
//!
//! One test starts Sluice and a private Prometheus (the Debian binary, on a free port, its own
//! TSDB in a temp dir, scraping Sluice every second and loading `dashboards/alerts.yml`), drives
//! good and bad ingest, then evaluates every PromQL expression of `dashboards/sluice.json` and
//! every alert expression through `/api/v1/query`. Each must parse; each dashboard query must
//! return data, so a renamed metric fails. Others run `promtool` on the rules and on a scraped
//! `/metrics`. Prometheus is installed by `scripts/test` (apt-get install -y prometheus).

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{metric_value, spawn_app_with, wait_until, TestApp};
use serde_json::Value;

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// `name` from PATH, or a failure telling how to get it. Never a silent skip.
fn require_tool(name: &str) -> PathBuf {
    let ok = Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "`{name}` is not installed: run scripts/test, which installs it \
         (apt-get install -y prometheus provides prometheus and promtool)"
    );
    PathBuf::from(name)
}

/// A child process, killed when dropped (also when a test panics).
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A private Prometheus server, killed on drop.
struct Prometheus {
    /// The server process.
    _child: ChildGuard,
    /// `http://127.0.0.1:<port>`.
    url: String,
    /// Config, TSDB and log; removed after the process is gone.
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` every second, with `rules` loaded.
    async fn start(target: &str, rules: &Path) -> Prometheus {
        let bin = require_tool("prometheus");
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rules}\n\
                 scrape_configs:\n  - job_name: sluice\n    static_configs:\n      - targets: ['{target}']\n",
                rules = rules.display()
            ),
        )
        .expect("write prometheus.yml");
        let client = reqwest::Client::new();
        // The free port can be taken between our probe and Prometheus's bind: retry then.
        for _attempt in 0..3 {
            let port = free_port();
            let url = format!("http://127.0.0.1:{port}");
            let log_path = dir.path().join("prometheus.log");
            let log = std::fs::File::create(&log_path).expect("log file");
            let mut child = ChildGuard(
                Command::new(&bin)
                    .arg(format!("--config.file={}", config.display()))
                    .arg(format!(
                        "--storage.tsdb.path={}",
                        dir.path().join("data").display()
                    ))
                    .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                    .arg("--log.level=warn")
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .expect("spawn prometheus"),
            );
            // Ready, exited (e.g. the port was taken), or out of time: whichever comes first.
            let deadline = Instant::now() + Duration::from_secs(30);
            let (ready, exited) = loop {
                if !matches!(child.0.try_wait(), Ok(None)) {
                    break (false, true);
                }
                let probe = client.get(format!("{url}/-/ready")).send().await;
                if matches!(probe, Ok(r) if r.status().is_success()) {
                    break (true, false);
                }
                if Instant::now() > deadline {
                    break (false, false);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            if ready {
                return Prometheus {
                    _child: child,
                    url,
                    _dir: dir,
                };
            }
            drop(child);
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            if exited && log.contains("address already in use") {
                continue;
            }
            panic!("prometheus did not become ready within 30 s; its log:\n{log}");
        }
        panic!("prometheus could not bind a free port in 3 attempts");
    }

    /// Evaluates `expr` now. `Ok(result)` is the result array; `Err` is Prometheus's error.
    async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let res = reqwest::Client::new()
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", expr)])
            .send()
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let body: Value = res.json().await.map_err(|e| format!("bad answer: {e}"))?;
        if body["status"] != "success" {
            return Err(format!(
                "{}: {}",
                body["errorType"].as_str().unwrap_or("?"),
                body["error"].as_str().unwrap_or("?")
            ));
        }
        match &body["data"]["result"] {
            Value::Array(a) => Ok(a.clone()),
            other => Ok(vec![other.clone()]),
        }
    }

    /// The first value of `expr`'s result, if any.
    async fn value(&self, expr: &str) -> Option<f64> {
        let result = self.query(expr).await.ok()?;
        result.first()?["value"][1].as_str()?.parse().ok()
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// What `drive_mixed_traffic` must get, in order.
const MIXED_TRAFFIC_STATUSES: [u16; 10] = [200, 200, 200, 200, 200, 200, 200, 422, 400, 415];

/// Sends good and bad input so that every outcome counter moves: accepted, duplicates, partly
/// rejected, all rejected, not JSON, wrong content type. `marker` starts every device id, so a
/// test can check that no label carries one. Returns the statuses.
async fn drive_mixed_traffic(app: &TestApp, marker: &str) -> Vec<u16> {
    let post = |content_type: &'static str, body: String| async move {
        app.post_raw(content_type, body.into_bytes())
            .await
            .status()
            .as_u16()
    };
    let reading = |d: u32, seq: u32| {
        format!(
            r#"{{"device_id":"{marker}-{d}","seq":{seq},"metrics":{{"temperature":{seq}.5,"door_open":false}},"tags":{{"site":"north"}}}}"#
        )
    };
    let mut statuses = Vec::new();
    for d in 0..5 {
        let batch: Vec<String> = (0..20).map(|seq| reading(d, seq)).collect();
        statuses.push(post("application/json", format!("[{}]", batch.join(","))).await);
    }
    // A retry of a reading already stored: a duplicate.
    statuses.push(post("application/json", format!("[{}]", reading(0, 1))).await);
    // One good reading, one from the far future, one with an unknown field.
    statuses.push(
        post(
            "application/x-ndjson",
            format!(
                "{{\"device_id\":\"{marker}-9\",\"metrics\":{{\"t\":1}}}}\n\
                 {{\"device_id\":\"{marker}-9\",\"ts\":\"2999-01-01T00:00:00Z\",\"metrics\":{{\"t\":1}}}}\n\
                 {{\"device_id\":\"{marker}-9\",\"colour\":\"red\",\"metrics\":{{\"t\":1}}}}\n"
            ),
        )
        .await,
    );
    // Every reading invalid: 422. Not JSON: 400. Wrong content type: 415.
    statuses.push(
        post(
            "application/json",
            format!(r#"[{{"device_id":"{marker}-8","metrics":{{}}}}]"#),
        )
        .await,
    );
    statuses.push(post("application/json", "[{\"device_id\": ".into()).await);
    statuses.push(post("text/csv", "device,t\nx,1\n".into()).await);
    statuses
}

/// The values the test gives Grafana's variables.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("${__rate_interval}", "1m")
        .replace("$__interval", "1m")
        .replace("${job}", "sluice")
        .replace("$job", "sluice")
        .replace("${instance}", ".*")
        .replace("$instance", ".*")
}

/// A dashboard query: where it is, and its expression as written.
struct DashboardQuery {
    panel: String,
    expr: String,
}

/// Every PromQL expression of a dashboard (panels, panels inside rows, and `label_values`
/// variables turned into the equivalent `group by`).
fn dashboard_queries(dashboard: &Value) -> Vec<DashboardQuery> {
    fn walk(panels: &Value, out: &mut Vec<DashboardQuery>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?").to_owned();
            for t in p["targets"].as_array().into_iter().flatten() {
                out.push(DashboardQuery {
                    panel: title.clone(),
                    expr: t["expr"].as_str().unwrap_or("").to_owned(),
                });
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"]
            .as_str()
            .or(v["query"].as_str())
            .unwrap_or("");
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable {}: unsupported query {q}", v["name"]));
        let (selector, label) = inner.rsplit_once(',').expect("label_values(metric, label)");
        out.push(DashboardQuery {
            panel: format!("variable ${}", v["name"].as_str().unwrap_or("?")),
            expr: format!("group by ({}) ({})", label.trim(), selector.trim()),
        });
    }
    out
}

/// Every query must parse and return data. Returns each failure, described.
async fn check_dashboard_queries(prom: &Prometheus, queries: &[DashboardQuery]) -> Vec<String> {
    let mut failures = Vec::new();
    for q in queries {
        let expr = substitute(&q.expr);
        if expr.contains('$') {
            failures.push(format!(
                "[{}] unknown template variable in: {expr}",
                q.panel
            ));
            continue;
        }
        match prom.query(&expr).await {
            Err(e) => failures.push(format!("[{}] does not evaluate: {expr}\n    {e}", q.panel)),
            Ok(r) if r.is_empty() => {
                failures.push(format!("[{}] returns no data: {expr}", q.panel))
            }
            Ok(_) => {}
        }
    }
    failures
}

/// `(name, expr)` of every alerting rule.
fn alert_expressions() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_file("dashboards/alerts.yml")).expect("alerts.yml");
    // A small reader for the rule file's shape: `- alert: Name` then `expr: |` and an
    // indented block, which keeps YAML parsing out of the dependencies.
    let mut out = Vec::new();
    let mut lines = text.lines().peekable();
    let mut name: Option<String> = None;
    while let Some(line) = lines.next() {
        let t = line.trim();
        if let Some(n) = t.strip_prefix("- alert:") {
            name = Some(n.trim().to_owned());
        } else if let Some(rest) = t.strip_prefix("expr:") {
            let indent = line.len() - line.trim_start().len();
            let mut expr = rest.trim().trim_start_matches(['|', '>']).to_owned();
            while let Some(next) = lines.peek() {
                let next_indent = next.len() - next.trim_start().len();
                if next.trim().is_empty() || next_indent > indent {
                    expr.push(' ');
                    expr.push_str(next.trim());
                    lines.next();
                } else {
                    break;
                }
            }
            out.push((
                name.take().expect("expr belongs to an alert"),
                expr.trim().to_owned(),
            ));
        }
    }
    out
}

/// The `sluice_*` metric names an expression reads.
fn sluice_metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("sluice_") {
        let start = i + pos;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if boundary {
            names.push(expr[start..end].to_owned());
        }
        i = end;
    }
    names.sort();
    names.dedup();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_and_alert_expression_works_against_a_real_prometheus() {
    let app = spawn_app_with(|_| {}).await;
    let prom = Prometheus::start(&app.addr.to_string(), &repo_file("dashboards/alerts.yml")).await;

    assert_eq!(
        drive_mixed_traffic(&app, "prom").await,
        MIXED_TRAFFIC_STATUSES
    );
    let received = metric_value(
        &app.scrape().await,
        "sluice_readings_received_total",
        &[("transport", "http")],
    );

    // At least two scrapes, one of them after all the traffic, so rate() has two samples.
    let what = "Prometheus to scrape Sluice twice, once after the traffic";
    wait_until(Duration::from_secs(30), what, || async {
        prom.value(r#"count_over_time(up{job="sluice"}[1m])"#).await >= Some(2.0)
            && prom
                .value(r#"count_over_time(sluice_http_requests_total{route="/v1/readings",status="200"}[1m])"#)
                .await
                >= Some(2.0)
            && prom
                .value(r#"sluice_readings_received_total{job="sluice",transport="http"}"#)
                .await
                == Some(received)
            && prom.value(r#"up{job="sluice"}"#).await == Some(1.0)
    })
    .await;

    // Every dashboard query parses and returns data.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_file("dashboards/sluice.json")).expect("sluice.json"),
    )
    .expect("sluice.json is JSON");
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 30, "only {} queries found", queries.len());
    let failures = check_dashboard_queries(&prom, &queries).await;
    assert!(
        failures.is_empty(),
        "{} of {} dashboard queries fail:\n  {}",
        failures.len(),
        queries.len(),
        failures.join("\n  ")
    );

    // The check can fail: the same dashboard with one metric renamed does.
    let renamed: Vec<DashboardQuery> = queries
        .iter()
        .filter(|q| q.expr.contains("sluice_store_commit_seconds"))
        .map(|q| DashboardQuery {
            panel: q.panel.clone(),
            expr: q.expr.replace(
                "sluice_store_commit_seconds",
                "sluice_store_commit_duration_seconds",
            ),
        })
        .collect();
    assert!(!renamed.is_empty());
    let failures = check_dashboard_queries(&prom, &renamed).await;
    assert_eq!(failures.len(), renamed.len(), "{failures:?}");

    // Every alert expression parses, and every sluice_* metric it reads exists, so no alert
    // silently watches a metric that was renamed.
    let alerts = alert_expressions();
    assert!(alerts.len() >= 8, "only {} alerts found", alerts.len());
    for (name, expr) in &alerts {
        prom.query(expr)
            .await
            .unwrap_or_else(|e| panic!("alert {name} does not evaluate: {expr}\n  {e}"));
        for metric in sluice_metric_names(expr) {
            let found = prom.query(&metric).await.unwrap_or_default();
            assert!(
                !found.is_empty(),
                "alert {name} reads {metric}, which Sluice does not export"
            );
        }
    }

    // Prometheus loaded the same rules and evaluates them without errors.
    let what = "Prometheus to evaluate every rule healthily";
    wait_until(Duration::from_secs(20), what, || async {
        let Ok(res) = reqwest::get(format!("{}/api/v1/rules", prom.url)).await else {
            return false;
        };
        let Ok(body) = res.json::<Value>().await else {
            return false;
        };
        let rules: Vec<&Value> = body["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        rules.len() == alerts.len()
            && rules
                .iter()
                .all(|r| r["health"] == "ok" && r["lastEvaluation"] != "0001-01-01T00:00:00Z")
    })
    .await;

    // A healthy Sluice under light load fires nothing.
    let firing = prom
        .query(r#"ALERTS{alertstate="firing"}"#)
        .await
        .expect("ALERTS");
    assert!(
        firing.is_empty(),
        "alerts on a healthy instance: {firing:?}"
    );

    drop(prom);
    app.shutdown().await.expect("clean shutdown");
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let promtool = require_tool("promtool");
    let check = Command::new(&promtool)
        .args(["check", "rules"])
        .arg(repo_file("dashboards/alerts.yml"))
        .output()
        .expect("run promtool");
    assert!(
        check.status.success(),
        "promtool check rules:\n{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let test = Command::new(&promtool)
        .args(["test", "rules"])
        .arg(repo_file("dashboards/alerts_test.yml"))
        .output()
        .expect("run promtool");
    assert!(
        test.status.success(),
        "promtool test rules:\n{}{}",
        String::from_utf8_lossy(&test.stdout),
        String::from_utf8_lossy(&test.stderr)
    );
    let tests = std::fs::read_to_string(repo_file("dashboards/alerts_test.yml")).unwrap();
    for alert in [
        "SluicePipelineNearCapacity",
        "SluiceEventLoopLagHigh",
        "SluiceEventLoopSaturated",
        "SluiceReadingsShed",
        "SluiceCompactionBehind",
    ] {
        assert!(
            tests.contains(&format!("alertname: {alert}")),
            "{alert} has no unit test"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scraped_metrics_pass_promtool_and_carry_no_device_id() {
    let promtool = require_tool("promtool");
    let app = spawn_app_with(|_| {}).await;
    assert_eq!(
        drive_mixed_traffic(&app, "dev-marker-7f3a").await,
        MIXED_TRAFFIC_STATUSES
    );
    let text = app.scrape().await;
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("dev-marker"),
        "a device id appears in /metrics"
    );
    // Every name SPEC §7 promises is exported.
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
        "sluice_ws_connections",
        "sluice_mqtt_connected",
        "sluice_mqtt_reconnects_total",
        "sluice_runtime_workers",
        "sluice_runtime_alive_tasks",
        "sluice_runtime_global_queue_depth",
        "sluice_runtime_worker_busy_seconds_total",
        "sluice_runtime_worker_park_total",
        "sluice_event_loop_lag_seconds_bucket",
        "sluice_task_scheduled_seconds_total",
        "sluice_task_poll_seconds_total",
        "sluice_task_slow_polls_total",
        "process_resident_memory_bytes",
        "sluice_alert_notifications_total",
        "process_cpu_seconds_total",
        "process_open_fds",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(name)
                && matches!(l.as_bytes().get(name.len()), Some(b'{') | Some(b' '))),
            "{name} is not exported"
        );
    }
    app.shutdown().await.expect("clean shutdown");
}

#[test]
fn dashboard_panels_answer_a_question_and_use_the_variables() {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_file("dashboards/sluice.json")).expect("sluice.json"),
    )
    .expect("sluice.json is JSON");
    let vars: Vec<&Value> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .collect();
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    assert_eq!(var("instance")["includeAll"], true);
    assert_eq!(var("instance")["multi"], true);
    assert_eq!(var("instance")["allValue"], ".*");

    let mut panels = 0;
    for p in dashboard["panels"].as_array().expect("panels") {
        if p["type"] == "row" {
            continue;
        }
        panels += 1;
        let title = p["title"].as_str().unwrap_or("");
        assert!(!title.is_empty(), "a panel has no title");
        assert!(
            p["description"].as_str().is_some_and(|d| d.contains('?')),
            "panel {title}: its description should state the operator question it answers"
        );
        assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title} has no query");
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or("");
            assert_eq!(t["datasource"]["uid"], "${datasource}", "panel {title}");
            assert!(
                expr.contains(r#"instance=~"$instance""#),
                "panel {title}: {expr} ignores $instance"
            );
        }
    }
    assert!(panels >= 20, "{panels} panels");
}
