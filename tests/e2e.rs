//! End-to-end suite against a real cluster (the one `KUBECONFIG` names). Every test is ignored by default; run
//! them with:
//!
//! ```sh
//! KUBECONFIG=~/.kube/config cargo test --test e2e -- --ignored --test-threads=1
//! ```
//!
//! Each test applies the CRDs (server-side), creates its own namespace, runs the controller in-process with the
//! current kubeconfig (no image needed; worker status is read through the API server's service proxy, as a
//! controller outside the cluster must), applies the hubspot-odoo example with dummy Secrets, asserts what the
//! controller made, and deletes the namespace at the end, also when an assertion fails. The worker pods need
//! not become ready (their image may not be pullable in a test cluster); set `MESHLINE_E2E_WORKER_IMAGE` to an
//! image that exists to see them run.
//!
//! The controller runs with per-flow NetworkPolicies on (`--flow-network-policies on`): the lifecycle test
//! checks the worker's split ports (webhook Service, operations-only status Service, probes) and the policy the
//! API server accepted; `network_policies_follow_the_switch` restarts the controller with `clean-up` and
//! waits for the policy to go.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, PersistentVolumeClaim, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use meshline::api::{OwnershipRoster, SyncContract, SyncFlow};
use meshline::controller::FlowNetworkPolicies;
use meshline::controller::flow::build;
use meshline::controller::names::NameRule;

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
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {TIMEOUT:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
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
    };
    tokio::spawn(async move {
        if let Err(e) = meshline::controller::run(settings).await {
            panic!("controller stopped: {e}");
        }
    })
}

/// Applies the hubspot-odoo example (roster, contract, flow) with dummy Secrets.
async fn apply_example(client: &Client, ns: &str) {
    secret(client, ns, "hubspot-app", &["clientSecret", "accessToken"]).await;
    secret(client, ns, "odoo-api-key", &["login", "apiKey"]).await;
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
    in_namespace(test, true, body).await
}

/// [`with_namespace`]; `controller: false` leaves starting controllers to `body`.
async fn in_namespace<F, Fut>(test: &str, controller: bool, body: F)
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
    let controller = controller.then(|| start_controller(&ns, network_policies_on(&ns)));
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

fn owned_by(meta: &ObjectMeta, uid: &str) -> bool {
    meta.owner_references.iter().flatten().any(|o| {
        o.kind == "SyncFlow"
            && o.uid == uid
            && o.controller == Some(true)
            && o.block_owner_deletion == Some(true)
    })
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
        let d = eventually("the Deployment", || async {
            deployments.get_opt(&worker).await.ok().flatten()
        })
        .await;
        assert!(owned_by(&d.metadata, &uid));
        assert_eq!(d.spec.as_ref().unwrap().replicas, Some(1));
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
        assert!(owned_by(&pvc.metadata, &uid));

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
        assert_eq!(cs.version_history.len(), 1);
        assert!(
            cs.conditions
                .iter()
                .any(|c| c.r#type == "Accepted" && c.status == "True")
        );
        // The accepted revision is kept in a ConfigMap the API server accepted, under the name the reconciler
        // looks it up by.
        let revision = meshline::controller::contract::revision_name(
            "deal-to-sale-order",
            &cs.version_history[0].content_hash,
        );
        assert!(!revision.contains(':'), "{revision}");
        let kept = cms
            .get(&revision)
            .await
            .unwrap_or_else(|e| panic!("the revision ConfigMap {revision} is missing: {e}"));
        assert!(
            kept.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.kind == "SyncContract" && o.controller == Some(true))
        );
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
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
        let revision = meshline::controller::contract::revision_name(
            &long_contract,
            &cs.version_history[0].content_hash,
        );
        assert!(revision.len() <= 253, "{revision}");
        cms.get(&revision).await.unwrap();

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
        assert_valid_config_map_names(&cms).await;
    })
    .await;
}

#[tokio::test]
#[ignore = "needs a cluster: KUBECONFIG=~/.kube/config cargo test --test e2e -- --ignored --test-threads=1"]
async fn network_policies_follow_the_switch() {
    in_namespace("netpol", false, |client, ns| async move {
        apply_example(&client, &ns).await;
        let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), &ns);
        let name = build::network_policy_name(FLOW);
        let on = start_controller(&ns, network_policies_on(&ns));
        eventually("the NetworkPolicy while the switch is on", || async {
            policies.get_opt(&name).await.ok().flatten()
        })
        .await;
        on.abort();
        let _ = on.await;
        // Switched to clean-up (what a chart upgrade to `mode: clean-up` does): the orphan goes.
        let cleaner = start_controller(&ns, FlowNetworkPolicies::CleanUp);
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
