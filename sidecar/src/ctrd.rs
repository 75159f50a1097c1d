//! A connection to containerd's gRPC API, with the namespace (and, while a
//! commit runs, the lease) on every request.

use anyhow::{Context, Result};
use containerd_client::tonic::{metadata::MetadataValue, Request};
use std::path::Path;

#[derive(Clone)]
pub struct Ctrd {
    pub client: std::sync::Arc<containerd_client::Client>,
    pub namespace: String,
    pub lease: Option<String>,
}

impl Ctrd {
    pub async fn connect(socket: &Path, namespace: &str) -> Result<Self> {
        let client = containerd_client::Client::from_path(socket)
            .await
            .with_context(|| format!("cannot reach containerd at {}", socket.display()))?;
        Ok(Self {
            client: std::sync::Arc::new(client),
            namespace: namespace.to_string(),
            lease: None,
        })
    }

    /// The same connection, with the work attached to `lease`.
    pub fn with_lease(&self, lease: &str) -> Self {
        Self {
            lease: Some(lease.to_string()),
            ..self.clone()
        }
    }

    /// A request carrying the namespace and the lease.
    pub fn req<T>(&self, message: T) -> Request<T> {
        let mut r = Request::new(message);
        if let Ok(v) = MetadataValue::try_from(self.namespace.as_str()) {
            r.metadata_mut().insert("containerd-namespace", v);
        }
        if let Some(lease) = &self.lease {
            if let Ok(v) = MetadataValue::try_from(lease.as_str()) {
                r.metadata_mut().insert("containerd-lease", v);
            }
        }
        r
    }
}
