//! `[server.tls]`: the HTTP listener's certificate (SPEC §8). Parsed and checked here; the
//! files themselves are read by `crate::tls` at start (an unreadable or invalid one stops the
//! start with exit code 2, naming the key) and again whenever they change.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[server.tls]`: with both files set, the listener serves HTTPS and WSS instead of plain
/// HTTP and WebSocket; with neither, plain.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerTlsSettings {
    /// PEM file: the server's certificate first, then its intermediates.
    pub cert_file: Option<PathBuf>,
    /// PEM file: the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// How often the two files are read again to see whether they changed (cert-manager
    /// rotates them in place): a changed pair is served to new connections from then on.
    #[serde(with = "crate::config::duration")]
    pub reload_interval: Duration,
}

impl Default for ServerTlsSettings {
    fn default() -> Self {
        Self {
            cert_file: None,
            key_file: None,
            reload_interval: Duration::from_secs(10),
        }
    }
}

impl ServerTlsSettings {
    /// The certificate and key files, when TLS is on.
    pub fn files(&self) -> Option<(&PathBuf, &PathBuf)> {
        self.cert_file.as_ref().zip(self.key_file.as_ref())
    }
}

/// Checks `[server.tls]`: both files or neither. The error names the key. Called from
/// [`super::Settings::validate`].
pub fn validate(tls: &ServerTlsSettings) -> Result<(), (&'static str, String)> {
    match (&tls.cert_file, &tls.key_file) {
        (Some(_), None) => {
            return Err((
                "server.tls.key_file",
                "is required with server.tls.cert_file (the certificate's private key, PEM)".into(),
            ))
        }
        (None, Some(_)) => {
            return Err((
                "server.tls.cert_file",
                "is required with server.tls.key_file (the certificate chain, PEM)".into(),
            ))
        }
        _ => {}
    }
    if tls.reload_interval < Duration::from_secs(1) {
        return Err((
            "server.tls.reload_interval",
            format!(
                "is {}; must be at least 1s",
                crate::config::duration::format(tls.reload_interval)
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_files_or_neither() {
        let mut tls = ServerTlsSettings::default();
        assert!(validate(&tls).is_ok());
        assert!(tls.files().is_none());
        tls.cert_file = Some("cert.pem".into());
        assert_eq!(validate(&tls).unwrap_err().0, "server.tls.key_file");
        tls.key_file = Some("key.pem".into());
        assert!(validate(&tls).is_ok());
        assert!(tls.files().is_some());
        tls.cert_file = None;
        assert_eq!(validate(&tls).unwrap_err().0, "server.tls.cert_file");
        let tls = ServerTlsSettings {
            reload_interval: Duration::from_millis(10),
            ..Default::default()
        };
        assert_eq!(validate(&tls).unwrap_err().0, "server.tls.reload_interval");
    }
}
