//! `meshline contract`: offline tools for contract authors and CI. `diff` classifies the changes between two
//! versions of a contract and checks the version step; `check` runs sample records through a contract. Both
//! read manifests from files and print to stdout; neither touches a cluster. Personal values never reach the
//! output: reasons carry the redacted form, and payloads are not printed.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use serde::Serialize;

use crate::api::SyncContract;
use crate::contract::compat::{self, CompatReport};
use crate::contract::{self, CompiledContract, Lookups, Outcome, Reason, ReasonCode, Subject};

const EXIT_CODES: &str = "\
Exit codes:
  0  diff: the new version may replace the old one (compatible, or every breaking change comes with a new
     major version); check: every record was processed, whatever its outcome
  2  invalid input: a file cannot be read, is not a SyncContract manifest, or its contract does not compile
     (each error names the file, the field path and the reason); unreadable lookups or records
  3  diff: the new version may not replace the old one (a breaking change without a new major version, a
     schema change without a new minor version, content changed without a version change, or a version that
     does not increase)";

/// `meshline contract ...`
#[derive(Debug, Subcommand)]
pub enum ContractCommand {
    /// Classify every change between two versions of a contract under its compatibility mode (BACKWARD,
    /// FORWARD, FULL, NONE) and check that the version step fits them.
    #[command(after_help = EXIT_CODES)]
    Diff {
        /// The SyncContract manifest (YAML) of the current version.
        old: PathBuf,
        /// The SyncContract manifest (YAML) of the proposed version.
        new: PathBuf,
        /// Flows and rosters (files or directories): the diff then names the owners who must sign the new
        /// version and the flows a preflight replay will run on.
        #[arg(long)]
        manifests: Vec<PathBuf>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Run records through a contract and print the outcome counts and the first failures per reason.
    #[command(after_help = EXIT_CODES)]
    Check {
        /// The SyncContract manifest (YAML).
        file: PathBuf,
        /// Records, one JSON object per line.
        #[arg(long)]
        records: PathBuf,
        /// Lookup data: {"<lookup>": {"<key>": {"<field>": value}}}.
        #[arg(long)]
        lookups: Option<PathBuf>,
        /// The flow name expressions see as `flow.name`.
        #[arg(long, default_value = "meshline-contract-check")]
        flow: String,
        /// How many failures to show per reason.
        #[arg(long, default_value_t = 3)]
        show: usize,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

const INVALID_INPUT: u8 = 2;
const NOT_ALLOWED: u8 = 3;

pub fn run(command: ContractCommand) -> ExitCode {
    match command {
        ContractCommand::Diff {
            old,
            new,
            manifests,
            output,
        } => diff(&old, &new, &manifests, output),
        ContractCommand::Check {
            file,
            records,
            lookups,
            flow,
            show,
            output,
        } => check(&file, &records, lookups.as_deref(), &flow, show, output),
    }
}

/// Invalid input: every message names the file, and the field path where there is one.
struct InputErrors(Vec<String>);

impl InputErrors {
    fn report(self) -> ExitCode {
        for e in &self.0 {
            eprintln!("error: {e}");
        }
        ExitCode::from(INVALID_INPUT)
    }
}

fn load(path: &Path) -> Result<(SyncContract, CompiledContract), InputErrors> {
    let file = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| InputErrors(vec![format!("{file}: cannot read: {e}")]))?;
    let manifest = contract::parse_manifest(&text).map_err(|e| {
        let at = if e.path.is_empty() {
            String::new()
        } else {
            format!("{}: ", e.path)
        };
        InputErrors(vec![format!("{file}: {at}{}", e.reason)])
    })?;
    let compiled = contract::compile(&manifest.spec).map_err(|errors| {
        InputErrors(
            errors
                .iter()
                .map(|e| format!("{file}: {}: {}", e.path, e.reason))
                .collect(),
        )
    })?;
    Ok((manifest, compiled))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DiffOutput<'a> {
    contract: String,
    old_file: String,
    new_file: String,
    verdict: &'static str,
    allowed: bool,
    #[serde(flatten)]
    report: &'a CompatReport,
    /// The gates the new version faces in the controller.
    gates: serde_json::Value,
}

fn diff(old_path: &Path, new_path: &Path, manifests: &[PathBuf], output: Format) -> ExitCode {
    let (old, new) = match (load(old_path), load(new_path)) {
        (Ok(old), Ok(new)) => (old, new),
        (old, new) => {
            let mut errors = Vec::new();
            for result in [old, new] {
                if let Err(InputErrors(e)) = result {
                    errors.extend(e);
                }
            }
            return InputErrors(errors).report();
        }
    };
    let report = compat::diff(&old.0.spec, &new.0.spec);
    let given = (!manifests.is_empty()).then(|| {
        crate::validate::validate_paths(manifests, &crate::validate::Options { partial: true })
    });
    if let Some(given) = &given
        && !given.is_ok()
    {
        return InputErrors(given.issues.iter().map(|i| i.to_string()).collect()).report();
    }
    let ns = new
        .0
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let contract_name = new.0.metadata.name.clone().unwrap_or_default();
    let (flows, rosters) = given
        .as_ref()
        .map(|g| {
            let with_ns = |m: &mut kube::core::ObjectMeta| {
                m.namespace.get_or_insert_with(|| "default".into());
            };
            let flows: Vec<crate::api::SyncFlow> = g
                .flows
                .iter()
                .map(|f| {
                    let mut f = f.object.clone();
                    with_ns(&mut f.metadata);
                    f
                })
                .collect();
            let rosters: Vec<crate::api::OwnershipRoster> = g
                .rosters
                .iter()
                .map(|r| {
                    let mut r = r.object.clone();
                    with_ns(&mut r.metadata);
                    r
                })
                .collect();
            (flows, rosters)
        })
        .unwrap_or_default();
    let fr: Vec<&crate::api::SyncFlow> = flows.iter().collect();
    let rr: Vec<&crate::api::OwnershipRoster> = rosters.iter().collect();
    let bound = crate::rollout::gates::bound_flows(&ns, &contract_name, &fr, &rr);
    let plan = crate::rollout::gates::plan(Some(&old.0.spec), &new.0.spec, &bound);
    let name = new
        .0
        .metadata
        .name
        .clone()
        .or(old.0.metadata.name.clone())
        .unwrap_or_default();
    match output {
        Format::Json => {
            let out = DiffOutput {
                contract: name,
                old_file: old_path.display().to_string(),
                new_file: new_path.display().to_string(),
                verdict: report.verdict(),
                allowed: report.is_allowed(),
                report: &report,
                gates: plan.to_json(),
            };
            println!(
                "{}",
                serde_json::to_string_pretty(&out).expect("a diff serialises")
            );
        }
        Format::Table => {
            print!("{}", diff_table(&name, &report));
            print!("{plan}");
            if given.is_none() {
                println!(
                    "     (pass --manifests with the flows and rosters to name the owners who must sign)"
                );
            }
        }
    }
    if report.is_allowed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(NOT_ALLOWED)
    }
}

fn diff_table(name: &str, report: &CompatReport) -> String {
    let mut out = format!(
        "contract {name}: {} → {} under {}\n",
        report.old_version,
        report.new_version,
        compat::mode_name(report.mode)
    );
    if report.changes.is_empty() {
        out.push_str("no changes\n");
    } else {
        let rows: Vec<[String; 5]> = report
            .changes
            .iter()
            .map(|c| {
                [
                    c.kind.label().to_string(),
                    c.path.clone(),
                    c.effect.label().to_string(),
                    if c.breaking { "yes" } else { "no" }.to_string(),
                    c.detail.clone(),
                ]
            })
            .collect();
        out.push_str(&table(
            &["CHANGE", "WHERE", "EFFECT", "BREAKING", "DETAIL"],
            &rows,
        ));
    }
    out.push_str(&format!(
        "verdict: {} (version step needed: {}, taken: {})\n",
        report.verdict(),
        report.required_bump.label(),
        report.actual_bump.label()
    ));
    if report.is_allowed() {
        out.push_str("allowed: the new version may replace the old one\n");
    } else {
        for problem in &report.problems {
            out.push_str(&format!("not allowed: {problem}\n"));
        }
    }
    out
}

fn table(header: &[&str], rows: &[[String; 5]]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// One failure shown as an example.
#[derive(Serialize)]
struct Example {
    line: usize,
    subject: String,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<String>,
}

#[derive(Serialize, Default)]
struct Group {
    count: usize,
    examples: Vec<Example>,
}

#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct CheckOutput {
    contract: String,
    version: String,
    content_hash: String,
    records: usize,
    accepted: usize,
    rejected: usize,
    held: usize,
    /// Rejections by reason label.
    reasons: BTreeMap<String, Group>,
    /// Holds by rule (and approver role).
    holds: BTreeMap<String, Group>,
    /// Warnings by rule.
    warnings: BTreeMap<String, Group>,
}

impl CheckOutput {
    fn add(
        groups: &mut BTreeMap<String, Group>,
        key: String,
        show: usize,
        example: impl FnOnce() -> Example,
    ) {
        let group = groups.entry(key).or_default();
        group.count += 1;
        if group.examples.len() < show {
            group.examples.push(example());
        }
    }

    fn record(&mut self, line: usize, outcome: &Outcome, show: usize) {
        self.records += 1;
        let warnings = match outcome {
            Outcome::Accepted { warnings, .. } => {
                self.accepted += 1;
                warnings.as_slice()
            }
            Outcome::Rejected { reasons } => {
                self.rejected += 1;
                for reason in reasons {
                    Self::add(
                        &mut self.reasons,
                        reason.code.label().to_string(),
                        show,
                        || example(line, reason),
                    );
                }
                &[]
            }
            Outcome::Held {
                rule,
                approver_role,
                message,
                warnings,
            } => {
                self.held += 1;
                Self::add(
                    &mut self.holds,
                    format!("{rule} (for {approver_role})"),
                    show,
                    || Example {
                        line,
                        subject: format!("rule {rule}"),
                        message: message.clone(),
                        value: None,
                    },
                );
                warnings.as_slice()
            }
        };
        for w in warnings {
            Self::add(&mut self.warnings, w.rule.clone(), show, || Example {
                line,
                subject: format!("rule {}", w.rule),
                message: w.message.clone(),
                value: None,
            });
        }
    }

    fn table(&self) -> String {
        let mut out = format!(
            "contract {} {} ({})\n",
            self.contract, self.version, self.content_hash
        );
        out.push_str(&format!(
            "records {}: accepted {}, rejected {}, held {}\n",
            self.records, self.accepted, self.rejected, self.held
        ));
        for (title, groups) in [
            ("rejected, by reason", &self.reasons),
            ("held, by rule", &self.holds),
            ("warnings, by rule", &self.warnings),
        ] {
            if groups.is_empty() {
                continue;
            }
            out.push_str(&format!("\n{title}:\n"));
            for (key, group) in groups {
                out.push_str(&format!("  {key}: {}\n", group.count));
                for e in &group.examples {
                    let value = e
                        .value
                        .as_deref()
                        .map(|v| format!(" (value {v})"))
                        .unwrap_or_default();
                    out.push_str(&format!(
                        "    line {}: {}: {}{value}\n",
                        e.line, e.subject, e.message
                    ));
                }
            }
        }
        out
    }
}

fn example(line: usize, reason: &Reason) -> Example {
    Example {
        line,
        subject: reason.subject.to_string(),
        message: reason.message.clone(),
        value: reason.value.clone(),
    }
}

fn check(
    file: &Path,
    records: &Path,
    lookups: Option<&Path>,
    flow: &str,
    show: usize,
    output: Format,
) -> ExitCode {
    let (manifest, compiled) = match load(file) {
        Ok(loaded) => loaded,
        Err(errors) => return errors.report(),
    };
    let tables = match lookups {
        None => Lookups::default(),
        Some(path) => {
            let bytes = match std::fs::read(path) {
                Ok(bytes) => bytes,
                Err(e) => {
                    return InputErrors(vec![format!("{}: cannot read: {e}", path.display())])
                        .report();
                }
            };
            match Lookups::from_json_bytes(&compiled, &bytes) {
                Ok(tables) => tables,
                Err(e) => return InputErrors(vec![format!("{}: {e}", path.display())]).report(),
            }
        }
    };
    let env = match compiled.env(flow, &tables) {
        Ok(env) => env,
        Err(e) => {
            return InputErrors(vec![format!(
                "{}: {e} (pass it with --lookups)",
                file.display()
            )])
            .report();
        }
    };
    let reader = match File::open(records) {
        Ok(f) => BufReader::new(f),
        Err(e) => {
            return InputErrors(vec![format!("{}: cannot read: {e}", records.display())]).report();
        }
    };
    let mut summary = CheckOutput {
        contract: manifest.metadata.name.clone().unwrap_or_default(),
        version: compiled.version().to_string(),
        content_hash: compiled.content_hash().to_string(),
        ..CheckOutput::default()
    };
    let limit = compiled.limits().max_record_bytes;
    let mut lines = BoundedLines { reader, limit };
    let mut number = 0;
    loop {
        let line = match lines.next_line() {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(e) => {
                return InputErrors(vec![format!("{}: cannot read: {e}", records.display())])
                    .report();
            }
        };
        number += 1;
        let outcome = match line {
            Line::Record(bytes) if bytes.iter().all(u8::is_ascii_whitespace) => continue,
            Line::Record(bytes) => compiled.process(&bytes, &env),
            // The line is not kept whole: it is refused as the engine would refuse it.
            Line::TooLong(size) => Outcome::rejected(Reason::new(
                ReasonCode::RecordTooLarge,
                Subject::Record,
                format!("record is {size} bytes, over the limit of {limit} bytes"),
            )),
        };
        summary.record(number, &outcome, show);
    }
    match output {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&summary).expect("a summary serialises")
        ),
        Format::Table => print!("{}", summary.table()),
    }
    ExitCode::SUCCESS
}

enum Line {
    Record(Vec<u8>),
    /// A line longer than the record limit, with its length; its bytes were read and dropped.
    TooLong(usize),
}

/// Reads lines without ever holding more than the record limit of one line in memory.
struct BoundedLines<R> {
    reader: R,
    limit: usize,
}

impl<R: BufRead> BoundedLines<R> {
    fn next_line(&mut self) -> std::io::Result<Option<Line>> {
        let mut buf = Vec::new();
        let read = (&mut self.reader)
            .take(self.limit as u64 + 1)
            .read_until(b'\n', &mut buf)?;
        if read == 0 {
            return Ok(None);
        }
        if buf.last() == Some(&b'\n') {
            buf.pop();
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
            return Ok(Some(Line::Record(buf)));
        }
        if buf.len() <= self.limit {
            return Ok(Some(Line::Record(buf))); // the last line, without a newline
        }
        // Too long: skip to the end of the line, counting.
        let mut size = buf.len();
        drop(buf);
        loop {
            let chunk = self.reader.fill_buf()?;
            if chunk.is_empty() {
                break;
            }
            match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    size += i;
                    self.reader.consume(i + 1);
                    break;
                }
                None => {
                    let n = chunk.len();
                    size += n;
                    self.reader.consume(n);
                }
            }
        }
        Ok(Some(Line::TooLong(size)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lines_are_measured_without_being_kept() {
        let mut input = Vec::new();
        input.extend_from_slice(b"{\"a\":1}\n");
        input.extend(std::iter::repeat_n(b'x', 10_000));
        input.extend_from_slice(b"\n{\"b\":2}");
        let mut lines = BoundedLines {
            reader: BufReader::with_capacity(64, input.as_slice()),
            limit: 100,
        };
        assert!(matches!(lines.next_line().unwrap(), Some(Line::Record(r)) if r == b"{\"a\":1}"));
        assert!(matches!(
            lines.next_line().unwrap(),
            Some(Line::TooLong(10_000))
        ));
        assert!(matches!(lines.next_line().unwrap(), Some(Line::Record(r)) if r == b"{\"b\":2}"));
        assert!(lines.next_line().unwrap().is_none());
    }
}
