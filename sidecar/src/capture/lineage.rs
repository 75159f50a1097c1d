//! What the container's image sits on: the provenance the next snapshot
//! carries (`snapshot_tags::provenance`). From the image's own annotations
//! (a snapshot made by this version), else the image is the base itself (a
//! fresh desktop), else a snapshot made before provenance existed, whose
//! layers beyond the base image's are the user's (the base looked up in the
//! node's containerd, or else in its registry: [`from_registry`]).

use crate::{ctrd::Ctrd, image, registry::push::Registry};
use oci_client::Reference;
use snapshot_tags::provenance::Provenance;
use tracing::info;

/// The provenance of `image` (the container's image, named `image_name` in
/// containerd), whose pod named `base_name` as its graphical image.
pub async fn of(
    ctrd: &Ctrd,
    image_name: &str,
    image: &image::Base,
    base_name: Option<&str>,
) -> Option<Provenance> {
    if let Some(p) = Provenance::read(&image.annotations()) {
        return Some(p);
    }
    let Some(base_name) = base_name.filter(|b| !b.is_empty()) else {
        // no base named (no `SNAPSHOT_BASE_IMAGE`): the desktop's own image,
        // which says nothing of its own, is the base of its first snapshot
        return Some(Provenance {
            base_name: image_name.to_string(),
            base_digest: Some(image.digest.clone()),
            first_user_layer: image::layer_count(image),
        });
    };
    let base_ref: Reference = base_name.parse().ok()?;
    if image_name
        .parse::<Reference>()
        .is_ok_and(|r| r.whole() == base_ref.whole())
    {
        return Some(Provenance {
            base_name: base_name.to_string(),
            base_digest: Some(image.digest.clone()),
            first_user_layer: image::layer_count(image),
        });
    }
    match image::base(ctrd, &base_ref.whole()).await {
        Ok(base) => {
            let found = Provenance::legacy(
                base_name,
                Some(&base.digest),
                &base.layer_digests(),
                &image.layer_digests(),
            );
            if found.is_none() {
                info!(
                    image = image_name,
                    base = base_name,
                    "the image does not sit on the pod's base image: its provenance is unknown"
                );
            }
            found
        }
        Err(e) => {
            info!(image = image_name, base = base_name, reason = %format!("{e:#}"), "the base image is not on the node: the snapshot's provenance is unknown");
            None
        }
    }
}

/// The provenance of `image` (a snapshot made before provenance annotations)
/// against the pod's base image `base_name` as its registry describes it:
/// for a node that has the snapshot but not the base image itself.
pub async fn from_registry(
    registry: &Registry,
    image: &image::Base,
    base_name: &str,
) -> Option<Provenance> {
    let base_ref: Reference = base_name.parse().ok()?;
    match registry.image_layers(&base_ref).await {
        Ok((digest, layers)) => {
            let layers: Vec<&str> = layers.iter().map(String::as_str).collect();
            let found =
                Provenance::legacy(base_name, Some(&digest), &layers, &image.layer_digests());
            info!(
                base = base_name,
                known = found.is_some(),
                "the base image read from its registry"
            );
            found
        }
        Err(e) => {
            info!(base = base_name, reason = %format!("{e:#}"), "the base image is not readable from its registry either: the snapshot's provenance is unknown");
            None
        }
    }
}
