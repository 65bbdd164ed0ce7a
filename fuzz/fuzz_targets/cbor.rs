//! The CBOR codec (`application/cbor` bodies, binary WebSocket frames): arbitrary bytes →
//! `codec::cbor::parse_cbor`. Never panics (not on 10 000-deep nesting either: the decoder's
//! depth limit holds on libFuzzer's stack); rejections name a real reading, in order; an
//! envelope id is at most 64 characters; accepted readings round-trip through the JSON parser,
//! and, encoded again as CBOR with `codec::cbor::to_vec`, through the CBOR codec.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::ser::{Serialize, SerializeMap, Serializer};
use sluice::codec::cbor::{self, CborError};
use sluice::codec::envelope::MAX_ID_LEN;
use sluice::reading::{PairsAsMap, ParsedBatch, Reading};

#[path = "common.rs"]
mod common;

/// A reading in the JSON shape, metric and tag order kept.
struct Shape<'a>(&'a Reading);

impl Serialize for Shape<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let r = self.0;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("device_id", r.device_id.as_str())?;
        m.serialize_entry("ts", &r.ts_ms)?;
        if let Some(seq) = r.seq {
            m.serialize_entry("seq", &seq)?;
        }
        m.serialize_entry("metrics", &PairsAsMap(&r.metrics))?;
        m.serialize_entry("tags", &PairsAsMap(&r.tags))?;
        m.end()
    }
}

fuzz_target!(|data: &[u8]| {
    let ctx = common::ctx();
    match cbor::parse_cbor(data, &ctx) {
        Ok(parsed) => {
            if let Some(id) = &parsed.id {
                assert!(id.chars().count() <= MAX_ID_LEN, "id too long");
            }
            let total = parsed.batch.total();
            let mut last = None;
            for r in &parsed.batch.rejected {
                assert!(r.index < total, "rejection index out of range");
                assert!(last < Some(r.index), "rejections out of order");
                last = Some(r.index);
            }
            let shapes: Vec<Shape> = parsed.batch.readings.iter().map(Shape).collect();
            let again = cbor::parse_cbor(&cbor::to_vec(&shapes), &ctx)
                .unwrap_or_else(|e| panic!("re-encoded readings refused: {e}"));
            assert!(
                again.batch.rejected.is_empty(),
                "{:?}",
                again.batch.rejected
            );
            assert_eq!(again.batch.readings, parsed.batch.readings);
            common::check(Ok(parsed.batch), &ctx);
        }
        Err(CborError { error, .. }) => common::check(Err::<ParsedBatch, _>(error), &ctx),
    }
});
