//! Where a user's snapshots of one desktop image live: the repository and the
//! tag prefix, derived from the graphical container's image. Pure code.

use crate::{policy::Layout, tag, userid};
use oci_client::Reference;
use std::fmt;

/// The repository and tag prefix of one user's snapshots of one image.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// `host[:port]` of the snapshot registry.
    pub registry: String,
    /// Repository path inside the registry (no host).
    pub path: String,
    /// Snapshot tags are `<tag_prefix>-<timestamp>`.
    pub tag_prefix: String,
}

impl Target {
    /// `<registry>/<path>`: what the sidecar pushes to.
    pub fn repository(&self) -> String {
        format!("{}/{}", self.registry, self.path)
    }

    /// The full image reference of one of this target's tags.
    pub fn image(&self, tag: &str) -> String {
        format!("{}/{}:{}", self.registry, self.path, tag)
    }

    /// Whether `tag` is a snapshot of this target.
    pub fn owns(&self, tag: &str) -> bool {
        tag::owned_by(tag, &self.tag_prefix).is_some()
    }

    pub fn reference(&self, tag: &str) -> Reference {
        Reference::with_tag(self.registry.clone(), self.path.clone(), tag.to_string())
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}:{}-*", self.registry, self.path, self.tag_prefix)
    }
}

/// Why no target can be derived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoTarget {
    BadImage(String),
    User(userid::Unmappable),
    /// Per-user layout with an image named by digest only: there is no base tag.
    NoBaseTag,
}

impl fmt::Display for NoTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoTarget::BadImage(e) => write!(f, "the graphical image is not a valid reference: {e}"),
            NoTarget::User(e) => write!(f, "the user id cannot be a registry name: {e}"),
            NoTarget::NoBaseTag => write!(
                f,
                "the graphical image has a digest but no tag to build snapshot tags on"
            ),
        }
    }
}

/// Builds the image-reference parser (a large regex, compiled on first use) ahead of
/// the first admission, which would otherwise pay for it out of its deadline.
pub fn warm_up() {
    let _ = "warm/up:0".parse::<Reference>();
}

/// Derives the target for `user_id` from the graphical container's `image`.
pub fn derive(
    image: &str,
    registry: &str,
    layout: Layout,
    user_id: &str,
) -> Result<Target, NoTarget> {
    let reference: Reference = image
        .parse()
        .map_err(|e| NoTarget::BadImage(format!("{e}")))?;
    let ours = reference.registry() == registry;
    let mut path = reference.repository().to_string();
    match layout {
        Layout::Shared => {
            let tag_prefix = userid::tag_prefix(user_id).map_err(NoTarget::User)?;
            Ok(Target {
                registry: registry.to_string(),
                path,
                tag_prefix,
            })
        }
        Layout::PerUser => {
            let component = userid::repository_component(user_id).map_err(NoTarget::User)?;
            let mut base_tag = match (reference.tag(), reference.digest()) {
                (Some(t), _) => t.to_string(),
                (None, Some(_)) => return Err(NoTarget::NoBaseTag),
                (None, None) => "latest".to_string(),
            };
            // The image may already be one of this user's snapshots.
            if ours {
                if let Some(rest) = path.strip_prefix(&format!("{component}/")) {
                    path = rest.to_string();
                    if let Some((base, _)) = tag::split(&base_tag) {
                        base_tag = base.to_string();
                    }
                }
            }
            Ok(Target {
                registry: registry.to_string(),
                path: format!("{component}/{path}"),
                tag_prefix: base_tag,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REG: &str = "registry.example.net";

    /// image, layout, user id, wanted (path, tag prefix) or Err for no target.
    type Case<'a> = (&'a str, Layout, &'a str, Result<(&'a str, &'a str), ()>);

    #[test]
    fn derive_table() {
        let table: &[Case] = &[
            ("abcdesktopio/oc.user.ubuntu.sudo.24.04:4.1", Layout::Shared, "12896316",
             Ok(("abcdesktopio/oc.user.ubuntu.sudo.24.04", "12896316"))),
            ("docker.io/abcdesktopio/oc.user.ubuntu.sudo.24.04:4.1", Layout::Shared, "jdoe@example.com",
             Ok(("abcdesktopio/oc.user.ubuntu.sudo.24.04", "jdoe_40example.com"))),
            ("ubuntu", Layout::Shared, "alice", Ok(("library/ubuntu", "alice"))),
            ("registry.example.net/abcdesktopio/oc.user:alice-123", Layout::Shared, "alice",
             Ok(("abcdesktopio/oc.user", "alice"))),
            ("quay.io:443/org/img@sha256:0123456789012345678901234567890123456789012345678901234567890123", Layout::Shared, "bob",
             Ok(("org/img", "bob"))),
            ("abcdesktopio/oc.user.ubuntu:4.1", Layout::PerUser, "alice",
             Ok(("alice/abcdesktopio/oc.user.ubuntu", "4.1"))),
            ("abcdesktopio/oc.user.ubuntu", Layout::PerUser, "Alice",
             Ok(("u__416c696365/abcdesktopio/oc.user.ubuntu", "latest"))),
            ("registry.example.net/alice/abcdesktopio/oc.user.ubuntu:4.1-1700", Layout::PerUser, "alice",
             Ok(("alice/abcdesktopio/oc.user.ubuntu", "4.1"))),
            ("org/img@sha256:0123456789012345678901234567890123456789012345678901234567890123", Layout::PerUser, "bob", Err(())),
            ("Not A Valid Image", Layout::Shared, "bob", Err(())),
            ("abcdesktopio/oc.user:4.1", Layout::Shared, "", Err(())),
        ];
        for (image, layout, user, want) in table {
            let got = derive(image, REG, *layout, user);
            match (got, want) {
                (Ok(t), Ok((path, prefix))) => {
                    assert_eq!(
                        (t.path.as_str(), t.tag_prefix.as_str()),
                        (*path, *prefix),
                        "{image}"
                    );
                    assert_eq!(t.registry, REG);
                }
                (Err(_), Err(())) => {}
                (got, want) => panic!("{image} / {user}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn image_and_ownership() {
        let t = derive("abcdesktopio/oc.user:4.1", REG, Layout::Shared, "alice").unwrap();
        assert_eq!(
            t.image("alice-5"),
            "registry.example.net/abcdesktopio/oc.user:alice-5"
        );
        assert_eq!(t.repository(), "registry.example.net/abcdesktopio/oc.user");
        assert!(t.owns("alice-5"));
        assert!(!t.owns("alice-1-5"));
        assert!(!t.owns("bob-5"));
    }
}
