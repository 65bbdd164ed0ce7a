//! Fault injection (`--bad-ratio`): readings that SPEC §1 rejects, each with the answer it must
//! get.
//!
//! A fault replaces a valid reading in the stream (see [`crate::fleet::Device::write_reading`]).
//! When the answer comes back, [`Fault::check`] tells whether the server rejected it naming
//! the right field (`metrics.temperature: expected a finite number or a boolean`, ...). The
//! summary counts rejections by the server's `reason` label ([`Fault::reason`]), so that they
//! can be compared with `sluice_readings_rejected_total{reason}`.

use serde::Serialize;

/// A kind of malformed reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// `device_id` with a space and a `!`.
    BadDeviceId,
    /// `ts` a day ahead (past `limits.max_future_skew`).
    FutureTs,
    /// `ts` 60 days back (past the default `limits.max_age` of 30 days).
    AncientTs,
    /// A metric given as a string.
    StringMetric,
    /// A metric given as `null`.
    NullMetric,
    /// An unknown top-level field.
    UnknownField,
    /// `metrics: {}`.
    EmptyMetrics,
    /// A metric name with a space.
    BadMetricName,
    /// A negative `seq`.
    NegativeSeq,
    /// A tag value that is not a string.
    BadTag,
}

impl Fault {
    /// Every kind, picked uniformly.
    pub const ALL: [Fault; 10] = [
        Fault::BadDeviceId,
        Fault::FutureTs,
        Fault::AncientTs,
        Fault::StringMetric,
        Fault::NullMetric,
        Fault::UnknownField,
        Fault::EmptyMetrics,
        Fault::BadMetricName,
        Fault::NegativeSeq,
        Fault::BadTag,
    ];

    /// The field the server's error must name (`<field>: <reason>`).
    pub fn expected_field(self) -> &'static str {
        match self {
            Fault::BadDeviceId => "device_id",
            Fault::FutureTs | Fault::AncientTs => "ts",
            Fault::StringMetric | Fault::NullMetric => "metrics.temperature",
            Fault::UnknownField => "colour",
            Fault::EmptyMetrics => "metrics",
            Fault::BadMetricName => "metrics.bad name",
            Fault::NegativeSeq => "seq",
            Fault::BadTag => "tags",
        }
    }

    /// The `reason` label Sluice counts this rejection under.
    pub fn reason(self) -> &'static str {
        match self {
            Fault::BadDeviceId => "invalid_device_id",
            Fault::FutureTs | Fault::AncientTs => "invalid_ts",
            Fault::StringMetric
            | Fault::NullMetric
            | Fault::EmptyMetrics
            | Fault::BadMetricName => "invalid_metrics",
            Fault::UnknownField => "unknown_field",
            Fault::NegativeSeq => "invalid_seq",
            Fault::BadTag => "invalid_tags",
        }
    }

    /// Whether `error` (from the answer's `rejected` list) is the rejection this fault must get.
    pub fn check(self, error: &str) -> bool {
        error
            .strip_prefix(self.expected_field())
            .is_some_and(|rest| rest.starts_with(": "))
    }

    /// Appends the malformed reading for `device_id` at `now_ms` to `out`.
    pub fn write(self, device_id: &str, now_ms: i64, out: &mut String) {
        const DAY: i64 = 86_400_000;
        let id = device_id;
        let text = match self {
            Fault::BadDeviceId => {
                format!(
                    r#"{{"device_id":"bad id!","ts":{now_ms},"metrics":{{"temperature":20.5}}}}"#
                )
            }
            Fault::FutureTs => format!(
                r#"{{"device_id":"{id}","ts":{},"metrics":{{"temperature":20.5}}}}"#,
                now_ms + DAY
            ),
            Fault::AncientTs => format!(
                r#"{{"device_id":"{id}","ts":{},"metrics":{{"temperature":20.5}}}}"#,
                now_ms - 60 * DAY
            ),
            Fault::StringMetric => {
                format!(
                    r#"{{"device_id":"{id}","ts":{now_ms},"metrics":{{"temperature":"warm"}}}}"#
                )
            }
            Fault::NullMetric => {
                format!(r#"{{"device_id":"{id}","ts":{now_ms},"metrics":{{"temperature":null}}}}"#)
            }
            Fault::UnknownField => format!(
                r#"{{"device_id":"{id}","ts":{now_ms},"metrics":{{"temperature":20.5}},"colour":"red"}}"#
            ),
            Fault::EmptyMetrics => {
                format!(r#"{{"device_id":"{id}","ts":{now_ms},"metrics":{{}}}}"#)
            }
            Fault::BadMetricName => {
                format!(r#"{{"device_id":"{id}","ts":{now_ms},"metrics":{{"bad name":1}}}}"#)
            }
            Fault::NegativeSeq => {
                format!(
                    r#"{{"device_id":"{id}","seq":-1,"ts":{now_ms},"metrics":{{"temperature":20.5}}}}"#
                )
            }
            Fault::BadTag => format!(
                r#"{{"device_id":"{id}","ts":{now_ms},"metrics":{{"temperature":20.5}},"tags":{{"site":7}}}}"#
            ),
        };
        out.push_str(&text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Each fault, parsed by Sluice's own edge parser, is rejected naming the expected field and
    /// counted under the expected reason: the simulator's expectations follow the server's code.
    #[test]
    fn sluice_rejects_each_fault_as_expected() {
        let now = 1_795_000_000_000;
        let ctx = sluice::reading::ParseContext {
            now_ms: now,
            max_future_skew: Duration::from_secs(300),
            max_age: Duration::from_secs(30 * 86_400),
            max_readings: 10_000,
            bound_device: None,
            token_device: None,
        };
        for fault in Fault::ALL {
            let mut text = String::new();
            fault.write("sim-x-1", now, &mut text);
            let err = sluice::codec::json::parse_reading(&text, &ctx)
                .expect_err(&format!("{fault:?} must be rejected: {text}"));
            assert!(fault.check(&err.to_string()), "{fault:?}: got `{err}`");
            assert_eq!(err.kind.as_str(), fault.reason(), "{fault:?}: `{err}`");
        }
    }

    #[test]
    fn check_needs_the_field_and_a_colon() {
        assert!(Fault::EmptyMetrics.check("metrics: at least one metric is required"));
        assert!(!Fault::EmptyMetrics.check("metrics.x: expected a finite number or a boolean"));
        assert!(!Fault::FutureTs.check("device_id: required"));
        assert!(
            Fault::StringMetric.check("metrics.temperature: expected a finite number or a boolean")
        );
    }

    #[test]
    fn every_fault_is_json() {
        for fault in Fault::ALL {
            let mut text = String::new();
            fault.write("sim-x-1", 1_795_000_000_000, &mut text);
            serde_json::from_str::<serde_json::Value>(&text).expect(&text);
        }
    }
}
