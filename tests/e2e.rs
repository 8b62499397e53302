//! End-to-end suite against a real cluster (the one `KUBECONFIG` names). Every test is ignored by default; run
//! them with:
//!
//! ```sh
//! KUBECONFIG=~/.kube/config cargo test --test e2e -- --ignored --test-threads=1
//! ```
//!
//! Each test applies the CRDs (server-side), creates its own namespace, runs the controller in-process with the
//! current kubeconfig (no image needed; each worker pod's status is read through the API server's pod proxy, as
//! a controller outside the cluster must), applies the hubspot-odoo example with dummy Secrets, asserts what the
//! controller made, and deletes the namespace at the end, also when an assertion fails. The worker pods need
//! not become ready (their image may not be pullable in a test cluster); set `MESHLINE_E2E_WORKER_IMAGE` to an
//! image that exists to see them run. The pod settings test also creates (and deletes) one cluster-scoped
//! PriorityClass, `meshline-e2e-<random>`.
//!
//! The audit test runs a Job from the flow's audit CronJob; with `MESHLINE_E2E_WORKER_IMAGE` set it waits (up to 15 minutes)
//! for that audit to end partial against the example's unreachable HubSpot and Odoo.
//!
//! `sign_off_policy_lets_only_the_owner_add_a_sign_off` needs no controller; it installs the chart's sign-off
//! ValidatingAdmissionPolicy (as rendered into `tests/data/sign-off-policy.yaml`) under a name of its own, bound
//! to its namespace only, and deletes it at the end (Kubernetes 1.30 or newer).
//!
//! The controller runs with per-flow NetworkPolicies on (`--flow-network-policies on`): the lifecycle test
//! checks the worker's split ports (webhook Service, operations-only status Service, probes) and the policy the
//! API server accepted; `network_policies_follow_the_switch` restarts the controller with `clean-up` and
//! waits for the policy to go.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;
use k8s_openapi::api::admissionregistration::v1::{
    MatchResources, ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::core::v1::{
    ConfigMap, Namespace, PersistentVolumeClaim, Pod, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::scheduling::v1::PriorityClass;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use meshline::api::{
    LedgerRetentionPolicy, OwnershipRoster, SyncContract, SyncFlow, WorkerPodSettings,
};
use meshline::controller::FlowNetworkPolicies;
use meshline::controller::flow::build;
use meshline::controller::names::NameRule;
use serde::Deserialize;

const FLOW: &str = "won-deals-to-odoo";
const TIMEOUT: Duration = Duration::from_secs(90);

async fn client() -> Client {
    if std::env::var_os("KUBECONFIG").is_none() {
        panic!(
            "KUBECONFIG is not set: the e2e suite runs against a real cluster. Run it with\n  \
             KUBECONFIG=~/.kube/config cargo test --test e2e -- --ignored --test-threads=1"
        );
    }
    Client::try_default().await.unwrap_or_else(|e| {
        panic!(
            "cannot build a client from KUBECONFIG={:?}: {e}",
            std::env::var("KUBECONFIG")
        )
    })
}

fn example<T: serde::de::DeserializeOwned + Resource>(file: &str, ns: &str) -> T {
    let text = std::fs::read_to_string(format!(
        "{}/examples/hubspot-odoo/{file}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let mut obj: T = serde_yaml::from_str(&text).unwrap();
    obj.meta_mut().namespace = Some(ns.into());
    obj
}

/// Polls `check` until it returns `Some`, or fails with `what` after the timeout.
async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_within(TIMEOUT, Duration::from_millis(500), what, check).await
}

/// [`eventually`] with its own limit and polling interval.
async fn eventually_within<T, F, Fut>(
    limit: Duration,
    every: Duration,
    what: &str,
    mut check: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for: {what}");
        }
        tokio::time::sleep(every).await;
    }
}

async fn install_crds(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in meshline::crd::all() {
        api.patch(
            &crd.name_any(),
            &PatchParams::apply("meshline-e2e").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap_or_else(|e| panic!("cannot apply CRD {}: {e}", crd.name_any()));
    }
    eventually("the CRDs to be Established", || async {
        meshline::controller::run::crds_not_established(client)
            .await
            .ok()
            .filter(|m| m.is_empty())
    })
    .await;
}

async fn secret(client: &Client, ns: &str, name: &str, keys: &[&str]) {
    let s = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        string_data: Some(
            keys.iter()
                .map(|k| (k.to_string(), "dummy".to_string()))
                .collect(),
        ),
        ..Secret::default()
    };
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &s)
        .await
        .unwrap();
}

async fn apply<K>(client: &Client, ns: &str, obj: &K)
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    Api::<K>::namespaced(client.clone(), ns)
        .patch(
            &obj.name_any(),
            &PatchParams::apply("e2e-user").force(),
            &Patch::Apply(obj),
        )
        .await
        .unwrap_or_else(|e| panic!("cannot apply {} {}: {e}", K::kind(&()), obj.name_any()));
}

/// The namespace the e2e suite names as the ingress controller's (the webhook port admits it).
const INGRESS_NAMESPACE: &str = "ingress-nginx";

/// Per-flow NetworkPolicies as a chart with `networkPolicy.perFlow.mode: "on"` configures them. The controller
/// runs outside the cluster and reads status through the API server's proxy, so the API server's addresses
/// are admitted to the operations port (`--api-server-cidr`; the whole range here, as the suite cannot know
/// the cluster's).
fn network_policies_on(ns: &str) -> FlowNetworkPolicies {
    FlowNetworkPolicies::On(build::NetworkPolicySettings {
        webhook_from_namespaces: vec![INGRESS_NAMESPACE.into()],
        controller_namespace: ns.into(),
        controller_pod_labels: [("app.kubernetes.io/name".to_string(), "meshline".to_string())]
            .into(),
        metrics_from_namespaces: vec![],
        api_server_cidrs: vec!["0.0.0.0/0".into()],
    })
}

/// Runs the controller in-process on `ns` until the handle is aborted.
fn start_controller(
    ns: &str,
    network_policies: FlowNetworkPolicies,
    worker_defaults: WorkerPodSettings,
) -> tokio::task::JoinHandle<()> {
    let settings = meshline::controller::Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        status_period: Duration::from_secs(5),
        worker_image: std::env::var("MESHLINE_E2E_WORKER_IMAGE")
            .unwrap_or_else(|_| "ghcr.io/meshline/meshline:latest".into()),
        lease_name: "meshline-e2e".into(),
        lease_namespace: ns.into(),
        identity: "e2e".into(),
        namespace: Some(ns.into()),
        status_via_proxy: true,
        no_leader_election: true,
        network_policies,
        worker_defaults,
        poll: meshline::controller::poll::PollSettings::default(),
        // A flow whose workers never answer gets its outage ticket after three polls, not five minutes.
        outage: meshline::controller::flow::outage::OutageSettings {
            after: Duration::ZERO,
            ..Default::default()
        },
        ops_page: None,
    };
    tokio::spawn(async move {
        if let Err(e) = meshline::controller::run(settings).await {
            panic!("controller stopped: {e}");
        }
    })
}

/// The example roster's ticket sinks' Secrets, which the controller mounts into the flow's workers too.
async fn ticket_sink_secrets(client: &Client, ns: &str) {
    secret(client, ns, "github-token", &["token"]).await;
    secret(client, ns, "alert-webhook-signing", &["signingSecret"]).await;
}

/// Applies the hubspot-odoo example (roster, contract, flow) with dummy Secrets.
async fn apply_example(client: &Client, ns: &str) {
    secret(client, ns, "hubspot-app", &["clientSecret", "accessToken"]).await;
    secret(client, ns, "odoo-api-key", &["login", "apiKey"]).await;
    ticket_sink_secrets(client, ns).await;
    apply(client, ns, &example::<OwnershipRoster>("roster.yaml", ns)).await;
    apply(client, ns, &example::<SyncContract>("contract.yaml", ns)).await;
    apply(client, ns, &example::<SyncFlow>("flow.yaml", ns)).await;
}

/// Creates a namespace, starts the controller on it, runs `body`, and always deletes the namespace.
async fn with_namespace<F, Fut>(test: &str, body: F)
where
    F: FnOnce(Client, String) -> Fut,
    Fut: Future<Output = ()>,
{
    in_namespace(test, Some(WorkerPodSettings::default()), body).await
}

/// [`with_namespace`], with the controller started with `--worker-defaults` `worker_defaults`.
async fn with_namespace_and<F, Fut>(test: &str, worker_defaults: WorkerPodSettings, body: F)
where
    F: FnOnce(Client, String) -> Fut,
    Fut: Future<Output = ()>,
{
    in_namespace(test, Some(worker_defaults), body).await
}

/// [`with_namespace`]; the controller is started with `worker_defaults` when given, and `None` leaves starting
/// controllers to `body`.
async fn in_namespace<F, Fut>(test: &str, controller: Option<WorkerPodSettings>, body: F)
where
    F: FnOnce(Client, String) -> Fut,
    Fut: Future<Output = ()>,
{
    let client = client().await;
    install_crds(&client).await;
    let ns = format!(
        "meshline-e2e-{test}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..6]
    );
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(ns.clone()),
                    ..ObjectMeta::default()
                },
                ..Namespace::default()
            },
        )
        .await
        .unwrap();
    let controller =
        controller.map(|defaults| start_controller(&ns, network_policies_on(&ns), defaults));
    let outcome = AssertUnwindSafe(body(client.clone(), ns.clone()))
        .catch_unwind()
        .await;
    if let Some(c) = controller {
        c.abort();
    }
    let _ = namespaces.delete(&ns, &DeleteParams::background()).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// Every ConfigMap the controller made has a name the API server's rule allows (it did accept them; this
/// names the rule if a future name breaks it in a way a lenient server would let through).
async fn assert_valid_config_map_names(cms: &Api<ConfigMap>) {
    let ours = cms
        .list(&ListParams::default().labels("app.kubernetes.io/managed-by=meshline-controller"))
        .await
        .unwrap();
    assert!(!ours.items.is_empty());
    for cm in ours {
        let name = cm.name_any();
        if let Err(reason) = NameRule::Subdomain.check(&name) {
            panic!("ConfigMap {name}: {reason}");
        }
    }
}

/// The example's Secrets, roster and contract in `ns`, and its flow (returned, not applied) on the ledger of
/// [`unreachable_ledger`]: the set-up of every test whose workers must run but never answer with numbers.
async fn example_on_unreachable_ledger(client: &Client, ns: &str) -> SyncFlow {
    secret(client, ns, "hubspot-app", &["clientSecret", "accessToken"]).await;
    secret(client, ns, "odoo-api-key", &["login", "apiKey"]).await;
    ticket_sink_secrets(client, ns).await;
    unreachable_ledger(client, ns).await;
    apply(client, ns, &example::<OwnershipRoster>("roster.yaml", ns)).await;
    apply(client, ns, &example::<SyncContract>("contract.yaml", ns)).await;
    let mut flow = example::<SyncFlow>("flow.yaml", ns);
    flow.spec.ledger = serde_json::from_value(serde_json::json!({
        "type": "postgres", "credentialsSecretRef": {"name": "ledger-db"}
    }))
    .unwrap();
    flow
}

/// The Secret `ledger-db` with a PostgreSQL URL nobody serves: the flow's workers start and report the ledger
/// unavailable (or, without a pullable image, nothing listens), while everything the controller does goes on.
async fn unreachable_ledger(client: &Client, ns: &str) {
    let ledger = Secret {
        metadata: ObjectMeta {
            name: Some("ledger-db".into()),
            ..ObjectMeta::default()
        },
        string_data: Some(
            [(
                "url".to_string(),
                "postgres://meshline:dummy@ledger-db.invalid:5432/meshline".to_string(),
            )]
            .into(),
        ),
        ..Secret::default()
    };
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &ledger)
        .await
        .unwrap();
}

/// Whether `meta` is controlled by the object with `uid` (a SyncFlow, the Job of a preflight, the canary's
/// Deployment: a uid names one object, whatever its kind).
fn owned_by(meta: &ObjectMeta, uid: &str) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == uid && o.controller == Some(true) && o.block_owner_deletion == Some(true))
}

/// The chart's worker PodMonitor (charts/meshline/templates/podmonitor.yaml) finds the pods of a Deployment the
/// controller really made: its selector's labels are on the pod template and its port is a named port of the
/// worker container. The template is read as text (its selector and port are literal, not templated).
fn assert_pod_monitor_scrapes(deployment: &Deployment) {
    let template = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/charts/meshline/templates/podmonitor.yaml"
    ))
    .unwrap();
    let mut lines = template.lines().skip_while(|l| l.trim() != "matchLabels:");
    let indent = |l: &str| l.len() - l.trim_start().len();
    let first = lines.nth(1).expect("the PodMonitor has matchLabels");
    let selector: Vec<(String, String)> = std::iter::once(first)
        .chain(lines.take_while(|l| indent(l) == indent(first)))
        .map(|l| {
            let (k, v) = l.trim().split_once(": ").expect("key: value");
            (k.to_string(), v.to_string())
        })
        .collect();
    let port = template
        .lines()
        .find_map(|l| l.trim().strip_prefix("- port: "))
        .expect("the PodMonitor names a port");
    let pod = deployment.spec.as_ref().unwrap().template.clone();
    let labels = pod.metadata.unwrap().labels.unwrap_or_default();
    for (k, v) in &selector {
        assert_eq!(
            labels.get(k),
            Some(v),
            "worker pod label {k} (PodMonitor selector)"
        );
    }
    let ports: Vec<String> = pod
        .spec
        .unwrap()
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| p.name.clone())
        .collect();
    assert!(
        ports.iter().any(|p| p == port),
        "the PodMonitor scrapes port {port}; the worker's named ports are {ports:?}"
    );
}

#[tokio::test]
#[ignore = "needs a cluster: KUBECONFIG=~/.kube/config cargo test --test e2e -- --ignored --test-threads=1"]
async fn flow_lifecycle_creates_pauses_and_cleans_up() {
    with_namespace("lifecycle", |client, ns| async move {
        secret(
            &client,
            &ns,
            "hubspot-app",
            &["clientSecret", "accessToken"],
        )
        .await;
        secret(&client, &ns, "odoo-api-key", &["login", "apiKey"]).await;
        ticket_sink_secrets(&client, &ns).await;
        apply(
            &client,
            &ns,
            &example::<OwnershipRoster>("roster.yaml", &ns),
        )
        .await;
        apply(&client, &ns, &example::<SyncContract>("contract.yaml", &ns)).await;
        apply(&client, &ns, &example::<SyncFlow>("flow.yaml", &ns)).await;
        let flows: Api<SyncFlow> = Api::namespaced(client.clone(), &ns);
        let flow = flows.get(FLOW).await.unwrap();
        let uid = flow.uid().unwrap();
        let worker = format!("meshline-{FLOW}");
        assert_eq!(
            worker,
            build::worker_name(FLOW),
            "a short flow name is kept"
        );

        // The children exist, owned by the flow.
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let services: Api<Service> = Api::namespaced(client.clone(), &ns);
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
        let cm = eventually("the ConfigMap", || async {
            cms.get_opt(&worker).await.ok().flatten()
        })
        .await;
        assert!(owned_by(&cm.metadata, &uid));
        let rendered: meshline::worker::RenderedFlow =
            serde_yaml::from_str(&cm.data.unwrap()["flow.yaml"]).unwrap();
        assert_eq!(rendered.contract.spec.version, "2.0.1");
        // The worker checks HubSpot's signature against the URL configured in HubSpot, not what the Ingress
        // forwards: the rendered flow carries it.
        assert_eq!(
            rendered.flow.spec.source.public_url.as_deref(),
            Some("https://hooks.commerce.example/meshline/won-deals-to-odoo/webhook")
        );
        let d = eventually("the Deployment", || async {
            deployments.get_opt(&worker).await.ok().flatten()
        })
        .await;
        assert!(owned_by(&d.metadata, &uid));
        assert_eq!(d.spec.as_ref().unwrap().replicas, Some(1));
        assert_pod_monitor_scrapes(&d);
        let s = eventually("the Service", || async {
            services.get_opt(&worker).await.ok().flatten()
        })
        .await;
        assert!(owned_by(&s.metadata, &uid));
        // The status Service the controller polls through reaches pods that are not ready.
        let status_service = eventually("the status Service", || async {
            services
                .get_opt(&build::status_service_name(FLOW))
                .await
                .ok()
                .flatten()
        })
        .await;
        assert!(owned_by(&status_service.metadata, &uid));
        let spec = status_service.spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
        // Split ports: the Service an Ingress points at carries the webhook port only, the status Service the
        // operations port only, and the pods listen on both.
        let port_names = |svc: &Service| -> Vec<(String, i32)> {
            svc.spec
                .as_ref()
                .and_then(|s| s.ports.clone())
                .unwrap_or_default()
                .into_iter()
                .map(|p| (p.name.unwrap_or_default(), p.port))
                .collect()
        };
        assert_eq!(
            port_names(&s),
            vec![(build::WEBHOOK_PORT_NAME.to_string(), build::WEBHOOK_PORT)]
        );
        let status_ports = spec.ports.clone().unwrap_or_default();
        assert_eq!(status_ports.len(), 1, "{status_ports:?}");
        assert_eq!(status_ports[0].name.as_deref(), Some(build::OPS_PORT_NAME));
        assert_eq!(status_ports[0].port, build::OPS_PORT);
        let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let container = &pod.containers[0];
        let container_ports: Vec<(String, i32)> = container
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.clone().unwrap_or_default(), p.container_port))
            .collect();
        assert_eq!(
            container_ports,
            vec![
                (build::WEBHOOK_PORT_NAME.to_string(), build::WEBHOOK_PORT),
                (build::OPS_PORT_NAME.to_string(), build::OPS_PORT)
            ]
        );
        let args = container.args.clone().unwrap_or_default();
        assert!(
            args.windows(2)
                .any(|w| w[0] == "--ops-listen" && w[1] == format!("0.0.0.0:{}", build::OPS_PORT)),
            "{args:?}"
        );

        // The flow's NetworkPolicy, as the API server accepted it: the worker pods, the webhook port from the
        // ingress namespace, the operations port from the controller and the API server.
        let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), &ns);
        let policy = eventually("the NetworkPolicy", || async {
            policies
                .get_opt(&build::network_policy_name(FLOW))
                .await
                .ok()
                .flatten()
        })
        .await;
        assert!(owned_by(&policy.metadata, &uid));
        let policy_spec = policy.spec.unwrap();
        assert_eq!(
            policy_spec
                .pod_selector
                .as_ref()
                .and_then(|p| p.match_labels.clone()),
            d.spec.as_ref().unwrap().selector.match_labels,
            "the policy selects the flow's worker pods"
        );
        assert_eq!(policy_spec.policy_types, Some(vec!["Ingress".to_string()]));
        let rules = policy_spec.ingress.unwrap_or_default();
        let port_of = |r: &k8s_openapi::api::networking::v1::NetworkPolicyIngressRule| {
            r.ports.clone().unwrap_or_default()[0].port.clone()
        };
        use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
        let webhook_rule = rules
            .iter()
            .find(|r| port_of(r) == Some(IntOrString::String(build::WEBHOOK_PORT_NAME.into())))
            .expect("a rule for the webhook port (the example's source is a webhook)");
        assert!(
            serde_json::to_string(webhook_rule)
                .unwrap()
                .contains(INGRESS_NAMESPACE),
            "{webhook_rule:?}"
        );
        let ops_rule = rules
            .iter()
            .find(|r| port_of(r) == Some(IntOrString::String(build::OPS_PORT_NAME.into())))
            .expect("a rule for the operations port");
        let ops_from = ops_rule.from.clone().unwrap_or_default();
        assert!(
            ops_from
                .iter()
                .any(|p| p.pod_selector.is_some() && p.namespace_selector.is_some()),
            "the controller's pods in the controller's namespace: {ops_from:?}"
        );
        assert!(
            ops_from.iter().any(|p| p.ip_block.is_some()),
            "status via the proxy needs the API server admitted: {ops_from:?}"
        );
        let ledger = format!("meshline-{FLOW}-ledger");
        let pvc = eventually("the ledger PVC", || async {
            pvcs.get_opt(&ledger).await.ok().flatten()
        })
        .await;
        // Retained by default: no owner reference, so garbage collection never reaches it.
        assert_eq!(pvc.metadata.owner_references, None, "{:?}", pvc.metadata);
        let ledger_uid = pvc.uid().unwrap();

        // Conditions, with the generation they were computed from.
        let status = eventually("the flow's conditions", || async {
            let f = flows.get(FLOW).await.ok()?;
            let s = f.status?;
            (s.observed_generation == f.metadata.generation
                && [
                    "ContractResolved",
                    "OwnerAssigned",
                    "SecretsReady",
                    "Ready",
                    "Degraded",
                    "Progressing",
                    "DiskPressure",
                    "StatusUnavailable",
                ]
                .iter()
                .all(|t| {
                    s.conditions
                        .iter()
                        .any(|c| c.r#type == *t && c.observed_generation == f.metadata.generation)
                }))
            .then_some(s)
        })
        .await;
        for t in ["ContractResolved", "OwnerAssigned", "SecretsReady"] {
            let c = status.conditions.iter().find(|c| c.r#type == t).unwrap();
            assert_eq!(c.status, "True", "{t}: {c:?}");
        }

        // The contract's status.
        let contracts: Api<SyncContract> = Api::namespaced(client.clone(), &ns);
        let cs = eventually("the contract status", || async {
            contracts
                .get("deal-to-sale-order")
                .await
                .ok()?
                .status
                .filter(|s| s.current_version.is_some())
        })
        .await;
        assert_eq!(cs.current_version.as_deref(), Some("2.0.1"));
        assert_eq!(cs.revisions.len(), 1);
        assert_eq!(cs.revisions[0].state, meshline::api::RevisionState::Active);
        assert!(
            cs.conditions
                .iter()
                .any(|c| c.r#type == "Ready" && c.status == "True")
        );
        // The active revision is kept in a ControllerRevision the API server accepted, under the name the
        // reconciler looks it up by, and the flow runs it.
        let revision = meshline::controller::contract::revision_name(
            "deal-to-sale-order",
            &cs.revisions[0].content_hash,
        );
        assert_eq!(cs.active_revision.as_deref(), Some(revision.as_str()));
        assert!(!revision.contains(':'), "{revision}");
        let revisions: Api<k8s_openapi::api::apps::v1::ControllerRevision> =
            Api::namespaced(client.clone(), &ns);
        let kept = revisions
            .get(&revision)
            .await
            .unwrap_or_else(|e| panic!("the ControllerRevision {revision} is missing: {e}"));
        assert!(
            kept.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.kind == "SyncContract" && o.controller == Some(true))
        );
        assert_eq!(status.contract_revision.as_deref(), Some(revision.as_str()));
        assert_valid_config_map_names(&cms).await;

        // The roster's status.
        let rosters: Api<OwnershipRoster> = Api::namespaced(client.clone(), &ns);
        eventually("the roster status", || async {
            rosters
                .get("commerce-owners")
                .await
                .ok()?
                .status
                .filter(|s| s.covered_flows == vec![FLOW.to_string()])
        })
        .await;
        // Tickets (issue #16): the worker's ledger reports them on /status, the controller copies them into
        // the flow's status and adds them up on the roster, whose TicketSinksReady condition the real API
        // server accepts with the rest of the status.
        let tickets = eventually("the flow's ticket summary", || async {
            flows.get(FLOW).await.ok()?.status?.tickets
        })
        .await;
        assert_eq!((tickets.open, tickets.acknowledged), (0, 0), "{tickets:?}");
        let roster_status = eventually("the roster's tickets", || async {
            rosters
                .get("commerce-owners")
                .await
                .ok()?
                .status
                .filter(|s| s.tickets.is_some())
        })
        .await;
        let sinks = roster_status
            .conditions
            .iter()
            .find(|c| c.r#type == "TicketSinksReady")
            .expect("TicketSinksReady");
        assert_eq!(
            sinks.status, "True",
            "no ticket was due, so no sink failed: {sinks:?}"
        );

        // Pausing scales to zero and keeps the ledger.
        flows
            .patch(
                FLOW,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"paused": true}})),
            )
            .await
            .unwrap();
        eventually("the Deployment to scale to 0", || async {
            deployments
                .get(&worker)
                .await
                .ok()?
                .spec?
                .replicas
                .filter(|r| *r == 0)
        })
        .await;
        assert!(
            pvcs.get_opt(&ledger).await.unwrap().is_some(),
            "the ledger survives a pause"
        );

        // Deleting the flow removes what it owns (garbage collection through the owner references).
        flows
            .delete(FLOW, &DeleteParams::foreground())
            .await
            .unwrap();
        eventually(
            "the Deployment, Service, ConfigMap and NetworkPolicy to be deleted",
            || async {
                let gone = deployments.get_opt(&worker).await.ok()?.is_none()
                    && services.get_opt(&worker).await.ok()?.is_none()
                    && cms.get_opt(&worker).await.ok()?.is_none()
                    && policies
                        .get_opt(&build::network_policy_name(FLOW))
                        .await
                        .ok()?
                        .is_none();
                gone.then_some(())
            },
        )
        .await;
        // The retained ledger outlives the flow, untouched.
        let kept = pvcs
            .get_opt(&ledger)
            .await
            .unwrap()
            .expect("a retained ledger survives the deletion of its flow");
        assert_eq!(kept.metadata.deletion_timestamp, None);
        assert_eq!(kept.metadata.owner_references, None);
        assert_eq!(kept.uid().as_deref(), Some(ledger_uid.as_str()));
        eventually("the flow to be gone", || async {
            flows.get_opt(FLOW).await.ok()?.is_none().then_some(())
        })
        .await;

        // The flow applied again (a new object, a new uid) reuses the same PVC, and with it the same volume.
        apply(&client, &ns, &example::<SyncFlow>("flow.yaml", &ns)).await;
        let again = flows.get(FLOW).await.unwrap().uid().unwrap();
        assert_ne!(again, uid);
        let d = eventually("the re-created flow's Deployment", || async {
            deployments
                .get_opt(&worker)
                .await
                .ok()
                .flatten()
                .filter(|d| owned_by(&d.metadata, &again))
        })
        .await;
        let claim = d
            .spec
            .unwrap()
            .template
            .spec
            .unwrap()
            .volumes
            .unwrap()
            .into_iter()
            .find_map(|v| v.persistent_volume_claim)
            .map(|c| c.claim_name);
        assert_eq!(claim.as_deref(), Some(ledger.as_str()));
        let reused = pvcs.get(&ledger).await.unwrap();
        assert_eq!(
            reused.uid(),
            kept.uid(),
            "the same PVC object, not a new one under the same name"
        );
        assert_eq!(
            reused.spec.and_then(|s| s.volume_name),
            kept.spec.and_then(|s| s.volume_name),
            "bound to the same volume, with its data"
        );
        assert_eq!(reused.metadata.owner_references, None);
    })
    .await;
}

/// Under `retentionPolicy: Delete` the flow owns its ledger; switching the policy moves the owner reference on
/// the live PVC, and deleting the flow then deletes the ledger with it.
#[tokio::test]
#[ignore = "needs a cluster: KUBECONFIG=~/.kube/config cargo test --test e2e -- --ignored --test-threads=1"]
async fn ledger_under_the_delete_policy_goes_with_its_flow() {
    with_namespace("ledgerdelete", |client, ns| async move {
        secret(
            &client,
            &ns,
            "hubspot-app",
            &["clientSecret", "accessToken"],
        )
        .await;
        secret(&client, &ns, "odoo-api-key", &["login", "apiKey"]).await;
        ticket_sink_secrets(&client, &ns).await;
        apply(
            &client,
            &ns,
            &example::<OwnershipRoster>("roster.yaml", &ns),
        )
        .await;
        apply(&client, &ns, &example::<SyncContract>("contract.yaml", &ns)).await;
        let mut flow = example::<SyncFlow>("flow.yaml", &ns);
        flow.spec.ledger.retention_policy = LedgerRetentionPolicy::Delete;
        apply(&client, &ns, &flow).await;
        let flows: Api<SyncFlow> = Api::namespaced(client.clone(), &ns);
        let uid = flows.get(FLOW).await.unwrap().uid().unwrap();
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
        let ledger = build::ledger_name(FLOW);
        eventually("the ledger PVC owned by the flow", || async {
            pvcs.get_opt(&ledger)
                .await
                .ok()
                .flatten()
                .filter(|p| owned_by(&p.metadata, &uid))
        })
        .await;

        let set_policy = |policy: &'static str| {
            let flows = flows.clone();
            async move {
                flows
                    .patch(
                        FLOW,
                        &PatchParams::default(),
                        &Patch::Merge(
                            serde_json::json!({"spec": {"ledger": {"retentionPolicy": policy}}}),
                        ),
                    )
                    .await
                    .unwrap();
            }
        };
        set_policy("Retain").await;
        eventually("the owner reference to be released", || async {
            pvcs.get_opt(&ledger).await.ok().flatten().filter(|p| {
                p.metadata
                    .owner_references
                    .as_deref()
                    .unwrap_or_default()
                    .is_empty()
            })
        })
        .await;
        set_policy("Delete").await;
        eventually("the owner reference to be back", || async {
            pvcs.get_opt(&ledger)
                .await
                .ok()
                .flatten()
                .filter(|p| owned_by(&p.metadata, &uid))
        })
        .await;

        flows
            .delete(FLOW, &DeleteParams::foreground())
            .await
            .unwrap();
        eventually("the ledger PVC to be deleted or terminating", || async {
            match pvcs.get_opt(&ledger).await.ok()? {
                None => Some(()),
                Some(p) => p.metadata.deletion_timestamp.map(|_| ()),
            }
        })
        .await;
    })
    .await;
}

/// The controller's `--worker-defaults` and a flow's `spec.worker` reach the worker pods the real API server
/// creates: ServiceAccount (without an API token), pull Secret, node selector, tolerations, affinity, priority
/// class, labels and annotations, with the flow's own values winning.
#[tokio::test]
#[ignore = "needs a cluster: KUBECONFIG=~/.kube/config cargo test --test e2e -- --ignored --test-threads=1"]
async fn worker_pod_settings_and_platform_defaults_reach_the_pods() {
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..6];
    let priority_class = format!("meshline-e2e-{suffix}");
    let defaults = meshline::cli::controller::parse_worker_defaults(
        &serde_json::json!({
            "serviceAccountName": "sync-workers",
            "imagePullSecrets": [{"name": "regcred"}],
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [{"key": "example.com/dedicated", "operator": "Equal", "value": "sync", "effect": "NoSchedule"}],
            "priorityClassName": priority_class,
            "podAnnotations": {"example.com/cost-center": "finance"},
            "podLabels": {"team": "platform", "tier": "integration"}
        })
        .to_string(),
    )
    .unwrap();
    let client = client().await;
    let classes: Api<PriorityClass> = Api::all(client.clone());
    classes
        .create(
            &PostParams::default(),
            &PriorityClass {
                metadata: ObjectMeta {
                    name: Some(priority_class.clone()),
                    ..ObjectMeta::default()
                },
                value: 1000,
                ..PriorityClass::default()
            },
        )
        .await
        .unwrap();
    let outcome = AssertUnwindSafe(with_namespace_and("podsettings", defaults, |client, ns| {
        let priority_class = priority_class.clone();
        async move {
            secret(
                &client,
                &ns,
                "hubspot-app",
                &["clientSecret", "accessToken"],
            )
            .await;
            secret(&client, &ns, "odoo-api-key", &["login", "apiKey"]).await;
            ticket_sink_secrets(&client, &ns).await;
            secret(&client, &ns, "regcred", &["unused"]).await;
            Api::<ServiceAccount>::namespaced(client.clone(), &ns)
                .create(
                    &PostParams::default(),
                    &ServiceAccount {
                        metadata: ObjectMeta {
                            name: Some("sync-workers".into()),
                            ..ObjectMeta::default()
                        },
                        ..ServiceAccount::default()
                    },
                )
                .await
                .unwrap();
            apply(
                &client,
                &ns,
                &example::<OwnershipRoster>("roster.yaml", &ns),
            )
            .await;
            apply(&client, &ns, &example::<SyncContract>("contract.yaml", &ns)).await;
            let mut flow = example::<SyncFlow>("flow.yaml", &ns);
            flow.spec.worker = Some(
                serde_json::from_value(serde_json::json!({
                    "podLabels": {"team": "revops"},
                    "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                        {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                         "labelSelector": {"matchLabels": {"sync.meshline.io/flow": FLOW}}}}]}}
                }))
                .unwrap(),
            );
            apply(&client, &ns, &flow).await;

            // The ReplicaSet's pods exist whether or not the image can be pulled.
            let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
            let pod = eventually("a worker pod", || async {
                pods.list(&ListParams::default().labels(&format!("sync.meshline.io/flow={FLOW}")))
                    .await
                    .ok()?
                    .items
                    .into_iter()
                    .next()
            })
            .await;
            let labels = pod.metadata.labels.clone().unwrap();
            assert_eq!(labels["team"], "revops", "the flow's label wins");
            assert_eq!(labels["tier"], "integration", "the default label is merged in");
            assert_eq!(labels["app.kubernetes.io/component"], "worker");
            let annotations = pod.metadata.annotations.clone().unwrap();
            assert_eq!(annotations["example.com/cost-center"], "finance");
            let spec = pod.spec.unwrap();
            assert_eq!(spec.service_account_name.as_deref(), Some("sync-workers"));
            assert_eq!(spec.automount_service_account_token, Some(false));
            assert!(
                !spec
                    .volumes
                    .iter()
                    .flatten()
                    .any(|v| v.name.starts_with("kube-api-access")),
                "no API token is projected into a worker"
            );
            assert_eq!(spec.image_pull_secrets.unwrap()[0].name, "regcred");
            assert_eq!(spec.node_selector.unwrap()["kubernetes.io/os"], "linux");
            assert!(
                spec.tolerations
                    .iter()
                    .flatten()
                    .any(|t| t.key.as_deref() == Some("example.com/dedicated")
                        && t.value.as_deref() == Some("sync"))
            );
            assert_eq!(spec.priority_class_name.as_deref(), Some(priority_class.as_str()));
            assert_eq!(spec.priority, Some(1000), "the API server resolved the class");
            assert_eq!(
                spec.affinity.unwrap().pod_anti_affinity.unwrap()
                    .preferred_during_scheduling_ignored_during_execution.unwrap()[0]
                    .pod_affinity_term
                    .topology_key,
                "kubernetes.io/hostname"
            );
        }
    }))
    .catch_unwind()
    .await;
    let _ = classes
        .delete(&priority_class, &DeleteParams::background())
        .await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

#[tokio::test]
#[ignore = "needs a cluster: KUBECONFIG=~/.kube/config cargo test --test e2e -- --ignored --test-threads=1"]
async fn flow_with_a_missing_secret_gets_a_condition_and_no_deployment() {
    with_namespace("badsecret", |client, ns| async move {
        secret(
            &client,
            &ns,
            "hubspot-app",
            &["clientSecret", "accessToken"],
        )
        .await;
        apply(
            &client,
            &ns,
            &example::<OwnershipRoster>("roster.yaml", &ns),
        )
        .await;
        apply(&client, &ns, &example::<SyncContract>("contract.yaml", &ns)).await;
        apply(&client, &ns, &example::<SyncFlow>("flow.yaml", &ns)).await;
        let flows: Api<SyncFlow> = Api::namespaced(client.clone(), &ns);
        let c = eventually("SecretsReady=False", || async {
            let s = flows.get(FLOW).await.ok()?.status?;
            s.conditions
                .into_iter()
                .find(|c| c.r#type == "SecretsReady" && c.status == "False")
        })
        .await;
        assert_eq!(c.reason, "SecretNotFound");
        assert!(c.message.contains("odoo-api-key"), "{c:?}");
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        assert!(
            deployments
                .get_opt(&format!("meshline-{FLOW}"))
                .await
                .unwrap()
                .is_none()
        );
        // Creating the Secret (with its keys) starts the flow: the Secret watch re-reconciles it.
        secret(&client, &ns, "odoo-api-key", &["login", "apiKey"]).await;
        ticket_sink_secrets(&client, &ns).await;
        eventually("the Deployment after the Secret appeared", || async {
            deployments
                .get_opt(&format!("meshline-{FLOW}"))
                .await
                .ok()
                .flatten()
        })
        .await;
    })
    .await;
}

#[tokio::test]
#[ignore = "needs a cluster: KUBECONFIG=~/.kube/config cargo test --test e2e -- --ignored --test-threads=1"]
async fn flow_without_owner_does_not_start_until_a_roster_covers_it() {
    with_namespace("noowner", |client, ns| async move {
        secret(
            &client,
            &ns,
            "hubspot-app",
            &["clientSecret", "accessToken"],
        )
        .await;
        secret(&client, &ns, "odoo-api-key", &["login", "apiKey"]).await;
        ticket_sink_secrets(&client, &ns).await;
        apply(&client, &ns, &example::<SyncContract>("contract.yaml", &ns)).await;
        apply(&client, &ns, &example::<SyncFlow>("flow.yaml", &ns)).await;
        let flows: Api<SyncFlow> = Api::namespaced(client.clone(), &ns);
        eventually("OwnerAssigned=False", || async {
            let s = flows.get(FLOW).await.ok()?.status?;
            s.conditions.into_iter().find(|c| {
                c.r#type == "OwnerAssigned" && c.status == "False" && c.reason == "NoSyncOwner"
            })
        })
        .await;
        apply(
            &client,
            &ns,
            &example::<OwnershipRoster>("roster.yaml", &ns),
        )
        .await;
        eventually("OwnerAssigned=True after the roster", || async {
            let s = flows.get(FLOW).await.ok()?.status?;
            s.conditions
                .into_iter()
                .find(|c| c.r#type == "OwnerAssigned" && c.status == "True")
        })
        .await;
    })
    .await;
}

/// Names a real API server refuses were the controller's failure on a cluster: a dotted flow name (a valid
/// SyncFlow name, not a valid Service name) and a contract name near the 253-character limit must still give
/// children and revisions the server accepts, and both statuses must be written.
#[tokio::test]
#[ignore = "needs a cluster: KUBECONFIG=~/.kube/config cargo test --test e2e -- --ignored --test-threads=1"]
async fn dotted_and_long_names_give_children_the_api_server_accepts() {
    with_namespace("names", |client, ns| async move {
        secret(
            &client,
            &ns,
            "hubspot-app",
            &["clientSecret", "accessToken"],
        )
        .await;
        secret(&client, &ns, "odoo-api-key", &["login", "apiKey"]).await;
        ticket_sink_secrets(&client, &ns).await;
        apply(
            &client,
            &ns,
            &example::<OwnershipRoster>("roster.yaml", &ns),
        )
        .await;
        let long_contract = format!("deal.to.sale-order-{}", "x".repeat(200));
        let mut contract = example::<SyncContract>("contract.yaml", &ns);
        contract.metadata.name = Some(long_contract.clone());
        apply(&client, &ns, &contract).await;
        let dotted = "won.deals.to.odoo";
        let mut flow = example::<SyncFlow>("flow.yaml", &ns);
        flow.metadata.name = Some(dotted.into());
        flow.spec.contract.name = long_contract.clone();
        apply(&client, &ns, &flow).await;

        let contracts: Api<SyncContract> = Api::namespaced(client.clone(), &ns);
        let cs = eventually("the long-named contract's status", || async {
            contracts
                .get(&long_contract)
                .await
                .ok()?
                .status
                .filter(|s| s.current_version.is_some())
        })
        .await;
        let revision = meshline::controller::contract::revision_name(
            &long_contract,
            &cs.revisions[0].content_hash,
        );
        assert!(revision.len() <= 253, "{revision}");
        let revisions: Api<k8s_openapi::api::apps::v1::ControllerRevision> =
            Api::namespaced(client.clone(), &ns);
        revisions.get(&revision).await.unwrap();

        let services: Api<Service> = Api::namespaced(client.clone(), &ns);
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let worker = build::worker_name(dotted);
        assert!(!worker.contains('.'), "{worker}");
        eventually("the dotted flow's Service", || async {
            services.get_opt(&worker).await.ok().flatten()
        })
        .await;
        eventually("the dotted flow's status Service", || async {
            services
                .get_opt(&build::status_service_name(dotted))
                .await
                .ok()
                .flatten()
        })
        .await;
        eventually("the dotted flow's Deployment", || async {
            deployments.get_opt(&worker).await.ok().flatten()
        })
        .await;
        let flows: Api<SyncFlow> = Api::namespaced(client.clone(), &ns);
        eventually("the dotted flow's conditions", || async {
            let s = flows.get(dotted).await.ok()?.status?;
            s.conditions
                .into_iter()
                .find(|c| c.r#type == "ContractResolved" && c.status == "True")
        })
        .await;
        assert_valid_config_map_names(&Api::namespaced(client.clone(), &ns)).await;
    })
    .await;
}

/// The API server refuses a `publicUrl` that is not an https URL, and one on a source whose signature does not
/// cover the URL, with the field and the reason; the flow as first applied stays.
#[tokio::test]
#[ignore = "needs a cluster: KUBECONFIG=~/.kube/config cargo test --test e2e -- --ignored --test-threads=1"]
async fn public_url_is_refused_unless_it_is_an_https_url_hubspot_signs() {
    with_namespace("public-url", |client, ns| async move {
        let flows: Api<SyncFlow> = Api::namespaced(client.clone(), &ns);
        let refused = |flow: SyncFlow| {
            let flows = flows.clone();
            async move {
                flows
                    .patch(
                        FLOW,
                        &PatchParams::apply("e2e-user").force(),
                        &Patch::Apply(&flow),
                    )
                    .await
                    .expect_err("the API server refuses it")
                    .to_string()
            }
        };
        let mut plain = example::<SyncFlow>("flow.yaml", &ns);
        plain.spec.source.public_url = Some("http://hooks.commerce.example/webhook".into());
        let err = refused(plain).await;
        assert!(err.contains("publicUrl"), "{err}");

        let mut unsigned = example::<SyncFlow>("flow.yaml", &ns);
        unsigned.spec.source.signature = Some(meshline::api::WebhookSignature::HmacSha256);
        let err = refused(unsigned).await;
        assert!(
            err.contains("publicUrl is what the hubspot-v3 signature covers"),
            "{err}"
        );

        apply(&client, &ns, &example::<SyncFlow>("flow.yaml", &ns)).await;
        let stored = flows.get(FLOW).await.unwrap();
        assert_eq!(
            stored.spec.source.public_url.as_deref(),
            Some("https://hooks.commerce.example/meshline/won-deals-to-odoo/webhook")
        );
    })
    .await;
}

#[tokio::test]
#[ignore = "needs a cluster: KUBECONFIG=~/.kube/config cargo test --test e2e -- --ignored --test-threads=1"]
async fn two_replicas_are_read_pod_by_pod_into_the_flow_status() {
    with_namespace("replicas", |client, ns| async move {
        // A ledger nobody serves: with a pullable image each worker answers 503 LedgerUnavailable; without
        // one, the pods get an IP but nothing listens. Either way each pod is published and must be read.
        let mut flow = example_on_unreachable_ledger(&client, &ns).await;
        flow.spec.replicas = Some(2);
        apply(&client, &ns, &flow).await;

        let flows: Api<SyncFlow> = Api::namespaced(client.clone(), &ns);
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let worker = build::worker_name(FLOW);
        let d = eventually("the Deployment with 2 replicas", || async {
            deployments
                .get_opt(&worker)
                .await
                .ok()
                .flatten()
                .filter(|d| d.spec.as_ref().and_then(|s| s.replicas) == Some(2))
        })
        .await;
        let selector = d
            .spec
            .unwrap()
            .selector
            .match_labels
            .unwrap_or_default()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");

        // The status lists both pods, by the names the pods have, each read on its own.
        let status = eventually("both worker pods in status.workers", || async {
            let mut names: Vec<String> = pods
                .list(&ListParams::default().labels(&selector))
                .await
                .ok()?
                .items
                .into_iter()
                .filter(|p| {
                    p.metadata.deletion_timestamp.is_none()
                        && p.status.as_ref().is_some_and(|s| s.pod_ip.is_some())
                })
                .map(|p| p.name_any())
                .collect();
            names.sort();
            let s = flows.get(FLOW).await.ok()?.status?;
            let mut listed: Vec<String> = s.workers.iter().map(|w| w.pod.clone()).collect();
            listed.sort();
            (names.len() == 2 && listed == names).then_some(s)
        })
        .await;
        assert_eq!(status.workers_omitted, None);
        for w in &status.workers {
            // Not ready: the ledger is unreachable (or nothing runs); still read, and reported as such.
            assert!(!w.ready, "{w:?}");
            assert!(
                matches!(w.state.as_str(), "Unreachable" | "NotStarted"),
                "{w:?}"
            );
            if w.state == "NotStarted" {
                assert!(w.problems.iter().any(|p| p == "LedgerUnavailable"), "{w:?}");
            }
        }
        let condition = |t: &str| {
            status
                .conditions
                .iter()
                .find(|c| c.r#type == t)
                .unwrap_or_else(|| panic!("no {t} in {:?}", status.conditions))
                .clone()
        };
        let unavailable = condition("StatusUnavailable");
        if status.workers.iter().all(|w| w.state == "Unreachable") {
            // Nothing answers: the condition names both pods, with the proxy's error.
            assert_eq!(unavailable.status, "True", "{unavailable:?}");
            assert_eq!(unavailable.reason, "WorkerUnreachable");
            for w in &status.workers {
                assert!(unavailable.message.contains(&w.pod), "{unavailable:?}");
            }
        }
        if status.workers.iter().all(|w| w.state == "NotStarted") {
            // Both workers answered that they cannot start: no pod can work, and the message names both.
            assert_eq!(unavailable.status, "False", "{unavailable:?}");
            let ready = condition("Ready");
            assert_eq!(ready.status, "False");
            assert_eq!(ready.reason, "LedgerUnavailable");
            assert!(ready.message.starts_with("pods "), "{ready:?}");
            assert_eq!(condition("Degraded").reason, "LedgerUnavailable");
        }
    })
    .await;
}

#[tokio::test]
#[ignore = "needs a cluster: KUBECONFIG=~/.kube/config cargo test --test e2e -- --ignored --test-threads=1"]
async fn a_flow_whose_worker_cannot_start_gets_its_outage_ticket_in_its_status() {
    with_namespace("outage", |client, ns| async move {
        // A ledger nobody serves: the worker answers 503 (or nothing listens without a pullable image), so no
        // pod answers with its numbers and there is no worker to report through.
        let flow = example_on_unreachable_ledger(&client, &ns).await;
        apply(&client, &ns, &flow).await;

        let flows: Api<SyncFlow> = Api::namespaced(client.clone(), &ns);
        // The example routes FlowLevel causes to the platform owner's webhook, whose host (`.example`) never
        // resolves: the ticket opens, its delivery fails, and the status says so.
        let outage = eventually(
            "an open outage ticket whose webhook delivery failed",
            || async {
                let f = flows.get(FLOW).await.ok()?;
                let o = f.status?.outage?;
                let t = o.ticket.as_ref()?;
                let d = t.deliveries.iter().find(|d| d.sink == "sre-webhook")?;
                (t.state == "open" && d.last_error.is_some()).then_some(o)
            },
        )
        .await;
        let t = outage.ticket.unwrap();
        assert_eq!(t.owner, "sre");
        assert!(outage.silent_since.is_some());
        let d = &t.deliveries[0];
        assert!(d.attempts >= 1 && d.delivered_version.is_none(), "{d:?}");
        // A send that may have left stays in doubt, so a later success uses the same idempotency key.
        assert_eq!(d.in_doubt_version, Some(t.version), "{d:?}");
    })
    .await;
}

#[tokio::test]
#[ignore = "needs a cluster: KUBECONFIG=~/.kube/config cargo test --test e2e -- --ignored --test-threads=1"]
async fn network_policies_follow_the_switch() {
    in_namespace("netpol", None, |client, ns| async move {
        apply_example(&client, &ns).await;
        let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), &ns);
        let name = build::network_policy_name(FLOW);
        let on = start_controller(&ns, network_policies_on(&ns), WorkerPodSettings::default());
        eventually("the NetworkPolicy while the switch is on", || async {
            policies.get_opt(&name).await.ok().flatten()
        })
        .await;
        on.abort();
        let _ = on.await;
        // Switched to clean-up (what a chart upgrade to `mode: clean-up` does): the orphan goes.
        let cleaner = start_controller(
            &ns,
            FlowNetworkPolicies::CleanUp,
            WorkerPodSettings::default(),
        );
        eventually(
            "the clean-up controller to delete the NetworkPolicy",
            || async {
                match policies.get_opt(&name).await.ok()? {
                    None => Some(()),
                    Some(p) => p.metadata.deletion_timestamp.map(|_| ()),
                }
            },
        )
        .await;
        // The rest of the flow stays.
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        assert!(
            deployments
                .get_opt(&build::worker_name(FLOW))
                .await
                .unwrap()
                .is_some()
        );
        cleaner.abort();
    })
    .await;
}

/// Who the suite talks to the cluster as (`kubectl auth whoami`).
async fn current_user(client: &Client) -> String {
    let review = Api::<SelfSubjectReview>::all(client.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .unwrap_or_else(|e| {
            panic!("cannot ask the API server who we are (SelfSubjectReview): {e}")
        });
    review
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .expect("the SelfSubjectReview names the current user")
}

/// Installs the chart's sign-off policy and binding (`signOffPolicy.enabled: true`, rendered by the chart tests
/// into `tests/data/sign-off-policy.yaml`) under `name`, bound to namespace `ns` only so that the rest of the
/// cluster is not affected. Returns the policy as the API server stored it.
async fn install_sign_off_policy(
    client: &Client,
    ns: &str,
    name: &str,
) -> ValidatingAdmissionPolicy {
    let path = format!(
        "{}/tests/data/sign-off-policy.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut docs = serde_yaml::Deserializer::from_str(&text);
    let mut policy = ValidatingAdmissionPolicy::deserialize(docs.next().expect("the policy"))
        .unwrap_or_else(|e| {
            panic!("{path}: the first document is not a ValidatingAdmissionPolicy: {e}")
        });
    let mut binding =
        ValidatingAdmissionPolicyBinding::deserialize(docs.next().expect("the binding"))
            .unwrap_or_else(|e| panic!("{path}: the second document is not a binding: {e}"));
    policy.metadata.name = Some(name.into());
    binding.metadata.name = Some(name.into());
    let spec = binding.spec.as_mut().expect("the binding has a spec");
    spec.policy_name = Some(name.into());
    spec.match_resources = Some(MatchResources {
        namespace_selector: Some(LabelSelector {
            match_labels: Some(
                [("kubernetes.io/metadata.name".to_string(), ns.to_string())].into(),
            ),
            ..LabelSelector::default()
        }),
        ..MatchResources::default()
    });
    let stored = Api::<ValidatingAdmissionPolicy>::all(client.clone())
        .create(&PostParams::default(), &policy)
        .await
        .unwrap_or_else(|e| {
            panic!("the API server refused the chart's ValidatingAdmissionPolicy: {e}")
        });
    Api::<ValidatingAdmissionPolicyBinding>::all(client.clone())
        .create(&PostParams::default(), &binding)
        .await
        .unwrap_or_else(|e| {
            panic!("the API server refused the chart's ValidatingAdmissionPolicyBinding: {e}")
        });
    stored
}

/// A merge patch that sets the contract's sign-offs (the whole list) to these owners, each signing `version`.
fn sign_offs_patch(version: &str, owners: &[(&str, &str)]) -> serde_json::Value {
    let sign_offs: Vec<serde_json::Value> = owners
        .iter()
        .map(|(owner, role)| serde_json::json!({"owner": owner, "role": role, "version": version}))
        .collect();
    serde_json::json!({"spec": {"signOffs": sign_offs}})
}

/// The chart's sign-off policy on a real API server: it type-checks against the CRDs, the binding finds the
/// namespace's roster, a sign-off the current user adds for an owner with another `kubernetesUser` is refused
/// with a message naming both, and one for the owner whose `kubernetesUser` is the current user is accepted.
#[tokio::test]
#[ignore = "needs a cluster: KUBECONFIG=~/.kube/config cargo test --test e2e -- --ignored --test-threads=1"]
async fn sign_off_policy_lets_only_the_owner_add_a_sign_off() {
    in_namespace("signoff", None, |client, ns| async move {
        let me = current_user(&client).await;
        let mut roster = example::<OwnershipRoster>("roster.yaml", &ns);
        for owner in &mut roster.spec.owners {
            match owner.id.as_str() {
                "lena" => owner.kubernetes_user = Some("someone-else@e2e.meshline.invalid".into()),
                "tomas" => owner.kubernetes_user = Some(me.clone()),
                _ => {}
            }
        }
        apply(&client, &ns, &roster).await;
        // The example's sign-offs would be added by us at creation: the contract starts without any.
        let mut contract = example::<SyncContract>("contract.yaml", &ns);
        contract.spec.sign_offs.clear();
        apply(&client, &ns, &contract).await;
        let version = contract.spec.version.clone();
        let contract_name = contract.name_any();
        let contracts: Api<SyncContract> = Api::namespaced(client.clone(), &ns);

        // Cluster-scoped: removed again whatever happens below.
        let name = format!("{ns}-sign-offs");
        let outcome = AssertUnwindSafe(async {
            let policy = install_sign_off_policy(&client, &ns, &name).await;
            let policies: Api<ValidatingAdmissionPolicy> = Api::all(client.clone());
            let generation = policy.metadata.generation;
            let checked = eventually("the API server to type-check the policy", || async {
                let status = policies.get(&name).await.ok()?.status?;
                (status.observed_generation == generation).then_some(status)
            })
            .await;
            let warnings: Vec<String> = checked
                .type_checking
                .and_then(|t| t.expression_warnings)
                .unwrap_or_default()
                .into_iter()
                .map(|w| format!("{}: {}", w.field_ref, w.warning))
                .collect();
            assert!(
                warnings.is_empty(),
                "the policy's CEL does not type-check against the CRDs:\n{}",
                warnings.join("\n")
            );

            // A policy takes effect a moment after it is created: wait on a dry run being refused.
            let forged = sign_offs_patch(&version, &[("lena", "sourceOwner")]);
            let refusal = |params: PatchParams| {
                let contracts = contracts.clone();
                let forged = forged.clone();
                let contract_name = contract_name.clone();
                async move {
                    match contracts
                        .patch(&contract_name, &params, &Patch::Merge(&forged))
                        .await
                    {
                        Err(kube::Error::Api(status)) => Some(*status),
                        _ => None,
                    }
                }
            };
            // The API server prefixes the refusal with the policy's name: a refusal for any other reason (the
            // CRD's own validation, say) does not end the wait.
            eventually("the policy to refuse a forged sign-off (dry run)", || {
                let refused = refusal(PatchParams {
                    dry_run: true,
                    ..PatchParams::default()
                });
                let name = name.clone();
                async move {
                    refused
                        .await
                        .filter(|status| status.message.contains(&name))
                }
            })
            .await;
            let status = refusal(PatchParams::default())
                .await
                .expect("a sign-off for lena added by someone else is refused");
            assert!(
                status.message.contains("\"lena\"")
                    && status.message.contains(&format!("\"{me}\"")),
                "the refusal names the owner and the user: {status:?}"
            );
            assert!(status.message.contains(&roster.name_any()), "{status:?}");

            // Our own sign-off (tomas' kubernetesUser is us) goes through, and lena's stays out.
            let own = sign_offs_patch(&version, &[("tomas", "sinkOwner")]);
            contracts
                .patch(&contract_name, &PatchParams::default(), &Patch::Merge(&own))
                .await
                .unwrap_or_else(|e| panic!("our own sign-off was refused: {e}"));
            let stored =
                serde_json::to_value(contracts.get(&contract_name).await.unwrap()).unwrap();
            let owners: Vec<&str> = stored["spec"]["signOffs"]
                .as_array()
                .map(|a| a.iter().filter_map(|s| s["owner"].as_str()).collect())
                .unwrap_or_default();
            assert_eq!(owners, ["tomas"]);

            // Keeping our sign-off while someone else's is added is still refused; removing ours is not checked.
            let both =
                sign_offs_patch(&version, &[("tomas", "sinkOwner"), ("lena", "sourceOwner")]);
            assert!(
                contracts
                    .patch(
                        &contract_name,
                        &PatchParams::default(),
                        &Patch::Merge(&both)
                    )
                    .await
                    .is_err()
            );
            contracts
                .patch(
                    &contract_name,
                    &PatchParams::default(),
                    &Patch::Merge(&sign_offs_patch(&version, &[])),
                )
                .await
                .unwrap_or_else(|e| panic!("removing a sign-off was refused: {e}"));
        })
        .catch_unwind()
        .await;
        let _ = Api::<ValidatingAdmissionPolicyBinding>::all(client.clone())
            .delete(&name, &DeleteParams::default())
            .await;
        let _ = Api::<ValidatingAdmissionPolicy>::all(client.clone())
            .delete(&name, &DeleteParams::default())
            .await;
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    })
    .await;
}

/// A contract change on a real API server (issue #14): a new version waits for its owners' sign-offs, then a
/// preflight replay Job is created with the right spec and its candidate ConfigMap, and the flow keeps running
/// its active revision throughout (the workers' ConfigMap holds the active version).
#[tokio::test]
#[ignore = "needs a cluster: KUBECONFIG=~/.kube/config cargo test --test e2e -- --ignored --test-threads=1"]
async fn a_contract_change_waits_for_sign_offs_then_runs_a_preflight_job_and_the_flow_keeps_its_revision()
 {
    with_namespace("change", |client, ns| async move {
        apply_example(&client, &ns).await;
        let contracts: Api<SyncContract> = Api::namespaced(client.clone(), &ns);
        let flows: Api<SyncFlow> = Api::namespaced(client.clone(), &ns);
        let first = eventually("the first version active", || async {
            contracts
                .get("deal-to-sale-order")
                .await
                .ok()?
                .status?
                .active_revision
        })
        .await;
        eventually("the flow on the first revision", || async {
            let s = flows.get(FLOW).await.ok()?.status?;
            (s.contract_revision.as_deref() == Some(first.as_str())).then_some(())
        })
        .await;
        let workers_version = || async {
            let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
            let cm = cms.get(&build::worker_name(FLOW)).await.ok()?;
            let rendered: serde_json::Value =
                serde_yaml::from_str(cm.data?.get(build::CONFIG_KEY)?).ok()?;
            rendered["contract"]["spec"]["version"]
                .as_str()
                .map(str::to_string)
        };
        assert_eq!(workers_version().await.as_deref(), Some("2.0.1"));

        // A compatible patch version without sign-offs: Pending, waiting for lena and tomas.
        let mut next = example::<SyncContract>("contract.yaml", &ns);
        next.spec.version = "2.0.2".into();
        next.spec.sign_offs.clear();
        apply(&client, &ns, &next).await;
        let waiting = eventually("AwaitingSignOff", || async {
            let s = contracts.get("deal-to-sale-order").await.ok()?.status?;
            s.conditions
                .into_iter()
                .find(|c| c.r#type == "SignedOff" && c.reason == "AwaitingSignOff")
        })
        .await;
        assert!(waiting.message.contains("lena") && waiting.message.contains("tomas"));
        let jobs: Api<k8s_openapi::api::batch::v1::Job> = Api::namespaced(client.clone(), &ns);
        assert!(
            jobs.list(&ListParams::default())
                .await
                .unwrap()
                .items
                .is_empty()
        );
        assert_eq!(workers_version().await.as_deref(), Some("2.0.1"));
        eventually("the flow says why it waits", || async {
            let s = flows.get(FLOW).await.ok()?.status?;
            s.conditions.into_iter().find(|c| {
                c.r#type == "ContractUpToDate"
                    && c.status == "False"
                    && c.reason == "AwaitingSignOff"
            })
        })
        .await;

        // Both owners sign: a preflight Job per bound flow, with the candidate in a ConfigMap it owns.
        let hash = meshline::contract::content_hash(&next.spec)
            .as_str()
            .to_string();
        for owner in ["lena", "tomas"] {
            next.spec.sign_offs.push(meshline::api::SignOff {
                owner: owner.into(),
                version: "2.0.2".into(),
                content_hash: Some(hash.clone()),
                role: None,
                approved_at: None,
            });
        }
        apply(&client, &ns, &next).await;
        let name = meshline::controller::contract::build::job_name(FLOW, &hash);
        let job = eventually("the preflight Job", || async {
            jobs.get_opt(&name).await.ok().flatten()
        })
        .await;
        let spec = job.spec.clone().unwrap();
        assert_eq!(spec.backoff_limit, Some(0));
        assert!(
            spec.active_deadline_seconds.is_some() && spec.ttl_seconds_after_finished.is_some()
        );
        let pod = spec.template.spec.unwrap();
        let args = pod.containers[0].args.clone().unwrap();
        assert_eq!(args[0], "replay");
        assert!(
            args.iter().any(|a| a == "--from-worker"),
            "an embedded ledger is read through the worker: {args:?}"
        );
        assert!(
            !pod.volumes
                .unwrap_or_default()
                .iter()
                .any(|v| v.persistent_volume_claim.is_some()),
            "the Job never mounts the worker's ledger volume"
        );
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
        let candidate = eventually("the candidate ConfigMap", || async {
            cms.get_opt(&name).await.ok().flatten()
        })
        .await;
        assert!(owned_by(
            &candidate.metadata,
            job.metadata.uid.as_deref().unwrap()
        ));
        let s = contracts
            .get("deal-to-sale-order")
            .await
            .unwrap()
            .status
            .unwrap();
        assert_eq!(s.active_revision.as_deref(), Some(first.as_str()));
        assert_eq!(
            workers_version().await.as_deref(),
            Some("2.0.1"),
            "the flow keeps its active revision while preflight runs"
        );
        let f = flows.get(FLOW).await.unwrap().status.unwrap();
        assert_eq!(f.contract_revision.as_deref(), Some(first.as_str()));
    })
    .await;
}

#[tokio::test]
#[ignore = "needs a cluster: KUBECONFIG=~/.kube/config cargo test --test e2e -- --ignored --test-threads=1"]
async fn a_candidate_canary_runs_beside_the_stable_track_and_an_abort_removes_it() {
    with_namespace("canary", |client, ns| async move {
        // Canaries need a ledger both tracks share. Nothing serves this one: the workers never become ready,
        // which the rollout must survive (its steps wait for every worker to apply a weight).
        let mut flow = example_on_unreachable_ledger(&client, &ns).await;
        flow.spec.replicas = Some(2);
        flow.spec.rollout = Some(
            serde_json::from_value(serde_json::json!({
                "canary": {"steps": [{"weight": 10}, {"weight": 50}],
                           "analysis": {"maxFailureRate": "0.05", "minRecords": 10, "interval": "1m"}}
            }))
            .unwrap(),
        );
        apply(&client, &ns, &flow).await;

        let contracts: Api<SyncContract> = Api::namespaced(client.clone(), &ns);
        let flows: Api<SyncFlow> = Api::namespaced(client.clone(), &ns);
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
        let first = eventually("the first version active", || async {
            contracts
                .get("deal-to-sale-order")
                .await
                .ok()?
                .status?
                .active_revision
        })
        .await;

        // A signed compatible change. Its preflight replay needs a ledger the cluster can reach, which this
        // test does not run: the replay's verdict is written into the status as the Job's report would be.
        let mut next = example::<SyncContract>("contract.yaml", &ns);
        next.spec.version = "2.0.2".into();
        next.spec.sign_offs.clear();
        let hash = meshline::contract::content_hash(&next.spec)
            .as_str()
            .to_string();
        for owner in ["lena", "tomas"] {
            next.spec.sign_offs.push(meshline::api::SignOff {
                owner: owner.into(),
                version: "2.0.2".into(),
                content_hash: Some(hash.clone()),
                role: None,
                approved_at: None,
            });
        }
        apply(&client, &ns, &next).await;
        let candidate = meshline::controller::contract::build::revision_name("deal-to-sale-order", &hash);
        let jobs: Api<k8s_openapi::api::batch::v1::Job> = Api::namespaced(client.clone(), &ns);
        let job = meshline::controller::contract::build::job_name(FLOW, &hash);
        eventually("the preflight Job", || async { jobs.get_opt(&job).await.ok().flatten() }).await;
        eventually("the candidate in its canary", || async {
            let c = contracts.get("deal-to-sale-order").await.ok()?;
            let status = c.status.clone()?;
            let entry = status.revisions.iter().find(|r| r.content_hash == hash)?;
            if entry.state == meshline::api::RevisionState::Canary {
                return Some(());
            }
            let mut preflight = status.preflight.clone();
            for p in preflight.iter_mut().filter(|p| p.revision == candidate) {
                p.phase = "Passed".into();
                p.records = 500;
                p.message = Some("500 records replayed (recorded by the e2e test)".into());
            }
            let _ = contracts
                .patch_status(
                    "deal-to-sale-order",
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({"status": {"preflight": preflight}})),
                )
                .await;
            None
        })
        .await;

        // Two Deployments: stable on the active revision, the canary on the candidate, each on its track.
        let canary_name = build::canary_name(FLOW);
        let canary = eventually("the canary Deployment", || async {
            deployments.get_opt(&canary_name).await.ok().flatten()
        })
        .await;
        let args = |d: &Deployment| {
            d.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0]
                .args
                .clone()
                .unwrap()
                .join(" ")
        };
        assert!(args(&canary).contains("--track canary"), "{}", args(&canary));
        assert_eq!(
            canary.spec.as_ref().unwrap().replicas,
            Some(1),
            "10 % of 2 replicas, at least one"
        );
        let labels = canary.spec.as_ref().unwrap().selector.match_labels.clone().unwrap();
        assert_eq!(labels["app.kubernetes.io/component"], "worker-canary");
        let stable = deployments.get(&build::worker_name(FLOW)).await.unwrap();
        assert!(args(&stable).contains("--track stable"), "{}", args(&stable));
        // The split both tracks follow: the canary takes the buckets below 10.
        let split = eventually("the split at 10 %", || async {
            let cm = cms.get_opt(&build::rollout_name(FLOW)).await.ok().flatten()?;
            let split: serde_json::Value =
                serde_json::from_str(cm.data?.get("split.json")?).ok()?;
            (split["weight"] == 10).then_some(split)
        })
        .await;
        assert_eq!(split["canaryRevision"], candidate.as_str());
        let canary_uid = canary.metadata.uid.clone().unwrap();
        let canary_cm = eventually("the canary's ConfigMap", || async {
            cms.get_opt(&canary_name).await.ok().flatten()
        })
        .await;
        assert!(owned_by(&canary_cm.metadata, &canary_uid));
        let rendered: serde_json::Value =
            serde_yaml::from_str(&canary_cm.data.unwrap()[build::CONFIG_KEY]).unwrap();
        assert_eq!(rendered["contract"]["spec"]["version"], "2.0.2");
        let stable_cm = cms.get(&build::worker_name(FLOW)).await.unwrap();
        let rendered: serde_json::Value =
            serde_yaml::from_str(&stable_cm.data.unwrap()[build::CONFIG_KEY]).unwrap();
        assert_eq!(rendered["contract"]["spec"]["version"], "2.0.1");
        assert_eq!(rendered["revision"], first.as_str());
        let services: Api<Service> = Api::namespaced(client.clone(), &ns);
        let svc = eventually("the canary's status Service", || async {
            services
                .get_opt(&build::canary_status_service_name(FLOW))
                .await
                .ok()
                .flatten()
        })
        .await;
        assert!(owned_by(&svc.metadata, &canary_uid));
        let f = eventually("the flow's canary status", || async {
            flows.get(FLOW).await.ok()?.status?.canary
        })
        .await;
        assert_eq!((f.phase.as_str(), f.step, f.weight), ("Progressing", 0, 10));

        // A person aborts with the annotation kubectl and GitOps both handle.
        flows
            .patch(
                FLOW,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"metadata": {"annotations": {
                    "sync.meshline.io/rollout-command": "abort:e2e-1"
                }}})),
            )
            .await
            .unwrap();
        let aborted = eventually("the canary aborted", || async {
            let c = flows.get(FLOW).await.ok()?.status?.canary?;
            (c.phase == "Aborted").then_some(c)
        })
        .await;
        assert_eq!(aborted.reason.as_deref(), Some("AbortedByUser"));
        assert_eq!(aborted.last_command.as_deref(), Some("abort:e2e-1"));
        eventually("the canary Deployment gone", || async {
            deployments
                .get_opt(&canary_name)
                .await
                .ok()?
                .is_none()
                .then_some(())
        })
        .await;
        eventually("its ConfigMap gone by garbage collection", || async {
            cms.get_opt(&canary_name).await.ok()?.is_none().then_some(())
        })
        .await;
        let split = cms.get(&build::rollout_name(FLOW)).await.unwrap();
        let split: serde_json::Value =
            serde_json::from_str(&split.data.unwrap()["split.json"]).unwrap();
        assert_eq!(split, serde_json::json!({"weight": 0}), "every bucket back to stable");
        let rejected = eventually("the candidate rejected by its canary", || async {
            let s = contracts.get("deal-to-sale-order").await.ok()?.status?;
            s.revisions
                .into_iter()
                .find(|r| r.content_hash == hash && r.state == meshline::api::RevisionState::Rejected)
        })
        .await;
        assert_eq!(rejected.reason.as_deref(), Some("CanaryAborted"));
        let s = contracts.get("deal-to-sale-order").await.unwrap().status.unwrap();
        assert_eq!(s.active_revision.as_deref(), Some(first.as_str()));
    })
    .await;
}

/// The reconciliation audit (issue #17): one CronJob per flow on its roster's schedule, owned by the flow,
/// holding only the flow's token; suspended with the flow or the roster; gone (with the roster saying why)
/// while the roster's time zone is one the API server cannot load. A Job made from it as `kubectl create job
/// --from=cronjob/...` does is accepted by the real API server (pod failure policy and all). With a pullable
/// worker image (`MESHLINE_E2E_WORKER_IMAGE`), that Job asks the running worker to audit the example's
/// unreachable HubSpot and Odoo: the result is partial (never "reconciled"), in `status.audit` with an
/// `AuditPartial` Event.
#[tokio::test]
#[ignore = "needs a cluster: KUBECONFIG=~/.kube/config cargo test --test e2e -- --ignored --test-threads=1"]
async fn the_audit_runs_as_a_cron_job_on_the_roster_schedule_and_a_partial_result_reaches_the_status()
 {
    use k8s_openapi::api::batch::v1::{CronJob, Job};
    with_namespace("audit", |client, ns| async move {
        secret(
            &client,
            &ns,
            "hubspot-app",
            &["clientSecret", "accessToken"],
        )
        .await;
        secret(&client, &ns, "odoo-api-key", &["login", "apiKey"]).await;
        ticket_sink_secrets(&client, &ns).await;
        let mut roster = example::<OwnershipRoster>("roster.yaml", &ns);
        roster.spec.audit = Some(meshline::api::AuditSchedule {
            schedule: Some("15 3 * * 1-5".into()),
            time_zone: Some("Europe/Berlin".into()),
            window: Some("72h".parse().unwrap()),
            suspend: false,
        });
        apply(&client, &ns, &roster).await;
        apply(&client, &ns, &example::<SyncContract>("contract.yaml", &ns)).await;
        apply(&client, &ns, &example::<SyncFlow>("flow.yaml", &ns)).await;

        let flows: Api<SyncFlow> = Api::namespaced(client.clone(), &ns);
        let rosters: Api<OwnershipRoster> = Api::namespaced(client.clone(), &ns);
        let crons: Api<CronJob> = Api::namespaced(client.clone(), &ns);
        let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
        let name = meshline::controller::flow::audit::cron_job_name(FLOW);
        let cron = eventually("the flow's audit CronJob", || async {
            crons.get_opt(&name).await.ok().flatten()
        })
        .await;
        let flow = flows.get(FLOW).await.unwrap();
        assert!(
            owned_by(&cron.metadata, flow.uid().as_deref().unwrap()),
            "the flow owns its CronJob: {:?}",
            cron.metadata.owner_references
        );
        let spec = cron.spec.clone().unwrap();
        assert_eq!(spec.schedule, "15 3 * * 1-5");
        assert_eq!(spec.time_zone.as_deref(), Some("Europe/Berlin"));
        assert_eq!(spec.suspend, Some(false));
        assert_eq!(spec.concurrency_policy.as_deref(), Some("Forbid"));
        let job_spec = spec.job_template.spec.clone().unwrap();
        assert!(job_spec.pod_failure_policy.is_some());
        let pod = job_spec.template.spec.clone().unwrap();
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        let secrets: Vec<String> = pod
            .volumes
            .iter()
            .flatten()
            .filter_map(|v| v.secret.as_ref().and_then(|s| s.secret_name.clone()))
            .collect();
        assert_eq!(
            secrets,
            vec![format!("meshline-{FLOW}-token")],
            "the audit pod holds the flow's token and no credential of either system"
        );
        let sc = pod.containers[0].security_context.clone().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        let accepted = eventually("the roster's AuditScheduled condition", || async {
            rosters
                .get(&roster.name_any())
                .await
                .ok()?
                .status?
                .conditions
                .into_iter()
                .find(|c| c.r#type == "AuditScheduled")
        })
        .await;
        assert_eq!(accepted.reason, "Scheduled", "{accepted:?}");

        // A Job from the CronJob's template, as `kubectl create job --from=cronjob/<name>` makes it: the real
        // API server validates its pod failure policy against its pod template.
        let from_cron = Job {
            metadata: ObjectMeta {
                name: Some(format!("{name}-manual")),
                labels: spec
                    .job_template
                    .metadata
                    .as_ref()
                    .and_then(|m| m.labels.clone()),
                annotations: Some(
                    [(
                        "cronjob.kubernetes.io/instantiate".to_string(),
                        "manual".to_string(),
                    )]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            spec: Some(job_spec.clone()),
            ..Job::default()
        };
        jobs.create(&PostParams::default(), &from_cron)
            .await
            .unwrap_or_else(|e| panic!("the API server refused a Job from the audit CronJob: {e}"));

        if std::env::var_os("MESHLINE_E2E_WORKER_IMAGE").is_some() {
            // The worker runs (its embedded ledger on a PVC); HubSpot refuses the dummy token or Odoo's
            // `.example` host never resolves: the audit cannot read a side in full.
            // An audit whose sides cannot be read retries each page before it ends partial, and its Job
            // retries the run: a longer limit than the suite's.
            let audit = eventually_within(
                Duration::from_secs(900),
                Duration::from_secs(2),
                "a partial audit in status.audit",
                || async {
                    let a = flows.get(FLOW).await.ok()?.status?.audit?;
                    a.outcome.is_some().then_some(a)
                },
            )
            .await;
            assert_eq!(
                audit.outcome,
                Some(meshline::api::AuditOutcome::Partial),
                "an unreadable side is never reconciled: {audit:?}"
            );
            assert!(audit.partial_reason.is_some(), "{audit:?}");
            let from = chrono::DateTime::parse_from_rfc3339(&audit.window_from).unwrap();
            let to = chrono::DateTime::parse_from_rfc3339(&audit.window_to).unwrap();
            assert_eq!(
                (to - from).num_hours(),
                72,
                "the roster's window: {audit:?}"
            );
            let events: Api<k8s_openapi::api::events::v1::Event> =
                Api::namespaced(client.clone(), &ns);
            eventually("the AuditPartial Event on the flow", || async {
                events
                    .list(&ListParams::default())
                    .await
                    .ok()?
                    .items
                    .into_iter()
                    .find(|e| {
                        e.reason.as_deref() == Some("AuditPartial")
                            && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(FLOW)
                    })
            })
            .await;
        }

        // Pausing the flow suspends its audit: no worker to ask.
        flows
            .patch(
                FLOW,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"paused": true}})),
            )
            .await
            .unwrap();
        eventually("the CronJob suspended with the flow", || async {
            let c = crons.get(&name).await.ok()?;
            (c.spec?.suspend == Some(true)).then_some(())
        })
        .await;
        flows
            .patch(
                FLOW,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"paused": false}})),
            )
            .await
            .unwrap();
        eventually("the CronJob resumed with the flow", || async {
            let c = crons.get(&name).await.ok()?;
            (c.spec?.suspend == Some(false)).then_some(())
        })
        .await;

        // A time zone the API server cannot load: no CronJob rather than a refused write, and the roster says
        // which field; fixed, the CronJob comes back.
        let mut bad = roster.clone();
        bad.spec.audit.as_mut().unwrap().time_zone = Some("Europe/Berln".into());
        apply(&client, &ns, &bad).await;
        let refused = eventually("the roster's InvalidSchedule condition", || async {
            rosters
                .get(&roster.name_any())
                .await
                .ok()?
                .status?
                .conditions
                .into_iter()
                .find(|c| c.r#type == "AuditScheduled" && c.reason == "InvalidSchedule")
        })
        .await;
        assert!(
            refused.message.contains("spec.audit.timeZone"),
            "{refused:?}"
        );
        eventually("the CronJob gone while the schedule is invalid", || async {
            crons.get_opt(&name).await.ok()?.is_none().then_some(())
        })
        .await;
        apply(&client, &ns, &roster).await;
        eventually("the CronJob back", || async {
            crons.get_opt(&name).await.ok().flatten()
        })
        .await;
    })
    .await;
}
