//! What a snapshot's manifest says about where it comes from: the base image
//! its user layers sit on, who it belongs to, where the user's layers start.
//! The sidecar writes these annotations on every snapshot; whatever reads a
//! snapshot (the next snapshot, an operator's tool) reads them here. Pure code.
//!
//! Snapshots pushed before these annotations existed have none: their layers
//! beyond the base image's are the user's ([`Provenance::legacy`]).

use std::collections::BTreeMap;

/// OCI: the image the user's layers sit on, as the pod named it.
pub const BASE_NAME: &str = "org.opencontainers.image.base.name";
/// OCI: that image's manifest digest.
pub const BASE_DIGEST: &str = "org.opencontainers.image.base.digest";
/// OCI: when the snapshot was made (RFC 3339).
pub const CREATED: &str = "org.opencontainers.image.created";
/// The tag the snapshot was pushed as (it makes each snapshot's manifest its own).
pub const TAG: &str = "io.abcdesktop.snapshot.tag";
/// The user the snapshot belongs to (the pod's user label, as mapped).
pub const USER: &str = "io.abcdesktop.snapshot.user";
/// Index in the manifest's `layers` of the first layer that is the user's
/// (the count of base layers before it).
pub const FIRST_USER_LAYER: &str = "io.abcdesktop.snapshot.first-user-layer";
/// What made the snapshot: a [`Trigger`] (absent on snapshots made before it).
pub const TRIGGER: &str = "io.abcdesktop.snapshot.trigger";

/// `created_by` of the config history entry of each user layer.
pub const HISTORY_CREATED_BY: &str = "desktop-snapshot";
/// Its `comment`.
pub const USER_LAYER_COMMENT: &str = "desktop-snapshot: the user's changes";

/// The values of [`TRIGGER`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Asked for (the user's click, through the broker's `POST /snapshot`).
    Click,
    /// The pod went away (preStop hook or SIGTERM).
    Logoff,
    /// The sidecar's schedule.
    Schedule,
    /// A rebase onto a new base image (the webhook or `snapshotctl rebase`).
    Rebase,
}

impl Trigger {
    pub const ALL: [Self; 4] = [Self::Click, Self::Logoff, Self::Schedule, Self::Rebase];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Click => "click",
            Self::Logoff => "logoff",
            Self::Schedule => "schedule",
            Self::Rebase => "rebase",
        }
    }

    /// The trigger a snapshot's annotations name, if one of ours.
    pub fn read(annotations: &BTreeMap<String, String>) -> Option<Self> {
        let value = annotations.get(TRIGGER)?.trim();
        Self::ALL.into_iter().find(|t| t.as_str() == value)
    }
}

/// Where a snapshot's user layers start, and on what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provenance {
    /// The base image as the pod named it (`abcdesktopio/oc.user:4.1`).
    pub base_name: String,
    /// The base image's manifest digest, when known.
    pub base_digest: Option<String>,
    /// How many of the image's layers are the base's.
    pub first_user_layer: usize,
}

impl Provenance {
    /// Read from a snapshot manifest's annotations; `None` when it carries no
    /// provenance (a snapshot made before it, or not a snapshot).
    pub fn read(annotations: &BTreeMap<String, String>) -> Option<Self> {
        let first_user_layer = annotations.get(FIRST_USER_LAYER)?.trim().parse().ok()?;
        let base_name = annotations.get(BASE_NAME)?.trim();
        if base_name.is_empty() {
            return None;
        }
        Some(Self {
            base_name: base_name.to_string(),
            base_digest: annotations
                .get(BASE_DIGEST)
                .map(|d| d.trim().to_string())
                .filter(|d| d.starts_with("sha256:")),
            first_user_layer,
        })
    }

    /// The provenance of an image made without annotations: its first
    /// `base_layers` layers are the base's when they are the base's own
    /// layers (digest for digest), else nothing can be said.
    pub fn legacy(
        base_name: &str,
        base_digest: Option<&str>,
        base_layers: &[&str],
        image_layers: &[&str],
    ) -> Option<Self> {
        (image_layers.len() >= base_layers.len()
            && image_layers[..base_layers.len()] == *base_layers)
            .then(|| Self {
                base_name: base_name.to_string(),
                base_digest: base_digest.map(str::to_string),
                first_user_layer: base_layers.len(),
            })
    }

    /// The annotations of a snapshot with this provenance.
    pub fn annotations(&self, user: &str, tag: &str, created: &str) -> BTreeMap<String, String> {
        let mut a = BTreeMap::from([
            (BASE_NAME.to_string(), self.base_name.clone()),
            (
                FIRST_USER_LAYER.to_string(),
                self.first_user_layer.to_string(),
            ),
        ]);
        if let Some(d) = &self.base_digest {
            a.insert(BASE_DIGEST.to_string(), d.clone());
        }
        a.extend(unsourced(user, tag, created));
        a
    }
}

/// The annotations every snapshot has, provenance known or not.
pub fn unsourced(user: &str, tag: &str, created: &str) -> BTreeMap<String, String> {
    let mut a = BTreeMap::from([
        (TAG.to_string(), tag.to_string()),
        (CREATED.to_string(), created.to_string()),
    ]);
    if !user.is_empty() {
        a.insert(USER.to_string(), user.to_string());
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn written_then_read_back() {
        let p = Provenance {
            base_name: "abcdesktopio/oc.user:4.1".into(),
            base_digest: Some("sha256:ab".into()),
            first_user_layer: 7,
        };
        let a = p.annotations("alice", "alice-1", "2026-11-28T00:00:00Z");
        assert_eq!(a[USER], "alice");
        assert_eq!(a[TAG], "alice-1");
        assert_eq!(a[CREATED], "2026-11-28T00:00:00Z");
        assert_eq!(a[FIRST_USER_LAYER], "7");
        assert_eq!(Provenance::read(&a), Some(p));
    }

    #[test]
    fn what_is_not_provenance() {
        for (why, pairs) in [
            ("legacy: none", vec![(TAG, "alice-1")]),
            ("no base", vec![(FIRST_USER_LAYER, "3")]),
            (
                "empty base",
                vec![(FIRST_USER_LAYER, "3"), (BASE_NAME, " ")],
            ),
            (
                "not a number",
                vec![(FIRST_USER_LAYER, "x"), (BASE_NAME, "b")],
            ),
        ] {
            assert_eq!(Provenance::read(&map(&pairs)), None, "{why}");
        }
        // a digest that is not one is left out, the rest kept
        let p = Provenance::read(&map(&[
            (FIRST_USER_LAYER, "3"),
            (BASE_NAME, "b:1"),
            (BASE_DIGEST, "latest"),
        ]))
        .unwrap();
        assert_eq!((p.first_user_layer, p.base_digest), (3, None));
    }

    #[test]
    fn a_legacy_snapshot_is_its_base_then_the_users_layers() {
        let p = Provenance::legacy(
            "b:1",
            Some("sha256:b"),
            &["l1", "l2"],
            &["l1", "l2", "u1", "u2"],
        )
        .unwrap();
        assert_eq!(p.first_user_layer, 2);
        // the base is not what the image sits on: nothing can be said
        assert_eq!(
            Provenance::legacy("b:2", None, &["l1", "l3"], &["l1", "l2", "u1"]),
            None
        );
        assert_eq!(
            Provenance::legacy("b:2", None, &["l1", "l2"], &["l1"]),
            None
        );
        // the base itself, unchanged: no user layer yet
        assert_eq!(
            Provenance::legacy("b:1", None, &["l1"], &["l1"]).map(|p| p.first_user_layer),
            Some(1)
        );
    }

    #[test]
    fn triggers_read_back() {
        for t in Trigger::ALL {
            assert_eq!(Trigger::read(&map(&[(TRIGGER, t.as_str())])), Some(t));
        }
        assert_eq!(Trigger::read(&map(&[(TRIGGER, "cron")])), None);
        assert_eq!(Trigger::read(&map(&[])), None);
    }

    #[test]
    fn no_user_no_user_annotation() {
        assert!(!unsourced("", "t-1", "c").contains_key(USER));
    }
}
