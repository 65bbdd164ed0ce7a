//! `[auth]` and `[rate_limit]` (SPEC §11): who may send and read, and how fast each device may
//! send.
//!
//! Read by `access` (tokens and the per-device limiter) and by the handlers through it.
//! [`validate`] checks every key once at start; a bad value stops the start with exit code 2
//! and names the key. The rate is parsed once into a [`Rate`] with [`RateLimitSettings::rate`],
//! which cannot fail on validated settings.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Secret;

/// Shortest accepted `auth.admin_token`: 32 characters, about 190 bits of a random base64
/// string. A short admin token could be guessed online.
pub const MIN_ADMIN_TOKEN_LEN: usize = 32;

/// `auth.mode`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// No credentials: anyone who reaches the port may write and read any device. The default,
    /// so that `cargo run` needs no configuration.
    #[default]
    None,
    /// Every ingest and query request carries a token (SPEC §11).
    Token,
}

/// `[auth]`.
///
/// ```toml
/// [auth]
/// mode = "token"                  # "none" (default) or "token"
/// admin_token = "…32+ characters…" # required with mode = "token"; redacted in --check-config
/// ```
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// `none` or `token`.
    pub mode: AuthMode,
    /// The secret of `/v1/admin/tokens` (`Authorization: Bearer <admin_token>`). Required with
    /// `mode = "token"`; optional with `none`, where setting it lets an operator issue tokens
    /// before turning checks on. At least [`MIN_ADMIN_TOKEN_LEN`] characters.
    pub admin_token: Option<Secret>,
    /// Most valid tokens kept in memory (each about 200 bytes). Past it, expired entries go,
    /// then the whole cache; a token not in it costs one store lookup by hash.
    pub token_cache: usize,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            mode: AuthMode::None,
            admin_token: None,
            token_cache: 100_000,
        }
    }
}

/// `[rate_limit]`.
///
/// ```toml
/// [rate_limit]
/// per_device = "50/s"   # readings per device per replica: N/s, N/min or N/h; "" (default) is off
/// burst = 50            # readings a device may send at once; default: one second's worth (at least 1)
/// sweep_interval = "10s"
/// mqtt_max_wait = "1s"  # longest an MQTT message waits for its device's allowance
/// ```
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitSettings {
    /// `N/s`, `N/min` or `N/h`; empty (the default) turns limits off.
    pub per_device: String,
    /// The most readings a device may send at once after a quiet spell (GCRA's burst). 0 (the
    /// default) means one second's worth of `per_device`, at least 1.
    pub burst: u32,
    /// How often devices whose allowance has fully refilled are forgotten, which bounds the
    /// limiter's memory to the devices active within `burst / rate` plus this interval.
    #[serde(with = "crate::config::duration")]
    pub sweep_interval: Duration,
    /// The longest an MQTT message may wait for its device's allowance, counting that device's
    /// messages already waiting. Its PUBACK, and every later one (MQTT acks in order), waits
    /// with it, so this bounds how long one device over its limit can hold up the others on the
    /// connection. A message that would wait longer is dead-lettered with reason
    /// `rate_limited` and PUBACKed.
    #[serde(with = "crate::config::duration")]
    pub mqtt_max_wait: Duration,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        Self {
            per_device: String::new(),
            burst: 0,
            sweep_interval: Duration::from_secs(10),
            mqtt_max_wait: Duration::from_secs(1),
        }
    }
}

/// A parsed `rate_limit.per_device`: `count` readings per `period`, with `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Readings per period.
    pub count: u32,
    /// The period: 1 s, 1 min or 1 h.
    pub period: Duration,
    /// Readings at once (already defaulted).
    pub burst: u32,
}

impl Rate {
    /// One second's worth of the rate, rounded up, at least 1: the default burst.
    fn one_second(count: u32, period: Duration) -> u32 {
        let per_s = f64::from(count) / period.as_secs_f64();
        (per_s.ceil() as u32).max(1)
    }

    /// The time between two readings at the sustained rate.
    pub fn interval(&self) -> Duration {
        self.period / self.count
    }
}

impl RateLimitSettings {
    /// The parsed limit, or `None` when limits are off. Settings that [`validate`] refused
    /// parse as `None` too.
    pub fn rate(&self) -> Option<Rate> {
        let text = self.per_device.trim();
        if text.is_empty() {
            return None;
        }
        let (count, unit) = text.split_once('/')?;
        let count: u32 = count.trim().parse().ok().filter(|c| *c > 0)?;
        let period = match unit.trim() {
            "s" => Duration::from_secs(1),
            "min" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return None,
        };
        let burst = if self.burst == 0 {
            Rate::one_second(count, period)
        } else {
            self.burst
        };
        Some(Rate {
            count,
            period,
            burst,
        })
    }
}

/// Checks `[auth]` and `[rate_limit]`. `Err((key, reason))` names the first bad key.
pub fn validate(
    auth: &AuthSettings,
    rate: &RateLimitSettings,
) -> Result<(), (&'static str, String)> {
    match (&auth.admin_token, auth.mode) {
        (None, AuthMode::Token) => {
            return Err((
                "auth.admin_token",
                "is required with auth.mode = \"token\" (at least 32 random characters, e.g. \
                 `openssl rand -base64 32`, or SLUICE__AUTH__ADMIN_TOKEN)"
                    .into(),
            ))
        }
        (Some(t), _) if t.expose().trim().chars().count() < MIN_ADMIN_TOKEN_LEN => {
            return Err((
                "auth.admin_token",
                format!(
                    "is too short: at least {MIN_ADMIN_TOKEN_LEN} characters (e.g. `openssl rand -base64 32`)"
                ),
            ))
        }
        _ => {}
    }
    let text = rate.per_device.trim();
    if !text.is_empty() && rate.rate().is_none() {
        return Err((
            "rate_limit.per_device",
            format!(
                "`{text}` is not a rate: use N/s, N/min or N/h with N from 1 to {} (e.g. \"50/s\"), or \"\" for none",
                u32::MAX
            ),
        ));
    }
    if auth.token_cache == 0 {
        return Err(("auth.token_cache", "must be at least 1".into()));
    }
    if rate.sweep_interval.is_zero() {
        return Err(("rate_limit.sweep_interval", "must be more than 0s".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(per_device: &str, burst: u32) -> RateLimitSettings {
        RateLimitSettings {
            per_device: per_device.into(),
            burst,
            ..Default::default()
        }
    }

    #[test]
    fn rates_parse_with_a_default_burst_of_one_second() {
        let r = rate("50/s", 0).rate().unwrap();
        assert_eq!(
            (r.count, r.period, r.burst),
            (50, Duration::from_secs(1), 50)
        );
        assert_eq!(r.interval(), Duration::from_millis(20));
        let r = rate("600/min", 0).rate().unwrap();
        assert_eq!((r.count, r.burst), (600, 10));
        let r = rate("10/h", 0).rate().unwrap();
        assert_eq!(r.burst, 1);
        assert_eq!(rate("5/s", 20).rate().unwrap().burst, 20);
        assert_eq!(rate("", 0).rate(), None);
        for bad in [
            "50", "0/s", "-1/s", "50/day", "x/s", "50/sec", "3/m", "1/hour",
        ] {
            let e = validate(&AuthSettings::default(), &rate(bad, 0)).unwrap_err();
            assert_eq!(e.0, "rate_limit.per_device", "{bad}");
        }
    }

    #[test]
    fn token_mode_needs_a_long_admin_token() {
        let mut auth = AuthSettings {
            mode: AuthMode::Token,
            ..Default::default()
        };
        let none = rate("", 0);
        assert_eq!(validate(&auth, &none).unwrap_err().0, "auth.admin_token");
        auth.admin_token = Some(Secret("short".into()));
        let e = validate(&auth, &none).unwrap_err();
        assert!(e.1.contains("too short"), "{e:?}");
        auth.admin_token = Some(Secret("x".repeat(MIN_ADMIN_TOKEN_LEN)));
        validate(&auth, &none).unwrap();
    }
}
