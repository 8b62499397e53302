//! Controller metrics on `/metrics` (OpenMetrics text): reconciles by kind, errors by kind and label, reconcile
//! duration, flows by condition, and the count of writes (which a resync of unchanged objects keeps at zero).
//!
//! It also owns the per-flow measures only the controller sees (`meshline_flow_*{namespace,flow}`): SLA
//! breaches judged over the worker's numbers and the contract's SLA, the time from a contract change to its
//! promotion or rollback, the canary's progress and the last reconciliation audit. Their labels are the flow's
//! name and namespace and words from closed sets (a breach reason, an outcome, a phase, an explanation), never
//! a record id. The gauges are rebuilt from the cache at each scrape, so a deleted flow's series disappear.

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

/// A flow, as the per-flow series name it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct FlowLabel {
    pub namespace: String,
    pub flow: String,
}

/// A flow and an SLA breach reason (`FailureRateOverSla`, `DeliveryLatencyOverSla`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SlaBreachLabel {
    pub namespace: String,
    pub flow: String,
    pub reason: String,
}

/// A flow and how a contract change on it ended: `promoted` or `rolled_back`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RolloutOutcomeLabel {
    pub namespace: String,
    pub flow: String,
    pub outcome: String,
}

/// A flow and its canary's phase (`Progressing`, `Paused`, `Promoting`, `Promoted`, `Aborting`, `Aborted`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CanaryPhaseLabel {
    pub namespace: String,
    pub flow: String,
    pub phase: String,
}

/// A flow and an audit explanation (`held`, `dead_lettered`, `in_flight`, ...: the audit's closed set).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuditExplanationLabel {
    pub namespace: String,
    pub flow: String,
    pub explanation: String,
}

/// The SLA breach reasons [`crate::controller::flow::status::sla_breaches`] can give; a gauge is kept for each
/// (0 or 1) so an alert sees a breach end as well as begin.
pub const SLA_BREACH_REASONS: [&str; 2] = ["FailureRateOverSla", "DeliveryLatencyOverSla"];

/// How a contract change on a flow ended, as [`rollout_ended`] reads it from the canary's phase.
pub const ROLLOUT_OUTCOMES: [&str; 2] = ["promoted", "rolled_back"];

/// The per-flow series (see the module doc).
pub struct FlowMeasures {
    pub sla_breached: Family<SlaBreachLabel, Gauge>,
    pub sla_breaches: Family<SlaBreachLabel, Counter>,
    pub contract_change_seconds: Family<RolloutOutcomeLabel, Histogram>,
    pub contract_change_last_seconds: Family<RolloutOutcomeLabel, Gauge<f64, AtomicU64>>,
    pub canary_phase: Family<CanaryPhaseLabel, Gauge>,
    pub canary_step: Family<FlowLabel, Gauge>,
    pub canary_weight: Family<FlowLabel, Gauge>,
    pub canary_applied_weight: Family<FlowLabel, Gauge>,
    pub canary_failed_measurements: Family<FlowLabel, Gauge>,
    pub canary_passed_measurements: Family<FlowLabel, Gauge>,
    pub audit_last_run: Family<FlowLabel, Gauge<f64, AtomicU64>>,
    pub audit_unexplained: Family<FlowLabel, Gauge>,
    pub audit_explained: Family<AuditExplanationLabel, Gauge>,
    pub audit_matched: Family<FlowLabel, Gauge>,
    pub audit_partial: Family<FlowLabel, Gauge>,
    /// The breaches each flow had at its last reconcile, so a breach is counted once when it begins.
    breaching: std::sync::Mutex<std::collections::BTreeMap<FlowLabel, Vec<&'static str>>>,
}

/// The outcome of a contract change that ended between two canary statuses: `promoted` when the phase
/// became `Promoted`, `rolled_back` when it became `Aborted`; `None` otherwise (also when it already was).
pub fn rollout_ended(
    before: Option<&crate::api::CanaryStatus>,
    after: Option<&crate::api::CanaryStatus>,
) -> Option<&'static str> {
    let after = after?;
    let outcome = match after.phase.as_str() {
        "Promoted" => ROLLOUT_OUTCOMES[0],
        "Aborted" => ROLLOUT_OUTCOMES[1],
        _ => return None,
    };
    let same_rollout_already_ended =
        before.is_some_and(|b| b.revision == after.revision && b.phase == after.phase);
    (!same_rollout_already_ended).then_some(outcome)
}

pub struct Metrics {
    registry: Registry,
    /// Every family registered in `registry`, by name and type.
    pub catalogue: crate::metrics::Catalogue,
    pub flow: FlowMeasures,
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
        let mut catalogue = crate::metrics::Catalogue::default();
        let mut root = Registry::default();
        let flow = FlowMeasures {
            sla_breached: Default::default(),
            sla_breaches: Default::default(),
            contract_change_seconds: Family::new_with_constructor(|| {
                // From minutes (a canary of two short steps) to a week (sign-offs that waited).
                Histogram::new([
                    60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0, 43200.0, 86400.0,
                    172800.0, 604800.0,
                ])
            }),
            contract_change_last_seconds: Default::default(),
            canary_phase: Default::default(),
            canary_step: Default::default(),
            canary_weight: Default::default(),
            canary_applied_weight: Default::default(),
            canary_failed_measurements: Default::default(),
            canary_passed_measurements: Default::default(),
            audit_last_run: Default::default(),
            audit_unexplained: Default::default(),
            audit_explained: Default::default(),
            audit_matched: Default::default(),
            audit_partial: Default::default(),
            breaching: Default::default(),
        };
        {
            let r = root.sub_registry_with_prefix("meshline_flow");
            catalogue.register(
                r,
                "meshline_flow",
                "sla_breached",
                "1 while the flow breaches its contract's SLA for the reason, 0 otherwise",
                flow.sla_breached.clone(),
            );
            catalogue.register(
                r,
                "meshline_flow",
                "sla_breaches",
                "SLA breaches of the flow that began, by reason",
                flow.sla_breaches.clone(),
            );
            catalogue.register(
                r,
                "meshline_flow",
                "contract_change_duration_seconds",
                "Time from a contract change (its revision's creation) to its promotion or rollback on the flow",
                flow.contract_change_seconds.clone(),
            );
            catalogue.register(
                r,
                "meshline_flow",
                "contract_change_last_duration_seconds",
                "The last contract change's time to promotion or rollback on the flow, by outcome",
                flow.contract_change_last_seconds.clone(),
            );
            catalogue.register(
                r,
                "meshline_flow",
                "canary_phase",
                "1 for the phase the flow's canary rollout is in",
                flow.canary_phase.clone(),
            );
            catalogue.register(
                r,
                "meshline_flow",
                "canary_step",
                "Index of the canary's current step",
                flow.canary_step.clone(),
            );
            catalogue.register(
                r,
                "meshline_flow",
                "canary_weight",
                "Bucket weight (percent) the canary track is asked to take",
                flow.canary_weight.clone(),
            );
            catalogue.register(
                r,
                "meshline_flow",
                "canary_applied_weight",
                "Bucket weight every worker of both tracks reports applying",
                flow.canary_applied_weight.clone(),
            );
            catalogue.register(
                r,
                "meshline_flow",
                "canary_failed_measurements",
                "Failed analysis measurements in the current rollout",
                flow.canary_failed_measurements.clone(),
            );
            catalogue.register(
                r,
                "meshline_flow",
                "canary_passed_measurements",
                "Passed analysis measurements at the current step",
                flow.canary_passed_measurements.clone(),
            );
            catalogue.register(
                r,
                "meshline_flow",
                "audit_last_run_timestamp_seconds",
                "When the flow's last reconciliation audit finished (Unix seconds)",
                flow.audit_last_run.clone(),
            );
            catalogue.register(
                r,
                "meshline_flow",
                "audit_unexplained",
                "Differences the flow's last audit could not explain from the ledger",
                flow.audit_unexplained.clone(),
            );
            catalogue.register(
                r,
                "meshline_flow",
                "audit_explained",
                "Differences the flow's last audit explained, by explanation",
                flow.audit_explained.clone(),
            );
            catalogue.register(
                r,
                "meshline_flow",
                "audit_matched",
                "Orders the flow's last audit matched on both sides",
                flow.audit_matched.clone(),
            );
            catalogue.register(
                r,
                "meshline_flow",
                "audit_partial",
                "1 when the flow's last audit could not read a side in full",
                flow.audit_partial.clone(),
            );
        }
        let registry = root.sub_registry_with_prefix("meshline_controller");
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
        catalogue.register(
            registry,
            "meshline_controller",
            "reconciles",
            "Reconciles by kind",
            reconciles.clone(),
        );
        catalogue.register(
            registry,
            "meshline_controller",
            "reconcile_errors",
            "Failed reconciles by kind and error label",
            errors.clone(),
        );
        catalogue.register(
            registry,
            "meshline_controller",
            "reconcile_duration_seconds",
            "Reconcile duration by kind",
            duration.clone(),
        );
        catalogue.register(
            registry,
            "meshline_controller",
            "flows",
            "SyncFlows by condition and status",
            flows.clone(),
        );
        catalogue.register(
            registry,
            "meshline_controller",
            "writes",
            "Writes to the Kubernetes API (applies, deletes, status)",
            writes.clone(),
        );
        catalogue.register(
            registry,
            "meshline_controller",
            "status_polls",
            "Worker /status polls by outcome (kind=flow, error=ok or a label)",
            status_polls.clone(),
        );
        Metrics {
            registry: root,
            catalogue,
            flow,
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

    /// Records the SLA breaches the flow's last reconcile found: the gauge of each reason, and one count more
    /// for each breach that began since the previous reconcile.
    pub fn record_sla(&self, flow: FlowLabel, breaches: &[&str]) {
        let now: Vec<&'static str> = SLA_BREACH_REASONS
            .into_iter()
            .filter(|r| breaches.contains(r))
            .collect();
        let mut breaching = self
            .flow
            .breaching
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let before = breaching.get(&flow).cloned().unwrap_or_default();
        for reason in SLA_BREACH_REASONS {
            let label = SlaBreachLabel {
                namespace: flow.namespace.clone(),
                flow: flow.flow.clone(),
                reason: reason.into(),
            };
            let on = now.contains(&reason);
            self.flow
                .sla_breached
                .get_or_create(&label)
                .set(i64::from(on));
            // Touched at 0 too, so `increase()` sees the first breach as an increase from 0.
            let counter = self.flow.sla_breaches.get_or_create(&label);
            if on && !before.contains(&reason) {
                counter.inc();
            }
        }
        breaching.insert(flow, now);
    }

    /// Records a contract change that ended on a flow (see [`rollout_ended`]) after `took`.
    pub fn record_rollout_end(&self, flow: &FlowLabel, outcome: &str, took: Duration) {
        let label = RolloutOutcomeLabel {
            namespace: flow.namespace.clone(),
            flow: flow.flow.clone(),
            outcome: outcome.into(),
        };
        let seconds = took.as_secs_f64();
        self.flow
            .contract_change_seconds
            .get_or_create(&label)
            .observe(seconds);
        self.flow
            .contract_change_last_seconds
            .get_or_create(&label)
            .set(seconds);
    }

    /// Rebuilds the per-flow gauges from the flows' statuses in the cache, and forgets the SLA state of
    /// flows no longer there.
    fn refresh_flow_measures(&self, flows: &[std::sync::Arc<crate::api::SyncFlow>]) {
        let f = &self.flow;
        f.canary_phase.clear();
        f.canary_step.clear();
        f.canary_weight.clear();
        f.canary_applied_weight.clear();
        f.canary_failed_measurements.clear();
        f.canary_passed_measurements.clear();
        f.audit_last_run.clear();
        f.audit_unexplained.clear();
        f.audit_explained.clear();
        f.audit_matched.clear();
        f.audit_partial.clear();
        let mut present = std::collections::BTreeSet::new();
        for flow in flows {
            let label = FlowLabel {
                namespace: flow.metadata.namespace.clone().unwrap_or_default(),
                flow: flow.metadata.name.clone().unwrap_or_default(),
            };
            present.insert(label.clone());
            let Some(status) = flow.status.as_ref() else {
                continue;
            };
            if let Some(c) = &status.canary {
                f.canary_phase
                    .get_or_create(&CanaryPhaseLabel {
                        namespace: label.namespace.clone(),
                        flow: label.flow.clone(),
                        phase: c.phase.clone(),
                    })
                    .set(1);
                f.canary_step.get_or_create(&label).set(i64::from(c.step));
                f.canary_weight
                    .get_or_create(&label)
                    .set(i64::from(c.weight));
                f.canary_applied_weight
                    .get_or_create(&label)
                    .set(i64::from(c.applied_weight));
                f.canary_failed_measurements
                    .get_or_create(&label)
                    .set(i64::from(c.failed_measurements));
                f.canary_passed_measurements
                    .get_or_create(&label)
                    .set(i64::from(c.passed_measurements));
            }
            if let Some(a) = &status.audit {
                // A run still going has no finish time: the last run's gauge waits for its end.
                if let Some(at) = a
                    .finished_at
                    .as_deref()
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                {
                    f.audit_last_run
                        .get_or_create(&label)
                        .set(at.timestamp_millis() as f64 / 1000.0);
                }
                f.audit_unexplained.get_or_create(&label).set(a.unexplained);
                f.audit_matched.get_or_create(&label).set(a.matched);
                f.audit_partial.get_or_create(&label).set(i64::from(
                    a.outcome == Some(crate::api::AuditOutcome::Partial),
                ));
                for (explanation, n) in &a.explained {
                    f.audit_explained
                        .get_or_create(&AuditExplanationLabel {
                            namespace: label.namespace.clone(),
                            flow: label.flow.clone(),
                            explanation: explanation.clone(),
                        })
                        .set(*n);
                }
            }
        }
        let mut breaching = f.breaching.lock().unwrap_or_else(|e| e.into_inner());
        breaching.retain(|flow, _| {
            let keep = present.contains(flow);
            if !keep {
                for reason in SLA_BREACH_REASONS {
                    let label = SlaBreachLabel {
                        namespace: flow.namespace.clone(),
                        flow: flow.flow.clone(),
                        reason: reason.into(),
                    };
                    f.sla_breached.remove(&label);
                    f.sla_breaches.remove(&label);
                }
            }
            keep
        });
    }

    /// Recounts flows by condition from the cache (at scrape time, so it is never stale), and rebuilds the
    /// per-flow gauges from their statuses.
    pub fn count_flows(&self, flows: &[std::sync::Arc<crate::api::SyncFlow>]) {
        self.refresh_flow_measures(flows);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{AuditOutcome, CanaryStatus, FlowAuditStatus, SyncFlow, SyncFlowStatus};
    use std::sync::Arc;

    fn label(flow: &str) -> FlowLabel {
        FlowLabel {
            namespace: "revenue-sync".into(),
            flow: flow.into(),
        }
    }

    fn breach(flow: &str, reason: &str) -> SlaBreachLabel {
        SlaBreachLabel {
            namespace: "revenue-sync".into(),
            flow: flow.into(),
            reason: reason.into(),
        }
    }

    fn flow(name: &str, status: SyncFlowStatus) -> Arc<SyncFlow> {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/salesforce-netsuite/flow.yaml"
        ))
        .expect("the example flow");
        let mut f: SyncFlow = serde_yaml::from_str(&text).expect("a SyncFlow");
        f.metadata.name = Some(name.into());
        f.metadata.namespace = Some("revenue-sync".into());
        f.status = Some(status);
        Arc::new(f)
    }

    fn canary(phase: &str, revision: &str) -> CanaryStatus {
        CanaryStatus {
            revision: revision.into(),
            version: "1.1.0".into(),
            phase: phase.into(),
            ..Default::default()
        }
    }

    #[test]
    fn an_sla_breach_counts_once_when_it_begins_and_its_gauge_follows_it() {
        let m = Metrics::new();
        let rate = breach("a", "FailureRateOverSla");
        let latency = breach("a", "DeliveryLatencyOverSla");
        m.record_sla(label("a"), &["FailureRateOverSla"]);
        m.record_sla(label("a"), &["FailureRateOverSla"]);
        assert_eq!(m.flow.sla_breached.get_or_create(&rate).get(), 1);
        assert_eq!(m.flow.sla_breaches.get_or_create(&rate).get(), 1);
        // The other reason is exported at 0, so an alert sees it clear and `increase()` sees it begin.
        assert_eq!(m.flow.sla_breached.get_or_create(&latency).get(), 0);
        assert!(m.encode().contains(
            r#"meshline_flow_sla_breaches_total{namespace="revenue-sync",flow="a",reason="DeliveryLatencyOverSla"} 0"#
        ));
        m.record_sla(label("a"), &[]);
        assert_eq!(m.flow.sla_breached.get_or_create(&rate).get(), 0);
        m.record_sla(
            label("a"),
            &["FailureRateOverSla", "DeliveryLatencyOverSla"],
        );
        assert_eq!(m.flow.sla_breaches.get_or_create(&rate).get(), 2);
        assert_eq!(m.flow.sla_breaches.get_or_create(&latency).get(), 1);
        // Another flow's breaches are its own.
        assert_eq!(
            m.flow
                .sla_breaches
                .get_or_create(&breach("b", "FailureRateOverSla"))
                .get(),
            0
        );
    }

    #[test]
    fn a_reason_outside_the_known_set_makes_no_series() {
        let m = Metrics::new();
        m.record_sla(label("a"), &["SomethingNew"]);
        assert!(!m.encode().contains("SomethingNew"));
    }

    #[test]
    fn a_deleted_flows_series_go_at_the_next_scrape() {
        let m = Metrics::new();
        m.record_sla(label("gone"), &["FailureRateOverSla"]);
        m.record_sla(label("kept"), &["FailureRateOverSla"]);
        m.count_flows(&[flow("kept", SyncFlowStatus::default())]);
        let out = m.encode();
        assert!(!out.contains(r#"flow="gone""#), "{out}");
        assert!(out.contains(
            r#"meshline_flow_sla_breached{namespace="revenue-sync",flow="kept",reason="FailureRateOverSla"} 1"#
        ));
    }

    #[test]
    fn a_rollout_ends_once_promoted_or_rolled_back() {
        let progressing = canary("Progressing", "orders-2");
        let promoted = canary("Promoted", "orders-2");
        let aborted = canary("Aborted", "orders-2");
        assert_eq!(
            rollout_ended(Some(&progressing), Some(&promoted)),
            Some("promoted")
        );
        assert_eq!(
            rollout_ended(Some(&canary("Aborting", "orders-2")), Some(&aborted)),
            Some("rolled_back")
        );
        assert_eq!(rollout_ended(None, Some(&promoted)), Some("promoted"));
        // Already ended: a later reconcile of the same status counts nothing.
        assert_eq!(rollout_ended(Some(&promoted), Some(&promoted)), None);
        assert_eq!(rollout_ended(Some(&progressing), Some(&progressing)), None);
        assert_eq!(rollout_ended(Some(&promoted), None), None);
        // The next revision's rollout ends on its own.
        assert_eq!(
            rollout_ended(Some(&promoted), Some(&canary("Promoted", "orders-3"))),
            Some("promoted")
        );
    }

    #[test]
    fn a_rollout_end_is_observed_by_outcome() {
        let m = Metrics::new();
        m.record_rollout_end(&label("a"), "promoted", Duration::from_secs(5400));
        let out = m.encode();
        assert!(out.contains(
            r#"meshline_flow_contract_change_last_duration_seconds{namespace="revenue-sync",flow="a",outcome="promoted"} 5400.0"#
        ), "{out}");
        assert!(out.contains(
            r#"meshline_flow_contract_change_duration_seconds_count{namespace="revenue-sync",flow="a",outcome="promoted"} 1"#
        ), "{out}");
    }

    #[test]
    fn canary_progress_and_the_last_audit_come_from_the_flow_status() {
        let m = Metrics::new();
        let mut c = canary("Progressing", "orders-2");
        c.step = 1;
        c.weight = 25;
        c.applied_weight = 10;
        c.failed_measurements = 1;
        let audit = FlowAuditStatus {
            outcome: Some(AuditOutcome::Partial),
            finished_at: Some("2026-12-01T02:00:00Z".into()),
            unexplained: 3,
            matched: 97,
            explained: [("held".to_string(), 2)].into_iter().collect(),
            ..Default::default()
        };
        let status = SyncFlowStatus {
            canary: Some(c),
            audit: Some(audit),
            ..Default::default()
        };
        m.count_flows(&[flow("a", status)]);
        let out = m.encode();
        for line in [
            r#"meshline_flow_canary_phase{namespace="revenue-sync",flow="a",phase="Progressing"} 1"#,
            r#"meshline_flow_canary_step{namespace="revenue-sync",flow="a"} 1"#,
            r#"meshline_flow_canary_weight{namespace="revenue-sync",flow="a"} 25"#,
            r#"meshline_flow_canary_applied_weight{namespace="revenue-sync",flow="a"} 10"#,
            r#"meshline_flow_canary_failed_measurements{namespace="revenue-sync",flow="a"} 1"#,
            r#"meshline_flow_audit_unexplained{namespace="revenue-sync",flow="a"} 3"#,
            r#"meshline_flow_audit_matched{namespace="revenue-sync",flow="a"} 97"#,
            r#"meshline_flow_audit_partial{namespace="revenue-sync",flow="a"} 1"#,
            r#"meshline_flow_audit_explained{namespace="revenue-sync",flow="a",explanation="held"} 2"#,
            r#"meshline_flow_audit_last_run_timestamp_seconds{namespace="revenue-sync",flow="a"} 1796090400.0"#,
        ] {
            assert!(out.contains(line), "missing {line} in\n{out}");
        }
        // The canary ends and the flow goes: its series go with them.
        m.count_flows(&[]);
        assert!(!m.encode().contains(r#"flow="a""#));
    }
}
