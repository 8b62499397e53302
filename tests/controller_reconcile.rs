//! Reconcile tests against the in-process API double: each test asserts the exact requests the controller
//! makes (method, path, field manager, force, body) for one promise of the operating model.

mod controller_support;

use controller_support::{apply, load};

use std::sync::Arc;

use controller_support::{ApiDouble, Recorded};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentStatus};
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use meshline::api::{
    LedgerRetentionPolicy, LedgerType, OwnershipRoster, SecretRef, SyncContract, SyncFlow,
};
use meshline::controller::flow::build::{BuildSettings, NetworkPolicySettings};
use meshline::controller::flow::status::Observation;
use meshline::controller::metrics::Metrics;
use meshline::controller::poll::{
    FetchError, PollSettings, WorkerAnswer, WorkerPod, WorkerStatusSource, parse_answer,
};
use meshline::controller::{Context, Stores, Writers};
use serde_json::Value;

const NS: &str = "commerce-sync";
const FLOW: &str = "won-deals-to-odoo";

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
    // The roster's ticket sinks, mounted into the worker as well.
    double.put_secret(NS, "github-token", &["token"]);
    double.put_secret(NS, "alert-webhook-signing", &["signingSecret"]);
    harness_on(double, build, roster(), |c| c)
}

/// A controller (new caches, a new context made by `adjust`) on an existing double: a fresh start, or a
/// restart that finds what the last controller wrote.
fn harness_on(
    double: ApiDouble,
    build: BuildSettings,
    roster: OwnershipRoster,
    adjust: impl FnOnce(Context) -> Context,
) -> Harness {
    let (stores, mut writers) = Stores::new();
    let c = controller_support::activated(contract(), &mut writers.revisions);
    apply(&mut writers.contracts, c);
    apply(&mut writers.rosters, roster);
    let client = double.client();
    // The EndpointSlice cache is filled the way the controller fills it: a reflector listing and watching the
    // double with the controller's own selector.
    let slices = std::mem::take(&mut writers.endpoint_slices);
    tokio::spawn(
        kube::runtime::reflector::reflector(
            slices,
            watcher::watcher(
                kube::Api::<EndpointSlice>::all(client.clone()),
                meshline::controller::run::endpoint_slice_config(),
            ),
        )
        .for_each(|_| futures::future::ready(())),
    );
    let ctx = Arc::new(adjust(Context::new(
        client,
        build,
        stores,
        Arc::new(Metrics::new()),
    )));
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

/// The reconcile's last status write (a reconcile that sends an outage ticket writes twice: the send in
/// doubt, then its result).
fn status_patch(requests: &[Recorded]) -> Option<&Recorded> {
    requests
        .iter()
        .rev()
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
            "Secret" => {
                // The API server stores `stringData` as `data`; the watch delivers it so.
                let mut secret = serde_json::from_value::<Secret>(body).unwrap();
                if let Some(strings) = secret.string_data.take() {
                    let data = secret.data.get_or_insert_with(Default::default);
                    for (k, v) in strings {
                        data.insert(k, k8s_openapi::ByteString(v.into_bytes()));
                    }
                }
                apply(&mut h.writers.tokens, secret)
            }
            "NetworkPolicy" => apply(
                &mut h.writers.network_policies,
                serde_json::from_value::<NetworkPolicy>(body).unwrap(),
            ),
            "CronJob" => apply(
                &mut h.writers.cron_jobs,
                serde_json::from_value::<k8s_openapi::api::batch::v1::CronJob>(body).unwrap(),
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
            ("PATCH", "CronJob"),
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
    // Every child but the ledger is owned by the flow, as its controller, blocking its deletion. The ledger is
    // retained by default: no owner reference, so it outlives the flow.
    assert_eq!(w[2].kind(), "PersistentVolumeClaim");
    assert!(
        w[2].body["metadata"].get("ownerReferences").is_none(),
        "{}",
        w[2].body
    );
    assert_eq!(
        w[2].body["metadata"]["labels"]["sync.meshline.io/flow"],
        FLOW
    );
    for r in w[..7]
        .iter()
        .filter(|r| r.kind() != "PersistentVolumeClaim")
    {
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
    // The audit CronJob, accepted by the double (its name fits 52 characters), after the pods it asks.
    assert_eq!(
        w[6].path,
        format!("/apis/batch/v1/namespaces/{NS}/cronjobs/meshline-audit-{FLOW}")
    );
    assert_eq!(w[6].answered, 200, "{:?}", w[6].body);
    let s = &w[7].body;
    assert_eq!(s["apiVersion"], "sync.meshline.io/v1alpha1");
    assert_eq!(s["kind"], "SyncFlow");
    assert!(w[7].is_forced_apply());
    for t in [
        "ContractResolved",
        "OwnerAssigned",
        "SecretsReady",
        "Ready",
        "Degraded",
        "Progressing",
        "DiskPressure",
        "StatusUnavailable",
    ] {
        assert_eq!(condition(&s["status"], t)["observedGeneration"], 1, "{t}");
    }
    // No worker has answered yet: disk pressure is not known either way, nor is the status unavailable.
    assert_eq!(condition(&s["status"], "DiskPressure")["status"], "Unknown");
    assert_eq!(
        condition(&s["status"], "StatusUnavailable")["reason"],
        "NoWorkerStatus"
    );
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
    let c = controller_support::activated(c, &mut h.writers.revisions);
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
    let c = controller_support::activated(c, &mut h.writers.revisions);
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
        Observation::answered("meshline-won-deals-to-odoo-7d9f8-abcde", answer.clone()),
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
        Observation::answered("meshline-won-deals-to-odoo-7d9f8-abcde", better),
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
                "CronJob",
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

/// Worker pods' `/status` as it comes over the wire (code and body), read through the same parsing as the real
/// sources, so the poll path from bytes to condition is what these tests exercise. Every pod gives the same
/// answer unless told otherwise; a pod set to hang never answers.
struct ScriptedWorker {
    answer: std::sync::Mutex<(u16, String)>,
    by_pod: std::sync::Mutex<std::collections::HashMap<String, Option<(u16, String)>>>,
    /// The pods asked, in order, with the token they were given.
    asked: std::sync::Mutex<Vec<(String, Option<String>)>>,
}

impl ScriptedWorker {
    fn new() -> ScriptedWorker {
        ScriptedWorker {
            answer: std::sync::Mutex::new((200, String::new())),
            by_pod: Default::default(),
            asked: Default::default(),
        }
    }
    fn answers(&self, code: u16, body: Value) {
        *self.answer.lock().unwrap() = (code, body.to_string());
    }
    fn pod_answers(&self, pod: &str, code: u16, body: Value) {
        self.by_pod
            .lock()
            .unwrap()
            .insert(pod.into(), Some((code, body.to_string())));
    }
    fn pod_hangs(&self, pod: &str) {
        self.by_pod.lock().unwrap().insert(pod.into(), None);
    }
}

#[async_trait::async_trait]
impl WorkerStatusSource for ScriptedWorker {
    async fn fetch(
        &self,
        _namespace: &str,
        pod: &WorkerPod,
        token: Option<&str>,
    ) -> Result<WorkerAnswer, FetchError> {
        self.asked
            .lock()
            .unwrap()
            .push((pod.name.clone(), token.map(str::to_string)));
        let scripted = self.by_pod.lock().unwrap().get(&pod.name).cloned();
        let (code, body) = match scripted {
            Some(Some(answer)) => answer,
            Some(None) => return futures::future::pending().await,
            None => self.answer.lock().unwrap().clone(),
        };
        parse_answer(
            &format!("http://{}:8080/status", pod.address),
            code,
            body.as_bytes(),
        )
    }
    /// These tests script `/status` alone; any other endpoint answers as a worker without that route would.
    async fn call(
        &self,
        _namespace: &str,
        _pod: &WorkerPod,
        _method: http::Method,
        _path: &str,
        _token: Option<&str>,
        _body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), FetchError> {
        Ok((404, b"no such route".to_vec()))
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

const POD: &str = "meshline-won-deals-to-odoo-7d9f8-abcde";

/// An endpoint of a slice: (pod, IP, serving).
type Endpoint<'a> = (&'a str, &'a str, bool);

/// Publishes `endpoints` in an EndpointSlice of `service` the way the EndpointSlice controller does: the
/// Service's labels copied (from what the controller applied), plus `kubernetes.io/service-name` and the
/// slice controller's own label; for a Service that publishes unready pods every endpoint is `ready` and the
/// pod's readiness is `serving`. Then waits until the controller's cache holds it.
async fn publish(h: &Harness, service: &str, slice: &str, endpoints: &[Endpoint<'_>]) {
    let svc = h
        .ctx
        .stores
        .services
        .get(&ObjectRef::new(service).within(NS))
        .expect("the controller applied this Service");
    let publishes_unready = svc
        .spec
        .as_ref()
        .and_then(|s| s.publish_not_ready_addresses)
        .unwrap_or(false);
    let mut labels: serde_json::Map<String, Value> = svc
        .metadata
        .labels
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, Value::from(v)))
        .collect();
    labels.insert("kubernetes.io/service-name".into(), service.into());
    labels.insert(
        "endpointslice.kubernetes.io/managed-by".into(),
        "endpointslice-controller.k8s.io".into(),
    );
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(pod, ip, serving)| {
            serde_json::json!({
                "addresses": [ip],
                "conditions": {"ready": publishes_unready || *serving, "serving": serving, "terminating": false},
                "targetRef": {"kind": "Pod", "namespace": NS, "name": pod},
            })
        })
        .collect();
    let object = serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": slice, "namespace": NS, "labels": labels},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    });
    h.double.put(
        &format!("/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices/{slice}"),
        object,
    );
    let version = h
        .double
        .objects
        .lock()
        .unwrap()
        .get(&format!(
            "/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices/{slice}"
        ))
        .unwrap()["metadata"]["resourceVersion"]
        .clone();
    // The state that matters: the cache holds this very version of the slice.
    loop {
        let cached = h
            .ctx
            .stores
            .endpoint_slices
            .get(&ObjectRef::new(slice).within(NS))
            .and_then(|s| s.metadata.resource_version.clone());
        if cached.as_deref() == version.as_str() {
            return;
        }
        tokio::task::yield_now().await;
    }
}

fn status_service() -> String {
    format!("meshline-{FLOW}-status")
}

/// A flow whose worker runs (applied, Deployment ready, status settled, one pod published) and is in the flow
/// cache the poller reads.
async fn running_flow(h: &mut Harness) -> SyncFlow {
    let mut f = flow();
    let first = reconcile(h, &f).await;
    settle(h, &first, &mut f);
    let second = reconcile(h, &f).await;
    settle(h, &second, &mut f);
    apply(&mut h.writers.flows, f.clone());
    publish(
        h,
        &status_service(),
        "status-slice-a",
        &[(POD, "10.1.0.7", true)],
    )
    .await;
    f
}

/// One status poll through `source`, then the reconcile the poller triggers; the requests it made.
async fn poll_and_reconcile(
    h: &mut Harness,
    f: &mut SyncFlow,
    source: &ScriptedWorker,
) -> Vec<Recorded> {
    let changed =
        meshline::controller::poll::poll_once(&h.ctx, source, &PollSettings::default()).await;
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
async fn a_slowed_poll_degrades_the_flow_but_keeps_it_ready() {
    let mut h = harness();
    let mut f = running_flow(&mut h).await;
    let worker = ScriptedWorker::new();
    let message = "Salesforce API usage is 13800/15000 (92 %) of the org's 24-hour allowance; polling every 120s \
                   instead of 30s until it falls below 80 %";
    worker.answers(
        200,
        running_status(serde_json::json!([
            {"kind": "SourceApiLimit", "message": message, "since": "2026-01-02T03:00:00Z"}
        ])),
    );
    let requests = poll_and_reconcile(&mut h, &mut f, &worker).await;
    let s = &status_patch(&requests)
        .expect("the slowed poll is written")
        .body["status"];
    let degraded = condition(s, "Degraded");
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "SourceApiLimit");
    assert!(
        degraded["message"].as_str().unwrap().contains(message),
        "{degraded}"
    );
    assert_eq!(
        condition(s, "Ready")["status"],
        "True",
        "records still flow, only later"
    );

    // Usage falls back below the threshold: the flow recovers.
    worker.answers(200, running_status(serde_json::json!([])));
    let requests = poll_and_reconcile(&mut h, &mut f, &worker).await;
    let s = &status_patch(&requests)
        .expect("the recovery is written")
        .body["status"];
    assert_eq!(condition(s, "Degraded")["status"], "False");
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
async fn a_503_that_is_not_the_workers_own_answer_is_no_startup_failure_but_an_unavailable_status()
{
    let mut h = harness();
    let mut f = running_flow(&mut h).await;
    let worker = ScriptedWorker::new();
    worker.answers(200, running_status(serde_json::json!([])));
    poll_and_reconcile(&mut h, &mut f, &worker).await;
    // The API server's pod proxy that cannot reach the pod answers 503 with its own Status.
    worker.answers(
        503,
        serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "error trying to reach service: dial tcp 10.1.0.7:8080: connect: connection refused",
            "reason": "ServiceUnavailable", "code": 503}),
    );
    let requests = poll_and_reconcile(&mut h, &mut f, &worker).await;
    let s = &status_patch(&requests)
        .expect("a pod that stops answering is written, not frozen")
        .body["status"];
    let unavailable = condition(s, "StatusUnavailable");
    assert_eq!(unavailable["status"], "True");
    assert_eq!(unavailable["reason"], "WorkerUnreachable");
    let message = unavailable["message"].as_str().unwrap();
    assert!(message.contains("HTTP 503"), "{message}");
    assert!(
        message.contains("the counters are as last read"),
        "{message}"
    );
    // Not a startup failure: Ready stays, the counters keep the last numbers, and the SLA verdict says so.
    assert_eq!(condition(s, "Ready")["status"], "True");
    assert_eq!(condition(s, "Degraded")["status"], "False");
    assert!(
        condition(s, "Degraded")["message"]
            .as_str()
            .unwrap()
            .contains("as last seen")
    );
    assert_eq!(s["counters"]["delivered"], 199);
    assert_eq!(s["workers"][0]["pod"], POD);
    assert_eq!(s["workers"][0]["state"], "Unreachable");
    // The same failure again writes nothing; the worker answering again clears it.
    let requests = poll_and_reconcile(&mut h, &mut f, &worker).await;
    assert!(writes(&requests).is_empty(), "{:#?}", writes(&requests));
    worker.answers(200, running_status(serde_json::json!([])));
    let requests = poll_and_reconcile(&mut h, &mut f, &worker).await;
    let s = &status_patch(&requests).unwrap().body["status"];
    assert_eq!(condition(s, "StatusUnavailable")["status"], "False");
    assert_eq!(s["workers"][0]["state"], "Running");
}

const POD_A: &str = "meshline-won-deals-to-odoo-7d9f8-aaaaa";
const POD_B: &str = "meshline-won-deals-to-odoo-7d9f8-bbbbb";

fn with_counters(delivered: i64, breaker: Value) -> Value {
    let mut v = running_status(serde_json::json!([]));
    v["counters"]["delivered"] = delivered.into();
    v["circuitBreaker"] = breaker;
    v
}

/// Two worker pods behind the status Service (A ready, B not yet ready), and the worker Service's slice that
/// holds only the ready one: the poller must read each pod once, from the status Service's slices.
async fn two_pods(h: &mut Harness) -> SyncFlow {
    let f = running_flow(h).await;
    publish(
        h,
        &status_service(),
        "status-slice-a",
        &[(POD_A, "10.1.0.7", true), (POD_B, "10.1.0.8", false)],
    )
    .await;
    publish(
        h,
        &format!("meshline-{FLOW}"),
        "service-slice-a",
        &[(POD_A, "10.1.0.7", true)],
    )
    .await;
    f
}

#[tokio::test]
async fn every_worker_pod_is_read_and_one_open_breaker_degrades_the_flow_on_every_poll() {
    let mut h = harness();
    let mut f = two_pods(&mut h).await;
    let worker = ScriptedWorker::new();
    worker.pod_answers(POD_A, 200, with_counters(199, Value::Null));
    worker.pod_answers(
        POD_B,
        200,
        with_counters(
            201,
            serde_json::json!({"reason": "the ERP answers 401 to every upsert", "since": "2026-01-02T03:00:00Z"}),
        ),
    );
    let requests = poll_and_reconcile(&mut h, &mut f, &worker).await;
    // Each published pod once, with the flow's token; the worker Service's slice adds nobody.
    let asked = worker.asked.lock().unwrap().clone();
    let mut pods: Vec<&str> = asked.iter().map(|(p, _)| p.as_str()).collect();
    pods.sort();
    assert_eq!(pods, vec![POD_A, POD_B]);
    assert!(
        asked
            .iter()
            .all(|(_, t)| t.as_deref().is_some_and(|t| t.len() == 64)),
        "{asked:?}"
    );

    let s = &status_patch(&requests)
        .expect("the first answers are written")
        .body["status"];
    // The counters come from the shared ledger once (pod A, the first by name), never summed over pods.
    assert_eq!(s["counters"]["delivered"], 199);
    let degraded = condition(s, "Degraded");
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "CircuitBreakerOpen");
    let message = degraded["message"].as_str().unwrap();
    assert!(message.starts_with(&format!("pod {POD_B}: ")), "{message}");
    assert!(message.contains("the ERP answers 401"), "{message}");
    // A is working, so the flow is still Ready.
    assert_eq!(condition(s, "Ready")["status"], "True");
    assert_eq!(condition(s, "StatusUnavailable")["status"], "False");
    assert_eq!(
        condition(s, "StatusUnavailable")["message"],
        "2 of 2 worker pods answered"
    );
    // Per pod: the pod in trouble first, readiness as the EndpointSlice's `serving` says.
    let workers = s["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2);
    assert_eq!(workers[0]["pod"], POD_B);
    assert_eq!(workers[0]["ready"], false);
    assert_eq!(workers[0]["state"], "Running");
    assert_eq!(
        workers[0]["circuitBreakerOpenSince"],
        "2026-01-02T03:00:00Z"
    );
    assert_eq!(workers[1]["pod"], POD_A);
    assert_eq!(workers[1]["ready"], true);
    assert!(workers[1].get("circuitBreakerOpenSince").is_none());
    assert!(s.get("workersOmitted").is_none());

    // However the next polls land, nothing flips: the same pods say the same, nothing is written.
    for _ in 0..3 {
        let requests = poll_and_reconcile(&mut h, &mut f, &worker).await;
        assert!(writes(&requests).is_empty(), "{:#?}", writes(&requests));
    }
    // B's breaker closes: the flow recovers.
    worker.pod_answers(POD_B, 200, with_counters(201, Value::Null));
    let requests = poll_and_reconcile(&mut h, &mut f, &worker).await;
    let s = &status_patch(&requests).unwrap().body["status"];
    assert_eq!(condition(s, "Degraded")["status"], "False");
    assert!(events(&requests).contains(&"Recovered"));
}

#[tokio::test]
async fn a_pod_that_cannot_start_is_read_though_not_ready_and_degrades_without_unreadying_the_flow()
{
    let mut h = harness();
    let mut f = two_pods(&mut h).await;
    let worker = ScriptedWorker::new();
    worker.pod_answers(POD_A, 200, with_counters(199, Value::Null));
    let message = "cannot connect to the PostgreSQL ledger at ledger-db:5432: connection refused";
    worker.pod_answers(
        POD_B,
        503,
        serde_json::json!({"error": "the pipeline did not start", "problems": [
            {"kind": "LedgerUnavailable", "message": message, "since": "2026-01-02T03:00:00Z"}]}),
    );
    let requests = poll_and_reconcile(&mut h, &mut f, &worker).await;
    let s = &status_patch(&requests).unwrap().body["status"];
    let degraded = condition(s, "Degraded");
    assert_eq!(degraded["reason"], "LedgerUnavailable");
    assert_eq!(degraded["message"], format!("pod {POD_B}: {message}"));
    assert_eq!(condition(s, "Ready")["status"], "True");
    assert_eq!(s["workers"][0]["pod"], POD_B);
    assert_eq!(s["workers"][0]["state"], "NotStarted");
    assert_eq!(s["workers"][0]["ready"], false);
    assert_eq!(
        s["workers"][0]["problems"],
        serde_json::json!(["LedgerUnavailable"])
    );
    assert_eq!(s["workers"][0]["message"], "the pipeline did not start");

    // Both pods fail the same way: no pod can work, so Ready goes False, and the message is said once.
    worker.pod_answers(
        POD_A,
        503,
        serde_json::json!({"error": "the pipeline did not start", "problems": [
            {"kind": "LedgerUnavailable", "message": message, "since": "2026-01-02T03:00:00Z"}]}),
    );
    let requests = poll_and_reconcile(&mut h, &mut f, &worker).await;
    let s = &status_patch(&requests).unwrap().body["status"];
    let ready = condition(s, "Ready");
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "LedgerUnavailable");
    assert_eq!(
        ready["message"],
        format!("pods {POD_A}, {POD_B}: {message}")
    );
    // The counters keep what the ledger last said through pod A.
    assert_eq!(s["counters"]["delivered"], 199);
}

#[tokio::test]
async fn a_pod_that_does_not_answer_in_time_is_named_and_the_others_still_count() {
    let mut h = harness();
    let mut f = two_pods(&mut h).await;
    let worker = ScriptedWorker::new();
    worker.pod_answers(POD_A, 200, with_counters(199, Value::Null));
    worker.pod_hangs(POD_B);
    // A pod that never answers is cut off by the flow's bound; an answer that is already there always counts,
    // however busy the machine (the bound is checked after the request), so a short bound is no race here.
    let settings = PollSettings {
        timeout: std::time::Duration::from_millis(20),
        ..PollSettings::default()
    };
    let changed = meshline::controller::poll::poll_once(&h.ctx, &worker, &settings).await;
    assert_eq!(changed.len(), 1);
    let requests = reconcile(&h, &f).await;
    settle(&mut h, &requests, &mut f);
    let s = &status_patch(&requests).unwrap().body["status"];
    let unavailable = condition(s, "StatusUnavailable");
    assert_eq!(unavailable["status"], "True");
    assert_eq!(unavailable["reason"], "WorkerUnreachable");
    let message = unavailable["message"].as_str().unwrap();
    assert!(
        message.starts_with(&format!("pod {POD_B}: no answer within 0.02s")),
        "{message}"
    );
    // A answered, so the counters are fresh, not "as last read".
    assert!(!message.contains("as last read"), "{message}");
    assert_eq!(s["counters"]["delivered"], 199);
    assert_eq!(s["workers"][0]["pod"], POD_B);
    assert_eq!(s["workers"][0]["state"], "Unreachable");
    assert_eq!(s["workers"][1]["state"], "Running");
}

#[tokio::test]
async fn the_per_pod_list_is_capped_and_says_how_many_were_left_out() {
    let mut h = harness();
    let mut f = running_flow(&mut h).await;
    let names: Vec<String> = (0..25)
        .map(|i| format!("meshline-won-deals-to-odoo-7d9f8-p{i:02}"))
        .collect();
    let ips: Vec<String> = (0..25).map(|i| format!("10.1.1.{i}")).collect();
    let endpoints: Vec<Endpoint<'_>> = names
        .iter()
        .zip(&ips)
        .map(|(n, ip)| (n.as_str(), ip.as_str(), true))
        .collect();
    publish(&h, &status_service(), "status-slice-a", &endpoints).await;
    let worker = ScriptedWorker::new();
    worker.answers(200, with_counters(199, Value::Null));
    let gated = &names[17];
    let mut paused = with_counters(199, Value::Null);
    paused["paused"] = "the pricebook lookup never loaded".into();
    worker.pod_answers(gated, 200, paused);
    // The double refuses a status beyond the CRD's maxItems, so an accepted write is part of the proof.
    let requests = poll_and_reconcile(&mut h, &mut f, &worker).await;
    assert!(requests.iter().all(|r| r.answered < 400), "{requests:#?}");
    let s = &status_patch(&requests).unwrap().body["status"];
    let workers = s["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 20);
    assert_eq!(s["workersOmitted"], 5);
    assert_eq!(workers[0]["pod"], gated.as_str());
    assert_eq!(workers[0]["paused"], "the pricebook lookup never loaded");
    assert_eq!(condition(s, "Degraded")["reason"], "WorkerGated");
    assert_eq!(
        condition(s, "StatusUnavailable")["message"],
        "25 of 25 worker pods answered"
    );
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

/// A source that counts the requests in flight: each answers after yielding once, so every request the poller
/// lets run at the same time is in flight together.
#[derive(Default)]
struct CountingWorker {
    in_flight: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
    asked: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl WorkerStatusSource for CountingWorker {
    async fn fetch(
        &self,
        _namespace: &str,
        _pod: &WorkerPod,
        _token: Option<&str>,
    ) -> Result<WorkerAnswer, FetchError> {
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.in_flight.fetch_add(1, SeqCst) + 1;
        self.most.fetch_max(now, SeqCst);
        self.asked.fetch_add(1, SeqCst);
        tokio::task::yield_now().await;
        self.in_flight.fetch_sub(1, SeqCst);
        parse_answer(
            "http://scripted/status",
            200,
            running_status(serde_json::json!([])).to_string().as_bytes(),
        )
    }
    /// Only `/status` is counted; any other endpoint answers as a worker without that route would.
    async fn call(
        &self,
        _namespace: &str,
        _pod: &WorkerPod,
        _method: http::Method,
        _path: &str,
        _token: Option<&str>,
        _body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), FetchError> {
        Ok((404, b"no such route".to_vec()))
    }
}

#[tokio::test]
async fn pods_are_polled_concurrently_but_never_more_than_the_bound_at_once() {
    let mut h = harness();
    let mut f = running_flow(&mut h).await;
    let names: Vec<String> = (0..7)
        .map(|i| format!("meshline-won-deals-to-odoo-7d9f8-q{i}"))
        .collect();
    let ips: Vec<String> = (0..7).map(|i| format!("10.1.2.{i}")).collect();
    let endpoints: Vec<Endpoint<'_>> = names
        .iter()
        .zip(&ips)
        .map(|(n, ip)| (n.as_str(), ip.as_str(), true))
        .collect();
    publish(&h, &status_service(), "status-slice-a", &endpoints).await;
    let worker = CountingWorker::default();
    let settings = PollSettings {
        pods_at_once: 3,
        ..PollSettings::default()
    };
    let changed = meshline::controller::poll::poll_once(&h.ctx, &worker, &settings).await;
    assert_eq!(changed.len(), 1);
    use std::sync::atomic::Ordering::SeqCst;
    assert_eq!(worker.asked.load(SeqCst), 7, "every pod is read once");
    assert_eq!(
        worker.most.load(SeqCst),
        3,
        "the pods of a flow are read side by side, up to the bound and no further"
    );
    let requests = reconcile(&h, &f).await;
    settle(&mut h, &requests, &mut f);
    let s = &status_patch(&requests).unwrap().body["status"];
    assert_eq!(s["workers"].as_array().unwrap().len(), 7);
}

fn pvc_writes(requests: &[Recorded]) -> Vec<&Recorded> {
    writes(requests)
        .into_iter()
        .filter(|r| r.path.contains("/persistentvolumeclaims"))
        .collect()
}

fn with_policy(mut f: SyncFlow, policy: LedgerRetentionPolicy, generation: i64) -> SyncFlow {
    f.spec.ledger.retention_policy = policy;
    f.metadata.generation = Some(generation);
    f
}

#[tokio::test]
async fn retention_policy_switches_move_the_ledgers_owner_reference_and_nothing_else() {
    let mut h = harness();
    let mut f = flow();
    let first = reconcile(&h, &f).await;
    settle(&mut h, &first, &mut f);
    let ledger_path =
        format!("/api/v1/namespaces/{NS}/persistentvolumeclaims/meshline-{FLOW}-ledger");

    // Retain → Delete: the flow takes ownership, so garbage collection deletes the ledger with it.
    f = with_policy(f, LedgerRetentionPolicy::Delete, 2);
    let second = reconcile(&h, &f).await;
    let kinds: Vec<&str> = writes(&second).iter().map(|r| r.kind()).collect();
    assert_eq!(
        kinds,
        vec!["PersistentVolumeClaim", "SyncFlow"],
        "the worker does not restart for a retention policy"
    );
    let pvc = pvc_writes(&second)[0];
    assert_eq!(pvc.path, ledger_path);
    assert!(pvc.is_forced_apply());
    let owner = &pvc.body["metadata"]["ownerReferences"][0];
    assert_eq!(owner["uid"], "flow-uid-1");
    assert_eq!(owner["controller"], true);
    assert_eq!(owner["blockOwnerDeletion"], true);
    settle(&mut h, &second, &mut f);
    assert!(pvc_writes(&reconcile(&h, &f).await).is_empty());

    // Delete → Retain: the same apply without the reference releases it.
    f = with_policy(f, LedgerRetentionPolicy::Retain, 3);
    let third = reconcile(&h, &f).await;
    let pvc = pvc_writes(&third);
    assert_eq!(pvc.len(), 1, "{pvc:#?}");
    assert_eq!(pvc[0].method, "PATCH");
    assert!(pvc[0].body["metadata"].get("ownerReferences").is_none());
    assert!(!writes(&third).iter().any(|r| r.method == "DELETE"));
}

#[tokio::test]
async fn a_flow_that_cannot_start_still_protects_its_ledger_when_told_to_retain_it() {
    let mut h = harness();
    let mut f = with_policy(flow(), LedgerRetentionPolicy::Delete, 1);
    let first = reconcile(&h, &f).await;
    settle(&mut h, &first, &mut f);
    // The live ledger was resized by hand (or before a storageSize edit): ownership changes must not touch it.
    let mut live: PersistentVolumeClaim =
        serde_json::from_value(pvc_writes(&first)[0].body.clone()).unwrap();
    live.spec
        .as_mut()
        .unwrap()
        .resources
        .as_mut()
        .unwrap()
        .requests = Some(
        [(
            "storage".to_string(),
            k8s_openapi::apimachinery::pkg::api::resource::Quantity("5Gi".into()),
        )]
        .into(),
    );
    apply(&mut h.writers.pvcs, live);
    // The roster stops covering the flow, and someone sets Retain before deleting the broken flow.
    let mut r = roster();
    r.spec.assignments.clear();
    apply(&mut h.writers.rosters, r);
    f = with_policy(f, LedgerRetentionPolicy::Retain, 2);
    let requests = reconcile(&h, &f).await;
    let pvc = pvc_writes(&requests);
    assert_eq!(pvc.len(), 1, "{:#?}", writes(&requests));
    let body = &pvc[0].body;
    assert!(pvc[0].is_forced_apply());
    assert!(body["metadata"].get("ownerReferences").is_none(), "{body}");
    assert_eq!(
        body["spec"]["resources"]["requests"]["storage"], "5Gi",
        "the live size is kept while the flow is not running"
    );
    assert!(
        body["metadata"]["annotations"]
            .get("sync.meshline.io/applied-hash")
            .is_none(),
        "without the content hash, the full apply is not skipped once the flow starts again"
    );
    assert!(
        !writes(&requests)
            .iter()
            .any(|r| r.method == "DELETE" || r.kind() == "Deployment"),
        "{:#?}",
        writes(&requests)
    );
    settle(&mut h, &requests, &mut f);
    assert!(
        pvc_writes(&reconcile(&h, &f).await).is_empty(),
        "once in step, nothing more is written"
    );
}

#[tokio::test]
async fn a_recreated_flow_finds_its_retained_ledger_as_it_was() {
    let mut h = harness();
    let mut f = flow();
    let first = reconcile(&h, &f).await;
    settle(&mut h, &first, &mut f);
    // The flow is deleted: the controller writes nothing, least of all a delete of the ledger.
    let mut deleting = f.clone();
    deleting.metadata.deletion_timestamp = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
    );
    let gone = reconcile(&h, &deleting).await;
    assert!(writes(&gone).is_empty(), "{:#?}", writes(&gone));
    // Garbage collection removes what the old flow owned; the ledger had no owner and stays in the cache.
    let ledger = ObjectRef::new(&format!("meshline-{FLOW}-ledger")).within(NS);
    assert!(h.ctx.stores.pvcs.get(&ledger).is_some());
    fn owned<K: kube::Resource<DynamicType = ()>>(name: String) -> ObjectRef<K> {
        ObjectRef::new(&name).within(NS)
    }
    let worker = format!("meshline-{FLOW}");
    let d = h
        .ctx
        .stores
        .deployments
        .get(&owned(worker.clone()))
        .unwrap();
    h.writers
        .deployments
        .apply_watcher_event(&watcher::Event::Delete((*d).clone()));
    let cm = h
        .ctx
        .stores
        .config_maps
        .get(&owned(worker.clone()))
        .unwrap();
    h.writers
        .config_maps
        .apply_watcher_event(&watcher::Event::Delete((*cm).clone()));
    for name in [worker.clone(), format!("{worker}-status")] {
        let svc = h.ctx.stores.services.get(&owned(name)).unwrap();
        h.writers
            .services
            .apply_watcher_event(&watcher::Event::Delete((*svc).clone()));
    }
    let token = h
        .ctx
        .stores
        .tokens
        .get(&owned(format!("{worker}-token")))
        .unwrap();
    h.writers
        .tokens
        .apply_watcher_event(&watcher::Event::Delete((*token).clone()));
    // The same flow, applied again: a new object with a new uid.
    let mut again = flow();
    again.metadata.uid = Some("flow-uid-2".into());
    let requests = reconcile(&h, &again).await;
    let w = writes(&requests);
    let kinds: Vec<(&str, &str)> = w.iter().map(|r| (r.method.as_str(), r.kind())).collect();
    assert_eq!(
        kinds,
        vec![
            ("POST", "Secret"),
            ("PATCH", "ConfigMap"),
            ("PATCH", "Service"),
            ("PATCH", "Service"),
            ("PATCH", "Deployment"),
            ("PATCH", "CronJob"),
            ("PATCH", "SyncFlow"),
        ],
        "everything the old flow owned is made again, but the retained ledger already is what the new flow \
         wants: it is reused untouched"
    );
    let d = w.iter().find(|r| r.kind() == "Deployment").unwrap();
    let claim = d.body["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "state")
        .unwrap()["persistentVolumeClaim"]["claimName"]
        .clone();
    assert_eq!(claim, format!("meshline-{FLOW}-ledger"));
    assert_eq!(
        d.body["metadata"]["ownerReferences"][0]["uid"], "flow-uid-2",
        "the new flow owns its new worker"
    );
}

#[tokio::test]
async fn worker_settings_the_api_server_would_refuse_are_a_condition_not_a_failing_apply() {
    let h = harness();
    let mut f = flow();
    f.spec.worker = Some(
        serde_json::from_value(serde_json::json!({
            "podLabels": {"sync.meshline.io/flow": "someone-else"},
            "tolerations": [{"key": "dedicated", "operator": "Exists", "value": "sync"}]
        }))
        .unwrap(),
    );
    let requests = reconcile(&h, &f).await;
    let w = writes(&requests);
    assert_eq!(w.len(), 1, "only the status: {w:#?}");
    assert!(
        requests.iter().all(|r| r.answered < 400),
        "nothing was refused"
    );
    let ready = condition(&w[0].body["status"], "Ready").clone();
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "InvalidWorkerSettings");
    let message = ready["message"].as_str().unwrap();
    assert!(
        message.contains("spec.worker.podLabels[sync.meshline.io/flow]")
            && message.contains("spec.worker.tolerations[0].value"),
        "{message}"
    );
}

#[tokio::test]
async fn platform_defaults_and_flow_settings_reach_a_deployment_the_api_server_accepts() {
    let double = ApiDouble::new();
    double.put_secret(NS, "hubspot-app", &["clientSecret", "accessToken"]);
    double.put_secret(NS, "odoo-api-key", &["login", "apiKey"]);
    // The roster's ticket sinks, mounted into the worker as well.
    double.put_secret(NS, "github-token", &["token"]);
    double.put_secret(NS, "alert-webhook-signing", &["signingSecret"]);
    let (stores, mut writers) = Stores::new();
    let c = controller_support::activated(contract(), &mut writers.revisions);
    apply(&mut writers.contracts, c);
    apply(&mut writers.rosters, roster());
    let defaults = meshline::cli::controller::parse_worker_defaults(
        r#"{"serviceAccountName": "sync-workers", "imagePullSecrets": [{"name": "regcred"}],
            "nodeSelector": {"pool": "integration"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "sync", "effect": "NoSchedule"}],
            "priorityClassName": "business-critical",
            "podAnnotations": {"example.com/cost-center": "finance"}, "podLabels": {"team": "platform"}}"#,
    )
    .unwrap();
    let ctx = Arc::new(Context::new(
        double.client(),
        BuildSettings {
            worker_image: "img:1".into(),
            worker_defaults: defaults,
            ..BuildSettings::default()
        },
        stores,
        Arc::new(Metrics::new()),
    ));
    let h = Harness {
        double,
        ctx,
        writers,
    };
    let mut f = flow();
    f.spec.worker = Some(
        serde_json::from_value(serde_json::json!({
            "podLabels": {"team": "revops"},
            "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                 "labelSelector": {"matchLabels": {"sync.meshline.io/flow": FLOW}}}}]}}
        }))
        .unwrap(),
    );
    let requests = reconcile(&h, &f).await;
    let d = requests
        .iter()
        .find(|r| r.kind() == "Deployment")
        .expect("the Deployment is applied");
    assert_eq!(d.answered, 200, "{:?}", d.body);
    let template = &d.body["spec"]["template"];
    let pod = &template["spec"];
    assert_eq!(pod["serviceAccountName"], "sync-workers");
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(pod["imagePullSecrets"][0]["name"], "regcred");
    assert_eq!(pod["nodeSelector"]["pool"], "integration");
    assert_eq!(pod["tolerations"][0]["value"], "sync");
    assert_eq!(pod["priorityClassName"], "business-critical");
    assert_eq!(
        pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
            ["topologyKey"],
        "kubernetes.io/hostname"
    );
    assert_eq!(template["metadata"]["labels"]["team"], "revops");
    assert_eq!(
        template["metadata"]["labels"]["sync.meshline.io/flow"], FLOW,
        "the selector label is the controller's"
    );
    assert_eq!(
        template["metadata"]["annotations"]["example.com/cost-center"],
        "finance"
    );
    let s = &status_patch(&requests).unwrap().body["status"];
    assert_eq!(condition(s, "Progressing")["reason"], "RollingOut");
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
        ..BuildSettings::default()
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
            ("PATCH", "CronJob"),
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
    let flow_label = "sync.meshline.io/flow";
    assert_eq!(
        policy.body["spec"]["podSelector"]["matchLabels"][flow_label],
        w[6].body["spec"]["selector"]["matchLabels"][flow_label],
        "the policy selects the flow's pods"
    );
    assert_eq!(
        policy.body["spec"]["podSelector"]["matchExpressions"],
        serde_json::json!([{"key": "app.kubernetes.io/component", "operator": "In", "values": ["worker", "worker-canary"]}]),
        "both tracks: the Deployment's pods and the canary's"
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
        ..BuildSettings::default()
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

/// A stand-in for a receiver behind the roster's webhook ticket sink: it checks each delivery's signature
/// (the double's Secrets hold `x` for every key) and keeps (event, Idempotency-Key) of every valid one.
async fn webhook_receiver() -> (String, Arc<std::sync::Mutex<Vec<(String, String)>>>) {
    let (url, got, _) = webhook_receiver_failing_while().await;
    (url, got)
}

/// [`webhook_receiver`] that answers 503 to every request (and records none) while the flag is set; the
/// counter counts every request.
async fn webhook_receiver_failing_while() -> (
    String,
    Arc<std::sync::Mutex<Vec<(String, String)>>>,
    Arc<(
        std::sync::atomic::AtomicBool,
        std::sync::atomic::AtomicUsize,
    )>,
) {
    use axum::http::{HeaderMap, StatusCode};
    use std::sync::atomic::Ordering;
    let got: Arc<std::sync::Mutex<Vec<(String, String)>>> = Default::default();
    let failing: Arc<(
        std::sync::atomic::AtomicBool,
        std::sync::atomic::AtomicUsize,
    )> = Default::default();
    let seen = got.clone();
    let state = failing.clone();
    let app = axum::Router::new().route(
        "/meshline",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let seen = seen.clone();
            let state = state.clone();
            async move {
                state.1.fetch_add(1, Ordering::SeqCst);
                if state.0.load(Ordering::SeqCst) {
                    return StatusCode::SERVICE_UNAVAILABLE;
                }
                let header = |n: &str| {
                    headers
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string()
                };
                let want = meshline::connectors::sinks::http::signature(
                    "x",
                    &header("x-meshline-timestamp"),
                    &body,
                );
                if header("x-meshline-signature") != want {
                    return StatusCode::UNAUTHORIZED;
                }
                let v: Value = serde_json::from_slice(&body).unwrap();
                seen.lock().unwrap().push((
                    v["event"].as_str().unwrap().to_string(),
                    header("idempotency-key"),
                ));
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/meshline", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, got, failing)
}

/// The double, the manual clock and a way to start (or restart) a controller on it whose silence verdict takes
/// five minutes and three polls, with the roster's `sre-webhook` pointed at `url`.
#[allow(clippy::type_complexity)]
fn outage_controller(
    url: &str,
) -> (
    ApiDouble,
    Arc<meshline::ledger::ManualClock>,
    Box<dyn Fn(&ApiDouble) -> Harness>,
) {
    use meshline::controller::flow::outage::OutageSettings;
    let mut r = roster();
    for sink in &mut r.spec.ticket_sinks {
        if sink.name == "sre-webhook" {
            sink.url = Some(url.to_string());
        }
    }
    let double = ApiDouble::new();
    for (secret, keys) in [
        ("hubspot-app", &["clientSecret", "accessToken"][..]),
        ("odoo-api-key", &["login", "apiKey"]),
        ("github-token", &["token"]),
        ("alert-webhook-signing", &["signingSecret"]),
    ] {
        double.put_secret(NS, secret, keys);
    }
    let clock = meshline::ledger::ManualClock::starting_at(1_772_000_000_000);
    let settings = OutageSettings {
        after: std::time::Duration::from_secs(300),
        polls: 3,
        send_lease: std::time::Duration::from_secs(30),
    };
    let start_clock = clock.clone();
    let start = move |double: &ApiDouble| {
        let clock = start_clock.clone();
        harness_on(
            double.clone(),
            BuildSettings {
                worker_image: "ghcr.io/meshline/meshline:test".into(),
                ..BuildSettings::default()
            },
            r.clone(),
            move |c| c.with_clock(clock).with_outage(settings),
        )
    };
    (double, clock, Box::new(start))
}

#[tokio::test]
async fn no_worker_answering_opens_one_ticket_after_the_silence_lasts_and_resolves_it_once() {
    let (url, got) = webhook_receiver().await;
    let (double, clock, start) = outage_controller(&url);
    let mut h = start(&double);
    let mut f = running_flow(&mut h).await;
    let worker = ScriptedWorker::new();
    // Every pod's answer is a gateway's, not a worker's: nobody answers.
    worker.answers(502, serde_json::json!({"message": "bad gateway"}));
    let outage = |f: &SyncFlow| serde_json::to_value(&f.status.as_ref().unwrap().outage).unwrap();

    // Silent polls, but not yet for five minutes: no verdict.
    for _ in 0..3 {
        poll_and_reconcile(&mut h, &mut f, &worker).await;
    }
    assert!(got.lock().unwrap().is_empty());
    assert!(outage(&f)["silentSince"].is_string(), "{}", outage(&f));
    assert!(outage(&f)["ticket"].is_null());

    clock.advance(std::time::Duration::from_secs(301));
    let requests = poll_and_reconcile(&mut h, &mut f, &worker).await;
    assert!(events(&requests).contains(&"NoWorkerAnswering"));
    let o = outage(&f);
    assert_eq!(o["ticket"]["state"], "open", "{o}");
    assert_eq!(o["ticket"]["owner"], "sre");
    assert_eq!(o["ticket"]["deliveries"][0]["sink"], "sre-webhook");
    assert_eq!(o["ticket"]["deliveries"][0]["deliveredVersion"], 1);
    assert!(o["ticket"]["deliveries"][0]["inDoubtVersion"].is_null());
    let fp = o["ticket"]["fingerprint"].as_str().unwrap().to_string();
    assert_eq!(
        *got.lock().unwrap(),
        vec![("opened".to_string(), format!("{fp}:1"))]
    );

    // Still silent: nothing is sent again.
    poll_and_reconcile(&mut h, &mut f, &worker).await;
    assert_eq!(got.lock().unwrap().len(), 1);

    // A new controller (a restart or a new leader): the outbox is in the flow's status.
    drop(h);
    let mut h = start(&double);
    let requests = reconcile(&h, &f).await;
    settle(&mut h, &requests, &mut f);
    apply(&mut h.writers.flows, f.clone());
    publish(
        &h,
        &status_service(),
        "status-slice-a",
        &[(POD, "10.1.0.7", true)],
    )
    .await;
    poll_and_reconcile(&mut h, &mut f, &worker).await;
    assert_eq!(got.lock().unwrap().len(), 1, "{:?}", got.lock().unwrap());
    assert_eq!(outage(&f)["ticket"]["state"], "open");

    // A worker answers again: resolved, once.
    worker.answers(200, running_status(serde_json::json!([])));
    poll_and_reconcile(&mut h, &mut f, &worker).await;
    let o = outage(&f);
    assert_eq!(o["ticket"]["state"], "resolved", "{o}");
    assert!(o["silentSince"].is_null());
    assert_eq!(
        *got.lock().unwrap(),
        vec![
            ("opened".to_string(), format!("{fp}:1")),
            ("resolved".to_string(), format!("{fp}:2")),
        ]
    );
    poll_and_reconcile(&mut h, &mut f, &worker).await;
    let requests = reconcile(&h, &f).await;
    settle(&mut h, &requests, &mut f);
    assert_eq!(got.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn a_failing_ticket_sink_shows_in_the_flow_status_and_the_outage_ticket_waits_for_it() {
    use std::sync::atomic::Ordering;
    let (url, got, receiver) = webhook_receiver_failing_while().await;
    let (double, clock, start) = outage_controller(&url);
    let mut h = start(&double);
    let mut f = running_flow(&mut h).await;
    let worker = ScriptedWorker::new();
    worker.answers(502, serde_json::json!({"message": "bad gateway"}));
    receiver.0.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        poll_and_reconcile(&mut h, &mut f, &worker).await;
    }
    clock.advance(std::time::Duration::from_secs(301));
    poll_and_reconcile(&mut h, &mut f, &worker).await;
    let o = serde_json::to_value(&f.status.as_ref().unwrap().outage).unwrap();
    let d = &o["ticket"]["deliveries"][0];
    assert_eq!(d["sink"], "sre-webhook");
    assert_eq!(d["attempts"], 1, "{o}");
    assert!(d["lastError"].as_str().unwrap().contains("503"), "{o}");
    assert!(d["deliveredVersion"].is_null());
    // The request may have reached the receiver: the version stays in doubt, resent under the same key.
    assert_eq!(d["inDoubtVersion"], 1);
    assert!(d["nextAttemptAt"].is_string());
    assert_eq!(receiver.1.load(Ordering::SeqCst), 1);

    // Backing off: the next poll does not hit the sink again.
    poll_and_reconcile(&mut h, &mut f, &worker).await;
    assert_eq!(receiver.1.load(Ordering::SeqCst), 1);

    // The sink recovers; once the retry is due the ticket goes out, as its first version.
    receiver.0.store(false, Ordering::SeqCst);
    clock.advance(std::time::Duration::from_secs(60));
    poll_and_reconcile(&mut h, &mut f, &worker).await;
    let o = serde_json::to_value(&f.status.as_ref().unwrap().outage).unwrap();
    let fp = o["ticket"]["fingerprint"].as_str().unwrap().to_string();
    assert_eq!(
        *got.lock().unwrap(),
        vec![("opened".to_string(), format!("{fp}:1"))]
    );
    let d = &o["ticket"]["deliveries"][0];
    assert_eq!(d["deliveredVersion"], 1, "{o}");
    assert!(
        d["lastError"].is_null() && d["inDoubtVersion"].is_null(),
        "{o}"
    );
}

#[tokio::test]
async fn a_flow_moved_to_a_sink_without_a_query_api_loses_its_audit_cron_job() {
    let mut h = harness();
    let mut f = flow();
    let first = reconcile(&h, &f).await;
    assert!(writes(&first).iter().any(|r| r.kind() == "CronJob"));
    settle(&mut h, &first, &mut f);
    f.spec.sink.system = meshline::api::SinkSystem::Http;
    f.spec.sink.base_url = Some("https://erp.example.com/orders".into());
    f.metadata.generation = Some(2);
    let second = reconcile(&h, &f).await;
    let deleted: Vec<_> = writes(&second)
        .into_iter()
        .filter(|r| r.method == "DELETE")
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(
        deleted,
        vec![format!(
            "/apis/batch/v1/namespaces/{NS}/cronjobs/meshline-audit-{FLOW}"
        )]
    );
}

#[tokio::test]
async fn a_finished_audit_reaches_the_flow_status_once_with_its_event() {
    let mut h = harness();
    let mut f = flow();
    let first = reconcile(&h, &f).await;
    settle(&mut h, &first, &mut f);
    let second = reconcile(&h, &f).await;
    settle(&mut h, &second, &mut f);
    let answer = |audit: serde_json::Value| -> meshline::worker::api::WorkerStatus {
        serde_json::from_value(serde_json::json!({
            "flow": FLOW, "contractVersion": "2.0.1", "backend": "sqlite",
            "counters": {"received": 200, "delivered": 180, "failed": 20, "retried": 7, "deadLettered": 12, "held": 3},
            "pending": 5, "failureRate": "0.1", "lastDeliveryTime": "2026-01-02T03:04:05Z", "mttrSeconds": 42,
            "manualInterventionsPer1k": "15", "oldestPendingSeconds": 60, "circuitBreaker": null, "paused": null,
            "audit": audit
        }))
        .unwrap()
    };
    let run = |id: i64, outcome: &str| {
        serde_json::json!({
            "run": id, "outcome": outcome, "startedAt": "2026-12-01T02:00:00Z",
            "finishedAt": "2026-12-01T02:00:09Z", "windowFrom": "2026-11-24T02:00:00Z",
            "windowTo": "2026-12-01T02:00:00Z",
            "crm": {"count": 3, "totals": {"EUR": "300.00"}}, "erp": {"count": 2, "totals": {"EUR": "200.00"}},
            "matched": 2, "unexplained": 1, "unexplainedIds": ["0061"]
        })
    };
    let observe = |h: &Harness, f: &SyncFlow, w| {
        h.ctx.observations.lock().unwrap().insert(
            ObjectRef::from_obj(f),
            Observation::answered("meshline-won-deals-to-odoo-7d9f8-abcde", w),
        );
    };
    observe(&h, &f, answer(run(4, "unexplained")));
    let requests = reconcile(&h, &f).await;
    let s = &status_patch(&requests).expect("a status write").body["status"];
    assert_eq!(s["audit"]["run"], 4);
    assert_eq!(s["audit"]["outcome"], "unexplained");
    assert_eq!(s["audit"]["unexplainedIds"][0], "0061");
    assert!(
        events(&requests).contains(&"AuditUnexplained"),
        "{:?}",
        events(&requests)
    );
    settle(&mut h, &requests, &mut f);
    // The same run again: nothing to write, no second Event.
    let requests = reconcile(&h, &f).await;
    assert!(status_patch(&requests).is_none());
    assert!(!events(&requests).contains(&"AuditUnexplained"));
    // The next night reconciles.
    observe(&h, &f, answer(run(5, "reconciled")));
    let requests = reconcile(&h, &f).await;
    assert_eq!(
        status_patch(&requests).unwrap().body["status"]["audit"]["run"],
        5
    );
    assert!(events(&requests).contains(&"AuditReconciled"));
}
