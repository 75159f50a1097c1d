//! Which of a user's snapshots retention deletes, by tiers as backup tools
//! keep theirs (restic's `forget --keep-last/--keep-hourly/--keep-daily/
//! --keep-weekly`): the newest `last`; the newest of each hour, day and ISO
//! week (UTC) for the `hourly`, `daily` and `weekly` newest such periods that
//! have a snapshot; every snapshot younger than `min_age`. A snapshot is kept
//! when any rule keeps it; the newest and the one just pushed always are;
//! never a tag of another prefix, never a tag whose age cannot be told.
//!
//! A tag's age comes from its timestamp: nanoseconds since the epoch (what
//! the sidecar writes, 19 digits today), or by its width, milliseconds (13),
//! microseconds (16) or seconds (10) for older writers. Any other width is
//! kept: a snapshot whose age is unknown is never deleted, and counts in no
//! period.

use crate::{compare, owned_by, Snapshot};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What retention keeps of one user's snapshots (one series: one repository,
/// one tag prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rules {
    /// The newest this many stay; 0 turns retention off (every snapshot
    /// stays, whatever the other rules). The newest always stays, so 1 is
    /// the least that deletes anything.
    pub last: usize,
    /// The newest snapshot of each of the this many newest hours (UTC) that
    /// have one.
    pub hourly: usize,
    /// The same per day (UTC).
    pub daily: usize,
    /// The same per ISO week (Monday to Sunday, UTC).
    pub weekly: usize,
    /// Snapshots younger than this stay whatever their number, so a burst of
    /// snapshots cannot push out what was just saved.
    pub min_age: Duration,
}

impl Rules {
    /// Whether these rules delete nothing at all.
    pub fn off(&self) -> bool {
        self.last == 0
    }
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

/// A period snapshots are grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Period {
    Hour,
    Day,
    Week,
}

impl Period {
    /// The number of the period `at` falls in, counted from the epoch (UTC).
    fn of(self, at: SystemTime) -> u64 {
        let secs = at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        match self {
            Self::Hour => secs / 3_600,
            Self::Day => secs / 86_400,
            // 1970-01-01 was a Thursday: +3 days puts each Monday at a multiple of 7
            Self::Week => (secs / 86_400 + 3) / 7,
        }
    }
}

/// The tags of `prefix` among `tags` that retention deletes at `now`, oldest
/// first; `pushed` (the snapshot just written) is never among them.
pub fn to_delete<'a>(
    tags: impl IntoIterator<Item = &'a str>,
    prefix: &str,
    rules: Rules,
    now: SystemTime,
    pushed: &str,
) -> Vec<String> {
    if rules.off() {
        return Vec::new();
    }
    let mut mine: Vec<Snapshot> = tags
        .into_iter()
        .filter_map(|t| owned_by(t, prefix))
        .collect();
    mine.sort_by(|a, b| compare(b, a));
    mine.dedup_by(|a, b| a.tag == b.tag);
    let keep = kept(&mine, &rules, now);
    let mut out: Vec<String> = mine
        .into_iter()
        .zip(keep)
        .filter(|(s, keep)| !keep && s.tag != pushed)
        .map(|(s, _)| s.tag)
        .collect();
    out.reverse();
    out
}

/// Whether each of `newest_first` (one prefix's snapshots, newest first, no
/// duplicate) stays under `rules`.
fn kept(newest_first: &[Snapshot], rules: &Rules, now: SystemTime) -> Vec<bool> {
    let times: Vec<Option<SystemTime>> = newest_first.iter().map(taken_at).collect();
    let mut keep: Vec<bool> = times
        .iter()
        .enumerate()
        .map(|(i, at)| {
            let young = at
                .and_then(|t| now.duration_since(t).ok())
                .is_none_or(|age| age < rules.min_age);
            i < rules.last.max(1) || young
        })
        .collect();
    // By time for the periods: a timestamp's width changed over the years,
    // so the order of the numbers is not always the order in time.
    let mut by_time: Vec<(SystemTime, usize)> = times
        .iter()
        .enumerate()
        .filter_map(|(i, at)| Some(((*at)?, i)))
        .collect();
    by_time.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for (period, wanted) in [
        (Period::Hour, rules.hourly),
        (Period::Day, rules.daily),
        (Period::Week, rules.weekly),
    ] {
        let mut seen: Option<u64> = None;
        let mut periods = 0;
        for &(at, i) in &by_time {
            if periods == wanted {
                break;
            }
            let p = period.of(at);
            if seen != Some(p) {
                seen = Some(p);
                periods += 1;
                keep[i] = true;
            }
        }
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MINUTE: Duration = Duration::from_secs(60);
    const HOUR: Duration = Duration::from_secs(3_600);
    const DAY: Duration = Duration::from_secs(86_400);

    fn ns_tag(prefix: &str, at: SystemTime) -> String {
        crate::snapshot_tag(prefix, at)
    }

    /// `YYYY-MM-DDTHH:MM` (UTC) to a time, for readable tables.
    fn at(s: &str) -> SystemTime {
        let n = |r: std::ops::Range<usize>| s[r].parse::<u64>().expect("digits");
        let (y, m, d, hh, mm) = (n(0..4), n(5..7), n(8..10), n(11..13), n(14..16));
        // days from the civil date (Howard Hinnant's algorithm)
        let (y, m) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
        let era = y / 400;
        let yoe = y - era * 400;
        let doy = (153 * m + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        UNIX_EPOCH + Duration::from_secs(days * 86_400 + hh * 3_600 + mm * 60)
    }

    /// The times (`YYYY-MM-DDTHH:MM`) of the snapshots `rules` keeps among
    /// those taken at `times`, at `now`, newest first.
    fn keeps(times: &[&str], rules: Rules, now: &str) -> Vec<String> {
        let tags: Vec<String> = times.iter().map(|t| ns_tag("u", at(t))).collect();
        let newest = tags
            .iter()
            .max_by_key(|t| t.len())
            .cloned()
            .unwrap_or_default();
        let gone = to_delete(
            tags.iter().map(String::as_str),
            "u",
            rules,
            at(now),
            &newest,
        );
        let mut left: Vec<(SystemTime, String)> = times
            .iter()
            .zip(&tags)
            .filter(|(_, tag)| !gone.contains(tag))
            .map(|(t, _)| (at(t), t.to_string()))
            .collect();
        left.sort_by_key(|l| std::cmp::Reverse(l.0));
        left.into_iter().map(|(_, t)| t).collect()
    }

    fn rules(last: usize, hourly: usize, daily: usize, weekly: usize) -> Rules {
        Rules {
            last,
            hourly,
            daily,
            weekly,
            min_age: Duration::ZERO,
        }
    }

    #[test]
    fn the_calendar_helper_is_right() {
        assert_eq!(at("1970-01-01T00:00"), UNIX_EPOCH);
        assert_eq!(
            at("2026-12-02T01:30"),
            UNIX_EPOCH + Duration::from_secs(1_796_175_000)
        );
    }

    #[test]
    fn periods_are_utc_hours_days_and_iso_weeks() {
        let table = [
            // (a, b, same hour, same day, same week)
            ("2026-11-30T10:00", "2026-11-30T10:59", true, true, true),
            ("2026-11-30T10:59", "2026-11-30T11:00", false, true, true),
            ("2026-11-30T23:59", "2026-12-01T00:00", false, false, true),
            // Sunday 29 November to Monday 30 November: a new ISO week
            ("2026-11-29T23:59", "2026-11-30T00:00", false, false, false),
            // Monday to Sunday of one week
            ("2026-11-30T00:00", "2026-12-06T23:59", false, false, true),
            // across a year: ISO week 53 of 2026 runs to Sunday 3 January 2027
            ("2026-12-31T12:00", "2027-01-03T12:00", false, false, true),
            ("2027-01-03T12:00", "2027-01-04T00:00", false, false, false),
        ];
        for (a, b, hour, day, week) in table {
            let same = |p: Period| p.of(at(a)) == p.of(at(b));
            assert_eq!(
                (same(Period::Hour), same(Period::Day), same(Period::Week)),
                (hour, day, week),
                "{a} / {b}"
            );
        }
    }

    #[test]
    fn tiers_table() {
        // one snapshot every 20 minutes from Monday 23 November 2026 08:00 to
        // Wednesday 2 December 2026 09:40, every day but the weekend
        let mut times: Vec<String> = Vec::new();
        for day in [23, 24, 25, 26, 27, 30, 1, 2] {
            let month = if day >= 23 { 11 } else { 12 };
            for hour in 8..10 {
                for minute in [0, 20, 40] {
                    times.push(format!("2026-{month:02}-{day:02}T{hour:02}:{minute:02}"));
                }
            }
        }
        let times: Vec<&str> = times.iter().map(String::as_str).collect();
        let now = "2026-12-02T10:00";
        let table: &[(&str, Rules, &[&str])] = &[
            (
                "last 1: the newest only",
                rules(1, 0, 0, 0),
                &["2026-12-02T09:40"],
            ),
            (
                "last 3",
                rules(3, 0, 0, 0),
                &["2026-12-02T09:40", "2026-12-02T09:20", "2026-12-02T09:00"],
            ),
            (
                "hourly 3: the newest of the three newest hours that have one",
                rules(1, 3, 0, 0),
                &["2026-12-02T09:40", "2026-12-02T08:40", "2026-12-01T09:40"],
            ),
            (
                "daily 4: the weekend has none, so it reaches Friday",
                rules(1, 0, 4, 0),
                &[
                    "2026-12-02T09:40",
                    "2026-12-01T09:40",
                    "2026-11-30T09:40",
                    "2026-11-27T09:40",
                ],
            ),
            (
                "weekly 3: two weeks have snapshots",
                rules(1, 0, 0, 3),
                &["2026-12-02T09:40", "2026-11-27T09:40"],
            ),
            (
                "together: the union, the newest shared",
                rules(2, 2, 2, 2),
                &[
                    "2026-12-02T09:40",
                    "2026-12-02T09:20",
                    "2026-12-02T08:40",
                    "2026-12-01T09:40",
                    "2026-11-27T09:40",
                ],
            ),
        ];
        for (why, rules, want) in table {
            assert_eq!(keeps(&times, *rules, now), *want, "{why}");
        }
        // the minimum age keeps everything younger than it besides
        let young = Rules {
            min_age: HOUR + MINUTE,
            ..rules(1, 0, 1, 0)
        };
        assert_eq!(
            keeps(&times, young, now),
            ["2026-12-02T09:40", "2026-12-02T09:20", "2026-12-02T09:00"]
        );
        // off: everything stays
        assert_eq!(keeps(&times, rules(0, 5, 5, 5), now).len(), times.len());
    }

    #[test]
    fn the_newest_stays_even_when_older_than_the_minimum_age() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let tags = [ns_tag("u", now - DAY * 30), ns_tag("u", now - DAY * 31)];
        let got = to_delete(
            tags.iter().map(String::as_str),
            "u",
            rules(1, 0, 0, 0),
            now,
            "u-0",
        );
        assert_eq!(got, [tags[1].clone()]);
    }

    #[test]
    fn beyond_the_newest_and_older_than_the_minimum_age_only() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let days_ago = |d: u64| ns_tag("alice", now - DAY * d as u32);
        let tags: Vec<String> = (0..12).map(days_ago).collect();
        let refs: Vec<&str> = tags.iter().map(String::as_str).collect();
        let week = Rules {
            min_age: DAY * 7,
            ..rules(3, 0, 0, 0)
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
        let none = rules(3, 0, 0, 0);
        assert_eq!(
            to_delete(refs.iter().copied(), "alice", none, now, &tags[0]).len(),
            9
        );
        // keep 0: retention off
        let off = rules(0, 0, 0, 0);
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
        for rules in [rules(1, 0, 0, 0), rules(1, 1, 1, 1)] {
            let policy = Rules {
                min_age: DAY,
                ..rules
            };
            let got = to_delete(
                tags.iter().map(String::as_str),
                "alice",
                policy,
                now,
                &pushed,
            );
            // one hour, one day, one week: the newest's, which the others are not in
            assert_eq!(
                got,
                [
                    "alice-1700000000",
                    "alice-1700000000000",
                    "alice-1700000000000000"
                ],
                "{rules:?}"
            );
        }
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

    /// Snapshot ages in seconds before `now` (up to about ten weeks), and rules.
    fn timeline() -> impl Strategy<Value = Vec<u64>> {
        prop::collection::vec(0u64..6_000_000, 1..60)
    }

    fn any_rules() -> impl Strategy<Value = Rules> {
        (1usize..12, 0usize..30, 0usize..10, 0usize..6, 0u64..400_000).prop_map(
            |(last, hourly, daily, weekly, min_age)| Rules {
                last,
                hourly,
                daily,
                weekly,
                min_age: Duration::from_secs(min_age),
            },
        )
    }

    fn tags_at(now: SystemTime, ages: &[u64]) -> Vec<String> {
        ages.iter()
            .map(|a| ns_tag("u", now - Duration::from_secs(*a)))
            .collect()
    }

    proptest! {
        #[test]
        fn the_newest_always_stays(ages in timeline(), rules in any_rules()) {
            let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
            let tags = tags_at(now, &ages);
            let newest = crate::newest(tags.iter().map(String::as_str), "u").unwrap().tag;
            // `pushed` named as something else: the newest stays on its own
            let gone = to_delete(tags.iter().map(String::as_str), "u", rules, now, "u-0");
            prop_assert!(!gone.contains(&newest));
            // and nothing younger than the minimum age goes
            for (tag, age) in tags.iter().zip(&ages) {
                if Duration::from_secs(*age) < rules.min_age {
                    prop_assert!(!gone.contains(tag), "{tag} is {age} s old");
                }
            }
        }

        #[test]
        fn more_rules_never_delete_more(
            ages in timeline(),
            rules in any_rules(),
            more in (0usize..5, 0usize..10, 0usize..5, 0usize..3, 0u64..100_000),
        ) {
            let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
            let tags = tags_at(now, &ages);
            let bigger = Rules {
                last: rules.last + more.0,
                hourly: rules.hourly + more.1,
                daily: rules.daily + more.2,
                weekly: rules.weekly + more.3,
                min_age: rules.min_age + Duration::from_secs(more.4),
            };
            let gone = |r: Rules| to_delete(tags.iter().map(String::as_str), "u", r, now, "u-0");
            let (fewer, more) = (gone(rules), gone(bigger));
            for tag in &more {
                prop_assert!(fewer.contains(tag), "{tag} deleted by {bigger:?} not by {rules:?}");
            }
        }
    }
}
