//! Snapshot tags `<prefix>-<timestamp>`: how the sidecar makes them, whose
//! they are, which one the webhook restores, which ones retention deletes
//! ([`retention`]). Pure code, shared by both binaries.
//!
//! The timestamp is the run of decimal digits after the last `-`; the prefix
//! is everything before it and must equal the wanted prefix exactly, so the
//! tags of `alice-1` (`alice-1-500`) or `alicex` never count as `alice`'s.
//! The newest is the largest timestamp compared as a number (any width, no
//! overflow); equal numbers (`007` and `7`) are broken by the tag text so the
//! choice never depends on the order the registry listed them in.

use std::{
    cmp::Ordering,
    time::{SystemTime, UNIX_EPOCH},
};

pub mod provenance;
pub mod retention;

/// The tag of a snapshot taken at `now`: `<prefix>-<epoch nanoseconds>`.
pub fn snapshot_tag(prefix: &str, now: SystemTime) -> String {
    let ns = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}-{ns}")
}

/// A snapshot tag that belongs to the wanted prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub tag: String,
    /// The timestamp digits, without leading zeros ("0" for zero).
    pub timestamp: String,
}

/// Splits `<prefix>-<digits>`; `None` when the tag has no such form.
pub fn split(tag: &str) -> Option<(&str, &str)> {
    let (prefix, digits) = tag.rsplit_once('-')?;
    (!prefix.is_empty() && !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
        .then_some((prefix, digits))
}

/// The tag if it is a snapshot of `prefix`.
pub fn owned_by(tag: &str, prefix: &str) -> Option<Snapshot> {
    let (p, digits) = split(tag)?;
    (p == prefix).then(|| Snapshot {
        tag: tag.to_string(),
        timestamp: normalise(digits).to_string(),
    })
}

/// The newest snapshot of `prefix` among `tags`, in any order.
pub fn newest<'a>(tags: impl IntoIterator<Item = &'a str>, prefix: &str) -> Option<Snapshot> {
    tags.into_iter()
        .filter_map(|t| owned_by(t, prefix))
        .max_by(compare)
}

/// The snapshots of `prefix` among `tags`, oldest first.
pub fn oldest_first<'a>(tags: impl IntoIterator<Item = &'a str>, prefix: &str) -> Vec<String> {
    let mut owned: Vec<Snapshot> = tags
        .into_iter()
        .filter_map(|t| owned_by(t, prefix))
        .collect();
    owned.sort_by(compare);
    owned.into_iter().map(|s| s.tag).collect()
}

/// The newest snapshot among `tags` whatever its prefix: in the per-user
/// layout a repository holds one user's snapshots under every base tag.
pub fn newest_any<'a>(tags: impl IntoIterator<Item = &'a str>) -> Option<Snapshot> {
    tags.into_iter()
        .filter_map(|t| owned_by(t, split(t)?.0))
        .max_by(compare)
}

/// Orders snapshots by timestamp as a number, then by tag text.
pub fn compare(a: &Snapshot, b: &Snapshot) -> Ordering {
    a.timestamp
        .len()
        .cmp(&b.timestamp.len())
        .then_with(|| a.timestamp.cmp(&b.timestamp))
        .then_with(|| a.tag.cmp(&b.tag))
}

fn normalise(digits: &str) -> &str {
    let trimmed = digits.trim_start_matches('0');
    if trimmed.is_empty() {
        "0"
    } else {
        trimmed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oldest_first_is_by_timestamp_as_a_number() {
        let tags = ["a-10", "a-9", "b-1", "a-0100", "a-1-5"];
        assert_eq!(oldest_first(tags, "a"), ["a-9", "a-10", "a-0100"]);
    }

    #[test]
    fn newest_whatever_the_prefix() {
        let table: &[(&[&str], Option<&str>)] = &[
            (&["4.1-100", "4.2-90", "latest"], Some("4.1-100")),
            (&["4.1-100", "4.2-0200"], Some("4.2-0200")),
            (&["latest", "4.1"], None),
            (&[], None),
        ];
        for (tags, want) in table {
            assert_eq!(
                newest_any(tags.iter().copied()).map(|s| s.tag).as_deref(),
                *want,
                "{tags:?}"
            );
        }
    }
    use std::time::Duration;

    #[test]
    fn nanoseconds_after_the_prefix() {
        let t = UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        assert_eq!(
            snapshot_tag("jdoe_40example.com", t),
            "jdoe_40example.com-1700000000123456789"
        );
        let tag = snapshot_tag("alice", t);
        assert_eq!(
            newest([tag.as_str(), "alice-1700000000"], "alice").map(|s| s.tag),
            Some(tag.clone()),
            "a new tag wins over older ones"
        );
    }

    #[test]
    fn newest_table() {
        let table: &[(&[&str], &str, Option<&str>)] = &[
            (&[], "alice", None),
            (&["latest", "4.1"], "alice", None),
            (
                &["alice-1", "alice-2", "alice-10"],
                "alice",
                Some("alice-10"),
            ),
            (&["alice-999", "alice-1000"], "alice", Some("alice-1000")),
            (&["alice-1000", "alice-999"], "alice", Some("alice-1000")),
            // the width of the timestamp changed over time (seconds, then nanoseconds)
            (
                &[
                    "alice-1700000000",
                    "alice-1700000000123456789",
                    "alice-1800000000",
                ],
                "alice",
                Some("alice-1700000000123456789"),
            ),
            // look-alike users never count
            (
                &["alice-1-500", "alicex-900", "xalice-901", "alice-5"],
                "alice",
                Some("alice-5"),
            ),
            (&["alice-1-500", "alice-5"], "alice-1", Some("alice-1-500")),
            (
                &["alice-", "alice-abc", "alice-12a", "alice"],
                "alice",
                None,
            ),
            // equal numbers: the tag text decides, whatever the order
            (&["alice-7", "alice-007"], "alice", Some("alice-7")),
            (&["alice-007", "alice-7"], "alice", Some("alice-7")),
            // longer than u128
            (
                &[
                    "u-999999999999999999999999999999999999999999",
                    "u-1000000000000000000000000000000000000000000",
                ],
                "u",
                Some("u-1000000000000000000000000000000000000000000"),
            ),
            (
                &["jdoe_40example.com-3", "jdoe-4"],
                "jdoe_40example.com",
                Some("jdoe_40example.com-3"),
            ),
            // per-user layout: the prefix is the base tag
            (
                &["4.1-100", "4.1-200", "4.2-300", "latest-400"],
                "4.1",
                Some("4.1-200"),
            ),
        ];
        for (tags, prefix, want) in table {
            let got = newest(tags.iter().copied(), prefix).map(|s| s.tag);
            assert_eq!(got.as_deref(), *want, "{tags:?} / {prefix}");
        }
    }

    #[test]
    fn split_table() {
        assert_eq!(split("alice-12"), Some(("alice", "12")));
        assert_eq!(split("a-b-12"), Some(("a-b", "12")));
        assert_eq!(split("-12"), None);
        assert_eq!(split("alice-"), None);
        assert_eq!(split("alice"), None);
    }
}
