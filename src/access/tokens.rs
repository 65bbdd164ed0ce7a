//! Access tokens (SPEC §11): request → **token check** → handler. "Who is this, and which
//! devices may it write or read?"
//!
//! A token is `slc_` followed by 43 characters of base64url: 256 random bits from the OS. The
//! store keeps only its SHA-256 (`store::TokenRow`), so a copy of the database grants nothing.
//! A presented token is hashed and looked up by that hash:
//! - **Cache.** Valid tokens are kept in memory for [`CACHE_TTL`], at most
//!   `auth.token_cache` of them. Unknown and revoked tokens are never cached: both go to the
//!   store's index by hash and come back refused on the same path, so neither answer nor
//!   timing tells an unknown token from a revoked one.
//! - **Revocation** is immediate on the replica that revokes (its cache entry goes, and open
//!   WebSocket connections of that token are told through a `watch` channel); other replicas
//!   learn of it within a second, from [`Tokens::poll_revocations`], and do the same.
//! - **Last use** is an atomic in the cached entry, written by each request without a lock
//!   and flushed to the store in one batch by [`Tokens::flush_last_used`] every few seconds.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::sync::watch;
use wildmatch::WildMatch;

use crate::reading::now_ms;
use crate::store::{ReaderSlot, StoreError, TokenRow};

/// The prefix of every token secret: recognisable in a config file, a log or a secret scanner.
pub const TOKEN_PREFIX: &str = "slc_";

/// How long a valid token is trusted from the cache before it is looked up again. Revocations
/// reach the cache sooner, through [`Tokens::poll_revocations`]; this bounds what a missed poll
/// (store down) could leave.
pub const CACHE_TTL: Duration = Duration::from_secs(60);

/// How far back each revocation poll looks past the newest revocation it has seen: covers a
/// revocation whose transaction committed a little after another replica's later one.
const POLL_OVERLAP_MS: i64 = 10_000;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Write the devices of its glob, and read them.
    Write,
    /// Read every device.
    Read,
}

impl Scope {
    /// `write` or `read`, as stored and in the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Write => "write",
            Scope::Read => "read",
        }
    }

    /// Parses [`Scope::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "write" => Some(Scope::Write),
            "read" => Some(Scope::Read),
            _ => None,
        }
    }
}

/// A verified token, as handlers see it.
#[derive(Debug)]
pub struct TokenInfo {
    /// Public id (`tok_…`).
    pub id: String,
    /// Its name.
    pub name: String,
    /// What it may do.
    pub scope: Scope,
    /// The device glob as given.
    pub devices: String,
    /// The glob, compiled.
    glob: WildMatch,
    /// The one device the glob names, when it has no wildcard: that token binds the device, so
    /// its readings may leave `device_id` out (SPEC §1).
    pub bound: Option<crate::reading::DeviceId>,
    /// Last use seen by this replica (epoch ms); flushed to the store in batches.
    last_used: AtomicI64,
}

impl TokenInfo {
    fn from_row(row: &TokenRow) -> Option<Self> {
        let scope = Scope::parse(&row.scope)?;
        let literal = !row.devices.contains(['*', '?']);
        Some(Self {
            id: row.id.clone(),
            name: row.name.clone(),
            scope,
            devices: row.devices.clone(),
            glob: WildMatch::new(&row.devices),
            bound: if literal {
                crate::reading::DeviceId::parse(&row.devices).ok()
            } else {
                None
            },
            last_used: AtomicI64::new(row.last_used_ms.unwrap_or(0)),
        })
    }

    /// Whether its glob matches `device`.
    pub fn covers(&self, device: &str) -> bool {
        self.glob.matches(device)
    }
}

/// Why a presented token was refused (the `reason` of `sluice_auth_failures_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Not a Sluice token at all (wrong prefix or length, bad characters), or unknown.
    Invalid,
    /// A token that was revoked.
    Revoked,
}

/// One cached valid token.
struct Cached {
    /// The token.
    info: Arc<TokenInfo>,
    /// When it was last read from the store.
    fetched: Instant,
}

/// Token verification with its cache, revocations and last-use bookkeeping. One per process.
pub struct Tokens {
    /// The store's reader, once open.
    reader: Arc<ReaderSlot>,
    /// Valid tokens by the SHA-256 of their secret.
    cache: RwLock<HashMap<[u8; 32], Cached>>,
    /// `auth.token_cache`: most cached tokens.
    cache_max: usize,
    /// Ids revoked since this process started (here or, polled, on another replica): open
    /// WebSocket connections check theirs against it when `generation` moves.
    revoked: RwLock<HashSet<String>>,
    /// Bumped on every revocation seen; connections wait on it.
    generation: watch::Sender<u64>,
    /// The newest `revoked_ms` seen by the poll (the store's clock).
    polled_to: Mutex<i64>,
    /// Last-use times already written to the store, by id.
    flushed: Mutex<HashMap<String, i64>>,
}

impl Tokens {
    /// Token checks against the store behind `reader`, caching at most `cache_max` tokens.
    pub fn new(reader: Arc<ReaderSlot>, cache_max: usize) -> Self {
        Self {
            reader,
            cache: RwLock::new(HashMap::new()),
            cache_max: cache_max.max(1),
            revoked: RwLock::new(HashSet::new()),
            generation: watch::Sender::new(0),
            polled_to: Mutex::new(0),
            flushed: Mutex::new(HashMap::new()),
        }
    }

    /// The token of this secret, or why not. `Err(Ok(refused))` for a refused token,
    /// `Err(Err(e))` when the store could not answer. Runs store calls on a blocking thread.
    pub async fn verify(
        self: &Arc<Self>,
        secret: &str,
    ) -> Result<Arc<TokenInfo>, Result<Refused, StoreError>> {
        let hash = hash_secret(secret);
        if let Some(hit) = self.cached(&hash) {
            hit.last_used.store(now_ms(), Ordering::Relaxed);
            return Ok(hit);
        }
        // Malformed secrets are looked up too: the store answers "none", as for any unknown
        // token, so the shape of a token is not a shortcut an attacker can time.
        let this = self.clone();
        let found = tokio::task::spawn_blocking(move || {
            this.reader.current().and_then(|r| r.token_by_hash(&hash))
        })
        .await
        .map_err(|e| Err(StoreError::Postgres(format!("token lookup failed: {e}"))))?;
        let row = match found {
            Ok(row) => row,
            Err(e) => {
                // The store is down: a token seen before stays usable (revocations made here
                // are still applied, the cache entry having gone), so ingest does not stop.
                return self.stale(&hash).ok_or(Err(e));
            }
        };
        let Some(row) = row else {
            return Err(Ok(Refused::Invalid));
        };
        if row.revoked_ms.is_some() {
            return Err(Ok(Refused::Revoked));
        }
        let Some(info) = TokenInfo::from_row(&row) else {
            return Err(Ok(Refused::Invalid));
        };
        let info = Arc::new(info);
        info.last_used.store(now_ms(), Ordering::Relaxed);
        self.insert(hash, info.clone());
        Ok(info)
    }

    fn cached(&self, hash: &[u8; 32]) -> Option<Arc<TokenInfo>> {
        let cache = self.cache.read().expect("token cache lock");
        let c = cache.get(hash)?;
        (c.fetched.elapsed() < CACHE_TTL).then(|| c.info.clone())
    }

    fn stale(&self, hash: &[u8; 32]) -> Option<Arc<TokenInfo>> {
        let cache = self.cache.read().expect("token cache lock");
        cache.get(hash).map(|c| c.info.clone())
    }

    fn insert(&self, hash: [u8; 32], info: Arc<TokenInfo>) {
        // Checked under the cache lock: `revoked_now` notes the id before it purges the cache,
        // so a revocation either is seen here or purges this entry after.
        let mut cache = self.cache.write().expect("token cache lock");
        if self.is_revoked(&info.id) {
            return;
        }
        if cache.len() >= self.cache_max && !cache.contains_key(&hash) {
            cache.retain(|_, c| c.fetched.elapsed() < CACHE_TTL);
            if cache.len() >= self.cache_max {
                // Still full of fresh entries: start again rather than grow. Each token costs
                // one store lookup to come back.
                cache.clear();
            }
        }
        cache.insert(
            hash,
            Cached {
                info,
                fetched: Instant::now(),
            },
        );
    }

    /// Whether the token `id` was revoked since this process started.
    pub fn is_revoked(&self, id: &str) -> bool {
        self.revoked.read().expect("revoked lock").contains(id)
    }

    /// Notes revocations: their cache entries go, and open connections are told.
    pub fn revoked_now(&self, ids: &[String]) {
        if ids.is_empty() {
            return;
        }
        let mut fresh = false;
        {
            let mut revoked = self.revoked.write().expect("revoked lock");
            for id in ids {
                fresh |= revoked.insert(id.clone());
            }
        }
        if !fresh {
            return;
        }
        self.cache
            .write()
            .expect("token cache lock")
            .retain(|_, c| !ids.contains(&c.info.id));
        self.generation.send_modify(|g| *g += 1);
    }

    /// A watch that resolves when the token `id` is revoked.
    pub fn watch(self: &Arc<Self>, id: Option<&str>) -> RevocationWatch {
        let mut rx = self.generation.subscribe();
        rx.mark_changed();
        RevocationWatch {
            tokens: self.clone(),
            id: id.map(str::to_owned),
            rx,
        }
    }

    /// Asks the store for tokens revoked since the last poll (on any replica). Blocking: run
    /// on a blocking thread, about once a second.
    pub fn poll_revocations(&self) -> Result<(), StoreError> {
        let since = *self.polled_to.lock().expect("poll lock");
        let found = self
            .reader
            .current()?
            .revoked_tokens_since(since.saturating_sub(POLL_OVERLAP_MS))?;
        if let Some(newest) = found.iter().map(|(_, ms)| *ms).max() {
            let mut to = self.polled_to.lock().expect("poll lock");
            *to = (*to).max(newest);
        }
        let ids: Vec<String> = found.into_iter().map(|(id, _)| id).collect();
        self.revoked_now(&ids);
        Ok(())
    }

    /// Writes the last-use times that changed since the previous flush, in one store call.
    /// Blocking: run on a blocking thread.
    pub fn flush_last_used(&self) -> Result<(), StoreError> {
        let used: Vec<(String, i64)> = {
            let cache = self.cache.read().expect("token cache lock");
            let flushed = self.flushed.lock().expect("flushed lock");
            cache
                .values()
                .map(|c| (c.info.id.clone(), c.info.last_used.load(Ordering::Relaxed)))
                .filter(|(id, ms)| *ms > 0 && flushed.get(id).is_none_or(|f| f < ms))
                .collect()
        };
        if used.is_empty() {
            return Ok(());
        }
        self.reader.current()?.touch_tokens(&used)?;
        let mut flushed = self.flushed.lock().expect("flushed lock");
        if flushed.len() > self.cache_max {
            flushed.clear();
        }
        flushed.extend(used);
        Ok(())
    }
}

/// Resolves when a connection's token is revoked (never for a connection without one).
pub struct RevocationWatch {
    /// Where revocations are noted.
    tokens: Arc<Tokens>,
    /// The connection's token, if it has one.
    id: Option<String>,
    /// Moves on every revocation.
    rx: watch::Receiver<u64>,
}

impl RevocationWatch {
    /// Waits until this connection's token is revoked. Cancel-safe: use it in `select!`.
    pub async fn revoked(&mut self) {
        let Some(id) = &self.id else {
            return std::future::pending().await;
        };
        loop {
            if self.rx.changed().await.is_err() {
                return std::future::pending().await;
            }
            if self.tokens.is_revoked(id) {
                return;
            }
        }
    }
}

/// SHA-256 of a secret: what the store keeps and looks up.
pub fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Compares two hashes without an early exit: the admin token check.
pub fn same_hash(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// A new secret (`slc_` + 43 base64url characters of 256 random bits) and a new public id
/// (`tok_` + 16 hex digits).
pub fn new_secret_and_id() -> Result<(String, String), getrandom::Error> {
    let mut bytes = [0u8; 40];
    getrandom::fill(&mut bytes)?;
    let (secret, id) = bytes.split_at(32);
    let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
    Ok((
        format!("{TOKEN_PREFIX}{}", base64url(secret)),
        format!("tok_{id}"),
    ))
}

/// Unpadded base64url (RFC 4648 §5).
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// Checks a device glob for a new token: 1 to 128 characters of device-id characters and the
/// wildcards `*` and `?`.
pub fn check_glob(glob: &str) -> Result<(), String> {
    if glob.is_empty() || glob.len() > crate::reading::MAX_DEVICE_ID_LEN {
        return Err(format!(
            "devices: must be 1 to {} characters",
            crate::reading::MAX_DEVICE_ID_LEN
        ));
    }
    if let Some(c) = glob
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-' | '*' | '?')))
    {
        return Err(format!(
            "devices: {c:?} is not allowed (a glob of device ids: A-Z a-z 0-9 _ : - and the wildcards * ?)"
        ));
    }
    // A device id starts with a letter or digit (SPEC §1): a glob that cannot would match nothing.
    if glob.starts_with(['_', ':', '-']) {
        return Err(format!(
            "devices: `{glob}` matches no device (a device id starts with a letter or digit)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_256_bits_of_base64url_with_the_prefix() {
        let (a, id) = new_secret_and_id().unwrap();
        let (b, _) = new_secret_and_id().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX) && a.len() == 4 + 43, "{a}");
        assert!(a[4..]
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        assert!(id.starts_with("tok_") && id.len() == 20, "{id}");
        assert_eq!(base64url(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64url(b"fo"), "Zm8");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn hashes_compare_and_globs_are_checked() {
        let h = hash_secret("slc_x");
        assert!(same_hash(&h, &hash_secret("slc_x")));
        assert!(!same_hash(&h, &hash_secret("slc_y")));
        check_glob("greenhouse-*").unwrap();
        check_glob("barn-?").unwrap();
        assert!(check_glob("a b").is_err());
        assert!(check_glob("-x*").is_err());
        check_glob("*-x").unwrap();
        assert!(check_glob("").is_err());
    }
}
