//! TLS at the edges (SPEC §8): the HTTP listener's certificate, for HTTPS and WSS, reloaded
//! when its files change; and the roots the MQTT client trusts for `mqtts://`.
//!
//! ```text
//! server.tls.cert_file ─┐ read at start (exit 2 if unusable), then every reload_interval
//! server.tls.key_file  ─┴▶ changed? ─▶ CertifiedKey ─▶ CurrentCert (RwLock<Arc<_>>)
//!                           bad: keep the old one,            │ resolve(): once per handshake
//!                           log + count                       ▼
//! accept loop ─▶ connection task: Handshake::accept (≤ server.request_timeout) ─▶ hyper
//! ```
//!
//! A handshake takes the current certificate when it starts, so a reload reaches new
//! connections only; open ones keep theirs. Every TLS object in the build uses one rustls and
//! one crypto provider, ring (ARCHITECTURE.md, "TLS").

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use prometheus::IntCounter;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, ServerSettings};
use crate::telemetry::metrics::Metrics;

/// The key that names the certificate file in errors.
const CERT_KEY: &str = "server.tls.cert_file";
/// The key that names the private key file in errors.
const KEY_KEY: &str = "server.tls.key_file";

/// The build's one crypto provider. Every config names it explicitly rather than relying on a
/// process-wide default, so no code path can pick another.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why a certificate or key file cannot be used, naming its configuration key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct FileError {
    /// `server.tls.cert_file` or `server.tls.key_file`.
    pub key: &'static str,
    /// What is wrong, with the file's path.
    pub reason: String,
}

impl From<FileError> for ConfigError {
    fn from(e: FileError) -> Self {
        ConfigError::Invalid {
            key: e.key,
            reason: e.reason,
        }
    }
}

/// The two files' bytes as read at one check: compared with the previous check's to see
/// whether anything changed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pem {
    /// `server.tls.cert_file`.
    cert: Vec<u8>,
    /// `server.tls.key_file`.
    key: Vec<u8>,
}

/// The certificate files, where they are.
#[derive(Debug, Clone)]
struct Files {
    /// `server.tls.cert_file`.
    cert: PathBuf,
    /// `server.tls.key_file`.
    key: PathBuf,
}

impl Files {
    /// Reads both files. Off the runtime's threads: `tokio::fs` runs on the blocking pool.
    async fn read(&self) -> Result<Pem, FileError> {
        let read = |key: &'static str, path: &Path| {
            let path = path.to_path_buf();
            async move {
                tokio::fs::read(&path).await.map_err(|e| FileError {
                    key,
                    reason: format!("cannot read {}: {e}", path.display()),
                })
            }
        };
        Ok(Pem {
            cert: read(CERT_KEY, &self.cert).await?,
            key: read(KEY_KEY, &self.key).await?,
        })
    }

    /// Parses a certificate chain and its private key, and checks that they belong together.
    fn parse(&self, pem: &Pem) -> Result<Arc<CertifiedKey>, FileError> {
        let cert_error = |reason: String| FileError {
            key: CERT_KEY,
            reason: format!("{}: {reason}", self.cert.display()),
        };
        let key_error = |reason: String| FileError {
            key: KEY_KEY,
            reason: format!("{}: {reason}", self.key.display()),
        };
        let chain = CertificateDer::pem_slice_iter(&pem.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| cert_error(format!("not a PEM certificate chain: {e}")))?;
        if chain.is_empty() {
            return Err(cert_error(
                "holds no CERTIFICATE block (PEM: the server's certificate, then its intermediates)"
                    .into(),
            ));
        }
        let key = PrivateKeyDer::from_pem_slice(&pem.key)
            .map_err(|e| key_error(format!("no private key (PEM: PKCS#8, PKCS#1 or SEC1): {e}")))?;
        CertifiedKey::from_der(chain, key, &provider())
            .map(Arc::new)
            .map_err(|e| match e {
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
                    cert_error(format!("not a usable certificate: {e}"))
                }
                rustls::Error::InconsistentKeys(_) => key_error(format!(
                    "is not the private key of the certificate in {}",
                    self.cert.display()
                )),
                e => key_error(format!("not a usable private key: {e}")),
            })
    }
}

/// The certificate new handshakes get. Swapped whole on reload; a handshake holds its own
/// `Arc`, so open connections are untouched.
#[derive(Debug)]
struct CurrentCert(RwLock<Arc<CertifiedKey>>);

impl CurrentCert {
    fn get(&self) -> Arc<CertifiedKey> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, cert: Arc<CertifiedKey>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = cert;
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// What the files held at the last check: unchanged files are not parsed again, and a bad
/// pair is reported once, not at every check.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// Read; loaded or refused.
    Files(Pem),
    /// Could not be read, for this reason.
    Unreadable(FileError),
}

/// The listener's TLS: built at start from `[server.tls]`, then [`ServerTls::watch`]es the
/// files for as long as the listener runs.
pub struct ServerTls {
    /// Where the certificate and key are.
    files: Files,
    /// Shared with the acceptor's config: what [`ServerTls::watch`] replaces.
    current: Arc<CurrentCert>,
    /// Hands each accepted connection the current certificate.
    acceptor: TlsAcceptor,
    /// At the last check.
    seen: Seen,
    /// `server.tls.reload_interval`.
    interval: Duration,
    /// `server.request_timeout`: bounds each handshake.
    handshake_timeout: Duration,
    /// `sluice_tls_cert_reloads_total{result="ok"}`.
    reloaded: IntCounter,
    /// `sluice_tls_cert_reloads_total{result="error"}`.
    refused: IntCounter,
    /// `sluice_tls_handshake_failures_total{reason="timeout"}`.
    handshake_timeouts: IntCounter,
    /// `sluice_tls_handshake_failures_total{reason="error"}`.
    handshake_errors: IntCounter,
}

impl ServerTls {
    /// Reads the certificate and key when `[server.tls]` names them (`None` when it does
    /// not). A file that cannot be read or used stops the start: the error names its key.
    pub async fn load(
        server: &ServerSettings,
        metrics: &Metrics,
    ) -> Result<Option<Self>, ConfigError> {
        let Some((cert, key)) = server.tls.files() else {
            return Ok(None);
        };
        let files = Files {
            cert: cert.clone(),
            key: key.clone(),
        };
        let pem = files.read().await?;
        let certified = files.parse(&pem)?;
        let current = Arc::new(CurrentCert(RwLock::new(certified)));
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ConfigError::Invalid {
                key: CERT_KEY,
                reason: format!("cannot set up TLS: {e}"),
            })?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        // The listener speaks HTTP/1.1 only (WebSocket upgrades included); saying so lets a
        // client that offers h2 first fall back instead of failing after the handshake.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let reloads = &metrics.tls_cert_reloads;
        let failures = &metrics.tls_handshake_failures;
        Ok(Some(Self {
            files,
            current,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            seen: Seen::Files(pem),
            interval: server.tls.reload_interval,
            handshake_timeout: server.request_timeout,
            reloaded: reloads.with_label_values(&["ok"]),
            refused: reloads.with_label_values(&["error"]),
            handshake_timeouts: failures.with_label_values(&["timeout"]),
            handshake_errors: failures.with_label_values(&["error"]),
        }))
    }

    /// What each connection task uses to accept TLS.
    pub fn handshake(&self) -> Handshake {
        Handshake {
            acceptor: self.acceptor.clone(),
            timeout: self.handshake_timeout,
            timeouts: self.handshake_timeouts.clone(),
            errors: self.handshake_errors.clone(),
        }
    }

    /// Reads the files every `reload_interval` until `stop`, and serves a changed pair to new
    /// connections once it parses and matches (see [`ServerTls::check`]).
    pub async fn watch(mut self, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(self.interval) => {}
                () = stop.cancelled() => return,
            }
            self.check().await;
        }
    }

    /// One check: if the files' contents differ from the last check's, load them; a pair that
    /// cannot be used leaves the current certificate in place and is logged and counted once.
    /// Contents, not modification times: a Kubernetes Secret volume swaps a symlink (the
    /// files' own times may not change) and two writes within a second can share an mtime.
    async fn check(&mut self) {
        let now = match self.files.read().await {
            Ok(pem) => Seen::Files(pem),
            Err(e) => Seen::Unreadable(e),
        };
        if now == self.seen {
            return;
        }
        match &now {
            Seen::Files(pem) => match self.files.parse(pem) {
                Ok(certified) => {
                    self.current.set(certified);
                    self.reloaded.inc();
                    tracing::info!(
                        cert_file = %self.files.cert.display(),
                        "TLS certificate reloaded; new connections get it"
                    );
                }
                Err(e) => self.refuse(&e),
            },
            Seen::Unreadable(e) => self.refuse(e),
        }
        self.seen = now;
    }

    /// Logs and counts a changed pair that cannot be used.
    fn refuse(&self, e: &FileError) {
        self.refused.inc();
        tracing::error!(
            error = %e,
            "TLS certificate files changed but cannot be used; still serving the previous certificate"
        );
    }
}

/// Accepts TLS on one connection, in that connection's task: a slow or silent client holds
/// its own task (and connection slot) for at most `server.request_timeout`, never the accept
/// loop.
#[derive(Clone)]
pub struct Handshake {
    /// The listener's acceptor, with the current certificate.
    acceptor: TlsAcceptor,
    /// `server.request_timeout`.
    timeout: Duration,
    /// `sluice_tls_handshake_failures_total{reason="timeout"}`.
    timeouts: IntCounter,
    /// `sluice_tls_handshake_failures_total{reason="error"}`.
    errors: IntCounter,
}

impl Handshake {
    /// The TLS stream, or `None` (counted) if the handshake fails or times out. Failures are
    /// logged at debug only: scanners and plain-HTTP clients on an open port are routine.
    pub async fn accept<IO>(&self, stream: IO) -> Option<TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        match tokio::time::timeout(self.timeout, self.acceptor.accept(stream)).await {
            Ok(Ok(tls)) => Some(tls),
            Ok(Err(e)) => {
                self.errors.inc();
                tracing::debug!(error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                self.timeouts.inc();
                tracing::debug!("TLS handshake timed out (server.request_timeout)");
                None
            }
        }
    }
}

/// Opens and checks every TLS file the configuration names, as a start would: the server's
/// certificate and key (`server.tls.cert_file`, `key_file`: readable, PEM, and a pair) and
/// `mqtt.ca_file` when `mqtt.enabled` (a PEM bundle with at least one usable CA). For
/// `--check-config`, so that a configuration it passes does not then stop the start with exit
/// 2. The error names the key.
pub fn check_files(settings: &crate::config::Settings) -> Result<(), ConfigError> {
    if let Some((cert, key)) = settings.server.tls.files() {
        let files = Files {
            cert: cert.clone(),
            key: key.clone(),
        };
        let read = |key: &'static str, path: &Path| {
            std::fs::read(path).map_err(|e| FileError {
                key,
                reason: format!("cannot read {}: {e}", path.display()),
            })
        };
        let pem = Pem {
            cert: read(CERT_KEY, cert)?,
            key: read(KEY_KEY, key)?,
        };
        files.parse(&pem)?;
    }
    // Opened only when MQTT connects (the source and the alert action need `mqtt.enabled`).
    if let Some(ca_file) = settings
        .mqtt
        .ca_file
        .as_ref()
        .filter(|_| settings.mqtt.enabled)
    {
        client_config(ca_file).map_err(|reason| ConfigError::Invalid {
            key: "mqtt.ca_file",
            reason,
        })?;
    }
    Ok(())
}

/// The MQTT client's TLS settings for `mqtts://`: the CAs in `ca_file` (PEM), nothing else,
/// and the build's one provider. The error says what is wrong with the file.
pub fn client_config(ca_file: &Path) -> Result<Arc<ClientConfig>, String> {
    let shown = ca_file.display();
    let certs = CertificateDer::pem_file_iter(ca_file)
        .map_err(|e| format!("cannot read {shown}: {e}"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{shown}: not a PEM bundle of CA certificates: {e}"))?;
    let mut roots = RootCertStore::empty();
    let (added, _unusable) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!(
            "{shown} holds no usable CA certificate (PEM CERTIFICATE blocks)"
        ));
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for `localhost`: (certificate PEM, key PEM).
    fn self_signed() -> (String, String) {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    fn write(dir: &Path, cert: &str, key: &str) {
        std::fs::write(dir.join("tls.crt"), cert).unwrap();
        std::fs::write(dir.join("tls.key"), key).unwrap();
    }

    async fn load(dir: &Path, metrics: &Metrics) -> Result<Option<ServerTls>, ConfigError> {
        let mut server = ServerSettings::default();
        server.tls.cert_file = Some(dir.join("tls.crt"));
        server.tls.key_file = Some(dir.join("tls.key"));
        ServerTls::load(&server, metrics).await
    }

    fn key_of(e: ConfigError) -> &'static str {
        match e {
            ConfigError::Invalid { key, .. } => key,
            e => panic!("{e}"),
        }
    }

    #[tokio::test]
    async fn errors_name_the_file_at_fault() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Metrics::new();
        assert!(ServerTls::load(&ServerSettings::default(), &metrics)
            .await
            .unwrap()
            .is_none());
        let (cert, key) = self_signed();
        let (_, other_key) = self_signed();
        write(dir.path(), "", &key);
        assert_eq!(
            key_of(load(dir.path(), &metrics).await.err().unwrap()),
            CERT_KEY
        );
        write(dir.path(), &cert, "-----BEGIN NOTHING-----\n");
        assert_eq!(
            key_of(load(dir.path(), &metrics).await.err().unwrap()),
            KEY_KEY
        );
        write(dir.path(), &cert, &other_key);
        let e = load(dir.path(), &metrics).await.err().unwrap();
        assert!(e.to_string().contains("is not the private key"), "{e}");
        assert_eq!(key_of(e), KEY_KEY);
        write(dir.path(), &cert, &key);
        assert!(load(dir.path(), &metrics).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_change_is_loaded_once_and_a_bad_one_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Metrics::new();
        let (cert, key) = self_signed();
        write(dir.path(), &cert, &key);
        let mut tls = load(dir.path(), &metrics).await.unwrap().unwrap();
        let first = tls.current.get();
        let count = |result: &str| metrics.tls_cert_reloads.with_label_values(&[result]).get();

        tls.check().await;
        assert!(
            Arc::ptr_eq(&first, &tls.current.get()),
            "unchanged files are not reloaded"
        );

        write(dir.path(), "garbage", &key);
        tls.check().await;
        tls.check().await;
        assert_eq!((count("ok"), count("error")), (0, 1));
        assert!(Arc::ptr_eq(&first, &tls.current.get()));

        std::fs::remove_file(dir.path().join("tls.key")).unwrap();
        tls.check().await;
        tls.check().await;
        assert_eq!((count("ok"), count("error")), (0, 2));

        let (cert, key) = self_signed();
        write(dir.path(), &cert, &key);
        tls.check().await;
        assert_eq!((count("ok"), count("error")), (1, 2));
        assert!(!Arc::ptr_eq(&first, &tls.current.get()));
    }

    #[test]
    fn the_mqtt_client_trusts_only_a_usable_ca_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        assert!(client_config(&path).unwrap_err().contains("cannot read"));
        std::fs::write(&path, "nothing\n").unwrap();
        assert!(client_config(&path)
            .unwrap_err()
            .contains("no usable CA certificate"));
        std::fs::write(&path, self_signed().0).unwrap();
        assert!(client_config(&path).is_ok());
    }
}
