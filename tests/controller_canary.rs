//! Canary rollouts of contract candidates against the API double (issue #15): the whole state machine through
//! the real contract and flow reconcilers — every step, the analysis, pause, resume, promote, abort, retry,
//! a refused command, a controller restart at each point, a canary pod that never becomes ready, and a flow on
//! the embedded ledger, which cannot share its ledger with a canary.
//!
//! What the workers say is the status poll's observation (set by the test, as the poller would), and the
//! ledger's per-revision measures are answered by a scripted operations API that records what it was asked.
//! Time is a manual clock: no test sleeps.

mod controller_support;

use controller_support::{apply, delete, load};

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use controller_support::{ApiDouble, Recorded};
use k8s_openapi::api::apps::v1::{
    ControllerRevision, Deployment, DeploymentCondition, DeploymentStatus,
};
use k8s_openapi::api::batch::v1::{Job, JobCondition, JobStatus};
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::runtime::reflector::ObjectRef;
use meshline::api::{
    CanaryStatus, OwnershipRoster, RevisionState, SignOff, SyncContract, SyncFlow,
};
use meshline::controller::contract::build;
use meshline::controller::flow::build as flow_build;
use meshline::controller::flow::status::{Observation, PodAnswer, PodObservation};
use meshline::controller::poll::{FetchError, WorkerAnswer, WorkerPod, WorkerStatusSource};
use meshline::controller::{Context, Writers};
use meshline::ledger::ManualClock;
use serde_json::{Value, json};

const NS: &str = "commerce-sync";
const FLOW: &str = "won-deals-to-odoo";
const START_MS: i64 = 1_800_000_000_000;

/// The workers' operations API as the controller reaches it: per-revision measures from a script, and the
/// release of the canary's leases, recorded.
#[derive(Default)]
struct Workers {
    /// Measures by revision name; a revision without an entry answers 503.
    measures: Mutex<BTreeMap<String, Value>>,
    calls: Mutex<Vec<(String, String, Option<String>)>>,
    /// Every set of flow-level causes the controller reported (`PUT /exceptions`), in order.
    causes: Mutex<Vec<meshline::tickets::ReportedCauses>>,
}

#[async_trait::async_trait]
impl WorkerStatusSource for Workers {
    async fn fetch(
        &self,
        _namespace: &str,
        _pod: &WorkerPod,
        _token: Option<&str>,
    ) -> Result<WorkerAnswer, FetchError> {
        unreachable!("the reconcilers read /status through the poller's observations")
    }

    async fn call(
        &self,
        _namespace: &str,
        pod: &WorkerPod,
        method: http::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), FetchError> {
        if (method.as_str(), path) == ("PUT", "/exceptions") {
            assert_eq!(token, Some("token-1"), "causes carry the flow's token");
            let causes: meshline::tickets::ReportedCauses =
                serde_json::from_slice(body.expect("a PUT has a body"))
                    .expect("ReportedCauses JSON");
            self.causes.lock().unwrap().push(causes);
            return Ok((200, br#"{"raised": 0, "cleared": 0}"#.to_vec()));
        }
        self.calls.lock().unwrap().push((
            method.to_string(),
            path.to_string(),
            token.map(str::to_string),
        ));
        assert!(
            pod.name.starts_with("meshline-won-deals-to-odoo-7d9f8"),
            "the ledger is read through a stable worker, not {}",
            pod.name
        );
        let url = url::Url::parse(&format!("http://worker{path}")).unwrap();
        let query: BTreeMap<String, String> = url.query_pairs().into_owned().collect();
        match (method.as_str(), url.path()) {
            ("GET", "/rollout/measures") => {
                assert_eq!(
                    token,
                    Some("token-1"),
                    "measures are read like /status, with the flow's token"
                );
                let since: i64 = query["since"].parse().unwrap();
                let until: i64 = query["until"].parse().unwrap();
                assert!(since < until, "a window [{since}, {until})");
                match self.measures.lock().unwrap().get(&query["revision"]) {
                    Some(m) => Ok((200, m.to_string().into_bytes())),
                    None => Ok((503, b"ledger unavailable".to_vec())),
                }
            }
            ("POST", "/rollout/release") => {
                assert_eq!(
                    token,
                    Some("token-1"),
                    "the release carries the flow's token"
                );
                Ok((200, br#"{"released": 3}"#.to_vec()))
            }
            other => panic!("unexpected call {other:?}"),
        }
    }
}

fn measures(records: i64, failed: i64, dead: i64) -> Value {
    let rate = |n: i64| {
        if records == 0 {
            "0".to_string()
        } else {
            format!(
                "{}",
                (n as f64 / records as f64 * 10_000.0).round() / 10_000.0
            )
        }
    };
    json!({"records": records, "delivered": records - dead, "failed": failed, "deadLettered": dead,
           "held": 0, "failureRate": rate(failed), "deadLetterRate": rate(dead), "p99Ms": 120})
}

/// A worker's `/status` with its revision and the split it applies.
fn worker(revision: &str, track: &str, split: Option<(&str, u8)>) -> PodAnswer {
    let mut status = json!({
        "flow": FLOW, "contractVersion": "2.0.1", "backend": "postgres",
        "counters": {"received": 200, "delivered": 199, "failed": 0, "retried": 1, "deadLettered": 1, "held": 0},
        "pending": 0, "failureRate": "0.005", "lastDeliveryTime": "2026-01-02T03:04:05Z", "mttrSeconds": null,
        "manualInterventionsPer1k": "0", "oldestPendingSeconds": null, "circuitBreaker": null, "paused": null,
        "revision": revision,
    });
    let (canary_revision, weight) = split.map_or((None, 0), |(r, w)| (Some(r), w));
    status["rollout"] = json!({"track": track, "canaryRevision": canary_revision, "weight": weight, "buckets": "x"});
    PodAnswer::Running(Box::new(serde_json::from_value(status).unwrap()))
}

struct World {
    double: ApiDouble,
    ctx: Arc<Context>,
    writers: Writers,
    clock: Arc<ManualClock>,
    workers: Arc<Workers>,
    contract: SyncContract,
    flow: SyncFlow,
    jobs: Vec<Job>,
    revisions: Vec<ControllerRevision>,
    /// What the API holds of the flow's children the canary touches.
    deployments: BTreeMap<String, Deployment>,
    config_maps: BTreeMap<String, ConfigMap>,
    services: BTreeMap<String, Service>,
    /// The workers' answers as the status poll would give them.
    pods: Vec<PodObservation>,
    events: Vec<Value>,
}

impl World {
    fn new(postgres: bool) -> World {
        let double = ApiDouble::new();
        double.put_secret(NS, "hubspot-app", &["clientSecret", "accessToken"]);
        double.put_secret(NS, "odoo-api-key", &["login", "apiKey"]);
        double.put_secret(NS, "ledger-db", &["url"]);
        // The roster's ticket sinks, mounted into the workers as well.
        double.put_secret(NS, "github-token", &["token"]);
        double.put_secret(NS, "alert-webhook-signing", &["signingSecret"]);
        let mut contract: SyncContract = load("contract.yaml");
        contract.metadata.uid = Some("contract-uid-1".into());
        contract.metadata.generation = Some(1);
        let mut flow: SyncFlow = serde_json::from_value({
            let mut f = serde_json::to_value(load::<SyncFlow>("flow.yaml")).unwrap();
            if postgres {
                f["spec"]["ledger"] = json!({"type": "postgres", "credentialsSecretRef": {"name": "ledger-db"}});
                f["spec"]["replicas"] = json!(4);
            }
            f["spec"]["rollout"] = json!({
                "preflightRecords": 500,
                "canary": {
                    "steps": [{"weight": 10}, {"weight": 50, "pause": "10m"}, {"weight": 100}],
                    "analysis": {"maxFailureRate": "0.05", "maxDeadLetterRate": "0.01", "minRecords": 20,
                                 "interval": "1m", "failureLimit": 1}
                }
            });
            f
        })
        .unwrap();
        flow.metadata.uid = Some("flow-uid-1".into());
        flow.metadata.generation = Some(1);
        let clock = ManualClock::starting_at(START_MS);
        let workers = Arc::new(Workers::default());
        let (ctx, writers) = Self::context(&double, &clock, &workers);
        let mut w = World {
            double,
            ctx,
            writers,
            clock,
            workers,
            contract,
            flow,
            jobs: Vec::new(),
            revisions: Vec::new(),
            deployments: BTreeMap::new(),
            config_maps: BTreeMap::new(),
            services: BTreeMap::new(),
            pods: Vec::new(),
            events: Vec::new(),
        };
        w.fill();
        w
    }

    fn context(
        double: &ApiDouble,
        clock: &Arc<ManualClock>,
        workers: &Arc<Workers>,
    ) -> (Arc<Context>, Writers) {
        let (ctx, writers) = controller_support::context(double);
        let ctx = Arc::into_inner(ctx)
            .unwrap()
            .with_clock(clock.clone())
            .with_workers(workers.clone());
        (Arc::new(ctx), writers)
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
        for d in self.deployments.values().cloned().collect::<Vec<_>>() {
            apply(&mut self.writers.deployments, d);
        }
        for c in self.config_maps.values().cloned().collect::<Vec<_>>() {
            apply(&mut self.writers.config_maps, c);
        }
        for s in self.services.values().cloned().collect::<Vec<_>>() {
            apply(&mut self.writers.services, s);
        }
        let mut token = k8s_openapi::api::core::v1::Secret::default();
        token.metadata.name = Some(flow_build::token_name(FLOW));
        token.metadata.namespace = Some(NS.into());
        token.data = Some(BTreeMap::from([(
            "token".to_string(),
            k8s_openapi::ByteString(b"token-1".to_vec()),
        )]));
        apply(&mut self.writers.tokens, token);
        self.observe();
    }

    /// A controller restart: new caches and context, filled from what the API holds.
    fn restart(&mut self) {
        let (ctx, writers) = Self::context(&self.double, &self.clock, &self.workers);
        self.ctx = ctx;
        self.writers = writers;
        self.fill();
    }

    /// Publishes the pods' answers as the status poll's observation.
    fn observe(&self) {
        let key = ObjectRef::from_obj(&self.flow);
        let mut map = self.ctx.observations.lock().unwrap();
        if self.pods.is_empty() {
            map.remove(&key);
        } else {
            map.insert(key, Observation::from_pods(self.pods.clone(), None));
        }
    }

    /// Every worker reports running its track's revision and applying `split`.
    fn workers_apply(
        &mut self,
        stable_rev: &str,
        canary_rev: Option<&str>,
        split: Option<(&str, u8)>,
    ) {
        let mut pods = vec![PodObservation {
            pod: "meshline-won-deals-to-odoo-7d9f8-abcde".into(),
            address: "10.0.0.7".into(),
            ready: true,
            answer: worker(stable_rev, "stable", split),
        }];
        if let Some(c) = canary_rev {
            pods.push(PodObservation {
                pod: "meshline-won-deals-to-odoo-canary-5c4b-xyz12".into(),
                address: "10.0.0.8".into(),
                ready: true,
                answer: worker(c, "canary", split),
            });
        }
        self.pods = pods;
        self.observe();
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
            &format!("/apis/sync.meshline.io/v1alpha1/namespaces/{NS}/syncflows/{FLOW}"),
            serde_json::to_value(&self.flow).unwrap(),
        );
    }

    fn check(&mut self, requests: &[Recorded]) {
        for r in requests {
            assert!(
                r.answered < 400 || r.path.contains("/events"),
                "the API refused {} {}: {}",
                r.method,
                r.path,
                r.body
            );
            // kube's recorder PATCHes a repeated Event (same reason) as a series.
            if r.path.contains("/events") && matches!(r.method.as_str(), "POST" | "PATCH") {
                self.events.push(r.body.clone());
            }
        }
    }

    async fn reconcile_contract(&mut self) -> Vec<Recorded> {
        self.register();
        meshline::controller::contract::reconcile(
            Arc::new(self.contract.clone()),
            self.ctx.clone(),
        )
        .await
        .unwrap();
        let requests = self.double.take();
        self.check(&requests);
        let created = controller_support::settle_created(&requests, &mut self.writers);
        self.revisions.extend(created.revisions);
        self.jobs.extend(created.jobs);
        if let Some(s) = requests.iter().find(|r| {
            r.method == "PATCH" && r.path.ends_with("/status") && r.path.contains("synccontracts")
        }) {
            self.contract.status = Some(serde_json::from_value(s.body["status"].clone()).unwrap());
        }
        apply(&mut self.writers.contracts, self.contract.clone());
        // The flow hears of its contract's change as its watch would tell it.
        apply(&mut self.writers.flows, self.flow.clone());
        requests
    }

    /// One flow reconcile; what it applied and deleted lands in the API (and the caches), as the API server and
    /// the watches would.
    async fn reconcile_flow(&mut self) -> Vec<Recorded> {
        self.register();
        let action =
            meshline::controller::flow::reconcile(Arc::new(self.flow.clone()), self.ctx.clone())
                .await
                .unwrap();
        let _ = action;
        let requests = self.double.take();
        self.check(&requests);
        for r in &requests {
            let name = r.path.rsplit('/').next().unwrap().to_string();
            match (r.method.as_str(), r.kind()) {
                ("PATCH", "Deployment") => {
                    let mut d: Deployment = serde_json::from_value(r.body.clone()).unwrap();
                    d.metadata.uid = Some(format!("uid-{name}"));
                    if let Some(old) = self.deployments.get(&name) {
                        d.status = old.status.clone();
                    }
                    apply(&mut self.writers.deployments, d.clone());
                    self.deployments.insert(name.clone(), d);
                }
                ("PATCH", "ConfigMap") => {
                    let c: ConfigMap = serde_json::from_value(r.body.clone()).unwrap();
                    apply(&mut self.writers.config_maps, c.clone());
                    self.config_maps.insert(name.clone(), c);
                }
                ("PATCH", "Service") => {
                    let s: Service = serde_json::from_value(r.body.clone()).unwrap();
                    apply(&mut self.writers.services, s.clone());
                    self.services.insert(name.clone(), s);
                }
                _ => {}
            }
            if r.method == "DELETE"
                && r.path.contains("/deployments/")
                && let Some(d) = self.deployments.remove(&name)
            {
                {
                    delete(&mut self.writers.deployments, d);
                    // Garbage collection takes what the Deployment owns.
                    for (n, c) in self.config_maps.clone() {
                        if owned_by(&c.metadata, &name) {
                            self.config_maps.remove(&n);
                            delete(&mut self.writers.config_maps, c);
                        }
                    }
                    for (n, s) in self.services.clone() {
                        if owned_by(&s.metadata, &name) {
                            self.services.remove(&n);
                            delete(&mut self.writers.services, s);
                        }
                    }
                }
            }
        }
        if let Some(s) = requests.iter().find(|r| {
            r.method == "PATCH" && r.path.ends_with("/status") && r.path.contains("syncflows")
        }) {
            self.flow.status = Some(serde_json::from_value(s.body["status"].clone()).unwrap());
        }
        apply(&mut self.writers.flows, self.flow.clone());
        requests
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

    fn state_of(&self, hash: &str) -> RevisionState {
        self.contract
            .status
            .as_ref()
            .unwrap()
            .revisions
            .iter()
            .find(|r| r.content_hash == hash)
            .unwrap_or_else(|| panic!("no revision {hash}"))
            .state
    }

    fn canary(&self) -> CanaryStatus {
        self.flow
            .status
            .as_ref()
            .and_then(|s| s.canary.clone())
            .expect("a canary status")
    }

    fn split(&self) -> Value {
        let cm = self
            .config_maps
            .get(&flow_build::rollout_name(FLOW))
            .expect("the rollout ConfigMap");
        serde_json::from_str(&cm.data.as_ref().unwrap()["split.json"]).unwrap()
    }

    /// The contract version and revision in the stable workers' ConfigMap.
    fn stable_runs(&self) -> (String, String) {
        let cm = self
            .config_maps
            .get(&flow_build::worker_name(FLOW))
            .expect("the workers' ConfigMap");
        let rendered: Value =
            serde_yaml::from_str(&cm.data.as_ref().unwrap()["flow.yaml"]).unwrap();
        (
            rendered["contract"]["spec"]["version"]
                .as_str()
                .unwrap()
                .to_string(),
            rendered["revision"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        )
    }

    fn command(&mut self, value: &str) {
        self.flow
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert("sync.meshline.io/rollout-command".into(), value.into());
        apply(&mut self.writers.flows, self.flow.clone());
    }

    fn advance(&mut self, by: Duration) {
        self.clock.advance(by);
    }

    fn measures_for(&self, revision: &str, m: Value) {
        self.workers
            .measures
            .lock()
            .unwrap()
            .insert(revision.into(), m);
    }

    fn event_reasons(&self) -> Vec<String> {
        self.events
            .iter()
            .map(|e| e["reason"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// v2.0.1 active, v2.0.2 signed and through its preflight: the contract puts it in its canary. Returns
    /// (active revision, candidate revision).
    async fn candidate_in_canary(&mut self) -> (String, String) {
        self.reconcile_contract().await;
        let active = self
            .contract
            .status
            .as_ref()
            .unwrap()
            .active_revision
            .clone()
            .unwrap();
        self.reconcile_flow().await;
        self.workers_apply(&active, None, None);
        self.edit(|s| {
            s.version = "2.0.2".into();
            s.sla = None;
        });
        self.sign("lena");
        self.sign("tomas");
        self.reconcile_contract().await;
        let hash = self.hash();
        assert_eq!(self.state_of(&hash), RevisionState::Preflight);
        self.finish_preflight();
        self.reconcile_contract().await;
        let candidate = build::revision_name("deal-to-sale-order", &hash);
        (active, candidate)
    }

    fn finish_preflight(&mut self) {
        let job = self.jobs.last_mut().expect("a preflight Job");
        let name = job.metadata.name.clone().unwrap();
        job.status = Some(JobStatus {
            succeeded: Some(1),
            conditions: Some(vec![JobCondition {
                type_: "Complete".into(),
                status: "True".into(),
                ..JobCondition::default()
            }]),
            ..JobStatus::default()
        });
        let job = job.clone();
        apply(&mut self.writers.jobs, job);
        let report = json!({"verdict": "Passed", "records": 500, "newlyRejected": 0, "newlyHeld": 0,
                            "newlyAccepted": 0, "changedOutputs": 0, "changedPaths": [], "examples": []});
        self.double.put(
            &format!("/api/v1/namespaces/{NS}/pods/{name}-abcde"),
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("{name}-abcde"), "namespace": NS,
                             "labels": {"batch.kubernetes.io/job-name": name, "job-name": name}},
                "status": {"containerStatuses": [{"name": "replay", "ready": false, "restartCount": 0,
                           "image": "x", "imageID": "", "state": {"terminated": {"exitCode": 0, "message": report.to_string()}}}]}
            }),
        );
    }

    /// The canary Deployment's pods, as the API lists them.
    fn put_canary_pod(&self) {
        self.double.put(
            &format!("/api/v1/namespaces/{NS}/pods/meshline-won-deals-to-odoo-canary-5c4b-xyz12"),
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": "meshline-won-deals-to-odoo-canary-5c4b-xyz12", "namespace": NS,
                                "labels": flow_build::canary_selector(FLOW)}}),
        );
    }

    fn remove_canary_pod(&self) {
        self.double.objects.lock().unwrap().remove(&format!(
            "/api/v1/namespaces/{NS}/pods/meshline-won-deals-to-odoo-canary-5c4b-xyz12"
        ));
    }
}

fn owned_by(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    owner: &str,
) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "Deployment" && o.name == owner)
}

fn canary_name() -> String {
    flow_build::canary_name(FLOW)
}

/// Runs a step from its weight being asked to its measurement passing: the workers apply the weight, the step's
/// clock starts, an interval passes, the measurement reads `canary` and `stable`.
async fn pass_step(w: &mut World, active: &str, candidate: &str, weight: u8) {
    assert_eq!(
        w.split(),
        json!({"canaryRevision": candidate, "weight": weight})
    );
    w.workers_apply(active, Some(candidate), Some((candidate, weight)));
    w.reconcile_flow().await;
    assert!(w.canary().step_started_at.is_some(), "{:?}", w.canary());
    w.measures_for(candidate, measures(100, 1, 0));
    w.measures_for(active, measures(900, 9, 0));
    w.advance(Duration::from_secs(61));
    w.reconcile_flow().await;
}

#[tokio::test]
async fn a_candidate_goes_through_every_step_and_is_promoted() {
    let mut w = World::new(true);
    let (active, candidate) = w.candidate_in_canary().await;
    let hash = w.hash();
    assert_eq!(w.state_of(&hash), RevisionState::Canary);
    let ready = w
        .contract
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.r#type == "CanaryPassed")
        .cloned()
        .unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "CanaryRunning")
    );

    // Step 0: the canary Deployment on the candidate, the split at 10 %.
    let requests = w.reconcile_flow().await;
    let c = w.canary();
    assert_eq!((c.phase.as_str(), c.step, c.weight), ("Progressing", 0, 10));
    assert_eq!(c.revision, candidate);
    assert_eq!(
        w.split(),
        json!({"canaryRevision": candidate, "weight": 10})
    );
    let d = w
        .deployments
        .get(&canary_name())
        .expect("the canary Deployment")
        .clone();
    let spec = d.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(1), "10 % of 4 replicas, rounded up");
    let labels = spec.selector.match_labels.clone().unwrap();
    assert_eq!(labels["app.kubernetes.io/component"], "worker-canary");
    let container = &spec.template.spec.as_ref().unwrap().containers[0];
    let args = container.args.clone().unwrap().join(" ");
    assert!(
        args.contains("--track canary")
            && args.contains("--rollout-file /etc/meshline/rollout/split.json"),
        "{args}"
    );
    assert!(!args.contains("--buckets"), "{args}");
    let stable = w.deployments.get(&flow_build::worker_name(FLOW)).unwrap();
    let stable_args = stable
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .args
        .clone()
        .unwrap()
        .join(" ");
    assert!(stable_args.contains("--track stable"), "{stable_args}");
    // The stable workers keep the active revision.
    assert_eq!(w.stable_runs(), ("2.0.1".into(), active.clone()));
    // The canary's ConfigMap and status Service wait for the Deployment's uid, then are owned by it.
    assert!(
        !requests
            .iter()
            .any(|r| r.kind() == "ConfigMap" && r.path.ends_with(&canary_name()))
    );
    w.reconcile_flow().await;
    let cm = w
        .config_maps
        .get(&canary_name())
        .expect("the canary's ConfigMap");
    assert!(owned_by(&cm.metadata, &canary_name()));
    let rendered: Value = serde_yaml::from_str(&cm.data.as_ref().unwrap()["flow.yaml"]).unwrap();
    assert_eq!(rendered["contract"]["spec"]["version"], "2.0.2");
    assert_eq!(rendered["revision"], candidate.as_str());
    let svc = w
        .services
        .get(&flow_build::canary_status_service_name(FLOW))
        .expect("the canary's status Service");
    assert!(owned_by(&svc.metadata, &canary_name()));

    // Until every worker of both tracks applies 10 %, the step's clock does not start and nothing is measured.
    w.workers_apply(&active, Some(&candidate), Some((&candidate, 0)));
    w.advance(Duration::from_secs(600));
    w.reconcile_flow().await;
    assert!(w.canary().step_started_at.is_none());
    assert!(
        w.workers.calls.lock().unwrap().is_empty(),
        "no measurement before the weight is applied"
    );

    pass_step(&mut w, &active, &candidate, 10).await;
    let c = w.canary();
    assert_eq!((c.step, c.weight), (1, 50), "{c:?}");
    let m = c.measurements.last().unwrap();
    assert_eq!((m.verdict.as_str(), m.step), ("Passed", 0));
    assert_eq!(m.canary.as_ref().unwrap().records, 100);
    assert_eq!(m.stable.as_ref().unwrap().records, 900);
    assert_eq!(
        w.deployments[&canary_name()]
            .spec
            .as_ref()
            .unwrap()
            .replicas,
        Some(2)
    );

    // Step 1 has a 10-minute pause: a passing measurement alone does not end it.
    pass_step(&mut w, &active, &candidate, 50).await;
    assert_eq!(w.canary().step, 1);
    w.advance(Duration::from_secs(540));
    w.reconcile_flow().await;
    assert_eq!(w.canary().step, 2, "{:?}", w.canary());
    pass_step(&mut w, &active, &candidate, 100).await;
    let c = w.canary();
    assert_eq!(
        (c.phase.as_str(), c.reason.as_deref()),
        ("Promoting", Some("StepsPassed"))
    );

    // The contract promotes; the stable workers get the candidate; the canary keeps its buckets until they run it.
    w.reconcile_contract().await;
    assert_eq!(w.state_of(&hash), RevisionState::Active);
    // A controller restart in the middle of the promotion carries on.
    w.restart();
    w.reconcile_flow().await;
    assert_eq!(w.stable_runs(), ("2.0.2".into(), candidate.clone()));
    assert!(w.deployments.contains_key(&canary_name()));
    assert_eq!(
        w.split(),
        json!({"canaryRevision": candidate, "weight": 100})
    );
    // Every stable worker runs it: the canary goes, and its leases are released once its pods are gone.
    w.workers_apply(&candidate, Some(&candidate), Some((&candidate, 100)));
    w.put_canary_pod();
    let requests = w.reconcile_flow().await;
    assert!(
        requests.iter().any(|r| r.method == "DELETE"
            && r.path.ends_with(&format!("/deployments/{}", canary_name())))
    );
    assert!(
        !w.config_maps.contains_key(&canary_name()),
        "its ConfigMap goes with it"
    );
    assert_eq!(w.split(), json!({"weight": 0}));
    assert_eq!(w.canary().phase, "Promoting", "its pods are still there");
    w.restart();
    w.reconcile_flow().await;
    assert_eq!(
        w.canary().phase,
        "Promoting",
        "its pods are still there after a restart"
    );
    w.remove_canary_pod();
    w.workers_apply(&candidate, None, None);
    w.reconcile_flow().await;
    let c = w.canary();
    assert_eq!(c.phase, "Promoted", "{c:?}");
    let calls = w.workers.calls.lock().unwrap().clone();
    let release = calls
        .iter()
        .find(|c| c.0 == "POST")
        .expect("the leases are released");
    assert_eq!(
        release.1,
        format!("/rollout/release?ownerPrefix={}-", canary_name())
    );
    assert!(w.event_reasons().iter().any(|r| r == "CanaryPromoted"));
    assert!(w.event_reasons().iter().any(|r| r == "CanaryStepAdvanced"));
    // Final: nothing more happens.
    let requests = w.reconcile_flow().await;
    assert!(
        !requests
            .iter()
            .any(|r| r.method == "DELETE" || (r.method == "POST" && !r.path.contains("/events")))
    );
}

#[tokio::test]
async fn failed_analysis_beyond_the_limit_aborts_rolls_back_and_retry_starts_again() {
    let mut w = World::new(true);
    let (active, candidate) = w.candidate_in_canary().await;
    let hash = w.hash();
    w.reconcile_flow().await;
    w.reconcile_flow().await;
    w.workers_apply(&active, Some(&candidate), Some((&candidate, 10)));
    w.reconcile_flow().await;
    // The canary dead-letters 5 %; stable none. failureLimit 1: the first failure is tolerated.
    w.measures_for(&candidate, measures(100, 5, 5));
    w.measures_for(&active, measures(900, 0, 0));
    w.advance(Duration::from_secs(61));
    w.reconcile_flow().await;
    let c = w.canary();
    assert_eq!(
        (c.phase.as_str(), c.failed_measurements),
        ("Progressing", 1),
        "{c:?}"
    );
    assert_eq!(c.measurements.last().unwrap().verdict, "Failed");
    w.advance(Duration::from_secs(61));
    w.put_canary_pod();
    let requests = w.reconcile_flow().await;
    let c = w.canary();
    assert_eq!(
        (c.phase.as_str(), c.reason.as_deref()),
        ("Aborting", Some("FailureLimitReached")),
        "{c:?}"
    );
    assert!(
        c.message.as_deref().unwrap().contains("dead-letter rate"),
        "{c:?}"
    );
    assert_eq!(c.weight, 0);
    assert_eq!(
        w.split(),
        json!({"weight": 0}),
        "every bucket back to stable at once"
    );
    assert!(
        requests.iter().any(|r| r.method == "DELETE"
            && r.path.ends_with(&format!("/deployments/{}", canary_name())))
    );
    assert!(w.event_reasons().iter().any(|r| r == "CanaryAborted"));
    // A controller restart while the canary's pods terminate changes nothing.
    w.restart();
    w.reconcile_flow().await;
    assert_eq!(w.canary().phase, "Aborting");
    w.remove_canary_pod();
    w.workers_apply(&active, None, None);
    w.reconcile_flow().await;
    assert_eq!(w.canary().phase, "Aborted");
    assert!(
        w.workers
            .calls
            .lock()
            .unwrap()
            .iter()
            .any(|c| c.0 == "POST")
    );

    // The contract rejects the candidate with the analysis that failed; the stable workers never left v2.0.1.
    w.reconcile_contract().await;
    assert_eq!(w.state_of(&hash), RevisionState::Rejected);
    let entry = w
        .contract
        .status
        .as_ref()
        .unwrap()
        .revisions
        .iter()
        .find(|r| r.content_hash == hash)
        .unwrap()
        .clone();
    assert_eq!(entry.reason.as_deref(), Some("CanaryAborted"));
    assert!(entry.message.unwrap().contains("dead-letter rate"));
    assert_eq!(w.stable_runs(), ("2.0.1".into(), active.clone()));

    // The rejection is a ticket for the flow's owners: the next flow reconcile reports it to a worker.
    w.reconcile_flow().await;
    let reported = w.workers.causes.lock().unwrap().last().cloned().unwrap();
    let cause = reported
        .causes
        .iter()
        .find(|c| c.reason.starts_with("contract:CanaryAborted:"))
        .unwrap_or_else(|| panic!("no contract cause in {reported:?}"));
    assert_eq!(
        cause.kind,
        meshline::tickets::ExceptionKind::ContractRejected
    );
    assert!(cause.summary.contains("dead-letter rate"), "{cause:?}");

    // Retry: the rollout starts again from its first step, and the contract puts the candidate back.
    w.command("retry:1");
    w.reconcile_flow().await;
    let c = w.canary();
    assert_eq!(
        (c.phase.as_str(), c.step, c.weight, c.failed_measurements),
        ("Progressing", 0, 10, 0),
        "{c:?}"
    );
    assert_eq!(c.last_command.as_deref(), Some("retry:1"));
    w.reconcile_contract().await;
    assert_eq!(w.state_of(&hash), RevisionState::Canary);
    assert!(w.deployments.contains_key(&canary_name()));
    // Back in canary: the cause cleared, so the next report leaves it out and the worker resolves its ticket.
    w.reconcile_flow().await;
    let reported = w.workers.causes.lock().unwrap().last().cloned().unwrap();
    assert!(
        !reported
            .causes
            .iter()
            .any(|c| c.reason.starts_with("contract:")),
        "{reported:?}"
    );
}

#[tokio::test]
async fn pause_resume_promote_abort_and_a_refused_command_each_act_once() {
    let mut w = World::new(true);
    let (active, candidate) = w.candidate_in_canary().await;
    w.reconcile_flow().await;
    w.reconcile_flow().await;
    w.workers_apply(&active, Some(&candidate), Some((&candidate, 10)));
    w.reconcile_flow().await;
    w.measures_for(&candidate, measures(100, 0, 0));
    w.measures_for(&active, measures(900, 0, 0));

    // Pause: no measurement, no step, however long.
    w.command("pause:a");
    w.reconcile_flow().await;
    assert_eq!(
        (w.canary().phase.as_str(), w.canary().reason.as_deref()),
        ("Paused", Some("PausedByUser"))
    );
    w.advance(Duration::from_secs(3600));
    w.reconcile_flow().await;
    assert_eq!(w.canary().step, 0);
    assert!(w.workers.calls.lock().unwrap().is_empty());
    assert_eq!(
        w.split(),
        json!({"canaryRevision": candidate, "weight": 10}),
        "paused keeps the split"
    );

    // The same command again (a re-applied manifest) is not acted on twice; a retry while paused is refused once.
    w.reconcile_flow().await;
    w.command("retry:b");
    w.reconcile_flow().await;
    w.reconcile_flow().await;
    let refused = w
        .event_reasons()
        .iter()
        .filter(|r| *r == "RolloutCommandRefused")
        .count();
    assert_eq!(refused, 1);
    assert_eq!(w.canary().phase, "Paused");
    w.command("nonsense:c");
    w.reconcile_flow().await;
    w.reconcile_flow().await;
    assert_eq!(
        w.event_reasons()
            .iter()
            .filter(|r| *r == "RolloutCommandInvalid")
            .count(),
        1
    );
    let refusal = w
        .events
        .iter()
        .rev()
        .find(|e| e["reason"] == "RolloutCommandInvalid")
        .unwrap();
    assert!(
        refusal["note"]
            .as_str()
            .unwrap()
            .contains("sync.meshline.io/rollout-command"),
        "{refusal}"
    );

    // Resume: the step starts over once the weight is applied (a pause is not time spent measuring).
    w.command("resume:d");
    w.reconcile_flow().await;
    assert_eq!(w.canary().phase, "Progressing");
    w.reconcile_flow().await;
    assert!(w.canary().step_started_at.is_some());
    w.advance(Duration::from_secs(61));
    w.reconcile_flow().await;
    assert_eq!(w.canary().step, 1);

    // Promote now skips the remaining steps; abort while promoting rolls back.
    w.command("promote:e");
    w.reconcile_flow().await;
    assert_eq!(
        (w.canary().phase.as_str(), w.canary().reason.as_deref()),
        ("Promoting", Some("PromotedByUser"))
    );
    w.command("abort:f");
    w.reconcile_flow().await;
    assert_eq!(
        (w.canary().phase.as_str(), w.canary().reason.as_deref()),
        ("Aborting", Some("AbortedByUser"))
    );
    assert!(!w.deployments.contains_key(&canary_name()));
    // Its pods are gone (the double lists none): aborted.
    w.reconcile_flow().await;
    assert_eq!(
        (w.canary().phase.as_str(), w.canary().reason.as_deref()),
        ("Aborted", Some("AbortedByUser"))
    );
    assert_eq!(w.split(), json!({"weight": 0}));
}

#[tokio::test]
async fn a_controller_restart_at_each_point_neither_repeats_nor_skips_a_step() {
    let mut w = World::new(true);
    let (active, candidate) = w.candidate_in_canary().await;
    w.restart();
    w.reconcile_flow().await;
    w.restart();
    w.reconcile_flow().await;
    w.workers_apply(&active, Some(&candidate), Some((&candidate, 10)));
    w.restart();
    w.reconcile_flow().await;
    let started = w.canary().step_started_at.clone().unwrap();
    w.restart();
    w.reconcile_flow().await;
    assert_eq!(
        w.canary().step_started_at.unwrap(),
        started,
        "a restart does not restart the step"
    );
    w.measures_for(&candidate, measures(100, 0, 0));
    w.measures_for(&active, measures(900, 0, 0));
    w.advance(Duration::from_secs(61));
    w.restart();
    w.reconcile_flow().await;
    assert_eq!((w.canary().step, w.canary().measurements.len()), (1, 1));
    w.restart();
    w.reconcile_flow().await;
    assert_eq!(
        (w.canary().step, w.canary().measurements.len()),
        (1, 1),
        "no second measurement, no skipped step"
    );
    let creates = w.double.take();
    assert!(creates.is_empty());
}

#[tokio::test]
async fn a_canary_that_never_becomes_ready_is_aborted_by_its_progress_deadline() {
    let mut w = World::new(true);
    let (active, candidate) = w.candidate_in_canary().await;
    w.reconcile_flow().await;
    w.reconcile_flow().await;
    // Only the stable worker answers; the canary pod never starts. The step never begins.
    w.workers_apply(&active, None, Some((&candidate, 10)));
    w.advance(Duration::from_secs(3600));
    w.reconcile_flow().await;
    assert!(w.canary().step_started_at.is_none());
    assert_eq!(w.canary().phase, "Progressing");
    // The Deployment controller gives up after progressDeadlineSeconds.
    let mut d = w.deployments[&canary_name()].clone();
    d.status = Some(DeploymentStatus {
        conditions: Some(vec![DeploymentCondition {
            type_: "Progressing".into(),
            status: "False".into(),
            reason: Some("ProgressDeadlineExceeded".into()),
            message: Some("ReplicaSet has timed out progressing.".into()),
            ..DeploymentCondition::default()
        }]),
        ..DeploymentStatus::default()
    });
    w.deployments.insert(canary_name(), d.clone());
    apply(&mut w.writers.deployments, d);
    w.reconcile_flow().await;
    let c = w.canary();
    assert_eq!(c.reason.as_deref(), Some("CanaryNotReady"), "{c:?}");
    assert!(c.message.unwrap().contains("ProgressDeadlineExceeded"));
    assert!(!w.deployments.contains_key(&canary_name()));
}

#[tokio::test]
async fn analysis_errors_and_a_failing_stable_track_are_told_apart_from_a_bad_version() {
    let mut w = World::new(true);
    let (active, candidate) = w.candidate_in_canary().await;
    w.reconcile_flow().await;
    w.reconcile_flow().await;
    w.workers_apply(&active, Some(&candidate), Some((&candidate, 10)));
    w.reconcile_flow().await;
    // Both tracks fail alike (the ERP is down): inconclusive, not a failure of the version.
    w.measures_for(&candidate, measures(100, 40, 0));
    w.measures_for(&active, measures(900, 360, 0));
    w.advance(Duration::from_secs(61));
    w.reconcile_flow().await;
    let c = w.canary();
    assert_eq!(
        (
            c.measurements.last().unwrap().verdict.as_str(),
            c.failed_measurements
        ),
        ("Inconclusive", 0),
        "{c:?}"
    );
    // Too few records: inconclusive too.
    w.measures_for(&candidate, measures(5, 0, 0));
    w.advance(Duration::from_secs(61));
    w.reconcile_flow().await;
    assert_eq!(
        w.canary().measurements.last().unwrap().verdict,
        "Inconclusive"
    );
    assert_eq!(w.canary().step, 0, "no evidence, no next step");
    // The ledger does not answer: errors, and beyond the limit (default 4 in a row) the rollout aborts.
    w.workers.measures.lock().unwrap().clear();
    for _ in 0..4 {
        w.advance(Duration::from_secs(61));
        w.reconcile_flow().await;
        assert_eq!(w.canary().phase, "Progressing");
    }
    w.advance(Duration::from_secs(61));
    w.reconcile_flow().await;
    let c = w.canary();
    assert_eq!(
        c.reason.as_deref(),
        Some("ConsecutiveErrorLimitReached"),
        "{c:?}"
    );
    assert_eq!(c.measurements.len(), 7);
}

#[tokio::test]
async fn an_embedded_ledger_flow_says_its_canary_needs_postgres_and_waits_for_a_person() {
    let mut w = World::new(false);
    let (_active, candidate) = w.candidate_in_canary().await;
    let hash = w.hash();
    w.reconcile_flow().await;
    let c = w.canary();
    assert_eq!(
        (c.phase.as_str(), c.reason.as_deref()),
        ("Paused", Some("CanaryNeedsSharedLedger"))
    );
    assert!(c.message.unwrap().contains("PostgreSQL ledger"));
    assert!(!w.deployments.contains_key(&canary_name()));
    assert!(
        !w.config_maps.contains_key(&flow_build::rollout_name(FLOW)),
        "no split to follow"
    );
    w.command("resume:1");
    w.reconcile_flow().await;
    assert_eq!(
        w.canary().phase,
        "Paused",
        "resume cannot give it a shared ledger"
    );
    w.command("promote:2");
    w.reconcile_flow().await;
    assert_eq!(w.canary().phase, "Promoting");
    w.reconcile_contract().await;
    assert_eq!(w.state_of(&hash), RevisionState::Active);
    w.reconcile_flow().await;
    assert_eq!(w.stable_runs(), ("2.0.2".into(), candidate.clone()));
    w.workers_apply(&candidate, None, None);
    w.reconcile_flow().await;
    assert_eq!(w.canary().phase, "Promoted");
}
