//! The chunk codec: one device's compacted readings as one compressed, column-encoded blob.
//!
//! Where it sits in the flow: commits land in the journal; **compaction** later takes a run of
//! one device's readings, sorted by `(ts_ms, rid)`, and calls [`encode`] to turn them into a
//! chunk blob that is stored in SQLite. Queries call [`decode`] on the chunks their time range
//! touches, and duplicate lookups call [`decode_seqs`], which builds only the `seq` column.
//! This module is pure: bytes in, rows out, no I/O and no SQLite.
//!
//! # Why columns
//!
//! One device's readings are extremely regular: timestamps a near-constant step apart, `seq`
//! going up by one, the same few metric names every time, each value close to the last one.
//! Stored row by row (as JSON, say) that regularity is buried in repeated names and digits.
//! Stored column by column, each column is turned into small integers (deltas,
//! delta-of-deltas, scaled decimals), mostly one byte each and mostly repeating, which zstd
//! then squeezes further. Simulator-like sensor data ends up at a few bytes per reading.
//!
//! # Format (version 1)
//!
//! A blob is a small uncompressed header and a payload:
//!
//! | field        | encoding                                                          |
//! |--------------|-------------------------------------------------------------------|
//! | version      | 1 byte, [`FORMAT_VERSION`]; read first so a new format can be told apart |
//! | codec        | 1 byte: 0 = body stored as is, 1 = body is one zstd frame         |
//! | row count    | varint                                                            |
//! | body length  | varint, uncompressed; at most [`MAX_UNCOMPRESSED_LEN`]            |
//! | body CRC-32  | 4 bytes little-endian, of the uncompressed body                   |
//! | payload      | the body, as the codec says                                       |
//!
//! The length is checked *before* decompressing, so a corrupt blob cannot make decoding
//! allocate without bound, and the CRC turns almost any other damage into an error rather
//! than wrong rows. The encoder stores the body as is only when zstd would not make it
//! smaller (tiny chunks, including the empty one).
//!
//! The body is five sections, each prefixed by its byte length (a varint), so that
//! [`decode_seqs`] can jump over the first two and a decoder can insist that every section
//! is consumed exactly:
//!
//! 1. **ts**: the first `ts_ms` as a zigzag varint, then the first delta, then for every
//!    further row the delta-of-delta (all wrapping `i64` arithmetic, zigzag varints). A
//!    steady one-second cadence with jitter of a few ms is one byte a row.
//! 2. **rid**: the first rid, then wrapping deltas, as zigzag varints (rids of one device are
//!    increasing but not necessarily in `ts` order, hence zigzag).
//! 3. **seq**: a presence byte (0 = no row has one, 1 = every row has one, 2 = a bitmap of
//!    `ceil(rows / 8)` bytes follows, LSB first), then the present values as wrapping deltas
//!    from the previous present value (zigzag varints).
//! 4. **metrics**: a dictionary of the distinct metric names (first-use order); a dictionary
//!    of distinct row *shapes* (the sequence of name indexes a row has, which keeps the
//!    per-row metric order and presence); a per-row shape index, left out when every row has
//!    the same shape; then one column per name holding that name's values in row order.
//!    A column starts with a kind byte: 0 Int, 1 UInt, 2 Float, 3 Bool when all its values
//!    have that type, or 4 *mixed* followed by one type byte per value. Then come the values
//!    split by type, in the order Int, UInt, Float, Bool (each only if present):
//!    - Int and UInt: wrapping deltas as zigzag varints.
//!    - Float: a mode byte. Mode `k` in `0..=6` means *decimal*: every value `f` satisfies
//!      `(((f * 10^k).round() as i64) as f64 / 10^k).to_bits() == f.to_bits()` with the
//!      scaled integer below 2^53 in magnitude, for the smallest such `k`, and the scaled
//!      integers follow as deltas like Int. Mode 255 means *XOR*: each value's bits XOR the
//!      previous value's bits, 8 bytes each, stored as 8 byte planes (all lowest bytes, then
//!      all second bytes, ...) so that the zero high bytes form long runs for zstd.
//!      Exactness is checked on the bits, so `-0.0`, NaN and infinities take the XOR path
//!      and still come back bit for bit.
//!    - Bool: a bitmap, LSB first.
//! 5. **tags**: a dictionary of the distinct tag sets (each an ordered list of key/value
//!    pairs), then a per-row set index, left out when there is one set (typically the empty
//!    one).
//!
//! Varints are unsigned LEB128 (at most 10 bytes); zigzag maps 0, -1, 1, -2, ... to
//! 0, 1, 2, 3, ... so that small negative deltas stay small. Strings are a varint byte length
//! and UTF-8 bytes.

use std::borrow::Cow;
use std::collections::HashMap;

use crate::reading::MetricValue;
use crate::store::StoredRow;

/// The format version [`encode`] writes, the first byte of every chunk. [`decode`] refuses
/// any other with [`ChunkError::UnsupportedVersion`].
pub const FORMAT_VERSION: u8 = 1;

/// Largest uncompressed body [`decode`] accepts (256 MiB); a header declaring more is refused
/// with [`ChunkError::TooLarge`] before anything is allocated.
///
/// At the reading limits (256 metrics with 64-byte names, 16 tags of 128 four-byte
/// characters, every row different) a row costs under 32 KiB of body, so any chunk of up to
/// 8,192 rows (the compactor's chunk size) is always decodable; sensor-like rows cost under
/// 10 bytes.
pub const MAX_UNCOMPRESSED_LEN: usize = 256 << 20;

/// zstd level for chunk bodies. Level 3 (zstd's default) is within a few percent of the
/// higher levels on this already delta-encoded data and many times faster.
const ZSTD_LEVEL: i32 = 3;

/// Bodies shorter than this are stored as they are, without trying zstd.
const MIN_COMPRESS: usize = 192;

const CODEC_STORED: u8 = 0;
const CODEC_ZSTD: u8 = 1;

const SEQ_NONE: u8 = 0;
const SEQ_ALL: u8 = 1;
const SEQ_BITMAP: u8 = 2;

const KIND_INT: u8 = 0;
const KIND_UINT: u8 = 1;
const KIND_FLOAT: u8 = 2;
const KIND_BOOL: u8 = 3;
const KIND_MIXED: u8 = 4;

/// Float mode byte for XOR-of-bits encoding; `0..=6` are decimal scales.
const FLOAT_XOR: u8 = 0xFF;
/// `10^k` for the decimal float scales. All are exact in f64, so the encoder's check and the
/// decoder's division compute the very same value.
pub(super) const POW10: [f64; 7] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6];
/// Scaled decimals must stay below 2^53 so the integer → f64 conversion is exact.
const MAX_SCALED: f64 = 9_007_199_254_740_992.0;

/// Why a chunk blob could not be decoded: it is corrupt, or from a format this build does not
/// know. None of these is recoverable by retrying; the chunk's rows are unreadable.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// The first byte names a format version this build cannot read.
    #[error(
        "chunk format version {0} is not supported (this build reads version {FORMAT_VERSION})"
    )]
    UnsupportedVersion(u8),
    /// The codec byte is neither "stored" nor "zstd".
    #[error("chunk codec {0} is unknown")]
    UnknownCodec(u8),
    /// The header declares an uncompressed body over [`MAX_UNCOMPRESSED_LEN`] bytes.
    #[error("chunk declares a {0}-byte body, over the {MAX_UNCOMPRESSED_LEN}-byte limit")]
    TooLarge(u64),
    /// zstd refused the payload (damaged frame, or more output than the header declared).
    #[error("chunk payload does not decompress: {0}")]
    Decompress(#[source] std::io::Error),
    /// The body decompressed but its CRC-32 is not the one in the header.
    #[error("chunk checksum mismatch: header says {stored:#010x}, body has {actual:#010x}")]
    Checksum {
        /// CRC-32 recorded in the header.
        stored: u32,
        /// CRC-32 of the body as read.
        actual: u32,
    },
    /// The header or body does not follow the format; the message names the section and what
    /// is wrong.
    #[error("corrupt chunk: {0}")]
    Corrupt(String),
}

/// Encodes `rows` into one chunk blob.
///
/// `rows` are one device's readings, already sorted by `(ts_ms, rid)`; they are stored in the
/// order given (never re-sorted), and [`decode`] returns them in that order, identical: every
/// field, every metric value bit for bit, metric and tag order included. Any values are
/// accepted (an empty slice gives a valid blob of 17 bytes that decodes to no rows).
///
/// Never fails. The one limit is on the reader's side: a body over [`MAX_UNCOMPRESSED_LEN`]
/// would be refused by [`decode`], which no chunk of up to 8,192 rows can reach; debug builds
/// assert it.
pub fn encode(rows: &[StoredRow]) -> Vec<u8> {
    let body = encode_body(rows);
    debug_assert!(
        body.len() <= MAX_UNCOMPRESSED_LEN,
        "chunk body of {} bytes ({} rows) exceeds what decode accepts; compact fewer rows",
        body.len(),
        rows.len()
    );
    let mut out = Vec::with_capacity(body.len() / 2 + 32);
    out.push(FORMAT_VERSION);
    let codec_at = out.len();
    out.push(CODEC_ZSTD);
    put_varint(&mut out, rows.len() as u64);
    put_varint(&mut out, body.len() as u64);
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    // zstd on an in-memory buffer only fails on allocation failure; storing the body as is
    // then (or when zstd does not help, as for tiny chunks) keeps `encode` infallible.
    // One compression context per thread (the compaction thread), reused: creating one per
    // chunk cost about 20 µs, a tenth of encoding a 1000-row chunk.
    thread_local! {
        static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    // A body this small (a device with a handful of readings in a generation) does not
    // shrink enough to pay for zstd's table building, which dominated compaction of
    // 100 000-device generations.
    if body.len() < MIN_COMPRESS {
        out[codec_at] = CODEC_STORED;
        out.extend_from_slice(&body);
        return out;
    }
    let compressed = COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
        }
        match c.as_mut() {
            Some(c) => c.compress(&body),
            None => zstd::bulk::compress(&body, ZSTD_LEVEL),
        }
    });
    match compressed {
        Ok(z) if z.len() < body.len() => out.extend_from_slice(&z),
        _ => {
            out[codec_at] = CODEC_STORED;
            out.extend_from_slice(&body);
        }
    }
    out
}

/// Decodes every row of a chunk made by [`encode`], in the stored order.
///
/// # Errors
/// [`ChunkError`] if the blob is from an unknown format version or codec, declares a body over
/// [`MAX_UNCOMPRESSED_LEN`], does not decompress, fails its checksum, or is otherwise not a
/// well-formed chunk. A damaged blob gives an error, never a panic.
pub fn decode(blob: &[u8]) -> Result<Vec<StoredRow>, ChunkError> {
    let (rows, body) = open(blob)?;
    decode_body(&body, rows)
}

/// Decodes only the `seq` column of a chunk: one entry per row, in the same order as
/// [`decode`] returns rows. For duplicate lookups, which need nothing else; it skips building
/// metrics and tags (the body is still decompressed and checksummed whole).
///
/// # Errors
/// As [`decode`], for the header, payload and the sections it reads.
pub fn decode_seqs(blob: &[u8]) -> Result<Vec<Option<u64>>, ChunkError> {
    let (rows, body) = open(blob)?;
    let mut r = Reader::new(&body, "body");
    rows_fit(&r.section("ts")?, rows)?;
    r.section("rid")?;
    let mut s = r.section("seq")?;
    let seqs = read_seqs(&mut s, rows)?;
    s.finish()?;
    Ok(seqs)
}

// ---------------------------------------------------------------------------------------------
// Encoding

fn encode_body(rows: &[StoredRow]) -> Vec<u8> {
    let mut body = Vec::with_capacity(rows.len() * 12 + 64);
    let mut sec = Vec::with_capacity(rows.len() * 4 + 16);

    // ts: first value, then first delta, then delta-of-deltas (prev_delta starts at 0 so the
    // first delta is written as is rather than as `delta - ts0`, which would be huge).
    let mut prev_ts = 0i64;
    let mut prev_delta = 0i64;
    for (i, r) in rows.iter().enumerate() {
        let delta = r.ts_ms.wrapping_sub(prev_ts);
        if i == 0 {
            put_varint(&mut sec, zigzag(r.ts_ms));
        } else {
            put_varint(&mut sec, zigzag(delta.wrapping_sub(prev_delta)));
            prev_delta = delta;
        }
        prev_ts = r.ts_ms;
    }
    end_section(&mut body, &mut sec);

    let mut prev = 0u64;
    for r in rows {
        put_varint(&mut sec, zigzag(r.rid.wrapping_sub(prev) as i64));
        prev = r.rid;
    }
    end_section(&mut body, &mut sec);

    let present = rows.iter().filter(|r| r.seq.is_some()).count();
    if present == 0 {
        sec.push(SEQ_NONE);
    } else if present == rows.len() {
        sec.push(SEQ_ALL);
    } else {
        sec.push(SEQ_BITMAP);
        put_bitmap(&mut sec, rows.iter().map(|r| r.seq.is_some()));
    }
    let mut prev = 0u64;
    for s in rows.iter().filter_map(|r| r.seq) {
        put_varint(&mut sec, zigzag(s.wrapping_sub(prev) as i64));
        prev = s;
    }
    end_section(&mut body, &mut sec);

    encode_metrics(rows, &mut sec);
    end_section(&mut body, &mut sec);

    encode_tags(rows, &mut sec);
    end_section(&mut body, &mut sec);
    body
}

/// Appends `sec` to `body` behind its length, and empties it for the next section.
fn end_section(body: &mut Vec<u8>, sec: &mut Vec<u8>) {
    put_varint(body, sec.len() as u64);
    body.extend_from_slice(sec);
    sec.clear();
}

fn encode_metrics(rows: &[StoredRow], out: &mut Vec<u8>) {
    let mut names: Vec<&str> = Vec::new();
    let mut name_ix: HashMap<&str, u32> = HashMap::new();
    let mut columns: Vec<Vec<MetricValue>> = Vec::new();
    let mut shapes: Vec<Vec<u32>> = Vec::new();
    let mut shape_ix: HashMap<Vec<u32>, u32> = HashMap::new();
    let mut row_shapes: Vec<u32> = Vec::with_capacity(rows.len());
    let mut cur: Vec<u32> = Vec::new();
    let mut prev_shape = usize::MAX;

    for r in rows {
        cur.clear();
        for (j, (name, value)) in r.metrics.iter().enumerate() {
            // Rows of one device nearly always repeat the previous row's names in the same
            // order: compare against that first and hash only on a miss.
            let guess = shapes
                .get(prev_shape)
                .and_then(|s| s.get(j))
                .copied()
                .filter(|&ix| names[ix as usize] == name.as_str());
            let ix = match guess {
                Some(ix) => ix,
                None => *name_ix.entry(name.as_str()).or_insert_with(|| {
                    names.push(name.as_str());
                    columns.push(Vec::new());
                    (names.len() - 1) as u32
                }),
            };
            cur.push(ix);
            columns[ix as usize].push(*value);
        }
        let same_as_prev = shapes.get(prev_shape).is_some_and(|s| *s == cur);
        let s = if same_as_prev {
            prev_shape as u32
        } else if let Some(&s) = shape_ix.get(cur.as_slice()) {
            s
        } else {
            let s = shapes.len() as u32;
            shapes.push(cur.clone());
            shape_ix.insert(cur.clone(), s);
            s
        };
        row_shapes.push(s);
        prev_shape = s as usize;
    }

    put_varint(out, names.len() as u64);
    for name in &names {
        put_str(out, name);
    }
    put_varint(out, shapes.len() as u64);
    for shape in &shapes {
        put_varint(out, shape.len() as u64);
        for &ix in shape {
            put_varint(out, u64::from(ix));
        }
    }
    if shapes.len() > 1 {
        for &s in &row_shapes {
            put_varint(out, u64::from(s));
        }
    }
    for column in &columns {
        encode_column(column, out);
    }
}

fn kind_of(v: &MetricValue) -> u8 {
    match v {
        MetricValue::Int(_) => KIND_INT,
        MetricValue::UInt(_) => KIND_UINT,
        MetricValue::Float(_) => KIND_FLOAT,
        MetricValue::Bool(_) => KIND_BOOL,
    }
}

fn encode_column(values: &[MetricValue], out: &mut Vec<u8>) {
    let first = values.first().map_or(KIND_INT, kind_of);
    if values.iter().all(|v| kind_of(v) == first) {
        out.push(first);
    } else {
        out.push(KIND_MIXED);
        out.extend(values.iter().map(kind_of));
    }
    put_ints(
        out,
        values.iter().filter_map(|v| match v {
            MetricValue::Int(i) => Some(*i),
            _ => None,
        }),
    );
    // UInt values are above i64::MAX; reinterpreting them as i64 keeps wrapping deltas exact
    // and small when the values are close.
    put_ints(
        out,
        values.iter().filter_map(|v| match v {
            MetricValue::UInt(u) => Some(*u as i64),
            _ => None,
        }),
    );
    let floats = values.iter().filter_map(|v| match v {
        MetricValue::Float(f) => Some(*f),
        _ => None,
    });
    if floats.clone().next().is_some() {
        put_floats(out, floats);
    }
    let bools = values.iter().filter_map(|v| match v {
        MetricValue::Bool(b) => Some(*b),
        _ => None,
    });
    put_bitmap(out, bools);
}

fn put_ints(out: &mut Vec<u8>, ints: impl Iterator<Item = i64>) {
    let mut prev = 0i64;
    for i in ints {
        put_varint(out, zigzag(i.wrapping_sub(prev)));
        prev = i;
    }
}

/// `f` as an integer scaled by `10^k`, if that reproduces `f` bit for bit.
pub(super) fn scaled(f: f64, k: usize) -> Option<i64> {
    let x = (f * POW10[k]).round();
    if x.is_nan() || x.abs() >= MAX_SCALED {
        return None;
    }
    let i = x as i64;
    (unscaled(i, k).to_bits() == f.to_bits()).then_some(i)
}

/// The decoder's side of [`scaled`]; the encoder checks exactly this expression.
pub(super) fn unscaled(i: i64, k: usize) -> f64 {
    i as f64 / POW10[k]
}

fn put_floats(out: &mut Vec<u8>, floats: impl Iterator<Item = f64> + Clone) {
    let mut ints = Vec::new();
    for k in 0..POW10.len() {
        ints.clear();
        let all = floats.clone().all(|f| match scaled(f, k) {
            Some(i) => {
                ints.push(i);
                true
            }
            None => false,
        });
        if all {
            out.push(k as u8);
            put_ints(out, ints.iter().copied());
            return;
        }
    }
    out.push(FLOAT_XOR);
    let n = floats.clone().count();
    let start = out.len();
    out.resize(start + 8 * n, 0);
    let planes = &mut out[start..];
    let mut prev = 0u64;
    for (i, f) in floats.enumerate() {
        let bits = f.to_bits();
        let x = bits ^ prev;
        prev = bits;
        for (b, byte) in x.to_le_bytes().into_iter().enumerate() {
            planes[b * n + i] = byte;
        }
    }
}

fn encode_tags(rows: &[StoredRow], out: &mut Vec<u8>) {
    let mut sets: Vec<&[(String, String)]> = Vec::new();
    let mut set_ix: HashMap<&[(String, String)], u32> = HashMap::new();
    let mut row_sets: Vec<u32> = Vec::with_capacity(rows.len());
    let mut prev: Option<u32> = None;
    for r in rows {
        let tags = r.tags.as_slice();
        let s = match prev {
            Some(p) if sets[p as usize] == tags => p,
            _ => *set_ix.entry(tags).or_insert_with(|| {
                sets.push(tags);
                (sets.len() - 1) as u32
            }),
        };
        row_sets.push(s);
        prev = Some(s);
    }
    put_varint(out, sets.len() as u64);
    for set in &sets {
        put_varint(out, set.len() as u64);
        for (k, v) in set.iter() {
            put_str(out, k);
            put_str(out, v);
        }
    }
    if sets.len() > 1 {
        for &s in &row_sets {
            put_varint(out, u64::from(s));
        }
    }
}

/// Appends `v` as LEB128: seven bits per byte, low first, the top bit set on all but the last.
/// Chunks, rollup rows and the journal's in-memory records all use it.
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn put_bitmap(out: &mut Vec<u8>, bits: impl Iterator<Item = bool>) {
    let mut byte = 0u8;
    let mut n = 0u32;
    for b in bits {
        byte |= u8::from(b) << (n % 8);
        n += 1;
        if n % 8 == 0 {
            out.push(byte);
            byte = 0;
        }
    }
    if n % 8 != 0 {
        out.push(byte);
    }
}

/// Signed to unsigned for varints: 0, -1, 1, -2, … → 0, 1, 2, 3, ….
pub(super) fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

/// The inverse of [`zigzag`].
pub(super) fn unzigzag(u: u64) -> i64 {
    ((u >> 1) as i64) ^ -((u & 1) as i64)
}

// ---------------------------------------------------------------------------------------------
// Decoding

/// Decompresses one zstd frame of at most `capacity` bytes with this thread's decompression
/// context, created on first use and reused: `zstd::bulk::decompress` creates and frees one
/// per call, which was 5 % of the CPU of a query for a device's last 1 000 readings (one
/// context per chunk read), and the query, duplicate-lookup and compaction threads each
/// decode chunk after chunk.
fn decompress(payload: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    thread_local! {
        static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        let d = match &mut *d {
            Some(d) => d,
            slot @ None => slot.insert(zstd::bulk::Decompressor::new()?),
        };
        d.decompress(payload, capacity)
    })
}

/// Checks the header and returns the row count and the verified, uncompressed body.
fn open(blob: &[u8]) -> Result<(usize, Cow<'_, [u8]>), ChunkError> {
    let mut h = Reader::new(blob, "header");
    let version = h.u8()?;
    if version != FORMAT_VERSION {
        return Err(ChunkError::UnsupportedVersion(version));
    }
    let codec = h.u8()?;
    let rows = h.varint()?;
    let body_len = h.varint()?;
    if body_len > MAX_UNCOMPRESSED_LEN as u64 {
        return Err(ChunkError::TooLarge(body_len));
    }
    let body_len = body_len as usize;
    let crc = h.bytes(4)?;
    let stored_crc = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    let payload = h.rest();
    let body: Cow<'_, [u8]> = match codec {
        CODEC_STORED => Cow::Borrowed(payload),
        // `body_len` is both the buffer reserved and the most zstd may write: a frame that
        // inflates further is an error, not an allocation.
        CODEC_ZSTD => Cow::Owned(decompress(payload, body_len).map_err(ChunkError::Decompress)?),
        other => return Err(ChunkError::UnknownCodec(other)),
    };
    if body.len() != body_len {
        return Err(ChunkError::Corrupt(format!(
            "header: body is {} bytes, header says {body_len}",
            body.len()
        )));
    }
    let actual = crc32fast::hash(&body);
    if actual != stored_crc {
        return Err(ChunkError::Checksum {
            stored: stored_crc,
            actual,
        });
    }
    // Every row takes at least one byte of the body (its ts), so a larger count is damage.
    if rows > body_len as u64 {
        return Err(ChunkError::Corrupt(format!(
            "header: {rows} rows cannot fit in a {body_len}-byte body"
        )));
    }
    Ok((rows as usize, body))
}

/// Decodes a verified body of `n` rows. `n` must be at most `body.len()`.
fn decode_body(body: &[u8], n: usize) -> Result<Vec<StoredRow>, ChunkError> {
    let mut r = Reader::new(body, "body");

    let mut s = r.section("ts")?;
    rows_fit(&s, n)?;
    let mut ts = Vec::with_capacity(n);
    let mut prev_ts = 0i64;
    let mut prev_delta = 0i64;
    for i in 0..n {
        let v = unzigzag(s.varint()?);
        let t = if i == 0 {
            v
        } else {
            prev_delta = prev_delta.wrapping_add(v);
            prev_ts.wrapping_add(prev_delta)
        };
        ts.push(t);
        prev_ts = t;
    }
    s.finish()?;

    let mut s = r.section("rid")?;
    let mut rids = Vec::with_capacity(n);
    let mut prev = 0u64;
    for _ in 0..n {
        prev = prev.wrapping_add(unzigzag(s.varint()?) as u64);
        rids.push(prev);
    }
    s.finish()?;

    let mut s = r.section("seq")?;
    let seqs = read_seqs(&mut s, n)?;
    s.finish()?;

    let mut s = r.section("metrics")?;
    let metrics = read_metrics(&mut s, n)?;
    s.finish()?;

    let mut s = r.section("tags")?;
    let tags = read_tags(&mut s, n)?;
    s.finish()?;
    r.finish()?;

    let mut rows = Vec::with_capacity(n);
    let mut cursors = vec![0usize; metrics.columns.len()];
    for i in 0..n {
        // Every index below was range-checked while reading; `get` keeps a slip an error.
        let corrupt = |what: &str| ChunkError::Corrupt(format!("metrics: {what} (row {i})"));
        let shape_ix = metrics.row_shapes.get(i).copied().unwrap_or(0);
        let shape = metrics
            .shapes
            .get(shape_ix)
            .ok_or_else(|| corrupt("no shape"))?;
        let mut row_metrics = Vec::with_capacity(shape.len());
        for &ix in shape {
            let (name, column, at) = match (
                metrics.names.get(ix),
                metrics.columns.get(ix),
                cursors.get_mut(ix),
            ) {
                (Some(name), Some(column), Some(at)) => (name, column, at),
                _ => return Err(corrupt("name index out of range")),
            };
            let value = *column
                .get(*at)
                .ok_or_else(|| corrupt("column ran out of values"))?;
            *at += 1;
            row_metrics.push(((*name).to_owned(), value));
        }
        let set = tags.row_sets.get(i).copied().unwrap_or(0);
        let row_tags = tags
            .sets
            .get(set)
            .ok_or_else(|| ChunkError::Corrupt(format!("tags: no tag set for row {i}")))?;
        rows.push(StoredRow {
            rid: rids[i],
            ts_ms: ts[i],
            seq: seqs[i],
            metrics: row_metrics,
            tags: row_tags
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        });
    }
    Ok(rows)
}

/// Every row takes at least one byte of the ts section: checking that before any per-row
/// `Vec` is sized keeps a damaged row count from allocating more than the body backs.
fn rows_fit(ts: &Reader<'_>, n: usize) -> Result<(), ChunkError> {
    ts.fits(n as u64, 1).map(|_| ())
}

fn read_seqs(s: &mut Reader<'_>, n: usize) -> Result<Vec<Option<u64>>, ChunkError> {
    let mode = s.u8()?;
    let bitmap = match mode {
        SEQ_NONE => return Ok(vec![None; n]),
        SEQ_ALL => None,
        SEQ_BITMAP => Some(s.bytes(n.div_ceil(8))?),
        other => return Err(s.err(&format!("unknown presence mode {other}"))),
    };
    let mut seqs = Vec::with_capacity(n);
    let mut prev = 0u64;
    for i in 0..n {
        let present = bitmap.is_none_or(|b| b[i / 8] >> (i % 8) & 1 == 1);
        if present {
            prev = prev.wrapping_add(unzigzag(s.varint()?) as u64);
            seqs.push(Some(prev));
        } else {
            seqs.push(None);
        }
    }
    Ok(seqs)
}

/// The metrics section, decoded by column; rows are assembled from it in `decode_body`.
struct Metrics<'a> {
    names: Vec<&'a str>,
    shapes: Vec<Vec<usize>>,
    /// Shape index per row; empty when there is one shape (every row has shape 0).
    row_shapes: Vec<usize>,
    columns: Vec<Vec<MetricValue>>,
}

fn read_metrics<'a>(s: &mut Reader<'a>, n: usize) -> Result<Metrics<'a>, ChunkError> {
    let n_names = s.count()?;
    let mut names = Vec::with_capacity(n_names);
    for _ in 0..n_names {
        names.push(s.str()?);
    }
    let n_shapes = s.count()?;
    let mut shapes = Vec::with_capacity(n_shapes);
    for _ in 0..n_shapes {
        let len = s.count()?;
        let mut shape = Vec::with_capacity(len);
        for _ in 0..len {
            let ix = s.varint()?;
            if ix >= n_names as u64 {
                return Err(s.err(&format!("name index {ix} of {n_names}")));
            }
            shape.push(ix as usize);
        }
        shapes.push(shape);
    }
    // How many rows use each shape, to know how many values each column holds.
    let mut uses = vec![0u64; n_shapes];
    let mut row_shapes = Vec::new();
    if n_shapes > 1 {
        row_shapes.reserve(n);
        for _ in 0..n {
            let ix = s.varint()?;
            if ix >= n_shapes as u64 {
                return Err(s.err(&format!("shape index {ix} of {n_shapes}")));
            }
            uses[ix as usize] += 1;
            row_shapes.push(ix as usize);
        }
    } else if n > 0 {
        match uses.first_mut() {
            Some(u) => *u = n as u64,
            None => return Err(s.err(&format!("{n} rows but no shapes"))),
        }
    }
    let mut counts = vec![0u64; n_names];
    for (shape, &u) in shapes.iter().zip(&uses) {
        for &ix in shape {
            counts[ix] = counts[ix].saturating_add(u);
        }
    }
    let mut columns = Vec::with_capacity(n_names);
    for &count in &counts {
        columns.push(read_column(s, count)?);
    }
    Ok(Metrics {
        names,
        shapes,
        row_shapes,
        columns,
    })
}

fn read_column(s: &mut Reader<'_>, count: u64) -> Result<Vec<MetricValue>, ChunkError> {
    let kind = s.u8()?;
    if kind != KIND_MIXED {
        let mut out = Vec::new();
        read_values(s, kind, count, &mut out)?;
        return Ok(out);
    }
    let kinds = s.bytes(s.fits(count, 1)?)?;
    let mut counts = [0u64; 4];
    for &k in kinds {
        match counts.get_mut(usize::from(k)) {
            Some(c) => *c += 1,
            None => return Err(s.err(&format!("unknown value type {k}"))),
        }
    }
    let mut parts: [Vec<MetricValue>; 4] = Default::default();
    for (k, part) in parts.iter_mut().enumerate() {
        read_values(s, k as u8, counts[k], part)?;
    }
    let mut iters = parts.map(|p| p.into_iter());
    let mut out = Vec::with_capacity(kinds.len());
    for &k in kinds {
        let v = iters[usize::from(k)]
            .next()
            .ok_or_else(|| s.err("mixed column ran out of values"))?;
        out.push(v);
    }
    Ok(out)
}

/// Reads `count` values of one `kind` onto `out`. Each reader first checks that the section
/// holds enough bytes for `count` values, so `count` never drives an allocation beyond what
/// the (bounded) body can back.
fn read_values(
    s: &mut Reader<'_>,
    kind: u8,
    count: u64,
    out: &mut Vec<MetricValue>,
) -> Result<(), ChunkError> {
    if count == 0 {
        return Ok(());
    }
    match kind {
        KIND_INT | KIND_UINT => {
            let n = s.fits(count, 1)?;
            out.reserve(n);
            let mut prev = 0i64;
            for _ in 0..n {
                prev = prev.wrapping_add(unzigzag(s.varint()?));
                out.push(if kind == KIND_INT {
                    MetricValue::Int(prev)
                } else {
                    MetricValue::UInt(prev as u64)
                });
            }
        }
        KIND_FLOAT => {
            let mode = s.u8()?;
            if mode == FLOAT_XOR {
                let n = s.fits(count, 8)?;
                let planes = s.bytes(8 * n)?;
                out.reserve(n);
                let mut prev = 0u64;
                for i in 0..n {
                    let mut b = [0u8; 8];
                    for (p, byte) in b.iter_mut().enumerate() {
                        *byte = planes[p * n + i];
                    }
                    prev ^= u64::from_le_bytes(b);
                    out.push(MetricValue::Float(f64::from_bits(prev)));
                }
            } else if usize::from(mode) < POW10.len() {
                let k = usize::from(mode);
                let n = s.fits(count, 1)?;
                out.reserve(n);
                let mut prev = 0i64;
                for _ in 0..n {
                    prev = prev.wrapping_add(unzigzag(s.varint()?));
                    out.push(MetricValue::Float(unscaled(prev, k)));
                }
            } else {
                return Err(s.err(&format!("unknown float mode {mode}")));
            }
        }
        KIND_BOOL => {
            let n = s.fits(count.div_ceil(8), 1)?;
            let bits = s.bytes(n)?;
            // `count <= 8 * n` here, so the reservation is backed by the section.
            let count = count as usize;
            out.reserve(count);
            for i in 0..count {
                out.push(MetricValue::Bool(bits[i / 8] >> (i % 8) & 1 == 1));
            }
        }
        other => return Err(s.err(&format!("unknown column kind {other}"))),
    }
    Ok(())
}

/// The tags section: the distinct tag sets and which one each row has.
struct Tags<'a> {
    sets: Vec<Vec<(&'a str, &'a str)>>,
    /// Set index per row; empty when there is one set (every row has set 0).
    row_sets: Vec<usize>,
}

fn read_tags<'a>(s: &mut Reader<'a>, n: usize) -> Result<Tags<'a>, ChunkError> {
    let n_sets = s.count()?;
    let mut sets = Vec::with_capacity(n_sets);
    for _ in 0..n_sets {
        let len = s.count()?;
        let mut set = Vec::with_capacity(len);
        for _ in 0..len {
            set.push((s.str()?, s.str()?));
        }
        sets.push(set);
    }
    let mut row_sets = Vec::new();
    if n_sets > 1 {
        row_sets.reserve(n);
        for _ in 0..n {
            let ix = s.varint()?;
            if ix >= n_sets as u64 {
                return Err(s.err(&format!("tag set index {ix} of {n_sets}")));
            }
            row_sets.push(ix as usize);
        }
    } else if n > 0 && n_sets == 0 {
        return Err(s.err(&format!("{n} rows but no tag sets")));
    }
    Ok(Tags { sets, row_sets })
}

/// A bounds-checked cursor over one part of a blob. Every read returns an error naming the
/// part (`what`) instead of panicking when the bytes run out or make no sense.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, pos: 0, what }
    }

    fn err(&self, msg: &str) -> ChunkError {
        ChunkError::Corrupt(format!("{}: {msg} at byte {}", self.what, self.pos))
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn u8(&mut self) -> Result<u8, ChunkError> {
        let b = *self
            .buf
            .get(self.pos)
            .ok_or_else(|| self.err("truncated"))?;
        self.pos += 1;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, ChunkError> {
        let mut v = 0u64;
        let mut shift = 0u32;
        loop {
            let b = self.u8()?;
            // The tenth byte may only carry the top bit of a u64.
            if shift == 63 && b > 1 {
                return Err(self.err("varint overflows 64 bits"));
            }
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
            shift += 7;
        }
    }

    /// `count` items of at least `min_bytes` each, if the rest of this part can hold them.
    fn fits(&self, count: u64, min_bytes: u64) -> Result<usize, ChunkError> {
        match count.checked_mul(min_bytes) {
            Some(need) if need <= self.remaining() as u64 => Ok(count as usize),
            _ => Err(self.err(&format!(
                "{count} values cannot fit in the {} bytes left",
                self.remaining()
            ))),
        }
    }

    /// A varint count of items that take at least one byte each (so it can size a `Vec`).
    fn count(&mut self) -> Result<usize, ChunkError> {
        let c = self.varint()?;
        self.fits(c, 1)
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], ChunkError> {
        if n > self.remaining() {
            return Err(self.err(&format!("needs {n} bytes, {} left", self.remaining())));
        }
        let b = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(b)
    }

    fn str(&mut self) -> Result<&'a str, ChunkError> {
        let len = self.varint()?;
        let len = usize::try_from(len).map_err(|_| self.err("string length overflows"))?;
        let b = self.bytes(len)?;
        std::str::from_utf8(b).map_err(|_| self.err("string is not UTF-8"))
    }

    fn rest(&mut self) -> &'a [u8] {
        let b = &self.buf[self.pos..];
        self.pos = self.buf.len();
        b
    }

    /// The next length-prefixed section, as its own reader.
    fn section(&mut self, what: &'static str) -> Result<Reader<'a>, ChunkError> {
        let len = self.varint()?;
        let len = usize::try_from(len).map_err(|_| self.err("section length overflows"))?;
        let buf = self.bytes(len).map_err(|_| {
            ChunkError::Corrupt(format!("{what}: section of {len} bytes is truncated"))
        })?;
        Ok(Reader::new(buf, what))
    }

    /// Insists that the whole part was read: leftovers mean the counts disagree.
    fn finish(&self) -> Result<(), ChunkError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(self.err(&format!("{} unread bytes", self.remaining())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// splitmix64: a tiny deterministic generator, so tests need no extra crate.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn unit(&mut self) -> f64 {
            (self.next() >> 11) as f64 / (1u64 << 53) as f64
        }
        /// Roughly normal, mean 0, sd 1 (sum of uniforms).
        fn normal(&mut self) -> f64 {
            (0..12).map(|_| self.unit()).sum::<f64>() - 6.0
        }
    }

    /// Bit-exact metric value comparison (`PartialEq` says `-0.0 == 0.0` and `NaN != NaN`).
    fn same_value(a: &MetricValue, b: &MetricValue) -> bool {
        match (a, b) {
            (MetricValue::Float(x), MetricValue::Float(y)) => x.to_bits() == y.to_bits(),
            _ => a == b,
        }
    }

    fn assert_identical(want: &[StoredRow], got: &[StoredRow]) {
        assert_eq!(want.len(), got.len(), "row count");
        for (i, (w, g)) in want.iter().zip(got).enumerate() {
            assert_eq!(w.rid, g.rid, "rid of row {i}");
            assert_eq!(w.ts_ms, g.ts_ms, "ts of row {i}");
            assert_eq!(w.seq, g.seq, "seq of row {i}");
            assert_eq!(w.tags, g.tags, "tags of row {i}");
            assert_eq!(w.metrics.len(), g.metrics.len(), "metric count of row {i}");
            for (j, ((wn, wv), (gn, gv))) in w.metrics.iter().zip(&g.metrics).enumerate() {
                assert_eq!(wn, gn, "name of metric {j} of row {i}");
                assert!(
                    same_value(wv, gv),
                    "metric {wn} of row {i}: wrote {wv:?}, read {gv:?}"
                );
            }
        }
    }

    fn round_trip(rows: &[StoredRow]) -> Vec<u8> {
        let blob = encode(rows);
        let back = decode(&blob).expect("decode");
        assert_identical(rows, &back);
        let seqs = decode_seqs(&blob).expect("decode_seqs");
        assert_eq!(seqs, rows.iter().map(|r| r.seq).collect::<Vec<_>>());
        blob
    }

    fn row(rid: u64, ts_ms: i64, seq: Option<u64>, metrics: &[(&str, MetricValue)]) -> StoredRow {
        StoredRow {
            rid,
            ts_ms,
            seq,
            metrics: metrics.iter().map(|(n, v)| (n.to_string(), *v)).collect(),
            tags: Vec::new(),
        }
    }

    use MetricValue::{Bool, Float, Int, UInt};

    #[test]
    fn empty_chunk_round_trips() {
        let blob = round_trip(&[]);
        assert_eq!(blob[0], FORMAT_VERSION);
        // zstd cannot shrink a 9-byte body: it is stored as is.
        assert_eq!(blob[1], CODEC_STORED);
        eprintln!("empty chunk: {} bytes", blob.len());
        assert!(decode(&blob).unwrap().is_empty());
        assert!(decode_seqs(&blob).unwrap().is_empty());
    }

    #[test]
    fn edge_values_round_trip_bit_exact() {
        let floats = [
            0.0,
            -0.0,
            0.1,
            -0.1,
            21.53,
            f64::MAX,
            f64::MIN,
            f64::MIN_POSITIVE,
            f64::from_bits(1), // smallest subnormal
            -f64::from_bits(0x000f_ffff_ffff_ffff),
            1e300,
            1e-300,
            std::f64::consts::PI,
            9_007_199_254_740_993.0,
            // Not produced by the parser (floats are finite), but the codec is total.
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::from_bits(0x7ff8_dead_beef_0001),
        ];
        let ints = [i64::MIN, i64::MAX, 0, -1, 1, i64::MIN + 1, i64::MAX - 1];
        let uints = [u64::MAX, i64::MAX as u64 + 1, u64::MAX - 1, 1 << 63 | 12345];
        let edge_ts = [
            i64::MIN,
            i64::MAX,
            0,
            -1,
            -1_700_000_000_000,
            i64::MAX,
            i64::MIN,
        ];
        let edge_u64 = [0, u64::MAX, 1, u64::MAX - 1, 1 << 63, 0, u64::MAX];
        let seqs = [
            None,
            Some(0),
            Some(u64::MAX),
            Some(1),
            None,
            Some(u64::MAX),
            Some(0),
        ];
        let mut rows = Vec::new();
        for i in 0..floats.len().max(ints.len()).max(edge_ts.len()) {
            let mut m = vec![
                ("f", Float(floats[i % floats.len()])),
                ("i", Int(ints[i % ints.len()])),
                ("u", UInt(uints[i % uints.len()])),
                ("b", Bool(i % 3 == 0)),
            ];
            if i % 2 == 1 {
                m.reverse();
            }
            rows.push(row(
                edge_u64[i % edge_u64.len()],
                edge_ts[i % edge_ts.len()],
                seqs[i % seqs.len()],
                &m,
            ));
        }
        round_trip(&rows);
        // One value per chunk too, so each edge is also a column's first value.
        for r in &rows {
            round_trip(std::slice::from_ref(r));
        }
    }

    #[test]
    fn float_columns_pick_decimal_or_xor() {
        let mode = |fs: &[f64]| {
            let mut out = Vec::new();
            put_floats(&mut out, fs.iter().copied());
            out[0]
        };
        assert_eq!(mode(&[21.0, 22.0, -3.0]), 0);
        assert_eq!(mode(&[0.1, 40.5, 41.0]), 1);
        assert_eq!(mode(&[21.53, 21.5, 22.0]), 2);
        assert_eq!(mode(&[3.712, 3.711]), 3);
        assert_eq!(mode(&[52.123456, 13.5]), 6);
        // -0.0 would come back as +0.0 from a scaled integer: bits decide, so XOR.
        assert_eq!(mode(&[21.5, -0.0]), FLOAT_XOR);
        assert_eq!(mode(&[std::f64::consts::E]), FLOAT_XOR);
        assert_eq!(mode(&[1e17]), FLOAT_XOR); // integral but not below 2^53 once scaled
        assert_eq!(mode(&[f64::NAN]), FLOAT_XOR);
        let rows: Vec<_> = [21.53, -0.0, 0.1, 1e17]
            .iter()
            .enumerate()
            .map(|(i, &f)| row(i as u64, i as i64, None, &[("t", Float(f))]))
            .collect();
        round_trip(&rows);
    }

    #[test]
    fn mixed_types_in_one_column() {
        let kinds = [
            Int(-5),
            Float(2.5),
            Bool(true),
            UInt(u64::MAX),
            Int(i64::MAX),
            Float(-0.0),
            Bool(false),
            Int(7),
            UInt(1 << 63),
            Float(0.25),
        ];
        let rows: Vec<_> = kinds
            .iter()
            .enumerate()
            .map(|(i, v)| {
                row(
                    100 + i as u64,
                    1000 * i as i64,
                    Some(i as u64),
                    &[("x", *v)],
                )
            })
            .collect();
        round_trip(&rows);
        // The same name twice in one row, with different types, keeps both in order.
        round_trip(&[row(
            1,
            1,
            None,
            &[("x", Int(1)), ("y", Bool(true)), ("x", Float(1.5))],
        )]);
    }

    #[test]
    fn rows_with_different_metric_sets_and_orders() {
        let rows = vec![
            row(1, 10, Some(1), &[("a", Int(1)), ("b", Float(0.5))]),
            row(2, 20, Some(2), &[("b", Float(0.75)), ("a", Int(2))]),
            row(3, 30, Some(3), &[("c", Bool(true))]),
            row(
                4,
                40,
                Some(4),
                &[
                    ("a", Int(3)),
                    ("b", Float(1.0)),
                    ("c", Bool(false)),
                    ("d", UInt(u64::MAX)),
                ],
            ),
            row(5, 50, Some(5), &[("a", Int(4)), ("b", Float(1.25))]),
            row(6, 50, None, &[("é_ünïcødé", Float(-1.5))]),
        ];
        round_trip(&rows);
    }

    #[test]
    fn sixteen_long_multibyte_tags_round_trip() {
        let value = |c: char, i: usize| -> String {
            std::iter::repeat_n(c, 127)
                .chain(char::from_digit((i % 10) as u32, 10))
                .collect()
        };
        let chars = ['é', 'ж', '漢', '😀'];
        let mut rows = Vec::new();
        for i in 0..40u64 {
            let tags = (0..16)
                .map(|k| {
                    let key: String = format!("key{k:02}_")
                        .chars()
                        .chain(std::iter::repeat('k'))
                        .take(64)
                        .collect();
                    // A few distinct sets, reused, plus some unique ones.
                    let v = value(chars[k % 4], if i % 5 == 0 { i as usize } else { k });
                    assert_eq!(v.chars().count(), 128);
                    (key, v)
                })
                .collect();
            let mut r = row(
                i,
                i as i64 * 1000,
                Some(i),
                &[("t", Float(20.0 + i as f64))],
            );
            r.tags = tags;
            if i % 7 == 3 {
                r.tags.clear();
            }
            rows.push(r);
        }
        round_trip(&rows);
    }

    #[test]
    fn decode_seqs_matches_decode() {
        let mut rng = Rng(7);
        for presence in [0u64, 1, 2] {
            let rows: Vec<_> = (0..300u64)
                .map(|i| {
                    let seq = match presence {
                        0 => None,
                        1 => Some(i * 3 + rng.below(2)),
                        _ => (rng.below(3) > 0).then(|| rng.next()),
                    };
                    row(i, i as i64, seq, &[("v", Int(i as i64))])
                })
                .collect();
            let blob = encode(&rows);
            let from_rows: Vec<_> = decode(&blob).unwrap().iter().map(|r| r.seq).collect();
            assert_eq!(decode_seqs(&blob).unwrap(), from_rows);
            assert_eq!(from_rows, rows.iter().map(|r| r.seq).collect::<Vec<_>>());
        }
    }

    /// Random rows: random names, orders, types, tags, seqs and timestamps.
    fn random_rows(rng: &mut Rng, n: usize) -> Vec<StoredRow> {
        let names = ["a", "bb", "temperature", "x", "ünï", "door_open"];
        let tag_vals = ["", "north", "süd", "東"];
        (0..n)
            .map(|_| {
                // Sometimes no metric at all: the store never writes such a row, but the
                // codec does not care.
                let metrics = (0..rng.below(6))
                    .map(|_| {
                        let name = names[rng.below(names.len() as u64) as usize].to_string();
                        let v = match rng.below(6) {
                            0 => Int(rng.next() as i64 >> rng.below(64)),
                            1 => UInt(rng.next() | 1 << 63),
                            2 => Float(f64::from_bits(rng.next())),
                            3 => Float((rng.below(20_000) as f64 - 10_000.0) / 100.0),
                            4 => Float(rng.normal() * 1e3),
                            _ => Bool(rng.below(2) == 0),
                        };
                        (name, v)
                    })
                    .collect();
                let tags = (0..rng.below(3))
                    .map(|k| {
                        (
                            format!("k{k}"),
                            tag_vals[rng.below(tag_vals.len() as u64) as usize].to_string(),
                        )
                    })
                    .collect();
                StoredRow {
                    rid: rng.next() >> rng.below(64),
                    ts_ms: rng.next() as i64 >> rng.below(64),
                    seq: (rng.below(4) > 0).then(|| rng.next() >> rng.below(64)),
                    metrics,
                    tags,
                }
            })
            .collect()
    }

    #[test]
    fn random_chunks_round_trip() {
        let mut rng = Rng(42);
        for n in [1, 2, 3, 7, 8, 9, 64, 300] {
            for _ in 0..20 {
                round_trip(&random_rows(&mut rng, n));
            }
        }
    }

    /// Corrupt blobs and bodies must give `Err` (or, rarely, some rows), never a panic.
    #[test]
    fn corruption_never_panics() {
        let mut rng = Rng(99);
        let mut rows = random_rows(&mut rng, 40);
        rows.extend(simulator_rows(&mut rng, 60));
        let blob = encode(&rows);
        assert_eq!(blob[1], CODEC_ZSTD);
        let probe = |b: &[u8]| {
            let _ = decode(b);
            let _ = decode_seqs(b);
        };
        for len in 0..blob.len() {
            assert!(decode(&blob[..len]).is_err(), "truncated to {len} decoded");
            probe(&blob[..len]);
        }
        for i in 0..blob.len() {
            for mask in [0x01u8, 0x80, 0xff, 0x55] {
                let mut b = blob.clone();
                b[i] ^= mask;
                probe(&b);
            }
        }

        // The checksum stops nearly everything above before the parser; hit the parser
        // directly with damaged bodies, too.
        let body = encode_body(&rows);
        let n = rows.len();
        assert_identical(&rows, &decode_body(&body, n).unwrap());
        for len in 0..body.len() {
            assert!(
                decode_body(&body[..len], n).is_err(),
                "body truncated to {len}"
            );
        }
        for i in 0..body.len() {
            for mask in [0x01u8, 0x02, 0x10, 0x80, 0xff] {
                let mut b = body.clone();
                b[i] ^= mask;
                let _ = decode_body(&b, n);
                let _ = decode_body(&b, (n + 1).min(b.len()));
                let _ = decode_body(&b, n - 1);
            }
        }
        for _ in 0..2000 {
            let mut b = body.clone();
            for _ in 0..1 + rng.below(8) {
                let i = rng.below(b.len() as u64) as usize;
                b[i] = rng.next() as u8;
            }
            let _ = decode_body(&b, n);
            let junk: Vec<u8> = (0..rng.below(64)).map(|_| rng.next() as u8).collect();
            let _ = decode_body(&junk, junk.len().min(rng.below(8) as usize));
            probe(&junk);
        }
    }

    #[test]
    fn header_errors_are_specific() {
        let blob = encode(&[row(1, 2, Some(3), &[("a", Int(1))])]);
        let mut b = blob.clone();
        b[0] = 2;
        assert!(matches!(decode(&b), Err(ChunkError::UnsupportedVersion(2))));
        let mut b = blob.clone();
        b[1] = 9;
        assert!(matches!(decode(&b), Err(ChunkError::UnknownCodec(9))));
        // version, codec, rows=1, body length 2^40 as a varint.
        let mut b = vec![FORMAT_VERSION, CODEC_ZSTD, 1];
        put_varint(&mut b, 1 << 40);
        b.extend_from_slice(&[0; 8]);
        assert!(matches!(decode(&b), Err(ChunkError::TooLarge(_))));
        assert!(matches!(decode_seqs(&b), Err(ChunkError::TooLarge(_))));
        let mut b = blob.clone();
        let last = b.len() - 1;
        b[last] ^= 0x40;
        assert!(decode(&b).is_err());
        assert!(matches!(decode(&[]), Err(ChunkError::Corrupt(_))));
        let msg = decode(&blob[..3]).unwrap_err().to_string();
        assert!(msg.starts_with("corrupt chunk: header:"), "{msg}");
    }

    /// One simulated sensor: ~1 s cadence with jitter, seq +1, four metrics, no tags; rids
    /// interleaved with other devices' readings.
    fn simulator_rows(rng: &mut Rng, n: usize) -> Vec<StoredRow> {
        let mut ts = 1_760_000_000_000i64;
        let mut rid = 5_000_000u64;
        let mut temp = 2150i64; // hundredths of °C
        let mut hum = 405i64; // tenths of %
        let mut battery = 3789i64; // mV
        let mut door = false;
        (0..n)
            .map(|i| {
                ts += 1000 + rng.below(41) as i64 - 20;
                rid += 1 + rng.below(200);
                temp += (rng.normal() * 3.0).round() as i64;
                hum += (rng.normal() * 1.5).round() as i64;
                if rng.below(20) == 0 {
                    battery -= 1;
                }
                door = if door {
                    rng.below(10) < 6
                } else {
                    rng.below(100) < 2
                };
                row(
                    rid,
                    ts,
                    Some(1000 + i as u64),
                    &[
                        ("temperature", Float(temp as f64 / 100.0)),
                        ("humidity", Float(hum as f64 / 10.0)),
                        ("battery", Float(battery as f64 / 1000.0)),
                        ("door_open", Bool(door)),
                    ],
                )
            })
            .collect()
    }

    /// Prints the size; sizes are measured, not asserted.
    #[test]
    fn simulator_like_chunk_size() {
        for n in [256, 1000, 8192] {
            let rows = simulator_rows(&mut Rng(1), n);
            let blob = round_trip(&rows);
            let body = encode_body(&rows).len();
            eprintln!(
                "simulator-like chunk, {n} rows: blob {} bytes = {:.2} bytes/row \
                 (body before zstd {body} bytes = {:.2} bytes/row, zstd level {ZSTD_LEVEL})",
                blob.len(),
                blob.len() as f64 / n as f64,
                body as f64 / n as f64,
            );
        }
    }

    /// The worst rows the reading limits allow cost under 32 KiB of body each, so 8,192 of
    /// them fit `MAX_UNCOMPRESSED_LEN`: every row 256 metrics with unique 64-byte names and
    /// random 10-byte integers, 16 unique tags of 64-byte keys and 128 four-byte characters,
    /// random rid/ts/seq. (Name indexes are already 3-byte varints at 1,000 rows, as at 8,192.)
    #[test]
    #[ignore = "slow: encodes ~30 MB; run with --ignored"]
    fn worst_case_rows_fit_the_limit() {
        let n = 1000;
        let mut rng = Rng(3);
        let rows: Vec<_> = (0..n as u64)
            .map(|i| StoredRow {
                rid: rng.next(),
                ts_ms: rng.next() as i64,
                seq: Some(rng.next()),
                metrics: (0..256)
                    .map(|j| {
                        (
                            format!("{i:08}_{j:04}_{}", "m".repeat(50)),
                            Int(rng.next() as i64),
                        )
                    })
                    .collect(),
                tags: (0..16)
                    .map(|k| {
                        (
                            format!("{i:08}_{k:04}_{}", "k".repeat(50)),
                            "😀".repeat(127) + &format!("{}", k % 10),
                        )
                    })
                    .collect(),
            })
            .collect();
        let body = encode_body(&rows).len();
        eprintln!(
            "worst case: {body} body bytes for {n} rows ({} per row)",
            body / n
        );
        assert!(body / n <= MAX_UNCOMPRESSED_LEN / 8192);
        assert_identical(&rows, &decode(&encode(&rows)).unwrap());
    }

    /// Prints encode/decode time; run in release: `cargo test --release --lib
    /// store::sqlite::chunk -- --ignored --nocapture speed`.
    #[test]
    #[ignore = "timing report, meaningful only in release"]
    fn speed_report() {
        let rows = simulator_rows(&mut Rng(1), 1000);
        let blob = encode(&rows);
        let iters = 2000u32;
        let t = std::time::Instant::now();
        for _ in 0..iters {
            std::hint::black_box(encode(std::hint::black_box(&rows)));
        }
        let enc = t.elapsed() / iters;
        let t = std::time::Instant::now();
        for _ in 0..iters {
            std::hint::black_box(decode(std::hint::black_box(&blob)).unwrap());
        }
        let dec = t.elapsed() / iters;
        let t = std::time::Instant::now();
        for _ in 0..iters {
            std::hint::black_box(decode_seqs(std::hint::black_box(&blob)).unwrap());
        }
        let seqs = t.elapsed() / iters;
        eprintln!("1000 simulator-like rows: encode {enc:?}, decode {dec:?}, decode_seqs {seqs:?}");
    }
}
