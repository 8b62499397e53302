//! Benchmarks of the contract engine on the reference contract (Salesforce closed-won → NetSuite sales order):
//! compiling it, and processing realistic records of about 1 KB with five line items (parse the bytes, validate
//! the schema, run the six rules, build the payload and the external id).

/// The allocator of the `meshline` binary, so the figures are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::hint::black_box;

use criterion::measurement::{Measurement, ValueFormatter};
use criterion::{BatchSize, Criterion, Throughput, criterion_group};
use meshline::contract::{self, Lookups, Outcome};

/// On-CPU time of the benchmarking thread. The wall-clock figures suffer when the machine is shared (a build
/// next door takes half the cores); this one measures what one core spends per record.
struct ThreadCpuTime;

fn thread_cpu_nanos() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to the pointer it is given, which is valid and aligned.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Measurement for ThreadCpuTime {
    type Intermediate = u64;
    type Value = u64;

    fn start(&self) -> u64 {
        thread_cpu_nanos()
    }
    fn end(&self, start: u64) -> u64 {
        thread_cpu_nanos().saturating_sub(start)
    }
    fn add(&self, a: &u64, b: &u64) -> u64 {
        a + b
    }
    fn zero(&self) -> u64 {
        0
    }
    fn to_f64(&self, value: &u64) -> f64 {
        *value as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        &CpuFormatter
    }
}

struct CpuFormatter;

impl ValueFormatter for CpuFormatter {
    fn scale_values(&self, typical: f64, values: &mut [f64]) -> &'static str {
        let (factor, unit) = if typical < 1e3 {
            (1.0, "ns cpu")
        } else if typical < 1e6 {
            (1e-3, "µs cpu")
        } else {
            (1e-6, "ms cpu")
        };
        values.iter_mut().for_each(|v| *v *= factor);
        unit
    }
    fn scale_throughputs(
        &self,
        _typical: f64,
        throughput: &Throughput,
        values: &mut [f64],
    ) -> &'static str {
        let per = match throughput {
            Throughput::Elements(n) | Throughput::Bytes(n) | Throughput::BytesDecimal(n) => {
                *n as f64
            }
            _ => 1.0,
        };
        values.iter_mut().for_each(|v| *v = per * 1e9 / *v);
        "elem/s (cpu)"
    }
    fn scale_for_machines(&self, _values: &mut [f64]) -> &'static str {
        "ns"
    }
}

const CONTRACT: &str = include_str!("../examples/salesforce-netsuite/contract.yaml");
const LOOKUPS: &[u8] = include_bytes!("../tests/data/contract/lookups.json");
const GOOD: &[u8] = include_bytes!("../tests/data/contract/good_record.json");
const DRIFTED: &[u8] = include_bytes!("../tests/data/contract/price_drift_record.json");

fn bench(c: &mut Criterion) {
    let spec = contract::parse_manifest(CONTRACT)
        .expect("example manifest")
        .spec;

    c.bench_function("compile example contract", |b| {
        b.iter(|| contract::compile(black_box(&spec)).expect("compiles"))
    });

    let compiled = contract::compile(&spec).expect("compiles");
    let lookups = Lookups::from_json_bytes(&compiled, LOOKUPS).expect("pricebook");
    let env = compiled
        .env("closed-won-to-netsuite", &lookups)
        .expect("env");
    assert!(matches!(
        compiled.process(GOOD, &env),
        Outcome::Accepted { .. }
    ));
    assert!(matches!(
        compiled.process(DRIFTED, &env),
        Outcome::Rejected { .. }
    ));

    // Distinct records, so nothing is accidentally cached between iterations.
    let records: Vec<Vec<u8>> = (0..1024)
        .map(|i| {
            let text = std::str::from_utf8(GOOD)
                .unwrap()
                .replace("AbCdEFGH", &format!("AbCd{i:04}"));
            text.into_bytes()
        })
        .collect();

    let mut group = c.benchmark_group("process record");
    group.throughput(Throughput::Elements(1));
    group.bench_function("accepted (1 KB, 5 line items)", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % records.len();
            compiled.process(black_box(&records[i]), &env)
        })
    });
    group.bench_function("rejected by price-tolerance", |b| {
        b.iter(|| compiled.process(black_box(DRIFTED), &env))
    });
    group.bench_function("payload to JSON bytes", |b| {
        b.iter_batched(
            || compiled.process(GOOD, &env),
            |outcome| match outcome {
                Outcome::Accepted { payload, .. } => serde_json::to_vec(payload.as_json()).unwrap(),
                _ => unreachable!(),
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// The same record benchmark, measured in on-CPU time of the benchmarking thread.
fn bench_cpu(c: &mut Criterion<ThreadCpuTime>) {
    let spec = contract::parse_manifest(CONTRACT)
        .expect("example manifest")
        .spec;
    c.bench_function("compile example contract (cpu)", |b| {
        b.iter(|| contract::compile(black_box(&spec)).expect("compiles"))
    });
    let compiled = contract::compile(&spec).expect("compiles");
    let lookups = Lookups::from_json_bytes(&compiled, LOOKUPS).expect("pricebook");
    let env = compiled
        .env("closed-won-to-netsuite", &lookups)
        .expect("env");
    let mut group = c.benchmark_group("process record (cpu)");
    group.throughput(Throughput::Elements(1));
    group.bench_function("accepted (1 KB, 5 line items)", |b| {
        b.iter(|| compiled.process(black_box(GOOD), &env))
    });

    // The same record through cut-down contracts, to see where the time goes.
    let minimal_mapping = contract::parse_manifest(CONTRACT)
        .unwrap()
        .spec
        .mapping
        .fields[4..5]
        .to_vec();
    let mut schema_only = spec.clone();
    schema_only.rules.clear();
    schema_only.mapping.fields = minimal_mapping.clone();
    let mut with_rules = spec.clone();
    with_rules.mapping.fields = minimal_mapping;
    for (name, spec) in [
        ("parse + validate only", schema_only),
        ("parse + validate + rules", with_rules),
    ] {
        let compiled = contract::compile(&spec).expect("compiles");
        let lookups = Lookups::from_json_bytes(&compiled, LOOKUPS).expect("pricebook");
        let env = compiled
            .env("closed-won-to-netsuite", &lookups)
            .expect("env");
        assert!(compiled.process(GOOD, &env).is_accepted());
        group.bench_function(name, |b| b.iter(|| compiled.process(black_box(GOOD), &env)));
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_group! {
    name = cpu;
    config = Criterion::default().with_measurement(ThreadCpuTime);
    targets = bench_cpu
}

/// `CONTRACT_BENCH_LOOP=<n> <bench binary>` processes the good record n times and exits, for hardware
/// counters (`perf stat -e instructions`), which a busy machine does not disturb the way it disturbs time.
fn main() {
    if let Some(n) = std::env::var("CONTRACT_BENCH_LOOP")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
    {
        let spec = contract::parse_manifest(CONTRACT)
            .expect("example manifest")
            .spec;
        let compiled = contract::compile(&spec).expect("compiles");
        let lookups = Lookups::from_json_bytes(&compiled, LOOKUPS).expect("pricebook");
        let env = compiled
            .env("closed-won-to-netsuite", &lookups)
            .expect("env");
        let accepted = (0..n)
            .filter(|_| compiled.process(black_box(GOOD), &env).is_accepted())
            .count();
        assert_eq!(accepted, n);
        return;
    }
    benches();
    cpu();
    Criterion::default().configure_from_args().final_summary();
}
