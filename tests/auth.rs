//! Tokens (SPEC §11, issue 12) against the real service: every refusal gets its specific
//! answer and is counted in `sluice_auth_failures_total` by reason, while the valid readings
//! beside it are stored (checked by set).

mod common;
#[path = "common/pg.rs"]
mod pg;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const ADMIN: &str = "admin-secret-admin-secret-admin-secret-0123";

fn token_mode(s: &mut sluice::Settings) {
    s.auth = serde_json::from_value(json!({"mode": "token", "admin_token": ADMIN})).unwrap();
}

async fn token_app() -> TestApp {
    spawn_app_with(token_mode).await
}

/// Creates a token with the admin API: `(id, secret)`.
async fn create(app: &TestApp, name: &str, scope: &str, devices: &str) -> (String, String) {
    let res = app
        .client
        .post(app.url("/v1/admin/tokens"))
        .bearer_auth(ADMIN)
        .json(&json!({"name": name, "scope": scope, "devices": devices}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["name"], name);
    assert_eq!(body["scope"], scope);
    assert_eq!(body["devices"], devices);
    assert!(body["created_at"].is_string());
    let token = body["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("slc_") && token.len() == 47, "{token}");
    (body["id"].as_str().unwrap().to_owned(), token)
}

async fn revoke(app: &TestApp, id: &str) -> u16 {
    app.client
        .delete(app.url(&format!("/v1/admin/tokens/{id}")))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// POSTs readings with `auth` as the whole `Authorization` header (none if empty).
async fn post(app: &TestApp, auth: &str, body: &Value) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = app.client.post(app.url("/v1/readings")).json(body);
    if !auth.is_empty() {
        req = req.header("authorization", auth);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let body = res.json().await.unwrap_or(Value::Null);
    (status, headers, body)
}

async fn get(app: &TestApp, token: &str, path: &str) -> (u16, Value) {
    let res = app
        .client
        .get(app.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    (
        res.status().as_u16(),
        res.json().await.unwrap_or(Value::Null),
    )
}

/// The stored seqs of `device`, read with `token`.
async fn seqs(app: &TestApp, token: &str, device: &str) -> BTreeSet<u64> {
    let (status, body) = get(app, token, &format!("/v1/devices/{device}/readings")).await;
    if status == 404 {
        return BTreeSet::new();
    }
    assert_eq!(status, 200, "{body}");
    body["readings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect()
}

async fn failures(app: &TestApp, transport: &str, reason: &str) -> f64 {
    app.metric(
        "sluice_auth_failures_total",
        &[("transport", transport), ("reason", reason)],
    )
    .await
}

fn set(v: &[u64]) -> BTreeSet<u64> {
    v.iter().copied().collect()
}

#[tokio::test]
async fn missing_malformed_unknown_and_revoked_tokens_get_401_and_are_counted() {
    let app = token_app().await;
    let (id, write) = create(&app, "gh", "write", "greenhouse-*").await;
    let (_, read) = create(&app, "ops", "read", "*").await;

    let (status, headers, body) = post(&app, "", &reading("greenhouse-1", 1)).await;
    assert_eq!(status, 401);
    assert_eq!(headers["www-authenticate"], "Bearer realm=\"sluice\"");
    assert_eq!(body["type"], "urn:sluice:unauthorized");
    assert_eq!(failures(&app, "http", "missing").await, 1.0);

    let (status, headers, _) = post(&app, "Bearer not-a-token", &reading("greenhouse-1", 2)).await;
    assert_eq!(status, 401);
    assert!(headers["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("error=\"invalid_token\""));
    let (status, _, _) = post(&app, "Basic dTpw", &reading("greenhouse-1", 2)).await;
    assert_eq!(status, 401);
    let unknown = format!("Bearer slc_{}", "A".repeat(43));
    let (status, _, unknown_body) = post(&app, &unknown, &reading("greenhouse-1", 3)).await;
    assert_eq!(status, 401);
    assert_eq!(failures(&app, "http", "invalid").await, 3.0);

    // A valid neighbour is stored; then the token is revoked and fails at once.
    let bearer = format!("Bearer {write}");
    let (status, _, body) = post(&app, &bearer, &reading("greenhouse-1", 4)).await;
    assert_eq!((status, body["accepted"].as_u64()), (200, Some(1)));
    assert_eq!(revoke(&app, &id).await, 204);
    assert_eq!(revoke(&app, &id).await, 404);
    let (status, headers, revoked_body) = post(&app, &bearer, &reading("greenhouse-1", 5)).await;
    assert_eq!(status, 401);
    assert!(headers.contains_key("www-authenticate"));
    // Unknown and revoked tokens look the same from outside; only the metric tells them apart.
    assert_eq!(revoked_body, unknown_body);
    assert_eq!(failures(&app, "http", "revoked").await, 1.0);
    assert_eq!(seqs(&app, &read, "greenhouse-1").await, set(&[4]));
    // Neither the query API nor the status JSON answers without a token; health does.
    assert_eq!(app.get_json("/v1/devices").await.0, 401);
    assert_eq!(app.get_json("/v1/status").await.0, 401);
    for open in ["/healthz", "/readyz", "/metrics", "/"] {
        let res = app.client.get(app.url(open)).send().await.unwrap();
        assert_eq!(res.status(), 200, "{open}");
    }
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_write_token_writes_only_its_devices_by_index_and_all_foreign_is_403() {
    let app = token_app().await;
    let (_, write) = create(&app, "gh", "write", "greenhouse-*").await;
    let (_, read) = create(&app, "ops", "read", "*").await;
    let bearer = format!("Token {write}"); // as InfluxDB clients send it
    let mixed = json!([
        reading("greenhouse-1", 1),
        reading("barn-1", 2),
        reading("greenhouse-2", 3),
        {"device_id": "greenhouse-1", "seq": 4, "metrics": {}},
    ]);
    let (status, _, body) = post(&app, &bearer, &mixed).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accepted"], 2);
    assert_eq!(
        body["rejected"][0],
        json!({"index": 1, "reason": "forbidden", "error": "device_id: not allowed for this token"})
    );
    assert_eq!(body["rejected"][1]["index"], 3);
    assert_eq!(body["rejected"][1]["reason"], "invalid_metrics");

    let foreign = json!([reading("barn-1", 5), reading("barn-2", 6)]);
    let (status, _, body) = post(&app, &bearer, &foreign).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["type"], "urn:sluice:forbidden");
    assert_eq!(body["accepted"], 0);
    let indexes: Vec<u64> = body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, [0, 1]);
    assert!(body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["reason"] == "forbidden"));
    assert_eq!(failures(&app, "http", "forbidden").await, 2.0);
    assert_eq!(
        app.metric(
            "sluice_readings_rejected_total",
            &[("transport", "http"), ("reason", "forbidden")]
        )
        .await,
        3.0
    );
    assert_eq!(seqs(&app, &read, "greenhouse-1").await, set(&[1]));
    assert_eq!(seqs(&app, &read, "greenhouse-2").await, set(&[3]));
    assert!(seqs(&app, &read, "barn-1").await.is_empty());

    // A token naming one device binds it: its readings may leave device_id out.
    let (_, one) = create(&app, "one", "write", "greenhouse-9").await;
    let (status, _, body) = post(
        &app,
        &format!("Bearer {one}"),
        &json!({"seq": 7, "metrics": {"t": 1}}),
    )
    .await;
    assert_eq!(
        (status, body["accepted"].as_u64()),
        (200, Some(1)),
        "{body}"
    );
    assert_eq!(seqs(&app, &read, "greenhouse-9").await, set(&[7]));
    // Naming another device with that token is `forbidden` (an auth failure), not a mismatch.
    let (status, _, body) = post(
        &app,
        &format!("Bearer {one}"),
        &json!([{"seq": 8, "metrics": {"t": 1}}, reading("greenhouse-1", 9)]),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accepted"], 1);
    assert_eq!(
        body["rejected"],
        json!([{"index": 1, "reason": "forbidden", "error": "device_id: not allowed for this token"}])
    );
    assert_eq!(failures(&app, "http", "forbidden").await, 3.0);
    assert_eq!(seqs(&app, &read, "greenhouse-9").await, set(&[7, 8]));
    assert!(!seqs(&app, &read, "greenhouse-1").await.contains(&9));

    // Line protocol: the same rules, InfluxDB's answers.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let write_lp = |body: String| {
        app.client
            .post(app.url("/api/v2/write?org=o&bucket=b&precision=ms"))
            .header("authorization", bearer.clone())
            .body(body)
            .send()
    };
    let res = write_lp(format!("m,device_id=greenhouse-3 t=1,seq=8i {now}"))
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    let res = write_lp(format!("m,device_id=barn-3 t=1,seq=9i {now}"))
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["code"], "forbidden");
    let res = app
        .client
        .post(app.url("/write?db=x"))
        .body("m,device_id=greenhouse-3 t=1 1")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(res.json::<Value>().await.unwrap()["code"], "unauthorized");
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn scopes_decide_what_each_token_reads_and_the_admin_token_is_not_a_device() {
    let app = token_app().await;
    let (_, write) = create(&app, "gh", "write", "greenhouse-*").await;
    let (_, read) = create(&app, "ops", "read", "*").await;
    let (_, barn) = create(&app, "barn", "write", "barn-*").await;
    for (token, device) in [(&write, "greenhouse-1"), (&barn, "barn-1")] {
        let (status, _, _) = post(&app, &format!("Bearer {token}"), &reading(device, 1)).await;
        assert_eq!(status, 200);
    }

    // A read token cannot write.
    let (status, _, body) =
        post(&app, &format!("Bearer {read}"), &reading("greenhouse-1", 2)).await;
    assert_eq!(
        (status, body["type"].as_str()),
        (403, Some("urn:sluice:forbidden"))
    );
    // The admin token is not a device token: it cannot write ...
    let (status, _, body) = post(
        &app,
        &format!("Bearer {ADMIN}"),
        &reading("greenhouse-1", 3),
    )
    .await;
    assert_eq!(status, 403);
    assert!(body["detail"]
        .as_str()
        .unwrap()
        .contains("not a device token"));
    // ... but it reads, like a read token.
    assert_eq!(get(&app, ADMIN, "/v1/devices/barn-1").await.0, 200);
    assert_eq!(failures(&app, "http", "forbidden").await, 2.0);

    // A write token reads its own devices only; the device list is filtered to them.
    assert_eq!(get(&app, &write, "/v1/devices/greenhouse-1").await.0, 200);
    assert_eq!(
        get(&app, &write, "/v1/devices/greenhouse-1/readings")
            .await
            .0,
        200
    );
    assert_eq!(get(&app, &write, "/v1/devices/barn-1").await.0, 403);
    assert_eq!(
        get(&app, &write, "/v1/devices/barn-1/readings").await.0,
        403
    );
    assert_eq!(
        get(&app, &write, "/v1/devices/barn-1/readings?agg=avg&step=1m")
            .await
            .0,
        403
    );
    let ids = |body: &Value| -> Vec<String> {
        body["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["device_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (status, body) = get(&app, &write, "/v1/devices").await;
    assert_eq!((status, ids(&body)), (200, vec!["greenhouse-1".to_owned()]));
    let (_, body) = get(&app, &read, "/v1/devices").await;
    assert_eq!(ids(&body), ["barn-1", "greenhouse-1"]);
    // Fleet-wide views need a read token.
    for path in ["/v1/status", "/v1/alerts", "/v1/rules"] {
        assert_eq!(get(&app, &write, path).await.0, 403, "{path}");
        assert_eq!(get(&app, &read, path).await.0, 200, "{path}");
    }
    assert_eq!(failures(&app, "http", "forbidden").await, 8.0);
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_admin_api_creates_lists_and_revokes_and_needs_the_admin_token() {
    let app = token_app().await;
    let (id, write) = create(&app, "gh", "write", "greenhouse-*").await;
    let res = app
        .client
        .get(app.url("/v1/admin/tokens"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(failures(&app, "http", "missing").await, 1.0);
    let res = app
        .client
        .get(app.url("/v1/admin/tokens"))
        .bearer_auth(&write)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    assert_eq!(failures(&app, "http", "forbidden").await, 1.0);
    let res = app
        .client
        .post(app.url("/v1/admin/tokens"))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "x", "scope": "admin", "devices": "*"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let res = app
        .client
        .post(app.url("/v1/admin/tokens"))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "x", "scope": "write", "devices": "a b"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    // Each refusal is a problem document that names the field.
    let big = format!("{{\"name\": \"{}\"}}", "x".repeat(3 << 20));
    for (body, status, says) in [
        (
            json!({"name": "r", "scope": "read", "devices": "gh-*"}).to_string(),
            400,
            "a read token reads every device",
        ),
        (
            json!({"name": "gh", "scope": "write", "devices": "barn-*"}).to_string(),
            409,
            "name: a token named `gh` exists",
        ),
        (
            json!({"name": "a\u{202E}b", "scope": "read"}).to_string(),
            400,
            "name:",
        ),
        (
            json!({"name": "gh\u{200B}", "scope": "read"}).to_string(),
            400,
            "name:",
        ),
        (
            json!({"name": "a\u{061C}b", "scope": "read"}).to_string(),
            400,
            "name:",
        ),
        (
            json!({"name": "x", "scope": "write", "devices": "-gh*"}).to_string(),
            400,
            "matches no device",
        ),
        (big, 413, "length limit"),
    ] {
        let res = app
            .client
            .post(app.url("/v1/admin/tokens"))
            .bearer_auth(ADMIN)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), status, "{says}");
        assert_eq!(res.headers()["content-type"], "application/problem+json");
        let problem: Value = res.json().await.unwrap();
        assert!(
            problem["detail"].as_str().unwrap().contains(says),
            "{problem}"
        );
        if status == 413 {
            assert_eq!(problem["type"], "urn:sluice:payload-too-large");
        }
    }
    // Twenty creates of one name at once: one token.
    let creates = (0..20).map(|_| {
        app.client
            .post(app.url("/v1/admin/tokens"))
            .bearer_auth(ADMIN)
            .json(&json!({"name": "racer", "scope": "read"}))
            .send()
    });
    let mut statuses = Vec::new();
    let mut racer = Vec::new();
    for res in futures_util::future::join_all(creates).await {
        let res = res.unwrap();
        statuses.push(res.status().as_u16());
        if res.status() == 201 {
            racer.push(
                res.json::<Value>().await.unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
        }
    }
    assert_eq!(racer.len(), 1, "{statuses:?}");
    assert_eq!(
        statuses.iter().filter(|s| **s == 409).count(),
        19,
        "{statuses:?}"
    );
    assert_eq!(revoke(&app, &racer[0]).await, 204);

    // Use it once: the list shows when (written in batches, so wait for it).
    let (status, _, _) = post(
        &app,
        &format!("Bearer {write}"),
        &reading("greenhouse-1", 1),
    )
    .await;
    assert_eq!(status, 200);
    let list = || async {
        let res = app
            .client
            .get(app.url("/v1/admin/tokens"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        res.json::<Value>().await.unwrap()
    };
    let body = list().await;
    let tokens = body["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0]["id"], id.as_str());
    assert!(tokens[0].get("token").is_none(), "no secret in the list");
    assert!(!body.to_string().contains(&write));
    wait_until(Duration::from_secs(20), "last_used_at recorded", || async {
        list().await["tokens"][0]["last_used_at"].is_string()
    })
    .await;
    assert_eq!(revoke(&app, &id).await, 204);
    assert!(list().await["tokens"].as_array().unwrap().is_empty());
    assert_eq!(revoke(&app, "tok_unknown").await, 404);
    app.shutdown().await.unwrap();

    // Without an admin token (auth.mode = "none") there is no token administration.
    let open = spawn_app().await;
    let res = open
        .client
        .get(open.url("/v1/admin/tokens"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["type"], "urn:sluice:auth-disabled");
    open.shutdown().await.unwrap();
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_connect(app: &TestApp, path: &str, token: Option<&str>) -> Result<Ws, u16> {
    let mut req = format!("ws://{}{}", app.addr, path)
        .into_client_request()
        .unwrap();
    if let Some(t) = token {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => Err(res.status().as_u16()),
        Err(e) => panic!("{e}"),
    }
}

/// The close code the server sends within `within`, skipping other messages.
async fn closed_with(ws: &mut Ws, within: Duration) -> u16 {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(f))))) => return f.code.into(),
            Ok(Some(Ok(_))) => continue,
            other => panic!("no close frame within {within:?}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn websockets_check_the_token_and_close_with_1008_when_it_is_revoked() {
    let app = token_app().await;
    let (id, write) = create(&app, "gh", "write", "greenhouse-*").await;
    let (_, read) = create(&app, "ops", "read", "*").await;

    assert_eq!(ws_connect(&app, "/v1/ws", None).await.err(), Some(401));
    assert_eq!(failures(&app, "ws", "missing").await, 1.0);
    // `?device_id=` and the token disagree: refused at the upgrade.
    assert_eq!(
        ws_connect(&app, "/v1/ws?device_id=barn-1", Some(&write))
            .await
            .err(),
        Some(403)
    );
    assert_eq!(failures(&app, "ws", "forbidden").await, 1.0);
    // A read token cannot open a device connection; a write token cannot tail other devices.
    assert_eq!(
        ws_connect(&app, "/v1/ws", Some(&read)).await.err(),
        Some(403)
    );
    assert_eq!(
        ws_connect(&app, "/v1/live?device=barn-*", Some(&write))
            .await
            .err(),
        Some(403)
    );

    // The token in the query string, as a browser sends it.
    let mut device = ws_connect(
        &app,
        &format!("/v1/ws?device_id=greenhouse-1&token={write}"),
        None,
    )
    .await
    .unwrap();
    device
        .send(Message::text(
            json!([{"seq": 1, "metrics": {"t": 1}}, reading("barn-1", 2)]).to_string(),
        ))
        .await
        .unwrap();
    let ack = next_ws_json(&mut device, Duration::from_secs(10)).await;
    assert_eq!(ack["accepted"], 1, "{ack}");
    assert_eq!(ack["rejected"][0]["index"], 1);
    assert!(ack["rejected"][0]["reason"] == "device_mismatch");
    let mut unbound = ws_connect(&app, "/v1/ws", Some(&write)).await.unwrap();
    unbound
        .send(Message::text(
            json!([reading("greenhouse-2", 3), reading("barn-1", 4)]).to_string(),
        ))
        .await
        .unwrap();
    let ack = next_ws_json(&mut unbound, Duration::from_secs(10)).await;
    assert_eq!(ack["accepted"], 1, "{ack}");
    assert_eq!(
        ack["rejected"][0],
        json!({"index": 1, "reason": "forbidden", "error": "device_id: not allowed for this token"})
    );
    let mut live = ws_connect(&app, &format!("/v1/live?token={write}"), None)
        .await
        .unwrap();
    let mut reader = ws_connect(&app, "/v1/live", Some(&read)).await.unwrap();

    // Revoked: every connection of that token closes with 1008 within a second; others stay.
    let revoked_at = std::time::Instant::now();
    assert_eq!(revoke(&app, &id).await, 204);
    for ws in [&mut device, &mut unbound, &mut live] {
        assert_eq!(closed_with(ws, Duration::from_secs(1)).await, 1008);
    }
    assert!(revoked_at.elapsed() < Duration::from_secs(2));
    assert_eq!(
        ws_connect(&app, "/v1/ws", Some(&write)).await.err(),
        Some(401)
    );
    assert_eq!(failures(&app, "ws", "revoked").await, 1.0);
    reader.send(Message::Ping(vec![].into())).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), reader.next())
            .await
            .is_ok_and(|m| matches!(m, Some(Ok(Message::Pong(_)))))
    );
    assert_eq!(seqs(&app, &read, "greenhouse-1").await, set(&[1]));
    assert_eq!(seqs(&app, &read, "greenhouse-2").await, set(&[3]));
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_token_in_the_query_string_is_never_logged() {
    let dir = tempfile::tempdir().unwrap();
    let mut sluice = SluiceProcess::start(
        dir.path(),
        &[
            ("SLUICE__SERVER__LISTEN", "127.0.0.1:0".into()),
            ("SLUICE__AUTH__MODE", "token".into()),
            ("SLUICE__AUTH__ADMIN_TOKEN", ADMIN.into()),
            ("RUST_LOG", "trace".into()),
        ],
    );
    let client = reqwest::Client::new();
    wait_ready(&client, &format!("{}/readyz", sluice.url())).await;
    let secret = format!("slc_{}", "Q".repeat(43));
    // Unknown token on a WebSocket upgrade, and on an HTTP endpoint that does not read it.
    let url = format!("ws://{}/v1/ws?device_id=d-1&token={secret}", sluice.addr);
    let refused = tokio_tungstenite::connect_async(url).await;
    assert!(refused.is_err());
    let res = client
        .get(format!("{}/v1/devices?token={secret}", sluice.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    sluice.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(sluice.wait_exit(Duration::from_secs(20)).success());
    let log = sluice.log.lock().unwrap().join("\n");
    assert!(log.contains("sluice listening"), "{log}");
    assert!(!log.contains(&secret), "the token was logged:\n{log}");
    assert!(!log.contains(ADMIN), "the admin token was logged");
}

#[tokio::test]
async fn mode_none_warns_once_on_a_public_address_and_token_mode_needs_an_admin_token() {
    async fn warnings(listen: &str) -> usize {
        let dir = tempfile::tempdir().unwrap();
        let mut sluice =
            SluiceProcess::start(dir.path(), &[("SLUICE__SERVER__LISTEN", listen.to_owned())]);
        let ready = format!("http://127.0.0.1:{}/readyz", sluice.addr.port());
        wait_ready(&reqwest::Client::new(), &ready).await;
        sluice.signal(nix::sys::signal::Signal::SIGTERM);
        assert!(sluice.wait_exit(Duration::from_secs(20)).success());
        let log = sluice.log.lock().unwrap();
        log.iter()
            .filter(|l| l.contains("WARN") && l.contains("auth.mode is \"none\""))
            .count()
    }
    assert_eq!(warnings("0.0.0.0:0").await, 1);
    assert_eq!(warnings("127.0.0.1:0").await, 0);
    // Token mode without an admin token does not start, and names the key (exit 2).
    let (code, stderr) = run_sluice_to_exit(
        &[("SLUICE__AUTH__MODE", "token".into())],
        Duration::from_secs(20),
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("auth.admin_token"), "{stderr}");
    let (code, stderr) = run_sluice_to_exit(
        &[
            ("SLUICE__AUTH__MODE", "token".into()),
            ("SLUICE__AUTH__ADMIN_TOKEN", "tiny-value".into()),
        ],
        Duration::from_secs(20),
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("auth.admin_token") && !stderr.contains("tiny-value"),
        "{stderr}"
    );
    let (code, stderr) = run_sluice_to_exit(
        &[("SLUICE__RATE_LIMIT__PER_DEVICE", "50/day".into())],
        Duration::from_secs(20),
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("rate_limit.per_device"), "{stderr}");
    let (code, stderr) = run_sluice_to_exit(
        &[("SLUICE__AUTH__MODEE", "token".into())],
        Duration::from_secs(20),
    );
    assert_eq!(code, Some(2), "{stderr}");
    // --check-config shows the effective settings with the admin token redacted.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--check-config")
        .env_clear()
        .env("SLUICE__AUTH__MODE", "token")
        .env("SLUICE__AUTH__ADMIN_TOKEN", ADMIN)
        .env("SLUICE__RATE_LIMIT__PER_DEVICE", "50/s")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("admin_token = \"<redacted>\""), "{text}");
    assert!(text.contains("per_device = \"50/s\""), "{text}");
    assert!(!text.contains(ADMIN));
}

/// Two replicas on one PostgreSQL database share tokens: one created on A works on B, and
/// one revoked on A fails on B within about a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replicas_share_tokens_and_revocations() {
    let db = pg::TestDb::new();
    let url = db.url();
    let pg = |s: &mut sluice::Settings| {
        token_mode(s);
        s.storage.backend = sluice::config::Backend::Postgres;
        s.storage.postgres.url = sluice::config::DbUrl::new(url.clone());
    };
    let a = spawn_app_with(pg).await;
    let b = spawn_app_with(pg).await;
    let (id, write) = create(&a, "gh", "write", "greenhouse-*").await;
    let (_, read) = create(&a, "ops", "read", "*").await;
    let bearer = format!("Bearer {write}");
    let (status, _, _) = post(&b, &bearer, &reading("greenhouse-1", 1)).await;
    assert_eq!(status, 200);
    let mut on_b = ws_connect(&b, "/v1/ws", Some(&write)).await.unwrap();
    assert_eq!(db.sql("SELECT count(*) FROM tokens"), "2");
    assert_eq!(
        db.sql("SELECT count(*) FROM tokens WHERE hash = sha256(convert_to('x', 'UTF8'))"),
        "0"
    );
    assert!(!db
        .sql("SELECT string_agg(encode(hash, 'escape'), '') FROM tokens")
        .contains(&write));
    assert_eq!(revoke(&a, &id).await, 204);
    assert_eq!(closed_with(&mut on_b, Duration::from_secs(3)).await, 1008);
    let (status, _, _) = post(&b, &bearer, &reading("greenhouse-1", 2)).await;
    assert_eq!(status, 401);
    assert_eq!(seqs(&b, &read, "greenhouse-1").await, set(&[1]));
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// A write token lists only the devices its glob matches, page by page with the cursor, in
/// id order, with devices it may not read between and around them (the store's listing on
/// PostgreSQL, the device state on SQLite). The `_` of `gh_1` must not match as LIKE's wildcard.
async fn write_token_lists_its_devices_page_by_page(app: &TestApp) {
    let (_, write) = create(app, "pages", "write", "gh-?-*").await;
    let mut ours = Vec::new();
    let mut batch = Vec::new();
    for i in 0..30u64 {
        batch.push(reading(&format!("gh-{}-{i:02}", i % 3), i));
        batch.push(reading(&format!("gh-{}{i:02}", i % 3), i)); // no `-` after the `?`
        batch.push(reading(&format!("gh_1-{i:02}"), i));
        ours.push(format!("gh-{}-{i:02}", i % 3));
    }
    let (status, _, body) = post(app, &format!("Bearer {ADMIN}"), &json!(batch)).await;
    assert_eq!(status, 403, "the admin token writes nothing: {body}");
    let (_, gateway) = create(app, "all", "write", "*").await;
    let (status, _, body) = post(app, &format!("Bearer {gateway}"), &json!(batch)).await;
    assert_eq!(
        (status, body["accepted"].as_u64()),
        (200, Some(90)),
        "{body}"
    );
    ours.sort();
    let mut listed = Vec::new();
    let mut cursor = String::new();
    loop {
        let (status, body) = get(
            app,
            &write,
            &format!("/v1/devices?limit=7&prefix=gh&cursor={cursor}"),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let page = body["devices"].as_array().unwrap();
        assert!(page.len() <= 7);
        listed.extend(
            page.iter()
                .map(|d| d["device_id"].as_str().unwrap().to_owned()),
        );
        match body["next"].as_str() {
            Some(next) => cursor = next.to_owned(),
            None => break,
        }
    }
    assert_eq!(listed, ours);
    // A prefix inside the glob narrows it; one outside it lists nothing.
    let (_, body) = get(app, &write, "/v1/devices?prefix=gh-2-0").await;
    assert_eq!(body["devices"].as_array().unwrap().len(), 3, "{body}"); // 02, 05, 08
    let (_, body) = get(app, &write, "/v1/devices?prefix=gh_").await;
    assert_eq!(body["devices"], json!([]));
}

#[tokio::test]
async fn a_write_token_lists_its_devices_page_by_page_on_sqlite() {
    let app = token_app().await;
    write_token_lists_its_devices_page_by_page(&app).await;
    app.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_token_lists_its_devices_page_by_page_on_postgres() {
    let db = pg::TestDb::new();
    let url = db.url();
    let app = spawn_app_with(|s: &mut sluice::Settings| {
        token_mode(s);
        s.storage.backend = sluice::config::Backend::Postgres;
        s.storage.postgres.url = sluice::config::DbUrl::new(url.clone());
    })
    .await;
    write_token_lists_its_devices_page_by_page(&app).await;
    app.shutdown().await.unwrap();
}
