//! `[mqtt]`: the MQTT source's keys (SPEC §6, §8), parsed and checked here, once, so the
//! source in `crate::ingest::mqtt` only reads them. Config imports no component.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{LimitSettings, Secret};

/// Largest packet Sluice sends (the MQTT maximum); dead letters are bounded by the input limits.
pub const MAX_OUTGOING_PACKET: usize = 268_435_455;

/// `[mqtt]`: the MQTT source (SPEC §6).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MqttSettings {
    /// Subscribe to a broker at all.
    pub enabled: bool,
    /// `mqtt://host:port`, or `mqtts://host:port` for TLS (with [`Self::ca_file`]).
    pub url: String,
    /// PEM bundle of the CAs that may sign the broker's certificate; required with `mqtts://`.
    /// For a broker with a publicly trusted certificate, the system bundle
    /// (`/etc/ssl/certs/ca-certificates.crt`). Read once at start.
    pub ca_file: Option<PathBuf>,
    /// Client id; stable across restarts so the broker keeps the persistent session.
    pub client_id: String,
    /// Topic filter; its `+` level is the device id.
    pub topic: String,
    /// Shared-subscription group (`$share/<group>/<topic>`); empty for a plain subscription.
    pub shared_group: String,
    /// MQTT keep-alive interval.
    #[serde(with = "crate::config::duration")]
    pub keep_alive: Duration,
    /// Broker user name, if the broker wants one.
    pub username: Option<String>,
    /// Broker password. Never logged or printed.
    pub password: Option<Secret>,
    /// Payloads that can never be accepted are republished to `<this>/<device_id>`.
    pub dead_letter_topic: String,
    /// Most messages Sluice holds taken but not yet PUBACKed (parsing, waiting for admission or
    /// for their commit). MQTT 3.1.1 lets only the broker choose its in-flight window, and
    /// brokers overshoot it, so Sluice bounds what it takes: past this (or
    /// `max_unacked_bytes`) a message is left unacknowledged, and the session is resumed once
    /// the held ones are answered, so that the broker redelivers it. At most (and by default)
    /// 65535, the number of MQTT packet ids.
    pub max_unacked: usize,
    /// Most payload bytes held in those messages: the memory knob. Lower saves memory; when a
    /// broker floods Sluice with a backlog, lower also means more resumed sessions and more
    /// resending by the broker. One message is always taken when none is held, however large
    /// (up to `limits.max_body_bytes`, beyond which it is dead-lettered).
    pub max_unacked_bytes: usize,
    /// Largest MQTT packet Sluice reads. Payloads over `limits.max_body_bytes` and up to this
    /// are dead-lettered; a larger packet breaks the connection (and the broker redelivers it),
    /// so keep the broker's `max_packet_size` / `message_size_limit` at or below it.
    pub max_packet_bytes: usize,
}

/// `sluice-<hostname>`, stable for a given host (or pod, whose hostname is its name).
fn default_client_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("sluice-{host}")
}

impl Default for MqttSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            url: "mqtt://127.0.0.1:1883".into(),
            ca_file: None,
            client_id: default_client_id(),
            topic: "devices/+/readings".into(),
            shared_group: "sluice".into(),
            keep_alive: Duration::from_secs(30),
            username: None,
            password: None,
            dead_letter_topic: "sluice/rejected".into(),
            max_unacked: 65_535,
            max_unacked_bytes: 32 * 1024 * 1024,
            max_packet_bytes: 16 * 1024 * 1024,
        }
    }
}

/// Where the broker listens, from `mqtt.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    /// Host name or IP address.
    pub host: String,
    /// TCP port (1883 when the URL gives none, 8883 for TLS).
    pub port: u16,
    /// `mqtts://`: TLS, with the broker's certificate checked against `mqtt.ca_file` and
    /// `host` (a DNS name or IP address in the certificate).
    pub tls: bool,
}

/// Parses `mqtt://host[:port]` (or `tcp://`), or `mqtts://host[:port]` (or `ssl://`) for TLS.
pub fn parse_url(url: &str) -> Result<BrokerAddr, String> {
    let (rest, tls) = if let Some(r) = url.strip_prefix("mqtt://") {
        (r, false)
    } else if let Some(r) = url.strip_prefix("tcp://") {
        (r, false)
    } else if let Some(r) = url.strip_prefix("mqtts://") {
        (r, true)
    } else if let Some(r) = url.strip_prefix("ssl://") {
        (r, true)
    } else {
        return Err(format!(
            "`{url}` must look like mqtt://host:port (or mqtts://host:port for TLS)"
        ));
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') || rest.contains('@') {
        return Err(format!(
            "`{url}` must look like mqtt://host:port (credentials go in mqtt.username / mqtt.password)"
        ));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("`{url}`: unclosed IPv6 bracket"))?;
        match after.strip_prefix(':') {
            Some(p) => (host, Some(p)),
            None if after.is_empty() => (host, None),
            None => return Err(format!("`{url}` must look like mqtt://host:port")),
        }
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    if host.is_empty() {
        return Err(format!("`{url}` has no host"));
    }
    let port = match port {
        None if tls => 8883,
        None => 1883,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("`{url}`: `{p}` is not a port"))?,
    };
    Ok(BrokerAddr {
        host: host.to_owned(),
        port,
        tls,
    })
}

/// The index of the `+` level of `mqtt.topic`: the device id's place in each topic.
pub fn device_level(filter: &str) -> Result<usize, String> {
    if filter.starts_with('$') {
        return Err(format!(
            "`{filter}` must not start with `$` (set mqtt.shared_group for a shared subscription)"
        ));
    }
    let mut found = None;
    for (i, level) in filter.split('/').enumerate() {
        if level == "+" {
            if found.is_some() {
                return Err(format!(
                    "`{filter}` has more than one `+` level; exactly one (the device id) is allowed"
                ));
            }
            found = Some(i);
        } else if level.contains('+') || level.contains('#') {
            return Err(format!(
                "`{filter}`: level `{level}` has a wildcard; only one whole `+` level (the device id) is allowed"
            ));
        }
    }
    found.ok_or_else(|| format!("`{filter}` needs one `+` level for the device id"))
}

/// Whether a topic filter with `+` levels only matches `topic`.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    let (f, t): (Vec<&str>, Vec<&str>) = (filter.split('/').collect(), topic.split('/').collect());
    f.len() == t.len() && f.iter().zip(&t).all(|(f, t)| *f == "+" || f == t)
}

/// Checks the `[mqtt]` keys; the error names the key. Called from [`super::Settings::validate`].
pub fn validate(mqtt: &MqttSettings, limits: &LimitSettings) -> Result<(), (&'static str, String)> {
    let addr = parse_url(&mqtt.url).map_err(|e| ("mqtt.url", e))?;
    match (&mqtt.ca_file, addr.tls) {
        (None, true) => {
            return Err((
                "mqtt.ca_file",
                format!(
                    "is required with `{}`: a PEM bundle of the CAs that sign the broker's certificate (for a public CA, /etc/ssl/certs/ca-certificates.crt)",
                    mqtt.url
                ),
            ))
        }
        // Not a silent downgrade: whoever set a CA meant the connection to be encrypted.
        (Some(_), false) => {
            return Err((
                "mqtt.url",
                format!(
                    "`{}` is plain MQTT but mqtt.ca_file is set; use mqtts://host:port for TLS, or remove mqtt.ca_file",
                    mqtt.url
                ),
            ))
        }
        _ => {}
    }
    if mqtt.client_id.is_empty() {
        return Err((
            "mqtt.client_id",
            "must not be empty: the persistent session is keyed by it".into(),
        ));
    }
    device_level(&mqtt.topic).map_err(|e| ("mqtt.topic", e))?;
    if mqtt
        .shared_group
        .chars()
        .any(|c| matches!(c, '/' | '+' | '#'))
    {
        return Err((
            "mqtt.shared_group",
            format!("`{}` must not contain / + or #", mqtt.shared_group),
        ));
    }
    let ka = mqtt.keep_alive;
    if ka < Duration::from_secs(1) || ka > Duration::from_secs(u16::MAX as u64) {
        return Err((
            "mqtt.keep_alive",
            format!(
                "{} must be from 1s to 65535s",
                crate::config::duration::format(ka)
            ),
        ));
    }
    let dl = &mqtt.dead_letter_topic;
    if dl.is_empty() || dl.contains('+') || dl.contains('#') || dl.starts_with('$') {
        return Err((
            "mqtt.dead_letter_topic",
            format!("`{dl}` must be a non-empty topic without wildcards or a leading $"),
        ));
    }
    if filter_matches(&mqtt.topic, &format!("{dl}/x")) {
        return Err((
            "mqtt.dead_letter_topic",
            format!(
                "`{dl}/<device_id>` matches mqtt.topic `{}`: dead letters would be read back",
                mqtt.topic
            ),
        ));
    }
    if mqtt.max_unacked == 0 || mqtt.max_unacked > u16::MAX as usize {
        return Err((
            "mqtt.max_unacked",
            format!("{} must be from 1 to 65535", mqtt.max_unacked),
        ));
    }
    if mqtt.max_unacked_bytes == 0 {
        return Err(("mqtt.max_unacked_bytes", "must be at least 1".into()));
    }
    if mqtt.max_packet_bytes <= limits.max_body_bytes || mqtt.max_packet_bytes > MAX_OUTGOING_PACKET
    {
        return Err((
            "mqtt.max_packet_bytes",
            format!(
                "{} must be more than limits.max_body_bytes ({}) and at most {MAX_OUTGOING_PACKET}, so that oversized payloads can still be read and dead-lettered",
                mqtt.max_packet_bytes, limits.max_body_bytes
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("mqtt://127.0.0.1:1884").unwrap(),
            BrokerAddr {
                host: "127.0.0.1".into(),
                port: 1884,
                tls: false,
            }
        );
        assert_eq!(parse_url("tcp://broker").unwrap().port, 1883);
        assert_eq!(parse_url("mqtt://[::1]:9").unwrap().host, "::1");
        let tls = parse_url("mqtts://broker.example").unwrap();
        assert!(tls.tls);
        assert_eq!(tls.port, 8883);
        assert_eq!(parse_url("ssl://b:9").unwrap().port, 9);
        assert!(!parse_url("mqtt://b").unwrap().tls);
        assert!(parse_url("http://b").is_err());
        assert!(parse_url("mqtt://b:0").is_err());
        assert!(parse_url("mqtt://u:p@b:1").is_err());
        assert!(parse_url("mqtt://").is_err());
    }

    #[test]
    fn topic_filters() {
        assert_eq!(device_level("devices/+/readings").unwrap(), 1);
        assert_eq!(device_level("+").unwrap(), 0);
        assert!(device_level("devices/readings").is_err());
        assert!(device_level("a/+/+").is_err());
        assert!(device_level("a/+/#").is_err());
        assert!(device_level("$share/g/a/+").is_err());
        assert!(filter_matches("devices/+/readings", "devices/x/readings"));
        assert!(!filter_matches("devices/+/readings", "devices/x"));
    }

    #[test]
    fn validation_names_the_key() {
        let limits = LimitSettings::default();
        let ok = MqttSettings::default();
        assert!(validate(&ok, &limits).is_ok());
        let bad = |f: fn(&mut MqttSettings)| {
            let mut m = MqttSettings::default();
            f(&mut m);
            validate(&m, &limits).unwrap_err().0
        };
        assert_eq!(bad(|m| m.url = "mqtts://x".into()), "mqtt.ca_file");
        assert_eq!(bad(|m| m.ca_file = Some("ca.pem".into())), "mqtt.url");
        let tls = MqttSettings {
            url: "mqtts://broker:8883".into(),
            ca_file: Some("ca.pem".into()),
            ..MqttSettings::default()
        };
        assert!(validate(&tls, &limits).is_ok());
        assert_eq!(bad(|m| m.url = "mqtt+ws://x".into()), "mqtt.url");
        assert_eq!(bad(|m| m.client_id.clear()), "mqtt.client_id");
        assert_eq!(bad(|m| m.topic = "devices/#".into()), "mqtt.topic");
        assert_eq!(bad(|m| m.shared_group = "a/b".into()), "mqtt.shared_group");
        assert_eq!(
            bad(|m| m.keep_alive = Duration::from_millis(10)),
            "mqtt.keep_alive"
        );
        assert_eq!(bad(|m| m.max_unacked = 0), "mqtt.max_unacked");
        assert_eq!(bad(|m| m.max_packet_bytes = 1024), "mqtt.max_packet_bytes");
        assert_eq!(
            bad(|m| {
                m.topic = "+/+".into();
            }),
            "mqtt.topic"
        );
        assert_eq!(
            bad(|m| {
                m.topic = "devices/+".into();
                m.dead_letter_topic = "devices".into();
            }),
            "mqtt.dead_letter_topic"
        );
    }
}
