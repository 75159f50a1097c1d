//! The registry: [`push`] the snapshot (its base layers, new layer, config,
//! manifest and tag) with the [`credentials`] of the mounted secret, and
//! [`prune`] the user's old snapshots after it.

use clap::ValueEnum;

pub mod credentials;
pub mod prune;
pub mod push;

/// How the registry is reached (`--registry-protocol`).
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Https,
    Http,
}
