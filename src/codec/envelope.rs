//! The WebSocket envelope in JSON text frames (SPEC §4): `{"id": "<client ref>", "readings":
//! [...]}`. device → `ingest::ws` → **codec::envelope** → `codec::json` → readings. No I/O.
//!
//! The transport asks [`split`] where the readings are, and hands only those bytes to the JSON
//! batch parser, so an envelope costs one syntax scan and no copy. (CBOR frames carry the same
//! envelope; `codec::cbor` reads it on its own.)

use std::borrow::Cow;
use std::ops::Range;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::reading::BatchError;

/// Longest envelope `id`, in characters (SPEC §4).
pub const MAX_ID_LEN: usize = 64;

/// A text frame that is an envelope: the `id` to echo and where its readings are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The client's reference, echoed in the ack.
    pub id: Option<String>,
    /// Byte range of the `readings` value in the frame.
    pub readings: Range<usize>,
}

/// The shape probed; other fields are ignored.
#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    readings: Option<&'a RawValue>,
}

/// Finds the envelope in a text frame. `Ok(None)` when the frame is not one (not an object
/// with a `readings` field, or not JSON at all: the batch parser then reports it).
/// `text` may start with one byte-order mark (SPEC §1), which is skipped.
///
/// # Errors
/// [`BatchError::Malformed`] naming `id` when the id is longer than [`MAX_ID_LEN`] characters.
pub fn split(text: &str) -> Result<Option<Envelope>, BatchError> {
    let body = super::strip_bom(text);
    if !body.trim_start().starts_with('{') {
        return Ok(None);
    }
    let Ok(probe) = serde_json::from_str::<Probe>(body) else {
        return Ok(None);
    };
    let Some(readings) = probe.readings else {
        return Ok(None);
    };
    let id = match probe.id.map(RawValue::get) {
        None | Some("null") => None,
        Some(raw) => match serde_json::from_str::<Cow<'_, str>>(raw) {
            Ok(id) => Some(id),
            Err(_) => {
                let shown: String = raw.chars().take(40).collect();
                return Err(BatchError::Malformed(format!(
                    "id: must be a string (the client's reference, up to {MAX_ID_LEN} characters), not `{shown}`"
                )));
            }
        },
    };
    if let Some(id) = &id {
        if id.chars().count() > MAX_ID_LEN {
            return Err(BatchError::Malformed(format!(
                "id: longer than {MAX_ID_LEN} characters"
            )));
        }
    }
    let raw = readings.get();
    let start = raw.as_ptr() as usize - text.as_ptr() as usize;
    Ok(Some(Envelope {
        id: id.map(Cow::into_owned),
        readings: start..start + raw.len(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_readings_and_the_id() {
        let text = "\u{feff} {\"id\":\"r-1\",\"readings\":[{\"device_id\":\"d\"}],\"x\":1}";
        let env = split(text).unwrap().unwrap();
        assert_eq!(env.id.as_deref(), Some("r-1"));
        assert_eq!(&text[env.readings], "[{\"device_id\":\"d\"}]");
    }

    #[test]
    fn other_frames_are_not_envelopes() {
        assert_eq!(split("[{\"device_id\":\"d\"}]").unwrap(), None);
        assert_eq!(split("{\"device_id\":\"d\",\"metrics\":{}}").unwrap(), None);
        assert_eq!(split("{not json").unwrap(), None);
    }

    #[test]
    fn a_long_id_is_named() {
        let text = format!("{{\"id\":\"{}\",\"readings\":[]}}", "x".repeat(65));
        let e = split(&text).unwrap_err();
        assert_eq!(
            e,
            BatchError::Malformed("id: longer than 64 characters".into())
        );
        let ok = format!("{{\"id\":\"{}\",\"readings\":[]}}", "é".repeat(64));
        assert!(split(&ok).unwrap().is_some());
    }

    #[test]
    fn an_id_that_is_no_string_is_named() {
        let e = split("{\"id\":5,\"readings\":[]}").unwrap_err();
        assert_eq!(
            e,
            BatchError::Malformed(
                "id: must be a string (the client's reference, up to 64 characters), not `5`"
                    .into()
            )
        );
        let env = split("{\"id\":null,\"readings\":[]}").unwrap().unwrap();
        assert_eq!(env.id, None);
        let env = split("{\"id\":\"a\\u0062\",\"readings\":[]}")
            .unwrap()
            .unwrap();
        assert_eq!(env.id.as_deref(), Some("ab"));
    }
}
