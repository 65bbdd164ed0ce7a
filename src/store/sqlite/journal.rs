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
//! In memory, a [`Gen`] (generation: one segment) keeps each reading as a compact record in
//! one arena (its seq, and metric names replaced by a per-generation dictionary id), an
//! [`Entry`] per reading with its time and a link to its device's next reading, and one slot
//! per device. Queries and duplicate lookups follow a device's links; compaction groups a
//! sealed generation's readings by device in two sequential passes instead
//! ([`Gen::by_device`]), turns them into chunks, and then the segment files are deleted.

use std::fs::{File, OpenOptions};
use std::hash::BuildHasher;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use hashbrown::HashTable;

use super::chunk::{put_varint, scaled, unscaled, unzigzag, zigzag, POW10};
use crate::reading::{MetricValue, Reading};
use crate::store::{StoreError, StoredRow};

/// First bytes of every frame.
const MAGIC: &[u8; 4] = b"SLJ1";
/// Frame header: magic, body length, checksum.
const HEADER: usize = 12;
/// Largest frame body recovery accepts (a batch is far smaller); bounds what a corrupt length
/// could make it allocate.
const MAX_FRAME: usize = 1 << 30;

/// One reading of a generation: 16 bytes. Entries are kept in arrival order (a reading's
/// index in its generation is its position), and each links to its device's next reading in
/// the generation. A per-device `Vec` would cost more than the readings at 100 000 devices,
/// which hold about three readings each per generation. The reading's seq is in its record
/// (see [`Gen`]), not here: only duplicate lookups that the seq window cannot answer read it,
/// and the entry is held for every reading until compaction.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    /// Device timestamp, epoch ms.
    pub ts_ms: i64,
    /// Offset of the reading's record in the generation's arena.
    off: u32,
    /// Index of the device's next reading in this generation ([`END`] for none), with
    /// [`HAS_SEQ`] in the top bit. A generation holds far fewer than 2^31 readings: it is
    /// sealed at `storage.journal_seal_readings` or 1 GiB of records and device names, and a
    /// record takes at least 4 bytes.
    next_flags: u32,
}

/// The bit of [`Entry::next_flags`] that says the reading has a seq.
const HAS_SEQ: u32 = 1 << 31;
/// The link of a device's last reading in a generation.
const END: u32 = !HAS_SEQ;

impl Entry {
    /// Whether the reading has a seq (in its record).
    fn has_seq(&self) -> bool {
        self.next_flags & HAS_SEQ != 0
    }

    /// The index of the device's next reading in this generation.
    fn next(&self) -> u32 {
        self.next_flags & !HAS_SEQ
    }
}

/// One device of a generation: where its name is and its first and last readings.
#[derive(Debug, Clone, Copy)]
struct Slot {
    /// Offset of its name in [`Gen::names`].
    name_off: u32,
    /// Index of its first reading.
    first: u32,
    /// Index of its last reading (whose link is appended to).
    last: u32,
    /// Length of its name in bytes (device ids are at most 128).
    name_len: u8,
    /// Commit time (server clock, epoch ms) of its newest reading here.
    last_seen_ms: i64,
}

/// Most [`Gen::successor`] reserves for one buffer, as its elements' bytes (64 MiB; the
/// device table's own overhead aside): several times what a default generation
/// (`storage.journal_seal_readings` = 262 144) of 4-metric readings uses.
pub const SUCCESSOR_ROOM_MAX: usize = 64 << 20;

/// A generation: the readings of one journal segment, in memory.
///
/// A segment's frames are not kept as they are. Each reading becomes a *record* in one
/// arena, without what is kept elsewhere (its device, which its slot names, and its time,
/// which its [`Entry`] holds) and with metric names replaced by their index in the
/// generation's dictionary:
///
/// ```text
/// record = slot (varint) | seq (varint, only if the entry says it has one)
///          | metrics (u16 n, (name id varint, value as put_record_value) × n)
///          | tags (u8 n, (u8 len, key, u16 len, value) × n)
/// ```
///
/// Values take a type byte and a varint where they can ([`put_record_value`]): a float with
/// at most six decimals, as sensors send them, is its scaled integer. With the simulator's
/// four metrics a record is about 22 bytes (about 40 with every number in 9 bytes), against
/// 100 in the frame.
/// Per reading, memory holds its record, its 16-byte [`Entry`] and a share of its device's
/// 24-byte slot, name and table entry: what bounds RSS when compaction falls behind.
#[derive(Debug, Default)]
pub struct Gen {
    /// Generation number; also the segment file's name. Readings get `rid = id << 32 | idx`.
    pub id: u64,
    /// Readings held.
    pub readings: u32,
    /// Records, back to back in index order.
    arena: Vec<u8>,
    /// Per reading, by index.
    entries: Vec<Entry>,
    /// Per device, in order of first arrival.
    slots: Vec<Slot>,
    /// Device names, back to back.
    names: String,
    /// Slot indices, by device name.
    by_name: HashTable<u32>,
    /// Metric names, by id.
    metric_names: Vec<Box<str>>,
    /// Metric ids, by name.
    metric_ids: HashTable<u32>,
    /// The metric id at each position of the last reading filed: consecutive readings
    /// usually name the same metrics in the same order, so most names are matched by one
    /// comparison instead of a hash lookup.
    recent: Vec<u32>,
    /// Seeded per generation, so that chosen device ids cannot collide on purpose.
    hasher: foldhash::fast::RandomState,
}

/// A device's readings in one generation.
#[derive(Debug, Clone, Copy)]
pub struct Device<'g> {
    gen: &'g Gen,
    slot: &'g Slot,
}

impl<'g> Device<'g> {
    /// The device id.
    pub fn name(&self) -> &'g str {
        self.gen.slot_name(self.slot)
    }

    /// Commit time (server clock, epoch ms) of the device's newest reading here.
    pub fn last_seen_ms(&self) -> i64 {
        self.slot.last_seen_ms
    }

    /// Its readings in arrival order: `(index in the generation, entry)`.
    pub fn entries(&self) -> Entries<'g> {
        Entries {
            entries: &self.gen.entries,
            next: self.slot.first,
        }
    }
}

/// Iterator over a device's readings in a generation; see [`Device::entries`].
pub struct Entries<'g> {
    entries: &'g [Entry],
    next: u32,
}

impl Iterator for Entries<'_> {
    type Item = (u32, Entry);

    fn next(&mut self) -> Option<(u32, Entry)> {
        let idx = self.next;
        let e = *self.entries.get(idx as usize)?;
        self.next = e.next();
        Some((idx, e))
    }
}

impl Gen {
    /// An empty generation.
    pub fn new(id: u64) -> Self {
        Self {
            id,
            ..Self::default()
        }
    }

    /// The next generation, `id + 1`, empty, with room for as many readings, bytes and
    /// devices as this one holds (plus an eighth), up to [`SUCCESSOR_ROOM_MAX`] per buffer.
    ///
    /// Under steady load each generation looks like the last, so the active one does not
    /// reallocate while commits file into it (one that outgrows its room still grows as a
    /// `Vec` does). Without this its buffers doubled in place (copying up to ~10 MB and
    /// faulting the new pages in) inside a commit, under the journal's write lock, a few
    /// times per generation. Capacity that is never written costs address space, not memory;
    /// the cap keeps that modest after an unusually large generation (one sealed at the
    /// arena's 1 GiB limit, say).
    pub fn successor(&self) -> Self {
        fn room<T>(n: usize) -> usize {
            (n + n / 8).min(SUCCESSOR_ROOM_MAX / std::mem::size_of::<T>().max(1))
        }
        let mut next = Self::new(self.id + 1);
        next.arena.reserve(room::<u8>(self.arena.len()));
        next.entries.reserve(room::<Entry>(self.entries.len()));
        next.slots.reserve(room::<Slot>(self.slots.len()));
        next.names.reserve(room::<u8>(self.names.len()));
        next.by_name = HashTable::with_capacity(room::<u32>(self.by_name.len()));
        next
    }

    /// The reading id of the `idx`-th reading of this generation.
    pub fn rid(&self, idx: u32) -> u64 {
        (self.id << 32) | u64::from(idx)
    }

    /// Bytes of records and device names held: what the seal limit counts, since both are
    /// addressed with `u32` offsets.
    pub fn arena_len(&self) -> usize {
        self.arena.len() + self.names.len()
    }

    fn slot_name(&self, s: &Slot) -> &str {
        let start = s.name_off as usize;
        self.names
            .get(start..start + usize::from(s.name_len))
            .unwrap_or("")
    }

    /// The device's readings here, if it has any.
    pub fn device(&self, name: &str) -> Option<Device<'_>> {
        let h = self.hasher.hash_one(name);
        let &i = self
            .by_name
            .find(h, |&i| self.slot_name(&self.slots[i as usize]) == name)?;
        Some(Device {
            gen: self,
            slot: &self.slots[i as usize],
        })
    }

    /// The device in slot `slot` (see [`ByDevice`]), if there is one.
    pub fn device_at(&self, slot: u32) -> Option<Device<'_>> {
        Some(Device {
            gen: self,
            slot: self.slots.get(slot as usize)?,
        })
    }

    /// Every device with readings here, in order of first arrival.
    pub fn devices(&self) -> impl Iterator<Item = Device<'_>> {
        self.slots
            .iter()
            .map(move |slot| Device { gen: self, slot })
    }

    /// The entry of reading `idx`, its seq, and its record after the seq.
    fn record(&self, idx: u32) -> Result<(Entry, Option<u64>, Dec<'_>), StoreError> {
        let e = *self
            .entries
            .get(idx as usize)
            .ok_or_else(|| corrupt("reading index beyond the generation"))?;
        let (seq, d) = self.seq_of(e)?;
        Ok((e, seq, d))
    }

    /// The seq in `e`'s record, and the record after it.
    fn seq_of(&self, e: Entry) -> Result<(Option<u64>, Dec<'_>), StoreError> {
        let rest = self
            .arena
            .get(e.off as usize..)
            .ok_or_else(|| corrupt("record offset beyond the arena"))?;
        let mut d = Dec::new(rest);
        d.varint()?;
        let seq = if e.has_seq() {
            Some(d.varint64()?)
        } else {
            None
        };
        Ok((seq, d))
    }

    fn metric_name(&self, id: u32) -> Result<&str, StoreError> {
        self.metric_names
            .get(id as usize)
            .map(|n| &**n)
            .ok_or_else(|| corrupt("unknown metric id"))
    }

    /// The readings grouped by device, and the devices in name order, for compaction: see
    /// [`ByDevice`].
    ///
    /// Two passes in index order: one reads each record's slot (the head of the record, and
    /// records lie back to back in index order, so both `entries` and `arena` are read
    /// sequentially) and counts the readings per slot; the other places each index in its
    /// slot's range (a counting sort). Following each device's links instead is one cache miss
    /// per reading once a generation outgrows the cache (~16 MB at 262 144 readings): that
    /// walk was 12 % of the compaction thread's time at 1 000 devices. (At 100 000 devices
    /// the name lookups in every generation of a batch that the sorted lists replace were
    /// 8 %, about what sorting each generation's names costs: no change was measured there.)
    ///
    /// Transient memory: 8 bytes per reading and 8 per device while it runs, besides what it
    /// returns.
    pub fn by_device(&self) -> Result<ByDevice, StoreError> {
        let mut starts = vec![0u32; self.slots.len() + 1];
        // Each reading's slot, by index.
        let mut slots = Vec::with_capacity(self.entries.len());
        for e in &self.entries {
            let head = self
                .arena
                .get(e.off as usize..)
                .ok_or_else(|| corrupt("record offset beyond the arena"))?;
            let slot = Dec::new(head).varint()?;
            *(slot as usize)
                .checked_add(1)
                .and_then(|s| starts.get_mut(s))
                .ok_or_else(|| corrupt("record names a slot beyond the generation"))? += 1;
            slots.push(slot);
        }
        for i in 1..starts.len() {
            starts[i] += starts[i - 1];
        }
        let mut next = starts.clone();
        let mut placed = vec![0u32; slots.len()];
        for (idx, &slot) in slots.iter().enumerate() {
            // In range: every slot was counted above, so its cursor stays below its end.
            let at = &mut next[slot as usize];
            placed[*at as usize] = idx as u32;
            *at += 1;
        }
        let mut by_name: Vec<u32> = (0..self.slots.len() as u32).collect();
        by_name.sort_unstable_by(|&a, &b| {
            self.slot_name(&self.slots[a as usize])
                .cmp(self.slot_name(&self.slots[b as usize]))
        });
        Ok(ByDevice {
            order: placed,
            starts,
            by_name,
        })
    }

    /// Decodes readings `idxs` onto `out`, in that order. The indices usually lie far apart
    /// in a large generation: each entry is prefetched [`PREFETCH_AHEAD`] × 2 readings ahead,
    /// and its record once its entry is at hand, so that the cache misses overlap instead of
    /// being waited out one by one.
    pub fn rows_into(&self, idxs: &[u32], out: &mut Vec<StoredRow>) -> Result<(), StoreError> {
        out.reserve(idxs.len());
        for (k, &idx) in idxs.iter().enumerate() {
            if let Some(&far) = idxs.get(k + 2 * PREFETCH_AHEAD) {
                prefetch(self.entries.as_ptr().wrapping_add(far as usize));
            }
            if let Some(e) = idxs
                .get(k + PREFETCH_AHEAD)
                .and_then(|&near| self.entries.get(near as usize))
            {
                prefetch(self.arena.as_ptr().wrapping_add(e.off as usize));
            }
            out.push(self.row(idx)?);
        }
        Ok(())
    }

    /// Prefetches the entries of readings `idxs` and, with `records`, their records too
    /// (reading the entries for their offsets: call it once the entries were prefetched
    /// before). For compaction at many devices, where one device's readings are too few for
    /// [`Gen::rows_into`]'s own look-ahead: it warms the devices to come. Only the first
    /// `2 × PREFETCH_AHEAD` readings: past them, `rows_into` looks ahead itself.
    pub fn prefetch_rows(&self, idxs: &[u32], records: bool) {
        for &idx in idxs.iter().take(2 * PREFETCH_AHEAD) {
            let entry = self.entries.as_ptr().wrapping_add(idx as usize);
            match self.entries.get(idx as usize) {
                Some(e) if records => prefetch(self.arena.as_ptr().wrapping_add(e.off as usize)),
                _ => prefetch(entry),
            }
        }
    }

    /// Decodes reading `idx`.
    pub fn row(&self, idx: u32) -> Result<StoredRow, StoreError> {
        let (e, seq, mut d) = self.record(idx)?;
        let n = d.u16()? as usize;
        let mut metrics = Vec::with_capacity(n);
        for _ in 0..n {
            let name = self.metric_name(d.varint()?)?.to_owned();
            metrics.push((name, d.record_value()?));
        }
        Ok(StoredRow {
            rid: self.rid(idx),
            ts_ms: e.ts_ms,
            seq,
            metrics,
            tags: decode_tags(&mut d)?,
        })
    }

    /// Appends reading `idx` to `out` in a form that needs nothing of this generation, for
    /// [`decode_bytes`] to decode later, outside the journal lock.
    pub fn copy_row(&self, idx: u32, out: &mut Vec<u8>) -> Result<(), StoreError> {
        let (e, seq, mut d) = self.record(idx)?;
        put_head(out, e.ts_ms, seq);
        let n = d.u16()?;
        out.extend_from_slice(&n.to_le_bytes());
        for _ in 0..n {
            put_str8(out, self.metric_name(d.varint()?)?);
            put_value(out, d.record_value()?);
        }
        let tags = d.pos;
        skip_tags(&mut d)?;
        out.extend_from_slice(&d.b[tags..d.pos]);
        Ok(())
    }

    /// Readings in commit order from index `idx`, at most `max`, each with its device, for
    /// the NATS outbox.
    pub fn in_order(&self, idx: u32, max: usize) -> Result<Vec<(String, StoredRow)>, StoreError> {
        let end = self.readings.min(idx.saturating_add(max as u32));
        let mut out = Vec::with_capacity(end.saturating_sub(idx) as usize);
        for i in idx..end {
            let e = self.entries[i as usize];
            let mut d = Dec::new(self.arena.get(e.off as usize..).unwrap_or_default());
            let slot = self
                .slots
                .get(d.varint()? as usize)
                .ok_or_else(|| corrupt("unknown device slot"))?;
            out.push((self.slot_name(slot).to_owned(), self.row(i)?));
        }
        Ok(out)
    }

    /// Whether this generation holds `(device, seq)`.
    pub fn contains(&self, device: &str, seq: u64) -> bool {
        self.device(device).is_some_and(|d| {
            d.entries()
                .any(|(_, e)| e.has_seq() && matches!(self.seq_of(e), Ok((Some(s), _)) if s == seq))
        })
    }

    /// The metric id of `name`, the `pos`-th metric of the reading being filed.
    fn metric_id(&mut self, pos: usize, name: &str) -> u32 {
        if let Some(&id) = self.recent.get(pos) {
            if &*self.metric_names[id as usize] == name {
                return id;
            }
        }
        let Self {
            metric_names,
            metric_ids,
            hasher,
            recent,
            ..
        } = self;
        let h = hasher.hash_one(name);
        let id = match metric_ids.find(h, |&i| &*metric_names[i as usize] == name) {
            Some(&i) => i,
            None => {
                let i = metric_names.len() as u32;
                metric_names.push(name.into());
                metric_ids.insert_unique(h, i, |&j| hasher.hash_one(&*metric_names[j as usize]));
                i
            }
        };
        if pos < recent.len() {
            recent[pos] = id;
        } else if pos == recent.len() {
            recent.push(id);
        }
        id
    }

    /// Files one reading that is durable in the segment.
    fn file<'a>(
        &mut self,
        device: &str,
        ts_ms: i64,
        seq: Option<u64>,
        metrics: impl Iterator<Item = (&'a str, MetricValue)>,
        tags: impl Iterator<Item = (&'a str, &'a str)>,
        commit_ms: i64,
    ) {
        let idx = self.readings;
        self.readings += 1;
        let h = self.hasher.hash_one(device);
        let found = {
            let (slots, names) = (&self.slots, &self.names);
            self.by_name
                .find(h, |&i| {
                    let s = &slots[i as usize];
                    let start = s.name_off as usize;
                    names.get(start..start + usize::from(s.name_len)) == Some(device)
                })
                .copied()
        };
        let slot = match found {
            Some(i) => {
                let s = &mut self.slots[i as usize];
                let last = s.last as usize;
                s.last = idx;
                s.last_seen_ms = s.last_seen_ms.max(commit_ms);
                let link = &mut self.entries[last].next_flags;
                *link = (*link & HAS_SEQ) | idx;
                i
            }
            None => {
                let i = self.slots.len() as u32;
                let name = &device.as_bytes()[..device.len().min(255)];
                let name = std::str::from_utf8(name).unwrap_or(device);
                self.slots.push(Slot {
                    name_off: self.names.len() as u32,
                    first: idx,
                    last: idx,
                    name_len: name.len() as u8,
                    last_seen_ms: commit_ms,
                });
                self.names.push_str(name);
                let Self {
                    by_name,
                    slots,
                    names,
                    hasher,
                    ..
                } = self;
                by_name.insert_unique(h, i, |&j| {
                    let s = &slots[j as usize];
                    let start = s.name_off as usize;
                    hasher.hash_one(&names[start..start + usize::from(s.name_len)])
                });
                i
            }
        };
        let off = self.arena.len() as u32;
        put_varint(&mut self.arena, u64::from(slot));
        if let Some(s) = seq {
            put_varint(&mut self.arena, s);
        }
        let count_at = self.arena.len();
        self.arena.extend_from_slice(&[0, 0]);
        let mut n = 0u16;
        for (pos, (name, value)) in metrics.enumerate() {
            let id = self.metric_id(pos, name);
            put_varint(&mut self.arena, u64::from(id));
            put_record_value(&mut self.arena, value);
            n += 1;
        }
        self.arena[count_at..count_at + 2].copy_from_slice(&n.to_le_bytes());
        let tags_at = self.arena.len();
        self.arena.push(0);
        let mut t = 0u8;
        for (k, v) in tags {
            put_str8(&mut self.arena, k);
            self.arena
                .extend_from_slice(&(v.len() as u16).to_le_bytes());
            self.arena.extend_from_slice(v.as_bytes());
            t += 1;
        }
        self.arena[tags_at] = t;
        self.entries.push(Entry {
            ts_ms,
            off,
            next_flags: END | if seq.is_some() { HAS_SEQ } else { 0 },
        });
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
    /// The batch position of each reading encoded, in order.
    filed: Vec<usize>,
    /// The commit's server time: every reading's `last_seen`.
    commit_ms: i64,
}

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
        encode_reading(&mut self.buf, r);
        self.filed.push(pos);
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

    /// Files the frame's readings into `gen` (after the frame is durable). `reading(pos)`
    /// gives the batch's reading at `pos`.
    pub fn apply<'a>(&self, gen: &mut Gen, reading: impl Fn(usize) -> &'a Reading) {
        for &pos in &self.filed {
            let r = reading(pos);
            gen.file(
                r.device_id.as_str(),
                r.ts_ms,
                r.seq,
                r.metrics.iter().map(|(n, v)| (n.as_str(), *v)),
                r.tags.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                self.commit_ms,
            );
        }
    }
}

/// Reads a segment back into a generation.
///
/// A crash can only tear the end of a segment: the frame being written when it happened,
/// which was never acknowledged. So a bad frame with nothing valid after it is cut off (the
/// file truncated there, if `repair`). A bad frame *followed* by valid frames is damage to
/// acknowledged data: it is refused with [`StoreError::Corrupt`], naming the file and
/// offset, and the file is left as it is. So is a frame that passes its checksum but does
/// not decode (written whole, so acknowledged). Returns the generation and whether it was cut.
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
                // A torn write fails the checksum. A frame that passes it was written whole
                // and synced, so its readings were acknowledged: one that does not decode is
                // damage or a bug, never a tail to cut (nor half-filed: the generation goes).
                if let Err(e) = file_body(&mut gen, body) {
                    return Err(StoreError::Corrupt(format!(
                        "journal segment {}: the frame at byte {pos} passes its checksum but \
                         cannot be decoded ({e}); its readings were acknowledged. Sluice will \
                         not start on it: restore the file, or move it out of the journal \
                         directory to start without its readings",
                        path.display()
                    )));
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
                "journal segment {}: the frame at byte {pos} is damaged but valid frames follow \
                 (at byte {next}); cutting it would lose acknowledged readings. Sluice will not \
                 start on it: restore the file, or move it out of the journal directory to \
                 start without its readings",
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
    let mut metrics: Vec<(&str, MetricValue)> = Vec::new();
    let mut tags: Vec<(&str, &str)> = Vec::new();
    for _ in 0..count {
        let device = d.str8()?;
        let (ts_ms, seq) = decode_head(&mut d)?;
        metrics.clear();
        for _ in 0..d.u16()? {
            let name = d.str8()?;
            metrics.push((name, d.value()?));
        }
        tags.clear();
        for _ in 0..d.u8()? {
            let k = d.str8()?;
            let len = d.u16()? as usize;
            let v =
                std::str::from_utf8(d.take(len)?).map_err(|_| corrupt("tag value is not UTF-8"))?;
            tags.push((k, v));
        }
        gen.file(
            device,
            ts_ms,
            seq,
            metrics.iter().copied(),
            tags.iter().copied(),
            commit_ms,
        );
    }
    Ok(())
}

/// How many readings ahead [`Gen::rows_into`] prefetches records (and twice as far, entries).
const PREFETCH_AHEAD: usize = 8;

/// Asks the CPU to bring the cache line at `p` in; a hint only, on x86-64 (elsewhere
/// nothing). `p` may point anywhere, even past an allocation: a prefetch never faults.
#[inline(always)]
fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `prefetch` reads nothing and cannot fault, whatever the address; SSE, which it
    // needs, is part of every x86-64 CPU.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// A generation's reading indices grouped by device slot ([`Gen::by_device`]): slot `s`'s
/// readings, in arrival order, are `order[starts[s]..starts[s + 1]]`; and its slots in
/// device name order. 4 bytes per reading plus 8 per device (about 1.9 MB for 262 144
/// readings of 100 000 devices), held only while a compaction runs.
pub struct ByDevice {
    /// Reading indices, slot by slot.
    order: Vec<u32>,
    /// Where each slot's indices begin in `order`, plus the end.
    starts: Vec<u32>,
    /// Slot indices, sorted by device name.
    by_name: Vec<u32>,
}

impl ByDevice {
    /// Slot indices in device name order.
    pub fn by_name(&self) -> &[u32] {
        &self.by_name
    }

    /// Slot `slot`'s reading indices, in arrival order (empty for a slot out of range).
    pub fn slot(&self, slot: usize) -> &[u32] {
        match (self.starts.get(slot), self.starts.get(slot + 1)) {
            (Some(&a), Some(&b)) => self.order.get(a as usize..b as usize).unwrap_or(&[]),
            _ => &[],
        }
    }
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("journal: {what}"))
}

/// Appends one reading's encoding.
fn encode_reading(buf: &mut Vec<u8>, r: &Reading) {
    put_str8(buf, r.device_id.as_str());
    put_head(buf, r.ts_ms, r.seq);
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

/// Appends a reading's time and seq as frames encode them.
fn put_head(buf: &mut Vec<u8>, ts_ms: i64, seq: Option<u64>) {
    buf.extend_from_slice(&ts_ms.to_le_bytes());
    match seq {
        Some(s) => {
            buf.push(1);
            buf.extend_from_slice(&s.to_le_bytes());
        }
        None => buf.push(0),
    }
}

/// Reads what [`put_head`] wrote.
fn decode_head(d: &mut Dec<'_>) -> Result<(i64, Option<u64>), StoreError> {
    let ts_ms = d.i64()?;
    let seq = match d.u8()? {
        0 => None,
        1 => Some(d.u64()?),
        _ => return Err(corrupt("bad seq flag")),
    };
    Ok((ts_ms, seq))
}

/// Decodes one reading as [`Gen::copy_row`] wrote it (a frame's reading after its device).
pub fn decode_bytes(b: &[u8], rid: u64) -> Result<StoredRow, StoreError> {
    let mut d = Dec::new(b);
    let (ts_ms, seq) = decode_head(&mut d)?;
    let n = d.u16()? as usize;
    let mut metrics = Vec::with_capacity(n.min(256));
    for _ in 0..n {
        let name = d.str8()?.to_owned();
        metrics.push((name, d.value()?));
    }
    Ok(StoredRow {
        rid,
        ts_ms,
        seq,
        metrics,
        tags: decode_tags(&mut d)?,
    })
}

/// Decodes a tag section: `u8 n, (str8 key, u16 len, value) × n`.
fn decode_tags(d: &mut Dec<'_>) -> Result<Vec<(String, String)>, StoreError> {
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
    Ok(tags)
}

/// Moves past a tag section.
fn skip_tags(d: &mut Dec<'_>) -> Result<(), StoreError> {
    for _ in 0..d.u8()? {
        let n = d.u8()? as usize;
        d.take(n)?;
        let n = d.u16()? as usize;
        d.take(n)?;
    }
    Ok(())
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

/// [`put_record_value`]'s type bytes (in-memory records only; frames use [`put_value`]).
mod record_type {
    /// `i64`, zigzag varint.
    pub const INT: u8 = 0;
    /// `u64`, its 8 bytes little-endian (the parsers give `UInt` only above `i64::MAX`, where
    /// a varint would take 10).
    pub const UINT: u8 = 1;
    /// `f64`, its 8 bytes little-endian.
    pub const FLOAT: u8 = 2;
    /// `false`, no bytes.
    pub const FALSE: u8 = 3;
    /// `true`, no bytes.
    pub const TRUE: u8 = 4;
    /// `DECIMAL + k`, k in `0..=6`: an `f64` equal bit for bit to `m / 10^k`, `m` a zigzag
    /// varint below 2^53 in magnitude (the chunk format's decimal test, `chunk::scaled`).
    pub const DECIMAL: u8 = 5;
}

/// Appends a metric value to an in-memory record: a type byte ([`record_type`]) and, for
/// numbers, a varint where one fits. `21.37` takes 3 bytes, an integer between -64 and 63
/// takes 2; a float with more than six decimals, and a `u64` above `i64::MAX`, keep their 9.
/// Memory-only: frames on disk keep [`put_value`]'s fixed layout, so no file changes format.
pub fn put_record_value(buf: &mut Vec<u8>, v: MetricValue) {
    use record_type::*;
    match v {
        MetricValue::Int(i) => {
            buf.push(INT);
            put_varint(buf, zigzag(i));
        }
        MetricValue::UInt(u) => {
            buf.push(UINT);
            buf.extend_from_slice(&u.to_le_bytes());
        }
        MetricValue::Float(f) => {
            match (0..POW10.len()).find_map(|k| scaled(f, k).map(|m| (k, m))) {
                Some((k, m)) => {
                    buf.push(DECIMAL + k as u8);
                    put_varint(buf, zigzag(m));
                }
                None => {
                    buf.push(FLOAT);
                    buf.extend_from_slice(&f.to_bits().to_le_bytes());
                }
            }
        }
        MetricValue::Bool(b) => buf.push(if b { TRUE } else { FALSE }),
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
    /// A LEB128 `u32` as [`put_varint`] wrote it (at most five bytes).
    pub fn varint(&mut self) -> Result<u32, StoreError> {
        u32::try_from(self.varint64()?).map_err(|_| corrupt("varint too large for 32 bits"))
    }
    /// A LEB128 `u64` as [`put_varint`] wrote it (at most ten bytes).
    pub fn varint64(&mut self) -> Result<u64, StoreError> {
        let mut v = 0u64;
        for shift in (0..70).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f).checked_shl(shift).unwrap_or(0);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(corrupt("varint too long"))
    }
    /// A string with a one-byte length.
    pub fn str8(&mut self) -> Result<&'a str, StoreError> {
        let n = self.u8()? as usize;
        std::str::from_utf8(self.take(n)?).map_err(|_| corrupt("string is not UTF-8"))
    }
    /// A metric value as [`put_record_value`] wrote it.
    pub fn record_value(&mut self) -> Result<MetricValue, StoreError> {
        use record_type::*;
        Ok(match self.u8()? {
            INT => MetricValue::Int(unzigzag(self.varint64()?)),
            UINT => MetricValue::UInt(self.u64()?),
            FLOAT => MetricValue::Float(f64::from_bits(self.u64()?)),
            FALSE => MetricValue::Bool(false),
            TRUE => MetricValue::Bool(true),
            t if usize::from(t.wrapping_sub(DECIMAL)) < POW10.len() => MetricValue::Float(
                unscaled(unzigzag(self.varint64()?), usize::from(t - DECIMAL)),
            ),
            _ => return Err(corrupt("unknown value type in a record")),
        })
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

    /// `a` and `b` are the same value, floats bit for bit (so `-0.0` is not `0.0`).
    fn same(a: MetricValue, b: MetricValue) -> bool {
        match (a, b) {
            (MetricValue::Float(x), MetricValue::Float(y)) => x.to_bits() == y.to_bits(),
            _ => a == b,
        }
    }

    /// Prefetching is a hint: indices past the generation (a damaged grouping) neither panic
    /// nor fault, in either stage, and decoding afterwards is unchanged.
    #[test]
    fn prefetching_rows_is_harmless_for_any_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut seg = Segment::create(dir.path(), 1, false).expect("segment");
        let mut gen = Gen::new(1);
        let batch: Vec<Reading> = (0..5)
            .map(|i| reading("p", Some(i), MetricValue::Float(i as f64 / 10.0)))
            .collect();
        append_all(&mut seg, &mut gen, 1, &batch);
        for records in [false, true] {
            gen.prefetch_rows(&[0, 4, 5, u32::MAX], records);
        }
        let mut rows = Vec::new();
        gen.rows_into(&[0, 4], &mut rows).expect("rows");
        assert_eq!(
            rows.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [Some(0), Some(4)]
        );
    }

    /// Varints of every length read back and advance past exactly their bytes; ten bytes
    /// with the continuation bit set, or a varint cut short, are errors.
    #[test]
    fn varints_of_every_length_read_back_and_bad_ones_are_errors() {
        let mut values: Vec<u64> = (0..64).map(|b| 1u64 << b).collect();
        values.extend((0..64).map(|b| (1u64 << b) - 1));
        values.push(u64::MAX);
        for v in values {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            b.push(0xAB); // the next field, which must stay unread
            let mut d = Dec::new(&b);
            assert_eq!(d.varint64().expect("decodes"), v);
            assert_eq!(d.pos, b.len() - 1, "{v}: consumed its own bytes only");
            let mut cut = Dec::new(&b[..b.len() - 2]);
            assert!(cut.varint64().is_err(), "{v}: truncated");
        }
        let long = [0x80u8; 11];
        let err = Dec::new(&long).varint64().expect_err("too long");
        assert!(err.to_string().contains("varint too long"), "{err}");
        let mut at_end = Dec::new(&[0x01]);
        at_end.varint64().expect("one byte");
        assert!(at_end.varint64().is_err(), "nothing left");
    }

    /// Writes `v` as a record value and reads it back; returns the bytes it took.
    fn record_round_trip(v: MetricValue) -> usize {
        let mut b = Vec::new();
        put_record_value(&mut b, v);
        let mut d = Dec::new(&b);
        let back = d.record_value().expect("decodes");
        assert!(same(v, back), "{v:?} read back as {back:?}");
        assert!(d.done(), "{v:?}: bytes left over");
        b.len()
    }

    /// In-memory records keep every value exactly (integers at both ends of their ranges,
    /// `-0.0`, subnormals, floats with more decimals than the scales), and take few bytes for
    /// what sensors send. A damaged type byte is an error, not a panic.
    #[test]
    fn record_values_read_back_exactly_and_sensor_decimals_are_short() {
        use MetricValue::*;
        let edges = [
            Int(i64::MIN),
            Int(-1),
            Int(i64::MAX),
            UInt(0),
            UInt(u64::MAX),
            Float(-0.0),
            Float(0.0),
            Float(0.1),
            Float(1e300),
            Float(-f64::MAX),
            Float(f64::MIN_POSITIVE),
            Float(5e-324),
            Float(0.1234567),
            Float(9_007_199_254_740_993.0),
            Float(-123_456.789_012),
            Bool(true),
            Bool(false),
        ];
        for v in edges {
            record_round_trip(v);
        }
        // Shapes of the simulator's values: 2, 1, 2 and 3 decimals.
        assert_eq!(record_round_trip(Float(21.37)), 3);
        assert_eq!(record_round_trip(Float(-40.5)), 3);
        assert_eq!(record_round_trip(Float(3.7)), 2);
        assert_eq!(record_round_trip(Float(0.125)), 3);
        assert_eq!(record_round_trip(Int(5)), 2);
        assert_eq!(record_round_trip(Bool(true)), 1);
        assert_eq!(record_round_trip(UInt(u64::MAX)), 9);
        // More than six decimals, or -0.0, keep all 8 bytes of the float.
        assert_eq!(record_round_trip(Float(0.1234567)), 9);
        assert_eq!(record_round_trip(Float(-0.0)), 9);
        // Many more: arbitrary bit patterns, and decimals of every scale.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for i in 0..200_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let f = f64::from_bits(x);
            if f.is_finite() {
                record_round_trip(Float(f));
            }
            let k = (i % 7) as usize;
            let m = (x >> 11) as i64 * if i % 2 == 0 { 1 } else { -1 };
            record_round_trip(Float(m as f64 / POW10[k]));
            record_round_trip(Int(x as i64));
            record_round_trip(UInt(x));
        }
        let mut d = Dec::new(&[12, 0]);
        assert!(d.record_value().is_err());
        let mut d = Dec::new(&[record_type::DECIMAL + 2]);
        assert!(d.record_value().is_err(), "a truncated varint is an error");
    }

    /// Appends all of `batch` as one frame committed at `commit_ms` (to an empty `gen`), and
    /// files it, as a group commit does.
    fn append_all(seg: &mut Segment, gen: &mut Gen, commit_ms: i64, batch: &[Reading]) {
        let mut f = FrameBuilder::new(commit_ms, 0);
        for (i, r) in batch.iter().enumerate() {
            f.push(i, r);
        }
        seg.append(f.finish()).expect("append");
        f.apply(gen, |i| &batch[i]);
    }

    #[test]
    fn a_successor_is_empty_with_room_for_its_predecessor() {
        let batch: Vec<Reading> = (0..300)
            .map(|i| reading(&format!("dev-{}", i % 40), Some(i), MetricValue::Int(-7)))
            .collect();
        let mut gen = Gen::new(4);
        let mut f = FrameBuilder::new(5, 0);
        for (i, r) in batch.iter().enumerate() {
            f.push(i, r);
        }
        f.apply(&mut gen, |i| &batch[i]);
        let next = gen.successor();
        assert_eq!((next.id, next.readings, next.arena_len()), (5, 0, 0));
        assert_eq!(next.devices().count(), 0);
        assert!(next.device("dev-1").is_none());
        assert!(next.entries.capacity() >= gen.entries.len());
        assert!(next.arena.capacity() >= gen.arena.len());
        assert!(next.slots.capacity() >= gen.slots.len());
        assert!(next.names.capacity() >= gen.names.len());
        assert!(next.by_name.capacity() >= gen.by_name.len());
    }

    /// Found by a review: a frame that passed its checksum but failed to decode partway was
    /// treated as a torn tail, so its first readings stayed filed in memory (and could be
    /// compacted) while the file was cut before them. Such a frame was written whole, so its
    /// readings were acknowledged: replay refuses it, naming the offset, and leaves the file.
    #[test]
    fn a_checksummed_frame_that_does_not_decode_is_refused_not_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut seg = Segment::create(dir.path(), 4, true).expect("segment");
        let r = reading("a", Some(1), MetricValue::Float(21.5));
        let mut gen = Gen::new(4);
        append_all(&mut seg, &mut gen, 5, std::slice::from_ref(&r));
        let good = seg.len();
        // A second frame of two readings whose second one lost its last 3 bytes, with the
        // checksum computed over what is left: the first reading decodes, the second cannot.
        let mut f = FrameBuilder::new(6, 1);
        f.push(0, &r);
        f.push(1, &reading("b", Some(2), MetricValue::Int(7)));
        let whole = f.finish().to_vec();
        let body = &whole[HEADER..whole.len() - 3];
        let mut frame = MAGIC.to_vec();
        frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
        frame.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
        frame.extend_from_slice(body);
        let path = segment_path(dir.path(), 4);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut file| file.write_all(&frame))
            .expect("append");
        let len = std::fs::metadata(&path).expect("meta").len();

        let err = replay(&path, 4, true).expect_err("refused");
        let text = err.to_string();
        assert!(text.contains(&format!("frame at byte {good}")), "{text}");
        assert!(
            text.contains("passes its checksum but cannot be decoded"),
            "{text}"
        );
        assert!(!text.contains("  "), "one space between words: {text}");
        assert_eq!(
            std::fs::metadata(&path).expect("meta").len(),
            len,
            "file untouched"
        );
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
        append_all(&mut seg, &mut gen, 5, &batch);
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
            let (i, _) = back
                .device(dev)
                .expect("device")
                .entries()
                .next()
                .expect("entry");
            let (i2, _) = gen
                .device(dev)
                .expect("device")
                .entries()
                .next()
                .expect("entry");
            assert_eq!(back.row(i).expect("row"), gen.row(i2).expect("row"));
            assert_eq!(back.device(dev).expect("device").last_seen_ms(), 5);
        }
        let (i, _) = back
            .device("b")
            .expect("b")
            .entries()
            .next()
            .expect("entry");
        let row = back.row(i).expect("row");
        let MetricValue::Float(f) = row.metrics[0].1 else {
            panic!("float expected")
        };
        assert_eq!(f.to_bits(), (-0.0f64).to_bits());
        assert_eq!(row.rid, (7 << 32) | 1);
        assert!(back.contains("a", 1));
        assert!(!back.contains("a", 2));
    }

    #[test]
    fn each_device_links_its_readings_and_every_path_reads_them_back() {
        let batch: Vec<Reading> = (0..500u64)
            .map(|i| {
                let seq = (i % 3 != 0).then_some(i);
                let mut r = reading(&format!("d{}", i % 7), seq, MetricValue::Int(-(i as i64)));
                r.ts_ms += (i as i64 * 7919) % 1000;
                if i % 5 == 0 {
                    r.metrics.reverse(); // the same names in another order
                }
                if i % 11 == 0 {
                    r.metrics
                        .push((format!("extra{}", i % 4), MetricValue::UInt(i)));
                }
                if i % 13 == 0 {
                    r.tags.clear();
                }
                r
            })
            .collect();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut seg = Segment::create(dir.path(), 3, false).expect("segment");
        let mut gen = Gen::new(3);
        // Two frames, as two group commits would write them.
        for (first, part) in [(0usize, &batch[..200]), (200, &batch[200..])] {
            let mut f = FrameBuilder::new(9 + first as i64, first as u32);
            for i in 0..part.len() {
                f.push(first + i, &batch[first + i]);
            }
            seg.append(f.finish()).expect("append");
            f.apply(&mut gen, |i| &batch[i]);
        }
        let (back, cut) = replay(&segment_path(dir.path(), 3), 3, false).expect("replay");
        assert!(!cut);
        for g in [&gen, &back] {
            assert_eq!(g.readings, 500);
            assert_eq!(g.devices().count(), 7);
            for d in 0..7u32 {
                let dev = g.device(&format!("d{d}")).expect("device");
                let idx: Vec<u32> = dev.entries().map(|(i, _)| i).collect();
                let want: Vec<u32> = (0..500).filter(|i| i % 7 == d).collect();
                assert_eq!(idx, want, "device d{d}");
                let newest = *want.last().expect("readings");
                assert_eq!(dev.last_seen_ms(), if newest < 200 { 9 } else { 209 });
            }
            for (i, r) in batch.iter().enumerate() {
                let row = g.row(i as u32).expect("row");
                assert_eq!(
                    (row.rid, row.ts_ms, row.seq, &row.metrics, &row.tags),
                    (g.rid(i as u32), r.ts_ms, r.seq, &r.metrics, &r.tags),
                    "reading {i}"
                );
                let mut b = vec![0xff]; // copies append
                g.copy_row(i as u32, &mut b).expect("copy");
                assert_eq!(decode_bytes(&b[1..], row.rid).expect("decode"), row);
            }
            let tail = g.in_order(480, 50).expect("in order");
            assert_eq!(tail.len(), 20);
            for (k, (dev, row)) in tail.iter().enumerate() {
                assert_eq!(dev, batch[480 + k].device_id.as_str());
                assert_eq!(row.rid, g.rid(480 + k as u32));
            }
            assert!(g.contains("d1", 1) && g.contains("d2", 499));
            assert!(!g.contains("d0", 0) && !g.contains("d1", 2) && !g.contains("nope", 1));
        }
    }

    /// Compaction's grouping (a counting sort over the records) gives each device exactly the
    /// readings its links give, in the same order, with devices in name order; and
    /// `rows_into` decodes them as `row` does, with and without prefetching ahead.
    #[test]
    fn grouping_by_device_matches_the_links_and_names_sort() {
        // 2 000 readings over 300 devices (4 to 10 each), interleaved; then one device with
        // 100 readings, so that `rows_into` prefetches within a device's list.
        let batch: Vec<Reading> = (0..2100u64)
            .map(|i| {
                let d = if i < 2000 {
                    (i * 7919 + i / 3) % 300
                } else {
                    300
                };
                let mut r = reading(&format!("dev-{d:03}"), Some(i), MetricValue::UInt(i));
                r.ts_ms += i as i64;
                r
            })
            .collect();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut seg = Segment::create(dir.path(), 2, false).expect("segment");
        let mut gen = Gen::new(2);
        append_all(&mut seg, &mut gen, 5, &batch);
        let (back, _) = replay(&segment_path(dir.path(), 2), 2, false).expect("replay");
        for g in [&gen, &back] {
            let grouped = g.by_device().expect("grouping");
            let names: Vec<&str> = grouped
                .by_name()
                .iter()
                .map(|&s| g.device_at(s).expect("slot").name())
                .collect();
            let mut sorted: Vec<&str> = g.devices().map(|d| d.name()).collect();
            sorted.sort_unstable();
            assert_eq!(names, sorted);
            let mut seen = 0;
            for &slot in grouped.by_name() {
                let dev = g.device_at(slot).expect("slot");
                let linked: Vec<u32> = dev.entries().map(|(i, _)| i).collect();
                assert_eq!(grouped.slot(slot as usize), &linked[..], "{}", dev.name());
                let mut rows = Vec::new();
                g.rows_into(&linked, &mut rows).expect("rows");
                let want = linked
                    .iter()
                    .map(|&i| g.row(i))
                    .collect::<Result<Vec<_>, _>>()
                    .expect("row");
                assert_eq!(rows, want);
                seen += linked.len();
            }
            assert_eq!(seen, 2100);
            assert!(g.device_at(301).is_none() && grouped.slot(301).is_empty());
        }
    }

    /// Seqs are kept in the records as varints: the largest read back exactly, from memory
    /// and after replay, and duplicate lookups find them.
    #[test]
    fn seqs_of_every_size_read_back_and_are_found() {
        let seqs = [0, 1, 127, 128, 1 << 32, 1 << 63, u64::MAX - 1, u64::MAX];
        let mut batch: Vec<Reading> = seqs
            .iter()
            .map(|&s| reading("big", Some(s), MetricValue::UInt(s)))
            .collect();
        batch.push(reading("big", None, MetricValue::Int(0)));
        let dir = tempfile::tempdir().expect("tempdir");
        let mut seg = Segment::create(dir.path(), 5, false).expect("segment");
        let mut gen = Gen::new(5);
        append_all(&mut seg, &mut gen, 1, &batch);
        let (back, _) = replay(&segment_path(dir.path(), 5), 5, false).expect("replay");
        for g in [&gen, &back] {
            for (i, r) in batch.iter().enumerate() {
                let row = g.row(i as u32).expect("row");
                assert_eq!((row.seq, &row.metrics), (r.seq, &r.metrics), "reading {i}");
            }
            for s in seqs {
                assert!(g.contains("big", s), "seq {s}");
            }
            assert!(!g.contains("big", 2) && !g.contains("big", u64::MAX - 2));
        }
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
