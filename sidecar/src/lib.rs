//! desktop-snapshot commit sidecar: when the user picks "snapshot", commits
//! the desktop container through containerd and pushes it to the registry.
//!
//! The data path, one folder per stage, top to bottom (each imports only
//! those below it):
//! - [`api`]: the HTTP API (a click), the [`logoff`](api::logoff) snapshot,
//!   the [`schedule`](api::schedule) and the state they share;
//! - [`snapshot`]: one snapshot's orchestration, the operations the front end
//!   polls ([`session`](snapshot::session)) and the squash past the layer limit;
//! - [`capture`]: find the container, pause it, read its change from the
//!   overlayfs upper directory or through the Diff service, resume;
//! - [`layer`]: the layer writers (compression, gzip members, eStargz, the
//!   merge of layers, tar records);
//! - [`registry`]: push the snapshot, prune old ones;
//! - [`image`]: what the stages hand each other (the base image and the
//!   snapshot's config and manifest, the new layer and its spool).
//!
//! Beside them: [`config`], [`metrics`], [`harden`] and [`ctrd`] (the
//! containerd connection).

pub mod api;
pub mod capture;
pub mod config;
pub mod ctrd;
pub mod harden;
pub mod image;
pub mod layer;
pub mod metrics;
pub mod registry;
pub mod snapshot;
pub use snapshot_tags as tag;
