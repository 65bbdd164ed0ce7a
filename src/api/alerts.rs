//! `GET /v1/alerts` and `GET /v1/rules` (SPEC §12): the read side of the rule engine.
//! rule engine (`services::rules`, its [`AlertBoard`]) → **these handlers** → client.
//!
//! - `GET /v1/alerts`: `{"alerts": [{"rule", "device_id", "state": "pending"|"firing",
//!   "value", "since", "fired"?}]}`, every (rule, device) that is not inactive, sorted by rule
//!   and device. With PostgreSQL, what this replica knows (see ARCHITECTURE.md, "Alert
//!   rules").
//! - `GET /v1/rules`: `{"rules": [{"name", "devices", "kind": "threshold"|"absence", "metric",
//!   "condition": {"op", "operand"}, "for"} | {"name", "devices", "kind", "absent_for"}]}`,
//!   in configuration order.

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use super::params::{NoParams, Params};
use super::AppState;

/// `GET /v1/alerts`.
pub async fn list_alerts(State(state): State<AppState>, _: Params<NoParams>) -> Json<Value> {
    let board = state.alerts.clone();
    let alerts = tokio::task::spawn_blocking(move || board.active())
        .await
        .unwrap_or_default();
    Json(json!({ "alerts": alerts }))
}

/// `GET /v1/rules`.
pub async fn list_rules(State(state): State<AppState>, _: Params<NoParams>) -> Json<Value> {
    Json(json!({ "rules": state.alerts.rules() }))
}
