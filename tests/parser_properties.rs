//! Properties of the edge parser (`sluice::codec::json` over the model in `sluice::reading`), checked on generated inputs in every
//! `cargo test`, so that CI keeps the fuzzers' invariants without a fuzzer (README, "Fuzzing"):
//! - any valid reading, serialised (as an object, an array or NDJSON, with or without a leading
//!   byte-order mark) and parsed, is the same reading;
//! - any byte string gives `Ok` or a precise error, never a panic.

use std::time::Duration;

use proptest::prelude::*;
use sluice::codec::decode_utf8;
use sluice::codec::json::{parse_json_batch, parse_ndjson_batch};
use sluice::reading::{
    format_ts, BatchError, DeviceId, MetricValue, PairsAsMap, ParseContext, ParsedBatch, Reading,
};

const NOW: i64 = 1_795_000_000_000; // 2026-11-17
const WINDOW_MS: i64 = 30 * 86_400_000;

fn ctx() -> ParseContext<'static> {
    ParseContext {
        now_ms: NOW,
        max_future_skew: Duration::from_secs(300),
        max_age: Duration::from_secs(30 * 86400),
        max_readings: 10_000,
        bound_device: None,
        token_device: None,
    }
}

fn metric_value() -> impl Strategy<Value = MetricValue> {
    prop_oneof![
        any::<i64>().prop_map(MetricValue::Int),
        (i64::MAX as u64 + 1..=u64::MAX).prop_map(MetricValue::UInt),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(MetricValue::Float),
        Just(MetricValue::Float(-0.0)),
        any::<bool>().prop_map(MetricValue::Bool),
    ]
}

fn reading() -> impl Strategy<Value = Reading> {
    (
        "[A-Za-z0-9][A-Za-z0-9_:-]{0,127}",
        NOW - WINDOW_MS..=NOW + 300_000,
        proptest::option::of(any::<u64>()),
        // Vectors, not maps: names come in any order, and the order given must be kept.
        proptest::collection::vec(("[A-Za-z0-9_.:/-]{1,64}", metric_value()), 1..12),
        proptest::collection::vec(("[A-Za-z0-9_.:/-]{1,64}", "\\PC{0,32}"), 0..=16),
    )
        .prop_map(|(device, ts_ms, seq, metrics, tags)| Reading {
            device_id: DeviceId::parse(&device).unwrap(),
            ts_ms,
            seq,
            metrics: first_of_each_name(metrics),
            tags: first_of_each_name(tags),
        })
}

/// Keeps the first pair of each name, in order (a name given twice is an error).
fn first_of_each_name<V>(pairs: Vec<(String, V)>) -> Vec<(String, V)> {
    let mut seen = std::collections::HashSet::new();
    pairs
        .into_iter()
        .filter(|(name, _)| seen.insert(name.clone()))
        .collect()
}

/// The reading as a device would send it; `ts` as epoch ms or as RFC 3339. Built as text:
/// a `serde_json::Value` object would sort the names, and their order must be kept.
fn to_json(r: &Reading, ts_as_text: bool) -> String {
    format!(
        r#"{{"device_id":{},"ts":{},{}"metrics":{},"tags":{}}}"#,
        text(&r.device_id),
        if ts_as_text {
            text(&format_ts(r.ts_ms))
        } else {
            r.ts_ms.to_string()
        },
        r.seq.map(|s| format!(r#""seq":{s},"#)).unwrap_or_default(),
        text(&PairsAsMap(&r.metrics)),
        text(&PairsAsMap(&r.tags)),
    )
}

/// JSON text of anything serialisable.
fn text<T: serde::Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).unwrap()
}

/// Checks that an outcome is `Ok` or a precise error.
fn assert_precise(result: &Result<ParsedBatch, BatchError>) {
    match result {
        Ok(batch) => {
            for r in &batch.rejected {
                assert!(r.index < batch.total());
                let e = r.error.to_string();
                assert!(!e.is_empty());
                if !r.error.field.is_empty() {
                    assert!(e.starts_with(&format!("{}: ", r.error.field)), "{e}");
                }
            }
        }
        Err(BatchError::Malformed(detail)) => assert!(
            detail.starts_with("not UTF-8: invalid byte 0x")
                || detail.starts_with("not valid JSON at line ")
                || detail.starts_with("expected a reading object"),
            "{detail}"
        ),
        Err(BatchError::TooMany { count, limit }) => assert!(count > limit),
    }
}

/// Bytes that look a little like JSON readings, so that generated inputs reach deep.
fn jsonish() -> impl Strategy<Value = Vec<u8>> {
    let token = prop_oneof![
        Just(b"{".to_vec()),
        Just(b"}".to_vec()),
        Just(b"[".to_vec()),
        Just(b"]".to_vec()),
        Just(b",".to_vec()),
        Just(b":".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\"device_id\"".to_vec()),
        Just(b"\"metrics\"".to_vec()),
        Just(b"\"seq\"".to_vec()),
        Just(b"\"ts\"".to_vec()),
        Just(b"\"tags\"".to_vec()),
        Just(b"\"a\"".to_vec()),
        Just(b"18446744073709551616".to_vec()),
        Just(b"-9223372036854775809".to_vec()),
        Just(b"-0".to_vec()),
        Just(b"1e999".to_vec()),
        Just(b"true".to_vec()),
        Just(b"null".to_vec()),
        Just(b"\xEF\xBB\xBF".to_vec()),
        Just("\u{a0}".as_bytes().to_vec()),
        any::<i64>().prop_map(|i| i.to_string().into_bytes()),
        any::<u8>().prop_map(|b| vec![b]),
    ];
    proptest::collection::vec(token, 0..40).prop_map(|t| t.concat())
}

proptest! {
    // No failure files: a failing case is printed, and its seed reproduces it.
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn a_valid_reading_round_trips(
        readings in proptest::collection::vec(reading(), 1..5),
        ts_as_text in any::<bool>(),
        bom in any::<bool>(),
    ) {
        let bom = if bom { "\u{feff}" } else { "" };
        let texts: Vec<String> = readings.iter().map(|r| to_json(r, ts_as_text)).collect();

        let one = parse_json_batch(&format!("{bom}{}", texts[0]), &ctx()).unwrap();
        prop_assert!(one.rejected.is_empty(), "{:?}", one.rejected);
        prop_assert_eq!(&one.readings, &readings[..1]);

        let array = parse_json_batch(&format!("{bom}[{}]", texts.join(",")), &ctx()).unwrap();
        prop_assert!(array.rejected.is_empty(), "{:?}", array.rejected);
        prop_assert_eq!(&array.readings, &readings);

        let ndjson = parse_ndjson_batch(&format!("{bom}{}\n", texts.join("\n")), &ctx()).unwrap();
        prop_assert!(ndjson.rejected.is_empty(), "{:?}", ndjson.rejected);
        prop_assert_eq!(&ndjson.readings, &readings);
    }

    #[test]
    fn any_bytes_give_ok_or_a_precise_error(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let result = decode_utf8(&bytes).and_then(|t| parse_json_batch(t, &ctx()));
        assert_precise(&result);
        let result = decode_utf8(&bytes).and_then(|t| parse_ndjson_batch(t, &ctx()));
        assert_precise(&result);
    }

    #[test]
    fn json_like_bytes_give_ok_or_a_precise_error(bytes in jsonish()) {
        let result = decode_utf8(&bytes).and_then(|t| parse_json_batch(t, &ctx()));
        assert_precise(&result);
        let result = decode_utf8(&bytes).and_then(|t| parse_ndjson_batch(t, &ctx()));
        assert_precise(&result);
    }
}
