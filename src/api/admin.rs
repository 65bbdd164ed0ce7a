//! Token administration (SPEC §11): administrator → **`/v1/admin/tokens`** → store's `tokens`
//! table → token checks (`access::tokens`) on every replica.
//!
//! - `POST /v1/admin/tokens` `{"name", "scope": "write"|"read", "devices": "<glob>"}` → 201
//!   `{"id", "token", "name", "scope", "devices", "created_at"}`. The secret (`token`) is in this
//!   answer only; the store keeps its SHA-256.
//! - `GET /v1/admin/tokens` → `{"tokens": [{"id", "name", "scope", "devices", "created_at",
//!   "last_used_at"}]}`, active tokens, oldest first, without secrets. `last_used_at` is exact
//!   to about ten seconds (uses are written in batches) and `null` for a token never used.
//! - `DELETE /v1/admin/tokens/{id}` → 204; 404 for an unknown or already revoked id. New
//!   requests with the token get 401 at once on this replica (within a second on others), and
//!   its open WebSocket connections close with 1008.
//!
//! Every call needs `Authorization: Bearer <auth.admin_token>`, which [`crate::access::guard`]
//! checks before these handlers run. Without `auth.admin_token` (`auth.mode = "none"`) the
//! guard answers 403 `urn:sluice:auth-disabled`.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::params::{NoParams, Params};
use super::problem::Problem;
use super::AppState;
use crate::access::tokens::{self, Scope};
use crate::reading::{format_ts, now_ms};
use crate::store::{StoreError, TokenRow};

/// Longest token name.
const MAX_NAME: usize = 128;

/// The body of `POST /v1/admin/tokens`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    /// The administrator's name for it (1 to 128 characters).
    name: String,
    /// `write` or `read`.
    scope: String,
    /// The devices a write token may write and read; a read token reads every device, so its
    /// glob defaults to `*`.
    devices: Option<String>,
}

/// A token as the admin API shows it.
#[derive(Debug, Serialize)]
struct TokenView {
    id: String,
    /// The secret: only in the answer to its creation.
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    name: String,
    scope: String,
    devices: String,
    created_at: String,
    /// Absent in the creation answer; `null` when never used.
    #[serde(skip_serializing_if = "Option::is_none")]
    last_used_at: Option<Option<String>>,
}

fn unavailable(state: &AppState, e: impl std::fmt::Display) -> Problem {
    Problem::unavailable(
        "unavailable",
        "Store unavailable",
        e.to_string(),
        state.settings.pipeline.retry_after,
    )
}

/// Runs a store call on a blocking thread.
async fn with_store<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&dyn crate::store::StoreRead) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Problem> {
    let reader = state.reader.clone();
    tokio::task::spawn_blocking(move || reader.current().and_then(|r| f(r.as_ref())))
        .await
        .map_err(|e| unavailable(state, e))?
        .map_err(|e| unavailable(state, e))
}

/// `POST /v1/admin/tokens`.
pub async fn create(
    State(state): State<AppState>,
    _: Params<NoParams>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        // Over axum's 2 MB default, or unreadable: a problem document, never plain text.
        let body = body.map_err(|e| Problem::rejected(e.status(), e.body_text()))?;
        let new: NewToken = serde_json::from_slice(&body).map_err(|e| {
            Problem::bad_request(format!(
                "{e}; expected {{\"name\": \"...\", \"scope\": \"write\" | \"read\", \"devices\": \"<glob>\"}}"
            ))
        })?;
        let name = new.name.trim().to_owned();
        if name.is_empty()
            || name.chars().count() > MAX_NAME
            || name
                .chars()
                .any(|c| c.is_control() || is_invisible_format(c))
        {
            return Err(Problem::bad_request(format!(
                "name: must be 1 to {MAX_NAME} characters, without control or invisible formatting characters (bidirectional marks, zero-width spaces)"
            )));
        }
        let scope = Scope::parse(&new.scope).ok_or_else(|| {
            Problem::bad_request(format!("scope: `{}` is not one of: write, read", new.scope))
        })?;
        let devices = match (scope, new.devices) {
            (_, Some(d)) => d,
            (Scope::Read, None) => "*".to_owned(),
            (Scope::Write, None) => return Err(Problem::bad_request(
                "devices: required for a write token (a device id, or a glob such as greenhouse-*)",
            )),
        };
        tokens::check_glob(&devices).map_err(Problem::bad_request)?;
        if scope == Scope::Read && devices != "*" {
            return Err(Problem::bad_request(format!(
                "devices: a read token reads every device (SPEC §11), so its devices are `*`, not `{devices}`; a write token reads its own devices"
            )));
        }
        // Names are how administrators tell tokens apart: one live token per name. Creates are
        // serialised on this replica so that two at once cannot both pass the check.
        static CREATING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _creating = CREATING.lock().await;
        let taken = name.clone();
        let clash = with_store(&state, move |r| r.tokens())
            .await?
            .into_iter()
            .any(|t| t.revoked_ms.is_none() && t.name == taken);
        if clash {
            return Err(Problem::new(
                StatusCode::CONFLICT,
                "conflict",
                "Name in use",
                format!(
                    "name: a token named `{name}` exists; revoke it first or choose another name"
                ),
            ));
        }
        let (secret, id) = tokens::new_secret_and_id()
            .map_err(|e| unavailable(&state, format!("no randomness from the OS: {e}")))?;
        let row = TokenRow {
            id,
            hash: tokens::hash_secret(&secret),
            name,
            scope: scope.as_str().to_owned(),
            devices,
            created_ms: now_ms(),
            last_used_ms: None,
            revoked_ms: None,
        };
        let stored = row.clone();
        with_store(&state, move |r| r.create_token(&stored)).await?;
        tracing::info!(id = %row.id, name = %row.name, scope = %row.scope, devices = %row.devices, "token created");
        Ok((
            StatusCode::CREATED,
            Json(TokenView {
                id: row.id,
                token: Some(secret),
                name: row.name,
                scope: row.scope,
                devices: row.devices,
                created_at: format_ts(row.created_ms),
                last_used_at: None,
            }),
        )
            .into_response())
    };
    result.await.unwrap_or_else(Problem::into_response)
}

/// `GET /v1/admin/tokens`.
pub async fn list(State(state): State<AppState>, _: Params<NoParams>) -> Response {
    match with_store(&state, |r| r.tokens()).await {
        Ok(rows) => {
            let tokens: Vec<TokenView> = rows
                .into_iter()
                .map(|t| TokenView {
                    id: t.id,
                    token: None,
                    name: t.name,
                    scope: t.scope,
                    devices: t.devices,
                    created_at: format_ts(t.created_ms),
                    last_used_at: Some(t.last_used_ms.map(format_ts)),
                })
                .collect();
            Json(serde_json::json!({ "tokens": tokens })).into_response()
        }
        Err(p) => p.into_response(),
    }
}

/// `DELETE /v1/admin/tokens/{id}`.
pub async fn revoke(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    _: Params<NoParams>,
) -> Response {
    let id = match id {
        Ok(Path(id)) => id,
        Err(e) => return Problem::rejected(e.status(), e.body_text()).into_response(),
    };
    let target = id.clone();
    match with_store(&state, move |r| r.revoke_token(&target)).await {
        Ok(true) => {
            state.access.tokens.revoked_now(std::slice::from_ref(&id));
            tracing::info!(id = %id, "token revoked");
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(false) => Problem::not_found(format!(
            "no active token `{id}` (unknown, or already revoked)"
        ))
        .into_response(),
        Err(p) => p.into_response(),
    }
}

/// Unicode's invisible format characters: bidirectional marks, embeddings, overrides and
/// isolates (U+061C, U+200E–U+200F, U+202A–U+202E, U+2066–U+2069), zero-width and joining
/// characters (U+200B–U+200D, U+2060–U+2064, U+FEFF), the soft hyphen and the Mongolian vowel
/// separator. They make a listed name display as another one.
fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{061C}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
    )
}
