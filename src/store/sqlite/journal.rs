//! The journal: the durability point of the embedded store. batcher → services → **journal**
//! → ack; compaction later moves what it holds into chunks.
//!
//! Each group commit appends one *frame* to the active segment file and syncs it (with
//! `storage.synchronous = "full"` or `"extra"`): the write is sequential and its size is the
//! bytes received, whatever the number of devices. The ack follows the sync (SPEC §2).
//!
//! On disk, `journal/<gen>.seg` holds frames:
//!
//! ```text
//! frame  = magic "SLJ1" | body_len u32 LE | crc32(body) u32 LE | body
//! body   = commit_ms i64 | first_idx u32 | count u32 | reading × count
//! reading = device (u8 len, bytes) | ts_ms i64 | seq (u8 0/1, u64) | metrics (u16 n, metric × n)
//!           | tags (u8 n, (u8 len, key, u16 len, value) × n)
//! metric = u8 name len | name | value (u8 type 0 int/1 uint/2 float/3 bool | 8 bytes or 1 byte)
//! ```
//!
//! Integers are little-endian. A frame whose checksum fails, or that was cut short, ends the
//! segment: it was never synced, so nothing it held was acknowledged, and recovery truncates it.
//!
//! In memory, a [`Gen`] (generation: one segment) keeps the readings' encodings in one arena
//! and, per device, an index of `(ts, seq, rid, offset)`. Queries and duplicate lookups read
//! this index; compaction turns a sealed generation into chunks, after which its segment file
//! is deleted.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::reading::{MetricValue, Reading};
use crate::store::{StoreError, StoredRow};

/// First bytes of every frame.
const MAGIC: &[u8; 4] = b"SLJ1";
/// Frame header: magic, body length, checksum.
const HEADER: usize = 12;
/// Largest frame body recovery accepts (a batch is far smaller); bounds what a corrupt length
/// could make it allocate.
const MAX_FRAME: usize = 1 << 30;

/// One reading's place in a generation, kept per device: 24 bytes, since a generation with
/// 100 000 devices holds one of these for every reading plus each device's `Vec` slack.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    /// Device timestamp, epoch ms.
    pub ts_ms: i64,
    /// The device's seq; meaningful only when [`HAS_SEQ`] is set in `idx_flags`.
    seq: u64,
    /// Index of the reading in its generation (`rid = gen << 32 | idx`), with [`HAS_SEQ`] in
    /// the top bit. A generation holds far fewer than 2^31 readings: it is sealed at
    /// `storage.journal_seal_readings` or 1 GiB of arena, and a reading takes at least 20 bytes.
    idx_flags: u32,
    /// Offset of the reading's encoding in the generation's arena.
    pub off: u32,
}

/// The bit of [`Entry::idx_flags`] that says the reading has a seq.
const HAS_SEQ: u32 = 1 << 31;

impl Entry {
    fn new(ts_ms: i64, seq: Option<u64>, idx: u32, off: u32) -> Self {
        debug_assert!(idx < HAS_SEQ, "generation index {idx} out of range");
        Self {
            ts_ms,
            seq: seq.unwrap_or(0),
            idx_flags: idx | if seq.is_some() { HAS_SEQ } else { 0 },
            off,
        }
    }

    /// Index of the reading in its generation.
    pub fn idx(&self) -> u32 {
        self.idx_flags & !HAS_SEQ
    }

    /// The device's seq, if it gave one.
    pub fn seq(&self) -> Option<u64> {
        (self.idx_flags & HAS_SEQ != 0).then_some(self.seq)
    }
}

/// What one generation holds for one device.
#[derive(Debug, Default, Clone)]
pub struct DeviceEntries {
    /// Readings in arrival order.
    pub entries: Vec<Entry>,
    /// Commit time (server clock, epoch ms) of this device's newest reading here.
    pub last_seen_ms: i64,
}

/// A generation: the readings of one journal segment, in memory.
#[derive(Debug, Default)]
pub struct Gen {
    /// Generation number; also the segment file's name. Readings get `rid = id << 32 | idx`.
    pub id: u64,
    /// Encoded readings, back to back (the frame bodies without their headers).
    pub arena: Vec<u8>,
    /// Device id → its readings in this generation.
    pub devices: foldhash::HashMap<String, DeviceEntries>,
    /// Readings held.
    pub readings: u32,
}

impl Gen {
    /// An empty generation.
    pub fn new(id: u64) -> Self {
        Self {
            id,
            ..Self::default()
        }
    }

    /// The reading id of the `idx`-th reading of this generation.
    pub fn rid(&self, idx: u32) -> u64 {
        (self.id << 32) | u64::from(idx)
    }

    /// Decodes the reading at `e` (its device is the key it is filed under).
    pub fn row(&self, e: &Entry) -> Result<StoredRow, StoreError> {
        let mut d = Dec::new(&self.arena[e.off as usize..]);
        let n = d.u8()? as usize;
        d.take(n)?; // the device: the caller knows it
        decode_row(&mut d, self.rid(e.idx()))
    }

    /// The encoded bytes of the reading at `e` (to decode later, outside a lock).
    pub fn bytes(&self, e: &Entry) -> Result<&[u8], StoreError> {
        let rest = self
            .arena
            .get(e.off as usize..)
            .ok_or_else(|| corrupt("entry offset beyond the arena"))?;
        let mut d = Dec::new(rest);
        skip_reading(&mut d)?;
        Ok(&rest[..d.pos])
    }

    /// Readings in commit order from index `idx`, at most `max`, each with its device, for
    /// the NATS outbox. The arena holds readings back to back in index order, so `off` (the
    /// arena offset of reading `idx`, if the caller kept it from an earlier call) saves a
    /// scan from the start. Returns the readings and the arena offset just past the last.
    pub fn in_order(
        &self,
        idx: u32,
        off: Option<usize>,
        max: usize,
    ) -> Result<(Vec<(String, StoredRow)>, usize), StoreError> {
        let mut d = Dec::new(&self.arena);
        match off {
            Some(off) => d.pos = off,
            None => {
                for _ in 0..idx {
                    skip_reading(&mut d)?;
                }
            }
        }
        let end = self.readings.min(idx.saturating_add(max as u32));
        let mut out = Vec::with_capacity(end.saturating_sub(idx) as usize);
        for i in idx..end {
            out.push(decode_reading(&mut d, self.rid(i))?);
        }
        Ok((out, d.pos))
    }

    /// Whether this generation holds `(device, seq)`.
    pub fn contains(&self, device: &str, seq: u64) -> bool {
        self.devices
            .get(device)
            .is_some_and(|d| d.entries.iter().any(|e| e.seq() == Some(seq)))
    }

    /// Files one encoded reading (already in the arena at `off`).
    fn file(&mut self, device: &str, ts_ms: i64, seq: Option<u64>, off: u32, commit_ms: i64) {
        let idx = self.readings;
        self.readings += 1;
        let slot = match self.devices.get_mut(device) {
            Some(s) => s,
            None => self.devices.entry(device.to_owned()).or_default(),
        };
        slot.entries.push(Entry::new(ts_ms, seq, idx, off));
        slot.last_seen_ms = slot.last_seen_ms.max(commit_ms);
    }
}

/// The path of generation `id`'s segment inside `dir`.
pub fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.seg"))
}

/// Segment files in `dir`, by generation, oldest first.
pub fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StoreError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".seg")) else {
            continue;
        };
        if let Ok(id) = stem.parse::<u64>() {
            out.push((id, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// An I/O error on a journal path, as a store error.
pub fn io_err(path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Journal(format!("{}: {e}", path.display()))
}

/// Syncs a directory, so that a file created or deleted in it survives a power loss.
pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, e))
}

/// The active segment being appended to.
pub struct Segment {
    /// Where it is.
    path: PathBuf,
    /// Open for appending.
    file: File,
    /// Bytes of whole frames written: where a failed append truncates back to.
    len: u64,
    /// Sync each frame (`synchronous = full | extra`).
    sync: bool,
}

impl Segment {
    /// Creates generation `id`'s segment in `dir` (and syncs the directory).
    pub fn create(dir: &Path, id: u64, sync: bool) -> Result<Self, StoreError> {
        let path = segment_path(dir, id);
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        if sync {
            sync_dir(dir)?;
        }
        Ok(Self {
            path,
            file,
            len: 0,
            sync,
        })
    }

    /// Writes one frame and, if configured, syncs it. On error the file is cut back to its
    /// last whole frame, so a later append does not follow a torn one.
    pub fn append(&mut self, frame: &[u8]) -> Result<(), StoreError> {
        let written = self.file.write_all(frame).and_then(|()| {
            if self.sync {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        match written {
            Ok(()) => {
                self.len += frame.len() as u64;
                Ok(())
            }
            Err(e) => {
                let _ = self.file.set_len(self.len);
                use std::io::Seek;
                let _ = self.file.seek(std::io::SeekFrom::Start(self.len));
                Err(io_err(&self.path, e))
            }
        }
    }

    /// Bytes of whole frames in the file.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether no frame was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A frame being built for one group commit: the readings that are new.
pub struct FrameBuilder {
    /// Header placeholder, then the body.
    buf: Vec<u8>,
    /// Readings encoded so far.
    count: u32,
    /// Per reading: (device, ts, seq, offset of its encoding within `buf`).
    filed: Vec<(usize, i64, Option<u64>, usize)>,
    /// The commit's server time: every reading's `last_seen`.
    commit_ms: i64,
}

/// Where the body's readings start within a frame buffer.
const BODY_READINGS: usize = HEADER + 16;

impl FrameBuilder {
    /// An empty frame for a commit at `commit_ms` whose first reading is `first_idx`.
    pub fn new(commit_ms: i64, first_idx: u32) -> Self {
        let mut buf = Vec::with_capacity(64 * 1024);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&[0; 8]);
        buf.extend_from_slice(&commit_ms.to_le_bytes());
        buf.extend_from_slice(&first_idx.to_le_bytes());
        buf.extend_from_slice(&[0; 4]);
        Self {
            buf,
            count: 0,
            filed: Vec::new(),
            commit_ms,
        }
    }

    /// Appends a reading; `pos` is its position in the batch (to find its device later).
    pub fn push(&mut self, pos: usize, r: &Reading) {
        let off = self.buf.len();
        encode_reading(&mut self.buf, r);
        self.filed.push((pos, r.ts_ms, r.seq, off));
        self.count += 1;
    }

    /// Readings in the frame.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The finished frame: header filled in.
    pub fn finish(&mut self) -> &[u8] {
        let body_len = (self.buf.len() - HEADER) as u32;
        self.buf[HEADER + 12..HEADER + 16].copy_from_slice(&self.count.to_le_bytes());
        let crc = crc32fast::hash(&self.buf[HEADER..]);
        self.buf[4..8].copy_from_slice(&body_len.to_le_bytes());
        self.buf[8..12].copy_from_slice(&crc.to_le_bytes());
        &self.buf
    }

    /// Files the frame's readings into `gen` (after the frame is durable). `device(pos)` gives
    /// the device id of the batch's reading at `pos`.
    pub fn apply<'a>(&self, gen: &mut Gen, device: impl Fn(usize) -> &'a str) {
        let base = gen.arena.len();
        gen.arena.extend_from_slice(&self.buf[BODY_READINGS..]);
        for &(pos, ts, seq, off) in &self.filed {
            let at = (base + off - BODY_READINGS) as u32;
            gen.file(device(pos), ts, seq, at, self.commit_ms);
        }
    }
}

/// Reads a segment back into a generation.
///
/// A crash can only tear the end of a segment: the frame being written when it happened,
/// which was never acknowledged. So a bad frame with nothing valid after it is cut off (the
/// file truncated there, if `repair`). A bad frame *followed* by valid frames is damage to
/// acknowledged data: it is refused with [`StoreError::Corrupt`], naming the file and
/// offset, and the file is left as it is. Returns the generation and whether it was cut.
pub fn replay(path: &Path, id: u64, repair: bool) -> Result<(Gen, bool), StoreError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| io_err(path, e))?;
    let mut gen = Gen::new(id);
    let mut pos = 0usize;
    let mut cut = false;
    while pos < bytes.len() {
        match parse_frame(&bytes[pos..]) {
            Some((body, total)) => {
                if file_body(&mut gen, body).is_err() {
                    cut = true;
                    break;
                }
                pos += total;
            }
            None => {
                cut = true;
                break;
            }
        }
    }
    if cut {
        if let Some(next) = next_valid_frame(&bytes, pos + 1) {
            return Err(StoreError::Corrupt(format!(
                "journal segment {}: the frame at byte {pos} is damaged but valid frames follow                  (at byte {next}); cutting it would lose acknowledged readings. Sluice will not                  start on it: restore the file, or move it out of the journal directory to                  start without its readings",
                path.display()
            )));
        }
        tracing::warn!(
            segment = %path.display(),
            valid_bytes = pos,
            file_bytes = bytes.len(),
            "journal segment ends in a torn or corrupt frame (never acknowledged); truncating"
        );
        if repair {
            let f = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| io_err(path, e))?;
            f.set_len(pos as u64).map_err(|e| io_err(path, e))?;
            f.sync_all().map_err(|e| io_err(path, e))?;
        }
    }
    Ok((gen, cut))
}

/// The offset of the first whole, checksummed frame at or after `from`, if any.
fn next_valid_frame(bytes: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    while at + HEADER <= bytes.len() {
        let i = bytes[at..].windows(4).position(|w| w == MAGIC)?;
        at += i;
        if parse_frame(&bytes[at..]).is_some() {
            return Some(at);
        }
        at += 1;
    }
    None
}

/// A whole, checksummed frame at the start of `b`: its body and total length.
fn parse_frame(b: &[u8]) -> Option<(&[u8], usize)> {
    if b.len() < HEADER || &b[..4] != MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(b[4..8].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(b[8..12].try_into().ok()?);
    if len > MAX_FRAME || b.len() < HEADER + len {
        return None;
    }
    let body = &b[HEADER..HEADER + len];
    (crc32fast::hash(body) == crc).then_some((body, HEADER + len))
}

/// Files a verified frame body's readings into `gen`.
fn file_body(gen: &mut Gen, body: &[u8]) -> Result<(), StoreError> {
    let mut d = Dec::new(body);
    let commit_ms = d.i64()?;
    let first_idx = d.u32()?;
    let count = d.u32()?;
    if first_idx != gen.readings {
        return Err(corrupt("frame out of order"));
    }
    let base = gen.arena.len();
    let readings = &body[16..];
    gen.arena.extend_from_slice(readings);
    let mut d = Dec::new(readings);
    for _ in 0..count {
        let off = d.pos;
        let (device, row) = decode_reading(&mut d, 0)?;
        gen.file(&device, row.ts_ms, row.seq, (base + off) as u32, commit_ms);
    }
    Ok(())
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("journal: {what}"))
}

/// Appends one reading's encoding.
fn encode_reading(buf: &mut Vec<u8>, r: &Reading) {
    put_str8(buf, r.device_id.as_str());
    buf.extend_from_slice(&r.ts_ms.to_le_bytes());
    match r.seq {
        Some(s) => {
            buf.push(1);
            buf.extend_from_slice(&s.to_le_bytes());
        }
        None => buf.push(0),
    }
    buf.extend_from_slice(&(r.metrics.len() as u16).to_le_bytes());
    for (name, value) in &r.metrics {
        put_str8(buf, name);
        put_value(buf, *value);
    }
    buf.push(r.tags.len() as u8);
    for (k, v) in &r.tags {
        put_str8(buf, k);
        buf.extend_from_slice(&(v.len() as u16).to_le_bytes());
        buf.extend_from_slice(v.as_bytes());
    }
}

/// Decodes one reading's bytes as [`Gen::bytes`] gave them.
pub fn decode_bytes(b: &[u8], rid: u64) -> Result<StoredRow, StoreError> {
    decode_reading(&mut Dec::new(b), rid).map(|(_, row)| row)
}

/// Moves past one reading without building it.
fn skip_reading(d: &mut Dec<'_>) -> Result<(), StoreError> {
    let n = d.u8()? as usize;
    d.take(n + 8)?;
    if d.u8()? == 1 {
        d.take(8)?;
    }
    for _ in 0..d.u16()? {
        let n = d.u8()? as usize;
        d.take(n)?;
        let width = if d.u8()? == 3 { 1 } else { 8 };
        d.take(width)?;
    }
    for _ in 0..d.u8()? {
        let n = d.u8()? as usize;
        d.take(n)?;
        let n = d.u16()? as usize;
        d.take(n)?;
    }
    Ok(())
}

/// Decodes one reading: its device and the row (with `rid`).
fn decode_reading(d: &mut Dec<'_>, rid: u64) -> Result<(String, StoredRow), StoreError> {
    let device = d.str8()?.to_owned();
    Ok((device, decode_row(d, rid)?))
}

/// Decodes a reading's encoding after its device.
fn decode_row(d: &mut Dec<'_>, rid: u64) -> Result<StoredRow, StoreError> {
    let ts_ms = d.i64()?;
    let seq = match d.u8()? {
        0 => None,
        1 => Some(d.u64()?),
        _ => return Err(corrupt("bad seq flag")),
    };
    let n = d.u16()? as usize;
    let mut metrics = Vec::with_capacity(n.min(256));
    for _ in 0..n {
        let name = d.str8()?.to_owned();
        metrics.push((name, d.value()?));
    }
    let n = d.u8()? as usize;
    let mut tags = Vec::with_capacity(n);
    for _ in 0..n {
        let k = d.str8()?.to_owned();
        let len = d.u16()? as usize;
        let v = std::str::from_utf8(d.take(len)?)
            .map_err(|_| corrupt("tag value is not UTF-8"))?
            .to_owned();
        tags.push((k, v));
    }
    Ok(StoredRow {
        rid,
        ts_ms,
        seq,
        metrics,
        tags,
    })
}

/// Appends a string of at most 255 bytes with a one-byte length.
pub fn put_str8(buf: &mut Vec<u8>, s: &str) {
    let b = &s.as_bytes()[..s.len().min(255)];
    buf.push(b.len() as u8);
    buf.extend_from_slice(b);
}

/// Appends a metric value: a type byte, then 8 bytes (1 for a boolean).
pub fn put_value(buf: &mut Vec<u8>, v: MetricValue) {
    match v {
        MetricValue::Int(i) => {
            buf.push(0);
            buf.extend_from_slice(&i.to_le_bytes());
        }
        MetricValue::UInt(u) => {
            buf.push(1);
            buf.extend_from_slice(&u.to_le_bytes());
        }
        MetricValue::Float(f) => {
            buf.push(2);
            buf.extend_from_slice(&f.to_bits().to_le_bytes());
        }
        MetricValue::Bool(b) => {
            buf.push(3);
            buf.push(u8::from(b));
        }
    }
}

/// A bounds-checked little-endian reader. Every read of stored bytes goes through it, so a
/// corrupt file gives an error, never a panic.
pub struct Dec<'a> {
    /// The bytes.
    b: &'a [u8],
    /// Next position.
    pub pos: usize,
}

impl<'a> Dec<'a> {
    /// Reads `b` from its start.
    pub fn new(b: &'a [u8]) -> Self {
        Self { b, pos: 0 }
    }

    /// Whether every byte was read.
    pub fn done(&self) -> bool {
        self.pos >= self.b.len()
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| corrupt("truncated"))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self) -> Result<[u8; N], StoreError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    /// One byte.
    pub fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1)?[0])
    }
    /// A u16.
    pub fn u16(&mut self) -> Result<u16, StoreError> {
        Ok(u16::from_le_bytes(self.arr()?))
    }
    /// A u32.
    pub fn u32(&mut self) -> Result<u32, StoreError> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    /// A u64.
    pub fn u64(&mut self) -> Result<u64, StoreError> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    /// An i64.
    pub fn i64(&mut self) -> Result<i64, StoreError> {
        Ok(i64::from_le_bytes(self.arr()?))
    }
    /// A string with a one-byte length.
    pub fn str8(&mut self) -> Result<&'a str, StoreError> {
        let n = self.u8()? as usize;
        std::str::from_utf8(self.take(n)?).map_err(|_| corrupt("string is not UTF-8"))
    }
    /// A metric value as [`put_value`] wrote it.
    pub fn value(&mut self) -> Result<MetricValue, StoreError> {
        Ok(match self.u8()? {
            0 => MetricValue::Int(self.i64()?),
            1 => MetricValue::UInt(self.u64()?),
            2 => MetricValue::Float(f64::from_bits(self.u64()?)),
            3 => MetricValue::Bool(self.u8()? != 0),
            _ => return Err(corrupt("unknown value type")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::DeviceId;

    fn reading(dev: &str, seq: Option<u64>, v: MetricValue) -> Reading {
        Reading {
            device_id: DeviceId::parse(dev).expect("device"),
            ts_ms: 1_700_000_000_000,
            seq,
            metrics: vec![("m".into(), v), ("b".into(), MetricValue::Bool(true))],
            tags: vec![("site".into(), "nörth".repeat(20))],
        }
    }

    #[test]
    fn frames_replay_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut seg = Segment::create(dir.path(), 7, true).expect("segment");
        let batch = [
            reading("a", Some(1), MetricValue::UInt(u64::MAX)),
            reading("b", None, MetricValue::Float(-0.0)),
        ];
        let mut gen = Gen::new(7);
        let mut f = FrameBuilder::new(5, 0);
        for (i, r) in batch.iter().enumerate() {
            f.push(i, r);
        }
        seg.append(f.finish()).expect("append");
        f.apply(&mut gen, |i| batch[i].device_id.as_str());
        let good = seg.len();
        // A second frame that is only half written.
        let mut f2 = FrameBuilder::new(6, 2);
        f2.push(0, &batch[0]);
        let frame = f2.finish().to_vec();
        std::fs::OpenOptions::new()
            .append(true)
            .open(segment_path(dir.path(), 7))
            .and_then(|mut file| file.write_all(&frame[..frame.len() / 2]))
            .expect("torn write");

        let (back, cut) = replay(&segment_path(dir.path(), 7), 7, true).expect("replay");
        assert!(cut);
        assert_eq!(back.readings, 2);
        assert_eq!(
            std::fs::metadata(segment_path(dir.path(), 7))
                .expect("meta")
                .len(),
            good
        );
        for dev in ["a", "b"] {
            let e = &back.devices[dev].entries[0];
            let e2 = &gen.devices[dev].entries[0];
            assert_eq!(back.row(e).expect("row"), gen.row(e2).expect("row"));
            assert_eq!(back.devices[dev].last_seen_ms, 5);
        }
        let row = back.row(&back.devices["b"].entries[0]).expect("row");
        let MetricValue::Float(f) = row.metrics[0].1 else {
            panic!("float expected")
        };
        assert_eq!(f.to_bits(), (-0.0f64).to_bits());
        assert_eq!(row.rid, (7 << 32) | 1);
        assert!(back.contains("a", 1));
        assert!(!back.contains("a", 2));
    }

    #[test]
    fn damage_before_the_last_frame_is_refused_and_in_the_last_is_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut seg = Segment::create(dir.path(), 1, false).expect("segment");
        let r = reading("a", Some(1), MetricValue::Int(i64::MIN));
        let mut last_start = 0;
        for i in 0..3u32 {
            last_start = seg.len() as usize;
            let mut f = FrameBuilder::new(1, i);
            f.push(0, &r);
            seg.append(f.finish()).expect("append");
        }
        let path = segment_path(dir.path(), 1);
        let bytes = std::fs::read(&path).expect("read");
        for at in 0..bytes.len() {
            let mut b = bytes.clone();
            b[at] ^= 0x5a;
            std::fs::write(&path, &b).expect("write");
            let replayed = replay(&path, 1, false);
            if at < last_start {
                let err = replayed.expect_err("damage followed by valid frames is refused");
                assert!(err.to_string().contains("valid frames follow"), "{err}");
            } else {
                let (gen, cut) = replayed.expect("a damaged last frame is a torn tail");
                assert!(cut);
                assert_eq!(gen.readings, 2, "byte {at}");
            }
        }
    }
}
