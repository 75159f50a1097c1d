//! A user's snapshots in time, as `list --user` and `pin` show them: what each
//! snapshot added over the one before it in its series (one repository, one
//! tag prefix): the layers the registry stored for it; which snapshot was the
//! current one at a given moment; the pod annotation that restores it. Pure
//! code: the registry is read elsewhere.

use crate::inventory::{self, human_bytes, Snapshot};
use serde::Serialize;
use serde_json::Value;
use snapshot_tags::{self as tag, retention};
use std::{
    collections::{BTreeMap, HashSet},
    fmt::Write as _,
    time::SystemTime,
};

/// A snapshot read from the registry, with the prefix of its series and its manifest.
pub struct Read {
    pub snapshot: Snapshot,
    pub prefix: String,
    pub manifest: Value,
}

/// Bytes (compressed, as stored) of `manifest`'s layers that `previous` does not have.
pub fn added(previous: &Value, manifest: &Value) -> u64 {
    let before: HashSet<String> = inventory::layers(previous)
        .into_iter()
        .map(|(digest, _, _)| digest)
        .collect();
    inventory::layers(manifest)
        .into_iter()
        .filter(|(digest, _, _)| !before.contains(digest))
        .map(|(_, size, _)| size)
        .sum()
}

/// The snapshots with `added_bytes` set: per series, oldest first, what each
/// has that the one before it has not; the oldest, its user's layers (unknown
/// without provenance). In the order given.
pub fn with_added(read: Vec<Read>) -> Vec<Snapshot> {
    let mut series: BTreeMap<(&str, &str, &str), Vec<usize>> = BTreeMap::new();
    for (i, r) in read.iter().enumerate() {
        series
            .entry((&r.snapshot.user, &r.snapshot.repository, &r.prefix))
            .or_default()
            .push(i);
    }
    let mut added_bytes = vec![None; read.len()];
    for ((_, _, prefix), mut members) in series {
        let as_tag = |i: &usize| tag::owned_by(&read[*i].snapshot.tag, prefix);
        members.sort_by(|a, b| match (as_tag(a), as_tag(b)) {
            (Some(x), Some(y)) => tag::compare(&x, &y),
            _ => read[*a].snapshot.tag.cmp(&read[*b].snapshot.tag),
        });
        let mut previous: Option<usize> = None;
        for i in members {
            added_bytes[i] = match previous {
                Some(p) => Some(added(&read[p].manifest, &read[i].manifest)),
                None => read[i].snapshot.user_bytes,
            };
            previous = Some(i);
        }
    }
    read.into_iter()
        .zip(added_bytes)
        .map(|(r, added_bytes)| Snapshot {
            added_bytes,
            ..r.snapshot
        })
        .collect()
}

/// The newest of `prefix`'s snapshots among `tags` taken at or before
/// `moment` (a tag whose time cannot be told is never chosen).
pub fn at_or_before<'a>(
    tags: impl IntoIterator<Item = &'a str>,
    prefix: &str,
    moment: SystemTime,
) -> Option<String> {
    tags.into_iter()
        .filter_map(|t| tag::owned_by(t, prefix))
        .filter_map(|s| Some((retention::taken_at(&s)?, s)))
        .filter(|(at, _)| *at <= moment)
        .max_by(|(a, x), (b, y)| a.cmp(b).then_with(|| tag::compare(x, y)))
        .map(|(_, s)| s.tag)
}

/// `list --user`'s table: per repository, newest first.
pub fn table(snapshots: &[Snapshot]) -> String {
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let rows: Vec<Vec<String>> = snapshots
        .iter()
        .map(|s| {
            vec![
                s.repository.clone(),
                dash(&s.taken),
                dash(&s.trigger),
                s.added_bytes.map(human_bytes).unwrap_or_else(|| "-".into()),
                s.tag.clone(),
            ]
        })
        .collect();
    inventory::table(&["REPOSITORY", "WHEN", "TRIGGER", "ADDED", "TAG"], &rows)
}

/// A snapshot chosen to be restored, and the annotation that does it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pin {
    pub user: String,
    pub repository: String,
    pub tag: String,
    pub taken: Option<String>,
    pub trigger: Option<String>,
    /// The desktop image whose pods it restores into (the base the snapshot
    /// names, else its repository).
    pub image: String,
    /// The pod annotation, name to value.
    pub annotation: BTreeMap<String, String>,
}

impl Pin {
    pub fn of(snapshot: &Snapshot, annotation: &str) -> Self {
        Self {
            user: snapshot.user.clone(),
            repository: snapshot.repository.clone(),
            tag: snapshot.tag.clone(),
            taken: snapshot.taken.clone(),
            trigger: snapshot.trigger.clone(),
            image: snapshot
                .base
                .clone()
                .unwrap_or_else(|| snapshot.repository.clone()),
            annotation: BTreeMap::from([(annotation.to_string(), snapshot.tag.clone())]),
        }
    }
}

/// `pin`'s text: each snapshot, its annotation as YAML, then how to apply it.
pub fn pin_text(pins: &[Pin], registry: &str) -> String {
    let mut out = String::new();
    for p in pins {
        let _ = writeln!(
            out,
            "# {}'s desktop as of {} (trigger {}): {registry}/{}:{}, for pods of {}",
            p.user,
            p.taken.as_deref().unwrap_or("an unknown time"),
            p.trigger.as_deref().unwrap_or("-"),
            p.repository,
            p.tag,
            p.image
        );
        for (k, v) in &p.annotation {
            let _ = writeln!(out, "{k}: \"{v}\"");
        }
    }
    out.push_str(
        "\nPut the annotation on the user's next desktop pod: the broker sets it in the \
         pod's metadata.annotations when it creates the pod; for a pod made with kubectl, \
         add it under metadata.annotations in its manifest. The webhook restores that tag \
         instead of the newest, and refuses the pod with the reason when the tag is not \
         one of the user's snapshots in the repository of the pod's image. The pin holds \
         for that pod only; the snapshots the restored desktop takes are the newest, so \
         the next login goes on from there.\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::{Duration, UNIX_EPOCH};

    fn manifest(layers: &[(&str, u64)]) -> Value {
        json!({"layers": layers.iter().map(|(d, s)| json!({"digest": d, "size": s})).collect::<Vec<_>>()})
    }

    fn read(user: &str, repo: &str, tag: &str, layers: &[(&str, u64)], mine: u64) -> Read {
        Read {
            snapshot: Snapshot {
                user: user.into(),
                repository: repo.into(),
                tag: tag.into(),
                digest: String::new(),
                created: None,
                taken: None,
                trigger: None,
                base: None,
                user_bytes: Some(mine),
                layers: layers.len(),
                added_bytes: None,
            },
            prefix: tag::split(tag)
                .map(|(p, _)| p.to_string())
                .unwrap_or_default(),
            manifest: manifest(layers),
        }
    }

    #[test]
    fn added_is_what_the_one_before_has_not_per_series() {
        let base = ("sha256:base", 1000);
        let got = with_added(vec![
            // listed in any order
            read(
                "alice",
                "r",
                "alice-3",
                &[base, ("a1", 10), ("a2", 20), ("a3", 30)],
                60,
            ),
            read("alice", "r", "alice-1", &[base, ("a1", 10)], 10),
            read("alice", "r", "alice-2", &[base, ("a1", 10), ("a2", 20)], 30),
            // a merge: one new layer replacing the user's
            read("alice", "r", "alice-4", &[base, ("m", 55)], 55),
            // another series of the same user: its own history
            read("alice", "other", "alice-2", &[base, ("b1", 7)], 7),
            read("bob", "r", "bob-9", &[base, ("a1", 10)], 10),
        ]);
        let each: Vec<(&str, &str, Option<u64>)> = got
            .iter()
            .map(|s| (s.repository.as_str(), s.tag.as_str(), s.added_bytes))
            .collect();
        assert_eq!(
            each,
            [
                ("r", "alice-3", Some(30)),
                ("r", "alice-1", Some(10)),
                ("r", "alice-2", Some(20)),
                ("r", "alice-4", Some(55)),
                ("other", "alice-2", Some(7)),
                ("r", "bob-9", Some(10)),
            ]
        );
        // an unchanged re-tag adds nothing; no previous and no provenance: unknown
        assert_eq!(added(&manifest(&[base]), &manifest(&[base])), 0);
        let mut legacy = read("carol", "r", "carol-1", &[base], 0);
        legacy.snapshot.user_bytes = None;
        assert_eq!(with_added(vec![legacy])[0].added_bytes, None);
    }

    #[test]
    fn at_or_before_table() {
        const T0: u64 = 1_700_000_000;
        let t = |secs: u64| format!("u-{}", (T0 + secs) * 1_000_000_000);
        let tags = [
            t(1_000),
            t(2_000),
            t(3_000),
            "u-17".into(),
            t(1_500).replace("u-", "v-"),
        ];
        let at = |secs: u64| UNIX_EPOCH + Duration::from_secs(T0 + secs);
        let pick = |secs| at_or_before(tags.iter().map(String::as_str), "u", at(secs));
        assert_eq!(pick(500), None, "before the first");
        assert_eq!(pick(1_000), Some(t(1_000)), "at");
        assert_eq!(pick(2_999), Some(t(2_000)), "just before");
        assert_eq!(pick(9_999), Some(t(3_000)), "after the last: the newest");
        // a timestamp of another width (seconds) still compares by time
        let seconds = format!("u-{}", T0 + 2_500);
        let mixed = [seconds.clone(), t(2_000), t(3_000)];
        assert_eq!(
            at_or_before(mixed.iter().map(String::as_str), "u", at(2_600)),
            Some(seconds)
        );
    }

    #[test]
    fn the_pin_says_the_annotation_and_how_to_apply_it() {
        let mut s = read("alice", "desk/ubuntu", "alice-5", &[], 0).snapshot;
        s.taken = Some("2026-12-01T18:00:00Z".into());
        s.trigger = Some("schedule".into());
        s.base = Some("desk/ubuntu:4.1".into());
        let pin = Pin::of(&s, "snapshot.abcdesktop.io/pin");
        let text = pin_text(&[pin], "registry.example.net");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "# alice's desktop as of 2026-12-01T18:00:00Z (trigger schedule): registry.example.net/desk/ubuntu:alice-5, for pods of desk/ubuntu:4.1"
        );
        assert_eq!(lines[1], "snapshot.abcdesktop.io/pin: \"alice-5\"");
        assert!(text.contains("metadata.annotations"), "{text}");
    }

    #[test]
    fn the_timeline_table_shows_dashes_for_the_unknown() {
        let mut s = read("alice", "desk/ubuntu", "alice-5", &[], 0).snapshot;
        s.taken = Some("2026-12-01T18:00:00Z".into());
        s.added_bytes = Some(3 << 20);
        let t = table(&[s]);
        assert_eq!(
            t,
            "REPOSITORY   WHEN                  TRIGGER  ADDED    TAG\n\
             desk/ubuntu  2026-12-01T18:00:00Z  -        3.0 MiB  alice-5\n"
        );
    }
}
