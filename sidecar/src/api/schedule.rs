//! Snapshots on a schedule (`--every`, which the webhook sets from
//! `--snapshot-every` or the pod's annotation).
//!
//! The interval runs from the end of the last snapshot, whatever started it
//! (a click moves the next scheduled one too): at most about one interval of
//! work is ever unsaved. Each gap is the interval ± a tenth, drawn anew, and
//! the first snapshot comes at a random moment within the first interval, so
//! the desktops of a node started together (a node's restart, a class logging
//! in) do not freeze together, and stay spread. The minimum interval holds:
//! a gap is never shorter than `--min-interval`.
//!
//! A scheduled snapshot with nothing new pushes nothing. Never two at once: a
//! click during a scheduled snapshot joins it (which then answers as a click,
//! with a tag); a scheduled snapshot due during a click's or a logoff's waits
//! for its end, and counts from there; a logoff ends the schedule.

use crate::{
    api::AppState,
    snapshot::{
        self,
        session::{Begin, Trigger},
    },
};
use std::{sync::Arc, time::Duration};
use tokio::time::Instant;
use tracing::info;

/// When the first scheduled snapshot comes after the sidecar starts: at
/// `draw` (in `[0, 1)`) of the interval.
pub fn first(every: Duration, draw: f64) -> Duration {
    every.mul_f64(draw.clamp(0.0, 1.0))
}

/// The gap from the end of the last snapshot to the next scheduled one: the
/// interval less a tenth plus `draw` (in `[0, 1)`) of two tenths, never
/// shorter than the minimum interval.
pub fn gap(every: Duration, min_interval: Duration, draw: f64) -> Duration {
    let jitter = every / 10;
    (every - jitter + (jitter * 2).mul_f64(draw.clamp(0.0, 1.0))).max(min_interval)
}

/// How long the schedule waits before its next snapshot: until `first` after
/// its start while nothing has run yet (`since_start`), then until `gap`
/// after the end of the last operation (`since_last_end`); zero when due.
pub fn wait(
    since_start: Duration,
    since_last_end: Option<Duration>,
    first: Duration,
    gap: Duration,
) -> Duration {
    match since_last_end {
        None => first.saturating_sub(since_start),
        Some(ago) => gap.saturating_sub(ago),
    }
}

/// Runs the schedule until a logoff ends it (or the process does).
pub async fn run(state: Arc<AppState>, every: Duration) {
    let min_interval = state.config.min_interval;
    let mut random = fastrand::Rng::new();
    let started = Instant::now();
    let first = first(every, random.f64());
    let mut gap = gap(every, min_interval, random.f64());
    info!(
        every = %humantime::format_duration(every),
        first_in_ms = first.as_millis() as u64,
        "snapshots on a schedule"
    );
    loop {
        let due_in = wait(
            started.elapsed(),
            state.sessions.since_last_end(),
            first,
            gap,
        );
        if !due_in.is_zero() {
            // then look again: a click may have moved the next one
            tokio::time::sleep(due_in).await;
            continue;
        }
        match state.sessions.begin_scheduled(min_interval) {
            None => {
                info!("logoff: no more snapshots on the schedule");
                return;
            }
            Some(Begin::Started(id)) => {
                snapshot::run(
                    &state.config,
                    &state.sessions,
                    &state.metrics,
                    &id,
                    Trigger::Schedule,
                )
                .await;
            }
            Some(Begin::Running(id)) => {
                // a click's or a logoff's: the next one counts from its end
                state.sessions.ended(&id).await;
            }
            Some(Begin::TooSoon { wait, .. }) => tokio::time::sleep(wait).await,
        }
        gap = self::gap(every, min_interval, random.f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn the_first_comes_anywhere_within_the_interval() {
        for (draw, want) in [
            (0.0, S(0)),
            (0.5, S(300)),
            (0.999, Duration::from_millis(599_400)),
            (-1.0, S(0)),
            (7.0, S(600)),
        ] {
            assert_eq!(first(S(600), draw), want, "draw {draw}");
        }
    }

    #[test]
    fn each_gap_is_the_interval_give_or_take_a_tenth_never_under_the_minimum() {
        // (every, min interval, draw, gap)
        for (every, min, draw, want) in [
            (S(600), S(30), 0.0, S(540)),
            (S(600), S(30), 0.5, S(600)),
            (S(600), S(30), 1.0, S(660)),
            (S(600), S(30), 0.25, S(570)),
            (S(30), S(30), 0.0, S(30)),
            (S(30), S(30), 1.0, S(33)),
            (S(10), S(30), 0.5, S(30)),
            (S(1), S(0), 0.0, Duration::from_millis(900)),
        ] {
            assert_eq!(gap(every, min, draw), want, "{every:?} {min:?} {draw}");
        }
    }

    #[test]
    fn the_wait_counts_from_the_start_then_from_the_last_end() {
        let (first, gap) = (S(100), S(600));
        // (since start, since the last end, wait)
        for (since_start, since_last_end, want) in [
            (S(0), None, S(100)),
            (S(40), None, S(60)),
            (S(100), None, S(0)),
            (S(500), None, S(0)),
            // a click ran: the next one counts from its end
            (S(50), Some(S(10)), S(590)),
            (S(5000), Some(S(600)), S(0)),
            (S(5000), Some(S(700)), S(0)),
        ] {
            assert_eq!(
                wait(since_start, since_last_end, first, gap),
                want,
                "{since_start:?} {since_last_end:?}"
            );
        }
    }
}
