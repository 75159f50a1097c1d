//! Pushing the snapshot with oci-client's blob-level calls: base layers the
//! repository already has are skipped, the others streamed from containerd's
//! content store; the new layer is compressed while it streams (memory stays
//! flat whatever its size); config next; the manifest, with the tag, last, so
//! a push that fails anywhere leaves no tag.

use crate::{
    config::Protocol,
    ctrd::Ctrd,
    image,
    layer::{self, Codec},
};
use anyhow::{Context, Result};
use bytes::Bytes;
use futures::TryStreamExt;
use oci_client::{
    client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol},
    secrets::RegistryAuth,
    Client, Reference, RegistryOperation,
};
use serde_json::Value;
use sha2::Digest;
use std::path::Path;
use tracing::info;

pub struct Registry {
    client: Client,
    auth: RegistryAuth,
}

impl Registry {
    /// A client with the credentials as they are in the mounted secret now.
    pub async fn login(
        repository: &str,
        protocol: Protocol,
        ca: Option<&Path>,
        credentials: Option<&Path>,
    ) -> Result<Self> {
        let host = repository.split('/').next().unwrap_or(repository);
        let auth = match credentials {
            Some(path) => {
                let doc = tokio::fs::read(path)
                    .await
                    .with_context(|| format!("reading {}", path.display()))?;
                registry_credentials::auth_for(&doc, host)
                    .with_context(|| format!("reading {}", path.display()))?
            }
            None => RegistryAuth::Anonymous,
        };
        let mut extra = Vec::new();
        if let Some(ca) = ca {
            let data = tokio::fs::read(ca)
                .await
                .with_context(|| format!("reading {}", ca.display()))?;
            extra.push(Certificate {
                encoding: CertificateEncoding::Pem,
                data,
            });
        }
        let client = Client::new(ClientConfig {
            protocol: match protocol {
                Protocol::Https => ClientProtocol::Https,
                Protocol::Http => ClientProtocol::Http,
            },
            extra_root_certificates: extra,
            ..Default::default()
        });
        Ok(Self { client, auth })
    }

    /// Authenticates for pushing to `target` (checks the credentials early).
    pub async fn authenticate(&self, target: &Reference) -> Result<()> {
        self.client
            .auth(target, &self.auth, RegistryOperation::Push)
            .await
            .with_context(|| format!("logging in to {}", target.registry()))?;
        Ok(())
    }

    /// Pushes the snapshot; returns the manifest digest.
    pub async fn push(
        &self,
        ctrd: &Ctrd,
        target: &Reference,
        base: &image::Base,
        layer_diff_id: &str,
        compression: (Codec, usize),
        created: &str,
    ) -> Result<String> {
        self.client
            .store_auth_if_needed(target.resolve_registry(), &self.auth)
            .await;
        for layer in base.manifest["layers"].as_array().into_iter().flatten() {
            let digest = layer["digest"]
                .as_str()
                .context("a base layer without digest")?;
            let size = layer["size"].as_u64();
            if self
                .client
                .blob_exists(target, digest)
                .await
                .context("asking the registry for a base layer")?
            {
                continue;
            }
            info!(
                digest,
                "uploading a base layer from the node's content store"
            );
            let stream = image::read_stream(ctrd, digest).map_err(to_oci);
            self.client
                .push_blob_stream(target, stream, digest, size)
                .await
                .with_context(|| format!("uploading base layer {digest}"))?;
        }

        // The user's changes: uncompressed from containerd, compressed on the way.
        let started = std::time::Instant::now();
        let (codec, threads) = compression;
        let compressed = layer::compress(image::read_stream(ctrd, layer_diff_id), codec, threads)
            .map_err(oci_client::errors::OciDistributionError::IoError);
        let pushed = self
            .client
            .push_blob_stream_chunked(target, compressed)
            .await
            .context("uploading the snapshot layer")?;
        info!(digest = %pushed.blob_digest, bytes = pushed.size, elapsed_ms = started.elapsed().as_millis() as u64, "snapshot layer uploaded");

        let config = image::next_config(&base.config, layer_diff_id, created);
        let config_bytes = serde_json::to_vec(&config)?;
        let config_digest = format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(&config_bytes))
        );
        self.client
            .push_blob(target, config_bytes.clone(), &config_digest)
            .await
            .context("uploading the image config")?;

        let manifest: Value = image::next_manifest(
            &base.manifest,
            (&config_digest, config_bytes.len()),
            (
                &pushed.blob_digest,
                pushed.size,
                codec.media_type(image::is_docker(&base.manifest)),
            ),
        );
        let manifest_bytes = serde_json::to_vec(&manifest)?;
        let media_type = manifest["mediaType"]
            .as_str()
            .unwrap_or(image::OCI_MANIFEST)
            .to_string();
        self.client
            .push_manifest_raw(
                target,
                Bytes::from(manifest_bytes.clone()),
                media_type.parse().context("media type")?,
            )
            .await
            .context("uploading the manifest (the tag)")?;
        Ok(format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(&manifest_bytes))
        ))
    }
}

fn to_oci(e: anyhow::Error) -> oci_client::errors::OciDistributionError {
    oci_client::errors::OciDistributionError::GenericError(Some(format!("{e:#}")))
}
