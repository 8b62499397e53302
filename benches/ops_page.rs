//! The operations page's main view with 1,000 flows (issue #17, target ≤ 50 ms per render): every flow with
//! three conditions, counters, a canary in progress, a last audit with totals in two currencies and open
//! tickets, rendered by the same pure function the page's `/` route calls (no server, no backend: the
//! figure is the HTML's cost, which is what grows with the number of flows).
//!
//!   cargo bench --bench ops_page

use criterion::{Criterion, criterion_group, criterion_main};
use meshline::api::{
    AuditOutcome, AuditSideSummary, CanaryStatus, Condition, FlowAuditStatus, OpenTicket, SyncFlow,
    TicketSummary,
};

const FLOWS: usize = 1000;

fn flows() -> Vec<SyncFlow> {
    let text = std::fs::read_to_string(format!(
        "{}/examples/salesforce-netsuite/flow.yaml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let template: SyncFlow = serde_yaml::from_str(&text).unwrap();
    (0..FLOWS)
        .map(|i| {
            let mut flow = template.clone();
            flow.metadata.name = Some(format!("closed-won-{i:04}"));
            let status = flow.status.get_or_insert_with(Default::default);
            for (kind, value) in [
                ("Ready", "True"),
                ("Degraded", "False"),
                ("Progressing", "True"),
            ] {
                status.conditions.push(Condition {
                    r#type: kind.into(),
                    status: value.into(),
                    reason: "CanaryProgressing".into(),
                    message: "canary at step 2 of 4 (25 % of the buckets) <since 10:42>".into(),
                    observed_generation: Some(3),
                    last_transition_time: Some("2026-12-01T10:42:00Z".into()),
                });
            }
            status.counters.received = 120_000 + i as i64;
            status.counters.delivered = 119_000;
            status.counters.held = 12;
            status.counters.dead_lettered = 40;
            status.failure_rate = Some("0.0042".into());
            status.mttr_seconds = Some(310);
            status.manual_interventions_per_1k = Some("0.35".into());
            status.canary = Some(CanaryStatus {
                version: "1.3.0".into(),
                phase: "Progressing".into(),
                step: 2,
                weight: 25,
                applied_weight: 25,
                ..Default::default()
            });
            status.audit = Some(FlowAuditStatus {
                run: 17,
                outcome: Some(AuditOutcome::Unexplained),
                started_at: "2026-12-01T02:00:00Z".into(),
                finished_at: Some("2026-12-01T02:03:10Z".into()),
                window_from: "2026-11-24T00:00:00Z".into(),
                window_to: "2026-12-01T00:00:00Z".into(),
                crm: AuditSideSummary {
                    count: 5230,
                    totals: [
                        ("USD".into(), "1203344.10".into()),
                        ("EUR".into(), "88012.00".into()),
                    ]
                    .into(),
                },
                erp: AuditSideSummary {
                    count: 5227,
                    totals: [
                        ("USD".into(), "1201044.10".into()),
                        ("EUR".into(), "88012.00".into()),
                    ]
                    .into(),
                },
                matched: 5220,
                explained: [("held".into(), 5), ("deadLettered".into(), 3)].into(),
                unexplained: 2,
                ..Default::default()
            });
            status.tickets = Some(TicketSummary {
                open: 3,
                acknowledged: 1,
                oldest: (0..3)
                    .map(|t| OpenTicket {
                        fingerprint: format!("fp{t}"),
                        kind: "dead_letter".into(),
                        reason: "erp:422".into(),
                        state: "open".into(),
                        owner: Some("marcus".into()),
                        escalation_step: 0,
                        outstanding: 4,
                        opened_at: "2026-12-01T08:00:00Z".into(),
                    })
                    .collect(),
                ..Default::default()
            });
            flow
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let flows = flows();
    let html = meshline::ops_page::html::main_view(&flows);
    assert!(html.contains("closed-won-0999"));
    eprintln!(
        "main view with {FLOWS} flows: {} KB of HTML",
        html.len() / 1024
    );
    c.bench_function("ops_page_main_view_1000_flows", |b| {
        b.iter(|| meshline::ops_page::html::main_view(std::hint::black_box(&flows)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
