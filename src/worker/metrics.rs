//! The worker's Prometheus metrics. Counters count events seen by this process; the durable totals that
//! survive restarts are on `/status`, computed from the ledger.
//!
//! Every series carries the flow and its namespace as labels (constant labels of the registry), so the
//! workers of many flows scraped by one PodMonitor stay apart in Prometheus and a dashboard or alert can
//! select one flow without knowing its pods.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabel {
    /// The error class label (`transient`, `permanent`, `hold`, `flow_level`, `config`).
    pub class: String,
}

/// Why an approval or rejection of a held record was refused: `unknown_identity`, `not_in_role`,
/// `by_mismatch` or `no_identities` (see [`crate::worker::api::IdentityRefusal`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabel {
    pub reason: String,
}

/// A ticket's kind (`dead_letter`, `hold`, `flow_degraded`, `contract_rejected`, `audit_mismatch`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TicketKindLabel {
    pub kind: String,
}

/// A roster owner id.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OwnerLabel {
    pub owner: String,
}

/// A roster ticket sink's name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TicketSinkLabel {
    pub sink: String,
}

/// Why a record went to the dead letters, coarsened to a bounded label: the first two segments of the
/// ledger's reason key (`contract:required_missing`, `erp:422`, `erp:transient`). The rest of the key (a field
/// path, an attempt count) stays in the ledger, so the label's values are bounded by the contract's reason
/// codes and the ERP's status codes, never by records.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeadLetterReasonLabel {
    pub reason: String,
}

impl DeadLetterReasonLabel {
    pub fn of(reason_key: &str) -> DeadLetterReasonLabel {
        let mut parts = reason_key.splitn(3, ':');
        let label = match (parts.next(), parts.next()) {
            (Some(a), Some(b)) => format!("{a}:{b}"),
            (Some(a), None) => a.to_string(),
            _ => String::new(),
        };
        // A reason key is the code's own word, but an ERP status or code segment could be long: keep the label
        // short so one odd answer cannot make a huge series name.
        DeadLetterReasonLabel {
            reason: label.chars().take(64).collect(),
        }
    }
}

/// The operating model's measures of the flow, read from the ledger at each scrape: the same numbers as
/// `/status` (and so as `SyncFlow.status`), durable across restarts and equal across replicas.
pub struct OperatingMeasures {
    /// Distinct records in the ledger (the denominator of the interventions per 1,000).
    pub records: Gauge,
    /// Approvals, rejections and replays by people, all time.
    pub manual_interventions: Gauge,
    pub manual_interventions_per_1k: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Mean time from a record's first failure to its delivery, over delivered records that failed first.
    pub record_mttr_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// The SLA's failure-rate window (the last hour): record versions received in it, records that failed
    /// for the first time in it, and their ratio (what `maxFailureRate` is compared with).
    pub received_sla_window: Gauge,
    pub failed_sla_window: Gauge,
    pub failure_rate_sla_window: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// The contract's SLA objectives, so a panel or an alert can draw the line without reading the contract
    /// (absent when the contract sets none).
    pub sla_max_failure_rate: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub sla_max_delivery_latency_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
}

/// The ticket gauges, read from the ledger at each scrape (durable, so they agree across replicas and
/// restarts, like `/status`).
pub struct TicketGauges {
    /// Open or acknowledged tickets by kind.
    pub open: Family<TicketKindLabel, Gauge>,
    /// Ticket occurrences given to each owner, all time.
    pub opened: Family<OwnerLabel, Gauge>,
    pub resolved: Family<OwnerLabel, Gauge>,
    /// Mean time to acknowledge / to resolve per owner, in seconds.
    pub time_to_acknowledge: Family<OwnerLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub time_to_resolve: Family<OwnerLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// The flow's own figures, exact over every occurrence (the owners' gauges leave out what nobody was
    /// assigned, and their means cannot be averaged without their counts).
    pub flow_opened: Gauge,
    pub flow_resolved: Gauge,
    pub flow_time_to_acknowledge: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub flow_time_to_resolve: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Deliveries waiting per ticket sink, and 1 while a sink keeps failing.
    pub sink_pending: Family<TicketSinkLabel, Gauge>,
    pub sink_failing: Family<TicketSinkLabel, Gauge>,
}

/// An audit explanation (`held`, `deadLettered`, `inFlight`, `staleRevision`, `filtered`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExplanationLabel {
    pub explanation: String,
}

/// An audited side (`crm`, `erp`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SideLabel {
    pub side: String,
}

/// The last finished reconciliation audit, read from the ledger at each scrape (so every replica reports
/// the same run, and a restart loses nothing). Stable names: the chart's dashboard and alerts query them.
pub struct AuditGauges {
    /// When the last run finished (Unix seconds); absent before the first.
    pub last_run_timestamp_seconds: Gauge,
    pub unexplained_differences: Gauge,
    pub explained_differences: Family<ExplanationLabel, Gauge>,
    /// Deals (crm) and orders (erp) the last run read.
    pub orders: Family<SideLabel, Gauge>,
    /// 1 when the last run could not read a side in full.
    pub partial: Gauge,
    pub duration_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
}

/// Every metric the worker exports.
pub struct Metrics {
    pub registry: Registry,
    /// Every family registered in `registry`, by name and type.
    pub catalogue: crate::metrics::Catalogue,
    pub tickets: TicketGauges,
    pub audit: AuditGauges,
    pub measures: OperatingMeasures,
    /// Dead letters recorded in the ledger by this worker, by coarse reason.
    pub dead_letters: Family<DeadLetterReasonLabel, Counter>,
    pub received: Counter,
    pub duplicates: Counter,
    /// Late revisions refused as older than the stored one (by the contract's ordering field).
    pub stale: Counter,
    /// Ledger transactions the intake wrote (one per group of concurrent batches).
    pub intake_commits: Counter,
    /// Records leased to this worker as they were stored, skipping a claim.
    pub intake_leased: Counter,
    pub delivered: Counter,
    pub failed: Family<ClassLabel, Counter>,
    pub retried: Counter,
    pub dead_lettered: Counter,
    pub held: Counter,
    pub delivery_seconds: Histogram,
    /// Records per batch request (sinks that take batches).
    pub batch_records: Histogram,
    /// Batches the sink refused as a whole and that were split in two to find the record at fault.
    pub batch_splits: Counter,
    pub in_flight: Gauge,
    pub queue_depth: Gauge,
    pub oldest_pending_seconds: Gauge,
    pub breaker_open: Gauge,
    /// 1 while intake is refused because the ledger's volume is below its free-space reserve.
    pub disk_pressure: Gauge,
    /// Free bytes on the ledger's volume at the last reading (embedded ledger only).
    pub ledger_free_bytes: Gauge,
    /// Dead letters purged after the flow's `deadLetterRetention` (a purge is no intervention and leaves no
    /// lineage, so this is where it shows).
    pub dead_letters_purged: Counter,
    /// Delivered records reduced to their compact row after the delivered retention.
    pub payloads_purged: Counter,
    /// The canary weight of the rollout split this worker applies (0 without a canary).
    pub rollout_weight: Gauge,
    /// How many of the 100 buckets this worker claims right now.
    pub claimed_buckets: Gauge,
    /// Approvals and rejections of held records refused, by why (who asked is in the log, never here).
    pub approvals_refused: Family<RefusalLabel, Counter>,
}

/// The label names every worker series carries.
pub const FLOW_LABEL: &str = "flow";
pub const NAMESPACE_LABEL: &str = "namespace";
/// The prefix of every worker metric.
pub const PREFIX: &str = "meshline";

impl Metrics {
    /// The metrics of the worker of flow `flow` in namespace `namespace`.
    pub fn new(namespace: &str, flow: &str) -> Metrics {
        let mut catalogue = crate::metrics::Catalogue::default();
        let mut registry = Registry::with_prefix_and_labels(
            PREFIX,
            [
                (NAMESPACE_LABEL.into(), namespace.to_string().into()),
                (FLOW_LABEL.into(), flow.to_string().into()),
            ]
            .into_iter(),
        );
        let received = Counter::default();
        let duplicates = Counter::default();
        let stale = Counter::default();
        let intake_commits = Counter::default();
        let intake_leased = Counter::default();
        let delivered = Counter::default();
        let failed = Family::<ClassLabel, Counter>::default();
        let retried = Counter::default();
        let dead_lettered = Counter::default();
        let held = Counter::default();
        let delivery_seconds = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ]);
        let batch_records =
            Histogram::new([1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0]);
        let batch_splits = Counter::default();
        let in_flight = Gauge::default();
        let queue_depth = Gauge::default();
        let oldest_pending_seconds = Gauge::default();
        let breaker_open = Gauge::default();
        let disk_pressure = Gauge::default();
        let ledger_free_bytes = Gauge::default();
        let dead_letters_purged = Counter::default();
        let payloads_purged = Counter::default();
        let rollout_weight = Gauge::default();
        let claimed_buckets = Gauge::default();
        let approvals_refused = Family::<RefusalLabel, Counter>::default();
        let tickets = TicketGauges {
            open: Default::default(),
            opened: Default::default(),
            resolved: Default::default(),
            time_to_acknowledge: Default::default(),
            time_to_resolve: Default::default(),
            flow_opened: Default::default(),
            flow_resolved: Default::default(),
            flow_time_to_acknowledge: Default::default(),
            flow_time_to_resolve: Default::default(),
            sink_pending: Default::default(),
            sink_failing: Default::default(),
        };
        let audit = AuditGauges {
            last_run_timestamp_seconds: Default::default(),
            unexplained_differences: Default::default(),
            explained_differences: Default::default(),
            orders: Default::default(),
            partial: Default::default(),
            duration_seconds: Default::default(),
        };
        catalogue.register(
            &mut registry,
            PREFIX,
            "audit_last_run_timestamp_seconds",
            "When the flow's last reconciliation audit finished, in Unix seconds",
            audit.last_run_timestamp_seconds.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "audit_unexplained_differences",
            "Differences between CRM and ERP the ledger does not explain, in the last audit",
            audit.unexplained_differences.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "audit_explained_differences",
            "Differences between CRM and ERP the ledger explains, in the last audit, by explanation",
            audit.explained_differences.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "audit_orders",
            "Deals (crm) and orders (erp) the last audit read, by side",
            audit.orders.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "audit_partial",
            "1 when the last audit could not read a side in full (its result claims nothing reconciled)",
            audit.partial.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "audit_duration_seconds",
            "How long the last audit ran, from start to finish",
            audit.duration_seconds.clone(),
        );
        let measures = OperatingMeasures {
            records: Default::default(),
            manual_interventions: Default::default(),
            manual_interventions_per_1k: Default::default(),
            record_mttr_seconds: Default::default(),
            received_sla_window: Default::default(),
            failed_sla_window: Default::default(),
            failure_rate_sla_window: Default::default(),
            sla_max_failure_rate: Default::default(),
            sla_max_delivery_latency_seconds: Default::default(),
        };
        let dead_letters = Family::<DeadLetterReasonLabel, Counter>::default();
        catalogue.register(
            &mut registry,
            PREFIX,
            "flow_records",
            "Distinct records in the flow's ledger (from the ledger)",
            measures.records.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "flow_manual_interventions",
            "Approvals, rejections and replays by people, all time (from the ledger)",
            measures.manual_interventions.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "flow_manual_interventions_per_1k",
            "Manual interventions per 1,000 records in the ledger",
            measures.manual_interventions_per_1k.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "flow_record_mttr_seconds",
            "Mean time from a record's first failure to its delivery, over delivered records that failed first",
            measures.record_mttr_seconds.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "flow_received_sla_window",
            "Record versions received in the SLA's failure-rate window (the last hour)",
            measures.received_sla_window.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "flow_failed_sla_window",
            "Records that failed for the first time in the SLA's failure-rate window (the last hour)",
            measures.failed_sla_window.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "flow_failure_rate_sla_window",
            "Failed over received in the SLA's failure-rate window (the last hour, at most 1): what the contract's maxFailureRate is checked against",
            measures.failure_rate_sla_window.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "sla_max_failure_rate",
            "The contract's SLA maxFailureRate (absent when the contract sets none)",
            measures.sla_max_failure_rate.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "sla_max_delivery_latency_seconds",
            "The contract's SLA maxDeliveryLatency in seconds (absent when the contract sets none)",
            measures.sla_max_delivery_latency_seconds.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "dead_letters",
            "Dead letters recorded in the ledger by this worker, by reason (the reason key's first two segments)",
            dead_letters.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "tickets_open",
            "Open or acknowledged tickets of the flow, by kind",
            tickets.open.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "tickets_opened",
            "Ticket occurrences given to each owner, all time (from the ledger)",
            tickets.opened.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "tickets_resolved",
            "Ticket occurrences resolved while with each owner, all time (from the ledger)",
            tickets.resolved.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "ticket_time_to_acknowledge_seconds",
            "Mean time from a ticket opening to its acknowledgement by a named owner, per owner",
            tickets.time_to_acknowledge.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "ticket_time_to_resolve_seconds",
            "Mean time from a ticket opening to its cause clearing, per owner",
            tickets.time_to_resolve.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "flow_tickets_opened",
            "Ticket occurrences of the flow, all time, whoever had them (from the ledger)",
            tickets.flow_opened.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "flow_tickets_resolved",
            "Ticket occurrences of the flow resolved, all time, whoever had them (from the ledger)",
            tickets.flow_resolved.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "flow_ticket_time_to_acknowledge_seconds",
            "Mean time from a ticket opening to its acknowledgement, over every acknowledged occurrence of the flow",
            tickets.flow_time_to_acknowledge.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "flow_ticket_time_to_resolve_seconds",
            "Mean time from a ticket opening to its cause clearing, over every resolved occurrence of the flow",
            tickets.flow_time_to_resolve.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "ticket_deliveries_pending",
            "Ticket versions waiting in the outbox for each ticket sink",
            tickets.sink_pending.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "ticket_sink_failing",
            "1 while a ticket sink keeps refusing or failing deliveries (its tickets wait in the outbox)",
            tickets.sink_failing.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "records_received",
            "Records stored in the ledger (new or changed)",
            received.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "records_duplicate",
            "Deliveries of a record already in the ledger",
            duplicates.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "records_stale",
            "Late revisions older than the stored one by the contract's ordering field; never delivered",
            stale.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "intake_commits",
            "Ledger transactions written by the intake; received records divided by this is the group size",
            intake_commits.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "intake_leased",
            "Records leased to this worker in the transaction that stored them, so they skip a claim",
            intake_leased.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "records_delivered",
            "Records the ERP confirmed",
            delivered.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "records_failed",
            "Failed processing or delivery attempts, by error class",
            failed.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "records_retried",
            "Retries scheduled",
            retried.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "records_dead_lettered",
            "Records sent to the dead letters",
            dead_lettered.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "records_held",
            "Records held for approval",
            held.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "delivery_duration_seconds",
            "Time the ERP took to answer a delivery request (one record, or one batch)",
            delivery_seconds.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "delivery_batch_records",
            "Records per delivery request to a sink that takes batches",
            batch_records.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "delivery_batch_splits",
            "Batches the ERP refused as a whole, split in two to find the record at fault",
            batch_splits.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "deliveries_in_flight",
            "Requests to the ERP in flight",
            in_flight.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "queue_depth",
            "Records waiting in the ledger (received, validated, retrying, delivering)",
            queue_depth.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "oldest_pending_age_seconds",
            "Age of the oldest record not yet delivered",
            oldest_pending_seconds.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "circuit_breaker_open",
            "1 while deliveries are paused by a flow-level failure",
            breaker_open.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "disk_pressure",
            "1 while intake is refused because the ledger's volume is below its free-space reserve",
            disk_pressure.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "ledger_volume_free_bytes",
            "Free bytes on the embedded ledger's volume at the last reading",
            ledger_free_bytes.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "dead_letters_purged",
            "Dead letters purged after the flow's deadLetterRetention",
            dead_letters_purged.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "delivered_payloads_purged",
            "Delivered records whose payload, snapshots and lineage were purged after the delivered retention",
            payloads_purged.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "rollout_canary_weight",
            "Canary weight (percent of buckets) of the rollout split this worker applies",
            rollout_weight.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "claimed_buckets",
            "Record buckets (of 100) this worker claims under the split it applies",
            claimed_buckets.clone(),
        );
        catalogue.register(
            &mut registry,
            PREFIX,
            "approvals_refused",
            "Approvals or rejections of held records refused: no identity, an unknown one, another owner's name, or an owner outside the hold's approver role",
            approvals_refused.clone(),
        );
        Metrics {
            registry,
            catalogue,
            tickets,
            audit,
            measures,
            dead_letters,
            received,
            duplicates,
            stale,
            intake_commits,
            intake_leased,
            delivered,
            failed,
            retried,
            dead_lettered,
            held,
            delivery_seconds,
            batch_records,
            batch_splits,
            in_flight,
            queue_depth,
            oldest_pending_seconds,
            breaker_open,
            disk_pressure,
            ledger_free_bytes,
            dead_letters_purged,
            payloads_purged,
            rollout_weight,
            claimed_buckets,
            approvals_refused,
        }
    }

    pub fn fail(&self, class: crate::api::ErrorClass) {
        self.failed
            .get_or_create(&ClassLabel {
                class: class.label().to_string(),
            })
            .inc();
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_reason_label_keeps_the_key_to_its_bounded_part() {
        let of = |key: &str| DeadLetterReasonLabel::of(key).reason;
        // The field path and the attempt count stay in the ledger, out of the series.
        assert_eq!(
            of("contract:required_missing:field:amount"),
            "contract:required_missing"
        );
        assert_eq!(
            of("erp:transient:gave_up_after_8_attempts"),
            "erp:transient"
        );
        assert_eq!(of("erp:422"), "erp:422");
        assert_eq!(of("contract:rejected"), "contract:rejected");
        assert_eq!(of("poison"), "poison");
        assert_eq!(of(&format!("erp:{}", "x".repeat(200))).chars().count(), 64);
    }

    #[test]
    fn a_dead_letter_is_counted_by_its_reason_with_the_flow_labels() {
        let m = Metrics::new("revenue-sync", "closed-won-to-netsuite");
        for key in [
            "erp:422",
            "erp:422",
            "contract:required_missing:field:amount",
        ] {
            m.dead_letters
                .get_or_create(&DeadLetterReasonLabel::of(key))
                .inc();
        }
        let out = m.encode();
        assert!(out.contains(
            r#"meshline_dead_letters_total{namespace="revenue-sync",flow="closed-won-to-netsuite",reason="erp:422"} 2"#
        ), "{out}");
        assert!(
            out.contains(r#"reason="contract:required_missing"} 1"#),
            "{out}"
        );
    }
}
