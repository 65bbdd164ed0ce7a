//! The JSON batch parser (`application/json` bodies, WebSocket frames, MQTT payloads):
//! arbitrary bytes → UTF-8 check → `parse_json_batch`. Never panics; accepted readings
//! round-trip.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let ctx = common::ctx();
    let result = sluice::codec::decode_utf8(data)
        .and_then(|text| sluice::codec::json::parse_json_batch(text, &ctx));
    common::check(result, &ctx);
});
