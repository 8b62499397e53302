//! Contract changes against the API double (issue #14): revisions, the gates in order (compatibility, sign-off,
//! preflight replay Job), a controller restart at each point, and the promise that a flow's workers'
//! ConfigMap never holds a version that has not passed every gate.

mod controller_support;

use controller_support::{apply, delete, load};

use std::sync::Arc;

use controller_support::{ApiDouble, Recorded};
use k8s_openapi::api::apps::v1::ControllerRevision;
use k8s_openapi::api::batch::v1::{Job, JobCondition, JobStatus};
use meshline::api::{OwnershipRoster, RevisionState, SignOff, SyncContract, SyncFlow};
use meshline::controller::contract::build;
use meshline::controller::{Context, Writers};
use serde_json::{Value, json};

const NS: &str = "commerce-sync";

/// The API as the test knows it: the contract with its written status, the flow, and the double.
struct World {
    double: ApiDouble,
    ctx: Arc<Context>,
    writers: Writers,
    contract: SyncContract,
    flow: SyncFlow,
    jobs: Vec<Job>,
    revisions: Vec<ControllerRevision>,
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
        let (ctx, writers) = controller_support::context(&double);
        let mut w = World {
            double,
            ctx,
            writers,
            contract,
            flow,
            jobs: Vec::new(),
            revisions: Vec::new(),
        };
        w.fill();
        w
    }

    /// The caches as the watches fill them from what the API holds.
    fn fill(&mut self) {
        let mut roster: OwnershipRoster = load("roster.yaml");
        roster.metadata.generation = Some(1);
        apply(&mut self.writers.rosters, roster);
        apply(&mut self.writers.flows, self.flow.clone());
        apply(&mut self.writers.contracts, self.contract.clone());
        for j in self.jobs.clone() {
            apply(&mut self.writers.jobs, j);
        }
        for r in self.revisions.clone() {
            apply(&mut self.writers.revisions, r);
        }
    }

    /// A controller restart: new caches and context, filled from what the API holds.
    fn restart(&mut self) {
        let (ctx, writers) = controller_support::context(&self.double);
        self.ctx = ctx;
        self.writers = writers;
        self.fill();
    }

    fn register(&self) {
        self.double.put(
            &format!(
                "/apis/sync.meshline.io/v1alpha1/namespaces/{NS}/synccontracts/{}",
                self.contract.metadata.name.as_deref().unwrap()
            ),
            serde_json::to_value(&self.contract).unwrap(),
        );
        self.double.put(
            &format!(
                "/apis/sync.meshline.io/v1alpha1/namespaces/{NS}/syncflows/{}",
                self.flow.metadata.name.as_deref().unwrap()
            ),
            serde_json::to_value(&self.flow).unwrap(),
        );
    }

    /// One contract reconcile; what it created and its status are fed back, as the watches would.
    async fn reconcile_contract(&mut self) -> Vec<Recorded> {
        self.register();
        meshline::controller::contract::reconcile(
            Arc::new(self.contract.clone()),
            self.ctx.clone(),
        )
        .await
        .unwrap();
        let requests = self.double.take();
        let created = controller_support::settle_created(&requests, &mut self.writers);
        self.revisions.extend(created.revisions);
        self.jobs.extend(created.jobs);
        for r in &requests {
            // Events are best effort (kube's recorder names them after the object, too long for a contract
            // name near 253 characters, and a refused Event never fails a reconcile); nothing else may be refused.
            assert!(
                r.answered < 400 || r.path.contains("/events"),
                "the API refused {} {}: {}",
                r.method,
                r.path,
                r.body
            );
            if r.method == "DELETE" && r.path.contains("/jobs/") {
                let name = r.path.rsplit('/').next().unwrap();
                if let Some(i) = self
                    .jobs
                    .iter()
                    .position(|j| j.metadata.name.as_deref() == Some(name))
                {
                    let j = self.jobs.remove(i);
                    delete(&mut self.writers.jobs, j);
                }
            }
            if r.method == "DELETE" && r.path.contains("/controllerrevisions/") {
                let name = r.path.rsplit('/').next().unwrap();
                if let Some(i) = self
                    .revisions
                    .iter()
                    .position(|j| j.metadata.name.as_deref() == Some(name))
                {
                    let rev = self.revisions.remove(i);
                    delete(&mut self.writers.revisions, rev);
                }
            }
        }
        if let Some(s) = requests.iter().find(|r| {
            r.method == "PATCH" && r.path.ends_with("/status") && r.path.contains("synccontracts")
        }) {
            self.contract.status = Some(serde_json::from_value(s.body["status"].clone()).unwrap());
        }
        apply(&mut self.writers.contracts, self.contract.clone());
        requests
    }

    /// One flow reconcile; returns the contract version in the workers' ConfigMap it applied.
    async fn workers_run(&mut self) -> String {
        self.register();
        meshline::controller::flow::reconcile(Arc::new(self.flow.clone()), self.ctx.clone())
            .await
            .unwrap();
        let requests = self.double.take();
        let cm = requests
            .iter()
            .find(|r| r.method == "PATCH" && r.kind() == "ConfigMap")
            .expect("the workers' ConfigMap is applied");
        let rendered: Value =
            serde_yaml::from_str(cm.body["data"]["flow.yaml"].as_str().unwrap()).unwrap();
        if let Some(s) = requests
            .iter()
            .find(|r| r.method == "PATCH" && r.path.ends_with("/status"))
        {
            self.flow.status = Some(serde_json::from_value(s.body["status"].clone()).unwrap());
        }
        rendered["contract"]["spec"]["version"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn edit(&mut self, change: impl FnOnce(&mut meshline::api::SyncContractSpec)) {
        change(&mut self.contract.spec);
        self.contract.metadata.generation =
            Some(self.contract.metadata.generation.unwrap_or(1) + 1);
    }

    fn hash(&self) -> String {
        meshline::contract::content_hash(&self.contract.spec)
            .as_str()
            .to_string()
    }

    fn sign(&mut self, owner: &str, content_hash: Option<String>) {
        let version = self.contract.spec.version.clone();
        self.contract.spec.sign_offs.push(SignOff {
            owner: owner.into(),
            version,
            content_hash,
            role: None,
            approved_at: None,
        });
    }

    fn status(&self) -> &meshline::api::SyncContractStatus {
        self.contract.status.as_ref().unwrap()
    }

    fn condition(&self, t: &str) -> (String, String, String) {
        let c = self
            .status()
            .conditions
            .iter()
            .find(|c| c.r#type == t)
            .unwrap_or_else(|| panic!("no condition {t}: {:?}", self.status().conditions));
        (c.status.clone(), c.reason.clone(), c.message.clone())
    }

    fn state_of(&self, hash: &str) -> RevisionState {
        self.status()
            .revisions
            .iter()
            .find(|r| r.content_hash == hash)
            .unwrap_or_else(|| panic!("no revision {hash}"))
            .state
    }

    /// The preflight Job finishes and its pod leaves `message` as its termination message (or none).
    fn finish_job(
        &mut self,
        succeeded: bool,
        message: Option<&str>,
        failure: Option<(&str, &str)>,
    ) {
        let job = self.jobs.last_mut().expect("a preflight Job");
        let name = job.metadata.name.clone().unwrap();
        job.status = Some(JobStatus {
            succeeded: succeeded.then_some(1),
            failed: (!succeeded).then_some(1),
            conditions: Some(vec![JobCondition {
                type_: if succeeded { "Complete" } else { "Failed" }.into(),
                status: "True".into(),
                reason: failure.map(|f| f.0.to_string()),
                message: failure.map(|f| f.1.to_string()),
                ..JobCondition::default()
            }]),
            ..JobStatus::default()
        });
        let job = job.clone();
        apply(&mut self.writers.jobs, job);
        let mut state = json!({});
        if let Some(m) = message {
            state = json!({"terminated": {"exitCode": if succeeded {0} else {1}, "message": m}});
        }
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

fn report(verdict: &str, newly_rejected: u64, changed: u64) -> String {
    json!({
        "verdict": verdict,
        "reason": if verdict == "Failed" { Some(format!("{newly_rejected} records newly rejected, over maxNewlyRejected 0")) } else { None },
        "records": 1000, "newlyRejected": newly_rejected, "newlyHeld": 0, "newlyAccepted": 0,
        "changedOutputs": changed,
        "changedPaths": [{"path": "order_line[].price_unit", "records": changed}],
        "examples": []
    })
    .to_string()
}

/// A compatible change: a new optional rule-free mapping tweak under a patch version.
fn patch_bump(spec: &mut meshline::api::SyncContractSpec, version: &str) {
    spec.version = version.into();
    spec.sla = None;
}

#[tokio::test]
async fn the_first_version_is_stored_as_a_revision_and_is_active_at_once() {
    let mut w = World::new();
    let requests = w.reconcile_contract().await;
    let create = requests
        .iter()
        .find(|r| r.method == "POST" && r.kind() == "ControllerRevision")
        .expect("the revision is created");
    let name = create.body["metadata"]["name"].as_str().unwrap();
    assert!(!name.contains(':') && name.len() <= 253, "{name}");
    assert_eq!(
        create.body["metadata"]["ownerReferences"][0]["kind"],
        "SyncContract"
    );
    assert_eq!(create.body["data"]["spec"]["version"], "2.0.1");
    let s = w.status();
    assert_eq!(s.active_revision.as_deref(), Some(name));
    assert_eq!(s.current_version.as_deref(), Some("2.0.1"));
    assert_eq!(s.revisions.len(), 1);
    assert_eq!(s.revisions[0].state, RevisionState::Active);
    assert!(s.revisions[0].state_since.is_some());
    assert_eq!(w.condition("Ready").0, "True");
    assert_eq!(w.workers_run().await, "2.0.1");
    assert_eq!(
        w.flow.status.as_ref().unwrap().contract_revision.as_deref(),
        Some(name)
    );

    // Steady: nothing more is written.
    let again = w.reconcile_contract().await;
    assert!(
        again
            .iter()
            .all(|r| !r.is_write() || r.path.contains("/events")),
        "{again:?}"
    );

    // A long contract name still gives a valid revision name.
    let mut long = World::new();
    long.contract.metadata.name = Some(format!("deal.to.sale-order-{}", "x".repeat(230)));
    long.flow.spec.contract.name = long.contract.metadata.name.clone().unwrap();
    long.fill();
    long.reconcile_contract().await;
    assert!(long.status().active_revision.as_ref().unwrap().len() <= 253);
}

#[tokio::test]
async fn a_compatible_change_waits_for_sign_offs_then_preflight_then_becomes_active() {
    let mut w = World::new();
    w.reconcile_contract().await;
    let first = w.status().active_revision.clone().unwrap();
    assert_eq!(w.workers_run().await, "2.0.1");

    w.edit(|s| patch_bump(s, "2.0.2"));
    let requests = w.reconcile_contract().await;
    let hash = w.hash();
    assert_eq!(w.state_of(&hash), RevisionState::Pending);
    let (status, reason, message) = w.condition("SignedOff");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "AwaitingSignOff")
    );
    assert!(
        message.contains("lena") && message.contains("tomas"),
        "{message}"
    );
    assert!(
        !requests.iter().any(|r| r.kind() == "Job"),
        "no Job before the sign-offs"
    );
    assert!(
        requests.iter().any(|r| r.path.contains("/events")
            && r.body["reason"] == "AwaitingSignOff"
            && r.body["regarding"]["kind"] == "SyncFlow"),
        "the bound flow hears of it too"
    );
    // The candidate is stored as a revision, but the workers keep the active one.
    assert!(w.revisions.iter().any(|r| r.metadata.name.as_deref()
        == Some(build::revision_name("deal-to-sale-order", &hash).as_str())));
    assert_eq!(w.workers_run().await, "2.0.1");
    let flow_status = w.flow.status.clone().unwrap();
    let up = flow_status
        .conditions
        .iter()
        .find(|c| c.r#type == "ContractUpToDate")
        .unwrap();
    assert_eq!(
        (up.status.as_str(), up.reason.as_str()),
        ("False", "AwaitingSignOff")
    );
    assert_eq!(
        flow_status.contract_revision.as_deref(),
        Some(first.as_str())
    );

    // One sign-off is not enough.
    w.sign("lena", None);
    w.reconcile_contract().await;
    assert_eq!(w.state_of(&hash), RevisionState::Pending);
    assert_eq!(w.workers_run().await, "2.0.1");

    // Both owners: the preflight Job starts, with the candidate in a ConfigMap owned by the Job.
    w.sign("tomas", Some(hash.clone()));
    let requests = w.reconcile_contract().await;
    assert_eq!(w.state_of(&hash), RevisionState::Preflight);
    let job = requests
        .iter()
        .find(|r| r.method == "POST" && r.kind() == "Job")
        .expect("a preflight Job");
    let name = job.body["metadata"]["name"].as_str().unwrap();
    assert!(name.len() <= 63, "{name}");
    let spec = &job.body["spec"];
    assert_eq!(spec["backoffLimit"], 0);
    assert_eq!(spec["activeDeadlineSeconds"], 600);
    assert!(spec["ttlSecondsAfterFinished"].as_i64().unwrap() > 0);
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["restartPolicy"], "Never");
    assert_eq!(pod["automountServiceAccountToken"], false);
    let args: Vec<&str> = pod["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "replay");
    for want in [
        "--config",
        "--candidate",
        "--records",
        "--max-newly-rejected",
        "--from-worker",
        "--token-file",
        "--report",
    ] {
        assert!(args.contains(&want), "{want} in {args:?}");
    }
    assert_eq!(
        args[args.iter().position(|a| *a == "--records").unwrap() + 1],
        "1000"
    );
    assert!(
        !pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v.get("persistentVolumeClaim").is_some()),
        "the Job never mounts the embedded ledger the worker holds"
    );
    let container = &pod["containers"][0];
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(container["securityContext"]["runAsNonRoot"], true);
    assert!(container.get("ports").is_none_or(Value::is_null));
    let labels = &spec["template"]["metadata"]["labels"];
    assert_eq!(
        labels["app.kubernetes.io/component"], "preflight",
        "never the worker selector"
    );
    let cm = requests
        .iter()
        .find(|r| r.method == "POST" && r.kind() == "ConfigMap")
        .expect("the candidate ConfigMap");
    assert_eq!(cm.body["metadata"]["name"], name);
    assert_eq!(cm.body["metadata"]["ownerReferences"][0]["kind"], "Job");
    assert_eq!(
        cm.body["metadata"]["ownerReferences"][0]["uid"],
        format!("uid-{name}")
    );
    assert!(
        cm.body["data"]["contract.yaml"]
            .as_str()
            .unwrap()
            .contains("2.0.2")
    );
    assert_eq!(
        w.workers_run().await,
        "2.0.1",
        "still the active revision while preflight runs"
    );

    // Running: no second Job.
    let requests = w.reconcile_contract().await;
    assert!(
        !requests
            .iter()
            .any(|r| r.method == "POST" && r.kind() == "Job")
    );
    assert_eq!(w.condition("PreflightPassed").1, "PreflightRunning");

    // It passes: the candidate becomes active, the first one superseded, and the workers get it.
    w.finish_job(true, Some(&report("Passed", 0, 37)), None);
    w.reconcile_contract().await;
    assert_eq!(w.state_of(&hash), RevisionState::Active);
    let old_hash = w.status().revisions[0].content_hash.clone();
    assert_eq!(w.state_of(&old_hash), RevisionState::Superseded);
    assert_eq!(w.status().current_version.as_deref(), Some("2.0.2"));
    let p = &w.status().preflight[0];
    assert_eq!(
        (p.phase.as_str(), p.records, p.changed_outputs),
        ("Passed", 1000, 37)
    );
    assert_eq!(
        p.changed_paths,
        vec!["order_line[].price_unit: 37".to_string()]
    );
    let summary = p.clone();
    assert_eq!(w.condition("Ready").0, "True");
    assert_eq!(w.workers_run().await, "2.0.2");
    let up = w
        .flow
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.r#type == "ContractUpToDate")
        .unwrap()
        .clone();
    assert_eq!(up.status, "True");
    // The flow's status summarises its own preflight too.
    assert_eq!(
        w.flow.status.as_ref().unwrap().preflight.as_ref(),
        Some(&summary)
    );
}

/// Gets a candidate into preflight with a running Job.
async fn in_preflight(w: &mut World, version: &str) -> String {
    w.reconcile_contract().await;
    w.edit(|s| patch_bump(s, version));
    let hash = w.hash();
    w.sign("lena", None);
    w.sign("tomas", None);
    w.reconcile_contract().await;
    assert_eq!(w.state_of(&hash), RevisionState::Preflight);
    hash
}

#[tokio::test]
async fn a_failed_preflight_rejects_the_candidate_and_the_workers_keep_the_active_revision() {
    let mut w = World::new();
    let hash = in_preflight(&mut w, "2.0.2").await;
    w.finish_job(true, Some(&report("Failed", 12, 0)), None);
    let requests = w.reconcile_contract().await;
    assert_eq!(w.state_of(&hash), RevisionState::Rejected);
    let (status, reason, message) = w.condition("PreflightPassed");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "PreflightFailed")
    );
    assert!(message.contains("12 records newly rejected"), "{message}");
    assert_eq!(w.condition("Ready").1, "PreflightFailed");
    assert!(requests.iter().any(|r| r.path.contains("/events")
        && r.body["reason"] == "PreflightFailed"
        && r.body["type"] == "Warning"));
    assert_eq!(w.status().current_version.as_deref(), Some("2.0.1"));
    assert_eq!(w.workers_run().await, "2.0.1");
    // Judged once: the same content stays rejected, with no new Job.
    let again = w.reconcile_contract().await;
    assert!(!again.iter().any(|r| r.kind() == "Job"));
    assert_eq!(w.state_of(&hash), RevisionState::Rejected);
}

#[tokio::test]
async fn a_job_that_times_out_or_crashes_is_a_failed_preflight_with_its_reason() {
    for (message, failure, expect) in [
        (
            None,
            Some((
                "DeadlineExceeded",
                "Job was active longer than specified deadline",
            )),
            "DeadlineExceeded",
        ),
        (
            Some("thread 'main' panicked"),
            Some((
                "BackoffLimitExceeded",
                "Job has reached the specified backoff limit",
            )),
            "BackoffLimitExceeded",
        ),
    ] {
        let mut w = World::new();
        let hash = in_preflight(&mut w, "2.0.2").await;
        w.finish_job(false, message, failure);
        w.reconcile_contract().await;
        assert_eq!(w.state_of(&hash), RevisionState::Rejected);
        let (_, reason, text) = w.condition("PreflightPassed");
        assert_eq!(reason, "PreflightFailed");
        assert!(text.contains(expect), "{text}");
        assert_eq!(w.workers_run().await, "2.0.1");
    }
}

#[tokio::test]
async fn a_breaking_change_without_a_major_version_is_refused_before_any_sign_off() {
    let mut w = World::new();
    w.reconcile_contract().await;
    w.edit(|s| {
        s.version = "2.1.0".into();
        // A field becomes required: records the active version accepted are refused now.
        let f = s.fields.iter_mut().find(|f| !f.required).unwrap();
        f.required = true;
    });
    let hash = w.hash();
    let requests = w.reconcile_contract().await;
    assert_eq!(w.state_of(&hash), RevisionState::Rejected);
    let (status, reason, message) = w.condition("Compatible");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "IncompatibleChange")
    );
    assert!(message.contains("major"), "{message}");
    assert!(
        !requests
            .iter()
            .any(|r| r.method == "POST" && (r.kind() == "ControllerRevision" || r.kind() == "Job"))
    );
    assert_eq!(w.workers_run().await, "2.0.1");
}

#[tokio::test]
async fn a_content_change_under_the_same_version_is_refused() {
    let mut w = World::new();
    w.reconcile_contract().await;
    w.edit(|s| s.sla = None);
    let hash = w.hash();
    w.reconcile_contract().await;
    assert_eq!(w.state_of(&hash), RevisionState::Rejected);
    assert_eq!(w.condition("Ready").1, "ContentChangedWithoutVersion");
    assert_eq!(w.workers_run().await, "2.0.1");
    let up = w
        .flow
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.r#type == "ContractUpToDate")
        .unwrap()
        .clone();
    assert_eq!(
        (up.status.as_str(), up.reason.as_str()),
        ("False", "ContentChangedWithoutVersion")
    );
}

#[tokio::test]
async fn a_sign_off_for_other_content_does_not_count() {
    let mut w = World::new();
    w.reconcile_contract().await;
    w.edit(|s| patch_bump(s, "2.0.2"));
    let other = format!("sha256:{}", "a".repeat(64));
    w.sign("lena", Some(other.clone()));
    w.sign("tomas", None);
    let requests = w.reconcile_contract().await;
    assert_eq!(w.state_of(&w.hash()), RevisionState::Pending);
    let (_, reason, message) = w.condition("SignedOff");
    assert_eq!(reason, "AwaitingSignOff");
    assert!(message.contains(&other), "{message}");
    assert!(!requests.iter().any(|r| r.kind() == "Job"));
}

#[tokio::test]
async fn a_controller_restart_at_each_point_carries_on_without_a_second_job() {
    let mut w = World::new();
    w.reconcile_contract().await;
    w.restart();
    assert_eq!(w.workers_run().await, "2.0.1");

    // Restart while waiting for sign-offs.
    w.edit(|s| patch_bump(s, "2.0.2"));
    let hash = w.hash();
    w.reconcile_contract().await;
    w.restart();
    w.reconcile_contract().await;
    assert_eq!(w.state_of(&hash), RevisionState::Pending);

    // Restart while the Job runs: it is found, not created again.
    w.sign("lena", None);
    w.sign("tomas", None);
    w.reconcile_contract().await;
    assert_eq!(w.jobs.len(), 1);
    w.restart();
    let requests = w.reconcile_contract().await;
    assert!(
        !requests
            .iter()
            .any(|r| r.method == "POST" && r.kind() == "Job")
    );
    assert_eq!(w.workers_run().await, "2.0.1");

    // Restart after the Job finished: its report is read.
    w.finish_job(true, Some(&report("Passed", 0, 0)), None);
    w.restart();
    w.reconcile_contract().await;
    assert_eq!(w.state_of(&hash), RevisionState::Active);

    // Restart after the Job's TTL removed it: the result stays, no new Job.
    let job = w.jobs.pop().unwrap();
    delete(&mut w.writers.jobs, job);
    w.restart();
    let requests = w.reconcile_contract().await;
    assert!(!requests.iter().any(|r| r.method == "POST"));
    assert_eq!(w.workers_run().await, "2.0.2");
}

#[tokio::test]
async fn a_job_gone_before_it_reported_is_started_again() {
    let mut w = World::new();
    in_preflight(&mut w, "2.0.2").await;
    let job = w.jobs.pop().unwrap();
    delete(&mut w.writers.jobs, job);
    let requests = w.reconcile_contract().await;
    assert!(
        requests
            .iter()
            .any(|r| r.method == "POST" && r.kind() == "Job")
    );
}

#[tokio::test]
async fn an_edit_during_preflight_replaces_the_candidate_and_stops_its_job() {
    let mut w = World::new();
    let first = in_preflight(&mut w, "2.0.2").await;
    let old_job = w.jobs[0].metadata.name.clone().unwrap();
    w.edit(|s| s.version = "2.0.3".into());
    let requests = w.reconcile_contract().await;
    assert_eq!(w.state_of(&first), RevisionState::Rejected);
    assert!(
        requests
            .iter()
            .any(|r| r.method == "DELETE" && r.path.ends_with(&format!("/jobs/{old_job}"))),
        "the replaced candidate's Job is stopped"
    );
    assert_eq!(w.workers_run().await, "2.0.1");
}

#[tokio::test]
async fn the_workers_config_map_never_holds_a_version_that_has_not_passed() {
    // Every step of every path above, the flow reconcile renders only versions whose revision is active.
    let mut w = World::new();
    let mut passed = vec!["2.0.1".to_string()];
    w.reconcile_contract().await;
    type Step = Box<dyn Fn(&mut World)>;
    let steps: Vec<Step> = vec![
        Box::new(|w| w.edit(|s| patch_bump(s, "2.0.2"))),
        Box::new(|w| w.sign("lena", None)),
        Box::new(|w| w.sign("tomas", None)),
        Box::new(|w| w.edit(|s| s.version = "2.0.3".into())),
        Box::new(|w| {
            w.edit(|s| {
                s.sign_offs
                    .iter_mut()
                    .for_each(|o| o.version = "2.0.3".into())
            })
        }),
    ];
    for step in steps {
        step(&mut w);
        w.reconcile_contract().await;
        let running = w.workers_run().await;
        assert!(
            passed.contains(&running),
            "{running} never passed its gates"
        );
        if let Some(job) = w.jobs.last()
            && job.status.is_none()
        {
            w.finish_job(true, Some(&report("Passed", 0, 0)), None);
            w.reconcile_contract().await;
            passed.push(w.status().current_version.clone().unwrap());
        }
    }
    assert_eq!(w.workers_run().await, "2.0.3");
}

/// The controller reads exactly what `meshline replay` leaves as its termination message, and the Job's
/// arguments are ones `meshline replay` accepts.
#[tokio::test]
async fn the_job_speaks_the_replay_command_s_language() {
    use clap::Parser;
    use meshline::rollout::replay::{ContractVersion, PathCount, Report, Verdict};
    let v = |version: &str| ContractVersion {
        version: version.into(),
        content_hash: format!("sha256:{}", "b".repeat(64)),
    };
    let failed = Report::failed("the ledger does not answer", &v("2.0.1"), &v("2.0.2"));
    let read = meshline::controller::contract::status::Replay::parse(&failed.termination_message())
        .unwrap();
    assert!(!read.passed);
    assert!(read.reason.unwrap().contains("the ledger does not answer"));
    let mut passed = failed.clone();
    passed.verdict = Verdict::Passed;
    passed.reason = None;
    passed.records = 1000;
    passed.changed_outputs = 12;
    passed.changed_paths = vec![PathCount {
        path: "order_line[].price_unit".into(),
        records: 12,
    }];
    let read = meshline::controller::contract::status::Replay::parse(&passed.termination_message())
        .unwrap();
    assert!(read.passed);
    assert_eq!((read.records, read.changed_outputs), (1000, 12));
    assert_eq!(
        read.changed_paths,
        vec!["order_line[].price_unit: 12".to_string()]
    );

    let mut w = World::new();
    in_preflight(&mut w, "2.0.2").await;
    let job = &w.jobs[0];
    let container = &job
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0];
    let mut argv = vec!["meshline".to_string()];
    argv.extend(container.args.clone().unwrap());
    meshline::cli::Cli::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("meshline replay refuses {argv:?}: {e}"));
}

/// A contract whose status the previous controller wrote (a `versionHistory`, no revisions): its live spec is what
/// the workers already run, so it is adopted as the active revision, and nothing stops.
#[tokio::test]
async fn a_status_from_the_previous_controller_is_adopted_without_stopping_anything() {
    let mut w = World::new();
    let hash = w.hash();
    w.contract.status = Some(
        serde_json::from_value(json!({
            "observedGeneration": 1,
            "currentVersion": "2.0.1",
            "versionHistory": [{"version": "2.0.1", "contentHash": hash, "compatibility": "initial"}],
            "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "ok"}],
        }))
        .unwrap(),
    );
    w.fill();
    w.reconcile_contract().await;
    assert_eq!(w.state_of(&hash), RevisionState::Active);
    assert_eq!(w.condition("Ready").0, "True");
    assert_eq!(w.workers_run().await, "2.0.1");
}
