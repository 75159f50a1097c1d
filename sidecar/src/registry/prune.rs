//! Retention after a successful push: the user's snapshots no rule keeps
//! (`--keep-last`, `--keep-hourly`, `--keep-daily`, `--keep-weekly`,
//! `--keep-min-age`: the plan in `snapshot_tags::retention`) are deleted from
//! the repository (manifest DELETE by digest), never another user's (the plan
//! matches the exact prefix), never the newest or the one just pushed.
//! Manifests only: a layer stays as long as any manifest names it, so a
//! snapshot deleted in the middle of a chain takes nothing from those above it. A manifest is deleted only when its own annotation names the tag
//! being pruned: distribution deletes every tag on a digest, and only the
//! annotation proves no other tag shares it. Older snapshots without the
//! annotation are left in place (counted as `skipped`).
//!
//! Retention never fails a snapshot: whatever it meets is logged and counted.
//! Reclaiming the blobs is the registry's garbage collector's work.

use super::push::{Deleted, Registry};
use crate::metrics::Metrics;
use anyhow::Result;
use oci_client::Reference;
use snapshot_tags::retention::{self, Rules};
use std::time::SystemTime;
use tracing::{info, warn};

/// What one retention run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub deleted: u64,
    pub skipped: u64,
    pub refused: bool,
    pub failed: u64,
}

/// Applies `rules` to `prefix`'s snapshots in `target`'s repository after
/// `target` (its tag: the snapshot just pushed) was written.
pub async fn run(
    registry: &Registry,
    target: &Reference,
    prefix: &str,
    rules: Rules,
    metrics: &Metrics,
) -> Pruned {
    let pruned = match prune(registry, target, prefix, rules).await {
        Ok(p) => p,
        Err(e) => {
            warn!(error = %format!("{e:#}"), "retention could not list the repository; nothing deleted");
            Pruned {
                failed: 1,
                ..Pruned::default()
            }
        }
    };
    metrics.retention("deleted", pruned.deleted);
    metrics.retention("skipped", pruned.skipped);
    metrics.retention("refused", u64::from(pruned.refused));
    metrics.retention("failed", pruned.failed);
    if pruned != Pruned::default() {
        info!(
            deleted = pruned.deleted,
            skipped = pruned.skipped,
            refused = pruned.refused,
            failed = pruned.failed,
            "retention done"
        );
    }
    pruned
}

async fn prune(
    registry: &Registry,
    target: &Reference,
    prefix: &str,
    rules: Rules,
) -> Result<Pruned> {
    let mut pruned = Pruned::default();
    if rules.off() {
        return Ok(pruned);
    }
    let pushed = target.tag().unwrap_or_default();
    let tags = registry.tags(target).await?;
    let doomed = retention::to_delete(
        tags.iter().map(String::as_str),
        prefix,
        rules,
        SystemTime::now(),
        pushed,
    );
    for tag in doomed {
        let (digest, annotations) = match registry.manifest_of(target, &tag).await {
            Ok(found) => found,
            Err(e) => {
                warn!(tag = %tag, error = %format!("{e:#}"), "retention cannot read a manifest");
                pruned.failed += 1;
                continue;
            }
        };
        if annotations[snapshot_tags::provenance::TAG].as_str() != Some(tag.as_str()) {
            pruned.skipped += 1;
            continue;
        }
        match registry.delete_manifest(target, &digest).await {
            Ok(Deleted::Done) => {
                info!(tag = %tag, digest = %digest, "old snapshot deleted");
                pruned.deleted += 1;
            }
            Ok(Deleted::Gone) => {}
            Ok(Deleted::Refused(answer)) => {
                warn!(answer = %answer, "the registry refuses deletes (storage.delete.enabled: false?): old snapshots stay");
                pruned.refused = true;
                break;
            }
            Err(e) => {
                warn!(tag = %tag, error = %format!("{e:#}"), "retention could not delete a snapshot");
                pruned.failed += 1;
            }
        }
    }
    Ok(pruned)
}
