//! Snapshot operations and their steps, as the desktop front end polls them.
//! One operation at a time: a request while one runs gets the running one.
//! A logoff snapshot is an operation too, which the pod's termination waits
//! for; and so is a scheduled one, which a click joins.

use serde::Serialize;
use snapshot_tags::provenance;
use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

/// The steps, with the words the abcdesktop front end knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Step {
    Starting,
    SearchDesktop,
    GenerateImage,
    LoginRegistry,
    PushImage,
    Done,
    Error,
}

impl Step {
    pub fn words(self) -> &'static str {
        match self {
            Step::Starting => "starting",
            Step::SearchDesktop => "search desktop id",
            Step::GenerateImage => "generate desktop image",
            Step::LoginRegistry => "login to registry",
            Step::PushImage => "push desktop image to registry",
            Step::Done => "done",
            Step::Error => "error",
        }
    }

    pub fn finished(self) -> bool {
        matches!(self, Step::Done | Step::Error)
    }
}

/// What started an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// The user picked "snapshot".
    Click,
    /// The pod is going away (the preStop hook, or SIGTERM).
    Logoff,
    /// The schedule (`--every`).
    Schedule,
}

impl Trigger {
    /// Its word in the manifest's trigger annotation and the metrics' label.
    pub fn word(self) -> &'static str {
        let named = match self {
            Trigger::Click => provenance::Trigger::Click,
            Trigger::Logoff => provenance::Trigger::Logoff,
            Trigger::Schedule => provenance::Trigger::Schedule,
        };
        named.as_str()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Operation {
    pub session_id: String,
    pub trigger: Trigger,
    pub step: Step,
    /// What the front end shows: the step's words, or the error.
    pub message: String,
    pub started: u128,
    pub image: Option<String>,
    /// A click that joined this scheduled snapshot while it ran: the
    /// operation then answers as a click (a tag, even when nothing changed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub joined_by: Option<Trigger>,
}

impl Operation {
    /// What the operation answers as: the trigger that started it, or a
    /// click that joined it.
    pub fn answers_as(&self) -> Trigger {
        self.joined_by.unwrap_or(self.trigger)
    }
}

pub struct Sessions {
    inner: Mutex<Inner>,
    /// Bumped each time an operation ends, for those waiting on one.
    ended: tokio::sync::watch::Sender<u64>,
    /// Blobs the snapshot repository is known to hold, for the next push.
    pub known: crate::registry::push::KnownBlobs,
}

impl Default for Sessions {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
            ended: tokio::sync::watch::Sender::new(0),
            known: Default::default(),
        }
    }
}

#[derive(Default)]
struct Inner {
    operations: BTreeMap<String, Operation>,
    running: Option<String>,
    counter: u64,
    /// When the last operation ended (done or error).
    last_ended: Option<Instant>,
    /// When the last operation that answered a request (a click, a logoff)
    /// ended: the minimum interval counts from it.
    last_asked_ended: Option<Instant>,
    /// A logoff has begun: the schedule is over.
    logoff_asked: bool,
    /// The uncompressed digest of the last layer this sidecar pushed.
    last_pushed: Option<String>,
}

/// What a request to start a snapshot got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    Started(String),
    /// One is running: its id.
    Running(String),
    /// The last one ended less than the minimum interval ago; the next may
    /// start after `wait`.
    TooSoon {
        ended: Duration,
        wait: Duration,
    },
}

/// What a logoff got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogoffBegin {
    Started(String),
    /// A logoff snapshot is running: its id.
    Running(String),
    /// A snapshot the user clicked is running: the logoff waits for its end.
    Busy(String),
    /// The last operation ended less than the minimum interval ago.
    TooSoon(Duration),
}

/// How long until `min_interval` has passed since `ended`, if it has not.
fn too_soon(ended: Option<Instant>, min_interval: Duration) -> Option<Duration> {
    let ago = ended?.elapsed();
    (ago < min_interval).then(|| min_interval - ago)
}

/// Epoch milliseconds.
pub fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

impl Sessions {
    /// Starts an operation, or returns the running one (a scheduled one then
    /// answers as a click), or refuses when the last click's or logoff's
    /// ended less than `min_interval` ago (a scheduled one never holds a
    /// click back).
    pub fn begin(&self, min_interval: Duration) -> Begin {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(id) = inner.running.clone() {
            if let Some(op) = inner.operations.get_mut(&id) {
                if op.trigger == Trigger::Schedule {
                    op.joined_by = Some(Trigger::Click);
                }
            }
            return Begin::Running(id);
        }
        if let Some(wait) = too_soon(inner.last_asked_ended, min_interval) {
            return Begin::TooSoon {
                ended: min_interval - wait,
                wait,
            };
        }
        Begin::Started(inner.start(Trigger::Click))
    }

    /// Starts a scheduled snapshot, or returns the running operation (which
    /// the schedule waits for), or refuses when the last operation of any
    /// trigger ended less than `min_interval` ago; `None` once a logoff has
    /// begun: the schedule is over.
    pub fn begin_scheduled(&self, min_interval: Duration) -> Option<Begin> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.logoff_asked {
            return None;
        }
        if let Some(id) = &inner.running {
            return Some(Begin::Running(id.clone()));
        }
        if let Some(wait) = too_soon(inner.last_ended, min_interval) {
            return Some(Begin::TooSoon {
                ended: min_interval - wait,
                wait,
            });
        }
        Some(Begin::Started(inner.start(Trigger::Schedule)))
    }

    /// How long ago the last operation, of any trigger, ended.
    pub fn since_last_end(&self) -> Option<Duration> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_ended
            .map(|t| t.elapsed())
    }

    /// Starts a logoff snapshot, or says what it must wait for. The minimum
    /// interval holds here too: the endpoint takes no token (the kubelet
    /// calls it), so it must not let anyone push a tag at will.
    pub fn begin_logoff(&self, min_interval: Duration) -> LogoffBegin {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.logoff_asked = true;
        if let Some(id) = &inner.running {
            let trigger = inner.operations.get(id).map(|op| op.trigger);
            return match trigger {
                Some(Trigger::Logoff) => LogoffBegin::Running(id.clone()),
                _ => LogoffBegin::Busy(id.clone()),
            };
        }
        if let Some(wait) = too_soon(inner.last_asked_ended, min_interval) {
            return LogoffBegin::TooSoon(wait);
        }
        LogoffBegin::Started(inner.start(Trigger::Logoff))
    }

    /// Whether a logoff snapshot has run (or runs) in this sidecar's life.
    pub fn logoff_seen(&self) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .operations
            .values()
            .any(|op| op.trigger == Trigger::Logoff)
    }

    /// Waits until operation `id` has ended; what it ended as.
    pub async fn ended(&self, id: &str) -> Option<Operation> {
        let mut ends = self.ended.subscribe();
        loop {
            match self.get(id) {
                Some(op) if !op.step.finished() => {}
                other => return other,
            }
            if ends.changed().await.is_err() {
                return self.get(id);
            }
        }
    }

    pub fn step(&self, id: &str, step: Step) {
        self.set(id, step, step.words().to_string(), None);
    }

    /// Ended with a pushed image, whose new layer has uncompressed digest `diff_id`.
    pub fn done(&self, id: &str, image: String, diff_id: String) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_pushed = Some(diff_id);
        self.set(id, Step::Done, Step::Done.words().to_string(), Some(image));
    }

    /// Ended without a push: nothing changed.
    pub fn unchanged(&self, id: &str, why: &str) {
        self.set(id, Step::Done, why.to_string(), None);
    }

    /// Ended without a push, nothing changed since the last snapshot: a
    /// click's answer is that snapshot (`image`, the newest tag).
    pub fn newest(&self, id: &str, image: String) {
        self.set(id, Step::Done, Step::Done.words().to_string(), Some(image));
    }

    /// Ends operation `id` without a push, nothing having changed, unless it
    /// answers as a click (which gets a tag), in one step: a click cannot
    /// join it in between. Whether it ended.
    pub fn end_unchanged(&self, id: &str, why: &str) -> bool {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let clicked = inner
            .operations
            .get(id)
            .is_none_or(|op| op.answers_as() == Trigger::Click);
        if clicked {
            return false;
        }
        self.finish(inner, id, Step::Done, why.to_string(), None);
        true
    }

    /// The uncompressed digest of the last layer this sidecar pushed.
    pub fn last_pushed(&self) -> Option<String> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_pushed
            .clone()
    }

    pub fn fail(&self, id: &str, why: String) {
        self.set(id, Step::Error, why, None);
    }

    fn set(&self, id: &str, step: Step, message: String, image: Option<String>) {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        self.finish(inner, id, step, message, image);
    }

    /// Sets the step of `id` under the lock already taken; on the end of the
    /// running operation, frees the way for the next and wakes the waiters.
    fn finish(
        &self,
        mut inner: std::sync::MutexGuard<'_, Inner>,
        id: &str,
        step: Step,
        message: String,
        image: Option<String>,
    ) {
        let mut answered = None;
        if let Some(op) = inner.operations.get_mut(id) {
            op.step = step;
            op.message = message;
            if image.is_some() {
                op.image = image;
            }
            answered = Some(op.answers_as());
        }
        if step.finished() && inner.running.as_deref() == Some(id) {
            let now = Instant::now();
            inner.running = None;
            inner.last_ended = Some(now);
            if answered != Some(Trigger::Schedule) {
                inner.last_asked_ended = Some(now);
            }
            drop(inner);
            self.ended.send_modify(|n| *n += 1);
        }
    }

    pub fn get(&self, id: &str) -> Option<Operation> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .operations
            .get(id)
            .cloned()
    }

    pub fn list(&self) -> Vec<Operation> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .operations
            .values()
            .cloned()
            .collect()
    }

    pub fn running(&self) -> Option<String> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .running
            .clone()
    }
}

impl Inner {
    fn start(&mut self, trigger: Trigger) -> String {
        self.counter += 1;
        let id = format!("{:x}-{}", now_ms(), self.counter);
        self.operations.insert(
            id.clone(),
            Operation {
                session_id: id.clone(),
                trigger,
                step: Step::Starting,
                message: Step::Starting.words().into(),
                started: now_ms(),
                image: None,
                joined_by: None,
            },
        );
        self.running = Some(id.clone());
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn started(b: Begin) -> String {
        match b {
            Begin::Started(id) => id,
            other => panic!("not started: {other:?}"),
        }
    }

    #[test]
    fn one_operation_at_a_time_and_always_finished() {
        let s = Sessions::default();
        let a = started(s.begin(Duration::ZERO));
        assert_eq!(s.begin(Duration::ZERO), Begin::Running(a.clone()));
        s.step(&a, Step::PushImage);
        assert_eq!(s.get(&a).unwrap().message, "push desktop image to registry");
        s.fail(&a, "registry refused".into());
        assert_eq!(s.get(&a).unwrap().step, Step::Error);
        let c = started(s.begin(Duration::ZERO));
        assert_ne!(c, a);
        s.done(&c, "img".into(), "sha256:1".into());
        assert_eq!(s.get(&c).unwrap().message, "done");
        assert_eq!(s.list().len(), 2);
        assert!(s.running().is_none());
    }

    #[test]
    fn a_new_snapshot_waits_the_minimum_interval_after_the_last_one_ended() {
        let s = Sessions::default();
        let minute = Duration::from_secs(60);
        let a = started(s.begin(minute));
        // while it runs, the running one is answered, whatever the interval
        assert_eq!(s.begin(minute), Begin::Running(a.clone()));
        s.done(&a, "img".into(), "sha256:1".into());
        match s.begin(minute) {
            Begin::TooSoon { ended, wait } => {
                assert!(ended < Duration::from_secs(5));
                assert!(wait > Duration::from_secs(55) && wait <= minute);
            }
            other => panic!("{other:?}"),
        }
        // a failed one counts too: each attempt paused the desktop
        let b = started(s.begin(Duration::ZERO));
        s.fail(&b, "registry down".into());
        assert!(matches!(s.begin(minute), Begin::TooSoon { .. }));
        std::thread::sleep(Duration::from_millis(30));
        started(s.begin(Duration::from_millis(20)));
    }

    #[test]
    fn a_logoff_waits_for_a_click_joins_a_logoff_and_keeps_the_interval() {
        let s = Sessions::default();
        let click = started(s.begin(Duration::ZERO));
        assert_eq!(
            s.begin_logoff(Duration::ZERO),
            LogoffBegin::Busy(click.clone())
        );
        assert!(!s.logoff_seen());
        s.done(&click, "img".into(), "sha256:1".into());
        assert_eq!(s.last_pushed().as_deref(), Some("sha256:1"));
        assert!(matches!(
            s.begin_logoff(Duration::from_secs(60)),
            LogoffBegin::TooSoon(_)
        ));
        let LogoffBegin::Started(logoff) = s.begin_logoff(Duration::ZERO) else {
            panic!("a logoff should start")
        };
        assert!(s.logoff_seen());
        assert_eq!(
            s.begin_logoff(Duration::ZERO),
            LogoffBegin::Running(logoff.clone())
        );
        // a click during a logoff gets the logoff
        assert_eq!(s.begin(Duration::ZERO), Begin::Running(logoff.clone()));
        s.unchanged(&logoff, "nothing changed");
        let op = s.get(&logoff).unwrap();
        assert_eq!((op.step, op.trigger), (Step::Done, Trigger::Logoff));
        assert_eq!(s.last_pushed().as_deref(), Some("sha256:1"));
    }

    fn scheduled(b: Option<Begin>) -> String {
        match b {
            Some(Begin::Started(id)) => id,
            other => panic!("not started: {other:?}"),
        }
    }

    #[test]
    fn a_click_joins_a_scheduled_snapshot_which_then_answers_as_a_click() {
        let s = Sessions::default();
        let minute = Duration::from_secs(60);
        let a = scheduled(s.begin_scheduled(Duration::ZERO));
        assert_eq!(s.get(&a).unwrap().answers_as(), Trigger::Schedule);
        // a scheduled snapshot with nothing new ends at once, nobody joined
        assert!(s.end_unchanged(&a, "nothing"));
        assert_eq!(s.get(&a).unwrap().step, Step::Done);
        assert!(s.running().is_none());
        // one a click joined is the user's: it pushes, whatever changed
        let b = scheduled(s.begin_scheduled(Duration::ZERO));
        assert_eq!(s.begin(minute), Begin::Running(b.clone()));
        let op = s.get(&b).unwrap();
        assert_eq!(
            (op.trigger, op.joined_by, op.answers_as()),
            (Trigger::Schedule, Some(Trigger::Click), Trigger::Click)
        );
        assert!(!s.end_unchanged(&b, "nothing"));
        assert_eq!(s.running(), Some(b.clone()));
        s.done(&b, "img".into(), "sha256:1".into());
        // it answered a click: the minimum interval holds for the next click
        assert!(matches!(s.begin(minute), Begin::TooSoon { .. }));
        // a click's operation never ends unchanged
        let c = started(s.begin(Duration::ZERO));
        assert!(!s.end_unchanged(&c, "nothing"));
        s.fail(&c, "registry down".into());
        assert_eq!(s.list().len(), 3, "a joined click made no operation");
    }

    #[test]
    fn a_scheduled_snapshot_never_holds_a_click_back_but_waits_for_one() {
        let s = Sessions::default();
        let minute = Duration::from_secs(60);
        assert!(s.since_last_end().is_none());
        let a = scheduled(s.begin_scheduled(minute));
        s.done(&a, "img".into(), "sha256:1".into());
        assert!(s
            .since_last_end()
            .is_some_and(|d| d < Duration::from_secs(5)));
        // the schedule keeps the minimum interval for itself
        assert!(matches!(
            s.begin_scheduled(minute),
            Some(Begin::TooSoon { .. })
        ));
        // a click or a logoff does not wait for a scheduled snapshot's end
        let click = started(s.begin(minute));
        // the schedule waits for the click
        assert_eq!(
            s.begin_scheduled(minute),
            Some(Begin::Running(click.clone()))
        );
        assert_eq!(s.get(&click).unwrap().joined_by, None);
        s.done(&click, "img".into(), "sha256:2".into());
        assert!(matches!(
            s.begin_scheduled(minute),
            Some(Begin::TooSoon { .. })
        ));
    }

    #[test]
    fn a_logoff_waits_for_a_scheduled_snapshot_and_ends_the_schedule() {
        let s = Sessions::default();
        let a = scheduled(s.begin_scheduled(Duration::ZERO));
        assert_eq!(s.begin_logoff(Duration::ZERO), LogoffBegin::Busy(a.clone()));
        // from the logoff on, nothing more is scheduled, running or not
        assert_eq!(s.begin_scheduled(Duration::ZERO), None);
        s.done(&a, "img".into(), "sha256:1".into());
        assert_eq!(s.begin_scheduled(Duration::ZERO), None);
        let LogoffBegin::Started(logoff) = s.begin_logoff(Duration::from_secs(60)) else {
            panic!("a scheduled snapshot does not hold a logoff back")
        };
        s.unchanged(&logoff, "nothing");
        assert_eq!(s.begin_scheduled(Duration::ZERO), None);
    }

    #[tokio::test]
    async fn waiting_for_an_operation_returns_when_it_ends() {
        let s = std::sync::Arc::new(Sessions::default());
        let id = started(s.begin(Duration::ZERO));
        let waiter = {
            let (s, id) = (s.clone(), id.clone());
            tokio::spawn(async move { s.ended(&id).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        s.fail(&id, "registry down".into());
        let op = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter wakes")
            .expect("the task")
            .expect("the operation");
        assert_eq!(op.step, Step::Error);
        // an ended one returns at once
        assert_eq!(s.ended(&id).await.map(|o| o.step), Some(Step::Error));
    }
}
