//! `[[rules]]` and `[alerts]` (SPEC §12): the alert rules the rule engine evaluates
//! (`services::rules`) and the settings of the actions that announce their events
//! (`outputs::{webhook, mqtt}`, `/v1/live?type=alert`).
//!
//! Everything about a rule is checked here, once, at start: [`validate`] parses each rule's
//! condition into a [`Condition`] and refuses a bad rule (its name, glob, operator, operand
//! type, duplicate name, or a rule with both or neither of `condition` and `absent_for`)
//! with a message naming the rule, which stops the start with exit code 2. The engine builds
//! its rules with [`RuleSettings::parse`], which cannot fail on a validated rule.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Secret;

/// One `[[rules]]` entry, as written in the configuration.
///
/// ```toml
/// [[rules]]
/// name = "greenhouse-hot"      # [a-z0-9_-], unique
/// devices = "greenhouse-*"     # glob (* and ?) over device ids; default "*"
/// metric = "temperature"
/// condition = "> 30"           # > >= < <= == != against a number, or == != against true/false
/// for = "5m"                   # must hold this long before firing (default 0s)
///
/// [[rules]]
/// name = "device-silent"
/// devices = "*"
/// absent_for = "10m"           # fires when a known device sends nothing for this long
/// ```
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleSettings {
    /// Unique name, `[a-z0-9_-]` (1 to 64 characters): the `rule` label of `sluice_alerts`,
    /// and a level of the MQTT topic.
    pub name: String,
    /// Glob over device ids (`*` any run, `?` one character). Default `*`.
    #[serde(default = "all_devices")]
    pub devices: String,
    /// The metric a threshold rule compares. Required with `condition`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<String>,
    /// `"<op> <operand>"`: `>`, `>=`, `<`, `<=`, `==`, `!=` against a number, or `==`, `!=`
    /// against `true` / `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    /// How long the condition must hold (server time) before the rule fires. Default 0s.
    #[serde(
        rename = "for",
        default,
        with = "crate::config::duration",
        skip_serializing_if = "Duration::is_zero"
    )]
    pub hold_for: Duration,
    /// An absence rule: fires for a known device that has committed nothing for this long.
    #[serde(
        default,
        with = "crate::config::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub absent_for: Option<Duration>,
}

fn all_devices() -> String {
    "*".into()
}

/// A comparison operator of a threshold condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Op {
    /// `>`
    #[serde(rename = ">")]
    Gt,
    /// `>=`
    #[serde(rename = ">=")]
    Ge,
    /// `<`
    #[serde(rename = "<")]
    Lt,
    /// `<=`
    #[serde(rename = "<=")]
    Le,
    /// `==`
    #[serde(rename = "==")]
    Eq,
    /// `!=`
    #[serde(rename = "!=")]
    Ne,
}

impl Op {
    /// The operator as written.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Eq => "==",
            Op::Ne => "!=",
        }
    }
}

/// The right-hand side of a condition.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Operand {
    /// A finite number; compared with integer and float metric values as f64.
    Number(f64),
    /// `true` or `false`; compared with boolean metric values (`==` and `!=` only).
    Bool(bool),
}

/// A parsed `condition`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Condition {
    /// The operator.
    pub op: Op,
    /// What the metric's value is compared with.
    pub operand: Operand,
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.operand {
            Operand::Number(n) => write!(f, "{} {n}", self.op.as_str()),
            Operand::Bool(b) => write!(f, "{} {b}", self.op.as_str()),
        }
    }
}

impl Condition {
    /// Parses `"> 30"`, `">=-1.5"`, `"== true"`: an operator, optional spaces, an operand.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let ops = [
            (">=", Op::Ge),
            ("<=", Op::Le),
            ("==", Op::Eq),
            ("!=", Op::Ne),
            (">", Op::Gt),
            ("<", Op::Lt),
        ];
        let Some((op, rest)) = ops
            .iter()
            .find_map(|(s, op)| t.strip_prefix(s).map(|rest| (*op, rest.trim())))
        else {
            return Err(format!(
                "condition `{text}` has an unknown operator; use one of > >= < <= == != followed by a number or true/false, e.g. \"> 30\""
            ));
        };
        if rest.is_empty() {
            return Err(format!(
                "condition `{text}` has no operand; compare with a number or true/false, e.g. \"{} 30\"",
                op.as_str()
            ));
        }
        let operand = match rest {
            "true" => Operand::Bool(true),
            "false" => Operand::Bool(false),
            _ => match rest.parse::<f64>() {
                Ok(n) if n.is_finite() && !rest.contains(['i', 'I', 'n', 'N']) => {
                    Operand::Number(n)
                }
                _ => {
                    return Err(format!(
                        "condition `{text}`: `{rest}` is neither a number nor true/false (an operator other than > >= < <= == != also lands here)"
                    ))
                }
            },
        };
        if matches!(operand, Operand::Bool(_)) && !matches!(op, Op::Eq | Op::Ne) {
            return Err(format!(
                "condition `{text}`: {} does not apply to a boolean; use == or != with true/false",
                op.as_str()
            ));
        }
        Ok(Self { op, operand })
    }
}

/// What a validated rule tests.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RuleKind {
    /// `metric` compared by `condition`, holding for `for`.
    Threshold {
        /// The metric compared.
        metric: String,
        /// The comparison.
        condition: Condition,
        /// How long it must hold before firing.
        #[serde(rename = "for", with = "crate::config::duration")]
        hold_for: Duration,
    },
    /// No reading committed for `absent_for`.
    Absence {
        /// The silence that fires the rule.
        #[serde(with = "crate::config::duration")]
        absent_for: Duration,
    },
}

/// A rule as the engine and `GET /v1/rules` see it: validated and parsed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rule {
    /// Unique name.
    pub name: String,
    /// The device glob, as written.
    pub devices: String,
    /// What it tests.
    #[serde(flatten)]
    pub kind: RuleKind,
}

impl RuleSettings {
    /// The rule, parsed, or what is wrong with it (without the rule's name, which
    /// [`validate`] adds).
    pub fn parse(&self) -> Result<Rule, String> {
        let n = &self.name;
        if n.is_empty()
            || n.len() > 64
            || !n
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            return Err("the name must be 1 to 64 characters of [a-z0-9_-]".into());
        }
        check_glob(&self.devices)?;
        let kind = match (&self.condition, self.absent_for) {
            (Some(_), Some(_)) => {
                return Err(
                    "has both `condition` and `absent_for`; a rule is either a threshold or an absence rule"
                        .into(),
                )
            }
            (None, None) => {
                return Err(
                    "has neither `condition` (with `metric`) nor `absent_for`; give one of them"
                        .into(),
                )
            }
            (Some(condition), None) => {
                let Some(metric) = &self.metric else {
                    return Err(format!(
                        "condition `{condition}` needs `metric`, the metric it compares"
                    ));
                };
                crate::reading::check_metric_name(metric)
                    .map_err(|e| format!("metric `{metric}`: {e}"))?;
                RuleKind::Threshold {
                    metric: metric.clone(),
                    condition: Condition::parse(condition)?,
                    hold_for: self.hold_for,
                }
            }
            (None, Some(absent_for)) => {
                if let Some(metric) = &self.metric {
                    return Err(format!(
                        "an absence rule watches every reading of a device; remove `metric = \"{metric}\"`"
                    ));
                }
                if !self.hold_for.is_zero() {
                    return Err(
                        "`for` applies to threshold rules; an absence rule has only `absent_for`"
                            .into(),
                    );
                }
                if absent_for.is_zero() {
                    return Err("`absent_for` must be more than 0s".into());
                }
                RuleKind::Absence { absent_for }
            }
        };
        Ok(Rule {
            name: self.name.clone(),
            devices: self.devices.clone(),
            kind,
        })
    }
}

/// A device glob: non-empty, at most 128 characters, only characters of device ids
/// (`[A-Za-z0-9_:-]`) and the wildcards `*` and `?`.
fn check_glob(glob: &str) -> Result<(), String> {
    let bad = glob
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-' | '*' | '?')));
    if glob.is_empty() || glob.len() > crate::reading::MAX_DEVICE_ID_LEN || bad.is_some() {
        return Err(format!(
            "devices glob `{glob}` is not a glob over device ids: use characters of device ids ([A-Za-z0-9_:-]) with * and ?, e.g. \"greenhouse-*\"{}",
            bad.map(|c| format!(" (`{c}` is not allowed)")).unwrap_or_default()
        ));
    }
    Ok(())
}

/// `[alerts]`: where alert events go, and the bounds on the way there.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsSettings {
    /// `http://host:port/path`: each alert event is POSTed there as JSON. Plain HTTP only (no
    /// TLS in this build). Empty: no webhook.
    pub webhook_url: String,
    /// With a secret, each POST carries `X-Sluice-Signature: sha256=<hex>`, the HMAC-SHA256
    /// of the body with this key. Redacted in `--check-config`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_secret: Option<Secret>,
    /// Longest time one POST may take (connect, send, answer) before it counts as failed.
    #[serde(with = "crate::config::duration")]
    pub webhook_timeout: Duration,
    /// Wait before the first retry of a failed POST; doubled at each failure ...
    #[serde(with = "crate::config::duration")]
    pub webhook_backoff_initial: Duration,
    /// ... up to this.
    #[serde(with = "crate::config::duration")]
    pub webhook_backoff_max: Duration,
    /// With MQTT enabled (`mqtt.enabled`), events are published (QoS 1) to
    /// `<mqtt_topic>/<rule>/<device_id>` on a connection of their own. Empty: none.
    pub mqtt_topic: String,
    /// Events waiting for each action (webhook, MQTT). Past it, a new event is dropped and
    /// counted (`sluice_alert_notifications_total{result="dropped"}`): a dead receiver never
    /// holds up rule evaluation or ingest.
    pub queue_capacity: usize,
    /// Committed readings waiting for the rule engine (`sluice_pipeline_queue_depth{stage=
    /// "rules"}`). Past it, a committed batch is not evaluated: its readings are counted
    /// (`sluice_rules_skipped_readings_total`) and skipped; the commit and its ack never wait.
    pub evaluation_queue_readings: usize,
    /// How often absence rules, and the `for` of pending threshold rules, are checked
    /// without waiting for a reading.
    #[serde(with = "crate::config::duration")]
    pub evaluation_interval: Duration,
}

impl Default for AlertsSettings {
    fn default() -> Self {
        Self {
            webhook_url: String::new(),
            webhook_secret: None,
            webhook_timeout: Duration::from_secs(5),
            webhook_backoff_initial: Duration::from_millis(500),
            webhook_backoff_max: Duration::from_secs(30),
            mqtt_topic: "sluice/alerts".into(),
            queue_capacity: 1000,
            evaluation_queue_readings: 100_000,
            evaluation_interval: Duration::from_secs(1),
        }
    }
}

/// A parsed `alerts.webhook_url`: plain HTTP, a host, a port (80 by default) and a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl {
    /// Host name or IP address (without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Path and query, at least `/`.
    pub path: String,
    /// `host[:port]` for the `Host` header.
    pub authority: String,
}

impl WebhookUrl {
    /// Parses `http://host[:port][/path]`.
    pub fn parse(url: &str) -> Result<Self, String> {
        let Some(rest) = url.strip_prefix("http://") else {
            return Err(format!(
                "`{url}` is not an http:// URL (e.g. http://127.0.0.1:9000/alerts; https is not built in)"
            ));
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], &rest[i..]),
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let path = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_string()
        };
        if authority.contains('@') {
            return Err(format!(
                "`{url}`: credentials in the URL are not supported; use alerts.webhook_secret"
            ));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let Some((h, after)) = v6.split_once(']') else {
                return Err(format!("`{url}`: unclosed [ in the host"));
            };
            (h.to_string(), after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (authority.to_string(), None),
            }
        };
        if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') {
            return Err(format!("`{url}` names no host"));
        }
        let port = match port {
            None => 80,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("`{url}`: `{p}` is not a port"))?,
        };
        if path.contains(|c: char| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "`{url}`: the path holds spaces or control characters"
            ));
        }
        Ok(Self {
            host,
            port,
            path,
            authority: authority.to_string(),
        })
    }
}

/// Checks every rule and the `[alerts]` keys. `Err((key, reason))`: the key is `rules` for a
/// rule (the reason starts with `rule `name``) or the dotted `alerts.*` key.
pub fn validate(
    rules: &[RuleSettings],
    alerts: &AlertsSettings,
) -> Result<(), (&'static str, String)> {
    let mut seen = std::collections::HashSet::new();
    for (i, r) in rules.iter().enumerate() {
        let shown = if r.name.is_empty() {
            format!("rule #{} (no name)", i + 1)
        } else {
            format!("rule `{}`", r.name)
        };
        r.parse().map_err(|e| ("rules", format!("{shown}: {e}")))?;
        if !seen.insert(r.name.as_str()) {
            return Err((
                "rules",
                format!("{shown}: the name is used by an earlier rule; names must be unique"),
            ));
        }
    }
    if !alerts.webhook_url.is_empty() {
        WebhookUrl::parse(&alerts.webhook_url).map_err(|e| ("alerts.webhook_url", e))?;
    }
    if alerts.webhook_timeout.is_zero() {
        return Err(("alerts.webhook_timeout", "must be more than 0s".into()));
    }
    if alerts.webhook_backoff_initial.is_zero() {
        return Err((
            "alerts.webhook_backoff_initial",
            "must be more than 0s".into(),
        ));
    }
    if alerts.webhook_backoff_max < alerts.webhook_backoff_initial {
        return Err((
            "alerts.webhook_backoff_max",
            "must be at least alerts.webhook_backoff_initial".into(),
        ));
    }
    if !alerts.mqtt_topic.is_empty()
        && (alerts.mqtt_topic.contains(['+', '#', '\0']) || alerts.mqtt_topic.ends_with('/'))
    {
        return Err((
            "alerts.mqtt_topic",
            format!(
                "`{}` is not a topic prefix: no wildcards (+ #), no trailing /",
                alerts.mqtt_topic
            ),
        ));
    }
    if alerts.queue_capacity == 0 {
        return Err(("alerts.queue_capacity", "must be at least 1".into()));
    }
    if alerts.evaluation_queue_readings == 0
        || alerts.evaluation_queue_readings > tokio::sync::Semaphore::MAX_PERMITS
    {
        return Err((
            "alerts.evaluation_queue_readings",
            "must be at least 1".into(),
        ));
    }
    if alerts.evaluation_interval < Duration::from_millis(10) {
        return Err(("alerts.evaluation_interval", "must be at least 10ms".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str) -> RuleSettings {
        RuleSettings {
            name: name.into(),
            devices: "*".into(),
            metric: Some("t".into()),
            condition: Some("> 30".into()),
            hold_for: Duration::ZERO,
            absent_for: None,
        }
    }

    #[test]
    fn conditions_parse() {
        let c = Condition::parse("> 30").unwrap();
        assert_eq!((c.op, c.operand), (Op::Gt, Operand::Number(30.0)));
        let c = Condition::parse(">=-1.5").unwrap();
        assert_eq!((c.op, c.operand), (Op::Ge, Operand::Number(-1.5)));
        let c = Condition::parse(" == true ").unwrap();
        assert_eq!((c.op, c.operand), (Op::Eq, Operand::Bool(true)));
        assert_eq!(Condition::parse("!= false").unwrap().op, Op::Ne);
        assert_eq!(Condition::parse("<= 1e3").unwrap().to_string(), "<= 1000");
        for bad in [
            "=> 3", "~ 3", "30", ">", "> hot", "> true", "< false", "> NaN", "> inf", "= 3",
        ] {
            assert!(Condition::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_rules_are_named() {
        let check =
            |rules: Vec<RuleSettings>| validate(&rules, &AlertsSettings::default()).unwrap_err().1;
        let mut r = rule("hot");
        r.condition = Some("=> 3".into());
        assert!(check(vec![r]).contains("rule `hot`: condition `=> 3` has an unknown operator"));
        let mut r = rule("hot");
        r.devices = "green[1-2]".into();
        assert!(check(vec![r]).contains("rule `hot`: devices glob"));
        let e = check(vec![rule("a"), rule("a")]);
        assert!(e.contains("rule `a`") && e.contains("unique"), "{e}");
        assert!(check(vec![rule("Hot!")]).contains("rule `Hot!`: the name"));
        let mut r = rule("hot");
        r.condition = Some("> true".into());
        assert!(check(vec![r]).contains("does not apply to a boolean"));
        let mut r = rule("both");
        r.absent_for = Some(Duration::from_secs(1));
        assert!(check(vec![r]).contains("rule `both`: has both"));
        let mut r = rule("neither");
        r.condition = None;
        assert!(check(vec![r]).contains("rule `neither`: has neither"));
        let mut r = rule("nometric");
        r.metric = None;
        assert!(check(vec![r]).contains("needs `metric`"));
        let ok = RuleSettings {
            name: "quiet".into(),
            devices: "*".into(),
            metric: None,
            condition: None,
            hold_for: Duration::ZERO,
            absent_for: Some(Duration::from_secs(600)),
        };
        validate(&[ok, rule("hot")], &AlertsSettings::default()).unwrap();
    }

    #[test]
    fn webhook_urls() {
        let u = WebhookUrl::parse("http://127.0.0.1:9000/a/b?x=1").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("127.0.0.1", 9000, "/a/b?x=1")
        );
        let u = WebhookUrl::parse("http://hooks.local").unwrap();
        assert_eq!(
            (u.port, u.path.as_str(), u.authority.as_str()),
            (80, "/", "hooks.local")
        );
        let u = WebhookUrl::parse("http://[::1]:81/x").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 81));
        for bad in [
            "https://h/x",
            "http://",
            "http://h:0/",
            "http://h:x/",
            "http://u:p@h/",
            "ftp://h",
        ] {
            assert!(WebhookUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
