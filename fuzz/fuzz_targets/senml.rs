//! The SenML codec (`application/senml+json`, `application/senml+cbor`, SenML MQTT payloads):
//! the first byte picks JSON or CBOR (bit 0) and whether the transport binds a device (bit 1);
//! the rest → `codec::senml::parse_senml_json` (after the UTF-8 check) or `parse_senml_cbor`,
//! and `looks_like_senml`. Never panics; rejections name a real record of the pack, each at
//! most once, in order, with a non-empty error; accepted readings round-trip through the JSON
//! parser; a payload `looks_like_senml` accepts is a JSON array.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::de::IgnoredAny;
use sluice::codec::{decode_utf8, senml};
use sluice::reading::{DeviceId, ParseContext, ParsedBatch};

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let bound = DeviceId::parse("dev-1").expect("a valid id");
    let ctx = ParseContext {
        bound_device: (first & 2 != 0).then_some(&bound),
        token_device: None,
        ..common::ctx()
    };
    let is_senml = senml::looks_like_senml(rest);
    let (result, records) = if first & 1 == 0 {
        let Ok(text) = decode_utf8(rest) else {
            return;
        };
        let records = serde_json::from_str::<Vec<IgnoredAny>>(sluice::codec::strip_bom(text))
            .map(|v| v.len())
            .ok();
        (senml::parse_senml_json(text, &ctx), records)
    } else {
        let bytes = rest.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(rest);
        let records = ciborium::de::from_reader::<Vec<IgnoredAny>, _>(bytes)
            .map(|v| v.len())
            .ok();
        (senml::parse_senml_cbor(rest, &ctx), records)
    };
    if is_senml {
        // The probe reads only the first record, so the pack may still be refused later; but
        // it never says yes to something that is not an array.
        let p = rest.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(rest);
        assert!(
            p.trim_ascii_start().starts_with(b"["),
            "looks_like_senml took a non-array"
        );
    }
    match result {
        Ok(batch) => {
            let mut last = None;
            for r in &batch.rejected {
                if let Some(n) = records {
                    assert!(r.index < n, "rejection names record {} of {n}", r.index);
                }
                assert!(
                    last < Some(r.index),
                    "a record refused twice, or out of order"
                );
                last = Some(r.index);
                assert!(!r.error.to_string().is_empty(), "empty error");
            }
            common::check(
                Ok(ParsedBatch {
                    readings: batch.readings,
                    rejected: Vec::new(),
                }),
                &ctx,
            );
        }
        Err(e) => common::check(Err(e), &ctx),
    }
});
