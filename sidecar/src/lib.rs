//! desktop-snapshot commit sidecar: when the user picks "snapshot", commits
//! the desktop container through containerd and pushes it to the registry.
//!
//! The data path, top to bottom: [`api`] (click, or [`logoff`]) -> [`snapshot`] ->
//! [`find`] -> [`commit`] (pause, read the changes from the [`upper`]
//! directory into a [`spool`] or through the Diff service, resume) -> [`image`]
//! -> [`push`].

pub mod api;
pub mod beneath;
pub mod commit;
pub mod config;
pub mod ctrd;
pub mod estargz;
pub mod find;
pub mod harden;
pub mod image;
pub mod layer;
pub mod lineage;
pub mod logoff;
pub mod members;
pub mod merge;
pub mod metrics;
pub mod prune;
pub mod push;
pub mod session;
pub mod snapshot;
pub mod spool;
pub mod squash;
pub mod state;
pub use snapshot_tags as tag;
pub mod upper;
