//! desktop-snapshot admission webhook: restores each desktop user's newest
//! snapshot when their desktop pod is created.
//!
//! The data path, top to bottom: [`server`] (AdmissionReview in) ->
//! [`decision::plan`] -> [`lookup`] (registry, coalesced, within a deadline) ->
//! [`decision::resolve`] -> [`patch`] (JSON Patch out), driven by [`admit`].

pub mod admit;
pub mod config;
pub use registry_credentials as credentials;
pub mod decision;
pub mod lookup;
pub mod metrics;
pub mod namespace;
pub mod newbase;
pub mod outcome;
pub mod patch;
pub mod policy;
pub mod rebase;
pub mod registry;
pub mod rewrite;
pub mod server;
pub mod sidecar;
pub use snapshot_tags as tag;
pub mod target;
pub mod telemetry;
pub mod tls;
pub mod userid;
