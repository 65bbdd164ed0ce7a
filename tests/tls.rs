//! TLS (SPEC §8), end to end: Sluice in process with `server.tls.*` serving HTTPS and WSS,
//! with certificates made here by rcgen, swapped the way a Kubernetes Secret volume swaps
//! them (a `..data` symlink); and Sluice connecting to a private Mosquitto's TLS listener with
//! `mqtt.url = "mqtts://…"`. Clients are tokio-rustls with the test CAs only (hyper for HTTP,
//! tokio-tungstenite for WebSocket), on the same rustls and ring provider as Sluice.

mod common;
#[path = "common/mqtt_broker.rs"]
mod mqtt_broker;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{metric_value, reading, run_sluice_to_exit, spawn_app_unready, wait_until, TestApp};
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use mqtt_broker::{client_id, free_port, mosquitto_pub, Mosquitto};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use serde_json::{json, Value};
use sluice::Settings;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message;

/// A test certificate authority.
struct Ca(CertifiedIssuer<'static, KeyPair>);

/// A server certificate for `localhost` and `127.0.0.1`, with its key.
#[derive(Clone)]
struct ServerCert {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ca(CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap())
    }

    fn pem(&self) -> String {
        self.0.pem()
    }

    fn server_cert(&self, name: &str) -> ServerCert {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.0).unwrap();
        ServerCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }
}

/// A client configuration trusting exactly `cas`, on the build's one provider.
fn client_config(cas: &[&Ca]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots.add(ca.0.der().clone()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// The certificate files as a Kubernetes Secret volume lays them out (what cert-manager's
/// rotations look like to Sluice): `tls.crt` and `tls.key` are symlinks into `..data`, itself a
/// symlink to a versioned directory, swapped in one `rename`.
struct CertDir {
    dir: tempfile::TempDir,
    version: u32,
}

impl CertDir {
    fn new(cert: &ServerCert) -> Self {
        let mut d = CertDir {
            dir: tempfile::tempdir().unwrap(),
            version: 0,
        };
        d.install(&cert.cert_pem, &cert.key_pem);
        for name in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(format!("..data/{name}"), d.dir.path().join(name)).unwrap();
        }
        d
    }

    fn cert_file(&self) -> PathBuf {
        self.dir.path().join("tls.crt")
    }

    fn key_file(&self) -> PathBuf {
        self.dir.path().join("tls.key")
    }

    /// Replaces both files at once.
    fn install(&mut self, cert_pem: &str, key_pem: &str) {
        self.version += 1;
        let version = format!("..v{}", self.version);
        let dir = self.dir.path().join(&version);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("tls.crt"), cert_pem).unwrap();
        std::fs::write(dir.join("tls.key"), key_pem).unwrap();
        let tmp = self.dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(&version, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("..data")).unwrap();
    }
}

/// One HTTPS connection: the certificate the server presented, and HTTP/1.1 requests on it.
struct Https {
    peer: CertificateDer<'static>,
    sender: SendRequest<Full<Bytes>>,
}

/// Connects and completes the TLS handshake as `localhost`.
async fn tls_connect(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    TlsConnector::from(config.clone()).connect(name, tcp).await
}

impl Https {
    async fn connect(addr: SocketAddr, config: &Arc<ClientConfig>) -> std::io::Result<Self> {
        let tls = tls_connect(addr, config).await?;
        let peer = tls.get_ref().1.peer_certificates().expect("a certificate")[0].clone();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        Ok(Https { peer, sender })
    }

    /// Sends one request and reads the whole answer: `(status, body)`.
    async fn send(&mut self, method: &str, path: &str, body: &str) -> (u16, String) {
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        let res = self.sender.send_request(req).await.expect("HTTPS request");
        let status = res.status().as_u16();
        let body = res
            .into_body()
            .collect()
            .await
            .expect("HTTPS body")
            .to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

/// Sluice over HTTPS, and the client side of the test.
struct TlsApp {
    app: TestApp,
    config: Arc<ClientConfig>,
}

impl TlsApp {
    /// Starts Sluice with `certs` as `server.tls.*` (checked every second), ready.
    async fn start(
        certs: &CertDir,
        config: Arc<ClientConfig>,
        tweak: impl FnOnce(&mut Settings),
    ) -> Self {
        let (cert, key) = (certs.cert_file(), certs.key_file());
        let app = spawn_app_unready(|s| {
            s.server.tls.cert_file = Some(cert);
            s.server.tls.key_file = Some(key);
            s.server.tls.reload_interval = Duration::from_secs(1);
            tweak(s);
        })
        .await;
        let t = TlsApp { app, config };
        wait_until(Duration::from_secs(10), "ready over HTTPS", || async {
            match t.connect().await {
                Ok(mut c) => c.send("GET", "/readyz", "").await.0 == 200,
                Err(_) => false,
            }
        })
        .await;
        t
    }

    async fn connect(&self) -> std::io::Result<Https> {
        Https::connect(self.app.addr, &self.config).await
    }

    /// The certificate a new connection is given.
    async fn served_cert(&self) -> CertificateDer<'static> {
        self.connect().await.expect("TLS connects").peer
    }

    async fn post(&self, body: &Value) -> (u16, String) {
        let mut c = self.connect().await.expect("TLS connects");
        c.send("POST", "/v1/readings", &body.to_string()).await
    }

    async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut c = self.connect().await.expect("TLS connects");
        let (status, text) = c.send("GET", "/metrics", "").await;
        assert_eq!(status, 200);
        metric_value(&text, name, labels)
    }

    async fn stored_seqs(&self, device: &str) -> BTreeSet<u64> {
        let mut c = self.connect().await.expect("TLS connects");
        let (status, body) = c
            .send(
                "GET",
                &format!("/v1/devices/{device}/readings?limit=1000"),
                "",
            )
            .await;
        if status == 404 {
            return BTreeSet::new();
        }
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        v["readings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["seq"].as_u64().unwrap())
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_over_https_and_wss_are_stored() {
    let ca = Ca::new("test CA");
    let certs = CertDir::new(&ca.server_cert("sluice"));
    let t = TlsApp::start(&certs, client_config(&[&ca]), |_| {}).await;

    let (status, body) = t
        .post(&json!([reading("tls-http", 1), reading("tls-http", 2)]))
        .await;
    assert_eq!(status, 200, "{body}");

    let tls = tls_connect(t.app.addr, &t.config).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async("wss://localhost/v1/ws", tls)
        .await
        .expect("WSS handshake");
    ws.send(Message::Text(reading("tls-ws", 7).to_string().into()))
        .await
        .unwrap();
    let ack = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("ack in time")
        .expect("a frame")
        .expect("no error");
    let ack: Value = serde_json::from_str(ack.to_text().unwrap()).unwrap();
    assert_eq!(ack["accepted"], 1, "{ack}");
    ws.close(None).await.unwrap();

    assert_eq!(t.stored_seqs("tls-http").await, BTreeSet::from([1, 2]));
    assert_eq!(t.stored_seqs("tls-ws").await, BTreeSet::from([7]));
    t.app.shutdown().await.expect("graceful shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_reaches_new_connections_and_open_ones_keep_theirs() {
    let (old_ca, new_ca) = (Ca::new("old CA"), Ca::new("new CA"));
    let old = old_ca.server_cert("sluice-old");
    let new = new_ca.server_cert("sluice-new");
    let mut certs = CertDir::new(&old);
    let t = TlsApp::start(&certs, client_config(&[&old_ca, &new_ca]), |_| {}).await;

    let mut open = t.connect().await.unwrap();
    assert_eq!(open.peer, old.der);
    let (status, _) = open
        .send("POST", "/v1/readings", &reading("rot", 1).to_string())
        .await;
    assert_eq!(status, 200);

    certs.install(&new.cert_pem, &new.key_pem);
    wait_until(
        Duration::from_secs(10),
        "the new certificate served",
        || async { t.served_cert().await == new.der },
    )
    .await;
    assert_eq!(
        t.metric("sluice_tls_cert_reloads_total", &[("result", "ok")])
            .await,
        1.0
    );
    // The connection opened before the swap goes on with its own session.
    let (status, body) = open
        .send("POST", "/v1/readings", &reading("rot", 2).to_string())
        .await;
    assert_eq!(status, 200, "{body}");
    // A client that trusts only the old CA can no longer connect.
    assert!(Https::connect(t.app.addr, &client_config(&[&old_ca]))
        .await
        .is_err());
    assert_eq!(t.stored_seqs("rot").await, BTreeSet::from([1, 2]));
    t.app.shutdown().await.expect("graceful shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_replacement_keeps_the_current_certificate() {
    let ca = Ca::new("test CA");
    let first = ca.server_cert("first");
    let second = ca.server_cert("second");
    let mut certs = CertDir::new(&first);
    let t = TlsApp::start(&certs, client_config(&[&ca]), |_| {}).await;
    let refused = || t.metric("sluice_tls_cert_reloads_total", &[("result", "error")]);

    // Not a certificate; then a certificate with another certificate's key.
    certs.install("not a certificate\n", &first.key_pem);
    wait_until(Duration::from_secs(10), "garbage refused", || async {
        refused().await == 1.0
    })
    .await;
    assert_eq!(t.served_cert().await, first.der);
    certs.install(&second.cert_pem, &first.key_pem);
    wait_until(
        Duration::from_secs(10),
        "mismatched key refused",
        || async { refused().await == 2.0 },
    )
    .await;
    assert_eq!(t.served_cert().await, first.der);
    let (status, body) = t.post(&reading("bad-swap", 1)).await;
    assert_eq!(status, 200, "{body}");

    // Once the pair is whole, it is served.
    certs.install(&second.cert_pem, &second.key_pem);
    wait_until(Duration::from_secs(10), "the good pair served", || async {
        t.served_cert().await == second.der
    })
    .await;
    assert_eq!(refused().await, 2.0);
    assert_eq!(
        t.metric("sluice_tls_cert_reloads_total", &[("result", "ok")])
            .await,
        1.0
    );
    t.app.shutdown().await.expect("graceful shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_and_silent_clients_fail_alone_and_the_server_keeps_serving() {
    let ca = Ca::new("test CA");
    let certs = CertDir::new(&ca.server_cert("sluice"));
    let t = TlsApp::start(&certs, client_config(&[&ca]), |s| {
        s.server.request_timeout = Duration::from_secs(1);
    })
    .await;

    // Plain HTTP on the TLS port: an error for that client, nothing more.
    let plain = reqwest::Client::new()
        .post(format!("http://{}/v1/readings", t.app.addr))
        .body(reading("plain", 1).to_string())
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP answered: {plain:?}");

    // A client that connects and never says hello holds only its own connection, and only
    // for server.request_timeout; meanwhile others are served.
    let started = Instant::now();
    let mut silent = TcpStream::connect(t.app.addr).await.unwrap();
    let (status, body) = t.post(&reading("tls-ok", 1)).await;
    assert_eq!(status, 200, "{body}");
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf))
        .await
        .expect("the silent connection is closed by the server");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "closed after {waited:?}"
    );

    assert_eq!(
        t.metric(
            "sluice_tls_handshake_failures_total",
            &[("reason", "error")]
        )
        .await,
        1.0
    );
    assert_eq!(
        t.metric(
            "sluice_tls_handshake_failures_total",
            &[("reason", "timeout")]
        )
        .await,
        1.0
    );
    assert!(t.stored_seqs("plain").await.is_empty());
    assert_eq!(t.stored_seqs("tls-ok").await, BTreeSet::from([1]));
    t.app.shutdown().await.expect("graceful shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_certificate_files_stop_the_start_naming_the_key() {
    let ca = Ca::new("test CA");
    let good = ca.server_cert("good");
    let other = ca.server_cert("other");
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let cert = write("cert.pem", &good.cert_pem);
    let key = write("key.pem", &good.key_pem);
    let cases: [(&str, PathBuf, PathBuf, &str); 4] = [
        (
            "missing cert",
            dir.path().join("absent.pem"),
            key.clone(),
            "server.tls.cert_file: cannot read",
        ),
        (
            "not PEM",
            write("garbage.pem", "hello\n"),
            key.clone(),
            "server.tls.cert_file",
        ),
        (
            "key not PEM",
            cert.clone(),
            write("garbage.key", "hello\n"),
            "server.tls.key_file",
        ),
        (
            "another key",
            cert.clone(),
            write("other.key", &other.key_pem),
            "is not the private key",
        ),
    ];
    for (name, cert_file, key_file, expected) in cases {
        let data = tempfile::tempdir().unwrap();
        let mut s = common::test_settings(data.path());
        s.server.tls.cert_file = Some(cert_file);
        s.server.tls.key_file = Some(key_file);
        let err = match sluice::Application::build(s).await {
            Ok(_) => panic!("{name}: started"),
            Err(e) => e,
        };
        assert!(
            err.downcast_ref::<sluice::config::ConfigError>().is_some(),
            "{name}: not a configuration error: {err:#}"
        );
        assert!(err.to_string().contains(expected), "{name}: {err:#}");
    }

    // The binary: exit code 2, naming the key, for a missing half and an unreadable file.
    let (code, stderr) = run_sluice_to_exit(
        &[("SLUICE__SERVER__TLS__CERT_FILE", cert.display().to_string())],
        Duration::from_secs(20),
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("server.tls.key_file"), "{stderr}");
    let (code, stderr) = run_sluice_to_exit(
        &[
            ("SLUICE__SERVER__TLS__CERT_FILE", cert.display().to_string()),
            (
                "SLUICE__SERVER__TLS__KEY_FILE",
                "/nonexistent/key.pem".to_string(),
            ),
            (
                "SLUICE__STORAGE__DATA_DIR",
                dir.path().join("data").display().to_string(),
            ),
        ],
        Duration::from_secs(20),
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("server.tls.key_file: cannot read /nonexistent/key.pem"),
        "{stderr}"
    );
    // --check-config opens the files too: it fails as the start would, and passes a good pair.
    let (code, stderr) = check_config(&[
        ("SLUICE__SERVER__TLS__CERT_FILE", cert.display().to_string()),
        (
            "SLUICE__SERVER__TLS__KEY_FILE",
            "/nonexistent/key.pem".into(),
        ),
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("server.tls.key_file: cannot read /nonexistent/key.pem"),
        "{stderr}"
    );
    let (code, stderr) = check_config(&[
        ("SLUICE__SERVER__TLS__CERT_FILE", cert.display().to_string()),
        (
            "SLUICE__SERVER__TLS__KEY_FILE",
            dir.path().join("other.key").display().to_string(),
        ),
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("is not the private key"), "{stderr}");
    let (code, stderr) = check_config(&[
        ("SLUICE__SERVER__TLS__CERT_FILE", cert.display().to_string()),
        ("SLUICE__SERVER__TLS__KEY_FILE", key.display().to_string()),
    ]);
    assert_eq!(code, Some(0), "{stderr}");
}

/// `sluice --check-config` with exactly `env`: its exit code and stderr.
fn check_config(env: &[(&str, String)]) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--check-config")
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes the broker's TLS files where the broker (which drops root for its own user) can
/// read them.
fn broker_files(dir: &Path, ca: &Ca, cert: &ServerCert) -> (PathBuf, String) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut paths = Vec::new();
    for (name, text) in [
        ("ca.pem", ca.pem()),
        ("broker.crt", cert.cert_pem.clone()),
        ("broker.key", cert.key_pem.clone()),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        paths.push(path);
    }
    let conf = format!(
        "cafile {}\ncertfile {}\nkeyfile {}\n",
        paths[0].display(),
        paths[1].display(),
        paths[2].display()
    );
    (paths[0].clone(), conf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_readings_are_stored() {
    let ca = Ca::new("broker CA");
    let dir = tempfile::tempdir().unwrap();
    let (ca_file, tls_conf) = broker_files(dir.path(), &ca, &ca.server_cert("mosquitto"));
    let tls_port = free_port();
    let broker = Mosquitto::start(false, &format!("listener {tls_port} 127.0.0.1\n{tls_conf}"));
    let ca_path = ca_file.clone();
    let app = common::spawn_app_with(|s| {
        s.mqtt.enabled = true;
        s.mqtt.url = format!("mqtts://127.0.0.1:{tls_port}");
        s.mqtt.ca_file = Some(ca_path);
        s.mqtt.client_id = client_id("sluice-tls");
        s.mqtt.keep_alive = Duration::from_secs(5);
    })
    .await;
    wait_until(
        Duration::from_secs(10),
        "sluice subscribed over TLS",
        || async { app.metric("sluice_mqtt_connected", &[]).await == 1.0 },
    )
    .await;

    let payloads: Vec<Vec<u8>> = (1..=5)
        .map(|seq| format!(r#"{{"seq":{seq},"metrics":{{"t":{seq}}}}}"#).into_bytes())
        .collect();
    let ca_arg = ca_file.display().to_string();
    assert!(
        mosquitto_pub(
            tls_port,
            &["--cafile", &ca_arg],
            "devices/tls-mqtt/readings",
            &payloads
        ),
        "mosquitto_pub over TLS failed: {}",
        broker.log()
    );
    wait_until(Duration::from_secs(20), "every reading stored", || async {
        app.stored_seqs("tls-mqtt").await == (1..=5).collect()
    })
    .await;
    app.shutdown().await.expect("graceful shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_with_a_ca_file_that_is_not_one_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, "no certificate here\n").unwrap();
    let (code, stderr) = run_sluice_to_exit(
        &[
            ("SLUICE__MQTT__ENABLED", "true".into()),
            ("SLUICE__MQTT__URL", "mqtts://127.0.0.1:8883".into()),
            ("SLUICE__MQTT__CA_FILE", ca_file.display().to_string()),
            (
                "SLUICE__STORAGE__DATA_DIR",
                dir.path().join("data").display().to_string(),
            ),
        ],
        Duration::from_secs(20),
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("mqtt.ca_file") && stderr.contains("no usable CA certificate"),
        "{stderr}"
    );
    let (code, stderr) = check_config(&[
        ("SLUICE__MQTT__ENABLED", "true".into()),
        ("SLUICE__MQTT__URL", "mqtts://127.0.0.1:8883".into()),
        ("SLUICE__MQTT__CA_FILE", ca_file.display().to_string()),
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("mqtt.ca_file") && stderr.contains("no usable CA certificate"),
        "{stderr}"
    );
    // With MQTT off the file is never opened, by the start or by --check-config.
    let (code, stderr) = check_config(&[
        ("SLUICE__MQTT__URL", "mqtts://127.0.0.1:8883".into()),
        ("SLUICE__MQTT__CA_FILE", "/nonexistent/ca.pem".into()),
    ]);
    assert_eq!(code, Some(0), "{stderr}");
}
