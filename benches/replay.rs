//! The preflight replay's cost: 10,000 ledger records (about 1 KB, five line items each) through the active
//! and a candidate version of the reference contract, compared and summarised into a report. Issue #14's
//! target is at most 1 s of CPU on one core. Measured in on-CPU time of the benchmarking thread
//! (`iter_custom`), so a build next door on a shared machine does not inflate the figure.

/// The allocator of the `meshline` binary, so the figures are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use meshline::contract::{self, Lookups};
use meshline::ledger::{RecordId, RecordState, ReplayRecord};
use meshline::rollout::replay::{Side, Thresholds, replay};

const CONTRACT: &str = include_str!("../examples/salesforce-netsuite/contract.yaml");
const LOOKUPS: &[u8] = include_bytes!("../tests/data/contract/lookups.json");
const GOOD: &str = include_str!("../tests/data/contract/good_record.json");
const DRIFTED: &str = include_str!("../tests/data/contract/price_drift_record.json");

const RECORDS: usize = 10_000;

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to the pointer it is given, which is valid and aligned.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn bench(c: &mut Criterion) {
    let active_spec = contract::parse_manifest(CONTRACT).expect("example").spec;
    // The candidate changes an output of every record and adds a rule that rejects some of them, so the
    // comparison walks payloads and builds examples, not only counts.
    let mut candidate_spec = active_spec.clone();
    candidate_spec.version = "1.3.0".into();
    for f in &mut candidate_spec.mapping.fields {
        if f.target == "memo" {
            f.expression = r#""Order: " + record.name"#.into();
        }
    }
    candidate_spec.rules.push(
        serde_yaml::from_str(
            r#"{name: small-orders, expression: 'record.amount.isLessThan(decimal("7000"))', message: big, action: reject}"#,
        )
        .expect("rule"),
    );
    let active = contract::compile(&active_spec).expect("active compiles");
    let candidate = contract::compile(&candidate_spec).expect("candidate compiles");
    let active_env = active
        .env(
            "bench",
            &Lookups::from_json_bytes(&active, LOOKUPS).unwrap(),
        )
        .unwrap();
    let candidate_env = candidate
        .env(
            "bench",
            &Lookups::from_json_bytes(&candidate, LOOKUPS).unwrap(),
        )
        .unwrap();
    // Distinct records: every tenth drifts from the pricebook (rejected by both), every seventh is a big deal.
    let records: Vec<ReplayRecord> = (0..RECORDS)
        .map(|i| {
            let id = format!("0065g{i:013}");
            let base = if i % 10 == 0 { DRIFTED } else { GOOD };
            let mut v: serde_json::Value = serde_json::from_str(base).unwrap();
            v["id"] = id.clone().into();
            v["amount"] = if i % 7 == 0 { "7289.95" } else { "6000.00" }.into();
            ReplayRecord {
                id: RecordId(i as i64 + 1),
                source_key: id,
                state: RecordState::Delivered,
                contract_version: "1.2.0".into(),
                payload: v.to_string(),
            }
        })
        .collect();
    let sides = (
        Side {
            contract: &active,
            env: &active_env,
        },
        Side {
            contract: &candidate,
            env: &candidate_env,
        },
    );
    let report = replay(sides.0, sides.1, &records, &Thresholds::default());
    assert_eq!(report.records, RECORDS as u64);
    assert!(
        report.newly_rejected > 0 && report.changed_outputs > 0,
        "{report:?}"
    );

    let mut group = c.benchmark_group("preflight replay");
    group.sample_size(10);
    group.bench_function("10,000 records through two versions (cpu)", |b| {
        b.iter_custom(|iters| {
            let start = thread_cpu();
            for _ in 0..iters {
                black_box(replay(
                    sides.0,
                    sides.1,
                    black_box(&records),
                    &Thresholds::default(),
                ));
            }
            thread_cpu() - start
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
