//! MQTT dead letters: what a payload that can never be taken (in whole or in part) is
//! republished as, to `<mqtt.dead_letter_topic>/<device_id>` (SPEC §6), before its PUBACK.

use serde::Serialize;

/// Dead-letter topic level used when the topic's device level is not a valid device id.
pub const INVALID_DEVICE_LEVEL: &str = "_invalid";

/// The JSON republished to `<mqtt.dead_letter_topic>/<device_id>` for a payload that Sluice
/// PUBACKs without storing all of it:
///
/// ```json
/// {"topic": "devices/d1/readings", "device_id": "d1", "received_at": "2026-11-24T12:00:00.123Z",
///  "payload_bytes": 57, "payload": "<the original payload, when UTF-8 and within limits>",
///  "error": {"reason": "malformed", "detail": "not valid JSON at line 1 column 2: ..."},
///  "rejected": [{"index": 1, "reason": "invalid_metrics", "error": "metrics.t: expected a finite number or a boolean"}],
///  "taken": 1}
/// ```
///
/// `error` is set when the whole message was refused; `rejected` lists readings refused inside
/// a message whose other readings (`taken` of them) went on to be stored.
#[derive(Debug, Serialize)]
pub struct DeadLetter<'a> {
    /// The topic the message arrived on.
    pub topic: &'a str,
    /// The device id from the topic; `null` when that level is not a valid device id.
    pub device_id: Option<&'a str>,
    /// When Sluice received the message.
    pub received_at: String,
    /// Size of the original payload.
    pub payload_bytes: usize,
    /// The original payload, when it is UTF-8 and not over `limits.max_body_bytes`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<&'a str>,
    /// Why the whole message was refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<MessageError>,
    /// Readings refused individually.
    pub rejected: Vec<DeadReading>,
    /// Readings of this message taken for storage.
    pub taken: usize,
}

/// A whole-message refusal in a [`DeadLetter`].
#[derive(Debug, Serialize)]
pub struct MessageError {
    /// The `reason` label it was counted under.
    pub reason: &'static str,
    /// What is wrong, for the device's developer.
    pub detail: String,
}

/// One refused reading in a [`DeadLetter`].
#[derive(Debug, Serialize)]
pub struct DeadReading {
    /// Position in the payload's array (0 for a single reading).
    pub index: usize,
    /// The `reason` label it was counted under.
    pub reason: &'static str,
    /// `field: reason`.
    pub error: String,
}
