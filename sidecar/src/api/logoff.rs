//! The snapshot at logoff: the preStop hook's blocking request and the
//! sidecar's SIGTERM both come here, start one logoff snapshot (or join the
//! one running) and wait for its end, within the pod's grace period.
//!
//! The kubelet runs the graphical container's preStop hook (a request to
//! this sidecar) and waits for it before it sends that container SIGTERM, so
//! the desktop is still there to commit. With a plain sidecar container the
//! kubelet stops every container at once, so this sidecar gets SIGTERM while
//! the hook runs: it stays up until the commit has ended. A native sidecar is
//! stopped after the graphical container, when the hook has done the work.

use super::state::AppState;
use crate::snapshot::{
    self,
    session::{LogoffBegin, Operation, Step, Trigger},
};
use std::{sync::Arc, time::Duration};
use tokio::time::Instant;
use tracing::{error, info, warn};

/// How long a logoff snapshot may run: the grace period less the margin the
/// containers need to stop, at least one second.
pub fn commit_budget(grace: Duration, margin: Duration) -> Duration {
    grace.saturating_sub(margin).max(Duration::from_secs(1))
}

/// How a logoff ended, for the caller (the hook's answer, the shutdown's log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The operation ended (done, nothing new, or error): its id, whether it
    /// succeeded and what the front end reads.
    Operation {
        id: String,
        ok: bool,
        message: String,
    },
    /// The budget was spent before a snapshot could start (a clicked one ran
    /// until the end, or the minimum interval had not passed).
    NotStarted(String),
}

/// Starts the logoff snapshot, or joins the running one, and waits for its end.
pub async fn snapshot(state: Arc<AppState>) -> Ended {
    let deadline = Instant::now()
        + commit_budget(state.config.logoff_grace_period, state.config.logoff_margin);
    loop {
        match state.sessions.begin_logoff(state.config.min_interval) {
            LogoffBegin::Started(id) => {
                tokio::spawn(run(state.clone(), id.clone(), deadline));
                return wait(&state, &id).await;
            }
            LogoffBegin::Running(id) => return wait(&state, &id).await,
            LogoffBegin::Busy(click) => {
                // what the user did after that click must be in the snapshot:
                // wait for it to end, then commit again
                info!(session = %click, "logoff: waiting for the snapshot in progress to end");
                if tokio::time::timeout_at(deadline, state.sessions.ended(&click))
                    .await
                    .is_err()
                {
                    return not_started(
                        &state,
                        "a snapshot in progress did not end within the grace period",
                    );
                }
            }
            LogoffBegin::TooSoon(wait) => {
                if Instant::now() + wait >= deadline {
                    return not_started(
                        &state,
                        "the last snapshot ended less than the minimum interval before the end of the grace period",
                    );
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// SIGTERM: with `--on-logoff`, make sure the logoff snapshot has run (the
/// hook may have done it already, or be on its way) and wait for its end.
pub async fn on_terminate(state: Arc<AppState>) {
    if !state.config.on_logoff {
        return;
    }
    if state.sessions.logoff_seen() {
        // the preStop hook started it: wait for the one running, if any
        if let Some(id) = state.sessions.running() {
            let _ = tokio::time::timeout(
                commit_budget(state.config.logoff_grace_period, state.config.logoff_margin),
                state.sessions.ended(&id),
            )
            .await;
        }
        return;
    }
    info!("SIGTERM: snapshotting the desktop before stopping");
    let ended = snapshot(state).await;
    info!(?ended, "logoff snapshot ended; stopping");
}

fn not_started(state: &AppState, why: &str) -> Ended {
    warn!(
        reason = why,
        "no snapshot at logoff: the previous snapshot stays the newest"
    );
    state.metrics.logoff("timeout");
    Ended::NotStarted(why.to_string())
}

/// The logoff snapshot, abandoned at `deadline`: its future is dropped, which
/// resumes a paused desktop and removes the spool; the tag is the last thing
/// pushed, so nothing half-pushed is ever tagged.
async fn run(state: Arc<AppState>, id: String, deadline: Instant) {
    let config = &state.config;
    let work = snapshot::run(
        config,
        &state.sessions,
        &state.metrics,
        &id,
        Trigger::Logoff,
    );
    match tokio::time::timeout_at(deadline, work).await {
        Ok(word) => state.metrics.logoff(word),
        Err(_) => {
            let why = format!(
                "the snapshot at logoff did not finish within the grace period ({} less {} kept for stopping): abandoned, the previous snapshot stays the newest",
                humantime::format_duration(config.logoff_grace_period),
                humantime::format_duration(config.logoff_margin),
            );
            error!(session = %id, "{why}");
            state.metrics.logoff("timeout");
            state.sessions.fail(&id, why);
        }
    }
}

async fn wait(state: &AppState, id: &str) -> Ended {
    match state.sessions.ended(id).await {
        Some(Operation { step, message, .. }) => Ended::Operation {
            id: id.to_string(),
            ok: step == Step::Done,
            message,
        },
        None => Ended::NotStarted(format!("operation {id} is unknown")),
    }
}

#[cfg(test)]
mod tests {
    use super::commit_budget;
    use std::time::Duration;

    #[test]
    fn the_budget_keeps_the_margin_back() {
        let s = Duration::from_secs;
        for (grace, margin, want) in [
            (s(300), s(10), s(290)),
            (s(30), s(10), s(20)),
            (s(10), s(10), s(1)),
            (s(5), s(10), s(1)),
        ] {
            assert_eq!(
                commit_budget(grace, margin),
                want,
                "{grace:?} less {margin:?}"
            );
        }
    }
}
