//! Shared by the fuzz targets: a fixed parse context, and the invariants every outcome keeps.
#![allow(dead_code)] // each target uses a different part

use std::time::Duration;

use sluice::reading::{BatchError, PairsAsMap, ParseContext, ParsedBatch};

/// A fixed "now" (2026-11-17), so that runs are reproducible.
pub const NOW: i64 = 1_795_000_000_000;

/// The default limits, with a small reading cap so that `TooMany` is reachable.
pub fn ctx() -> ParseContext<'static> {
    ParseContext {
        now_ms: NOW,
        max_future_skew: Duration::from_secs(300),
        max_age: Duration::from_secs(30 * 86400),
        max_readings: 64,
        bound_device: None,
        token_device: None,
    }
}

/// Checks what a parser returned: every accepted reading re-serialises to JSON that parses
/// back to the same reading; every error is precise (non-empty, and a rejection names its
/// reading's index in range).
pub fn check(result: Result<ParsedBatch, BatchError>, ctx: &ParseContext<'_>) {
    match result {
        Ok(batch) => {
            let total = batch.total();
            for rej in &batch.rejected {
                assert!(rej.index < total, "rejection index out of range");
                assert!(!rej.error.to_string().is_empty(), "empty error");
            }
            for r in &batch.readings {
                // Built by hand: `json!` would sort the keys, and metric order is kept.
                let text = format!(
                    r#"{{"device_id":"{}","ts":{},{}"metrics":{},"tags":{}}}"#,
                    r.device_id,
                    r.ts_ms,
                    r.seq.map(|s| format!(r#""seq":{s},"#)).unwrap_or_default(),
                    serde_json::to_string(&PairsAsMap(&r.metrics)).unwrap(),
                    serde_json::to_string(&PairsAsMap(&r.tags)).unwrap(),
                );
                let back = sluice::codec::json::parse_reading(&text, ctx)
                    .unwrap_or_else(|e| panic!("{text}: re-parse failed: {e}"));
                assert_eq!(&back, r, "{text}");
            }
        }
        Err(BatchError::Malformed(detail)) => assert!(!detail.is_empty()),
        Err(BatchError::TooMany { count, limit }) => assert!(count > limit),
    }
}
