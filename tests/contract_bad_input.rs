//! Hostile and broken records: each gets a clear per-record rejection, never a panic, a hang or an allocation
//! out of proportion to the limits. Allocation is measured by this test binary's own allocator.

#[path = "contract_helpers.rs"]
mod helpers;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use helpers::{compiled, env};
use meshline::contract::{Lookups, Outcome, ReasonCode, Subject};

/// Counts the bytes live on the current thread, so concurrent tests do not disturb each other's numbers.
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = LIVE.try_with(|live| {
            live.set(live.get() + layout.size() as isize);
            let _ = PEAK.try_with(|peak| peak.set(peak.get().max(live.get())));
        });
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let _ = LIVE.try_with(|live| live.set(live.get() - layout.size() as isize));
        // SAFETY: forwarded unchanged to the system allocator, which allocated `ptr`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The outcome of processing `record` and the most bytes it held at once beyond what was live before.
fn measure(record: &[u8]) -> (Outcome, usize) {
    let contract = compiled(
        "record.id",
        "    - {name: positive, expression: 'record.count > 0', message: m}",
    )
    .unwrap();
    let env = env(&contract);
    let before = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(before));
    let outcome = contract.process(record, &env);
    let peak = PEAK.with(Cell::get) - before;
    (outcome, peak.max(0) as usize)
}

fn rejection(record: &[u8]) -> (ReasonCode, String, usize) {
    let (outcome, peak) = measure(record);
    match outcome {
        Outcome::Rejected { reasons } => {
            assert!(!reasons.is_empty());
            // Bad input is refused by the bound it breaks (size, depth, syntax), never by running out of time.
            assert_ne!(reasons[0].code, ReasonCode::DeadlineExceeded, "{reasons:?}");
            (reasons[0].code, reasons[0].to_string(), peak)
        }
        other => panic!("expected a rejection, got {other}"),
    }
}

#[test]
fn records_that_are_not_objects_are_rejected() {
    for input in ["[1, 2]", "\"text\"", "42", "null", "true", "[]"] {
        let (code, message, _) = rejection(input.as_bytes());
        assert_eq!(code, ReasonCode::NotAnObject, "{input}");
        assert!(message.contains("must be a JSON object"), "{message}");
    }
}

#[test]
fn a_10_mb_record_is_refused_without_reading_it() {
    let mut record = b"{\"id\": \"".to_vec();
    record.resize(10 << 20, b'x');
    record.extend_from_slice(b"\"}");
    let (code, message, peak) = rejection(&record);
    assert_eq!(code, ReasonCode::RecordTooLarge);
    assert!(
        message.contains("over the limit of 1048576 bytes"),
        "{message}"
    );
    assert!(peak < 16 << 10, "held {peak} bytes");
}

#[test]
fn a_record_nested_10_000_levels_deep_is_refused_at_the_depth_limit() {
    for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
        let record = format!(
            "{{\"id\": \"r\", \"deep\": {}1{}}}",
            open.repeat(10_000),
            close.repeat(10_000)
        );
        let (code, message, peak) = rejection(record.as_bytes());
        assert_eq!(code, ReasonCode::NestingTooDeep);
        assert!(message.contains("deeper than 64 levels"), "{message}");
        assert!(peak < 64 << 10, "held {peak} bytes");
    }
}

#[test]
fn invalid_utf8_is_refused_with_its_offset() {
    let (code, message, _) = rejection(b"{\"id\": \"r\xff\"}");
    assert_eq!(code, ReasonCode::InvalidUtf8);
    assert!(message.contains("at byte 9"), "{message}");
}

#[test]
fn numbers_beyond_the_integer_and_decimal_ranges_are_rejected_not_rounded() {
    for (record, field) in [
        (r#"{"id": "r", "count": 9223372036854775808}"#, "count"),
        (r#"{"id": "r", "count": -99999999999999999999999}"#, "count"),
        (r#"{"id": "r", "count": 1e30}"#, "count"),
        (r#"{"id": "r", "price": 1e400}"#, "price"),
        (
            r#"{"id": "r", "price": 123456789012345678901234567890}"#,
            "price",
        ),
        (
            r#"{"id": "r", "price": "0.00000000000000000000000000001"}"#,
            "price",
        ),
    ] {
        let (code, message, _) = rejection(record.as_bytes());
        assert_eq!(code, ReasonCode::NumberOutOfRange, "{record}: {message}");
        assert!(message.contains(&format!("field {field}")), "{message}");
    }
    // An undeclared field's number is never interpreted, so it cannot be out of range.
    let (outcome, _) = measure(br#"{"id": "r", "count": 1, "other": 1e999999}"#);
    assert!(outcome.is_accepted(), "{outcome}");
}

#[test]
fn duplicate_keys_are_refused_wherever_they_are() {
    for (record, path) in [
        (
            r#"{"id": "a", "id": "b"}"#,
            "record has the key \"id\" twice",
        ),
        (
            r#"{"id": "a", "x": 1, "x": 2}"#,
            "record has the key \"x\" twice",
        ),
        (r#"{"id": "a", "meta": {"k": 1, "k": 2}}"#, "twice in meta"),
        (
            r#"{"id": "a", "lines": [{"sku": "A"}, {"sku": "B", "sku": "C"}]}"#,
            "twice in lines[1]",
        ),
        (
            r#"{"id": "a", "meta": [{"deep": {"k": 1, "k": 2}}]}"#,
            "twice in meta[0].deep",
        ),
    ] {
        let (code, message, _) = rejection(record.as_bytes());
        assert_eq!(code, ReasonCode::DuplicateKey, "{record}");
        assert!(message.contains(path), "{record}: {message}");
    }
}

#[test]
fn malformed_json_is_refused_with_a_position() {
    for record in [
        "{",
        "{\"id\": }",
        "{\"id\": \"r\"} trailing",
        "{\"id\": \"unterminated}",
        "{'id': 1}",
        "",
    ] {
        let (code, message, _) = rejection(record.as_bytes());
        assert_eq!(code, ReasonCode::InvalidJson, "{record}");
        assert!(message.contains("at byte"), "{message}");
    }
}

#[test]
fn a_record_of_a_million_tiny_values_is_bounded() {
    // 1 MiB of empty arrays in a declared array field of strings: every element is a violation, but only the
    // first hundred are kept, and nothing of the input is copied.
    let mut record = String::from("{\"id\": \"r\", \"tags\": [");
    while record.len() < (1 << 20) - 16 {
        record.push_str("[],");
    }
    record.push_str("[]]}");
    let (code, _, peak) = rejection(record.as_bytes());
    assert_eq!(code, ReasonCode::WrongType);
    let (outcome, _) = measure(record.as_bytes());
    let Outcome::Rejected { reasons } = outcome else {
        unreachable!()
    };
    assert_eq!(reasons.len(), 101);
    assert_eq!(reasons[100].code, ReasonCode::TooManyViolations);
    assert!(peak < 256 << 10, "held {peak} bytes");
}

#[test]
fn wrong_types_everywhere_are_reported_together() {
    let record = r#"{"id": 1, "count": "3", "price": true, "flag": "yes", "day": "27/11/2026", "at": "yesterday",
        "stage": "Lost", "tags": "a", "lines": [{"sku": 1}], "address": [], "email": {"x": 1}}"#;
    let (outcome, _) = measure(record.as_bytes());
    let Outcome::Rejected { reasons } = outcome else {
        panic!()
    };
    let fields: Vec<String> = reasons.iter().map(|r| r.subject.to_string()).collect();
    for expected in [
        "id",
        "count",
        "price",
        "flag",
        "day",
        "at",
        "stage",
        "tags",
        "lines[0].sku",
        "address",
        "email",
    ] {
        assert!(
            fields.contains(&format!("field {expected}")),
            "{expected} missing from {fields:?}"
        );
    }
    assert!(
        reasons
            .iter()
            .all(|r| matches!(r.subject, Subject::Field(_)))
    );
}

#[test]
fn bad_lookup_data_is_refused_before_a_worker_uses_it() {
    let contract = compiled("record.id", "").unwrap();
    for data in [
        &b"[1]"[..],
        b"{\"prices\": {\"A\": {\"price\": \"1e400\"}}}",
        b"{\"prices\": {\"A\": {\"price\": 1, \"price\": 2}}}",
        b"{\"nope\": {}}",
    ] {
        assert!(
            Lookups::from_json_bytes(&contract, data).is_err(),
            "{}",
            String::from_utf8_lossy(data)
        );
    }
    let err = contract.env("flow", &Lookups::default()).unwrap_err();
    assert_eq!(err.label(), "lookup_missing");
}
