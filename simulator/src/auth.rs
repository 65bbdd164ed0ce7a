//! Tokens (SPEC §11): which token each simulated device sends, and minting them.
//!
//! With `auth.mode = "token"` Sluice wants `Authorization: Bearer <token>` on every ingest and
//! query request. A run gets its tokens from:
//! - `--token T` (or `SLUICE_TOKEN`): one token for every device, e.g. a gateway's write token
//!   whose glob covers the fleet;
//! - `--tokens-file FILE` (or `SLUICE_TOKENS_FILE`): lines `<device_id> <token>`, or
//!   `<glob> <token>` for a token covering several devices (`*` and `?`); `#` starts a comment.
//!   An exact device id wins over a glob, and globs are tried in file order. A device the file
//!   does not name falls back to `--token`; with neither, the run refuses to start.
//!
//! `sluice-sim tokens` mints such a file through the admin API ([`mint`]).
//!
//! Tokens are secrets: [`Secret`] never shows its value (`Debug` and `Display` print
//! `[redacted]`), header values are marked sensitive, and no message quotes a token.

use std::collections::HashMap;
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use futures_util::stream::{self, StreamExt};
use reqwest::header::{HeaderValue, AUTHORIZATION};
use serde::Deserialize;

use crate::fleet::device_id;

/// A secret string (a token): its value is never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The value, to send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl FromStr for Secret {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty token".into());
        }
        if !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(
                "a token is printable ASCII without spaces (the value is not shown)".into(),
            );
        }
        Ok(Secret(s.to_string()))
    }
}

/// `Bearer <token>`, marked sensitive (never logged by the HTTP stack).
pub fn bearer(token: &Secret) -> HeaderValue {
    let mut v = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
        .expect("FromStr checked the token");
    v.set_sensitive(true);
    v
}

/// Whether `name` matches `glob` (`*`: any run of characters, `?`: one character).
pub fn glob_match(glob: &str, name: &str) -> bool {
    let (g, n) = (glob.as_bytes(), name.as_bytes());
    let (mut gi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if gi < g.len() && (g[gi] == b'?' || g[gi] == n[ni]) {
            gi += 1;
            ni += 1;
        } else if gi < g.len() && g[gi] == b'*' {
            star = Some((gi, ni));
            gi += 1;
        } else if let Some((sg, sn)) = star {
            gi = sg + 1;
            ni = sn + 1;
            star = Some((sg, sn + 1));
        } else {
            return false;
        }
    }
    g[gi..].iter().all(|&c| c == b'*')
}

/// A parsed `--tokens-file`.
#[derive(Debug, Default)]
pub struct TokensFile {
    /// Device id → token.
    pub exact: HashMap<String, Secret>,
    /// `(glob, token)` in file order.
    pub globs: Vec<(String, Secret)>,
}

impl TokensFile {
    /// Parses the text of a tokens file (`path` only names it in errors; no error quotes a
    /// token).
    pub fn parse(text: &str, path: &Path) -> anyhow::Result<TokensFile> {
        let mut file = TokensFile::default();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = || format!("{} line {}", path.display(), i + 1);
            let mut words = line.split_whitespace();
            let (Some(device), Some(token), None) = (words.next(), words.next(), words.next())
            else {
                bail!(
                    "{}: expected `<device_id or glob> <token>` (two fields)",
                    at()
                );
            };
            let token: Secret = token
                .parse()
                .map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
            if device.contains(['*', '?']) {
                file.globs.push((device.to_string(), token));
            } else if file.exact.insert(device.to_string(), token).is_some() {
                bail!("{}: device {device} is named twice", at());
            }
        }
        if file.exact.is_empty() && file.globs.is_empty() {
            bail!("{}: no tokens in it", path.display());
        }
        Ok(file)
    }

    /// The token for `id`: its own line, else the first glob that matches.
    pub fn lookup(&self, id: &str) -> Option<&Secret> {
        self.exact.get(id).or_else(|| {
            self.globs
                .iter()
                .find(|(g, _)| glob_match(g, id))
                .map(|(_, t)| t)
        })
    }
}

/// Which token each device of a run sends.
#[derive(Clone, Default)]
pub struct Auth {
    /// The distinct tokens, as `Authorization` header values.
    tokens: Vec<HeaderValue>,
    /// Device `n` sends `tokens[per_device[n]]`; empty when every device sends `tokens[0]`
    /// (or nothing, when `tokens` is empty).
    per_device: Vec<u32>,
    /// What the summary says: `none`, `--token`, `--tokens-file FILE (N tokens)`.
    pub describe: String,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("tokens", &self.tokens.len())
            .field("describe", &self.describe)
            .finish()
    }
}

impl Auth {
    /// No token: requests carry no `Authorization`.
    pub fn none() -> Self {
        Auth {
            describe: "none".into(),
            ..Auth::default()
        }
    }

    /// Resolves the token of each of the `devices` devices `<prefix>-<n>`.
    pub fn resolve(
        token: Option<&Secret>,
        tokens_file: Option<&Path>,
        prefix: &str,
        devices: u32,
    ) -> anyhow::Result<Auth> {
        let Some(path) = tokens_file else {
            return Ok(match token {
                Some(t) => Auth {
                    tokens: vec![bearer(t)],
                    per_device: Vec::new(),
                    describe: "--token (one token for every device)".into(),
                },
                None => Auth::none(),
            });
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--tokens-file {}", path.display()))?;
        let file = TokensFile::parse(&text, path)?;
        let mut index: HashMap<&Secret, u32> = HashMap::new();
        let mut tokens = Vec::new();
        let mut per_device = Vec::with_capacity(devices as usize);
        for n in 0..devices {
            let id = device_id(prefix, n);
            let Some(t) = file.lookup(&id).or(token) else {
                bail!(
                    "--tokens-file {}: no token for device {id} (nor a --token to fall back on); \
                     the run's devices are {prefix}-0 … {prefix}-{}: was the file made with the same \
                     --device-prefix and at least --devices {devices}?",
                    path.display(),
                    devices - 1
                );
            };
            let k = *index.entry(t).or_insert_with(|| {
                tokens.push(bearer(t));
                (tokens.len() - 1) as u32
            });
            per_device.push(k);
        }
        let describe = format!(
            "--tokens-file {} ({} distinct token{} for {devices} devices)",
            path.display(),
            tokens.len(),
            if tokens.len() == 1 { "" } else { "s" }
        );
        if tokens.len() == 1 {
            per_device.clear();
        }
        Ok(Auth {
            tokens,
            per_device,
            describe,
        })
    }

    /// Whether any token is sent.
    pub fn is_on(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// Whether devices send different tokens (so an HTTP request carries one device).
    pub fn per_device(&self) -> bool {
        !self.per_device.is_empty()
    }

    /// The `Authorization` value of device `n`.
    pub fn for_device(&self, n: u32) -> Option<&HeaderValue> {
        match self.per_device.get(n as usize) {
            Some(&k) => self.tokens.get(k as usize),
            None => self.tokens.first(),
        }
    }
}

impl std::hash::Hash for Secret {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state)
    }
}

/// Adds device `n`'s `Authorization` to a request, if it has a token.
pub fn authorize(req: reqwest::RequestBuilder, auth: &Auth, n: u32) -> reqwest::RequestBuilder {
    match auth.for_device(n) {
        Some(v) => req.header(AUTHORIZATION, v.clone()),
        None => req,
    }
}

/// What `sluice-sim tokens` makes.
#[derive(Debug, Clone)]
pub struct MintArgs {
    /// Sluice's base URL.
    pub target: String,
    /// `auth.admin_token`.
    pub admin_token: Secret,
    /// Devices `<prefix>-0 … <prefix>-<devices-1>`.
    pub devices: u32,
    /// Their prefix.
    pub prefix: String,
    /// One token whose glob covers the fleet (`<prefix>-*`) instead of one per device.
    pub gateway: bool,
    /// Where to write the tokens file.
    pub out: PathBuf,
    /// Admin requests at once.
    pub concurrency: usize,
}

/// The admin API's answer to a create (SPEC §11); only `token` is used.
#[derive(Deserialize)]
struct Created {
    token: String,
}

/// Creates the tokens through `POST /v1/admin/tokens` and writes the tokens file (mode 0600,
/// replaced whole). Returns how many tokens were made.
pub async fn mint(args: &MintArgs) -> anyhow::Result<usize> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let url = format!("{}/v1/admin/tokens", args.target.trim_end_matches('/'));
    let admin = Arc::new(bearer(&args.admin_token));
    let wanted: Vec<String> = if args.gateway {
        vec![format!("{}-*", args.prefix)]
    } else {
        (0..args.devices)
            .map(|n| device_id(&args.prefix, n))
            .collect()
    };
    let results: Vec<anyhow::Result<(String, String)>> = stream::iter(wanted)
        .map(|glob| {
            let (client, url, admin) = (&client, &url, admin.clone());
            async move {
                let body = serde_json::json!({
                    "name": format!("sluice-sim {glob}"),
                    "scope": "write",
                    "devices": glob,
                });
                let res = client
                    .post(url)
                    .header(AUTHORIZATION, (*admin).clone())
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.to_string())
                    .send()
                    .await
                    .with_context(|| format!("POST {url}"))?;
                let status = res.status();
                if status != reqwest::StatusCode::CREATED {
                    let detail = res.text().await.unwrap_or_default();
                    let hint = match status.as_u16() {
                        401 | 403 => " (the admin token was refused: is it auth.admin_token / SLUICE__AUTH__ADMIN_TOKEN of this Sluice?)",
                        404 | 405 => " (no admin API here: is this Sluice started with auth.mode = \"token\"?)",
                        _ => "",
                    };
                    bail!("POST {url} for {glob}: {status}{hint}: {}", detail.chars().take(300).collect::<String>());
                }
                let body = res.bytes().await.with_context(|| format!("POST {url}"))?;
                let created: Created = serde_json::from_slice(&body)
                    .with_context(|| format!("POST {url}: the answer has no `token`"))?;
                let _: Secret = created
                    .token
                    .parse()
                    .map_err(|e| anyhow::anyhow!("POST {url}: the returned token is unusable: {e}"))?;
                Ok((glob, created.token))
            }
        })
        .buffered(args.concurrency.max(1))
        .collect()
        .await;
    let mut lines = String::new();
    lines.push_str(&format!(
        "# sluice-sim tokens: {} write token{} for devices {}-0 … {}-{} ({}).\n\
         # One line per device or glob: `<device_id or glob> <token>`. Secrets: keep this file private.\n",
        results.len(),
        if results.len() == 1 { "" } else { "s" },
        args.prefix,
        args.prefix,
        args.devices.saturating_sub(1),
        if args.gateway { "one token whose glob covers them" } else { "one per device" },
    ));
    let mut n = 0;
    for r in results {
        let (glob, token) = r?;
        lines.push_str(&glob);
        lines.push(' ');
        lines.push_str(&token);
        lines.push('\n');
        n += 1;
    }
    write_private(&args.out, lines.as_bytes())?;
    Ok(n)
}

/// Writes `bytes` to `path` readable by its owner only, replacing it whole.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp~");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_device_globs() {
        assert!(glob_match("greenhouse-*", "greenhouse-7"));
        assert!(!glob_match("greenhouse-*", "barn-1"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match("*-1*", "dev-12"));
        assert!(!glob_match("dev-1", "dev-12"));
        assert!(glob_match("dev-1*", "dev-1"));
    }

    #[test]
    fn secrets_never_show() {
        let s: Secret = "slc_abcdef".parse().unwrap();
        assert_eq!(format!("{s:?} {s}"), "[redacted] [redacted]");
        assert!(bearer(&s).is_sensitive());
        assert!("has space".parse::<Secret>().is_err());
        let e = "bad\u{7f}token".parse::<Secret>().unwrap_err();
        assert!(!e.contains("bad"), "{e}");
    }

    fn file(text: &str) -> anyhow::Result<TokensFile> {
        TokensFile::parse(text, Path::new("t.txt"))
    }

    #[test]
    fn tokens_files_name_devices_and_globs() {
        let f = file("# made by hand\n\nd-0 slc_a\nd-* slc_gw   \n  d-1\tslc_b\n").unwrap();
        assert_eq!(f.lookup("d-0").unwrap().expose(), "slc_a");
        assert_eq!(f.lookup("d-1").unwrap().expose(), "slc_b");
        assert_eq!(f.lookup("d-9").unwrap().expose(), "slc_gw");
        assert!(f.lookup("x-1").is_none());
        let e = file("d-0 slc_a extra\n").unwrap_err().to_string();
        assert!(e.contains("t.txt line 1") && !e.contains("slc_a"), "{e}");
        assert!(file("d-0 a\nd-0 b\n").is_err());
        assert!(file("# nothing\n").is_err());
    }

    #[test]
    fn every_device_gets_a_token_or_the_run_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.txt");
        std::fs::write(&path, "p-0 slc_a\np-1 slc_b\np-2 slc_a\n").unwrap();
        let a = Auth::resolve(None, Some(&path), "p", 3).unwrap();
        assert!(a.per_device());
        assert_eq!(a.for_device(1).unwrap().to_str().unwrap(), "Bearer slc_b");
        assert_eq!(a.for_device(2).unwrap().to_str().unwrap(), "Bearer slc_a");
        assert!(a.describe.contains("2 distinct tokens for 3 devices"));
        let e = Auth::resolve(None, Some(&path), "p", 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no token for device p-3"), "{e}");
        assert!(!e.contains("slc_"), "{e}");
        let fallback: Secret = "slc_gw".parse().unwrap();
        let a = Auth::resolve(Some(&fallback), Some(&path), "p", 4).unwrap();
        assert_eq!(a.for_device(3).unwrap().to_str().unwrap(), "Bearer slc_gw");
        // One glob for the whole fleet: one token, requests may mix devices.
        std::fs::write(&path, "p-* slc_gw\n").unwrap();
        let a = Auth::resolve(None, Some(&path), "p", 1000).unwrap();
        assert!(a.is_on() && !a.per_device());
        assert_eq!(
            a.for_device(999).unwrap().to_str().unwrap(),
            "Bearer slc_gw"
        );
        let none = Auth::resolve(None, None, "p", 3).unwrap();
        assert!(!none.is_on() && none.for_device(0).is_none());
        assert!(!format!("{a:?}").contains("slc_"));
    }
}
