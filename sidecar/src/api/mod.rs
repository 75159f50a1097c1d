//! The HTTP API on port 29785, as abcdesktop's front end calls it (through a
//! router that may strip the `/snapshot` prefix, so both forms answer).

pub mod logoff;
pub mod schedule;
pub mod state;

use crate::snapshot::{
    self,
    session::{now_ms, Begin, Trigger},
};
use axum::{
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use serde_json::json;
pub use state::AppState;
use std::sync::Arc;

pub const API_VERSION: &str = "1.0";

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/snapshot", post(start))
        .route("/snapshot/snapshot", post(start))
        .route("/snapshot/logoff", get(at_logoff))
        .route("/logoff", get(at_logoff))
        .route("/snapshots", get(list))
        .route("/snapshots/", get(list))
        .route("/snapshot/snapshots", get(list))
        .route("/version", get(version))
        .route("/snapshot/version", get(version))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/snapshot/{id}", get(status))
        .route("/{id}", get(status))
        .with_state(state)
}

fn envelope(status: StatusCode, ok: bool, message: &str, session_id: &str) -> Response {
    (
        status,
        Json(json!({
            "message": message,
            "status": if ok { "success" } else { "error" },
            "timestamp": now_ms(),
            "session_id": session_id,
            "api_version": API_VERSION,
        })),
    )
        .into_response()
}

fn authorised(state: &AppState, headers: &HeaderMap) -> bool {
    let Some(token) = &state.token else {
        return true;
    };
    headers
        .get("abcauthorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| t.trim() == token)
}

async fn start(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if !authorised(&state, &headers) {
        return envelope(
            StatusCode::UNAUTHORIZED,
            false,
            "missing or wrong ABCAuthorization bearer token",
            "",
        );
    }
    match state.sessions.begin(state.config.min_interval) {
        Begin::Started(id) => {
            let (state, running) = (state.clone(), id.clone());
            tokio::spawn(async move {
                snapshot::run(
                    &state.config,
                    &state.sessions,
                    &state.metrics,
                    &running,
                    Trigger::Click,
                )
                .await
            });
            envelope(StatusCode::OK, true, "snapshot process started", &id)
        }
        Begin::Running(id) => envelope(
            StatusCode::OK,
            true,
            "snapshot process already running",
            &id,
        ),
        Begin::TooSoon { ended, wait } => envelope(
            StatusCode::TOO_MANY_REQUESTS,
            false,
            &format!(
                "the last snapshot ended {} s ago: the next one can start in {} s",
                ended.as_secs(),
                wait.as_secs_f64().ceil() as u64
            ),
            "",
        ),
    }
}

/// The graphical container's preStop hook: snapshots the desktop and answers
/// when the snapshot has ended (the kubelet waits for the answer before it
/// stops the desktop). No token: the kubelet cannot send one; the minimum
/// interval holds, and the snapshot goes to this user's repository only.
async fn at_logoff(State(state): State<Arc<AppState>>) -> Response {
    match logoff::snapshot(state).await {
        logoff::Ended::Operation { id, ok, message } => envelope(
            if ok {
                StatusCode::OK
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            },
            ok,
            &message,
            &id,
        ),
        logoff::Ended::NotStarted(why) => {
            envelope(StatusCode::SERVICE_UNAVAILABLE, false, &why, "")
        }
    }
}

async fn status(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    match state.sessions.get(&id) {
        Some(op) => envelope(
            StatusCode::OK,
            op.step != crate::snapshot::session::Step::Error,
            &op.message,
            &id,
        ),
        None => envelope(StatusCode::NOT_FOUND, false, "unknown session", &id),
    }
}

async fn list(State(state): State<Arc<AppState>>) -> Response {
    let operations = state.sessions.list();
    (
        StatusCode::OK,
        Json(json!({
            "message": operations,
            "status": "success",
            "timestamp": now_ms(),
            "session_id": state.sessions.running().unwrap_or_default(),
            "api_version": API_VERSION,
        })),
    )
        .into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn version() -> Response {
    envelope(StatusCode::OK, true, env!("CARGO_PKG_VERSION"), "")
}
