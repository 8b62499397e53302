//! Reconcile tests against the in-process API double: each test asserts the exact requests the controller
//! makes (method, path, field manager, force, body) for one promise of the operating model.

mod controller_support;

use std::sync::Arc;

use controller_support::{ApiDouble, Recorded};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentStatus};
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use meshline::api::{LedgerType, OwnershipRoster, SecretRef, SyncContract, SyncFlow};
use meshline::controller::flow::build::{BuildSettings, NetworkPolicySettings};
use meshline::controller::flow::status::Observation;
use meshline::controller::metrics::Metrics;
use meshline::controller::poll::{FetchError, WorkerAnswer, WorkerStatusSource, parse_answer};
use meshline::controller::{Context, Stores, Writers};
use serde_json::Value;

const NS: &str = "commerce-sync";
const FLOW: &str = "won-deals-to-odoo";

fn load<T: serde::de::DeserializeOwned>(file: &str) -> T {
    let text = std::fs::read_to_string(format!(
        "{}/examples/hubspot-odoo/{file}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    serde_yaml::from_str(&text).unwrap()
}

fn flow() -> SyncFlow {
    let mut f: SyncFlow = load("flow.yaml");
    f.metadata.uid = Some("flow-uid-1".into());
    f.metadata.generation = Some(1);
    f
}
fn contract() -> SyncContract {
    let mut c: SyncContract = load("contract.yaml");
    c.metadata.uid = Some("contract-uid-1".into());
    c.metadata.generation = Some(1);
    c
}
fn roster() -> OwnershipRoster {
    let mut r: OwnershipRoster = load("roster.yaml");
    r.metadata.generation = Some(1);
    r
}

fn apply<K: kube::Resource<DynamicType = ()> + Clone>(
    w: &mut kube::runtime::reflector::store::Writer<K>,
    obj: K,
) {
    w.apply_watcher_event(&watcher::Event::Apply(obj));
}

struct Harness {
    double: ApiDouble,
    ctx: Arc<Context>,
    writers: Writers,
}

/// A double with the example's Secrets, and caches holding the example's contract and roster.
fn harness() -> Harness {
    harness_with(BuildSettings {
        worker_image: "ghcr.io/meshline/meshline:test".into(),
        ..BuildSettings::default()
    })
}

/// [`harness`] with the controller started with `build`.
fn harness_with(build: BuildSettings) -> Harness {
    let double = ApiDouble::new();
    double.put_secret(NS, "hubspot-app", &["clientSecret", "accessToken"]);
    double.put_secret(NS, "odoo-api-key", &["login", "apiKey"]);
    let (stores, mut writers) = Stores::new();
    apply(&mut writers.contracts, contract());
    apply(&mut writers.rosters, roster());
    let ctx = Arc::new(Context::new(
        double.client(),
        build,
        stores,
        Arc::new(Metrics::new()),
    ));
    Harness {
        double,
        ctx,
        writers,
    }
}

/// Registers a custom resource with the double, so its status patch is answered with the whole object.
fn register<K: kube::Resource<DynamicType = ()> + serde::Serialize>(h: &Harness, obj: &K) {
    let path = format!(
        "/apis/sync.meshline.io/v1alpha1/namespaces/{}/{}/{}",
        obj.meta().namespace.as_deref().unwrap(),
        K::plural(&()),
        obj.meta().name.as_deref().unwrap()
    );
    h.double.put(&path, serde_json::to_value(obj).unwrap());
}

async fn reconcile(h: &Harness, flow: &SyncFlow) -> Vec<Recorded> {
    register(h, flow);
    meshline::controller::flow::reconcile(Arc::new(flow.clone()), h.ctx.clone())
        .await
        .unwrap();
    h.double.take()
}

fn writes(requests: &[Recorded]) -> Vec<&Recorded> {
    requests
        .iter()
        .filter(|r| r.is_write() && !r.path.contains("/events"))
        .collect()
}

fn status_patch(requests: &[Recorded]) -> Option<&Recorded> {
    requests
        .iter()
        .find(|r| r.method == "PATCH" && r.path.ends_with("/status"))
}

fn condition<'a>(status: &'a Value, t: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == t)
        .unwrap_or_else(|| panic!("no condition {t} in {status}"))
}

/// Feeds what the controller applied back into its caches, as the watches would, with a ready Deployment.
fn settle(h: &mut Harness, requests: &[Recorded], flow: &mut SyncFlow) {
    for r in requests
        .iter()
        .filter(|r| r.method == "PATCH" || r.method == "POST")
    {
        let body = r.body.clone();
        match r.kind() {
            "ConfigMap" => apply(
                &mut h.writers.config_maps,
                serde_json::from_value::<ConfigMap>(body).unwrap(),
            ),
            "Service" => apply(
                &mut h.writers.services,
                serde_json::from_value::<Service>(body).unwrap(),
            ),
            "PersistentVolumeClaim" => apply(
                &mut h.writers.pvcs,
                serde_json::from_value::<PersistentVolumeClaim>(body).unwrap(),
            ),
            "PodDisruptionBudget" => apply(
                &mut h.writers.pdbs,
                serde_json::from_value::<PodDisruptionBudget>(body).unwrap(),
            ),
            "Secret" => apply(
                &mut h.writers.tokens,
                serde_json::from_value::<Secret>(body).unwrap(),
            ),
            "NetworkPolicy" => apply(
                &mut h.writers.network_policies,
                serde_json::from_value::<NetworkPolicy>(body).unwrap(),
            ),
            "Deployment" => {
                let mut d: Deployment = serde_json::from_value(body).unwrap();
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
                apply(&mut h.writers.deployments, d);
            }
            _ => {}
        }
    }
    if let Some(s) = status_patch(requests) {
        flow.status = Some(serde_json::from_value(s.body["status"].clone()).unwrap());
    }
}

#[tokio::test]
async fn new_flow_is_applied_in_order_with_one_forced_field_manager() {
    let h = harness();
    let requests = reconcile(&h, &flow()).await;
    let w = writes(&requests);
    let kinds: Vec<(&str, &str)> = w.iter().map(|r| (r.method.as_str(), r.kind())).collect();
    assert_eq!(
        kinds,
        vec![
            ("POST", "Secret"),
            ("PATCH", "ConfigMap"),
            ("PATCH", "PersistentVolumeClaim"),
            ("PATCH", "Service"),
            ("PATCH", "Service"),
            ("PATCH", "Deployment"),
            ("PATCH", "SyncFlow"),
        ],
        "{w:#?}"
    );
    for r in w.iter().filter(|r| r.method == "PATCH") {
        assert!(
            r.is_forced_apply(),
            "not a forced apply under meshline-controller: {} {}?{}",
            r.method,
            r.path,
            r.query
        );
    }
    assert_eq!(w[0].path, format!("/api/v1/namespaces/{NS}/secrets"));
    assert!(w[0].query.contains("fieldManager=meshline-controller"));
    assert_eq!(
        w[1].path,
        format!("/api/v1/namespaces/{NS}/configmaps/meshline-{FLOW}")
    );
    assert_eq!(
        w[3].path,
        format!("/api/v1/namespaces/{NS}/services/meshline-{FLOW}")
    );
    // The status Service is headless and publishes pods that are not ready: a worker that cannot start fails
    // its readiness probe, and its 503 on /status is what the controller must still read.
    assert_eq!(
        w[4].path,
        format!("/api/v1/namespaces/{NS}/services/meshline-{FLOW}-status")
    );
    assert_eq!(w[4].body["spec"]["clusterIP"], "None");
    assert_eq!(w[4].body["spec"]["publishNotReadyAddresses"], true);
    assert_eq!(w[4].body["spec"]["selector"], w[3].body["spec"]["selector"]);
    assert_eq!(
        w[5].path,
        format!("/apis/apps/v1/namespaces/{NS}/deployments/meshline-{FLOW}")
    );
    // Every child is owned by the flow, as its controller, blocking its deletion.
    for r in &w[..6] {
        let owner = &r.body["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "SyncFlow");
        assert_eq!(owner["uid"], "flow-uid-1");
        assert_eq!(owner["controller"], true);
        assert_eq!(owner["blockOwnerDeletion"], true);
        assert_eq!(r.body["metadata"]["labels"]["sync.meshline.io/flow"], FLOW);
    }
    // The rendered configuration is exactly the worker's RenderedFlow, without status or credentials.
    let yaml = w[1].body["data"]["flow.yaml"].as_str().unwrap();
    let rendered: meshline::worker::RenderedFlow = serde_yaml::from_str(yaml).unwrap();
    assert_eq!(rendered.flow.spec, flow().spec);
    assert_eq!(rendered.contract.spec.version, "2.0.1");
    assert_eq!(
        rendered.roster.unwrap().metadata.name.as_deref(),
        Some("commerce-owners")
    );
    // The status patch carries apiVersion and kind, and conditions carry the generation.
    let s = &w[6].body;
    assert_eq!(s["apiVersion"], "sync.meshline.io/v1alpha1");
    assert_eq!(s["kind"], "SyncFlow");
    assert!(w[6].is_forced_apply());
    for t in [
        "ContractResolved",
        "OwnerAssigned",
        "SecretsReady",
        "Ready",
        "Degraded",
        "Progressing",
        "DiskPressure",
    ] {
        assert_eq!(condition(&s["status"], t)["observedGeneration"], 1, "{t}");
    }
    // No worker has answered yet: disk pressure is not known either way.
    assert_eq!(condition(&s["status"], "DiskPressure")["status"], "Unknown");
    assert_eq!(condition(&s["status"], "Progressing")["status"], "True");
    assert_eq!(s["status"]["activeContractVersion"], "2.0.1");
}

#[tokio::test]
async fn unchanged_flow_resync_makes_no_write() {
    let mut h = harness();
    let mut f = flow();
    let first = reconcile(&h, &f).await;
    settle(&mut h, &first, &mut f);
    // The Deployment became ready: one status write (Ready), nothing else.
    let second = reconcile(&h, &f).await;
    let w = writes(&second);
    assert_eq!(w.len(), 1, "{w:#?}");
    assert_eq!(condition(&w[0].body["status"], "Ready")["status"], "True");
    assert!(
        second
            .iter()
            .any(|r| r.path.contains("/events") && r.body["reason"] == "BecameReady")
    );
    settle(&mut h, &second, &mut f);
    // From now on, a resync reads the referenced Secrets and writes nothing.
    for _ in 0..3 {
        let again = reconcile(&h, &f).await;
        assert!(writes(&again).is_empty(), "{:#?}", writes(&again));
        assert!(
            again
                .iter()
                .all(|r| r.method == "GET" && r.path.contains("/secrets/"))
        );
    }
}

#[tokio::test]
async fn contract_change_rolls_the_pods_through_the_config_hash() {
    let mut h = harness();
    let mut f = flow();
    let first = reconcile(&h, &f).await;
    settle(&mut h, &first, &mut f);
    let second = reconcile(&h, &f).await;
    settle(&mut h, &second, &mut f);
    let old_hash = first
        .iter()
        .find(|r| r.kind() == "Deployment")
        .unwrap()
        .body["spec"]["template"]["metadata"]["annotations"]["sync.meshline.io/config-hash"]
        .clone();
    let mut c = contract();
    c.spec.version = "2.1.0".into();
    c.spec.mapping.fields[0].optional = !c.spec.mapping.fields[0].optional;
    apply(&mut h.writers.contracts, c);
    let third = reconcile(&h, &f).await;
    let kinds: Vec<&str> = writes(&third).iter().map(|r| r.kind()).collect();
    assert_eq!(
        kinds,
        vec!["ConfigMap", "Deployment", "SyncFlow"],
        "the Service and the PVC did not change"
    );
    let new_hash = &third
        .iter()
        .find(|r| r.kind() == "Deployment")
        .unwrap()
        .body["spec"]["template"]["metadata"]["annotations"]["sync.meshline.io/config-hash"];
    assert_ne!(&old_hash, new_hash);
}

#[tokio::test]
async fn flow_without_contract_does_not_start() {
    let h = harness();
    let mut f = flow();
    f.spec.contract.name = "no-such-contract".into();
    let requests = reconcile(&h, &f).await;
    let w = writes(&requests);
    assert_eq!(w.len(), 1, "only the status is written: {w:#?}");
    let s = &w[0].body["status"];
    let c = condition(s, "ContractResolved");
    assert_eq!(c["status"], "False");
    assert_eq!(c["reason"], "ContractNotFound");
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .contains("commerce-sync/no-such-contract")
    );
    assert_eq!(condition(s, "Ready")["status"], "False");
    assert!(
        requests
            .iter()
            .any(|r| r.path.contains("/events") && r.body["reason"] == "ContractNotFound")
    );
}

#[tokio::test]
async fn flow_outside_the_contract_range_does_not_start() {
    let h = harness();
    let mut f = flow();
    f.spec.contract.version = "^3".into();
    let w = reconcile(&h, &f).await;
    let s = &status_patch(&w).unwrap().body["status"];
    assert_eq!(
        condition(s, "ContractResolved")["reason"],
        "NoVersionInRange"
    );
    assert_eq!(writes(&w).len(), 1);
}

#[tokio::test]
async fn flow_without_sync_owner_does_not_start() {
    let h = harness();
    let mut f = flow();
    f.metadata.labels = None;
    let requests = reconcile(&h, &f).await;
    let w = writes(&requests);
    assert_eq!(w.len(), 1, "{w:#?}");
    let s = &w[0].body["status"];
    assert_eq!(condition(s, "OwnerAssigned")["status"], "False");
    assert_eq!(condition(s, "OwnerAssigned")["reason"], "NoSyncOwner");
    assert!(
        requests
            .iter()
            .any(|r| r.path.contains("/events") && r.body["reason"] == "NoSyncOwner")
    );
}

#[tokio::test]
async fn missing_secret_and_missing_keys_are_named() {
    let h = harness();
    let mut f = flow();
    f.spec.sink.credentials_secret_ref = SecretRef {
        name: "absent".into(),
    };
    let w = reconcile(&h, &f).await;
    let c = condition(&status_patch(&w).unwrap().body["status"], "SecretsReady").clone();
    assert_eq!(c["reason"], "SecretNotFound");
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .contains("Secret absent does not exist")
    );

    h.double.put_secret(NS, "odoo-api-key", &["login"]);
    let w = reconcile(&h, &flow()).await;
    let c = condition(&status_patch(&w).unwrap().body["status"], "SecretsReady").clone();
    assert_eq!(c["reason"], "SecretKeysMissing");
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .contains("lacks key(s) apiKey"),
        "{c}"
    );
    assert!(!w.iter().any(|r| r.kind() == "Deployment"));
}

#[tokio::test]
async fn contract_that_does_not_compile_is_a_condition_not_a_crash() {
    let mut h = harness();
    let mut c = contract();
    c.spec.mapping.fields[0].expression = "record.dealname +".into();
    apply(&mut h.writers.contracts, c);
    let w = reconcile(&h, &flow()).await;
    let cond = condition(
        &status_patch(&w).unwrap().body["status"],
        "ContractResolved",
    )
    .clone();
    assert_eq!(cond["reason"], "ContractCompileFailed");
    assert!(
        cond["message"].as_str().unwrap().contains("spec.mapping"),
        "{cond}"
    );
}

#[tokio::test]
async fn paused_flow_scales_to_zero_and_keeps_its_ledger() {
    let mut h = harness();
    let mut f = flow();
    let first = reconcile(&h, &f).await;
    settle(&mut h, &first, &mut f);
    f.spec.paused = true;
    f.metadata.generation = Some(2);
    let requests = reconcile(&h, &f).await;
    let w = writes(&requests);
    let d = w
        .iter()
        .find(|r| r.kind() == "Deployment")
        .expect("the Deployment is re-applied");
    assert_eq!(d.body["spec"]["replicas"], 0);
    assert!(
        !w.iter().any(|r| r.method == "DELETE"),
        "nothing is deleted, least of all the ledger: {w:#?}"
    );
    assert!(
        !w.iter().any(|r| r.kind() == "PersistentVolumeClaim"),
        "the PVC is unchanged"
    );
    let s = &status_patch(&requests).unwrap().body["status"];
    assert_eq!(condition(s, "Ready")["reason"], "Paused");
    assert_eq!(condition(s, "Ready")["observedGeneration"], 2);
}

#[tokio::test]
async fn budget_is_deleted_when_replicas_drop_to_one() {
    let mut h = harness();
    h.double.put_secret(NS, "ledger-db", &["url"]);
    let mut f = flow();
    f.spec.ledger.r#type = LedgerType::Postgres;
    f.spec.ledger.credentials_secret_ref = Some(SecretRef {
        name: "ledger-db".into(),
    });
    f.spec.replicas = Some(3);
    let first = reconcile(&h, &f).await;
    let w = writes(&first);
    assert!(
        w.iter().any(|r| r.kind() == "PodDisruptionBudget"),
        "3 replicas get a budget"
    );
    assert!(
        !w.iter().any(|r| r.kind() == "PersistentVolumeClaim"),
        "a postgres ledger needs no volume"
    );
    let d = w.iter().find(|r| r.kind() == "Deployment").unwrap();
    assert_eq!(d.body["spec"]["replicas"], 3);
    let mounts: Vec<&str> = d.body["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    assert!(mounts.contains(&"/var/run/meshline/secrets/ledger-db"));
    settle(&mut h, &first, &mut f);
    f.spec.replicas = Some(1);
    let second = reconcile(&h, &f).await;
    let deletes: Vec<&str> = writes(&second)
        .iter()
        .filter(|r| r.method == "DELETE")
        .map(|r| r.path.as_str())
        .collect();
    assert_eq!(
        deletes,
        vec![
            format!("/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/meshline-{FLOW}")
                .as_str()
        ]
    );
}

#[tokio::test]
async fn stopped_flow_is_scaled_to_zero_by_a_patch_of_replicas_alone() {
    let mut h = harness();
    let mut f = flow();
    let first = reconcile(&h, &f).await;
    settle(&mut h, &first, &mut f);
    let d = first.iter().find(|r| r.kind() == "Deployment").unwrap();
    h.double.put(&d.path, d.body.clone());
    // The roster stops covering the flow.
    let mut r = roster();
    r.spec.assignments.clear();
    apply(&mut h.writers.rosters, r);
    let requests = reconcile(&h, &f).await;
    let w = writes(&requests);
    let scale = w
        .iter()
        .find(|r| r.path.ends_with(&format!("deployments/meshline-{FLOW}")))
        .unwrap();
    assert_eq!(scale.method, "PATCH");
    assert!(scale.query.contains("fieldManager=meshline-controller"));
    assert_eq!(scale.body, serde_json::json!({"spec": {"replicas": 0}}));
    assert!(!w.iter().any(|r| r.method == "DELETE"));
}

#[tokio::test]
async fn worker_status_is_folded_into_the_flow_status() {
    let mut h = harness();
    let mut f = flow();
    let first = reconcile(&h, &f).await;
    settle(&mut h, &first, &mut f);
    let second = reconcile(&h, &f).await;
    settle(&mut h, &second, &mut f);
    let answer: meshline::worker::api::WorkerStatus = serde_json::from_value(serde_json::json!({
        "flow": FLOW, "contractVersion": "2.0.1", "backend": "sqlite",
        "counters": {"received": 200, "delivered": 180, "failed": 20, "retried": 7, "deadLettered": 12, "held": 3},
        "pending": 5, "failureRate": "0.1", "lastDeliveryTime": "2026-01-02T03:04:05Z", "mttrSeconds": 42,
        "manualInterventionsPer1k": "15", "oldestPendingSeconds": 60, "circuitBreaker": null, "paused": null
    }))
    .unwrap();
    h.ctx.observations.lock().unwrap().insert(
        ObjectRef::from_obj(&f),
        Observation::Answered(Box::new(answer.clone())),
    );
    let requests = reconcile(&h, &f).await;
    let w = writes(&requests);
    assert_eq!(w.len(), 1, "{w:#?}");
    let s = &w[0].body["status"];
    assert_eq!(s["counters"]["delivered"], 180);
    assert_eq!(s["counters"]["deadLettered"], 12);
    assert_eq!(s["failureRate"], "0.1");
    assert_eq!(s["mttrSeconds"], 42);
    assert_eq!(s["manualInterventionsPer1k"], "15");
    assert_eq!(s["lastDeliveryTime"], "2026-01-02T03:04:05Z");
    assert_eq!(s["oldestPendingSeconds"], 60);
    let degraded = condition(s, "Degraded");
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "FailureRateOverSla");
    assert!(
        requests
            .iter()
            .any(|r| r.path.contains("/events") && r.body["reason"] == "Degraded")
    );
    settle(&mut h, &requests, &mut f);
    // The same answer again: nothing to write.
    assert!(writes(&reconcile(&h, &f).await).is_empty());
    // Recovery below the SLA: Degraded goes False with a Recovered Event.
    let mut better = answer;
    better.failure_rate = "0.01".into();
    h.ctx.observations.lock().unwrap().insert(
        ObjectRef::from_obj(&f),
        Observation::Answered(Box::new(better)),
    );
    let requests = reconcile(&h, &f).await;
    assert_eq!(
        condition(&status_patch(&requests).unwrap().body["status"], "Degraded")["status"],
        "False"
    );
    assert!(
        requests
            .iter()
            .any(|r| r.path.contains("/events") && r.body["reason"] == "Recovered")
    );
}

#[tokio::test]
async fn contract_status_records_the_revision_once() {
    let h = harness();
    let c = contract();
    register(&h, &c);
    meshline::controller::contract::reconcile(Arc::new(c.clone()), h.ctx.clone())
        .await
        .unwrap();
    let requests = h.double.take();
    let w = writes(&requests);
    assert_eq!(
        w[0].method, "POST",
        "the revision ConfigMap is created once"
    );
    assert_eq!(w[0].kind(), "ConfigMap");
    let s = &w[1].body;
    assert!(w[1].is_forced_apply());
    assert_eq!(s["kind"], "SyncContract");
    assert_eq!(s["status"]["currentVersion"], "2.0.1");
    assert_eq!(s["status"]["observedGeneration"], 1);
    let rev = &s["status"]["versionHistory"][0];
    assert_eq!(
        rev["contentHash"],
        meshline::contract::content_hash(&c.spec).as_str()
    );
    assert_eq!(rev["compatibility"], "initial");
    assert_eq!(condition(&s["status"], "Accepted")["status"], "True");
}

/// The revision ConfigMap's name is one a real API server accepts (the double refuses what it refuses), so the
/// contract's status does get written: with `sha256:` in the name it never was, on a cluster.
#[tokio::test]
async fn contract_revision_is_stored_under_a_valid_name_and_the_status_is_written() {
    let h = harness();
    let mut long = contract();
    long.metadata.name = Some(format!("deal.to.sale-order-{}", "x".repeat(230)));
    for c in [contract(), long] {
        register(&h, &c);
        meshline::controller::contract::reconcile(Arc::new(c.clone()), h.ctx.clone())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "contract {} did not reconcile: {e}",
                    c.metadata.name.as_deref().unwrap()
                )
            });
        let requests = h.double.take();
        let w = writes(&requests);
        let create = w
            .iter()
            .find(|r| r.method == "POST" && r.kind() == "ConfigMap")
            .expect("the revision ConfigMap is created");
        let name = create.body["metadata"]["name"].as_str().unwrap();
        assert!(name.len() <= 253 && !name.contains(':'), "{name}");
        assert!(
            name.ends_with(
                &meshline::contract::content_hash(&c.spec).as_str()["sha256:".len()..][..12]
            ) || name.len() > 200,
            "a short contract name keeps the hash readable: {name}"
        );
        let status = status_patch(&requests).expect("the contract status is written");
        assert!(status.is_forced_apply());
        assert_eq!(status.body["status"]["currentVersion"], "2.0.1");
        assert_eq!(
            condition(&status.body["status"], "Accepted")["status"],
            "True"
        );
    }
}

/// A flow name that is a valid SyncFlow name but not a valid Service name (dots), or too long for a label
/// value, still gives children the API server accepts, and the flow runs.
#[tokio::test]
async fn flow_with_a_dotted_or_long_name_gets_children_the_api_server_accepts() {
    for name in [
        "won.deals.to.odoo".to_string(),
        format!("won-{}", "d".repeat(70)),
    ] {
        let h = harness();
        let mut f = flow();
        f.metadata.name = Some(name.clone());
        let requests = reconcile(&h, &f).await;
        let w = writes(&requests);
        let kinds: Vec<&str> = w.iter().map(|r| r.kind()).collect();
        assert_eq!(
            kinds,
            vec![
                "Secret",
                "ConfigMap",
                "PersistentVolumeClaim",
                "Service",
                "Service",
                "Deployment",
                "SyncFlow"
            ],
            "{name}: {w:#?}"
        );
        let status_service = w.iter().filter(|r| r.kind() == "Service").nth(1).unwrap();
        assert_eq!(
            status_service.path.rsplit('/').next().unwrap(),
            meshline::controller::flow::build::status_service_name(&name)
        );
        let service = w.iter().find(|r| r.kind() == "Service").unwrap();
        let service_name = service.path.rsplit('/').next().unwrap();
        assert!(!service_name.contains('.'), "{service_name}");
        assert_eq!(
            service_name,
            meshline::controller::flow::build::worker_name(&name)
        );
        let flow_label = service.body["metadata"]["labels"]["sync.meshline.io/flow"]
            .as_str()
            .unwrap();
        assert!(flow_label.len() <= 63, "{flow_label}");
        assert_eq!(
            service.body["spec"]["selector"]["sync.meshline.io/flow"],
            flow_label
        );
    }
}

#[tokio::test]
async fn roster_status_lists_covered_and_unowned_flows() {
    let mut h = harness();
    let mut orphan = flow();
    orphan.metadata.name = Some("orphan".into());
    orphan.metadata.labels = None;
    apply(&mut h.writers.flows, flow());
    apply(&mut h.writers.flows, orphan);
    let r = h.ctx.stores.rosters.state()[0].clone();
    register(&h, &*r);
    meshline::controller::roster::reconcile(r, h.ctx.clone())
        .await
        .unwrap();
    let requests = h.double.take();
    let w = writes(&requests);
    assert_eq!(w.len(), 1);
    let s = &w[0].body["status"];
    assert_eq!(s["coveredFlows"], serde_json::json!([FLOW]));
    assert_eq!(s["flowsWithoutSyncOwner"], serde_json::json!(["orphan"]));
    assert_eq!(s["unownedFlowCount"], 1);
    assert_eq!(s["ownerCount"], 4);
}

/// A worker's `/status` as it comes over the wire (code and body), read through the same parsing as the real
/// sources, so the poll path from bytes to condition is what these tests exercise.
struct ScriptedWorker {
    answer: std::sync::Mutex<(u16, String)>,
}

impl ScriptedWorker {
    fn new() -> ScriptedWorker {
        ScriptedWorker {
            answer: std::sync::Mutex::new((200, String::new())),
        }
    }
    fn answers(&self, code: u16, body: Value) {
        *self.answer.lock().unwrap() = (code, body.to_string());
    }
}

#[async_trait::async_trait]
impl WorkerStatusSource for ScriptedWorker {
    async fn fetch(
        &self,
        _namespace: &str,
        _flow: &str,
        _token: Option<&str>,
    ) -> Result<WorkerAnswer, FetchError> {
        let (code, body) = self.answer.lock().unwrap().clone();
        parse_answer("http://meshline-scripted/status", code, body.as_bytes())
    }
}

fn running_status(problems: Value) -> Value {
    serde_json::json!({
        "flow": FLOW, "contractVersion": "2.0.1", "backend": "sqlite",
        "counters": {"received": 200, "delivered": 199, "failed": 0, "retried": 1, "deadLettered": 1, "held": 0},
        "pending": 0, "failureRate": "0.005", "lastDeliveryTime": "2026-01-02T03:04:05Z", "mttrSeconds": null,
        "manualInterventionsPer1k": "0", "oldestPendingSeconds": null, "circuitBreaker": null, "paused": null,
        "problems": problems
    })
}

/// A flow whose worker runs (applied, Deployment ready, status settled) and is in the flow cache the poller reads.
async fn running_flow(h: &mut Harness) -> SyncFlow {
    let mut f = flow();
    let first = reconcile(h, &f).await;
    settle(h, &first, &mut f);
    let second = reconcile(h, &f).await;
    settle(h, &second, &mut f);
    apply(&mut h.writers.flows, f.clone());
    f
}

/// One status poll through `source`, then the reconcile the poller triggers; the requests it made.
async fn poll_and_reconcile(
    h: &mut Harness,
    f: &mut SyncFlow,
    source: &ScriptedWorker,
) -> Vec<Recorded> {
    let changed = meshline::controller::poll::poll_once(&h.ctx, source).await;
    assert!(
        changed
            .iter()
            .all(|r| r.name == f.metadata.name.clone().unwrap()),
        "{changed:?}"
    );
    let requests = reconcile(h, f).await;
    settle(h, &requests, f);
    requests
}

fn events(requests: &[Recorded]) -> Vec<&str> {
    requests
        .iter()
        .filter(|r| r.path.contains("/events"))
        .filter_map(|r| r.body["reason"].as_str())
        .collect()
}

#[tokio::test]
async fn disk_pressure_is_a_condition_that_degrades_the_flow_until_it_passes() {
    let mut h = harness();
    let mut f = running_flow(&mut h).await;
    let worker = ScriptedWorker::new();
    worker.answers(200, running_status(serde_json::json!([])));
    let requests = poll_and_reconcile(&mut h, &mut f, &worker).await;
    let s = &status_patch(&requests)
        .expect("the first answer is written")
        .body["status"];
    assert_eq!(condition(s, "DiskPressure")["status"], "False");
    assert_eq!(condition(s, "DiskPressure")["reason"], "NoDiskPressure");

    let message = "free space on /var/lib/meshline is 31 MiB, below the 64 MiB reserve: intake is refused (503) so completions still fit";
    worker.answers(
        200,
        running_status(serde_json::json!([
            {"kind": "DiskPressure", "message": message, "since": "2026-01-02T03:00:00Z"}
        ])),
    );
    let requests = poll_and_reconcile(&mut h, &mut f, &worker).await;
    let s = &status_patch(&requests)
        .expect("disk pressure is written")
        .body["status"];
    let disk = condition(s, "DiskPressure");
    assert_eq!(disk["status"], "True");
    assert_eq!(disk["reason"], "DiskPressure");
    assert!(
        disk["message"].as_str().unwrap().starts_with(message),
        "{disk}"
    );
    assert_eq!(disk["observedGeneration"], 1);
    let degraded = condition(s, "Degraded");
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "DiskPressure");
    assert!(degraded["message"].as_str().unwrap().contains(message));
    // The worker still delivers what it holds: the flow stays Ready.
    assert_eq!(condition(s, "Ready")["status"], "True");
    let e = events(&requests);
    assert!(
        e.contains(&"DiskPressure") && e.contains(&"Degraded"),
        "{e:?}"
    );

    // The same answer again writes nothing.
    let requests = poll_and_reconcile(&mut h, &mut f, &worker).await;
    assert!(writes(&requests).is_empty(), "{:#?}", writes(&requests));

    // Space is freed: the conditions go back.
    worker.answers(200, running_status(serde_json::json!([])));
    let requests = poll_and_reconcile(&mut h, &mut f, &worker).await;
    let s = &status_patch(&requests).expect("the relief is written").body["status"];
    assert_eq!(condition(s, "DiskPressure")["status"], "False");
    assert_eq!(condition(s, "DiskPressure")["reason"], "NoDiskPressure");
    assert_eq!(condition(s, "Degraded")["status"], "False");
    let e = events(&requests);
    assert!(
        e.contains(&"DiskPressureRelieved") && e.contains(&"Recovered"),
        "{e:?}"
    );
}

#[tokio::test]
async fn worker_that_cannot_start_makes_the_flow_unready_with_the_worker_reason() {
    let mut h = harness();
    let mut f = running_flow(&mut h).await;
    let worker = ScriptedWorker::new();
    worker.answers(200, running_status(serde_json::json!([])));
    poll_and_reconcile(&mut h, &mut f, &worker).await;

    let message = "cannot connect to the PostgreSQL ledger at ledger-db:5432: connection refused; retrying in 8s";
    worker.answers(
        503,
        serde_json::json!({
            "error": "the pipeline did not start: the ledger is unavailable",
            "problems": [{"kind": "LedgerUnavailable", "message": message, "since": "2026-01-02T03:00:00Z"}]
        }),
    );
    let requests = poll_and_reconcile(&mut h, &mut f, &worker).await;
    let s = &status_patch(&requests)
        .expect("the startup failure is written")
        .body["status"];
    let ready = condition(s, "Ready");
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "LedgerUnavailable");
    assert_eq!(ready["message"], message);
    let degraded = condition(s, "Degraded");
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "LedgerUnavailable");
    assert!(degraded["message"].as_str().unwrap().contains(message));
    assert_eq!(condition(s, "DiskPressure")["status"], "False");
    // The counters keep the last numbers the worker gave.
    assert_eq!(s["counters"]["delivered"], 199);

    // A 503 that names no problem is StartupFailed, with the worker's error.
    worker.answers(
        503,
        serde_json::json!({"error": "flow.yaml: spec.sink.type: unknown variant `sap`"}),
    );
    let requests = poll_and_reconcile(&mut h, &mut f, &worker).await;
    let s = &status_patch(&requests).unwrap().body["status"];
    assert_eq!(condition(s, "Ready")["reason"], "StartupFailed");
    assert_eq!(
        condition(s, "Ready")["message"],
        "flow.yaml: spec.sink.type: unknown variant `sap`"
    );
    assert_eq!(condition(s, "Degraded")["reason"], "StartupFailed");

    // A running worker whose credentials stopped working says so in its 200 answer.
    worker.answers(
        200,
        running_status(serde_json::json!([
            {"kind": "CredentialsInvalid", "message": "Secret odoo-api-key key apiKey: the ERP answers 401 to it", "since": "2026-01-02T03:05:00Z"}
        ])),
    );
    let requests = poll_and_reconcile(&mut h, &mut f, &worker).await;
    let s = &status_patch(&requests).unwrap().body["status"];
    assert_eq!(condition(s, "Ready")["reason"], "CredentialsInvalid");
    assert_eq!(condition(s, "Degraded")["reason"], "CredentialsInvalid");

    // The worker recovers: Ready and Degraded go back.
    worker.answers(200, running_status(serde_json::json!([])));
    let requests = poll_and_reconcile(&mut h, &mut f, &worker).await;
    let s = &status_patch(&requests).unwrap().body["status"];
    assert_eq!(condition(s, "Ready")["status"], "True");
    assert_eq!(condition(s, "Ready")["reason"], "WorkerRunning");
    assert_eq!(condition(s, "Degraded")["status"], "False");
    assert!(events(&requests).contains(&"BecameReady"));
}

#[tokio::test]
async fn a_503_that_is_not_the_workers_own_answer_is_no_startup_failure() {
    let mut h = harness();
    let mut f = running_flow(&mut h).await;
    let worker = ScriptedWorker::new();
    worker.answers(200, running_status(serde_json::json!([])));
    poll_and_reconcile(&mut h, &mut f, &worker).await;
    // The API server's service proxy with no ready endpoint answers 503 with its own Status.
    worker.answers(
        503,
        serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "no endpoints available for service \"meshline-won-deals-to-odoo:http\"",
            "reason": "ServiceUnavailable", "code": 503}),
    );
    let changed = meshline::controller::poll::poll_once(&h.ctx, &worker).await;
    assert!(
        changed.is_empty(),
        "a blip keeps the last answer: {changed:?}"
    );
    let requests = reconcile(&h, &f).await;
    assert!(writes(&requests).is_empty(), "{:#?}", writes(&requests));
}

#[tokio::test]
async fn a_long_worker_message_is_bounded_so_the_status_is_accepted() {
    let mut h = harness();
    let mut f = running_flow(&mut h).await;
    let worker = ScriptedWorker::new();
    let long = "the ledger refused the connection: ".to_string() + &"é".repeat(6000);
    worker.answers(
        503,
        serde_json::json!({"error": "no ledger", "problems": [
            {"kind": "LedgerUnavailable", "message": long, "since": "2026-01-02T03:00:00Z"},
            {"kind": "not a word!", "message": "x", "since": "2026-01-02T03:00:00Z"}
        ]}),
    );
    // The double refuses a status beyond the CRD's bounds, so this reconcile succeeding is the proof.
    let requests = poll_and_reconcile(&mut h, &mut f, &worker).await;
    let s = &status_patch(&requests).unwrap().body["status"];
    let ready = condition(s, "Ready");
    assert_eq!(ready["reason"], "LedgerUnavailable");
    assert_eq!(ready["message"].as_str().unwrap().chars().count(), 4096);
    assert!(
        s["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["message"].as_str().unwrap_or_default().chars().count() <= 4096)
    );
    // Nothing was refused, the Events with the long message included.
    let refused: Vec<_> = requests.iter().filter(|r| r.answered >= 400).collect();
    assert!(refused.is_empty(), "{refused:#?}");
    assert!(
        requests
            .iter()
            .any(|r| r.path.contains("/events") && r.body["reason"] == "Degraded")
    );
    // A kind that is not a CamelCase word does not become a reason.
    assert!(
        s["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["reason"] != "not a word!")
    );
}

/// The controller with `--flow-network-policies on`.
fn harness_with_policies() -> Harness {
    harness_with(BuildSettings {
        worker_image: "ghcr.io/meshline/meshline:test".into(),
        network_policy: Some(NetworkPolicySettings {
            webhook_from_namespaces: vec!["ingress-nginx".into()],
            controller_namespace: "meshline-system".into(),
            controller_pod_labels: [("app.kubernetes.io/name".to_string(), "meshline".to_string())]
                .into(),
            metrics_from_namespaces: vec![],
            api_server_cidrs: vec![],
        }),
    })
}

fn policy_path() -> String {
    format!("/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies/meshline-{FLOW}-worker")
}

#[tokio::test]
async fn with_the_switch_on_the_network_policy_is_applied_before_the_pods() {
    let mut h = harness_with_policies();
    let mut f = flow();
    let requests = reconcile(&h, &f).await;
    let w = writes(&requests);
    let kinds: Vec<(&str, &str)> = w.iter().map(|r| (r.method.as_str(), r.kind())).collect();
    assert_eq!(
        kinds,
        vec![
            ("POST", "Secret"),
            ("PATCH", "ConfigMap"),
            ("PATCH", "PersistentVolumeClaim"),
            ("PATCH", "NetworkPolicy"),
            ("PATCH", "Service"),
            ("PATCH", "Service"),
            ("PATCH", "Deployment"),
            ("PATCH", "SyncFlow"),
        ],
        "{w:#?}"
    );
    let policy = w[3];
    assert_eq!(policy.path, policy_path());
    assert!(policy.is_forced_apply(), "{}?{}", policy.path, policy.query);
    assert_eq!(
        policy.answered, 200,
        "the API double accepted it: {:?}",
        policy.body
    );
    assert_eq!(policy.body["apiVersion"], "networking.k8s.io/v1");
    assert_eq!(
        policy.body["metadata"]["ownerReferences"][0]["kind"],
        "SyncFlow"
    );
    assert_eq!(
        policy.body["spec"]["podSelector"]["matchLabels"],
        w[6].body["spec"]["selector"]["matchLabels"],
        "the policy selects the Deployment's pods"
    );

    // Nothing changed: the cached policy is up to date and is not written again.
    settle(&mut h, &requests, &mut f);
    let again = reconcile(&h, &f).await;
    assert!(
        !again.iter().any(|r| r.path.contains("networkpolicies")),
        "{again:#?}"
    );
}

#[tokio::test]
async fn with_the_switch_off_a_policy_made_earlier_is_deleted() {
    // First with the switch on, so there is a policy the watch reports.
    let on = harness_with_policies();
    let made = reconcile(&on, &flow()).await;
    let body = made
        .iter()
        .find(|r| r.kind() == "NetworkPolicy")
        .unwrap()
        .body
        .clone();
    // Then a controller with it off (or at clean-up) that still sees that policy.
    let mut off = harness();
    apply(
        &mut off.writers.network_policies,
        serde_json::from_value::<NetworkPolicy>(body).unwrap(),
    );
    let requests = reconcile(&off, &flow()).await;
    let deletes: Vec<&Recorded> = requests.iter().filter(|r| r.method == "DELETE").collect();
    assert_eq!(deletes.len(), 1, "{requests:#?}");
    assert_eq!(deletes[0].path, policy_path());
    assert!(
        !requests
            .iter()
            .any(|r| r.method == "PATCH" && r.kind() == "NetworkPolicy"),
        "nothing re-applies it"
    );
}

#[tokio::test]
async fn with_the_switch_off_and_no_policy_nothing_touches_networkpolicies() {
    let h = harness();
    let requests = reconcile(&h, &flow()).await;
    assert!(
        !requests.iter().any(|r| r.path.contains("networkpolicies")),
        "a controller without networkpolicies RBAC must not ask for them: {requests:#?}"
    );
}

#[tokio::test]
async fn a_network_policy_the_api_server_would_refuse_fails_the_reconcile() {
    // A label value over 63 characters in the controller's pod labels: the real API server refuses the policy
    // (and so does the double), and the reconcile says which object.
    let h = harness_with(BuildSettings {
        worker_image: "ghcr.io/meshline/meshline:test".into(),
        network_policy: Some(NetworkPolicySettings {
            webhook_from_namespaces: vec!["ingress-nginx".into()],
            controller_namespace: "meshline-system".into(),
            controller_pod_labels: [("app.kubernetes.io/name".to_string(), "m".repeat(64))].into(),
            metrics_from_namespaces: vec![],
            api_server_cidrs: vec![],
        }),
    });
    let f = flow();
    register(&h, &f);
    let err = meshline::controller::flow::reconcile(Arc::new(f), h.ctx.clone())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("NetworkPolicy") && err.contains("meshline-won-deals-to-odoo-worker"),
        "{err}"
    );
    let refused = h
        .double
        .take()
        .into_iter()
        .find(|r| r.path.contains("networkpolicies"))
        .unwrap();
    assert_eq!(refused.answered, 422);
}
