//! A login whose pod asks for another base image than the one its user's
//! newest snapshot sits on (the operator upgraded the desktops): what the
//! operator chose to do (`--on-new-base`, [`crate::policy::OnNewBase`]), and
//! what was done. Pure code.

use crate::{tag::provenance::Provenance, target::Target};
use oci_client::Reference;

/// What a login did about a new base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaseChange {
    /// The snapshot was restored on its base `from` (`keep`).
    Kept { from: String },
    /// `snapshot` (on `from`) was rebased; the restored tag is the new one.
    Rebased { from: String, snapshot: String },
    /// A fresh desktop on the new base; `snapshot` (on `from`) stays for a pin.
    Fresh { from: String, snapshot: String },
    /// A rebase was wanted and not made (`why`): restored on `from`.
    NotRebased { from: String, why: String },
}

impl BaseChange {
    /// Metric label and log word.
    pub fn as_str(&self) -> &'static str {
        match self {
            BaseChange::Kept { .. } => "kept",
            BaseChange::Rebased { .. } => "rebased",
            BaseChange::Fresh { .. } => "fresh",
            BaseChange::NotRebased { .. } => "not_rebased",
        }
    }
}

/// Whether two image references name the same image (`docker.io/library/x`
/// and `x:latest` do).
pub fn same_image(a: &str, b: &str) -> bool {
    match (a.parse::<Reference>(), b.parse::<Reference>()) {
        (Ok(a), Ok(b)) => a.whole() == b.whole(),
        _ => a == b,
    }
}

/// The base the newest snapshot `tag` of `target` sits on, when it is not
/// `pod_image`: from its provenance; for a snapshot without one, in the
/// per-user layout, the pod's image under the snapshot's base tag (its tag
/// prefix). `None`: the same base, or nothing says otherwise.
pub fn moved_from(
    pod_image: &str,
    target: &Target,
    tag: &str,
    provenance: Option<&Provenance>,
    per_user: bool,
) -> Option<String> {
    if let Some(p) = provenance {
        return (!same_image(&p.base_name, pod_image)).then(|| p.base_name.clone());
    }
    let (prefix, _) = crate::tag::split(tag)?;
    if !per_user || prefix == target.tag_prefix {
        return None;
    }
    let image = pod_image.parse::<Reference>().ok()?;
    Some(format!(
        "{}/{}:{prefix}",
        image.registry(),
        image.repository()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tag::provenance::Provenance;

    fn target(prefix: &str) -> Target {
        Target {
            registry: "r.example".into(),
            path: "alice/oc.user".into(),
            tag_prefix: prefix.into(),
        }
    }

    fn on(base: &str) -> Provenance {
        Provenance {
            base_name: base.into(),
            base_digest: None,
            first_user_layer: 1,
        }
    }

    #[test]
    fn what_the_snapshot_sits_on() {
        let pod = "r.example/oc.user:4.2";
        let table: &[(&str, Option<Provenance>, bool, Option<&str>)] = &[
            ("4.2-1", Some(on("r.example/oc.user:4.2")), true, None),
            (
                "4.2-1",
                Some(on("r.example/oc.user:4.1")),
                true,
                Some("r.example/oc.user:4.1"),
            ),
            (
                "alice-1",
                Some(on("r.example/oc.user:4.1")),
                false,
                Some("r.example/oc.user:4.1"),
            ),
            // no provenance: the per-user tag prefix is the base tag
            ("4.1-1", None, true, Some("r.example/oc.user:4.1")),
            ("4.2-1", None, true, None),
            // no provenance, shared layout: nothing says the base changed
            ("alice-1", None, false, None),
            // the same image spelled differently
            ("4.2-1", Some(on("r.example/oc.user:4.2")), false, None),
        ];
        for (tag, provenance, per_user, want) in table {
            assert_eq!(
                moved_from(pod, &target("4.2"), tag, provenance.as_ref(), *per_user).as_deref(),
                *want,
                "{tag} {provenance:?}"
            );
        }
        assert!(same_image("ubuntu", "docker.io/library/ubuntu:latest"));
        assert!(!same_image("ubuntu:22.04", "ubuntu:24.04"));
    }
}
