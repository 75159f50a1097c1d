//! What became of an admission: the metric label and log word, below the
//! decision, the lookup and the metrics that all name it.

/// Metric label and log word of an admission's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Restored,
    Pinned,
    /// Restored after moving the snapshot onto the pod's new base image.
    Rebased,
    /// A fresh desktop because the pod's base image is new (`--on-new-base fresh`).
    FreshBase,
    NoSnapshot,
    RegistryError,
    /// Not restored: the pod's namespace lacks the registry secret the kubelet pulls with.
    NoPullSecret,
    OptedOut,
    AlreadyDone,
    Unmappable,
    Ignored,
    Denied,
    Invalid,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Restored => "restored",
            Outcome::Pinned => "pinned",
            Outcome::Rebased => "rebased",
            Outcome::FreshBase => "fresh_base",
            Outcome::NoSnapshot => "no_snapshot",
            Outcome::RegistryError => "registry_error",
            Outcome::NoPullSecret => "no_pull_secret",
            Outcome::OptedOut => "opted_out",
            Outcome::AlreadyDone => "already_done",
            Outcome::Unmappable => "unmappable_user",
            Outcome::Ignored => "ignored",
            Outcome::Denied => "denied",
            Outcome::Invalid => "invalid",
        }
    }
}
