//! A session's chain of snapshots: what the last pushed capture made (its
//! image, which the next increment builds on, and what a click that finds
//! nothing changed answers) kept with that capture's record
//! ([`record`](crate::capture::record)) in the work directory, so a
//! restarted sidecar goes on with the chain. Saved only after a push
//! succeeded: the record describes the last pushed capture, never one whose
//! push failed; forgotten when a push made no record (the Diff service's
//! layers).

use crate::{
    capture::record::{self, Identity, Record},
    config::Config,
    image,
};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::PathBuf;
use tracing::{info, warn};

/// The image the last pushed capture made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Last {
    /// `registry/repository:tag@digest`.
    pub image: String,
    /// Its manifest's digest, manifest and config.
    pub digest: String,
    pub manifest: Value,
    pub config: Value,
}

impl Last {
    /// The image, as the base of the next snapshot.
    pub fn base(&self) -> image::Base {
        image::Base {
            digest: self.digest.clone(),
            manifest: self.manifest.clone(),
            config: self.config.clone(),
        }
    }
}

/// Where the record of this sidecar's desktop is kept: the work directory
/// (the pod's emptyDir), one file per pod and container.
pub fn path(config: &Config) -> PathBuf {
    let safe = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    config.work_dir.join(format!(
        "capture-{}-{}.record",
        safe(&config.pod_uid),
        safe(&config.container)
    ))
}

/// The last pushed capture of the container `identity` names, if its record
/// is there, whole, and its own.
pub fn load(config: &Config, identity: &Identity) -> Option<(Last, Record)> {
    let path = path(config);
    let found = record::load(&path, identity).and_then(|(payload, record)| {
        serde_json::from_value::<Last>(payload)
            .map(|last| (last, record))
            .map_err(|e| format!("the record is damaged: {e}"))
    });
    match found {
        Ok((last, record)) => {
            info!(entries = record.len(), last = %last.image, "the record of the last capture: this snapshot is an increment");
            Some((last, record))
        }
        Err(why) => {
            info!(reason = %why, "no usable record of the last capture: this snapshot's layer is a full one");
            None
        }
    }
}

/// Keeps `record` with the image its capture made, for the next snapshot.
pub fn save(config: &Config, identity: &Identity, last: &Last, record: &Record) -> Result<()> {
    let payload = serde_json::to_value(last)?;
    record::save(&path(config), identity, &payload, record)
}

/// Drops the record (the last push made none, or it could not be kept).
pub fn forget(config: &Config) {
    if let Err(e) = record::forget(&path(config)) {
        warn!(error = %e, "cannot remove the record of the last capture");
    }
}
