//! Which of a user's snapshots retention deletes: those beyond the `keep`
//! newest that are older than `min_age`, never the one just pushed, never a
//! tag of another prefix, never a tag whose age cannot be told.
//!
//! A tag's age comes from its timestamp: nanoseconds since the epoch (what
//! the sidecar writes, 19 digits today), or by its width, milliseconds (13),
//! microseconds (16) or seconds (10) for older writers. Any other width is
//! kept: a snapshot whose age is unknown is never deleted.

use crate::{compare, owned_by, Snapshot};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// How many of the newest snapshots stay whatever their age; 0 turns
    /// retention off.
    pub keep: usize,
    /// Snapshots younger than this stay whatever their number, so a burst of
    /// snapshots cannot erase a user's history.
    pub min_age: Duration,
}

/// When a snapshot was taken, from its timestamp's digits.
pub fn taken_at(snapshot: &Snapshot) -> Option<SystemTime> {
    let digits = &snapshot.timestamp;
    let value: u64 = digits.parse().ok()?;
    let since_epoch = match digits.len() {
        19 => Duration::from_nanos(value),
        16 => Duration::from_micros(value),
        13 => Duration::from_millis(value),
        10 => Duration::from_secs(value),
        _ => return None,
    };
    UNIX_EPOCH.checked_add(since_epoch)
}

/// The tags of `prefix` among `tags` that retention deletes at `now`, oldest
/// first; `pushed` (the snapshot just written) is never among them.
pub fn to_delete<'a>(
    tags: impl IntoIterator<Item = &'a str>,
    prefix: &str,
    policy: Policy,
    now: SystemTime,
    pushed: &str,
) -> Vec<String> {
    if policy.keep == 0 {
        return Vec::new();
    }
    let mut mine: Vec<Snapshot> = tags
        .into_iter()
        .filter_map(|t| owned_by(t, prefix))
        .collect();
    mine.sort_by(|a, b| compare(b, a));
    mine.dedup_by(|a, b| a.tag == b.tag);
    let mut out: Vec<String> = mine
        .into_iter()
        .skip(policy.keep)
        .filter(|s| s.tag != pushed)
        .filter(|s| {
            taken_at(s)
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age >= policy.min_age)
        })
        .map(|s| s.tag)
        .collect();
    out.reverse();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn ns_tag(prefix: &str, at: SystemTime) -> String {
        crate::snapshot_tag(prefix, at)
    }

    #[test]
    fn beyond_the_newest_and_older_than_the_minimum_age_only() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let days_ago = |d: u64| ns_tag("alice", now - DAY * d as u32);
        let tags: Vec<String> = (0..12).map(days_ago).collect();
        let refs: Vec<&str> = tags.iter().map(String::as_str).collect();
        let week = Policy {
            keep: 3,
            min_age: DAY * 7,
        };
        // days 0, 1, 2 are the newest three; days 3..6 are younger than a week
        let got = to_delete(refs.iter().copied(), "alice", week, now, &tags[0]);
        let want: Vec<String> = (7..12).rev().map(days_ago).collect();
        assert_eq!(got, want, "oldest first");

        // a burst of snapshots today deletes nothing younger than a week
        let burst: Vec<String> = (0..50)
            .map(|i| ns_tag("alice", now - Duration::from_secs(i)))
            .collect();
        let all: Vec<&str> = burst.iter().chain(&tags).map(String::as_str).collect();
        let got = to_delete(all.iter().copied(), "alice", week, now, &burst[0]);
        assert_eq!(got, want, "the burst pushed out nothing young");

        // no minimum age: everything beyond the newest three
        let none = Policy {
            keep: 3,
            min_age: Duration::ZERO,
        };
        assert_eq!(
            to_delete(refs.iter().copied(), "alice", none, now, &tags[0]).len(),
            9
        );
        // keep 0: retention off
        let off = Policy { keep: 0, ..none };
        assert!(to_delete(refs.iter().copied(), "alice", off, now, &tags[0]).is_empty());
    }

    #[test]
    fn never_another_prefix_the_pushed_tag_or_an_unknown_age() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let old = now - DAY * 30;
        let pushed = ns_tag("alice", old); // a clock gone wrong: the pushed one looks old
        let tags = [
            ns_tag("alice", now),
            pushed.clone(),
            ns_tag("alice-1", old),
            ns_tag("alicex", old),
            ns_tag("xalice", old),
            ns_tag("Alice", old),
            "alice-17".to_string(),               // a width that tells no age
            "alice-1700000000".to_string(),       // seconds
            "alice-1700000000000".to_string(),    // milliseconds
            "alice-1700000000000000".to_string(), // microseconds
            "latest".to_string(),
        ];
        let policy = Policy {
            keep: 1,
            min_age: DAY,
        };
        let got = to_delete(
            tags.iter().map(String::as_str),
            "alice",
            policy,
            now,
            &pushed,
        );
        assert_eq!(
            got,
            [
                "alice-1700000000",
                "alice-1700000000000",
                "alice-1700000000000000"
            ]
        );
    }

    #[test]
    fn ages_by_width() {
        let s = |t: &str| owned_by(t, "u").unwrap();
        let at = |secs: u64| Some(UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(taken_at(&s("u-1700000000")), at(1_700_000_000));
        assert_eq!(taken_at(&s("u-1700000000000")), at(1_700_000_000));
        assert_eq!(taken_at(&s("u-1700000000000000")), at(1_700_000_000));
        assert_eq!(taken_at(&s("u-1700000000000000000")), at(1_700_000_000));
        assert_eq!(taken_at(&s("u-123")), None);
        assert_eq!(taken_at(&s("u-99999999999999999999")), None);
    }
}
