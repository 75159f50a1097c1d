//! HTTP routes: `/mutate` (AdmissionReview v1), `/healthz`, `/readyz`, `/metrics`.

use crate::admit::Admitter;
use axum::{
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Extension, Json, Router,
};
use kube::core::{
    admission::{AdmissionRequest, AdmissionResponse, AdmissionReview},
    DynamicObject,
};
use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Instant,
};
use tracing::warn;

pub const ADMISSION_API_VERSION: &str = "admission.k8s.io/v1";

pub struct AppState {
    pub admitter: Admitter,
    pub ready: AtomicBool,
}

pub fn router(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        // outermost: the arrival is stamped before the body is read
        .layer(axum::middleware::from_fn(stamp_arrival))
        .with_state(state)
}

/// When a request reached the webhook (its headers read, its body not yet).
#[derive(Clone, Copy)]
struct Arrived(Instant);

async fn stamp_arrival(
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    request.extensions_mut().insert(Arrived(Instant::now()));
    next.run(request).await
}

async fn mutate(
    State(state): State<Arc<AppState>>,
    arrived: Option<Extension<Arrived>>,
    body: Bytes,
) -> Response {
    let arrived = arrived
        .map(|Extension(Arrived(t))| t)
        .unwrap_or_else(Instant::now);
    let response = answer(&state, arrived, &body).await;
    state
        .admitter
        .metrics
        .admission_seconds
        .observe(arrived.elapsed().as_secs_f64());
    response
}

async fn answer(state: &AppState, arrived: Instant, body: &[u8]) -> Response {
    let request = match parse_review(body) {
        Ok(r) => r,
        Err(message) => {
            state
                .admitter
                .metrics
                .admission(crate::decision::Outcome::Invalid);
            warn!(error = %message, bytes = body.len(), "malformed AdmissionReview");
            return (StatusCode::BAD_REQUEST, message).into_response();
        }
    };
    let response = state.admitter.admit(&request, arrived).await;
    match review_json(response) {
        Ok(v) => Json(v).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the AdmissionReview: {e}"),
        )
            .into_response(),
    }
}

/// The AdmissionReview as Kubernetes writes it: kube-core serialises the patch
/// bytes as a JSON array of numbers, the API's own form is a base64 string.
pub fn review_json(response: AdmissionResponse) -> Result<serde_json::Value, serde_json::Error> {
    use base64::Engine;
    let patch = response.patch.clone();
    let mut value = serde_json::to_value(response.into_review())?;
    if let (Some(bytes), Some(slot)) = (patch, value.pointer_mut("/response/patch")) {
        *slot = serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
    }
    Ok(value)
}

/// The request inside an AdmissionReview v1 body, or a message saying what is wrong.
pub fn parse_review(body: &[u8]) -> Result<AdmissionRequest<DynamicObject>, String> {
    let review: AdmissionReview<DynamicObject> = serde_json::from_slice(body)
        .map_err(|e| format!("the body is not an AdmissionReview: {e}"))?;
    if review.types.api_version != ADMISSION_API_VERSION || review.types.kind != "AdmissionReview" {
        return Err(format!(
            "expected apiVersion {ADMISSION_API_VERSION} kind AdmissionReview, got apiVersion {:?} kind {:?}",
            review.types.api_version, review.types.kind
        ));
    }
    review
        .try_into()
        .map_err(|_| "the AdmissionReview has no request".to_string())
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.ready.load(Ordering::Relaxed) {
        "ready".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.admitter.metrics.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_review_table() {
        let ok = r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u1",
            "kind":{"group":"","version":"v1","kind":"Pod"},"resource":{"group":"","version":"v1","resource":"pods"},
            "operation":"CREATE","userInfo":{},"name":"p","namespace":"abcdesktop","object":{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p"}}}}"#;
        assert_eq!(parse_review(ok.as_bytes()).unwrap().uid, "u1");
        let bad: &[(&str, &str)] = &[
            ("not json", "not an AdmissionReview"),
            (
                r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
                "no request",
            ),
            (
                r#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":null}"#,
                "expected apiVersion",
            ),
        ];
        for (body, want) in bad {
            let e = parse_review(body.as_bytes()).unwrap_err();
            assert!(e.contains(want), "{body}: {e}");
        }
    }
}
