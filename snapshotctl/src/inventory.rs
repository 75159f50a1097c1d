//! What the registry's names and manifests say about snapshots: whose a tag
//! is, when it was taken, on what base, how big the user's layers are; and
//! how it is shown. Pure code: the registry is read elsewhere.
//!
//! Ownership is decided by the names alone, with the webhook's mapping
//! ([`snapshot_webhook::userid`]) as the authority: a shared-layout tag
//! `<prefix>-<digits>` is the user whose [`userid::tag_prefix`] is that prefix;
//! a per-user repository `<component>/<image path>` is the user whose
//! [`userid::repository_component`] is that component. A name no user id maps
//! to is nobody's snapshot and is never touched.

use serde::Serialize;
use serde_json::Value;
use snapshot_tags::{
    self as tag,
    provenance::{self, Provenance},
    retention,
};
use snapshot_webhook::{policy::Layout, userid};
use std::{collections::BTreeMap, fmt::Write as _};

/// Whose snapshot a tag is, and the prefix retention works on.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Owner {
    /// The user id (as the pod's user label has it).
    pub user: String,
    /// The tag's part before `-<timestamp>`: the mapped user id (shared) or
    /// the base tag (per-user).
    pub prefix: String,
}

/// The owner of `tag` in repository `path`, `None` when it is no user's snapshot.
pub fn owner(layout: Layout, path: &str, tag: &str) -> Option<Owner> {
    let (prefix, _) = tag::split(tag)?;
    let user = match layout {
        Layout::Shared => userid::user_of_tag_prefix(prefix)?,
        Layout::PerUser => user_of_component(path.split_once('/')?.0)?,
    };
    Some(Owner {
        user,
        prefix: prefix.to_string(),
    })
}

/// The user id whose per-user repository component is `component`, if any:
/// the candidate read back (`u__<hex>` or the component itself) must map to
/// `component` again.
pub fn user_of_component(component: &str) -> Option<String> {
    let candidate = match component.strip_prefix("u__") {
        Some(hex) => String::from_utf8(hex::decode(hex).ok()?).ok()?,
        None => component.to_string(),
    };
    (userid::repository_component(&candidate).ok()? == component).then_some(candidate)
}

/// One snapshot as `list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    pub user: String,
    /// Repository path inside the registry.
    pub repository: String,
    pub tag: String,
    pub digest: String,
    /// RFC 3339: the manifest's `created` annotation, else the tag's timestamp.
    pub created: Option<String>,
    /// RFC 3339 (UTC, to the second): the tag's timestamp.
    pub taken: Option<String>,
    /// What made the snapshot (`click`, `logoff`, `schedule`, `rebase`), when it says.
    pub trigger: Option<String>,
    /// The base image as the desktop pod named it (provenance annotation).
    pub base: Option<String>,
    /// Bytes of the user's layers (compressed, as stored); unknown without provenance.
    pub user_bytes: Option<u64>,
    /// Layers in the image, base ones included.
    pub layers: usize,
    /// Bytes (compressed) of the layers the snapshot before it in the same
    /// series does not have; with none before it, its user's layers. Set by
    /// [`crate::timeline::added`].
    pub added_bytes: Option<u64>,
}

/// A snapshot's manifest annotations as a map (strings only).
pub fn annotations(manifest: &Value) -> BTreeMap<String, String> {
    manifest["annotations"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
        .collect()
}

/// The layers of a manifest: (digest, size, media type).
pub fn layers(manifest: &Value) -> Vec<(String, u64, String)> {
    manifest["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| {
            (
                l["digest"].as_str().unwrap_or_default().to_string(),
                l["size"].as_u64().unwrap_or(0),
                l["mediaType"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// `tag` of `repository` described from its manifest.
pub fn describe(
    owner: &Owner,
    repository: &str,
    tag: &str,
    digest: &str,
    manifest: &Value,
) -> Snapshot {
    let notes = annotations(manifest);
    let provenance = Provenance::read(&notes);
    let layers = layers(manifest);
    let user_bytes = provenance
        .as_ref()
        .filter(|p| p.first_user_layer <= layers.len())
        .map(|p| layers[p.first_user_layer..].iter().map(|l| l.1).sum());
    let created = notes
        .get(provenance::CREATED)
        .filter(|c| !c.trim().is_empty())
        .cloned()
        .or_else(|| taken_at(tag));
    Snapshot {
        taken: taken_at(tag),
        trigger: notes
            .get(provenance::TRIGGER)
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty()),
        added_bytes: None,
        user: owner.user.clone(),
        repository: repository.to_string(),
        tag: tag.to_string(),
        digest: digest.to_string(),
        created,
        base: provenance
            .map(|p| p.base_name)
            .or_else(|| notes.get(provenance::BASE_NAME).cloned()),
        user_bytes,
        layers: layers.len(),
    }
}

/// When the tag says it was taken, RFC 3339 to the second.
pub fn taken_at(tag: &str) -> Option<String> {
    let (prefix, _) = tag::split(tag)?;
    let snapshot = tag::owned_by(tag, prefix)?;
    retention::taken_at(&snapshot).map(|t| humantime::format_rfc3339_seconds(t).to_string())
}

/// By user, repository, then newest first.
pub fn sort(snapshots: &mut [Snapshot]) {
    snapshots.sort_by(|a, b| {
        a.user
            .cmp(&b.user)
            .then_with(|| a.repository.cmp(&b.repository))
            .then_with(|| newer(b, a))
    });
}

fn newer(a: &Snapshot, b: &Snapshot) -> std::cmp::Ordering {
    let as_snapshot =
        |s: &Snapshot| tag::split(&s.tag).and_then(|(prefix, _)| tag::owned_by(&s.tag, prefix));
    match (as_snapshot(a), as_snapshot(b)) {
        (Some(x), Some(y)) => tag::compare(&x, &y),
        _ => a.tag.cmp(&b.tag),
    }
}

/// `1.5 MiB`, `812 B`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Left-aligned columns separated by two spaces, a header first.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ", width = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The `list` table.
pub fn snapshot_table(snapshots: &[Snapshot]) -> String {
    let rows: Vec<Vec<String>> = snapshots
        .iter()
        .map(|s| {
            vec![
                s.user.clone(),
                s.repository.clone(),
                s.tag.clone(),
                s.created.clone().unwrap_or_else(|| "-".into()),
                s.base.clone().unwrap_or_else(|| "-".into()),
                s.user_bytes.map(human_bytes).unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(
        &[
            "USER",
            "REPOSITORY",
            "TAG",
            "CREATED",
            "BASE",
            "USER LAYERS",
        ],
        &rows,
    )
}

/// One snapshot in detail, as `show` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Detail {
    #[serde(flatten)]
    pub snapshot: Snapshot,
    pub base_digest: Option<String>,
    pub first_user_layer: Option<usize>,
    pub layer_list: Vec<Layer>,
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Layer {
    pub digest: String,
    pub size: u64,
    pub media_type: String,
    /// Whether the layer is the user's (false: the base image's; none: unknown).
    pub user: Option<bool>,
}

/// `describe` plus the layers and annotations.
pub fn detail(
    owner: &Owner,
    repository: &str,
    tag: &str,
    digest: &str,
    manifest: &Value,
) -> Detail {
    let snapshot = describe(owner, repository, tag, digest, manifest);
    let notes = annotations(manifest);
    let provenance = Provenance::read(&notes);
    let first = provenance.as_ref().map(|p| p.first_user_layer);
    Detail {
        snapshot,
        base_digest: provenance.and_then(|p| p.base_digest),
        first_user_layer: first,
        layer_list: layers(manifest)
            .into_iter()
            .enumerate()
            .map(|(i, (digest, size, media_type))| Layer {
                digest,
                size,
                media_type,
                user: first.map(|f| i >= f),
            })
            .collect(),
        annotations: notes,
    }
}

/// `show`'s text.
pub fn detail_text(d: &Detail, registry: &str) -> String {
    let s = &d.snapshot;
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let mut out = String::new();
    let _ = writeln!(out, "image:        {registry}/{}:{}", s.repository, s.tag);
    let _ = writeln!(out, "digest:       {}", s.digest);
    let _ = writeln!(out, "user:         {}", s.user);
    let _ = writeln!(out, "created:      {}", or_dash(s.created.clone()));
    let _ = writeln!(out, "base:         {}", or_dash(s.base.clone()));
    let _ = writeln!(out, "base digest:  {}", or_dash(d.base_digest.clone()));
    let _ = writeln!(
        out,
        "user layers:  {}",
        match (s.user_bytes, d.first_user_layer) {
            (Some(b), Some(f)) => format!(
                "{} ({} of {} layers)",
                human_bytes(b),
                s.layers - f,
                s.layers
            ),
            _ => "unknown (no provenance annotations)".into(),
        }
    );
    let rows: Vec<Vec<String>> = d
        .layer_list
        .iter()
        .map(|l| {
            vec![
                match l.user {
                    Some(true) => "user".into(),
                    Some(false) => "base".into(),
                    None => "?".into(),
                },
                l.digest.clone(),
                human_bytes(l.size),
                l.media_type.clone(),
            ]
        })
        .collect();
    out.push('\n');
    out.push_str(&table(&["LAYER", "DIGEST", "SIZE", "MEDIA TYPE"], &rows));
    if !d.annotations.is_empty() {
        out.push_str("\nannotations:\n");
        for (k, v) in &d.annotations {
            let _ = writeln!(out, "  {k}: {v}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// layout, repository, tag, wanted (user, prefix)
    type OwnerCase<'a> = (Layout, &'a str, &'a str, Option<(&'a str, &'a str)>);

    /// A shared-layout tag (the repository plays no part there).
    fn shared<'a>(tag: &'a str, want: Option<(&'a str, &'a str)>) -> OwnerCase<'a> {
        (Layout::Shared, "org/img", tag, want)
    }

    fn per_user<'a>(
        path: &'a str,
        tag: &'a str,
        want: Option<(&'a str, &'a str)>,
    ) -> OwnerCase<'a> {
        (Layout::PerUser, path, tag, want)
    }

    #[test]
    fn owner_table() {
        let table = [
            shared("alice-1700000000000000000", Some(("alice", "alice"))),
            shared(
                "jdoe_40example.com-5",
                Some(("jdoe@example.com", "jdoe_40example.com")),
            ),
            shared("alice-1-500", Some(("alice-1", "alice-1"))),
            shared("latest", None),
            shared("alice-", None),
            // an escape no user id produces: nobody's
            shared("a_4G-5", None),
            shared("A_5F-5", None),
            per_user("alice/org/img", "4.1-100", Some(("alice", "4.1"))),
            per_user("u__416c696365/org/img", "4.1-100", Some(("Alice", "4.1"))),
            per_user("alice/org/img", "4.1", None),
            per_user("img", "4.1-100", None),
            // not what repository_component makes
            per_user("u__zz/org/img", "4.1-100", None),
            per_user("u__616c696365/org/img", "4.1-100", None),
        ];
        for (layout, path, tag, want) in table {
            let got = owner(layout, path, tag);
            assert_eq!(
                got.as_ref().map(|o| (o.user.as_str(), o.prefix.as_str())),
                want,
                "{path}:{tag}"
            );
        }
    }

    #[test]
    fn component_round_trips() {
        for id in ["alice", "Alice", "a_b", "jdoe@example.com", "é", "12896316"] {
            let c = userid::repository_component(id).unwrap();
            assert_eq!(user_of_component(&c).as_deref(), Some(id), "{c}");
        }
    }

    fn manifest(annotations: Value, sizes: &[u64]) -> Value {
        json!({
            "schemaVersion": 2,
            "layers": sizes.iter().enumerate().map(|(i, s)| json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": format!("sha256:{i}"), "size": s})).collect::<Vec<_>>(),
            "annotations": annotations,
        })
    }

    /// `tag` of alice's `org/img` described from `manifest`.
    fn describe_alice(tag: &str, manifest: &Value) -> Snapshot {
        let alice = Owner {
            user: "alice".into(),
            prefix: "alice".into(),
        };
        describe(&alice, "org/img", tag, "sha256:d", manifest)
    }

    /// A snapshot known by its names alone.
    fn snapshot(user: &str, repository: &str, tag: &str) -> Snapshot {
        Snapshot {
            user: user.into(),
            repository: repository.into(),
            tag: tag.into(),
            digest: String::new(),
            created: None,
            taken: None,
            trigger: None,
            added_bytes: None,
            base: None,
            user_bytes: None,
            layers: 0,
        }
    }

    #[test]
    fn describe_table() {
        let with = manifest(
            json!({
                provenance::BASE_NAME: "org/img:4.1",
                provenance::FIRST_USER_LAYER: "2",
                provenance::CREATED: "2026-01-02T03:04:05Z",
                provenance::TAG: "alice-1",
            }),
            &[100, 200, 3000, 4000],
        );
        let s = describe_alice("alice-1", &with);
        assert_eq!(s.user_bytes, Some(7000));
        assert_eq!(s.base.as_deref(), Some("org/img:4.1"));
        assert_eq!(s.created.as_deref(), Some("2026-01-02T03:04:05Z"));
        assert_eq!(s.layers, 4);

        // legacy: no provenance, the age from the tag
        let legacy = manifest(json!(null), &[100]);
        let s = describe_alice("alice-1700000000000000000", &legacy);
        assert_eq!((s.user_bytes, s.base), (None, None));
        assert_eq!(s.created.as_deref(), Some("2023-11-14T22:13:20Z"));
        // an age the tag cannot tell
        let s = describe_alice("alice-17", &legacy);
        assert_eq!(s.created, None);
        // a first user layer beyond the layers: unknown size, never a panic
        let wrong = manifest(
            json!({provenance::BASE_NAME: "b", provenance::FIRST_USER_LAYER: "9"}),
            &[1],
        );
        assert_eq!(describe_alice("alice-1", &wrong).user_bytes, None);
    }

    #[test]
    fn newest_first_per_user_and_repository() {
        let mut all = vec![
            snapshot("bob", "r", "bob-5"),
            snapshot("alice", "r", "alice-999"),
            snapshot("alice", "r", "alice-1000"),
            snapshot("alice", "a", "alice-1"),
        ];
        sort(&mut all);
        let tags: Vec<&str> = all.iter().map(|s| s.tag.as_str()).collect();
        assert_eq!(tags, ["alice-1", "alice-1000", "alice-999", "bob-5"]);
    }

    #[test]
    fn bytes_table() {
        for (n, want) in [
            (0, "0 B"),
            (1023, "1023 B"),
            (1024, "1.0 KiB"),
            (1536, "1.5 KiB"),
            (5 << 20, "5.0 MiB"),
            (3 << 30, "3.0 GiB"),
        ] {
            assert_eq!(human_bytes(n), want);
        }
    }

    #[test]
    fn table_aligns() {
        let t = table(
            &["A", "BB"],
            &[
                vec!["xxx".into(), "1".into()],
                vec!["y".into(), "22222".into()],
            ],
        );
        assert_eq!(t, "A    BB\nxxx  1\ny    22222\n");
        assert_eq!(table(&["A", "B"], &[]), "A  B\n");
    }

    #[test]
    fn snapshot_table_shows_dashes_for_the_unknown() {
        let snap = Snapshot {
            digest: "sha256:x".into(),
            user_bytes: Some(2048),
            layers: 2,
            ..snapshot("alice", "org/img", "alice-1")
        };
        let t = snapshot_table(&[snap]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("USER   REPOSITORY  TAG"), "{t}");
        assert!(lines[1].ends_with("-        -     2.0 KiB"), "{t}");
    }
}
