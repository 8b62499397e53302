//! The preflight replay: the flow's recent records run through the active and the candidate contract, and a
//! [`Report`] of what the candidate would change — records newly rejected, newly held, newly accepted, and
//! accepted payloads that differ, summarised by target path with a few examples.
//!
//! It owns the comparison and the report's shape, its verdict under the flow's [`Thresholds`] and its
//! wire form (a Job's termination message, at most [`TERMINATION_MESSAGE_LIMIT`] bytes, which the controller
//! parses back with [`Report::parse`]). It does no I/O: `meshline replay` reads the records (from the ledger,
//! or from a worker's operations API when the ledger is embedded) and writes the report.
//!
//! Records go through [`CompiledContract::process`] with an [`Env`] bound to the flow's lookups, exactly as
//! the worker's pipeline judges a claimed record. Full payloads never appear in a report: examples carry the
//! record's id and source key, outcome labels (the dead-letter reason key, never a message), and at most a
//! few changed values, each redacted when the contract marks the target personal and truncated otherwise.

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::contract::{CompiledContract, Env, Outcome, ReasonCode, Redaction, redact_json};
use crate::ledger::ReplayRecord;

/// Kubernetes keeps at most this many bytes of a container's termination message.
pub const TERMINATION_MESSAGE_LIMIT: usize = 4096;
/// Examples kept in a report.
pub const MAX_EXAMPLES: usize = 5;
/// Changed values shown per example.
const MAX_CHANGES_PER_EXAMPLE: usize = 3;
/// Characters of a non-personal value, a source key or a path shown before it is cut.
const SHOWN_CHARS: usize = 40;
const MAX_PATH_CHARS: usize = 200;
const MAX_REASON_CHARS: usize = 1024;
/// The pseudo-path under which a changed external id (the ERP upsert key) is counted.
pub const EXTERNAL_ID_PATH: &str = "$externalId";

/// Pass or fail of a preflight.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Passed,
    Failed,
}

/// What a preflight found. Serialised in camelCase; [`Report::termination_message`] is its compact form.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub verdict: Verdict,
    /// Why it failed: the thresholds exceeded, with the numbers, or the error that stopped the replay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Content hashes (`sha256:…`) of the two contracts; empty when the replay failed before reading one.
    pub active_hash: String,
    pub candidate_hash: String,
    pub active_version: String,
    pub candidate_version: String,
    /// Records replayed.
    pub records: u64,
    /// Accepted or held under the active contract, rejected (a dead letter) under the candidate.
    pub newly_rejected: u64,
    /// Not held under the active contract, held under the candidate.
    pub newly_held: u64,
    /// Not accepted under the active contract, accepted under the candidate.
    pub newly_accepted: u64,
    /// Accepted under both, with a different ERP payload or external id.
    pub changed_outputs: u64,
    /// Target paths (`item.items[].rate`) that changed, with how many records each; most records first.
    #[serde(default)]
    pub changed_paths: Vec<PathCount>,
    /// Paths left out of `changed_paths` to fit the termination message.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub omitted_changed_paths: u64,
    /// A few records that changed (at most [`MAX_EXAMPLES`]), PII redacted.
    #[serde(default)]
    pub examples: Vec<Example>,
    /// Examples left out to fit the termination message.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub omitted_examples: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// How many records changed at one target path.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PathCount {
    pub path: String,
    pub records: u64,
}

/// One record the candidate treats differently.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Example {
    /// The record's id in the ledger (`meshline` ops API: `/records/{id}`).
    pub record: i64,
    /// The source's key of the record (a CRM id), cut to a few dozen characters.
    pub key: String,
    /// The outcome before and after, when it changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<OutcomeChange>,
    /// Changed payload values, when the record is accepted under both.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<ValueChange>,
}

/// Outcome labels: `accepted`, `held:<rule>`, or `rejected:<dead-letter reason key>`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct OutcomeChange {
    pub before: String,
    pub after: String,
}

/// One changed value. A personal value is redacted, another scalar cut to a few dozen characters, and an
/// object or array is described (`{…}`, `[3 items]`), never shown. `None`: absent on that side.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ValueChange {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Value>,
}

/// What a preflight tolerates (the flow's `maxNewlyRejected` and `maxChangedOutputs`). The default is the
/// flow's: no newly rejected record, any number of changed outputs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Thresholds {
    pub max_newly_rejected: u64,
    pub max_changed_outputs: Option<u64>,
}

/// A contract as a report names it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContractVersion {
    pub version: String,
    pub content_hash: String,
}

impl ContractVersion {
    pub fn of(contract: &CompiledContract) -> Self {
        ContractVersion {
            version: contract.version().to_string(),
            content_hash: contract.content_hash().to_string(),
        }
    }

    /// A spec that may not compile: its version as written and its content hash.
    pub fn of_spec(spec: &crate::api::SyncContractSpec) -> Self {
        ContractVersion {
            version: spec.version.clone(),
            content_hash: crate::contract::content_hash(spec).to_string(),
        }
    }
}

/// One side of the comparison: a compiled contract bound to the flow's lookups.
#[derive(Debug, Clone, Copy)]
pub struct Side<'a> {
    pub contract: &'a CompiledContract,
    pub env: &'a Env,
}

/// Replays every record and builds the report.
pub fn replay<'r>(
    active: Side<'_>,
    candidate: Side<'_>,
    records: impl IntoIterator<Item = &'r ReplayRecord>,
    thresholds: &Thresholds,
) -> Report {
    let mut replay = Replay::new(active, candidate);
    for record in records {
        replay.record(record);
    }
    replay.finish(thresholds)
}

/// A replay in progress, for records that arrive one at a time (a stream from a worker).
pub struct Replay<'a> {
    active: Side<'a>,
    candidate: Side<'a>,
    records: u64,
    newly_rejected: u64,
    newly_held: u64,
    newly_accepted: u64,
    changed_outputs: u64,
    paths: HashMap<String, u64>,
    outcome_examples: Vec<Example>,
    output_examples: Vec<Example>,
}

impl<'a> Replay<'a> {
    pub fn new(active: Side<'a>, candidate: Side<'a>) -> Self {
        Replay {
            active,
            candidate,
            records: 0,
            newly_rejected: 0,
            newly_held: 0,
            newly_accepted: 0,
            changed_outputs: 0,
            paths: HashMap::new(),
            outcome_examples: Vec::new(),
            output_examples: Vec::new(),
        }
    }

    /// Runs one record through both contracts and counts the difference.
    pub fn record(&mut self, record: &ReplayRecord) {
        self.records += 1;
        let bytes = record.payload.as_bytes();
        let before = evaluate(self.active, bytes);
        let after = evaluate(self.candidate, bytes);
        let rejected = |o: &Outcome| matches!(o, Outcome::Rejected { .. });
        let held = |o: &Outcome| matches!(o, Outcome::Held { .. });
        if rejected(&after) && !rejected(&before) {
            self.newly_rejected += 1;
        }
        if held(&after) && !held(&before) {
            self.newly_held += 1;
        }
        if after.is_accepted() && !before.is_accepted() {
            self.newly_accepted += 1;
        }
        match (&before, &after) {
            (
                Outcome::Accepted {
                    payload: old,
                    external_id: old_id,
                    ..
                },
                Outcome::Accepted {
                    payload: new,
                    external_id: new_id,
                    ..
                },
            ) => {
                let id_changed = old_id.as_str() != new_id.as_str();
                if !id_changed && old.as_json() == new.as_json() {
                    return;
                }
                self.changed_outputs += 1;
                let mut changes = Vec::new();
                if id_changed {
                    // The external id prints redacted when its expression reads personal data.
                    changes.push(ValueChange {
                        path: EXTERNAL_ID_PATH.to_string(),
                        before: Some(Value::String(cut(&old_id.to_string()))),
                        after: Some(Value::String(cut(&new_id.to_string()))),
                    });
                }
                let (old_shown, new_shown) = (old.redacted(), new.redacted());
                let mut walk = Walk {
                    redaction: self.candidate.contract.redaction(),
                    changes: &mut changes,
                };
                walk.node(
                    &mut String::new(),
                    Pair(Some(old.as_json()), Some(&old_shown)),
                    Pair(Some(new.as_json()), Some(&new_shown)),
                    false,
                );
                let paths: BTreeSet<&str> = changes.iter().map(|c| c.path.as_str()).collect();
                for path in paths {
                    *self.paths.entry(path.to_string()).or_default() += 1;
                }
                if self.output_examples.len() < MAX_EXAMPLES {
                    // One change per path: a list's elements share theirs.
                    let mut seen = BTreeSet::new();
                    changes.retain(|c| seen.insert(c.path.clone()));
                    changes.truncate(MAX_CHANGES_PER_EXAMPLE);
                    self.output_examples.push(Example {
                        record: record.id.0,
                        key: cut(&record.source_key),
                        outcome: None,
                        changes,
                    });
                }
            }
            _ if before.label() != after.label() && self.outcome_examples.len() < MAX_EXAMPLES => {
                self.outcome_examples.push(Example {
                    record: record.id.0,
                    key: cut(&record.source_key),
                    outcome: Some(OutcomeChange {
                        before: outcome_label(&before),
                        after: outcome_label(&after),
                    }),
                    changes: Vec::new(),
                });
            }
            _ => {}
        }
    }

    /// The report, with its verdict under `thresholds`.
    pub fn finish(self, thresholds: &Thresholds) -> Report {
        let mut changed_paths: Vec<PathCount> = self
            .paths
            .into_iter()
            .map(|(path, records)| PathCount { path, records })
            .collect();
        changed_paths.sort_by(|a, b| b.records.cmp(&a.records).then(a.path.cmp(&b.path)));
        // Outcome changes first: a reviewer wants to see what would stop being delivered.
        let mut examples = self.outcome_examples;
        examples.extend(self.output_examples);
        examples.truncate(MAX_EXAMPLES);
        let mut report = Report {
            verdict: Verdict::Passed,
            reason: None,
            active_hash: self.active.contract.content_hash().to_string(),
            candidate_hash: self.candidate.contract.content_hash().to_string(),
            active_version: self.active.contract.version().to_string(),
            candidate_version: self.candidate.contract.version().to_string(),
            records: self.records,
            newly_rejected: self.newly_rejected,
            newly_held: self.newly_held,
            newly_accepted: self.newly_accepted,
            changed_outputs: self.changed_outputs,
            changed_paths,
            omitted_changed_paths: 0,
            examples,
            omitted_examples: 0,
        };
        report.judge(thresholds);
        report
    }
}

/// The record's outcome under one contract. The worker's pipeline does not judge a record by one CPU-time
/// overrun (it retries it); neither does the replay, which evaluates such a record once more.
fn evaluate(side: Side<'_>, bytes: &[u8]) -> Outcome {
    let overran = |o: &Outcome| match o {
        Outcome::Rejected { reasons } => reasons
            .iter()
            .any(|r| r.code == ReasonCode::DeadlineExceeded),
        _ => false,
    };
    let outcome = side.contract.process(bytes, side.env);
    if overran(&outcome) {
        side.contract.process(bytes, side.env)
    } else {
        outcome
    }
}

/// `accepted`, `held:<rule>`, or `rejected:` and the key the pipeline files the dead letter under (the first
/// reason's code and subject: rule names and field paths, never values).
fn outcome_label(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Accepted { .. } => "accepted".into(),
        Outcome::Held { rule, .. } => format!("held:{rule}"),
        Outcome::Rejected { reasons } => match reasons.first() {
            Some(r) => format!(
                "rejected:contract:{}:{}",
                r.code.label(),
                crate::worker::pipeline::subject_key(&r.subject)
            ),
            None => "rejected".into(),
        },
    }
}

fn cut(text: &str) -> String {
    cut_to(text, SHOWN_CHARS)
}

fn cut_to(text: &str, chars: usize) -> String {
    match text.char_indices().nth(chars) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

/// A node of the raw payload and the same node of its redacted form ([`crate::contract::Payload::redacted`]).
#[derive(Clone, Copy)]
struct Pair<'v>(Option<&'v Value>, Option<&'v Value>);

impl<'v> Pair<'v> {
    /// Whether the contract redacts this node: its redacted form is a marker string where the raw one differs.
    fn redacted(self) -> bool {
        match (self.0, self.1) {
            (Some(raw), Some(Value::String(shown))) => raw.as_str() != Some(shown.as_str()),
            _ => false,
        }
    }

    fn key(self, key: &str) -> Pair<'v> {
        Pair(
            self.0.and_then(|v| v.get(key)),
            self.1.and_then(|v| v.get(key)),
        )
    }

    fn index(self, i: usize) -> Pair<'v> {
        Pair(self.0.and_then(|v| v.get(i)), self.1.and_then(|v| v.get(i)))
    }
}

/// The walk over two payloads that lists every changed leaf path.
struct Walk<'w> {
    redaction: &'w Redaction,
    changes: &'w mut Vec<ValueChange>,
}

impl Walk<'_> {
    fn node(&mut self, path: &mut String, old: Pair<'_>, new: Pair<'_>, personal: bool) {
        let personal = personal || old.redacted() || new.redacted();
        match (old.0, new.0) {
            (Some(Value::Object(a)), Some(Value::Object(b))) => {
                let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                for key in keys {
                    let len = path.len();
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(key);
                    self.node(path, old.key(key), new.key(key), personal);
                    path.truncate(len);
                }
            }
            (Some(Value::Array(a)), Some(Value::Array(b))) => {
                let len = path.len();
                path.push_str("[]");
                for i in 0..a.len().max(b.len()) {
                    self.node(path, old.index(i), new.index(i), personal);
                }
                path.truncate(len);
            }
            (a, b) if a == b => {}
            (a, b) => self.changes.push(ValueChange {
                path: cut_to(if path.is_empty() { "$" } else { path }, MAX_PATH_CHARS),
                before: a.map(|v| self.shown(v, personal)),
                after: b.map(|v| self.shown(v, personal)),
            }),
        }
    }

    /// A value as an example may show it.
    fn shown(&self, value: &Value, personal: bool) -> Value {
        match value {
            _ if personal => redact_json(value, self.redaction),
            Value::Object(_) => Value::String("{…}".into()),
            Value::Array(items) => Value::String(format!("[{} items]", items.len())),
            Value::String(s) => Value::String(cut(s)),
            other => other.clone(),
        }
    }
}

impl Report {
    /// A preflight that could not run (a candidate that does not compile, a ledger that does not answer): a
    /// failed verdict with the reason, so the Job always leaves a report the controller can parse.
    pub fn failed(
        reason: impl Into<String>,
        active: &ContractVersion,
        candidate: &ContractVersion,
    ) -> Report {
        Report {
            verdict: Verdict::Failed,
            reason: Some(cut_to(&reason.into(), MAX_REASON_CHARS)),
            active_hash: active.content_hash.clone(),
            candidate_hash: candidate.content_hash.clone(),
            active_version: active.version.clone(),
            candidate_version: candidate.version.clone(),
            records: 0,
            newly_rejected: 0,
            newly_held: 0,
            newly_accepted: 0,
            changed_outputs: 0,
            changed_paths: Vec::new(),
            omitted_changed_paths: 0,
            examples: Vec::new(),
            omitted_examples: 0,
        }
    }

    /// Sets the verdict and the reason from the counts.
    fn judge(&mut self, thresholds: &Thresholds) {
        let mut exceeded = Vec::new();
        if self.newly_rejected > thresholds.max_newly_rejected {
            exceeded.push(format!(
                "{} records newly rejected, over maxNewlyRejected {}",
                self.newly_rejected, thresholds.max_newly_rejected
            ));
        }
        if let Some(max) = thresholds.max_changed_outputs
            && self.changed_outputs > max
        {
            exceeded.push(format!(
                "{} records with changed outputs, over maxChangedOutputs {max}",
                self.changed_outputs
            ));
        }
        if exceeded.is_empty() {
            self.verdict = Verdict::Passed;
            self.reason = None;
        } else {
            self.verdict = Verdict::Failed;
            self.reason = Some(format!(
                "{} of {} replayed records: {}",
                self.candidate_version,
                self.records,
                exceeded.join("; ")
            ));
        }
    }

    pub fn passed(&self) -> bool {
        self.verdict == Verdict::Passed
    }

    /// The report as compact JSON of at most [`TERMINATION_MESSAGE_LIMIT`] bytes: the examples go first, then
    /// the least frequent changed paths, each counted in `omittedExamples` / `omittedChangedPaths`.
    pub fn termination_message(&self) -> String {
        let text = |r: &Report| {
            serde_json::to_string(r).unwrap_or_else(|e| {
                format!(r#"{{"verdict":"Failed","reason":"the report cannot be serialised: {e}"}}"#)
            })
        };
        let fits = |r: &Report| text(r).len() <= TERMINATION_MESSAGE_LIMIT;
        let mut report = self.clone();
        report.reason = report.reason.map(|r| cut_to(&r, MAX_REASON_CHARS));
        if fits(&report) {
            return text(&report);
        }
        report.omitted_examples += report.examples.len() as u64;
        report.examples.clear();
        if fits(&report) {
            return text(&report);
        }
        // The most paths that fit, found by bisection (each probe serialises the report once).
        let all = std::mem::take(&mut report.changed_paths);
        let omitted_before = report.omitted_changed_paths;
        let keep = |report: &mut Report, n: usize| {
            report.changed_paths = all[..n].to_vec();
            report.omitted_changed_paths = omitted_before + (all.len() - n) as u64;
        };
        let (mut lo, mut hi) = (0, all.len());
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            keep(&mut report, mid);
            if fits(&report) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        keep(&mut report, lo);
        if !fits(&report) {
            // Only absurdly long versions or hashes get here; the counts and the verdict must survive.
            report.reason = report.reason.map(|r| cut_to(&r, 200));
            for field in [
                &mut report.active_hash,
                &mut report.candidate_hash,
                &mut report.active_version,
                &mut report.candidate_version,
            ] {
                *field = cut_to(field, 100);
            }
        }
        text(&report)
    }

    /// Reads a termination message (or any JSON form of a report) back, naming the field that is wrong.
    pub fn parse(text: &str) -> Result<Report, String> {
        let mut deserializer = serde_json::Deserializer::from_str(text.trim());
        serde_path_to_error::deserialize(&mut deserializer)
            .map_err(|e| format!("preflight report: {}: {}", e.path(), e.inner()))
    }
}

impl fmt::Display for Report {
    /// The human summary `meshline replay` prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = match self.verdict {
            Verdict::Passed => "PASSED",
            Verdict::Failed => "FAILED",
        };
        writeln!(
            f,
            "preflight {verdict}: {} ({}) → {} ({})",
            self.active_version, self.active_hash, self.candidate_version, self.candidate_hash
        )?;
        if let Some(reason) = &self.reason {
            writeln!(f, "  reason: {reason}")?;
        }
        writeln!(
            f,
            "  {} records replayed: {} newly rejected, {} newly held, {} newly accepted, {} changed outputs",
            self.records,
            self.newly_rejected,
            self.newly_held,
            self.newly_accepted,
            self.changed_outputs
        )?;
        if !self.changed_paths.is_empty() {
            writeln!(f, "  changed paths:")?;
            for p in &self.changed_paths {
                writeln!(f, "    {:>8}  {}", p.records, p.path)?;
            }
        }
        if self.omitted_changed_paths > 0 {
            writeln!(f, "    ({} more paths)", self.omitted_changed_paths)?;
        }
        if !self.examples.is_empty() {
            writeln!(f, "  examples:")?;
        }
        for e in &self.examples {
            write!(f, "    record {} ({})", e.record, e.key)?;
            if let Some(o) = &e.outcome {
                write!(f, ": {} → {}", o.before, o.after)?;
            }
            writeln!(f)?;
            for c in &e.changes {
                let show =
                    |v: &Option<Value>| v.as_ref().map_or("(absent)".into(), Value::to_string);
                writeln!(
                    f,
                    "      {}: {} → {}",
                    c.path,
                    show(&c.before),
                    show(&c.after)
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{Lookups, compile, parse_manifest};
    use crate::ledger::{RecordId, RecordState};

    const CONTRACT: &str = include_str!("../../examples/salesforce-netsuite/contract.yaml");
    const GOOD: &str = include_str!("../../tests/data/contract/good_record.json");
    const LOOKUPS: &str = include_str!("../../tests/data/contract/lookups.json");

    fn contract(edit: impl FnOnce(&mut crate::api::SyncContractSpec)) -> CompiledContract {
        let mut spec = parse_manifest(CONTRACT).expect("the example contract").spec;
        edit(&mut spec);
        compile(&spec).expect("the contract compiles")
    }

    fn env(contract: &CompiledContract) -> Env {
        let lookups: Value = serde_json::from_str(LOOKUPS).expect("lookups.json");
        let tables = Lookups::from_json(contract, &lookups).expect("lookups load");
        contract.env("flow-a", &tables).expect("env")
    }

    fn record(n: i64, edit: impl FnOnce(&mut Value)) -> ReplayRecord {
        let mut v: Value = serde_json::from_str(GOOD).expect("good_record.json");
        v["id"] = Value::String(format!("0065g{n:013}"));
        edit(&mut v);
        ReplayRecord {
            id: RecordId(n),
            source_key: format!("0065g{n:013}"),
            state: RecordState::Delivered,
            contract_version: "1.2.0".into(),
            payload: v.to_string(),
        }
    }

    fn run(
        active: &CompiledContract,
        candidate: &CompiledContract,
        records: &[ReplayRecord],
        thresholds: Thresholds,
    ) -> Report {
        let (a, c) = (env(active), env(candidate));
        replay(
            Side {
                contract: active,
                env: &a,
            },
            Side {
                contract: candidate,
                env: &c,
            },
            records,
            &thresholds,
        )
    }

    fn bump(spec: &mut crate::api::SyncContractSpec) {
        spec.version = "1.3.0".into();
    }

    #[test]
    fn the_same_contract_changes_nothing_and_passes() {
        let active = contract(|_| {});
        let records: Vec<_> = (1..=20).map(|n| record(n, |_| {})).collect();
        let report = run(&active, &active, &records, Thresholds::default());
        assert_eq!(report.verdict, Verdict::Passed);
        assert_eq!(report.reason, None);
        assert_eq!(report.records, 20);
        assert_eq!(
            (
                report.newly_rejected,
                report.newly_held,
                report.newly_accepted,
                report.changed_outputs
            ),
            (0, 0, 0, 0)
        );
        assert!(report.changed_paths.is_empty() && report.examples.is_empty());
        assert!(report.active_hash.starts_with("sha256:"));
    }

    #[test]
    fn a_changed_mapping_counts_records_per_target_path() {
        let active = contract(|_| {});
        // The memo gets a prefix and each line's rate becomes the pricebook's; the third line's price is
        // already the pricebook's in half of the records.
        let candidate = contract(|spec| {
            bump(spec);
            for f in &mut spec.mapping.fields {
                if f.target == "memo" {
                    f.expression = r#""Order: " + record.name"#.into();
                }
            }
        });
        let records: Vec<_> = (1..=10).map(|n| record(n, |_| {})).collect();
        let report = run(&active, &candidate, &records, Thresholds::default());
        assert_eq!(report.changed_outputs, 10);
        assert_eq!(report.newly_rejected, 0);
        assert_eq!(
            report.changed_paths,
            vec![PathCount {
                path: "memo".into(),
                records: 10
            }]
        );
        assert_eq!(report.verdict, Verdict::Passed, "no changed-output bound");
        let example = &report.examples[0];
        assert_eq!(example.changes[0].path, "memo");
        assert_eq!(
            example.changes[0].after,
            Some(Value::String("Order: ACME Corp - 2027 renewal".into()))
        );

        let bounded = run(
            &active,
            &candidate,
            &records,
            Thresholds {
                max_newly_rejected: 0,
                max_changed_outputs: Some(9),
            },
        );
        assert_eq!(bounded.verdict, Verdict::Failed);
        let reason = bounded.reason.expect("a reason");
        assert!(
            reason.contains("10 records with changed outputs, over maxChangedOutputs 9"),
            "{reason}"
        );
    }

    #[test]
    fn list_elements_share_one_path_and_count_once_per_record() {
        let active = contract(|_| {});
        let candidate = contract(|spec| {
            bump(spec);
            for f in &mut spec.mapping.fields {
                if f.target == "item.items" {
                    f.expression = r#"record.lineItems.map(l, {"item": {"externalId": l.sku}, "quantity": l.quantity * 2, "rate": l.unitPrice})"#.into();
                }
            }
        });
        let records: Vec<_> = (1..=3).map(|n| record(n, |_| {})).collect();
        let report = run(&active, &candidate, &records, Thresholds::default());
        assert_eq!(
            report.changed_paths,
            vec![PathCount {
                path: "item.items[].quantity".into(),
                records: 3
            }]
        );
        assert_eq!(report.examples[0].changes.len(), 1, "one change per path");
    }

    #[test]
    fn a_new_rejecting_rule_fails_with_the_default_threshold() {
        let active = contract(|_| {});
        let candidate = contract(|spec| {
            bump(spec);
            spec.rules.push(
                serde_yaml::from_str(
                    "{name: small-orders-only, expression: 'record.amount.isLessThan(decimal(\"5000\"))', message: too big, action: reject}",
                )
                .expect("a rule"),
            );
        });
        let records: Vec<_> = (1..=6)
            .map(|n| {
                record(n, |v| {
                    v["amount"] =
                        Value::String(if n % 2 == 0 { "7289.95" } else { "100.00" }.into())
                })
            })
            .collect();
        let report = run(&active, &candidate, &records, Thresholds::default());
        assert_eq!(report.newly_rejected, 3);
        assert_eq!(report.verdict, Verdict::Failed);
        assert_eq!(
            report.reason.as_deref(),
            Some("1.3.0 of 6 replayed records: 3 records newly rejected, over maxNewlyRejected 0")
        );
        assert_eq!(
            report.examples[0].outcome,
            Some(OutcomeChange {
                before: "accepted".into(),
                after: "rejected:contract:rule_failed:rule:small-orders-only".into()
            })
        );
        let tolerant = run(
            &active,
            &candidate,
            &records,
            Thresholds {
                max_newly_rejected: 3,
                max_changed_outputs: None,
            },
        );
        assert_eq!(tolerant.verdict, Verdict::Passed);
    }

    #[test]
    fn holds_and_acceptances_are_counted_both_ways() {
        // The candidate holds discounts over 5 % (the active one over 20 %) and stops rejecting open deals.
        let active = contract(|_| {});
        let candidate = contract(|spec| {
            bump(spec);
            spec.rules.retain(|r| r.name != "closed-won-only");
            for r in &mut spec.rules {
                if r.name == "discount-approval" {
                    r.expression = r#"!has(record.discountPercent) || record.discountPercent.isLessThanOrEqual(decimal("5"))"#.into();
                }
            }
        });
        let records = vec![
            record(1, |_| {}),                                    // 10 %: newly held
            record(2, |v| v["stageName"] = "Negotiation".into()), // rejected before, held now (10 %)
            record(3, |v| {
                v["stageName"] = "Negotiation".into();
                v["discountPercent"] = 0.into();
            }), // newly accepted
        ];
        let report = run(&active, &candidate, &records, Thresholds::default());
        assert_eq!(report.newly_held, 2);
        assert_eq!(report.newly_accepted, 1);
        assert_eq!(report.newly_rejected, 0);
        assert_eq!(report.verdict, Verdict::Passed);
    }

    #[test]
    fn personal_values_are_redacted_in_examples_and_others_cut() {
        let active = contract(|_| {});
        let candidate = contract(|spec| {
            bump(spec);
            for f in &mut spec.mapping.fields {
                match f.target.as_str() {
                    "email" => f.expression = "record.customerEmail.upperAscii()".into(),
                    "memo" => {
                        f.expression =
                            r#"record.name + " / " + record.accountName + " / renewal" "#.into()
                    }
                    _ => {}
                }
            }
        });
        let report = run(
            &active,
            &candidate,
            &[record(1, |_| {})],
            Thresholds::default(),
        );
        let text = serde_json::to_string(&report).unwrap()
            + &report.termination_message()
            + &report.to_string();
        assert!(!text.contains("alice.buyer"), "{text}");
        assert!(
            !text.to_lowercase().contains("alice.buyer@acme.example"),
            "{text}"
        );
        let changes = &report.examples[0].changes;
        let email = changes
            .iter()
            .find(|c| c.path == "email")
            .expect("email changed");
        assert_eq!(email.before, Some(Value::String("[REDACTED]".into())));
        assert_eq!(email.after, Some(Value::String("[REDACTED]".into())));
        let memo = changes
            .iter()
            .find(|c| c.path == "memo")
            .expect("memo changed");
        let after = memo.after.as_ref().and_then(Value::as_str).unwrap();
        assert!(
            after.ends_with('…') && after.chars().count() == SHOWN_CHARS + 1,
            "{after}"
        );
    }

    fn many_paths(n: usize) -> Report {
        let mut report = Report::failed(
            "x",
            &ContractVersion::default(),
            &ContractVersion::default(),
        );
        report.verdict = Verdict::Passed;
        report.reason = None;
        report.records = 10_000;
        report.changed_outputs = 10_000;
        report.changed_paths = (0..n)
            .map(|i| PathCount {
                path: format!("lines[].custom.field_number_{i:05}"),
                records: (n - i) as u64,
            })
            .collect();
        report.examples = (0..5)
            .map(|i| Example {
                record: i,
                key: "k".repeat(40),
                outcome: None,
                changes: vec![ValueChange {
                    path: "memo".into(),
                    before: Some("a".repeat(40).into()),
                    after: Some("b".repeat(40).into()),
                }],
            })
            .collect();
        report
    }

    #[test]
    fn the_termination_message_fits_kubernetes_limit_and_says_what_it_left_out() {
        let report = many_paths(500);
        let message = report.termination_message();
        assert!(
            message.len() <= TERMINATION_MESSAGE_LIMIT,
            "{}",
            message.len()
        );
        let back = Report::parse(&message).expect("parses");
        assert!(back.examples.is_empty());
        assert_eq!(back.omitted_examples, 5);
        assert!(!back.changed_paths.is_empty());
        assert_eq!(
            back.changed_paths.len() as u64 + back.omitted_changed_paths,
            500
        );
        // The most frequent paths are the ones kept, and one more would not have fitted.
        assert_eq!(
            back.changed_paths[..],
            report.changed_paths[..back.changed_paths.len()]
        );
        let mut one_more = back.clone();
        one_more.changed_paths = report.changed_paths[..back.changed_paths.len() + 1].to_vec();
        one_more.omitted_changed_paths -= 1;
        assert!(serde_json::to_string(&one_more).unwrap().len() > TERMINATION_MESSAGE_LIMIT);
        assert_eq!(
            (back.records, back.changed_outputs, back.verdict),
            (10_000, 10_000, Verdict::Passed)
        );
    }

    #[test]
    fn a_small_report_travels_whole_and_parses_back_equal() {
        let report = many_paths(3);
        let message = report.termination_message();
        assert!(!message.contains('\n'));
        assert_eq!(Report::parse(&message), Ok(report));
    }

    #[test]
    fn a_failed_report_keeps_its_reason_short_and_parseable() {
        let active = ContractVersion {
            version: "1.2.0".into(),
            content_hash: "sha256:ab".into(),
        };
        let report = Report::failed(
            "ledger: ".to_string() + &"e".repeat(10_000),
            &active,
            &ContractVersion::default(),
        );
        let back = Report::parse(&report.termination_message()).expect("parses");
        assert_eq!(back.verdict, Verdict::Failed);
        assert_eq!(back.active_version, "1.2.0");
        assert!(back.reason.unwrap().len() < 1100);
    }

    #[test]
    fn a_malformed_message_names_the_field() {
        let err = Report::parse(r#"{"verdict": "Maybe"}"#).unwrap_err();
        assert!(err.contains("verdict"), "{err}");
        let err = Report::parse("not json").unwrap_err();
        assert!(err.starts_with("preflight report"), "{err}");
    }
}
