//! The base image as containerd holds it, and the snapshot's config and
//! manifest built on it. Reading is I/O; building is pure and unit-tested.
//! Below every stage of the data path, with what they hand each other: the
//! [`new_layer`] and its [`spool`].

pub mod new_layer;
pub mod spool;

use crate::ctrd::Ctrd;
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use containerd_client::services::v1::{GetImageRequest, ReadContentRequest};
use futures::{Stream, StreamExt};
use serde_json::{json, Value};
use std::collections::BTreeMap;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// A blob of the content store as a stream of chunks.
pub fn read_stream(
    ctrd: &Ctrd,
    digest: &str,
) -> impl Stream<Item = Result<Bytes>> + Send + 'static {
    let (ctrd, digest) = (ctrd.clone(), digest.to_string());
    futures::stream::once(async move {
        let r = ctrd
            .client
            .content()
            .read(ctrd.req(ReadContentRequest {
                digest: digest.clone(),
                offset: 0,
                size: 0,
            }))
            .await
            .with_context(|| format!("reading {digest} from containerd's content store"))?;
        Ok::<_, anyhow::Error>(r.into_inner().map(|chunk| {
            chunk
                .map(|c| Bytes::from(c.data))
                .map_err(anyhow::Error::from)
        }))
    })
    .map(|s| match s {
        Ok(inner) => inner.boxed(),
        Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
    })
    .flatten()
}

/// Whether the node's content store holds `digest`.
pub async fn in_content_store(ctrd: &Ctrd, digest: &str) -> bool {
    use containerd_client::services::v1::InfoRequest;
    ctrd.client
        .content()
        .info(ctrd.req(InfoRequest {
            digest: digest.to_string(),
        }))
        .await
        .is_ok()
}

/// A small blob of the content store, whole.
pub async fn read_all(ctrd: &Ctrd, digest: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut s = Box::pin(read_stream(ctrd, digest));
    while let Some(chunk) = s.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

/// The base image's manifest and config, as JSON.
pub struct Base {
    /// The digest of the (platform's) manifest.
    pub digest: String,
    pub manifest: Value,
    pub config: Value,
}

impl Base {
    /// The manifest's annotations, as text.
    pub fn annotations(&self) -> BTreeMap<String, String> {
        self.manifest["annotations"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
            .collect()
    }

    /// The digests of its layers, in order.
    pub fn layer_digests(&self) -> Vec<&str> {
        self.manifest["layers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["digest"].as_str())
            .collect()
    }
}

/// Reads the image the container was created from.
pub async fn base(ctrd: &Ctrd, image_name: &str) -> Result<Base> {
    let image = ctrd
        .client
        .images()
        .get(ctrd.req(GetImageRequest {
            name: image_name.to_string(),
        }))
        .await
        .with_context(|| format!("image {image_name} is not in containerd"))?
        .into_inner()
        .image
        .context("containerd returned no image")?;
    let target = image.target.context("the image has no target")?;
    let mut media_type = target.media_type.clone();
    let mut digest = target.digest.clone();
    if media_type == OCI_INDEX || media_type == DOCKER_LIST {
        let index: Value = serde_json::from_slice(&read_all(ctrd, &digest).await?)
            .context("the image index is not JSON")?;
        let chosen =
            pick_platform(&index).context("the image index has no manifest for this platform")?;
        media_type = chosen["mediaType"]
            .as_str()
            .unwrap_or(OCI_MANIFEST)
            .to_string();
        digest = chosen["digest"]
            .as_str()
            .context("manifest without digest")?
            .to_string();
    }
    if media_type != OCI_MANIFEST && media_type != DOCKER_MANIFEST {
        bail!("unsupported base image manifest type {media_type}");
    }
    let manifest: Value = serde_json::from_slice(&read_all(ctrd, &digest).await?)
        .context("the manifest is not JSON")?;
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .context("manifest without config")?
        .to_string();
    let config: Value = serde_json::from_slice(&read_all(ctrd, &config_digest).await?)
        .context("the config is not JSON")?;
    Ok(Base {
        digest,
        manifest,
        config,
    })
}

fn pick_platform(index: &Value) -> Option<&Value> {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let manifests = index["manifests"].as_array()?;
    manifests
        .iter()
        .find(|m| m["platform"]["os"] == "linux" && m["platform"]["architecture"] == arch)
        .or_else(|| manifests.first())
}

/// Whether the base uses Docker's media types (the snapshot keeps its family).
pub fn is_docker(manifest: &Value) -> bool {
    manifest["mediaType"] == DOCKER_MANIFEST
}

/// The history entry that marks a user layer in a snapshot's config (every reader shares it).
pub use snapshot_tags::provenance::{HISTORY_CREATED_BY, USER_LAYER_COMMENT};

/// The snapshot's config: the base's, with the new layer's diff_id and a history entry.
pub fn next_config(base: &Value, diff_id: &str, created: &str) -> Value {
    let mut config = base.clone();
    if !config["rootfs"].is_object() {
        config["rootfs"] = json!({"type": "layers", "diff_ids": []});
    }
    match config["rootfs"]["diff_ids"].as_array_mut() {
        Some(ids) => ids.push(json!(diff_id)),
        None => config["rootfs"]["diff_ids"] = json!([diff_id]),
    }
    let entry = json!({"created": created, "created_by": HISTORY_CREATED_BY, "comment": USER_LAYER_COMMENT});
    match config["history"].as_array_mut() {
        Some(h) => h.push(entry),
        None => config["history"] = json!([entry]),
    }
    config["created"] = json!(created);
    config
}

/// The base flattened into nothing: what a squashed snapshot builds on (its one
/// layer holds the whole root filesystem).
pub fn squashed(base: &Base) -> Base {
    let mut manifest = base.manifest.clone();
    manifest["layers"] = json!([]);
    manifest["annotations"] = json!({});
    let mut config = base.config.clone();
    config["rootfs"] = json!({"type": "layers", "diff_ids": []});
    config["history"] = json!([]);
    Base {
        digest: base.digest.clone(),
        manifest,
        config,
    }
}

/// The image below its user's layers: its first `first` layers, and the
/// config without the user layers' diff_ids and history entries (those this
/// project wrote, `created_by: desktop-snapshot`). What a squash that keeps
/// the base builds on.
pub fn below(image: &Base, first: usize) -> Base {
    let mut manifest = image.manifest.clone();
    if let Some(layers) = manifest["layers"].as_array_mut() {
        layers.truncate(first);
    }
    let mut config = image.config.clone();
    if let Some(ids) = config["rootfs"]["diff_ids"].as_array_mut() {
        ids.truncate(first);
    }
    if let Some(history) = config["history"].as_array_mut() {
        history.retain(|h| h["created_by"] != HISTORY_CREATED_BY);
    }
    Base {
        digest: image.digest.clone(),
        manifest,
        config,
    }
}

/// How many layers the base has.
pub fn layer_count(base: &Base) -> usize {
    base.manifest["layers"]
        .as_array()
        .map(Vec::len)
        .unwrap_or(0)
}

/// The snapshot's manifest: the base's layers, then the new one (digest,
/// size, media type, and its descriptor's annotations if any: eStargz's); with
/// `annotations` (its tag, which makes every snapshot's manifest and digest
/// its own, so deleting one by digest never takes another tag with it; its
/// creation time and provenance: `snapshot_tags::provenance`).
pub fn next_manifest(
    base: &Value,
    config: (&str, usize),
    layer: (&str, u64, &str, &BTreeMap<String, String>),
    annotations: &BTreeMap<String, String>,
) -> Value {
    let docker = is_docker(base);
    let mut layers = base["layers"].as_array().cloned().unwrap_or_default();
    let mut descriptor = json!({
        "mediaType": layer.2,
        "digest": layer.0,
        "size": layer.1,
    });
    if !layer.3.is_empty() {
        descriptor["annotations"] = json!(layer.3);
    }
    layers.push(descriptor);
    json!({
        "schemaVersion": 2,
        "mediaType": if docker { DOCKER_MANIFEST } else { OCI_MANIFEST },
        "config": {"mediaType": if docker { DOCKER_CONFIG } else { OCI_CONFIG }, "digest": config.0, "size": config.1},
        "layers": layers,
        "annotations": annotations,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapshot_tags::provenance;

    #[test]
    fn config_and_manifest_grow_by_one_layer() {
        let base_config = json!({"architecture": "amd64", "os": "linux", "config": {"Env": ["A=1"]},
            "rootfs": {"type": "layers", "diff_ids": ["sha256:a"]}, "history": [{"created_by": "base"}]});
        let c = next_config(&base_config, "sha256:b", "2026-11-23T00:00:00Z");
        assert_eq!(c["rootfs"]["diff_ids"], json!(["sha256:a", "sha256:b"]));
        assert_eq!(c["history"].as_array().unwrap().len(), 2);
        assert_eq!(c["config"], base_config["config"]);
        let base_manifest = json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {},
            "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": "sha256:la", "size": 3}]});
        let annotations = provenance::unsourced("alice", "alice-1", "2026-11-23T00:00:00Z");
        let m = next_manifest(
            &base_manifest,
            ("sha256:cfg", 10),
            ("sha256:lb", 7, OCI_LAYER_GZIP, &BTreeMap::new()),
            &annotations,
        );
        assert!(m["layers"][1].get("annotations").is_none());
        assert_eq!(m["annotations"][provenance::TAG], "alice-1");
        assert_eq!(
            m["annotations"][provenance::CREATED],
            "2026-11-23T00:00:00Z"
        );
        assert_eq!(c["history"][1]["comment"], USER_LAYER_COMMENT);
        assert_eq!(m["layers"].as_array().unwrap().len(), 2);
        assert_eq!(m["layers"][1]["digest"], "sha256:lb");
        assert_eq!(m["config"]["mediaType"], OCI_CONFIG);
        let squashed = squashed(&Base {
            digest: "sha256:m".into(),
            manifest: base_manifest.clone(),
            config: base_config.clone(),
        });
        assert_eq!(layer_count(&squashed), 0);
        let c = next_config(&squashed.config, "sha256:all", "2026-11-23T00:00:00Z");
        assert_eq!(c["rootfs"]["diff_ids"], json!(["sha256:all"]));
        assert_eq!(c["history"].as_array().unwrap().len(), 1);
        let two = Base {
            digest: "sha256:m".into(),
            manifest: m.clone(),
            config: c.clone(),
        };
        let below = below(&two, 0);
        assert_eq!(layer_count(&below), 0);
        assert_eq!(below.config["rootfs"]["diff_ids"], json!([]));
        assert_eq!(
            below.config["history"],
            json!([]),
            "the user's history goes"
        );
        let docker = json!({"mediaType": DOCKER_MANIFEST, "layers": []});
        let m = next_manifest(
            &docker,
            ("sha256:cfg", 10),
            ("sha256:lb", 7, DOCKER_LAYER_GZIP, &BTreeMap::new()),
            &annotations,
        );
        assert_eq!(m["mediaType"], DOCKER_MANIFEST);
        assert_eq!(m["layers"][0]["mediaType"], DOCKER_LAYER_GZIP);
        let stargz = BTreeMap::from([
            (
                crate::layer::estargz::TOC_DIGEST_ANNOTATION.to_string(),
                "sha256:toc".to_string(),
            ),
            (
                crate::layer::estargz::UNCOMPRESSED_SIZE_ANNOTATION.to_string(),
                "1024".to_string(),
            ),
        ]);
        let m = next_manifest(
            &base_manifest,
            ("sha256:cfg", 10),
            ("sha256:lb", 7, OCI_LAYER_GZIP, &stargz),
            &annotations,
        );
        assert_eq!(
            m["layers"][1]["annotations"][crate::layer::estargz::TOC_DIGEST_ANNOTATION],
            "sha256:toc"
        );
        assert_eq!(
            m["layers"][1]["annotations"][crate::layer::estargz::UNCOMPRESSED_SIZE_ANNOTATION],
            "1024"
        );
        assert_eq!(m["layers"][1]["mediaType"], OCI_LAYER_GZIP);
    }
}
