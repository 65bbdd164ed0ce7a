//! A whole MQTT message through to its dead-letter decision: the input is split at the first
//! NUL into a topic and a payload (no NUL: the topic is `devices/fuzz/readings`), then
//! `mqtt::decide` and `Verdict::dead_letter`, whose JSON is serialised as it would be
//! republished. Never panics; a dead letter exists exactly when something was refused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::config::LimitSettings;
use sluice::ingest::mqtt::{decide, Verdict};

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let (topic, payload) = match data.iter().position(|&b| b == 0) {
        Some(i) => (
            String::from_utf8_lossy(&data[..i]).into_owned(),
            &data[i + 1..],
        ),
        None => ("devices/fuzz/readings".to_string(), data),
    };
    let limits = LimitSettings {
        max_body_bytes: 64 * 1024,
        max_readings_per_request: 64,
        ..LimitSettings::default()
    };
    let verdict = decide(&topic, payload, 1, &limits, common::NOW);
    let letter = verdict.dead_letter(&topic, payload, common::NOW, limits.max_body_bytes);
    match &verdict {
        Verdict::Refused { detail, .. } => {
            assert!(!detail.is_empty());
            assert!(
                letter.is_some(),
                "a refused message is always dead-lettered"
            );
        }
        Verdict::Parsed { parsed, .. } => {
            assert_eq!(letter.is_some(), !parsed.rejected.is_empty());
            for r in &parsed.readings {
                assert_eq!(Some(&r.device_id), verdict.device());
            }
        }
    }
    if let Some(letter) = letter {
        let json = serde_json::to_vec(&letter).expect("a dead letter always serialises");
        let _: serde_json::Value = serde_json::from_slice(&json).expect("and is valid JSON");
    }
});
