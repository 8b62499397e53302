//! The default scenario: what the operating model promises, exercised on the stand-ins. A stream of
//! closed-won deals, a duplicate webhook, a price drift the contract rejects, a discount held for finance and
//! approved through the API a person would use, an ERP outage with recovery, and an order the ERP rejects.
//! Then three contract changes through the gates a cluster applies: one stopped at the compatibility gate,
//! one canaried step by step and promoted, one rolled back by the canary's analysis (see `super::canary`),
//! with deals still closing; the reconciliation at the end covers every deal of every phase.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::{Value, json};

use super::canary::{self, CanaryRun, Deals};
use super::{DevEnv, DevError};
use crate::rollout::gates;
use crate::sim::crm::{DealKind, opportunity};
use crate::sim::erp::Failure;

#[derive(Debug, Clone)]
pub struct ScenarioOptions {
    pub records: usize,
    /// Deals per second.
    pub rate: f64,
    /// Draw the live progress bar (off in tests and when stderr is not a terminal).
    pub progress: bool,
    /// Longest each phase (the deals and their settling, each canary, the final settling) may take before the
    /// scenario is declared stuck.
    pub timeout: Duration,
}

impl Default for ScenarioOptions {
    fn default() -> Self {
        ScenarioOptions {
            records: 200,
            rate: 100.0,
            progress: true,
            timeout: Duration::from_secs(120),
        }
    }
}

/// One deal the reconciliation could not find in the ERP, and why.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Explained {
    pub opportunity: String,
    pub record: Option<i64>,
    pub state: String,
    pub reason: String,
}

/// What the scenario measured, with the reconciliation.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub flow: String,
    pub deals_closed: usize,
    pub webhooks_sent: u64,
    pub erp_orders: usize,
    pub erp_upserts: u64,
    pub erp_throttled: u64,
    pub erp_rejected: u64,
    pub status: crate::worker::api::WorkerStatus,
    pub approvals: usize,
    /// Webhook deliveries the ledger recognised as ones it already had.
    pub duplicates: u64,
    /// What the real reconciliation audit left unexplained (its ids), or why it could not reconcile.
    pub unexplained: Vec<String>,
    /// The ledger's reason for each deal the ERP does not have (the detail behind the audit's counts).
    pub explained: Vec<Explained>,
    /// The reconciliation audit the worker ran at the end, as the nightly CronJob asks for it.
    pub audit: Option<crate::api::FlowAuditStatus>,
    /// The worker's operations port.
    pub ops_url: String,
    /// The file with the token the operations port asks for.
    pub token_file: String,
    pub elapsed_seconds: f64,
    /// Two contract changes played through the gates against this run's ledger.
    pub contract_changes: Vec<ContractChange>,
    /// The run's exceptions as tickets, and what the local ticket receiver got.
    pub tickets: TicketsReport,
}

/// The tickets of the run: one per cause, as the ledger has them and as the receiver got them.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TicketsReport {
    pub tickets: Vec<TicketReport>,
    /// Per owner, from the worker's `/status`.
    pub owners: Vec<OwnerTickets>,
    /// The ticket the scenario acknowledged, and as whom.
    pub acknowledged: Option<(String, String)>,
    /// Resends the receiver recognised by their `Idempotency-Key` and did not record twice.
    pub duplicates: u64,
    /// Requests the receiver refused (a bad signature, a key not matching the body).
    pub refused: u64,
}

/// One ticket: its cause, who has it, where it ended, and the events the receiver got, in order.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TicketReport {
    pub fingerprint: String,
    pub kind: String,
    pub reason: String,
    pub owner: String,
    /// `open`, `acknowledged` or `resolved`.
    pub state: String,
    pub count: u64,
    pub outstanding: u64,
    pub acknowledged_by: Option<String>,
    /// The receiver's events for it (`opened`, `updated`, `resolved`), in arrival order.
    pub events: Vec<String>,
    pub sinks: Vec<String>,
}

/// One owner's tickets and times, as the worker's `/status` counts them.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OwnerTickets {
    pub owner: String,
    pub opened: i64,
    pub acknowledged: i64,
    pub resolved: i64,
    pub open: i64,
    pub time_to_acknowledge_seconds: Option<i64>,
    pub time_to_resolve_seconds: Option<i64>,
}

/// One contract change and how the gates judged it (what the controller would do on a cluster).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ContractChange {
    pub title: String,
    pub from_version: String,
    pub version: String,
    pub content_hash: String,
    /// The gate that stopped it (`compatibility`, `sign-off`, `preflight`), if one did.
    pub blocked_at: Option<String>,
    /// Why, in the gate's words.
    pub reason: Option<String>,
    /// The roster owners whose sign-off the change carries.
    pub signed_off_by: Vec<String>,
    /// The preflight replay of this run's records through the active and the candidate contract.
    pub preflight: Option<crate::rollout::replay::Report>,
    /// The canary rollout of a change that passed its gates: its steps and analysis, then the promotion or
    /// the rollback.
    pub canary: Option<CanaryRun>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.status.counters;
        writeln!(
            f,
            "\nMeshline dev: flow {} finished in {:.1}s",
            self.flow, self.elapsed_seconds
        )?;
        writeln!(
            f,
            "  received {}  delivered {}  held {}  dead-lettered {}  retried {}  failed {}",
            c.received, c.delivered, c.held, c.dead_lettered, c.retried, c.failed
        )?;
        writeln!(
            f,
            "  failure rate {}  MTTR {}  manual interventions per 1,000 records {}",
            self.status.failure_rate,
            self.status
                .mttr_seconds
                .map(|s| format!("{s}s"))
                .unwrap_or_else(|| "n/a".into()),
            self.status.manual_interventions_per_1k
        )?;
        writeln!(
            f,
            "  CRM stand-in: {} webhook requests; {} duplicate records recognised and not processed again",
            self.webhooks_sent, self.duplicates
        )?;
        writeln!(
            f,
            "  held for approval, then approved by finance through the API: {}",
            self.approvals
        )?;
        writeln!(
            f,
            "  ERP stand-in: {} upserts, {} answered 429 (concurrency limit), {} rejected",
            self.erp_upserts, self.erp_throttled, self.erp_rejected
        )?;
        let verdict = if self.unexplained.is_empty() {
            "reconciled"
        } else {
            "NOT RECONCILED"
        };
        match &self.audit {
            Some(a) => {
                let totals = |t: &std::collections::BTreeMap<String, String>| {
                    t.iter()
                        .map(|(c, v)| format!("{v} {c}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let explained = a
                    .explained
                    .iter()
                    .map(|(k, n)| format!("{n} {k}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                writeln!(
                    f,
                    "  reconciliation audit (run {}): {} deals closed in the CRM ({}), {} orders in the ERP ({}), {} matched, explained: {}, unexplained: {}: {verdict}",
                    a.run,
                    a.crm.count,
                    totals(&a.crm.totals),
                    a.erp.count,
                    totals(&a.erp.totals),
                    a.matched,
                    if explained.is_empty() {
                        "none".into()
                    } else {
                        explained
                    },
                    a.unexplained
                )?;
            }
            None => writeln!(f, "  reconciliation audit: did not run: {verdict}")?,
        }
        for e in &self.explained {
            writeln!(
                f,
                "    - {} (record {}): {} — {}",
                e.opportunity,
                e.record.map(|r| r.to_string()).unwrap_or_default(),
                e.state,
                e.reason
            )?;
        }
        for u in &self.unexplained {
            writeln!(
                f,
                "    ! {u}: a difference between CRM and ERP the ledger does not explain"
            )?;
        }
        if !self.contract_changes.is_empty() {
            writeln!(
                f,
                "  contract changes, through the gates a cluster applies:"
            )?;
        }
        for c in &self.contract_changes {
            writeln!(
                f,
                "    - {} ({} → {}, {}):",
                c.title,
                c.from_version,
                c.version,
                &c.content_hash[..c.content_hash.len().min(19)]
            )?;
            match (&c.blocked_at, &c.preflight) {
                (Some(gate), _) => writeln!(
                    f,
                    "      BLOCKED at the {gate} gate: {}; the flow keeps running {}",
                    c.reason.as_deref().unwrap_or_default(),
                    c.from_version
                )?,
                (None, Some(p)) => {
                    writeln!(
                        f,
                        "      compatible; signed off by {}; preflight {}: {} records replayed, {} newly rejected, {} newly held, {} newly accepted, {} outputs changed",
                        c.signed_off_by.join(", "),
                        if p.passed() { "passed" } else { "FAILED" },
                        p.records,
                        p.newly_rejected,
                        p.newly_held,
                        p.newly_accepted,
                        p.changed_outputs
                    )?;
                    for path in &p.changed_paths {
                        writeln!(f, "        {}: {} records", path.path, path.records)?;
                    }
                    if c.canary.is_none() {
                        writeln!(
                            f,
                            "      {}",
                            if p.passed() {
                                "it would become the active revision"
                            } else {
                                "it would be rejected; the flow keeps running the active revision"
                            }
                        )?;
                    }
                }
                (None, None) => {}
            }
            if let Some(run) = &c.canary {
                write_canary(f, run)?;
            }
        }
        write_tickets(f, &self.tickets)?;
        if let Some(first) = self.explained.iter().find_map(|e| e.record) {
            // The scenario's worker stops with the report; the same command without `--scenario` (and without
            // `--fresh`) serves this run's ledger again, which is what the two commands below talk to.
            writeln!(
                f,
                "  to look around, run the same command without --scenario and --fresh (it keeps this ledger), then:"
            )?;
            writeln!(
                f,
                "  a record's whole story: curl -s -H \"Authorization: Bearer $(cat {})\" {}/records/{first}",
                self.token_file, self.ops_url
            )?;
            writeln!(
                f,
                "  dead letters:           meshline dlq list --url {} --token-file {}",
                self.ops_url, self.token_file
            )?;
        }
        Ok(())
    }
}

fn write_tickets(f: &mut fmt::Formatter<'_>, t: &TicketsReport) -> fmt::Result {
    writeln!(
        f,
        "  Tickets: {} (one per cause), sent to the local webhook ticket sink; {} resends recognised by their Idempotency-Key, {} requests refused",
        t.tickets.len(),
        t.duplicates,
        t.refused
    )?;
    for ticket in &t.tickets {
        writeln!(
            f,
            "    - {} {} → {}: {} (count {}, outstanding {}){}",
            ticket.kind,
            ticket.reason,
            ticket.owner,
            ticket.state,
            ticket.count,
            ticket.outstanding,
            ticket
                .acknowledged_by
                .as_ref()
                .map(|by| format!(", acknowledged by {by}"))
                .unwrap_or_default()
        )?;
        writeln!(
            f,
            "      received by {}: {}",
            if ticket.sinks.is_empty() {
                "no sink".to_string()
            } else {
                ticket.sinks.join(", ")
            },
            if ticket.events.is_empty() {
                "nothing yet".to_string()
            } else {
                ticket.events.join(" → ")
            }
        )?;
    }
    let secs = |s: Option<i64>| s.map(|s| format!("{s}s")).unwrap_or_else(|| "n/a".into());
    for o in &t.owners {
        writeln!(
            f,
            "    {}: {} opened, {} acknowledged, {} resolved, {} open; time to acknowledge {}, time to resolve {}",
            o.owner,
            o.opened,
            o.acknowledged,
            o.resolved,
            o.open,
            secs(o.time_to_acknowledge_seconds),
            secs(o.time_to_resolve_seconds)
        )?;
    }
    Ok(())
}

fn write_canary(f: &mut fmt::Formatter<'_>, run: &CanaryRun) -> fmt::Result {
    writeln!(
        f,
        "      canary of {} beside stable {} ({} deals closed meanwhile):",
        run.revision, run.stable_revision, run.deals_sent
    )?;
    for step in &run.steps {
        writeln!(
            f,
            "        step {}: {}% of the buckets",
            step.step, step.weight
        )?;
        for m in &step.measurements {
            let figures = |t: &Option<crate::api::TrackMeasures>| {
                t.as_ref()
                    .map(|t| {
                        format!(
                            "{} records, {} delivered, {} dead-lettered, failure rate {}, dead-letter rate {}, p99 {}",
                            t.records,
                            t.delivered,
                            t.dead_lettered,
                            t.failure_rate,
                            t.dead_letter_rate,
                            t.p99_ms.map(|p| format!("≤{p} ms")).unwrap_or_else(|| "n/a".into())
                        )
                    })
                    .unwrap_or_else(|| "not measured".into())
            };
            writeln!(f, "          analysis {}:", m.verdict)?;
            writeln!(f, "            canary: {}", figures(&m.canary))?;
            writeln!(f, "            stable: {}", figures(&m.stable))?;
        }
    }
    match run.phase.as_str() {
        crate::rollout::canary::PROMOTED => writeln!(
            f,
            "      PROMOTED: {} is the active revision on the stable track; the canary is removed",
            run.revision
        ),
        _ => writeln!(
            f,
            "      ROLLED BACK ({}): {}; the canary worker is stopped, {} of its leases released to stable, revision {} rejected",
            run.reason.as_deref().unwrap_or("Aborted"),
            run.message.as_deref().unwrap_or_default(),
            run.leases_released,
            run.revision
        ),
    }
}

async fn get(env: &DevEnv, path: &str) -> Result<Value, DevError> {
    let url = format!("{}{path}", env.ops_url());
    reqwest::Client::new()
        .get(&url)
        .bearer_auth(&env.token)
        .send()
        .await
        .map_err(|e| DevError::Scenario(format!("{url}: {e}")))?
        .json()
        .await
        .map_err(|e| DevError::Scenario(format!("{url}: {e}")))
}

async fn status(env: &DevEnv) -> Result<crate::worker::api::WorkerStatus, DevError> {
    crate::worker::api::compute_status(&env.worker.pipeline)
        .await
        .map_err(|e| DevError::Scenario(e.to_string()))
}

fn kind_of(n: usize, total: usize) -> DealKind {
    let at = |i: usize| i % total;
    if n == at(7) {
        DealKind::PriceDrift
    } else if n == at(13) {
        DealKind::ErpRejects
    } else if n == at(21) {
        DealKind::BigDiscount
    } else {
        DealKind::Normal
    }
}

/// Runs the default scenario against a started environment and reconciles CRM with ERP at the end.
pub async fn run(env: &mut DevEnv, options: &ScenarioOptions) -> Result<Report, DevError> {
    if options.records < 25 {
        return Err(DevError::Scenario(
            "--records must be at least 25 for the default scenario".into(),
        ));
    }
    if !(options.rate > 0.0 && options.rate <= 100_000.0) {
        return Err(DevError::Scenario(
            "--rate must be between 0 and 100000 deals per second".into(),
        ));
    }
    let started = Instant::now();
    let pricebook: Vec<(String, Decimal)> = env
        .erp
        .pricebook
        .iter()
        .map(|(k, (p, _))| (k.clone(), *p))
        .collect();
    let bar = ProgressBar::with_draw_target(
        Some(options.records as u64),
        if options.progress {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} delivered  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );

    let batch_size = 10usize;
    let interval = Duration::from_secs_f64(batch_size as f64 / options.rate);
    let outage_at = options.records * 2 / 5;
    let mut duplicate: Option<Vec<Value>> = None;
    let mut next = Instant::now();
    for start in (0..options.records).step_by(batch_size) {
        let batch: Vec<Value> = (start..(start + batch_size).min(options.records))
            .map(|n| opportunity(n, kind_of(n, options.records), &pricebook))
            .collect();
        if start <= outage_at && outage_at < start + batch_size {
            // The ERP goes down for maintenance for a few seconds.
            env.erp
                .fail_for(Failure::Unavailable, Duration::from_secs(3));
        }
        env.crm
            .send(&batch, Duration::from_secs(60))
            .await
            .map_err(DevError::Scenario)?;
        if start == 0 {
            duplicate = Some(batch.clone());
        }
        progress(env, &bar).await;
        next += interval;
        tokio::time::sleep_until(next.into()).await;
    }
    // The CRM retries a webhook it already delivered (its acknowledgement got lost).
    if let Some(dup) = duplicate {
        env.crm
            .send(&dup, Duration::from_secs(60))
            .await
            .map_err(DevError::Scenario)?;
    }

    // Finance approves the held discount through the same API a person would use.
    let deadline = Instant::now() + options.timeout;
    let approvals = settle(env, &bar, deadline, true).await?;
    // The owner a dead-letter ticket went to takes it, as themselves.
    let acknowledged = match acknowledge_one(env, deadline).await {
        Ok(a) => a,
        Err(e) => {
            bar.abandon();
            return Err(e);
        }
    };
    let mut deals = Deals {
        next: options.records,
        pricebook,
    };
    let changes = contract_changes(env, &mut deals, options.timeout).await;
    let changes = match changes {
        Ok(c) => c,
        Err(e) => {
            bar.abandon();
            return Err(e);
        }
    };
    // The deals closed during the canaries settle too, so the reconciliation covers them.
    let approvals = approvals + settle(env, &bar, Instant::now() + options.timeout, false).await?;
    report_rejections(env, &changes).await?;
    bar.finish_and_clear();
    let mut report = reconcile(env, approvals, started).await?;
    report.tickets = tickets(env, acknowledged, Instant::now() + options.timeout).await?;
    report.contract_changes = changes;
    report.elapsed_seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The first roster owner holding `role`, with their personal token for this run.
fn approver<'a>(env: &'a DevEnv, role: &str) -> Option<(&'a str, &'a str)> {
    let roster = env.rendered.roster.as_ref()?;
    roster
        .spec
        .owners
        .iter()
        .filter(|o| crate::worker::identity::holds_role(o, role))
        .find_map(|o| Some((o.id.as_str(), env.identities.get(&o.id)?.as_str())))
}

/// Waits until every record is finished, approving what is held through the API a person would use; with
/// `need_approval`, until at least one approval was made (the scenario's held discount). Returns approvals.
async fn settle(
    env: &DevEnv,
    bar: &ProgressBar,
    deadline: Instant,
    need_approval: bool,
) -> Result<usize, DevError> {
    let mut approvals = 0;
    loop {
        progress(env, bar).await;
        let s = status(env).await?;
        if s.counters.held > 0 {
            let holds = get(env, "/holds").await?;
            for item in holds["items"].as_array().cloned().unwrap_or_default() {
                let id = item["id"].as_i64().unwrap_or_default();
                // The owner who holds the record's approver role decides, with their own token.
                let role = item["hold_role"].as_str().unwrap_or_default();
                let Some((owner, token)) = approver(env, role) else {
                    bar.abandon();
                    return Err(DevError::Scenario(format!(
                        "record {id} waits for approver role {role:?}, which no owner of the roster holds"
                    )));
                };
                let resp = reqwest::Client::new()
                    .post(format!("{}/records/{id}/approve", env.ops_url()))
                    .bearer_auth(&env.token)
                    .header(crate::worker::identity::IDENTITY_HEADER, token)
                    .json(&json!({"by": owner, "reason": "strategic account, discount agreed"}))
                    .send()
                    .await
                    .map_err(|e| DevError::Scenario(e.to_string()))?;
                if resp.status().is_success() {
                    approvals += 1;
                }
            }
        }
        let settled = s.pending == 0 && s.counters.held == 0 && (approvals > 0 || !need_approval);
        if settled {
            return Ok(approvals);
        }
        if Instant::now() > deadline {
            bar.abandon();
            return Err(DevError::Scenario(format!(
                "the scenario did not settle in time: {s:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Three edits of the flow's contract, judged as the controller judges them: a breaking change under a minor
/// version (stopped at the compatibility gate); a compatible one (a new ERP field) that the roster's owners
/// sign, that a preflight replays over this run's records through the worker's operations API, and that a
/// canary rolls out step by step and promotes; then one whose items the ERP rejects, which passes the
/// preflight (the contract accepts every record) and is rolled back by the canary's analysis.
async fn contract_changes(
    env: &mut DevEnv,
    deals: &mut Deals,
    timeout: Duration,
) -> Result<Vec<ContractChange>, DevError> {
    use crate::rollout::gates::Compatibility;
    let scenario = |e: String| DevError::Scenario(format!("contract change: {e}"));
    let rendered = &env.rendered;
    let active = rendered.contract.spec.clone();
    let ns = rendered
        .flow
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let mut flow = rendered.flow.clone();
    flow.metadata.namespace = Some(ns.clone());
    let roster = rendered.roster.clone().map(|mut r| {
        r.metadata.namespace = Some(ns.clone());
        r
    });
    let flows = [&flow];
    let rosters: Vec<&crate::api::OwnershipRoster> = roster.iter().collect();
    let contract = rendered.contract.metadata.name.clone().unwrap_or_default();
    let bound = gates::bound_flows(&ns, &contract, &flows, &rosters);
    let v = semver::Version::parse(&active.version).map_err(|e| scenario(e.to_string()))?;
    let next = format!("{}.{}.0", v.major, v.minor + 1);
    let mut out = Vec::new();

    // 1. A new required field under a minor version: records the active version accepted would be refused.
    let mut breaking = active.clone();
    breaking.version = next.clone();
    breaking.sign_offs.clear();
    breaking.fields.push(
        serde_json::from_value(
            json!({"name": "deliveryRegion", "type": "string", "required": true}),
        )
        .map_err(|e| scenario(e.to_string()))?,
    );
    let plan = gates::plan(Some(&active), &breaking, &bound);
    let reason = match &plan.compatibility {
        Compatibility::Refused { reason, problems } => {
            Some(format!("{reason}: {}", problems.join("; ")))
        }
        _ => None,
    };
    out.push(ContractChange {
        title: "a new required field under a minor version".into(),
        from_version: active.version.clone(),
        version: next.clone(),
        content_hash: plan.hash.clone(),
        blocked_at: reason.as_ref().map(|_| "compatibility".to_string()),
        reason,
        signed_off_by: Vec::new(),
        preflight: None,
        canary: None,
    });

    // 2. A new ERP field: compatible, signed by the roster's owners, replayed, then canaried and promoted.
    let mut compatible = active.clone();
    compatible.version = next.clone();
    compatible.mapping.fields.push(
        serde_json::from_value(
            json!({"target": "custbody_meshline_channel", "expression": "'crm-webhook'"}),
        )
        .map_err(|e| scenario(e.to_string()))?,
    );
    let (mut change, compatible) =
        through_gates(env, &active, compatible, "a new ERP field", &bound).await?;
    let promotable = change.blocked_at.is_none();
    if promotable {
        change.canary = Some(canary::play(env, &compatible, deals, timeout).await?);
    }
    let promoted = change
        .canary
        .as_ref()
        .is_some_and(|c| c.phase == crate::rollout::canary::PROMOTED);
    out.push(change);
    if !promoted {
        return Ok(out);
    }

    // 3. Items referenced by a SKU naming the ERP does not know: the contract accepts every record (so the
    // preflight passes), the ERP rejects each one, and only the canary's analysis can tell. A changed mapping
    // expression may send the ERP other values, so the compatibility gate asks for a new major version.
    let active = env.rendered.contract.spec.clone();
    let v = semver::Version::parse(&active.version).map_err(|e| scenario(e.to_string()))?;
    let mut renamed = active.clone();
    renamed.version = format!("{}.0.0", v.major + 1);
    let items = renamed
        .mapping
        .fields
        .iter_mut()
        .find(|f| f.target == "item.items")
        .ok_or_else(|| scenario("the example's mapping has no item.items".into()))?;
    items.expression = items.expression.replace("l.sku", "\"NS-\" + l.sku");
    let (mut change, renamed) = through_gates(
        env,
        &active,
        renamed,
        "items referenced by a SKU naming the ERP does not know",
        &bound,
    )
    .await?;
    if change.blocked_at.is_none() {
        change.canary = Some(canary::play(env, &renamed, deals, timeout).await?);
    }
    out.push(change);
    Ok(out)
}

/// A candidate through the gates a cluster applies after the compatibility check: the roster owners sign
/// it, and a preflight replays this run's records through the active and the candidate contract via the
/// worker's operations API. Returns the change and the signed candidate.
async fn through_gates(
    env: &DevEnv,
    active: &crate::api::SyncContractSpec,
    mut candidate: crate::api::SyncContractSpec,
    title: &str,
    bound: &[gates::BoundFlow<'_>],
) -> Result<(ContractChange, crate::api::SyncContractSpec), DevError> {
    use crate::rollout::gates::Compatibility;
    let scenario = |e: String| DevError::Scenario(format!("contract change: {e}"));
    let rendered = &env.rendered;
    let next = candidate.version.clone();
    candidate.sign_offs.clear();
    let hash = crate::contract::content_hash(&candidate)
        .as_str()
        .to_string();
    let owners: std::collections::BTreeSet<String> = gates::sign_offs(&candidate, &hash, bound)
        .required
        .into_iter()
        .map(|s| s.owner)
        .collect();
    for owner in &owners {
        candidate.sign_offs.push(crate::api::SignOff {
            owner: owner.clone(),
            version: next.clone(),
            content_hash: Some(hash.clone()),
            role: None,
            approved_at: None,
        });
    }
    let plan = gates::plan(Some(active), &candidate, bound);
    let mut change = ContractChange {
        title: title.into(),
        from_version: active.version.clone(),
        version: next.clone(),
        content_hash: hash,
        blocked_at: None,
        reason: None,
        signed_off_by: plan.sign_offs.signed.iter().cloned().collect(),
        preflight: None,
        canary: None,
    };
    if let Compatibility::Refused { reason, problems } = &plan.compatibility {
        change.blocked_at = Some("compatibility".into());
        change.reason = Some(format!("{reason}: {}", problems.join("; ")));
    } else if !plan.sign_offs.passed() {
        change.blocked_at = Some("sign-off".into());
        change.reason = Some(plan.sign_offs.message(&next, &plan.hash));
    } else {
        let dir = env.state_dir.join("preflight");
        let write = |name: &str, text: String| -> Result<PathBuf, DevError> {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(|e| DevError::State {
                dir: dir.display().to_string(),
                reason: e.to_string(),
            })?;
            Ok(path)
        };
        std::fs::create_dir_all(&dir).map_err(|e| DevError::State {
            dir: dir.display().to_string(),
            reason: e.to_string(),
        })?;
        let config = write(
            "flow.yaml",
            serde_yaml::to_string(rendered).map_err(|e| scenario(e.to_string()))?,
        )?;
        let candidate_file = write(
            "candidate.yaml",
            serde_yaml::to_string(&candidate).map_err(|e| scenario(e.to_string()))?,
        )?;
        let args = crate::cli::replay::ReplayArgs {
            config,
            candidate: candidate_file,
            records: Some(1000),
            max_newly_rejected: 0,
            max_changed_outputs: None,
            from_worker: Some(env.ops_url()),
            token_file: Some(env.token_file()),
            report: dir.join("report.json"),
            output: crate::cli::Output::Text,
            state_dir: env.state_dir.join("ledger"),
            secrets_dir: Some(env.state_dir.join("secrets")),
            lookups_dir: None,
        };
        let report = crate::cli::replay::run_replay(&args)
            .await
            .map_err(scenario)?;
        if !report.passed() {
            change.blocked_at = Some("preflight".into());
            change.reason = report.reason.clone();
        }
        change.preflight = Some(report);
    }
    Ok((change, candidate))
}

async fn progress(env: &DevEnv, bar: &ProgressBar) {
    if let Ok(s) = status(env).await {
        let c = &s.counters;
        bar.set_position(c.delivered.max(0) as u64);
        bar.set_message(format!(
            "received {} held {} dead {} retries {}",
            c.received, c.held, c.dead_lettered, c.retried
        ));
    }
}

/// Runs the real reconciliation audit through the worker's operations API, as the nightly CronJob does
/// (`meshline audit FLOW`), and waits for its result.
async fn audit(env: &DevEnv) -> Result<crate::api::FlowAuditStatus, DevError> {
    let url = format!("{}/audit/runs", env.ops_url());
    let answer = reqwest::Client::new()
        .post(&url)
        .bearer_auth(&env.token)
        .send()
        .await
        .map_err(|e| DevError::Scenario(format!("{url}: {e}")))?;
    let code = answer.status();
    let body: Value = answer
        .json()
        .await
        .map_err(|e| DevError::Scenario(format!("{url}: {e}")))?;
    let Some(run) = body["run"].as_i64().filter(|_| code.is_success()) else {
        return Err(DevError::Scenario(format!(
            "POST {url} answered {code}: {body}"
        )));
    };
    // A safety net against a run that never ends, not a verdict: the audit's own retries end a run first.
    let give_up = Instant::now() + Duration::from_secs(600);
    loop {
        let view: crate::worker::audit_routes::AuditRunView =
            serde_json::from_value(get(env, &format!("/audit/runs/{run}")).await?)
                .map_err(|e| DevError::Scenario(format!("/audit/runs/{run}: {e}")))?;
        if let (true, Some(result)) = (view.state == "finished", view.result) {
            return Ok(result);
        }
        if Instant::now() > give_up {
            return Err(DevError::Scenario(format!(
                "audit run {run} still running after 10 minutes ({} CRM pages, {} ERP pages read)",
                view.crm.pages, view.erp.pages
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// CRM deals vs ERP orders: the audit's verdict, and the ledger's reason for each deal the ERP lacks.
async fn reconcile(env: &DevEnv, approvals: usize, started: Instant) -> Result<Report, DevError> {
    let audit = audit(env).await?;
    let closed = env
        .crm
        .closed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let orders: BTreeMap<String, Value> = env
        .erp
        .orders
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut dead: BTreeMap<String, (i64, String)> = BTreeMap::new();
    let mut after: Option<i64> = None;
    loop {
        let path = match after {
            Some(a) => format!("/dead-letters?limit=1000&after={a}"),
            None => "/dead-letters?limit=1000".into(),
        };
        let page = get(env, &path).await?;
        let items = page["items"].as_array().cloned().unwrap_or_default();
        for i in &items {
            let key = i["source_key"].as_str().unwrap_or_default().to_string();
            let reason = format!(
                "{}: {}",
                i["dead_letter_reason"].as_str().unwrap_or("?"),
                i["erp_response"]
                    .as_str()
                    .or(i["last_error"].as_str())
                    .unwrap_or("")
                    .lines()
                    .last()
                    .unwrap_or("")
            );
            dead.insert(key, (i["id"].as_i64().unwrap_or_default(), reason));
        }
        match page["next"].as_i64() {
            Some(n) if !items.is_empty() => after = Some(n),
            _ => break,
        }
    }
    let held = get(env, "/holds").await?;
    let held_keys: BTreeMap<String, i64> = held["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|i| {
            (
                i["source_key"].as_str().unwrap_or_default().to_string(),
                i["id"].as_i64().unwrap_or_default(),
            )
        })
        .collect();
    let mut explained = Vec::new();
    let mut unexplained = Vec::new();
    for id in &closed {
        if orders.contains_key(&format!("SF-{id}")) {
            continue;
        }
        if let Some((record, reason)) = dead.get(id) {
            explained.push(Explained {
                opportunity: id.clone(),
                record: Some(*record),
                state: "dead-lettered".into(),
                reason: reason.clone(),
            });
        } else if let Some(record) = held_keys.get(id) {
            explained.push(Explained {
                opportunity: id.clone(),
                record: Some(*record),
                state: "held".into(),
                reason: "waiting for approval".into(),
            });
        } else {
            unexplained.push(id.clone());
        }
    }
    Ok(Report {
        flow: env.flow.clone(),
        deals_closed: closed.len(),
        webhooks_sent: env
            .crm
            .webhook_attempts
            .load(std::sync::atomic::Ordering::Relaxed),
        erp_orders: orders.len(),
        erp_upserts: env.erp.upserts.load(std::sync::atomic::Ordering::Relaxed),
        erp_throttled: env.erp.throttled.load(std::sync::atomic::Ordering::Relaxed),
        erp_rejected: env.erp.rejected.load(std::sync::atomic::Ordering::Relaxed),
        status: status(env).await?,
        approvals,
        duplicates: env.worker.pipeline.metrics.duplicates.get() + env.retired_duplicates,
        unexplained: match audit.outcome {
            Some(crate::api::AuditOutcome::Reconciled) => Vec::new(),
            Some(crate::api::AuditOutcome::Partial) => vec![format!(
                "audit run {} is partial: {}",
                audit.run,
                audit.partial_reason.clone().unwrap_or_default()
            )],
            _ if audit.unexplained_ids.is_empty() => {
                vec![format!(
                    "audit run {}: {} unexplained",
                    audit.run, audit.unexplained
                )]
            }
            _ => audit.unexplained_ids.clone(),
        },
        explained,
        audit: Some(audit),
        ops_url: env.ops_url(),
        token_file: env.token_file().display().to_string(),
        elapsed_seconds: started.elapsed().as_secs_f64(),
        contract_changes: Vec::new(),
        tickets: TicketsReport::default(),
    })
}

/// The open dead-letter ticket a person acknowledges: the first whose owner has a token in this run.
/// Returns the ticket's fingerprint and the owner.
async fn acknowledge_one(
    env: &DevEnv,
    deadline: Instant,
) -> Result<Option<(String, String)>, DevError> {
    loop {
        let open = get(env, "/tickets").await?;
        let candidate = open.as_array().into_iter().flatten().find_map(|t| {
            let owner = t["owner"]["id"].as_str()?;
            let token = env.identities.get(owner)?;
            (t["kind"] == "dead_letter" && t["state"] == "open").then(|| {
                (
                    t["fingerprint"].as_str().unwrap_or_default().to_string(),
                    owner.to_string(),
                    token.clone(),
                )
            })
        });
        if let Some((fingerprint, owner, token)) = candidate {
            let url = format!("{}/tickets/{fingerprint}/acknowledge", env.ops_url());
            let resp = reqwest::Client::new()
                .post(&url)
                .bearer_auth(&env.token)
                .header(crate::worker::identity::IDENTITY_HEADER, token)
                .send()
                .await
                .map_err(|e| DevError::Scenario(format!("{url}: {e}")))?;
            if !resp.status().is_success() {
                let status = resp.status();
                let body = resp.text().await.unwrap_or_default();
                return Err(DevError::Scenario(format!(
                    "acknowledging ticket {fingerprint} as {owner}: HTTP {status}: {body}"
                )));
            }
            return Ok(Some((fingerprint, owner)));
        }
        if Instant::now() > deadline {
            // A scenario without a dead letter has nothing to acknowledge; that is not a failure.
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reports a contract change the canary rolled back as the controller would (`PUT /exceptions`), so the
/// rejection becomes a ticket beside the records' exceptions. It stays open: on a cluster it clears when
/// someone fixes or rolls back the contract's spec.
async fn report_rejections(env: &DevEnv, changes: &[ContractChange]) -> Result<(), DevError> {
    let causes: Vec<crate::tickets::ReportedCause> = changes
        .iter()
        .filter_map(|c| {
            let run = c.canary.as_ref()?;
            (run.phase != crate::rollout::canary::PROMOTED).then(|| {
                let why = run.reason.as_deref().unwrap_or("Aborted");
                crate::tickets::ReportedCause {
                    kind: crate::tickets::ExceptionKind::ContractRejected,
                    class: Some(crate::api::ErrorClass::Config),
                    reason: format!("contract:{why}:{}", c.version),
                    summary: format!(
                        "contract version {} was rolled back by its canary ({why}){}; the flow keeps running {}",
                        c.version,
                        run.message
                            .as_deref()
                            .map(|m| format!(": {m}"))
                            .unwrap_or_default(),
                        c.from_version
                    ),
                }
            })
        })
        .collect();
    if causes.is_empty() {
        return Ok(());
    }
    let url = format!("{}/exceptions", env.ops_url());
    let resp = reqwest::Client::new()
        .put(&url)
        .bearer_auth(&env.token)
        .json(&crate::tickets::ReportedCauses { causes })
        .send()
        .await
        .map_err(|e| DevError::Scenario(format!("{url}: {e}")))?;
    if !resp.status().is_success() {
        let status = resp.status();
        return Err(DevError::Scenario(format!(
            "{url}: HTTP {status}: {}",
            resp.text().await.unwrap_or_default()
        )));
    }
    Ok(())
}

/// Waits until the outbox is empty (the dispatcher delivers from it every tick), then reports the tickets with the receiver's events and the owners' times from `/status`.
async fn tickets(
    env: &DevEnv,
    acknowledged: Option<(String, String)>,
    deadline: Instant,
) -> Result<TicketsReport, DevError> {
    loop {
        let all = get(env, "/tickets?all=true&limit=1000").await?;
        let all = all.as_array().cloned().unwrap_or_default();
        let received = env.tickets.received();
        // Caught up when every open ticket has been routed (so it has its sinks) and no sink has a version
        // left to send; what an earlier run against this ledger delivered is not sent again.
        let ledger = &env.worker.pipeline.ledger;
        let scenario = |e: crate::ledger::LedgerError| DevError::Scenario(e.to_string());
        let routed = ledger
            .tickets(true, crate::ledger::MAX_TICKETS_PER_READ)
            .await
            .map_err(scenario)?
            .iter()
            .all(|t| t.assignment.is_some());
        let pending: u64 = ledger
            .ticket_sink_health()
            .await
            .map_err(scenario)?
            .iter()
            .map(|h| h.pending)
            .sum();
        let caught_up = routed && pending == 0;
        if caught_up || Instant::now() > deadline {
            let tickets = all
                .iter()
                .map(|t| {
                    let fingerprint = t["fingerprint"].as_str().unwrap_or_default().to_string();
                    let mine: Vec<_> = received
                        .iter()
                        .filter(|r| r.fingerprint == fingerprint)
                        .collect();
                    let mut sinks: Vec<String> = mine.iter().map(|r| r.sink.clone()).collect();
                    sinks.sort();
                    sinks.dedup();
                    TicketReport {
                        fingerprint,
                        kind: t["kind"].as_str().unwrap_or_default().into(),
                        reason: t["reason"].as_str().unwrap_or_default().into(),
                        owner: t["owner"]["id"].as_str().unwrap_or_default().into(),
                        state: t["state"].as_str().unwrap_or_default().into(),
                        count: t["count"].as_u64().unwrap_or_default(),
                        outstanding: t["outstanding"].as_u64().unwrap_or_default(),
                        acknowledged_by: t["acknowledgedBy"].as_str().map(str::to_string),
                        events: mine.iter().map(|r| r.event.clone()).collect(),
                        sinks,
                    }
                })
                .collect();
            // Read over HTTP: the ticket summary is what `/status` adds to the pipeline's numbers.
            let summary: crate::api::TicketSummary =
                serde_json::from_value(get(env, "/status").await?["tickets"].clone())
                    .unwrap_or_default();
            let owners = summary
                .owners
                .iter()
                .map(|o| OwnerTickets {
                    owner: o.owner.clone(),
                    opened: o.opened,
                    acknowledged: o.acknowledged,
                    resolved: o.resolved,
                    open: o.open,
                    time_to_acknowledge_seconds: o.mean_time_to_acknowledge_seconds,
                    time_to_resolve_seconds: o.mean_time_to_resolve_seconds,
                })
                .collect();
            return Ok(TicketsReport {
                tickets,
                owners,
                acknowledged,
                duplicates: env
                    .tickets
                    .duplicates
                    .load(std::sync::atomic::Ordering::Relaxed),
                refused: env
                    .tickets
                    .refused
                    .load(std::sync::atomic::Ordering::Relaxed),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
