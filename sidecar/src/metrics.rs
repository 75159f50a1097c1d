//! Prometheus metrics of the sidecar, served at `/metrics`.

use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

/// How long each pause froze a desktop, to the end of its resume: observed by
/// `capture::commit::Paused` (process-wide, like the set of paused tasks), and
/// registered by every [`Metrics`].
pub static PAUSED_SECONDS: std::sync::LazyLock<Histogram> = std::sync::LazyLock::new(|| {
    Histogram::new([
        0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
    ])
});

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// What started a snapshot (click, logoff, schedule; a click that joined a
/// scheduled snapshot makes it a click's) and how it ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    trigger: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TriggerLabel {
    trigger: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: &'static str,
}

pub struct Metrics {
    registry: Registry,
    snapshots: Family<OutcomeLabel, Counter>,
    layers: Family<SourceLabel, Counter>,
    duration: Family<TriggerLabel, Histogram, fn() -> Histogram>,
    retention: Family<ResultLabel, Counter>,
    logoff: Family<ResultLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("snapshot_sidecar");
        let snapshots = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "snapshots",
            "Snapshot operations finished, by trigger (click, logoff, schedule) and result (done, unchanged: nothing pushed, error)",
            snapshots.clone(),
        );
        let layers = Family::<SourceLabel, Counter>::default();
        registry.register(
            "layers",
            "Snapshot layers pushed, by where they were read (upperdir, diff-service; merge: the user's layers merged above the base)",
            layers.clone(),
        );
        let duration =
            Family::<TriggerLabel, Histogram, fn() -> Histogram>::new_with_constructor(|| {
                Histogram::new([0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0])
            });
        registry.register(
            "snapshot_duration_seconds",
            "Time from the click (or the logoff, or the schedule) to the tag (or the end without one, or the error), by trigger",
            duration.clone(),
        );
        let retention = Family::<ResultLabel, Counter>::default();
        registry.register(
            "retention",
            "Old snapshots retention dealt with, by result (deleted, skipped: no tag annotation, refused: the registry does not delete, once per run; failed)",
            retention.clone(),
        );
        let logoff = Family::<ResultLabel, Counter>::default();
        registry.register(
            "logoff",
            "Snapshots at logoff, by result (done, unchanged: nothing to push, error, timeout: not finished within the grace period, nothing tagged)",
            logoff.clone(),
        );
        registry.register(
            "paused_seconds",
            "How long each pause froze the desktop, from the pause to the end of the resume",
            PAUSED_SECONDS.clone(),
        );
        // Present from the start (at 0): a sidecar counts one logoff at most, and
        // a rate needs the series before its first count to see it.
        for result in ["done", "unchanged", "error", "timeout"] {
            drop(logoff.get_or_create(&ResultLabel { result }));
        }
        for result in ["deleted", "skipped", "refused", "failed"] {
            drop(retention.get_or_create(&ResultLabel { result }));
        }
        Self {
            registry,
            snapshots,
            layers,
            duration,
            retention,
            logoff,
        }
    }
}

impl Metrics {
    /// One operation started by `trigger` ended as `result` (done,
    /// unchanged, error); `source`: where its pushed layer was read.
    pub fn finished(
        &self,
        trigger: &'static str,
        result: &'static str,
        source: Option<&'static str>,
        seconds: f64,
    ) {
        self.snapshots
            .get_or_create(&OutcomeLabel { trigger, result })
            .inc();
        if let Some(source) = source {
            self.layers.get_or_create(&SourceLabel { source }).inc();
        }
        self.duration
            .get_or_create(&TriggerLabel { trigger })
            .observe(seconds);
    }

    /// A logoff snapshot ended as `result` (done, unchanged, error, timeout).
    pub fn logoff(&self, result: &'static str) {
        self.logoff.get_or_create(&ResultLabel { result }).inc();
    }

    /// Retention dealt with old snapshots: `result` is `deleted`, `skipped`,
    /// `refused` or `failed`.
    pub fn retention(&self, result: &'static str, count: u64) {
        if count > 0 {
            self.retention
                .get_or_create(&ResultLabel { result })
                .inc_by(count);
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}
