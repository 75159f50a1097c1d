//! Prometheus metrics of the sidecar, served at `/metrics`.

use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

pub struct Metrics {
    registry: Registry,
    snapshots: Family<ResultLabel, Counter>,
    pub duration: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("snapshot_sidecar");
        let snapshots = Family::<ResultLabel, Counter>::default();
        registry.register(
            "snapshots",
            "Snapshot operations finished, by result (done, error)",
            snapshots.clone(),
        );
        let duration = Histogram::new([0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0]);
        registry.register(
            "snapshot_duration_seconds",
            "Time from the click to the tag (or the error)",
            duration.clone(),
        );
        Self {
            registry,
            snapshots,
            duration,
        }
    }
}

impl Metrics {
    pub fn finished(&self, ok: bool, seconds: f64) {
        self.snapshots
            .get_or_create(&ResultLabel {
                result: if ok { "done" } else { "error" },
            })
            .inc();
        self.duration.observe(seconds);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}
