//! The operator's choices that the pure modules act on, below the
//! configuration that parses them and the modules that apply them: where
//! snapshots live ([`Layout`]) and what a login on a new base image does
//! ([`OnNewBase`]).

use clap::ValueEnum;

/// `--layout`: where snapshots live.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `<registry>/<image path>:<user>-<timestamp>`.
    Shared,
    /// `<registry>/<user>/<image path>:<base tag>-<timestamp>`.
    PerUser,
}

/// `--on-new-base`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnNewBase {
    /// Restore the snapshot on its old base.
    Keep,
    /// Write the user's layers on the new base as a new snapshot, restore it.
    Rebase,
    /// Start from the new base; the snapshots stay for a pin.
    Fresh,
}
