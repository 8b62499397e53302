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

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, PersistentVolumeClaim, Secret, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use meshline::api::{OwnershipRoster, SyncContract, SyncFlow};
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

/// Creates a namespace, starts the controller on it, runs `body`, and always deletes the namespace.
async fn with_namespace<F, Fut>(test: &str, body: F)
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
    let settings = meshline::controller::Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        status_period: Duration::from_secs(5),
        worker_image: std::env::var("MESHLINE_E2E_WORKER_IMAGE")
            .unwrap_or_else(|_| "ghcr.io/meshline/meshline:latest".into()),
        lease_name: "meshline-e2e".into(),
        lease_namespace: ns.clone(),
        identity: "e2e".into(),
        namespace: Some(ns.clone()),
        status_via_proxy: true,
        no_leader_election: true,
    };
    let controller = tokio::spawn(async move {
        if let Err(e) = meshline::controller::run(settings).await {
            panic!("controller stopped: {e}");
        }
    });
    let outcome = AssertUnwindSafe(body(client.clone(), ns.clone()))
        .catch_unwind()
        .await;
    controller.abort();
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
            "the Deployment, Service and ConfigMap to be deleted",
            || async {
                let gone = deployments.get_opt(&worker).await.ok()?.is_none()
                    && services.get_opt(&worker).await.ok()?.is_none()
                    && cms.get_opt(&worker).await.ok()?.is_none();
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
