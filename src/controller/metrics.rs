//! Controller metrics on `/metrics` (OpenMetrics text): reconciles by kind, errors by kind and label, reconcile
//! duration, flows by condition, and the count of writes (which a resync of unchanged objects keeps at zero).

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    pub kind: String,
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionLabel {
    pub condition: String,
    pub status: String,
}

pub struct Metrics {
    registry: Registry,
    pub reconciles: Family<KindLabel, Counter>,
    pub errors: Family<ErrorLabel, Counter>,
    pub duration: Family<KindLabel, Histogram>,
    pub flows: Family<ConditionLabel, Gauge>,
    pub writes: Counter<u64, AtomicU64>,
    pub status_polls: Family<ErrorLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("meshline_controller");
        let reconciles = Family::<KindLabel, Counter>::default();
        let errors = Family::<ErrorLabel, Counter>::default();
        let duration = Family::<KindLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
            ])
        });
        let flows = Family::<ConditionLabel, Gauge>::default();
        let writes = Counter::default();
        let status_polls = Family::<ErrorLabel, Counter>::default();
        registry.register("reconciles", "Reconciles by kind", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Failed reconciles by kind and error label",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Reconcile duration by kind",
            duration.clone(),
        );
        registry.register("flows", "SyncFlows by condition and status", flows.clone());
        registry.register(
            "writes",
            "Writes to the Kubernetes API (applies, deletes, status)",
            writes.clone(),
        );
        registry.register(
            "status_polls",
            "Worker /status polls by outcome (kind=flow, error=ok or a label)",
            status_polls.clone(),
        );
        Metrics {
            registry,
            reconciles,
            errors,
            duration,
            flows,
            writes,
            status_polls,
        }
    }

    pub fn observe(&self, kind: &str, took: Duration, error: Option<&str>) {
        let k = KindLabel { kind: kind.into() };
        self.reconciles.get_or_create(&k).inc();
        self.duration.get_or_create(&k).observe(took.as_secs_f64());
        if let Some(error) = error {
            self.errors
                .get_or_create(&ErrorLabel {
                    kind: kind.into(),
                    error: error.into(),
                })
                .inc();
        }
    }

    /// Recounts flows by condition from the cache (at scrape time, so it is never stale).
    pub fn count_flows(&self, flows: &[std::sync::Arc<crate::api::SyncFlow>]) {
        self.flows.clear();
        for flow in flows {
            for c in flow.status.iter().flat_map(|s| s.conditions.iter()) {
                self.flows
                    .get_or_create(&ConditionLabel {
                        condition: c.r#type.clone(),
                        status: c.status.clone(),
                    })
                    .inc();
            }
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
