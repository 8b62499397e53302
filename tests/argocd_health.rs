//! The chart's Argo CD health checks (`charts/meshline/argocd/*.lua`, issue #15) run in a Lua 5.1 (Argo CD runs
//! gopher-lua, a Lua 5.1) against the objects Argo CD would see: the spec the test applied with the status
//! body the controller's reconcilers actually sent, driven against the API double the way
//! `controller_contract.rs` and `controller_reconcile.rs` drive them. The canary statuses of a PostgreSQL
//! flow (which the API double's reconciles cannot reach, having no workers to report applied weights or
//! measures) come from the state machine the flow reconcile runs, `rollout::canary::decide`.
//!
//! Also: the README shows exactly these files.

mod controller_support;

use controller_support::{apply, load};

use std::sync::Arc;

use controller_support::{ApiDouble, Recorded};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentStatus};
use k8s_openapi::api::batch::v1::{Job, JobCondition, JobStatus};
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Secret, Service};
use meshline::api::{CanaryPolicy, CanaryStatus, TrackMeasures};
use meshline::api::{OwnershipRoster, SecretRef, SignOff, SyncContract, SyncFlow};
use meshline::controller::{Context, Writers};
use meshline::rollout::canary::{self, Candidate, Command, Inputs, Measured, Observed, Verb};
use serde_json::{Value, json};

const NS: &str = "commerce-sync";
const KINDS: [&str; 3] = ["SyncFlow", "SyncContract", "OwnershipRoster"];
/// The statuses Argo CD accepts from a health script.
const ARGO_CD_STATUSES: [&str; 6] = [
    "Healthy",
    "Progressing",
    "Degraded",
    "Suspended",
    "Missing",
    "Unknown",
];

// --------------------------------------------------------------------------
// Running the Lua
// --------------------------------------------------------------------------

fn script_path(kind: &str) -> String {
    format!(
        "{}/charts/meshline/argocd/sync.meshline.io_{kind}.lua",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// A JSON value as Argo CD hands the object to the script: objects and arrays become tables (arrays from index
/// 1), numbers Lua numbers (gopher-lua's are float64 too), null nil.
fn to_lua(lua: &mlua::Lua, v: &Value) -> mlua::Result<mlua::Value> {
    Ok(match v {
        Value::Null => mlua::Value::Nil,
        Value::Bool(b) => mlua::Value::Boolean(*b),
        Value::Number(n) => mlua::Value::Number(n.as_f64().expect("a JSON number")),
        Value::String(s) => mlua::Value::String(lua.create_string(s)?),
        Value::Array(items) => {
            let t = lua.create_table()?;
            for (i, item) in items.iter().enumerate() {
                t.raw_set(i + 1, to_lua(lua, item)?)?;
            }
            mlua::Value::Table(t)
        }
        Value::Object(fields) => {
            let t = lua.create_table()?;
            for (k, item) in fields {
                t.raw_set(k.as_str(), to_lua(lua, item)?)?;
            }
            mlua::Value::Table(t)
        }
    })
}

/// What Argo CD would show for `obj`: the script of its kind run with the global `obj`, as Argo CD runs it,
/// returning (status, message).
fn health(obj: &Value) -> (String, String) {
    let kind = obj["kind"].as_str().expect("the object's kind");
    let path = script_path(kind);
    let script = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let lua = mlua::Lua::new();
    lua.globals()
        .set("obj", to_lua(&lua, obj).unwrap())
        .unwrap();
    let hs: mlua::Table = lua
        .load(&script)
        .set_name(&path)
        .eval()
        .unwrap_or_else(|e| panic!("{path} failed on {obj}: {e}"));
    let status: String = hs.get("status").unwrap();
    let message: Option<String> = hs.get("message").unwrap();
    assert!(
        ARGO_CD_STATUSES.contains(&status.as_str()),
        "{path} returned {status:?}, which Argo CD refuses"
    );
    (status, message.unwrap_or_default())
}

/// Asserts the health of `obj` and that its message says `says`.
#[track_caller]
fn assert_health(obj: &Value, status: &str, says: &str) {
    let (got, message) = health(obj);
    assert_eq!(
        got, status,
        "message {message:?} for status {}",
        obj["status"]
    );
    assert!(
        message.contains(says),
        "{status}: {message:?} should say {says:?}"
    );
}

// --------------------------------------------------------------------------
// The controller against the API double (the World of controller_contract.rs, with the flow's children settled
// as controller_reconcile.rs settles them, so a flow can become ready)
// --------------------------------------------------------------------------

fn status_patch<'a>(requests: &'a [Recorded], plural: &str) -> Option<&'a Recorded> {
    requests
        .iter()
        .find(|r| r.method == "PATCH" && r.path.ends_with("/status") && r.path.contains(plural))
}

/// `obj` as Argo CD sees it once the controller's status patch `status` is applied.
fn live<K: serde::Serialize>(obj: &K, status: &Value) -> Value {
    let mut v = serde_json::to_value(obj).unwrap();
    v["status"] = status.clone();
    v
}

fn bump<K: kube::Resource>(obj: &mut K) {
    let meta = obj.meta_mut();
    meta.generation = Some(meta.generation.unwrap_or(1) + 1);
}

struct World {
    double: ApiDouble,
    ctx: Arc<Context>,
    writers: Writers,
    contract: SyncContract,
    flow: SyncFlow,
    roster: OwnershipRoster,
    /// The status bodies of the last status patch of each object, as the controller sent them.
    contract_status: Value,
    flow_status: Value,
    roster_status: Value,
    jobs: Vec<Job>,
    /// The flow's Deployment as the cache last saw it.
    deployment: Option<Deployment>,
}

impl World {
    fn new() -> World {
        let double = ApiDouble::new();
        double.put_secret(NS, "hubspot-app", &["clientSecret", "accessToken"]);
        double.put_secret(NS, "odoo-api-key", &["login", "apiKey"]);
        // The roster's ticket sinks, mounted into the workers as well.
        double.put_secret(NS, "github-token", &["token"]);
        double.put_secret(NS, "alert-webhook-signing", &["signingSecret"]);
        let mut contract: SyncContract = load("contract.yaml");
        contract.metadata.uid = Some("contract-uid-1".into());
        contract.metadata.generation = Some(1);
        let mut flow: SyncFlow = load("flow.yaml");
        flow.metadata.uid = Some("flow-uid-1".into());
        flow.metadata.generation = Some(1);
        let mut roster: OwnershipRoster = load("roster.yaml");
        roster.metadata.generation = Some(1);
        let (ctx, writers) = controller_support::context(&double);
        let mut w = World {
            double,
            ctx,
            writers,
            contract,
            flow,
            roster,
            contract_status: Value::Null,
            flow_status: Value::Null,
            roster_status: Value::Null,
            jobs: Vec::new(),
            deployment: None,
        };
        w.fill();
        w
    }

    /// The caches as the watches fill them from the objects as they are now.
    fn fill(&mut self) {
        apply(&mut self.writers.rosters, self.roster.clone());
        apply(&mut self.writers.flows, self.flow.clone());
        apply(&mut self.writers.contracts, self.contract.clone());
    }

    fn register<K: kube::Resource<DynamicType = ()> + serde::Serialize>(&self, obj: &K) {
        self.double.put(
            &format!(
                "/apis/sync.meshline.io/v1alpha1/namespaces/{NS}/{}/{}",
                K::plural(&()),
                obj.meta().name.as_deref().unwrap()
            ),
            serde_json::to_value(obj).unwrap(),
        );
    }

    fn take(&self) -> Vec<Recorded> {
        let requests = self.double.take();
        for r in &requests {
            // Events are best effort; no other write may be refused (a read may find nothing).
            assert!(
                r.answered < 400 || !r.is_write() || r.path.contains("/events"),
                "the API refused {} {}: {}",
                r.method,
                r.path,
                r.body
            );
        }
        requests
    }

    /// One contract reconcile; the revisions and Jobs it created and the status it wrote are fed back, as the
    /// watches would.
    async fn reconcile_contract(&mut self) {
        self.fill();
        self.register(&self.contract);
        meshline::controller::contract::reconcile(
            Arc::new(self.contract.clone()),
            self.ctx.clone(),
        )
        .await
        .unwrap();
        let requests = self.take();
        let created = controller_support::settle_created(&requests, &mut self.writers);
        self.jobs.extend(created.jobs);
        if let Some(s) = status_patch(&requests, "synccontracts") {
            self.contract_status = s.body["status"].clone();
            self.contract.status = Some(serde_json::from_value(s.body["status"].clone()).unwrap());
        }
        apply(&mut self.writers.contracts, self.contract.clone());
    }

    /// One flow reconcile; what it applied is fed back as the watches would, with its Deployment rolled out
    /// and ready (as `controller_reconcile.rs` settles it).
    async fn reconcile_flow(&mut self) {
        self.fill();
        self.register(&self.flow);
        meshline::controller::flow::reconcile(Arc::new(self.flow.clone()), self.ctx.clone())
            .await
            .unwrap();
        let requests = self.take();
        for r in requests
            .iter()
            .filter(|r| r.method == "PATCH" || r.method == "POST")
        {
            let body = r.body.clone();
            match r.kind() {
                "ConfigMap" => apply(
                    &mut self.writers.config_maps,
                    serde_json::from_value::<ConfigMap>(body).unwrap(),
                ),
                "Service" => apply(
                    &mut self.writers.services,
                    serde_json::from_value::<Service>(body).unwrap(),
                ),
                "PersistentVolumeClaim" => apply(
                    &mut self.writers.pvcs,
                    serde_json::from_value::<PersistentVolumeClaim>(body).unwrap(),
                ),
                "Secret" => {
                    // The API server stores `stringData` as `data`; the watch delivers it so.
                    let mut secret = serde_json::from_value::<Secret>(body).unwrap();
                    if let Some(strings) = secret.string_data.take() {
                        let data = secret.data.get_or_insert_with(Default::default);
                        for (k, v) in strings {
                            data.insert(k, k8s_openapi::ByteString(v.into_bytes()));
                        }
                    }
                    apply(&mut self.writers.tokens, secret)
                }
                "Deployment" => {
                    // A whole apply, or a patch of the replicas alone (a pause, a resume).
                    let mut d: Deployment = match (body.get("kind"), &self.deployment) {
                        (None, Some(d)) => {
                            let mut d = d.clone();
                            d.spec.as_mut().unwrap().replicas =
                                body["spec"]["replicas"].as_i64().map(|n| n as i32);
                            d
                        }
                        _ => serde_json::from_value(body).unwrap(),
                    };
                    let replicas = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                    d.metadata.generation = Some(1);
                    d.status = Some(DeploymentStatus {
                        observed_generation: Some(1),
                        replicas: Some(replicas),
                        ready_replicas: Some(replicas),
                        updated_replicas: Some(replicas),
                        available_replicas: Some(replicas),
                        ..DeploymentStatus::default()
                    });
                    self.deployment = Some(d.clone());
                    apply(&mut self.writers.deployments, d);
                }
                _ => {}
            }
        }
        if let Some(s) = status_patch(&requests, "syncflows") {
            self.flow_status = s.body["status"].clone();
            self.flow.status = Some(serde_json::from_value(s.body["status"].clone()).unwrap());
        }
        apply(&mut self.writers.flows, self.flow.clone());
    }

    async fn reconcile_roster(&mut self) {
        self.fill();
        self.register(&self.roster);
        meshline::controller::roster::reconcile(Arc::new(self.roster.clone()), self.ctx.clone())
            .await
            .unwrap();
        let requests = self.take();
        if let Some(s) = status_patch(&requests, "ownershiprosters") {
            self.roster_status = s.body["status"].clone();
            self.roster.status = Some(serde_json::from_value(s.body["status"].clone()).unwrap());
        }
    }

    /// The contract active, the flow rolled out on it: what a fresh install settles to.
    async fn running() -> World {
        let mut w = World::new();
        w.reconcile_contract().await;
        w.reconcile_flow().await;
        w.reconcile_flow().await;
        w
    }

    fn flow_obj(&self) -> Value {
        live(&self.flow, &self.flow_status)
    }
    fn contract_obj(&self) -> Value {
        live(&self.contract, &self.contract_status)
    }
    fn roster_obj(&self) -> Value {
        live(&self.roster, &self.roster_status)
    }

    fn edit_contract(&mut self, change: impl FnOnce(&mut meshline::api::SyncContractSpec)) {
        change(&mut self.contract.spec);
        bump(&mut self.contract);
    }

    fn sign(&mut self, owner: &str) {
        let version = self.contract.spec.version.clone();
        self.contract.spec.sign_offs.push(SignOff {
            owner: owner.into(),
            version,
            content_hash: None,
            role: None,
            approved_at: None,
        });
    }

    /// A compatible patch-version change, signed by both owners the roster assigns: its preflight Job starts.
    async fn candidate_in_preflight(&mut self) {
        self.edit_contract(|s| {
            s.version = "2.0.2".into();
            s.sla = None;
        });
        self.sign("lena");
        self.sign("tomas");
        self.reconcile_contract().await;
        assert_eq!(self.jobs.len(), 1, "the preflight Job is created");
    }

    /// The preflight Job finishes and its pod leaves `report` as its termination message.
    fn finish_job(&mut self, succeeded: bool, report: &Value) {
        let job = self.jobs.last_mut().expect("a preflight Job");
        let name = job.metadata.name.clone().unwrap();
        job.status = Some(JobStatus {
            succeeded: succeeded.then_some(1),
            failed: (!succeeded).then_some(1),
            conditions: Some(vec![JobCondition {
                type_: if succeeded { "Complete" } else { "Failed" }.into(),
                status: "True".into(),
                ..JobCondition::default()
            }]),
            ..JobStatus::default()
        });
        let job = job.clone();
        apply(&mut self.writers.jobs, job);
        let state = json!({"terminated": {"exitCode": if succeeded {0} else {1}, "message": report.to_string()}});
        self.double.put(
            &format!("/api/v1/namespaces/{NS}/pods/{name}-abcde"),
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("{name}-abcde"), "namespace": NS,
                             "labels": {"batch.kubernetes.io/job-name": name, "job-name": name}},
                "status": {"containerStatuses": [{"name": "replay", "ready": false, "restartCount": 0,
                           "image": "x", "imageID": "", "state": state}]}
            }),
        );
    }
}

fn condition<'a>(status: &'a Value, t: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == t)
        .unwrap_or_else(|| panic!("no condition {t} in {status}"))
}

fn replay_report(verdict: &str, newly_rejected: u64) -> Value {
    json!({
        "verdict": verdict,
        "reason": (verdict == "Failed").then(|| format!("{newly_rejected} records newly rejected, over maxNewlyRejected 0")),
        "records": 1000, "newlyRejected": newly_rejected, "newlyHeld": 0, "newlyAccepted": 0,
        "changedOutputs": 0, "changedPaths": [], "examples": []
    })
}

// --------------------------------------------------------------------------
// SyncFlow
// --------------------------------------------------------------------------

#[tokio::test]
async fn a_rolled_out_flow_on_its_active_contract_is_healthy() {
    let w = World::running().await;
    assert_eq!(condition(&w.flow_status, "Ready")["status"], "True");
    assert_health(&w.flow_obj(), "Healthy", "worker pods ready");
    assert_health(&w.contract_obj(), "Healthy", "is active");
}

#[tokio::test]
async fn a_flow_without_status_or_rolling_out_is_progressing() {
    let mut w = World::new();
    assert_health(
        &live(&w.flow, &Value::Null),
        "Progressing",
        "observe generation 1",
    );
    w.reconcile_contract().await;
    // The first reconcile: the Deployment is applied, no pod is ready yet.
    w.reconcile_flow().await;
    assert_eq!(condition(&w.flow_status, "Progressing")["status"], "True");
    assert_health(&w.flow_obj(), "Progressing", "worker pods ready");
}

#[tokio::test]
async fn a_generation_the_controller_has_not_observed_is_progressing() {
    let mut w = World::running().await;
    // Argo CD applied a spec change; the controller has not reconciled it yet, so the status is the old one.
    w.flow.spec.delivery.max_attempts = 9;
    bump(&mut w.flow);
    assert_eq!(w.flow_status["observedGeneration"], 1);
    assert_health(&w.flow_obj(), "Progressing", "observe generation 2");
    w.reconcile_flow().await;
    assert_health(&w.flow_obj(), "Healthy", "worker pods ready");

    w.edit_contract(|s| s.version = "2.0.2".into());
    assert_health(&w.contract_obj(), "Progressing", "observe generation 2");
}

#[tokio::test]
async fn a_paused_flow_is_suspended_not_degraded() {
    let mut w = World::running().await;
    w.flow.spec.paused = true;
    bump(&mut w.flow);
    w.reconcile_flow().await;
    assert_eq!(condition(&w.flow_status, "Ready")["reason"], "Paused");
    assert_health(&w.flow_obj(), "Suspended", "paused by spec.paused");
    // Resumed: Progressing while the worker scales up, Healthy once it is ready.
    w.flow.spec.paused = false;
    bump(&mut w.flow);
    w.reconcile_flow().await;
    assert_health(&w.flow_obj(), "Progressing", "0/1 worker pods ready");
    w.reconcile_flow().await;
    assert_health(&w.flow_obj(), "Healthy", "1/1 worker pods ready");
}

#[tokio::test]
async fn a_flow_missing_its_secret_is_degraded() {
    let mut w = World::running().await;
    w.flow.spec.sink.credentials_secret_ref = SecretRef {
        name: "absent".into(),
    };
    bump(&mut w.flow);
    w.reconcile_flow().await;
    assert_eq!(condition(&w.flow_status, "SecretsReady")["status"], "False");
    assert_health(&w.flow_obj(), "Degraded", "Secret absent does not exist");
    // Paused as well: still Degraded, since it could not resume.
    w.flow.spec.paused = true;
    bump(&mut w.flow);
    w.reconcile_flow().await;
    assert_health(&w.flow_obj(), "Degraded", "Secret absent does not exist");
}

#[tokio::test]
async fn a_candidate_in_preflight_is_progressing_and_its_pass_makes_both_healthy() {
    let mut w = World::running().await;
    w.candidate_in_preflight().await;
    assert_eq!(
        condition(&w.contract_status, "Ready")["reason"],
        "PreflightRunning"
    );
    assert_health(&w.contract_obj(), "Progressing", "is in preflight");
    w.reconcile_flow().await;
    assert_eq!(
        condition(&w.flow_status, "ContractUpToDate")["reason"],
        "PreflightRunning"
    );
    assert_health(&w.flow_obj(), "Progressing", "is in preflight");

    w.finish_job(true, &replay_report("Passed", 0));
    w.reconcile_contract().await;
    assert_health(&w.contract_obj(), "Healthy", "2.0.2");
    w.reconcile_flow().await;
    assert_health(&w.flow_obj(), "Healthy", "worker pods ready");
}

#[tokio::test]
async fn a_candidate_awaiting_sign_off_is_suspended_on_the_contract_and_its_flows() {
    let mut w = World::running().await;
    w.edit_contract(|s| {
        s.version = "2.0.2".into();
        s.sla = None;
    });
    w.reconcile_contract().await;
    assert_eq!(
        condition(&w.contract_status, "Ready")["reason"],
        "AwaitingSignOff"
    );
    assert_health(&w.contract_obj(), "Suspended", "waits for sign-offs");
    w.reconcile_flow().await;
    assert_health(&w.flow_obj(), "Suspended", "waits for sign-offs");
    // The flow's own trouble still comes first.
    w.flow.spec.sink.credentials_secret_ref = SecretRef {
        name: "absent".into(),
    };
    bump(&mut w.flow);
    w.reconcile_flow().await;
    assert_health(&w.flow_obj(), "Degraded", "Secret absent does not exist");
}

#[tokio::test]
async fn a_version_outside_a_flows_range_is_suspended_until_the_range_admits_it() {
    let mut w = World::running().await;
    // A major version: compatible by definition, but the flow binds >=2.0.0, <3.0.0.
    w.edit_contract(|s| s.version = "3.0.0".into());
    w.reconcile_contract().await;
    assert_eq!(
        condition(&w.contract_status, "Ready")["reason"],
        "OutsideFlowRange"
    );
    assert_health(&w.contract_obj(), "Suspended", "version ranges");
    w.reconcile_flow().await;
    assert_health(&w.flow_obj(), "Suspended", "version ranges");
}

#[tokio::test]
async fn returning_to_a_replaced_candidate_is_degraded() {
    let mut w = World::running().await;
    w.edit_contract(|s| s.version = "2.0.2".into());
    w.reconcile_contract().await;
    w.edit_contract(|s| s.version = "2.0.3".into());
    w.reconcile_contract().await;
    assert_health(&w.contract_obj(), "Suspended", "waits for sign-offs");
    // Back to 2.0.2, which the edit to 2.0.3 replaced before it passed its gates: refused.
    w.edit_contract(|s| s.version = "2.0.2".into());
    w.reconcile_contract().await;
    assert_eq!(condition(&w.contract_status, "Ready")["reason"], "Replaced");
    assert_health(&w.contract_obj(), "Degraded", "replaced by an edit");
    w.reconcile_flow().await;
    assert_health(&w.flow_obj(), "Degraded", "replaced by an edit");
}

#[tokio::test]
async fn a_candidate_whose_preflight_failed_degrades_the_contract_and_its_flows() {
    let mut w = World::running().await;
    w.candidate_in_preflight().await;
    w.finish_job(false, &replay_report("Failed", 3));
    w.reconcile_contract().await;
    assert_eq!(
        condition(&w.contract_status, "Ready")["reason"],
        "PreflightFailed"
    );
    assert_health(&w.contract_obj(), "Degraded", "3 records newly rejected");
    w.reconcile_flow().await;
    assert_eq!(
        condition(&w.flow_status, "ContractUpToDate")["reason"],
        "PreflightFailed"
    );
    assert_health(&w.flow_obj(), "Degraded", "3 records newly rejected");
}

#[tokio::test]
async fn an_incompatible_change_degrades_the_contract_and_its_flows() {
    let mut w = World::running().await;
    w.edit_contract(|s| {
        s.version = "2.1.0".into();
        // A field becomes required: records the active version accepted are refused now.
        let f = s.fields.iter_mut().find(|f| !f.required).unwrap();
        f.required = true;
    });
    w.reconcile_contract().await;
    assert_eq!(
        condition(&w.contract_status, "Ready")["reason"],
        "IncompatibleChange"
    );
    assert_health(&w.contract_obj(), "Degraded", "major");
    w.reconcile_flow().await;
    assert_health(&w.flow_obj(), "Degraded", "major");
}

#[tokio::test]
async fn a_content_change_without_a_version_change_degrades_the_contract_and_its_flows() {
    let mut w = World::running().await;
    w.edit_contract(|s| s.sla = None);
    w.reconcile_contract().await;
    assert_eq!(
        condition(&w.contract_status, "Ready")["reason"],
        "ContentChangedWithoutVersion"
    );
    assert_health(&w.contract_obj(), "Degraded", "2.0.1");
    w.reconcile_flow().await;
    assert_health(&w.flow_obj(), "Degraded", "2.0.1");
}

#[tokio::test]
async fn a_contract_that_does_not_compile_is_degraded() {
    let mut w = World::running().await;
    w.edit_contract(|s| {
        s.version = "2.0.2".into();
        s.mapping.fields[0].expression = "record.dealname +".into();
    });
    w.reconcile_contract().await;
    assert_eq!(
        condition(&w.contract_status, "Ready")["reason"],
        "CompileFailed"
    );
    assert_health(&w.contract_obj(), "Degraded", "does not compile");
    w.reconcile_flow().await;
    assert_health(&w.flow_obj(), "Degraded", "does not compile");
}

// --------------------------------------------------------------------------
// Canaries: the statuses the flow reconcile writes (it runs the embedded-ledger flow of the example, so it
// pauses a canary for want of a shared ledger) and the ones the pure state machine the reconcile runs
// (`rollout::canary::decide`) moves a PostgreSQL flow's canary through.
// --------------------------------------------------------------------------

const CANDIDATE: Candidate<'static> = Candidate {
    revision: "won-deals-7f3a",
    version: "2.0.2",
};

fn canary_policy() -> CanaryPolicy {
    serde_json::from_value(json!({
        "steps": [{"weight": 20}, {"weight": 50, "pause": "10m"}],
        "analysis": {"maxDeadLetterRate": "0.01", "minRecords": 10, "interval": "1m"}
    }))
    .unwrap()
}

fn measures(records: i64, dead_lettered: i64, rate: &str) -> TrackMeasures {
    TrackMeasures {
        records,
        delivered: records - dead_lettered,
        failed: dead_lettered,
        dead_lettered,
        failure_rate: rate.into(),
        dead_letter_rate: rate.into(),
        ..TrackMeasures::default()
    }
}

/// A canary on a shared ledger as the controller moves it, one decision at a time.
struct Rollout {
    policy: CanaryPolicy,
    status: Option<CanaryStatus>,
    now: chrono::DateTime<chrono::Utc>,
}

impl Rollout {
    fn new() -> Rollout {
        Rollout {
            policy: canary_policy(),
            status: None,
            now: chrono::DateTime::parse_from_rfc3339("2026-12-01T10:00:00Z")
                .unwrap()
                .to_utc(),
        }
    }

    /// One reconcile `after` the previous one; returns the status it writes.
    fn decide(
        &mut self,
        after: i64,
        command: Option<Verb>,
        observed: Observed,
        measured: Option<Measured>,
    ) -> CanaryStatus {
        self.now += chrono::Duration::seconds(after);
        let d = canary::decide(Inputs {
            policy: Some(&self.policy),
            shared_ledger: true,
            candidate: Some(CANDIDATE),
            active_revision: Some("won-deals-1c2d"),
            previous: self.status.as_ref(),
            command: command
                .map(|v| Ok(Command::parse(&Command::annotation_value(v, "1")).unwrap())),
            observed: &observed,
            measured,
            now: self.now,
        });
        self.status = d.status;
        self.status.clone().expect("a canary status")
    }

    /// Started, its first weight applied by every worker of both tracks.
    fn progressing() -> Rollout {
        let mut r = Rollout::new();
        r.decide(0, None, Observed::default(), None);
        let st = r.decide(
            5,
            None,
            Observed {
                applied_weight: Some(20),
                canary_pods: 1,
                ..Observed::default()
            },
            None,
        );
        assert_eq!((st.phase.as_str(), st.weight), (canary::PROGRESSING, 20));
        assert!(st.step_started_at.is_some(), "the step's clock runs");
        r
    }

    /// The analysis finds the canary dead-lettering 8 % while stable dead-letters none.
    fn failed_analysis(&mut self, canary_pods: usize) -> CanaryStatus {
        self.decide(
            61,
            None,
            Observed {
                applied_weight: Some(20),
                canary_pods,
                ..Observed::default()
            },
            Some(Measured::Taken {
                canary: measures(100, 8, "0.08"),
                stable: measures(400, 0, "0"),
            }),
        )
    }
}

fn with_canary(flow: &Value, canary: &CanaryStatus) -> Value {
    let mut obj = flow.clone();
    obj["status"]["canary"] = serde_json::to_value(canary).unwrap();
    obj
}

#[tokio::test]
async fn a_moving_canary_is_progressing_and_a_paused_one_suspended() {
    let w = World::running().await;
    let flow = w.flow_obj();

    let mut r = Rollout::progressing();
    let st = r.status.clone().unwrap();
    assert_health(
        &with_canary(&flow, &st),
        "Progressing",
        "canary of version 2.0.2 progressing at weight 20",
    );
    // Paused by spec.paused as well: the pause wins over the running canary.
    let mut paused_flow = with_canary(&flow, &st);
    paused_flow["spec"]["paused"] = json!(true);
    assert_health(&paused_flow, "Suspended", "paused");

    let st = r.decide(1, Some(Verb::Pause), Observed::default(), None);
    assert_eq!(st.phase, canary::PAUSED);
    assert_health(
        &with_canary(&flow, &st),
        "Suspended",
        "paused at weight 20: paused at step 0 (20%) by a person",
    );

    let st = r.decide(1, Some(Verb::Promote), Observed::default(), None);
    assert_eq!(st.phase, canary::PROMOTING);
    assert_health(
        &with_canary(&flow, &st),
        "Progressing",
        "promoting at weight 20",
    );

    let mut r = Rollout::progressing();
    // The canary's pod is still there: the rollback is under way.
    let st = r.failed_analysis(1);
    assert_eq!(
        (st.phase.as_str(), st.reason.as_deref()),
        (canary::ABORTING, Some("FailureLimitReached"))
    );
    assert_health(
        &with_canary(&flow, &st),
        "Progressing",
        "aborting at weight 0",
    );
    let st = r.decide(10, None, Observed::default(), None);
    assert_eq!(st.phase, canary::ABORTED);
    // The contract's spec is the active version again (ContractUpToDate RunningLatest): the abort is history.
    assert_eq!(
        condition(&w.flow_status, "ContractUpToDate")["status"],
        "True"
    );
    assert_health(&with_canary(&flow, &st), "Healthy", "worker pods ready");

    // Promoted: the candidate is active on the stable track.
    let mut r = Rollout::progressing();
    r.decide(1, Some(Verb::Promote), Observed::default(), None);
    let d = canary::decide(Inputs {
        policy: Some(&r.policy),
        shared_ledger: true,
        candidate: None,
        active_revision: Some(CANDIDATE.revision),
        previous: r.status.as_ref(),
        command: None,
        observed: &Observed {
            stable_revision: Some(CANDIDATE.revision.into()),
            ..Observed::default()
        },
        measured: None,
        now: r.now,
    });
    let st = d.status.unwrap();
    assert_eq!(st.phase, canary::PROMOTED);
    assert_health(&with_canary(&flow, &st), "Healthy", "worker pods ready");
}

/// The example flow with canary steps: its candidate passes preflight and enters its canary.
async fn candidate_in_canary() -> World {
    let mut w = World::running().await;
    w.flow
        .spec
        .rollout
        .get_or_insert_with(|| serde_json::from_value(json!({})).unwrap())
        .canary = Some(canary_policy());
    bump(&mut w.flow);
    w.reconcile_flow().await;
    w.reconcile_flow().await;
    assert_health(&w.flow_obj(), "Healthy", "worker pods ready");
    w.candidate_in_preflight().await;
    w.finish_job(true, &replay_report("Passed", 0));
    w.reconcile_contract().await;
    assert_eq!(
        condition(&w.contract_status, "Ready")["reason"],
        "CanaryRunning"
    );
    w
}

#[tokio::test]
async fn an_embedded_ledger_flows_canary_is_suspended_until_a_person_promotes_or_aborts() {
    let mut w = candidate_in_canary().await;
    assert_health(&w.contract_obj(), "Progressing", "in its canary");
    w.reconcile_flow().await;
    assert_eq!(w.flow_status["canary"]["phase"], canary::PAUSED);
    assert_eq!(w.flow_status["canary"]["reason"], "CanaryNeedsSharedLedger");
    assert_health(&w.flow_obj(), "Suspended", "needs the PostgreSQL ledger");
}

#[tokio::test]
async fn a_canary_aborted_by_analysis_degrades_the_contract_and_its_flow() {
    let mut w = candidate_in_canary().await;
    let candidate = w.contract_status["candidateRevision"]
        .as_str()
        .unwrap()
        .to_string();
    // The canary as a PostgreSQL flow's reconciles leave it after an analysis failed and its pods went.
    let mut r = Rollout::progressing();
    r.failed_analysis(0);
    let mut aborted = r.status.clone().unwrap();
    assert_eq!(aborted.phase, canary::ABORTED);
    aborted.revision = candidate;
    w.flow.status.as_mut().unwrap().canary = Some(aborted);
    w.flow_status = serde_json::to_value(w.flow.status.as_ref().unwrap()).unwrap();

    w.reconcile_contract().await;
    assert_eq!(
        condition(&w.contract_status, "Ready")["reason"],
        "CanaryAborted"
    );
    assert_health(
        &w.contract_obj(),
        "Degraded",
        "dead-letter rate 0.08 above 0.01",
    );
    w.reconcile_flow().await;
    assert_eq!(w.flow_status["canary"]["phase"], canary::ABORTED);
    assert_eq!(
        condition(&w.flow_status, "ContractUpToDate")["reason"],
        "CanaryAborted"
    );
    assert_health(&w.flow_obj(), "Degraded", "canary of version 2.0.2 aborted");
    // A pause does not hide it.
    let mut paused = w.flow_obj();
    paused["spec"]["paused"] = json!(true);
    assert_health(&paused, "Degraded", "aborted");

    // A person retries (`meshline rollout retry` writes this annotation): on the embedded ledger the canary
    // starts paused for want of a shared ledger, and the contract's candidate is back in its canary.
    w.flow
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(
            canary::COMMAND_ANNOTATION.into(),
            Command::annotation_value(Verb::Retry, "1733059200"),
        );
    w.reconcile_flow().await;
    assert_eq!(w.flow_status["canary"]["phase"], canary::PAUSED);
    assert_eq!(w.flow_status["canary"]["lastCommand"], "retry:1733059200");
    w.reconcile_contract().await;
    assert_health(&w.contract_obj(), "Progressing", "in its canary");
    w.reconcile_flow().await;
    assert_health(&w.flow_obj(), "Suspended", "needs the PostgreSQL ledger");
}

// --------------------------------------------------------------------------
// OwnershipRoster
// --------------------------------------------------------------------------

#[tokio::test]
async fn roster_health_follows_its_accepted_condition_and_leaves_unowned_flows_to_the_flows() {
    let mut w = World::running().await;
    assert_health(
        &live(&w.roster, &Value::Null),
        "Progressing",
        "observe generation 1",
    );
    w.reconcile_roster().await;
    assert_eq!(
        condition(&w.roster_status, "Accepted")["reason"],
        "AllFlowsOwned"
    );
    assert_health(
        &w.roster_obj(),
        "Healthy",
        "every flow in the namespace has a sync owner",
    );

    // The roster stops covering the flow: the roster names it, the flow is the one Degraded.
    w.roster.spec.assignments.clear();
    bump(&mut w.roster);
    assert_health(&w.roster_obj(), "Progressing", "observe generation 2");
    w.reconcile_roster().await;
    assert_eq!(
        condition(&w.roster_status, "Accepted")["reason"],
        "FlowsWithoutSyncOwner"
    );
    assert_health(&w.roster_obj(), "Healthy", "won-deals-to-odoo");
    w.reconcile_flow().await;
    assert_eq!(
        condition(&w.flow_status, "OwnerAssigned")["status"],
        "False"
    );
    assert_health(&w.flow_obj(), "Degraded", "not started");

    // Hand-written: the controller does not refuse a roster today; if it ever does, Argo CD says so.
    let mut refused = w.roster_obj();
    refused["status"]["conditions"][0]["status"] = json!("False");
    assert_health(&refused, "Degraded", "won-deals-to-odoo");
}

#[tokio::test]
async fn a_roster_whose_audit_schedule_kubernetes_refuses_is_degraded_and_says_which_field() {
    let mut w = World::running().await;
    w.reconcile_roster().await;
    assert_eq!(
        condition(&w.roster_status, "AuditScheduled")["reason"],
        "Scheduled"
    );
    w.roster.spec.audit = Some(meshline::api::AuditSchedule {
        schedule: Some("0 2 * * *".into()),
        time_zone: Some("Europe/Berlln".into()),
        window: None,
        suspend: false,
    });
    bump(&mut w.roster);
    w.reconcile_roster().await;
    let audit = condition(&w.roster_status, "AuditScheduled");
    assert_eq!(audit["status"], "False");
    assert_eq!(audit["reason"], "InvalidSchedule");
    assert_health(
        &w.roster_obj(),
        "Degraded",
        "spec.audit.timeZone: unknown time zone",
    );
    // Suspended on purpose is the owners' choice, not a fault.
    let audit = w.roster.spec.audit.as_mut().unwrap();
    audit.time_zone = Some("Europe/Berlin".into());
    audit.suspend = true;
    bump(&mut w.roster);
    w.reconcile_roster().await;
    assert_eq!(
        condition(&w.roster_status, "AuditScheduled")["reason"],
        "Suspended"
    );
    assert_health(&w.roster_obj(), "Healthy", "sync owner");
}

// --------------------------------------------------------------------------
// One place of truth
// --------------------------------------------------------------------------

/// The README's `argocd-cm` snippet holds each chart file verbatim under its Argo CD key.
#[test]
fn the_readme_shows_the_charts_health_checks_verbatim() {
    let readme =
        std::fs::read_to_string(format!("{}/README.md", env!("CARGO_MANIFEST_DIR"))).unwrap();
    for kind in KINDS {
        let script = std::fs::read_to_string(script_path(kind)).unwrap();
        let block: String = std::iter::once(format!(
            "  resource.customizations.health.sync.meshline.io_{kind}: |\n"
        ))
        .chain(script.lines().map(|l| {
            if l.is_empty() {
                "\n".to_string()
            } else {
                format!("    {l}\n")
            }
        }))
        .collect();
        assert!(
            readme.contains(&block),
            "README.md does not show charts/meshline/argocd/sync.meshline.io_{kind}.lua verbatim; paste it as:\n{block}"
        );
    }
}
