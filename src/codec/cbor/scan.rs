//! A head-level scan of CBOR (RFC 8949 §3), with no values built: device → handler →
//! codec::cbor → **scan** (before any decoding) → the serde decoder.
//!
//! Decoding through serde (ciborium) builds what it reads and stops at the first item it
//! cannot represent, so three questions are answered here first, in time linear in the bytes
//! and memory proportional to the nesting depth (a counter per open container, on the heap,
//! so 100 000 nested arrays are no stack overflow):
//! - is the input **valid CBOR** at all: well-formed (RFC 8949 Appendix C: complete heads, no
//!   reserved additional information, breaks only in indefinite-length items, indefinite
//!   strings made of definite chunks of their own type, two-byte simple values of at least
//!   32) with UTF-8 text strings (§5.3.1). Nesting depth and unassigned simple values are
//!   valid CBOR: a decoder may refuse them, but they are not the peer speaking something else
//!   (the WebSocket's 1003, SPEC §4);
//! - where each **element of the top-level array** starts and ends, so a body of many items
//!   is decoded one element at a time, and a count limit is checked before anything is built;
//! - where a **negative 128-bit bignum** beyond `i128` sits (tag 3 on 16 bytes whose top bit is
//!   set), which ciborium refuses for the whole input; [`widen_negative_bignums`] gives such a
//!   bignum one leading zero byte, the same integer, so that it reaches the decoder as a tag
//!   and is refused for its own reading only.

use std::fmt;

/// Self-described CBOR (RFC 8949 §3.4.6), a tag with no meaning of its own: `d9 d9 f7`.
const SELF_DESCRIBED: [u8; 3] = [0xd9, 0xd9, 0xf7];

/// The CBOR "break" stop code (RFC 8949 §3.2.1).
const BREAK: u8 = 0xff;

/// Why bytes are not valid CBOR, with the byte offset where it shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanError {
    /// The input ends inside an item.
    Truncated,
    /// Something that cannot be CBOR at this byte offset.
    Invalid {
        /// Byte offset of the offending head.
        at: usize,
        /// What is wrong.
        what: &'static str,
    },
    /// Bytes after the end of the one item.
    Trailing {
        /// Byte offset where the item ends.
        at: usize,
        /// How many bytes follow it.
        count: usize,
    },
    /// A text string that is not UTF-8 (RFC 8949 §5.3.1: well-formed but not valid).
    NotUtf8 {
        /// Byte offset of the text string's head.
        at: usize,
    },
}

impl fmt::Display for ScanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScanError::Truncated => f.write_str(
                "truncated CBOR: the body ends inside an item (cut short, or an \
                 indefinite-length item with no end)",
            ),
            ScanError::Invalid { at, what } => write!(f, "not valid CBOR at byte {at}: {what}"),
            ScanError::Trailing { at, count } => write!(
                f,
                "{count} bytes after the end of the CBOR item (at byte {at}); a body holds one item"
            ),
            ScanError::NotUtf8 { at } => write!(
                f,
                "not valid CBOR at byte {at}: a text string that is not UTF-8 (RFC 8949 §5.3.1)"
            ),
        }
    }
}

/// One head (RFC 8949 §3): the initial byte and its argument.
#[derive(Debug, Clone, Copy)]
struct Head {
    /// The major type, 0..=7.
    major: u8,
    /// The argument; `None` for an indefinite length (additional information 31).
    arg: Option<u64>,
    /// The head's own length in bytes (1, 2, 3, 5 or 9).
    len: usize,
}

/// Reads the head at `at`.
fn head(bytes: &[u8], at: usize) -> Result<Head, ScanError> {
    let initial = *bytes.get(at).ok_or(ScanError::Truncated)?;
    let (major, info) = (initial >> 5, initial & 0x1f);
    let width = match info {
        0..=23 => 0,
        24 => 1,
        25 => 2,
        26 => 4,
        27 => 8,
        31 => {
            return Ok(Head {
                major,
                arg: None,
                len: 1,
            })
        }
        _ => {
            return Err(ScanError::Invalid {
                at,
                what: "reserved additional information (28 to 30)",
            })
        }
    };
    let arg = if width == 0 {
        u64::from(info)
    } else {
        let raw = bytes
            .get(at + 1..at + 1 + width)
            .ok_or(ScanError::Truncated)?;
        raw.iter().fold(0u64, |v, b| (v << 8) | u64::from(*b))
    };
    Ok(Head {
        major,
        arg: Some(arg),
        len: 1 + width,
    })
}

/// An open container while scanning.
enum Open {
    /// Items still to come in a definite-length array or map, or the one item of a tag.
    Definite(u64),
    /// An indefinite-length item: items so far (a map's must be even); `chunks_of` is the
    /// major type for a string, whose chunks must be definite strings of that type.
    Indefinite {
        items: u64,
        map: bool,
        chunks_of: Option<u8>,
    },
}

/// The end offset of the one valid item starting at `at` (see the module docs for what
/// valid means). Iterative: memory is one small entry per open container.
pub fn skip_item(bytes: &[u8], mut at: usize) -> Result<usize, ScanError> {
    let mut open: Vec<Open> = Vec::new();
    loop {
        let start = at;
        let h = head(bytes, at)?;
        at += h.len;
        if let Some(Open::Indefinite {
            chunks_of: Some(major),
            ..
        }) = open.last()
        {
            if bytes[start] != BREAK && (h.major != *major || h.arg.is_none()) {
                return Err(ScanError::Invalid {
                    at: start,
                    what: "an indefinite-length string holds something other than definite \
                           chunks of its own type",
                });
            }
        }
        let mut complete = match (h.major, h.arg) {
            (0 | 1 | 6, None) => {
                return Err(ScanError::Invalid {
                    at: start,
                    what: "an integer or tag with an indefinite length",
                })
            }
            (0 | 1, Some(_)) => true,
            (2 | 3, Some(len)) => {
                let end = usize::try_from(len)
                    .ok()
                    .and_then(|len| at.checked_add(len))
                    .filter(|end| *end <= bytes.len())
                    .ok_or(ScanError::Truncated)?;
                if h.major == 3 && std::str::from_utf8(&bytes[at..end]).is_err() {
                    return Err(ScanError::NotUtf8 { at: start });
                }
                at = end;
                true
            }
            (2 | 3, None) => {
                open.push(Open::Indefinite {
                    items: 0,
                    map: false,
                    chunks_of: Some(h.major),
                });
                false
            }
            (4 | 5, None) => {
                open.push(Open::Indefinite {
                    items: 0,
                    map: h.major == 5,
                    chunks_of: None,
                });
                false
            }
            // Major 7 with additional information 31: a break.
            (_, None) => match open.pop() {
                Some(Open::Indefinite { items, map, .. }) => {
                    if map && items % 2 == 1 {
                        return Err(ScanError::Invalid {
                            at: start,
                            what: "an indefinite-length map ends after a key with no value",
                        });
                    }
                    true
                }
                _ => {
                    return Err(ScanError::Invalid {
                        at: start,
                        what: "a break (0xff) outside an indefinite-length item",
                    })
                }
            },
            (4, Some(0)) | (5, Some(0)) => true,
            (4, Some(n)) => {
                open.push(Open::Definite(n));
                false
            }
            (5, Some(n)) => {
                // Keys and values: at most 2^65 items, which no input holds; saturating only
                // makes a truncated input report as truncated.
                open.push(Open::Definite(n.saturating_mul(2)));
                false
            }
            (6, Some(_)) => {
                open.push(Open::Definite(1));
                false
            }
            (_, Some(v)) => {
                // Major 7: simple values and floats; the head holds the whole item.
                if h.len == 2 && v < 32 {
                    return Err(ScanError::Invalid {
                        at: start,
                        what: "a two-byte simple value below 32",
                    });
                }
                true
            }
        };
        while complete {
            match open.last_mut() {
                None => return Ok(at),
                Some(Open::Definite(n)) => {
                    *n -= 1;
                    if *n == 0 {
                        open.pop();
                    } else {
                        complete = false;
                    }
                }
                Some(Open::Indefinite { items, .. }) => {
                    *items += 1;
                    complete = false;
                }
            }
        }
    }
}

/// Checks that `bytes` hold exactly one valid item (no trailing bytes).
pub fn check(bytes: &[u8]) -> Result<(), ScanError> {
    let end = skip_item(bytes, 0)?;
    if end != bytes.len() {
        return Err(ScanError::Trailing {
            at: end,
            count: bytes.len() - end,
        });
    }
    Ok(())
}

/// Skips any tags 55799 (self-described CBOR) at `at`.
fn past_self_described(bytes: &[u8], mut at: usize) -> usize {
    while bytes[at.min(bytes.len())..].starts_with(&SELF_DESCRIBED) {
        at += SELF_DESCRIBED.len();
    }
    at
}

/// The elements of an array, one byte range at a time: memory stays constant whatever the
/// element count.
pub struct Elements<'a> {
    bytes: &'a [u8],
    /// Where the next element starts.
    at: usize,
    /// Elements still to come in a definite-length array; `None` for an indefinite one.
    remaining: Option<u64>,
}

impl Iterator for Elements<'_> {
    type Item = Result<(usize, usize), ScanError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.remaining.as_mut() {
            Some(0) => return None,
            Some(n) => *n -= 1,
            None if self.bytes.get(self.at) == Some(&BREAK) => return None,
            None => {}
        }
        let start = self.at;
        Some(skip_item(self.bytes, start).map(|end| {
            self.at = end;
            (start, end)
        }))
    }
}

/// The elements of a top-level array (after any tags 55799), or `None` when the item is not
/// an array.
pub fn array_elements(bytes: &[u8]) -> Result<Option<Elements<'_>>, ScanError> {
    let at = past_self_described(bytes, 0);
    elements_at(bytes, at)
}

/// The elements of the array whose head is at `at`, or `None` for another item.
fn elements_at(bytes: &[u8], at: usize) -> Result<Option<Elements<'_>>, ScanError> {
    let h = head(bytes, at)?;
    Ok((h.major == 4).then_some(Elements {
        bytes,
        at: at + h.len,
        remaining: h.arg,
    }))
}

/// The number of elements, or the first scan error.
fn count(elements: Elements<'_>) -> Result<usize, ScanError> {
    elements.map(|e| e.map(|_| 1)).sum()
}

/// The shape of a CBOR body, read from its heads: how many readings it carries, and the
/// envelope's `id` when it is a text string.
#[derive(Debug, PartialEq, Eq)]
pub struct Shape {
    /// The elements of a top-level array, or of the `readings` array of a top-level
    /// envelope map; 1 for any other map.
    pub readings: usize,
    /// The envelope's `id`, when the body is a map with a text `id`.
    pub id: Option<String>,
}

/// The [`Shape`] of a body, counted without decoding a reading; `None` when the body is
/// neither an array nor a map (the decoder names what it is). The input must have passed
/// [`check`].
pub fn shape(bytes: &[u8]) -> Result<Option<Shape>, ScanError> {
    let at = past_self_described(bytes, 0);
    if let Some(elements) = elements_at(bytes, at)? {
        return Ok(Some(Shape {
            readings: count(elements)?,
            id: None,
        }));
    }
    let h = head(bytes, at)?;
    if h.major != 5 {
        return Ok(None);
    }
    let mut at = at + h.len;
    let mut entries = h.arg;
    let mut out = Shape {
        readings: 1,
        id: None,
    };
    loop {
        match entries.as_mut() {
            Some(0) => break,
            Some(n) => *n -= 1,
            None if bytes.get(at) == Some(&BREAK) => break,
            None => {}
        }
        let key = head(bytes, at)?;
        let text = |want: &[u8]| {
            key.major == 3
                && key.arg == Some(want.len() as u64)
                && bytes.get(at + key.len..at + key.len + want.len()) == Some(want)
        };
        let (is_readings, is_id) = (text(b"readings"), text(b"id"));
        at = skip_item(bytes, at)?;
        let value = past_self_described(bytes, at);
        if is_readings {
            if let Some(elements) = elements_at(bytes, value)? {
                out.readings = count(elements)?;
            }
        } else if is_id {
            let v = head(bytes, value)?;
            if let (3, Some(len)) = (v.major, v.arg) {
                let start = value + v.len;
                let text = bytes.get(start..start + len as usize);
                out.id = text
                    .and_then(|t| std::str::from_utf8(t).ok())
                    .map(str::to_owned);
            }
        }
        at = skip_item(bytes, at)?;
    }
    Ok(Some(out))
}

/// Rewrites every negative bignum of 16 significant bytes (tag 3 on a byte string of length
/// 16 whose first byte has its top bit set: a value below `i128::MIN`) with one leading zero
/// byte, so that a decoder passes it on as a tag instead of failing the whole input. Returns
/// `None` when there is none. The integer is unchanged (RFC 8949 §3.4.3: leading zeros are
/// allowed). The input must have passed [`check`].
pub fn widen_negative_bignums(bytes: &[u8]) -> Option<Vec<u8>> {
    let mut found = Vec::new();
    let mut at = 0;
    let mut after_tag3 = false;
    while let Ok(h) = head(bytes, at) {
        let content = at + h.len;
        if after_tag3 && h.major == 2 && h.arg == Some(16) && bytes.get(content)? & 0x80 != 0 {
            found.push((at, content));
        }
        after_tag3 = h.major == 6 && h.arg == Some(3);
        at = match (h.major, h.arg) {
            (2 | 3, Some(len)) => content + usize::try_from(len).ok()?,
            _ => content,
        };
        if at >= bytes.len() {
            break;
        }
    }
    if found.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() + found.len());
    let mut copied = 0;
    for (head_at, content) in found {
        out.extend_from_slice(&bytes[copied..head_at]);
        // A byte string of 17 bytes (0x51), a zero, then the 16 bytes.
        out.extend_from_slice(&[0x51, 0x00]);
        copied = content;
    }
    out.extend_from_slice(&bytes[copied..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cbor(v: &impl serde::Serialize) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(v, &mut out).unwrap();
        out
    }

    #[test]
    fn valid_items_are_skipped_whole() {
        let body = cbor(&serde_json::json!([{"a": [1, 2.5, "x", null, true]}, {"b": {}}]));
        assert_eq!(check(&body), Ok(()));
        assert_eq!(skip_item(&body, 0), Ok(body.len()));
        // Indefinite array of an indefinite text string in two chunks, then a tag on bytes.
        let indefinite = [
            0x9f, 0x7f, 0x61, b'a', 0x61, b'b', 0xff, 0xc2, 0x41, 0x01, 0xff,
        ];
        assert_eq!(check(&indefinite), Ok(()));
    }

    #[test]
    fn malformed_inputs_name_the_byte() {
        assert_eq!(check(&[0x82, 0x01]), Err(ScanError::Truncated));
        assert_eq!(check(&[0x9f, 0x01]), Err(ScanError::Truncated));
        assert!(check(&[0x1c]).unwrap_err().to_string().contains("byte 0"));
        assert!(matches!(
            check(&[0x81, 0xff]),
            Err(ScanError::Invalid { at: 1, .. })
        ));
        assert!(matches!(
            check(&[0x7f, 0x41, 0x00, 0xff]),
            Err(ScanError::Invalid { at: 1, .. })
        ));
        assert!(matches!(
            check(&[0xbf, 0x01, 0xff]),
            Err(ScanError::Invalid { at: 2, .. })
        ));
        assert!(matches!(
            check(&[0xf8, 0x10]),
            Err(ScanError::Invalid { at: 0, .. })
        ));
        assert_eq!(
            check(&[0x62, 0xff, 0xfe]),
            Err(ScanError::NotUtf8 { at: 0 })
        );
        assert_eq!(
            check(&[0x01, 0x02]),
            Err(ScanError::Trailing { at: 1, count: 1 })
        );
        // A length beyond the input, even 2^64 - 1, is truncation, not an allocation.
        let huge = [0x5b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(check(&huge), Err(ScanError::Truncated));
        let huge_array = [0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert_eq!(check(&huge_array), Err(ScanError::Truncated));
    }

    #[test]
    fn depth_and_simple_values_are_valid_cbor() {
        let mut deep = vec![0x81; 100_000];
        deep.push(0x01);
        assert_eq!(check(&deep), Ok(()));
        assert_eq!(check(&[0xf0]), Ok(()));
        assert_eq!(check(&[0xf8, 0x20]), Ok(()));
    }

    #[test]
    fn readings_are_counted_without_decoding() {
        let count = |b: &[u8]| shape(b).map(|s| s.map(|s| (s.readings, s.id)));
        let array = cbor(&serde_json::json!([{}, {}, {}]));
        assert_eq!(count(&array), Ok(Some((3, None))));
        let envelope = cbor(&serde_json::json!({"readings": [{}, {}], "id": "x"}));
        assert_eq!(count(&envelope), Ok(Some((2, Some("x".into())))));
        let one = cbor(&serde_json::json!({"device_id": "d"}));
        assert_eq!(count(&one), Ok(Some((1, None))));
        let mut tagged = SELF_DESCRIBED.to_vec();
        tagged.extend_from_slice(&[0x9f, 0xa0, 0xa0, 0xff]);
        assert_eq!(count(&tagged), Ok(Some((2, None))));
        assert_eq!(count(&cbor(&1)), Ok(None));
        let elements = array_elements(&[0x82, 0x01, 0x62, b'h', b'i']).unwrap();
        let ranges: Result<Vec<_>, _> = elements.unwrap().collect();
        assert_eq!(ranges, Ok(vec![(1, 2), (2, 5)]));
    }

    #[test]
    fn negative_bignums_beyond_i128_get_a_leading_zero() {
        let mut body = vec![0x82, 0xc3, 0x50];
        body.extend_from_slice(&[0xff; 16]);
        body.push(0x01);
        assert_eq!(check(&body), Ok(()));
        let widened = widen_negative_bignums(&body).unwrap();
        assert_eq!(&widened[..5], &[0x82, 0xc3, 0x51, 0x00, 0xff]);
        assert_eq!(widened.len(), body.len() + 1);
        assert_eq!(check(&widened), Ok(()));
        // Within i128 (top bit clear), and inside a text string: untouched.
        let mut small = vec![0xc3, 0x50, 0x7f];
        small.extend_from_slice(&[0xff; 15]);
        assert_eq!(widen_negative_bignums(&small), None);
        assert_eq!(widen_negative_bignums(&cbor(&"\u{c3}P")), None);
    }
}
