//! The InfluxDB line-protocol parser (`POST /write`, `/api/v2/write` bodies): arbitrary bytes
//! → UTF-8 check → `codec::line_protocol::parse`, with the precision chosen by the first byte.
//! Never panics; rejections name a real line, in order; accepted readings round-trip through
//! the JSON parser.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::codec::line_protocol::{self, LineOptions, Precision};
use sluice::reading::ParsedBatch;

#[path = "common.rs"]
mod common;

const PRECISIONS: [Precision; 6] = [
    Precision::Ns,
    Precision::Us,
    Precision::Ms,
    Precision::S,
    Precision::M,
    Precision::H,
];

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let ctx = common::ctx();
    let opts = LineOptions {
        device_tag: "device_id",
        precision: PRECISIONS[first as usize % PRECISIONS.len()],
    };
    let Ok(text) = sluice::codec::decode_utf8(rest) else {
        return;
    };
    match line_protocol::parse(text, &opts, &ctx) {
        Ok(lines) => {
            let count = text.split('\n').count();
            let mut last = None;
            for r in &lines.batch.rejected {
                assert!(r.index < count, "rejection names line {} of {count}", r.index + 1);
                assert!(last < Some(r.index), "rejections out of order");
                last = Some(r.index);
                assert!(!r.error.to_string().is_empty(), "empty error");
            }
            common::check(
                Ok(ParsedBatch {
                    readings: lines.batch.readings,
                    rejected: Vec::new(),
                }),
                &ctx,
            );
        }
        Err(e) => common::check(Err(e), &ctx),
    }
});
