//! Writing a rebased snapshot into the registry: reads the snapshot's config
//! and the new base's manifest and config, composes ([`crate::rebase`]),
//! makes the new base's layers present in the snapshot's repository (there
//! already, or mounted from the base's repository: no layer data moves), then
//! writes the config and, last, the manifest with its tag. A failure anywhere
//! leaves no tag. Thin I/O over [`Registry`].

use crate::{
    rebase::{self, Image, Naming},
    registry::{Document, ErrorKind, LookupError, Registry},
    target::Target,
};
use oci_client::Reference;
use serde_json::Value;

/// One snapshot to move onto another base.
#[derive(Debug, Clone)]
pub struct Job {
    /// Where the snapshot is, and where the rebased one goes.
    pub target: Target,
    pub snapshot_manifest: Document,
    /// Index of the snapshot's first user layer.
    pub first_user_layer: usize,
    /// The new base, as the pod names it; it must be in the snapshot registry.
    pub onto: String,
    /// The rebased snapshot's tag.
    pub tag: String,
    /// RFC 3339.
    pub created: String,
}

/// What was written.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    pub tag: String,
    pub digest: String,
}

fn failed(detail: impl Into<String>) -> LookupError {
    LookupError::new(ErrorKind::Other, detail)
}

/// Writes `job`'s rebased snapshot.
pub async fn rebase(registry: &Registry, job: &Job) -> Result<Written, LookupError> {
    let base: Reference = job.onto.parse().map_err(|e| {
        failed(format!(
            "the new base {:?} is not an image reference: {e}",
            job.onto
        ))
    })?;
    if base.registry() != registry.host() {
        return Err(failed(format!(
            "the new base {} is not in the snapshot registry {}: a rebase mounts its layers from there",
            job.onto,
            registry.host()
        )));
    }
    let path = &job.target.path;
    let snapshot: Value = serde_json::from_slice(&job.snapshot_manifest.body).map_err(|e| {
        LookupError::new(ErrorKind::Garbage, format!("the snapshot's manifest: {e}"))
    })?;
    let config_digest = snapshot["config"]["digest"].as_str().ok_or_else(|| {
        LookupError::new(
            ErrorKind::Garbage,
            "the snapshot's manifest names no config",
        )
    })?;
    let config = registry.document_blob(path, config_digest).await?;
    let platform: Value = serde_json::from_slice(&config.body).unwrap_or_default();

    let base_path = base.repository();
    let reference = base.digest().or(base.tag()).unwrap_or("latest").to_string();
    let mut base_manifest = registry
        .manifest(base_path, &reference)
        .await?
        .ok_or_else(|| failed(format!("the new base {} does not exist", job.onto)))?;
    if let Some(digest) = for_platform(&base_manifest, &platform)? {
        base_manifest = registry
            .manifest(base_path, &digest)
            .await?
            .ok_or_else(|| failed(format!("the new base's manifest {digest} does not exist")))?;
    }
    let base_config_digest = serde_json::from_slice::<Value>(&base_manifest.body)
        .ok()
        .and_then(|m| m["config"]["digest"].as_str().map(str::to_string))
        .ok_or_else(|| {
            LookupError::new(
                ErrorKind::Garbage,
                "the new base's manifest names no config",
            )
        })?;
    let base_config = registry
        .document_blob(base_path, &base_config_digest)
        .await?;

    let rebased = rebase::onto(
        &Image {
            manifest: &job.snapshot_manifest,
            config: &config,
        },
        job.first_user_layer,
        &Image {
            manifest: &base_manifest,
            config: &base_config,
        },
        &Naming {
            base_name: &job.onto,
            tag: &job.tag,
            created: &job.created,
        },
    )
    .map_err(failed)?;

    let present = futures::future::try_join_all(
        rebased
            .base_layers
            .iter()
            .map(|digest| registry.ensure_blob(path, base_path, digest)),
    )
    .await?;
    if let Some((digest, _)) = rebased.base_layers.iter().zip(&present).find(|(_, p)| !**p) {
        return Err(failed(format!(
            "layer {digest} of the new base could not be mounted from {base_path} into {path}"
        )));
    }
    registry.put_blob(path, &rebased.config).await?;
    registry
        .put_manifest(path, &job.tag, &rebased.manifest)
        .await?;
    Ok(Written {
        tag: job.tag.clone(),
        digest: rebased.manifest.digest,
    })
}

/// The digest of the entry of index `manifest` for `config`'s platform;
/// `None` when `manifest` is an image manifest.
fn for_platform(manifest: &Document, config: &Value) -> Result<Option<String>, LookupError> {
    let index: Value = serde_json::from_slice(&manifest.body).map_err(|e| {
        LookupError::new(ErrorKind::Garbage, format!("the new base's manifest: {e}"))
    })?;
    let Some(entries) = index["manifests"].as_array() else {
        return Ok(None);
    };
    entries
        .iter()
        .find(|m| {
            m["platform"]["os"] == config["os"]
                && m["platform"]["architecture"] == config["architecture"]
        })
        .and_then(|m| m["digest"].as_str().map(|d| Some(d.to_string())))
        .ok_or_else(|| {
            failed(format!(
                "the new base has no image for {}/{}",
                config["os"], config["architecture"]
            ))
        })
}
