//! Snapshot operations and their steps, as the desktop front end polls them.
//! One operation at a time: a request while one runs gets the running one.

use serde::Serialize;
use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
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
}

/// Epoch milliseconds.
pub fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

impl Sessions {
    /// Starts an operation, or returns the running one: `(id, started_now)`.
    pub fn begin(&self) -> (String, bool) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(id) = &inner.running {
            return (id.clone(), false);
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
        (id, true)
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

    #[test]
    fn one_operation_at_a_time_and_always_finished() {
        let s = Sessions::default();
        let (a, new) = s.begin();
        assert!(new);
        let (b, new) = s.begin();
        assert!(!new);
        assert_eq!(a, b);
        s.step(&a, Step::PushImage);
        assert_eq!(s.get(&a).unwrap().message, "push desktop image to registry");
        s.fail(&a, "registry refused".into());
        assert_eq!(s.get(&a).unwrap().step, Step::Error);
        let (c, new) = s.begin();
        assert!(new && c != a);
        s.done(&c, "img".into());
        assert_eq!(s.get(&c).unwrap().message, "done");
        assert_eq!(s.list().len(), 2);
        assert!(s.running().is_none());
    }
}
