//! Snapshot operations and their steps, as the desktop front end polls them.
//! One operation at a time: a request while one runs gets the running one.

use serde::Serialize;
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

#[derive(Debug, Clone, Serialize)]
pub struct Operation {
    pub session_id: String,
    pub step: Step,
    /// What the front end shows: the step's words, or the error.
    pub message: String,
    pub started: u128,
    pub image: Option<String>,
}

#[derive(Default)]
pub struct Sessions {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    operations: BTreeMap<String, Operation>,
    running: Option<String>,
    counter: u64,
    /// When the last operation ended (done or error).
    last_ended: Option<Instant>,
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

/// Epoch milliseconds.
pub fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

impl Sessions {
    /// Starts an operation, or returns the running one, or refuses when the
    /// last one ended less than `min_interval` ago.
    pub fn begin(&self, min_interval: Duration) -> Begin {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(id) = &inner.running {
            return Begin::Running(id.clone());
        }
        if let Some(ended) = inner.last_ended.map(|t| t.elapsed()) {
            if ended < min_interval {
                return Begin::TooSoon {
                    ended,
                    wait: min_interval - ended,
                };
            }
        }
        inner.counter += 1;
        let id = format!("{:x}-{}", now_ms(), inner.counter);
        inner.operations.insert(
            id.clone(),
            Operation {
                session_id: id.clone(),
                step: Step::Starting,
                message: Step::Starting.words().into(),
                started: now_ms(),
                image: None,
            },
        );
        inner.running = Some(id.clone());
        Begin::Started(id)
    }

    pub fn step(&self, id: &str, step: Step) {
        self.set(id, step, step.words().to_string(), None);
    }

    pub fn done(&self, id: &str, image: String) {
        self.set(id, Step::Done, Step::Done.words().to_string(), Some(image));
    }

    pub fn fail(&self, id: &str, why: String) {
        self.set(id, Step::Error, why, None);
    }

    fn set(&self, id: &str, step: Step, message: String, image: Option<String>) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(op) = inner.operations.get_mut(id) {
            op.step = step;
            op.message = message;
            if image.is_some() {
                op.image = image;
            }
        }
        if step.finished() && inner.running.as_deref() == Some(id) {
            inner.running = None;
            inner.last_ended = Some(Instant::now());
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
        s.done(&c, "img".into());
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
        s.done(&a, "img".into());
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
}
