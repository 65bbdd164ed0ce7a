//! The embedded store's NATS outbox (SPEC §13): commit → journal → **outbox** → NATS
//! publisher. Only present with `nats.enabled`.
//!
//! The journal already holds every committed reading in commit order, so the outbox is a
//! cursor over it, not a second copy:
//!
//! - A position is a reading id, `gen << 32 | idx`: the first reading NATS has not yet
//!   acknowledged. It is kept in memory and persisted to `outbox/CURSOR` (written to a
//!   temporary file and renamed) at most every [`PERSIST_EVERY`], at every generation change
//!   and at shutdown. A crash loses at most that much progress: those readings are re-sent,
//!   with the same `Nats-Msg-Id`, and JetStream's duplicate window drops them.
//! - Compaction normally deletes a generation's segment once its chunks are committed. While
//!   the outbox still needs it, compaction *moves* it to `outbox/<gen>.<count>.seg` instead
//!   (a rename, before the generation leaves memory, so the publisher always finds it in one
//!   of the two places). The publisher deletes it once it has advanced past it. Retention
//!   drops chunks, never these files: an unpublished reading outlives its retention.
//! - A backlog is on disk, not in memory: at most one outbox segment is loaded at a time.
//!
//! Readings committed before the outbox was first enabled are not published: the cursor
//! starts at the next generation. A generation compacted while NATS was disabled is skipped.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::journal::{self, Gen};
use super::Shared;
use crate::store::{Outbox, OutboxItem, StoreError};

/// The cursor is written to disk at most this often while publishing.
pub const PERSIST_EVERY: Duration = Duration::from_millis(200);

/// The cursor file inside the outbox directory.
const CURSOR: &str = "CURSOR";

/// The store's id file: random, made with the outbox, so that `Nats-Msg-Id`s of readings
/// without seq differ between stores (two replicas, or a data directory made again).
const STORE_ID: &str = "STORE_ID";

/// The generation of a position.
fn gen_of(pos: u64) -> u64 {
    pos >> 32
}

/// The index within its generation of a position.
fn idx_of(pos: u64) -> u32 {
    pos as u32
}

/// What the compactor and the publisher share about the outbox.
#[derive(Debug)]
pub struct OutboxState {
    /// `data_dir/outbox`.
    dir: PathBuf,
    /// The first position not yet acknowledged by NATS.
    acked: AtomicU64,
    /// Generations kept in the outbox directory: gen → readings in it.
    files: Mutex<BTreeMap<u64, u32>>,
    /// This store's id (see [`STORE_ID`]).
    store_id: String,
}

impl OutboxState {
    /// Opens (creating) `dir`: reads the cursor, writing it if it is new (at `fresh`, the
    /// first generation this process will write), deletes segments already published, and
    /// lists the others.
    pub fn open(dir: &Path, fresh: u64) -> Result<Self, StoreError> {
        fs::create_dir_all(dir).map_err(|e| journal::io_err(dir, e))?;
        let path = dir.join(CURSOR);
        let acked = match fs::read_to_string(&path) {
            Ok(text) => match text.trim().parse::<u64>() {
                Ok(pos) => pos,
                Err(e) => {
                    // Bookkeeping of publication must never stop ingest: publish again from
                    // the oldest reading still kept (JetStream drops what it already has).
                    tracing::error!(file = %path.display(), content = text.trim(), error = %e, "the NATS outbox cursor is unreadable; publishing again from the oldest reading kept");
                    write_cursor(dir, 0)?;
                    0
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let start = fresh << 32;
                write_cursor(dir, start)?;
                start
            }
            Err(e) => return Err(journal::io_err(&path, e)),
        };
        let id_path = dir.join(STORE_ID);
        let store_id = match fs::read_to_string(&id_path) {
            Ok(id) if !id.trim().is_empty() => id.trim().to_owned(),
            _ => {
                use std::hash::{BuildHasher, Hasher};
                let mut h = std::collections::hash_map::RandomState::new().build_hasher();
                h.write_u128(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_nanos()),
                );
                let id = format!("{:016x}", h.finish());
                fs::write(&id_path, format!("{id}\n")).map_err(|e| journal::io_err(&id_path, e))?;
                id
            }
        };
        let state = Self {
            dir: dir.to_path_buf(),
            acked: AtomicU64::new(acked),
            files: Mutex::new(BTreeMap::new()),
            store_id,
        };
        let mut files = BTreeMap::new();
        for entry in fs::read_dir(dir).map_err(|e| journal::io_err(dir, e))? {
            let entry = entry.map_err(|e| journal::io_err(dir, e))?;
            let name = entry.file_name();
            let Some((gen, count)) = name.to_str().and_then(parse_name) else {
                continue;
            };
            if state.published(gen, count) {
                fs::remove_file(entry.path()).map_err(|e| journal::io_err(&entry.path(), e))?;
            } else {
                files.insert(gen, count);
            }
        }
        *state.files.lock().expect("outbox lock") = files;
        Ok(state)
    }

    /// Whether every reading of generation `gen` (`count` readings) is acknowledged.
    pub fn published(&self, gen: u64, count: u32) -> bool {
        self.acked.load(Ordering::Acquire) >= ((gen << 32) | u64::from(count))
    }

    /// Keeps the segment of a compacted generation that is not fully published: moves it from
    /// the journal into the outbox directory.
    pub fn keep(&self, segment: &Path, gen: u64, count: u32) -> Result<(), StoreError> {
        let to = self.dir.join(format!("{gen:020}.{count}.seg"));
        fs::rename(segment, &to).map_err(|e| journal::io_err(segment, e))?;
        self.files.lock().expect("outbox lock").insert(gen, count);
        Ok(())
    }

    /// The first kept generation after `gen`, if any.
    fn next_file(&self, gen: u64) -> Option<u64> {
        let files = self.files.lock().expect("outbox lock");
        files.range(gen + 1..).next().map(|(g, _)| *g)
    }

    /// The kept segment of `gen`, if any.
    fn file(&self, gen: u64) -> Option<(PathBuf, u32)> {
        let count = *self.files.lock().expect("outbox lock").get(&gen)?;
        Some((self.dir.join(format!("{gen:020}.{count}.seg")), count))
    }
}

/// `<gen>.<count>.seg` → (gen, count).
fn parse_name(name: &str) -> Option<(u64, u32)> {
    let stem = name.strip_suffix(".seg")?;
    let (gen, count) = stem.split_once('.')?;
    Some((gen.parse().ok()?, count.parse().ok()?))
}

/// Writes the cursor file: a temporary file, synced, renamed over the old one.
fn write_cursor(dir: &Path, pos: u64) -> Result<(), StoreError> {
    let tmp = dir.join("CURSOR.tmp");
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        writeln!(f, "{pos}")?;
        f.sync_data()?;
        fs::rename(&tmp, dir.join(CURSOR))
    };
    write().map_err(|e| journal::io_err(&tmp, e))
}

/// Progress last written to disk.
#[derive(Debug)]
struct Persisted {
    /// The position written.
    pos: u64,
    /// When.
    at: Instant,
}

/// The outbox of one embedded store: a cursor over its journal.
pub struct SqliteOutbox {
    /// Shared with the compactor.
    state: Arc<OutboxState>,
    /// The in-memory journal.
    shared: Shared,
    /// The outbox segment last loaded from disk (the publisher reads it in several calls).
    loaded: Mutex<Option<Arc<Gen>>>,
    /// Last persisted cursor.
    persisted: Mutex<Persisted>,
}

impl SqliteOutbox {
    /// The outbox over `shared`, with `state` shared with the compactor.
    pub fn new(state: Arc<OutboxState>, shared: Shared) -> Self {
        let pos = state.acked.load(Ordering::Acquire);
        Self {
            state,
            shared,
            loaded: Mutex::new(None),
            persisted: Mutex::new(Persisted {
                pos,
                at: Instant::now(),
            }),
        }
    }

    /// Writes the cursor now if it moved and `force` or [`PERSIST_EVERY`] has passed.
    fn persist_if(&self, force: bool) -> Result<(), StoreError> {
        let pos = self.state.acked.load(Ordering::Acquire);
        let mut p = self.persisted.lock().expect("outbox lock");
        if p.pos == pos || !(force || p.at.elapsed() >= PERSIST_EVERY) {
            return Ok(());
        }
        write_cursor(&self.state.dir, pos)?;
        p.pos = pos;
        p.at = Instant::now();
        Ok(())
    }
}

impl Outbox for SqliteOutbox {
    fn start(&self) -> Result<u64, StoreError> {
        Ok(self.state.acked.load(Ordering::Acquire))
    }

    fn read(&self, from: u64, max: usize) -> Result<Vec<OutboxItem>, StoreError> {
        let mut out: Vec<OutboxItem> = Vec::new();
        let mut pos = from;
        while out.len() < max {
            let (gen_id, idx) = (gen_of(pos), idx_of(pos));
            let want = max - out.len();
            // The active generation is decoded under the lock (it grows); a sealed one is
            // shared and decoded after.
            let (found, next_in_memory) = {
                let st = self.shared.read().expect("journal lock");
                if st.active.id == gen_id {
                    let rows = st.active.in_order(idx, want)?;
                    push(&mut out, &self.state.store_id, gen_id, idx, rows);
                    return Ok(out);
                }
                let sealed = st.sealed.iter().find(|g| g.id == gen_id).cloned();
                let next = st
                    .sealed
                    .iter()
                    .map(|g| g.id)
                    .filter(|id| *id > gen_id)
                    .chain([st.active.id])
                    .min()
                    .filter(|id| *id > gen_id);
                (sealed, next)
            };
            let gen = match found {
                Some(g) => g,
                None => match self.state.file(gen_id) {
                    Some((path, _)) => {
                        let loaded = self.loaded.lock().expect("outbox lock").clone();
                        match loaded.filter(|g| g.id == gen_id) {
                            Some(g) => g,
                            None => {
                                let (g, _) = journal::replay(&path, gen_id, false)?;
                                let g = Arc::new(g);
                                *self.loaded.lock().expect("outbox lock") = Some(g.clone());
                                g
                            }
                        }
                    }
                    // Never written, empty, or compacted while NATS was disabled: on to the
                    // next generation that exists.
                    None => {
                        let next_file = self.state.next_file(gen_id);
                        match next_in_memory.into_iter().chain(next_file).min() {
                            Some(next) => {
                                pos = next << 32;
                                continue;
                            }
                            None => return Ok(out),
                        }
                    }
                },
            };
            if idx >= gen.readings {
                pos = (gen_id + 1) << 32;
                continue;
            }
            let rows = gen.in_order(idx, want)?;
            push(&mut out, &self.state.store_id, gen_id, idx, rows);
            pos = out.last().map_or(pos, |i| i.next);
        }
        Ok(out)
    }

    fn advance(&self, to: u64) -> Result<(), StoreError> {
        let before = self.state.acked.fetch_max(to, Ordering::AcqRel);
        let done: Vec<(u64, u32)> = {
            let files = self.state.files.lock().expect("outbox lock");
            files
                .iter()
                .filter(|(g, c)| self.state.published(**g, **c))
                .map(|(g, c)| (*g, *c))
                .collect()
        };
        for (gen, count) in &done {
            let path = self.state.dir.join(format!("{gen:020}.{count}.seg"));
            if let Err(e) = fs::remove_file(&path) {
                static REMOVE: crate::telemetry::log_limit::LogLimit =
                    crate::telemetry::log_limit::LogLimit::new();
                if let Some(suppressed) = REMOVE.event() {
                    tracing::warn!(segment = %path.display(), error = %e, suppressed, "cannot delete a published outbox segment");
                }
            }
            self.state.files.lock().expect("outbox lock").remove(gen);
        }
        self.persist_if(gen_of(before) != gen_of(to))
    }

    fn persist(&self) -> Result<(), StoreError> {
        self.persist_if(true)
    }

    fn lag(&self) -> Result<u64, StoreError> {
        let acked = self.state.acked.load(Ordering::Acquire);
        let mut counts: BTreeMap<u64, u32> = self.state.files.lock().expect("outbox lock").clone();
        {
            let st = self.shared.read().expect("journal lock");
            counts.insert(st.active.id, st.active.readings);
            for g in &st.sealed {
                counts.insert(g.id, g.readings);
            }
        }
        Ok(counts
            .range(gen_of(acked)..)
            .map(|(g, c)| {
                let done = if *g == gen_of(acked) {
                    idx_of(acked).min(*c)
                } else {
                    0
                };
                u64::from(c - done)
            })
            .sum())
    }
}

/// Appends decoded readings of generation `gen` starting at `idx` as outbox items.
fn push(
    out: &mut Vec<OutboxItem>,
    store_id: &str,
    gen: u64,
    idx: u32,
    rows: Vec<(String, crate::store::StoredRow)>,
) {
    for (i, (device_id, row)) in rows.into_iter().enumerate() {
        let next = (gen << 32) | u64::from(idx + i as u32 + 1);
        let unsequenced_id = format!("{store_id}-{}", row.rid);
        out.push(OutboxItem {
            device_id,
            row,
            next,
            unsequenced_id,
            origin: None,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(parse_name("00000000000000000007.12.seg"), Some((7, 12)));
        assert_eq!(parse_name("CURSOR"), None);
        assert_eq!(parse_name("7.seg"), None);
    }

    /// Found by a breaking session: an empty or damaged cursor file stopped the store from
    /// opening, and so all ingest. It now publishes again from the oldest reading kept.
    #[test]
    fn an_unreadable_cursor_restarts_publication_instead_of_failing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CURSOR), "").unwrap();
        let st = OutboxState::open(dir.path(), 5).unwrap();
        assert_eq!(st.acked.load(Ordering::Acquire), 0);
        std::fs::write(dir.path().join(CURSOR), "garbage").unwrap();
        assert_eq!(
            OutboxState::open(dir.path(), 5)
                .unwrap()
                .acked
                .load(Ordering::Acquire),
            0
        );
        // The store id stays the same across opens.
        let id = std::fs::read_to_string(dir.path().join(STORE_ID)).unwrap();
        assert_eq!(
            OutboxState::open(dir.path(), 5).unwrap().store_id,
            id.trim()
        );
    }

    #[test]
    fn cursor_starts_at_the_fresh_generation_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        let st = OutboxState::open(dir.path(), 5).unwrap();
        assert_eq!(st.acked.load(Ordering::Acquire), 5 << 32);
        assert!(!st.published(5, 1));
        assert!(st.published(4, 100));
        write_cursor(dir.path(), (6 << 32) | 3).unwrap();
        let again = OutboxState::open(dir.path(), 9).unwrap();
        assert_eq!(again.acked.load(Ordering::Acquire), (6 << 32) | 3);
    }
}
