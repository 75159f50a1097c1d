//! The Kubernetes API reads the webhook makes, answered as the API documents
//! them (no kube-apiserver can run on these machines): `GET
//! /api/v1/namespaces/{namespace}/{secrets|configmaps}/{name}` asked for as
//! `PartialObjectMetadata` gets the object's metadata only; a missing object
//! gets a `Status` with reason `NotFound` (404); a resource the caller may not
//! read (its RBAC rule is missing) a `Status` with reason `Forbidden` (403).
//! Plain HTTP on loopback, as `kubectl proxy` serves the API. Every request
//! is recorded, so a test can say what the webhook asked for.

use axum::{
    extract::{Path, State},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use serde_json::{json, Value};
use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
};

/// The media type a client asks for to get an object's metadata only.
pub const METADATA_ONLY: &str = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1";

/// The service account the webhook's requests come from, as the API names it in a 403.
const WEBHOOK_USER: &str = "system:serviceaccount:desktop-snapshot:snapshot-webhook";

/// One request the API received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub accept: String,
}

#[derive(Default)]
struct Objects {
    /// (namespace, resource, name) of the objects that exist.
    present: HashSet<(String, String, String)>,
    /// Resources (`secrets`, `configmaps`) the caller has no RBAC rule for.
    forbidden: HashSet<String>,
    seen: Vec<Seen>,
}

type Shared = Arc<Mutex<Objects>>;

pub struct KubeApi {
    /// `http://127.0.0.1:<port>`: what `--kube-api-url` takes.
    pub url: String,
    objects: Shared,
    server: tokio::task::JoinHandle<()>,
}

impl KubeApi {
    /// Serves an API that holds no object yet.
    pub async fn start() -> Self {
        let objects = Shared::default();
        let app = Router::new()
            .route(
                "/api/v1/namespaces/{namespace}/{resource}/{name}",
                get(read),
            )
            .fallback(|| async {
                status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    "the server could not find the requested resource".into(),
                    None,
                )
            })
            .with_state(objects.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the API's port on 127.0.0.1");
        let addr = listener.local_addr().expect("the API's address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url: format!("http://{addr}"),
            objects,
            server,
        }
    }

    fn objects(&self) -> std::sync::MutexGuard<'_, Objects> {
        self.objects.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates `resource` (`secrets`, `configmaps`) `name` in `namespace`.
    pub fn create(&self, namespace: &str, resource: &str, name: &str) {
        self.objects()
            .present
            .insert((namespace.into(), resource.into(), name.into()));
    }

    /// Deletes it.
    pub fn delete(&self, namespace: &str, resource: &str, name: &str) {
        self.objects()
            .present
            .remove(&(namespace.into(), resource.into(), name.into()));
    }

    /// From now on every read of `resource` is refused (403): the caller's
    /// RBAC rule for it is missing.
    pub fn forbid(&self, resource: &str) {
        self.objects().forbidden.insert(resource.into());
    }

    /// The requests received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.objects().seen.clone()
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn read(
    State(objects): State<Shared>,
    Path((namespace, resource, name)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut objects = objects.lock().unwrap_or_else(|e| e.into_inner());
    objects.seen.push(Seen {
        method: "GET".into(),
        path: format!("/api/v1/namespaces/{namespace}/{resource}/{name}"),
        accept: accept.clone(),
    });
    let details = Some(json!({ "name": name, "kind": resource }));
    if !["secrets", "configmaps"].contains(&resource.as_str()) {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource".into(),
            None,
        );
    }
    if objects.forbidden.contains(&resource) {
        return status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!(
                "{resource} \"{name}\" is forbidden: User \"{WEBHOOK_USER}\" cannot get resource \"{resource}\" in API group \"\" in the namespace \"{namespace}\""
            ),
            details,
        );
    }
    if !objects
        .present
        .contains(&(namespace.clone(), resource.clone(), name.clone()))
    {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{resource} \"{name}\" not found"),
            details,
        );
    }
    // The real API would send the whole object (a secret's data too) to a
    // client that does not ask for metadata: this one refuses, so a test
    // fails if the webhook ever asks for more than the metadata.
    if !accept
        .split(',')
        .any(|a| a.trim().replace(' ', "") == METADATA_ONLY)
    {
        return status(
            StatusCode::NOT_ACCEPTABLE,
            "NotAcceptable",
            format!("the harness serves metadata only (Accept: {METADATA_ONLY}), not {accept:?}"),
            None,
        );
    }
    let uid = format!("{:032x}", {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (&namespace, &resource, &name).hash(&mut h);
        h.finish()
    });
    (
        StatusCode::OK,
        Json(json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": format!("{}-{}-{}-{}-{}", &uid[0..8], &uid[8..12], &uid[12..16], &uid[16..20], &uid[20..32]),
                "resourceVersion": "1",
                "creationTimestamp": "2026-01-01T00:00:00Z"
            }
        })),
    )
        .into_response()
}

/// A `Status` object, as the API answers a failed request.
fn status(code: StatusCode, reason: &str, message: String, details: Option<Value>) -> Response {
    let mut body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    if let Some(d) = details {
        body["details"] = d;
    }
    (code, Json(body)).into_response()
}
