//! Prometheus metrics of the webhook, served at `/metrics`.

use crate::{decision::Presence, newbase::BaseChange, outcome::Outcome, registry::ErrorKind};
use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabel {
    action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NamespaceLabel {
    object: &'static str,
    answer: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

pub struct Metrics {
    registry: Registry,
    admissions: Family<OutcomeLabel, Counter>,
    registry_errors: Family<KindLabel, Counter>,
    new_base: Family<ActionLabel, Counter>,
    namespace_checks: Family<NamespaceLabel, Counter>,
    pub lookup_seconds: Histogram,
    pub admission_seconds: Histogram,
    /// `--admission-budget`, for alerts on admissions near it.
    pub admission_budget: Gauge<f64, AtomicU64>,
    pub cache_miss: Counter,
    pub cache_coalesced: Counter,
    pub cache_digest_hit: Counter,
    pub cache_manifest_hit: Counter,
}

impl Metrics {
    /// `registry_requests` is the registry client's request counter.
    pub fn new(registry_requests: Counter) -> Self {
        let mut registry = Registry::with_prefix("snapshot_webhook");
        let admissions = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "admissions",
            "Admission requests answered, by outcome",
            admissions.clone(),
        );
        let registry_errors = Family::<KindLabel, Counter>::default();
        registry.register(
            "registry_errors",
            "Registry lookups that failed, by kind",
            registry_errors.clone(),
        );
        // Present from the start, so that the first fail-open answer is an increase.
        drop(admissions.get_or_create(&OutcomeLabel {
            outcome: Outcome::RegistryError.as_str(),
        }));
        let new_base = Family::<ActionLabel, Counter>::default();
        registry.register(
            "new_base",
            "Logins whose pod asked for another base image than their snapshot's, by what was done (kept, rebased, fresh, not_rebased)",
            new_base.clone(),
        );
        let namespace_checks = Family::<NamespaceLabel, Counter>::default();
        registry.register(
            "namespace_checks",
            "Admissions by what the Kubernetes API said of an object the desktop needs in its namespace (object: registry_secret, registry_ca; answer: present, missing, unknown when the API could not say)",
            namespace_checks.clone(),
        );
        let lookup_seconds = Histogram::new([
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ]);
        registry.register(
            "lookup_duration_seconds",
            "Time to ask the registry for a snapshot",
            lookup_seconds.clone(),
        );
        let admission_seconds = Histogram::new([
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 5.0,
        ]);
        registry.register(
            "admission_duration_seconds",
            "Whole admission, from the request's arrival at the webhook to its answer",
            admission_seconds.clone(),
        );
        let admission_budget = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "admission_budget_seconds",
            "The admission budget (--admission-budget): past it an admission is answered fail-open",
            admission_budget.clone(),
        );
        let cache = Family::<KindLabel, Counter>::default();
        registry.register(
            "cache_hits",
            "Lookups answered without a request of their own: joined an in-flight lookup (coalesced), a known digest or a known snapshot manifest",
            cache.clone(),
        );
        let cache_miss = Counter::default();
        registry.register(
            "cache_misses",
            "Lookups that sent their own registry request",
            cache_miss.clone(),
        );
        registry.register(
            "registry_requests",
            "HTTP requests sent to the registry",
            registry_requests,
        );
        let cache_coalesced = cache
            .get_or_create(&KindLabel { kind: "coalesced" })
            .clone();
        let cache_digest_hit = cache.get_or_create(&KindLabel { kind: "digest" }).clone();
        let cache_manifest_hit = cache.get_or_create(&KindLabel { kind: "manifest" }).clone();
        Self {
            registry,
            admissions,
            registry_errors,
            new_base,
            namespace_checks,
            lookup_seconds,
            admission_seconds,
            admission_budget,
            cache_miss,
            cache_coalesced,
            cache_digest_hit,
            cache_manifest_hit,
        }
    }

    pub fn admission(&self, outcome: Outcome) {
        self.admissions
            .get_or_create(&OutcomeLabel {
                outcome: outcome.as_str(),
            })
            .inc();
    }

    pub fn new_base(&self, change: &BaseChange) {
        self.new_base
            .get_or_create(&ActionLabel {
                action: change.as_str(),
            })
            .inc();
    }

    /// What the API said of `object` (`registry_secret`, `registry_ca`) for one admission.
    pub fn namespace_check(&self, object: &'static str, presence: &Presence) {
        let answer = match presence {
            Presence::Present => "present",
            Presence::Missing => "missing",
            Presence::Unknown(_) => "unknown",
        };
        self.namespace_checks
            .get_or_create(&NamespaceLabel { object, answer })
            .inc();
    }

    pub fn registry_error(&self, kind: ErrorKind) {
        self.registry_errors
            .get_or_create(&KindLabel {
                kind: kind.as_str(),
            })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
