//! The pure steps of the controller, tested without any API: the gates, the desired objects, the status, the
//! Secret key requirements and the leader-election decision.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use meshline::api::{
    LedgerRetentionPolicy, LedgerType, OwnershipRoster, SecretRef, SyncContract, SyncFlow,
    SyncFlowStatus, WorkerPodSettings, WorkerSpec,
};
use meshline::controller::flow::build::{self, BuildInputs, BuildSettings};
use meshline::controller::flow::status::{
    self, Observation, StatusInputs, carry_transition_times, differs,
};
use meshline::controller::flow::validate::{self, Inputs};
use meshline::controller::{leader, secrets};

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
    f.metadata.uid = Some("uid-1".into());
    f.metadata.generation = Some(3);
    f
}

fn good_secrets() -> BTreeMap<String, Option<BTreeSet<String>>> {
    BTreeMap::from([
        (
            "hubspot-app".into(),
            Some(["clientSecret", "accessToken"].map(String::from).into()),
        ),
        (
            "odoo-api-key".into(),
            Some(["login", "apiKey"].map(String::from).into()),
        ),
        // The roster's ticket sinks.
        ("github-token".into(), Some(["token".to_string()].into())),
        (
            "alert-webhook-signing".into(),
            Some(["signingSecret".to_string()].into()),
        ),
    ])
}

fn verdict(flow: &SyncFlow) -> validate::Verdict {
    let rosters = vec![Arc::new(load::<OwnershipRoster>("roster.yaml"))];
    validate::validate(Inputs {
        flow,
        contract: Some(Arc::new(load::<SyncContract>("contract.yaml"))),
        rosters: &rosters,
        secrets: &good_secrets(),
        compile: &validate::compile_contract,
        worker_defaults: &Default::default(),
    })
}

fn desired(flow: &SyncFlow) -> build::Desired {
    let contract: SyncContract = load("contract.yaml");
    build::build(BuildInputs {
        revision: Some("meshline-contract-test-000000000000"),
        flow,
        contract: &contract,
        roster: None,
        settings: &BuildSettings {
            worker_image: "img:1".into(),
            ..BuildSettings::default()
        },
        new_token: None,
    })
    .unwrap()
}

/// The switch on, as a chart with `networkPolicy.perFlow.mode: "on"` configures it.
fn policy_settings() -> build::NetworkPolicySettings {
    build::NetworkPolicySettings {
        webhook_from_namespaces: vec!["ingress-nginx".into()],
        controller_namespace: "meshline-system".into(),
        controller_pod_labels: BTreeMap::from([
            ("app.kubernetes.io/name".to_string(), "meshline".to_string()),
            (
                "app.kubernetes.io/instance".to_string(),
                "meshline".to_string(),
            ),
        ]),
        metrics_from_namespaces: vec!["monitoring".into()],
        api_server_cidrs: vec!["10.0.0.1/32".into()],
    }
}

fn desired_with_policies(flow: &SyncFlow) -> build::Desired {
    let contract: SyncContract = load("contract.yaml");
    build::build(BuildInputs {
        revision: Some("meshline-contract-test-000000000000"),
        flow,
        contract: &contract,
        roster: None,
        settings: &BuildSettings {
            worker_image: "img:1".into(),
            network_policy: Some(policy_settings()),
            ..BuildSettings::default()
        },
        new_token: None,
    })
    .unwrap()
}

fn ports(svc: &k8s_openapi::api::core::v1::Service) -> Vec<(String, i32, String)> {
    svc.spec
        .as_ref()
        .unwrap()
        .ports
        .iter()
        .flatten()
        .map(|p| {
            let target = match p.target_port.as_ref().unwrap() {
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => s.clone(),
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i) => i.to_string(),
            };
            (p.name.clone().unwrap_or_default(), p.port, target)
        })
        .collect()
}

#[test]
fn the_ingress_facing_service_carries_the_webhook_port_only() {
    let d = desired(&flow());
    assert_eq!(
        ports(&d.service),
        vec![("webhook".to_string(), 8080, "webhook".to_string())]
    );
    // The controller's status poll and people's `meshline dlq` reach the operations port through the
    // headless status Service, which carries nothing else.
    assert_eq!(
        ports(&d.status_service),
        vec![("ops".to_string(), 8081, "ops".to_string())]
    );
    let pod = d.deployment.spec.unwrap().template.spec.unwrap();
    let c = &pod.containers[0];
    let container_ports: Vec<(String, i32)> = c
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone().unwrap(), p.container_port))
        .collect();
    assert_eq!(
        container_ports,
        vec![("webhook".to_string(), 8080), ("ops".to_string(), 8081)]
    );
    // Both probes on the webhook port, whose readiness the Ingress' Service routes by.
    for probe in [&c.liveness_probe, &c.readiness_probe] {
        let port = probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .port
            .clone();
        assert_eq!(
            port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("webhook".into())
        );
    }
}

#[test]
fn no_network_policy_is_built_without_the_switch() {
    assert!(desired(&flow()).network_policy.is_none());
}

#[test]
fn the_network_policy_admits_the_ingress_to_webhooks_and_the_controller_to_operations() {
    let d = desired_with_policies(&flow());
    let policy = d.network_policy.expect("the switch is on");
    assert_eq!(
        policy.metadata.name.as_deref(),
        Some("meshline-won-deals-to-odoo-worker")
    );
    let owner = &policy.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("SyncFlow", Some(true))
    );
    let spec = policy.spec.unwrap();
    // The flow's worker pods of both tracks: the stable Deployment's and the canary's.
    let selector = spec.pod_selector.unwrap();
    let stable = d.deployment.spec.unwrap().selector.match_labels.unwrap();
    let matches = |labels: &std::collections::BTreeMap<String, String>| {
        selector
            .match_labels
            .iter()
            .flatten()
            .all(|(k, v)| labels.get(k) == Some(v))
            && selector.match_expressions.iter().flatten().all(|e| {
                e.operator == "In"
                    && labels
                        .get(&e.key)
                        .is_some_and(|v| e.values.iter().flatten().any(|x| x == v))
            })
    };
    assert!(matches(&stable), "{selector:?} selects {stable:?}");
    assert!(matches(&build::canary_selector("won-deals-to-odoo")));
    let mut other = stable.clone();
    other.insert("app.kubernetes.io/component".into(), "preflight".into());
    assert!(!matches(&other), "a preflight pod is not a worker");
    // Ingress only: egress goes to the flow's CRM, ERP, ledger and DNS, which the policy cannot know.
    assert_eq!(spec.policy_types, Some(vec!["Ingress".to_string()]));
    assert!(spec.egress.is_none());
    let rules = serde_json::to_value(spec.ingress.unwrap()).unwrap();
    assert_eq!(
        rules,
        serde_json::json!([
            {
                "from": [{"namespaceSelector": {"matchExpressions": [
                    {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["ingress-nginx"]}
                ]}}],
                "ports": [{"port": "webhook", "protocol": "TCP"}]
            },
            {
                "from": [
                    {
                        "namespaceSelector": {"matchExpressions": [
                            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["meshline-system"]}
                        ]},
                        "podSelector": {"matchLabels": {
                            "app.kubernetes.io/instance": "meshline",
                            "app.kubernetes.io/name": "meshline"
                        }}
                    },
                    {"podSelector": {"matchLabels": {
                        "app.kubernetes.io/component": "preflight",
                        "sync.meshline.io/flow": "won-deals-to-odoo"
                    }}},
                    {"podSelector": {"matchLabels": {
                        "app.kubernetes.io/component": "audit",
                        "sync.meshline.io/flow": "won-deals-to-odoo"
                    }}},
                    {"namespaceSelector": {"matchExpressions": [
                        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["monitoring"]}
                    ]}},
                    {"ipBlock": {"cidr": "10.0.0.1/32"}}
                ],
                "ports": [{"port": "ops", "protocol": "TCP"}]
            }
        ])
    );
}

#[test]
fn the_proxy_poll_sends_the_token_in_the_header_the_worker_reads() {
    // The API server's service proxy keeps `Authorization` for itself; both sides must name the same header.
    assert_eq!(
        meshline::controller::poll::PROXY_TOKEN_HEADER.to_ascii_lowercase(),
        meshline::worker::api::TOKEN_HEADER
    );
}

#[test]
fn a_polling_flow_keeps_its_webhook_port_closed() {
    let mut f = flow();
    f.spec.source.mode = meshline::api::SourceMode::Poll;
    let policy = desired_with_policies(&f).network_policy.unwrap();
    let rules = policy.spec.unwrap().ingress.unwrap();
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert_eq!(
        rules[0].ports.as_ref().unwrap()[0].port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("ops".into()))
    );
}

#[test]
fn example_flow_passes_every_gate() {
    let v = verdict(&flow());
    assert!(v.startable(), "{v:#?}");
    assert_eq!(
        v.roster.unwrap().metadata.name.as_deref(),
        Some("commerce-owners")
    );
}

#[test]
fn contract_lookup_not_bound_by_the_flow_stops_it() {
    let mut f = flow();
    f.spec.lookups.retain(|l| l.name != "products");
    let v = verdict(&f);
    assert_eq!(v.contract_resolved.reason(), "LookupNotBound");
    assert!(v.contract_resolved.message().contains("products"));
}

#[test]
fn invalid_version_range_is_named() {
    let mut f = flow();
    f.spec.contract.version = "not a range".into();
    assert_eq!(
        verdict(&f).contract_resolved.reason(),
        "InvalidVersionRange"
    );
}

#[test]
fn worker_runs_non_root_read_only_with_probes_and_mounted_secrets() {
    let d = desired(&flow()).deployment;
    let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(pod.automount_service_account_token, Some(false));
    let psc = pod.security_context.as_ref().unwrap();
    assert_eq!(psc.run_as_user, Some(65532));
    assert_eq!(
        psc.seccomp_profile.as_ref().unwrap().type_,
        "RuntimeDefault"
    );
    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some("img:1"));
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop.as_deref(),
        Some(&["ALL".to_string()][..])
    );
    assert_eq!(
        c.liveness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/healthz")
    );
    assert_eq!(
        c.readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/readyz")
    );
    let mounts: BTreeMap<&str, (&str, Option<bool>)> = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .map(|m| (m.mount_path.as_str(), (m.name.as_str(), m.read_only)))
        .collect();
    assert_eq!(mounts["/tmp"].1, None);
    assert_eq!(mounts["/var/lib/meshline"].0, "state");
    assert_eq!(
        mounts["/var/run/meshline/secrets/hubspot-app"].1,
        Some(true)
    );
    assert_eq!(
        mounts["/var/run/meshline/secrets/odoo-api-key"].1,
        Some(true)
    );
    let args = c.args.as_ref().unwrap().join(" ");
    assert!(args.starts_with("worker --flow /etc/meshline/flow.yaml --listen 0.0.0.0:8080 --ops-listen 0.0.0.0:8081 --state-dir /var/lib/meshline --secrets-dir /var/run/meshline/secrets --token-file"), "{args}");
    let ledger = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "state")
        .unwrap();
    assert_eq!(
        ledger.persistent_volume_claim.as_ref().unwrap().claim_name,
        "meshline-won-deals-to-odoo-ledger"
    );
    // SQLite on a ReadWriteOnce volume: no two pods at once.
    assert_eq!(
        d.spec
            .as_ref()
            .unwrap()
            .strategy
            .as_ref()
            .unwrap()
            .type_
            .as_deref(),
        Some("Recreate")
    );
}

#[test]
fn flow_image_overrides_the_controller_default() {
    let mut f = flow();
    f.spec.worker = Some(meshline::api::WorkerSpec {
        image: Some("custom:2".into()),
        ..Default::default()
    });
    let d = desired(&f).deployment;
    assert_eq!(
        d.spec.unwrap().template.spec.unwrap().containers[0]
            .image
            .as_deref(),
        Some("custom:2")
    );
}

#[test]
fn credentials_are_never_copied_into_the_configuration() {
    let d = desired(&flow());
    let yaml = &d.config_map.data.as_ref().unwrap()["flow.yaml"];
    assert!(
        !yaml.contains("status:"),
        "status would roll pods on every status write"
    );
    assert!(!yaml.contains("resourceVersion"));
    let rendered: meshline::worker::RenderedFlow = serde_yaml::from_str(yaml).unwrap();
    assert_eq!(
        rendered.flow.spec.sink.credentials_secret_ref.name,
        "odoo-api-key"
    );
    assert!(
        d.token_secret.is_none(),
        "an existing token is never rewritten"
    );
}

#[test]
fn embedded_ledger_caps_replicas_at_one_and_says_so() {
    let mut f = flow();
    f.spec.replicas = Some(3);
    let d = desired(&f);
    assert_eq!(d.replicas, 1);
    assert!(d.capped.unwrap().contains("embedded ledger"));
    assert!(d.pdb.is_none());
    assert!(d.ledger.is_some());
}

#[test]
fn postgres_ledger_with_replicas_gets_a_budget_and_no_volume() {
    let mut f = flow();
    f.spec.ledger.r#type = LedgerType::Postgres;
    f.spec.replicas = Some(2);
    let d = desired(&f);
    assert_eq!(d.replicas, 2);
    assert!(d.pdb.is_some());
    assert!(d.ledger.is_none());
    assert_eq!(
        d.deployment.spec.unwrap().strategy,
        None,
        "rolling update for a shared ledger"
    );
}

#[test]
fn paused_flow_has_zero_replicas_but_keeps_its_ledger_claim() {
    let mut f = flow();
    f.spec.paused = true;
    let d = desired(&f);
    assert_eq!(d.deployment.spec.as_ref().unwrap().replicas, Some(0));
    assert!(d.ledger.is_some());
}

#[test]
fn config_change_changes_the_pod_template_hash_and_nothing_else_does() {
    let a = desired(&flow());
    let b = desired(&flow());
    let hash = |d: &build::Desired| {
        d.deployment
            .spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap()["sync.meshline.io/config-hash"]
            .clone()
    };
    assert_eq!(hash(&a), hash(&b), "the build is deterministic");
    let mut f = flow();
    f.spec.delivery.max_attempts = 3;
    assert_ne!(hash(&a), hash(&desired(&f)));
    let mut f = flow();
    f.status = Some(SyncFlowStatus::default());
    f.metadata.resource_version = Some("999".into());
    assert_eq!(
        hash(&a),
        hash(&desired(&f)),
        "status and resourceVersion do not roll pods"
    );
}

#[test]
fn every_child_is_owned_by_the_flow_and_labelled() {
    let mut f = flow();
    f.spec.ledger.retention_policy = LedgerRetentionPolicy::Delete;
    let d = desired(&f);
    let metas = [
        &d.config_map.metadata,
        &d.service.metadata,
        &d.status_service.metadata,
        &d.deployment.metadata,
        &d.ledger.as_ref().unwrap().metadata,
    ];
    for m in metas {
        let o = &m.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (
                o.kind.as_str(),
                o.uid.as_str(),
                o.controller,
                o.block_owner_deletion
            ),
            ("SyncFlow", "uid-1", Some(true), Some(true))
        );
        let l = m.labels.as_ref().unwrap();
        assert_eq!(l["app.kubernetes.io/managed-by"], "meshline-controller");
        assert_eq!(l["sync.meshline.io/flow"], "won-deals-to-odoo");
        assert!(
            m.annotations
                .as_ref()
                .unwrap()
                .contains_key("sync.meshline.io/applied-hash")
        );
    }
}

#[test]
fn ledger_is_retained_by_default_and_owned_by_the_flow_only_under_delete() {
    let retained = desired(&flow()).ledger.unwrap();
    assert_eq!(
        retained.metadata.owner_references, None,
        "a retained ledger has no owner reference, so garbage collection never reaches it"
    );
    assert_eq!(
        retained.metadata.labels.as_ref().unwrap()["sync.meshline.io/flow"],
        "won-deals-to-odoo"
    );
    assert_eq!(
        retained.metadata.name.as_deref(),
        Some("meshline-won-deals-to-odoo-ledger"),
        "the name derives from the flow's alone, so a re-created flow finds it"
    );

    let mut f = flow();
    f.spec.ledger.retention_policy = LedgerRetentionPolicy::Delete;
    let deleted_with_flow = desired(&f).ledger.unwrap();
    let owners = deleted_with_flow
        .metadata
        .owner_references
        .as_ref()
        .unwrap();
    assert_eq!(owners.len(), 1);
    assert_eq!(owners[0].uid, "uid-1");
    assert_eq!(owners[0].controller, Some(true));
    // The content hash differs, so the apply step does write the change of ownership.
    let hash = |p: &k8s_openapi::api::core::v1::PersistentVolumeClaim| {
        p.metadata.annotations.as_ref().unwrap()["sync.meshline.io/applied-hash"].clone()
    };
    assert_ne!(hash(&retained), hash(&deleted_with_flow));
    // The PVC the reconciler applies to a flow that does not start is the same object.
    assert_eq!(build::ledger_claim(&f), deleted_with_flow);
}

#[test]
fn changing_the_retention_policy_does_not_restart_the_worker() {
    let config_hash = |d: &build::Desired| {
        d.deployment
            .spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap()["sync.meshline.io/config-hash"]
            .clone()
    };
    let before = desired(&flow());
    let mut f = flow();
    f.spec.ledger.retention_policy = LedgerRetentionPolicy::Delete;
    let after = desired(&f);
    assert_eq!(config_hash(&before), config_hash(&after));
    assert_eq!(before.deployment, after.deployment);
    assert_eq!(before.config_map, after.config_map);
    // The policy is spelt as the README says, and absent when it is the default.
    let yaml = serde_yaml::to_string(&f.spec.ledger).unwrap();
    assert!(yaml.contains("retentionPolicy: Delete"), "{yaml}");
    assert!(
        !serde_yaml::to_string(&flow().spec.ledger)
            .unwrap()
            .contains("retentionPolicy")
    );
    let parsed: meshline::api::LedgerSpec =
        serde_yaml::from_str("type: embedded\nretentionPolicy: Retain").unwrap();
    assert_eq!(parsed.retention_policy, LedgerRetentionPolicy::Retain);
}

fn platform_defaults() -> WorkerPodSettings {
    serde_json::from_value(serde_json::json!({
        "serviceAccountName": "sync-workers",
        "imagePullSecrets": [{"name": "regcred"}],
        "nodeSelector": {"pool": "integration", "disk": "ssd"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "sync", "effect": "NoSchedule"}],
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 50, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
             "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "meshline-worker"}}}}]}},
        "priorityClassName": "business-critical",
        "podAnnotations": {"cost-center": "finance", "example.com/owner": "platform"},
        "podLabels": {"team": "platform", "tier": "integration"}
    }))
    .unwrap()
}

fn desired_with(flow: &SyncFlow, defaults: WorkerPodSettings) -> build::Desired {
    let contract: SyncContract = load("contract.yaml");
    build::build(BuildInputs {
        revision: Some("meshline-contract-test-000000000000"),
        flow,
        contract: &contract,
        roster: None,
        settings: &BuildSettings {
            worker_image: "img:1".into(),
            worker_defaults: defaults,
            ..BuildSettings::default()
        },
        new_token: None,
    })
    .unwrap()
}

#[test]
fn controller_defaults_shape_every_worker_pod() {
    let d = desired_with(&flow(), platform_defaults()).deployment;
    let template = d.spec.as_ref().unwrap().template.clone();
    let pod = template.spec.unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("sync-workers"));
    assert_eq!(
        pod.automount_service_account_token,
        Some(false),
        "a ServiceAccount for cloud identity still gets no Kubernetes API token"
    );
    assert_eq!(pod.image_pull_secrets.unwrap()[0].name, "regcred");
    assert_eq!(pod.node_selector.unwrap()["pool"], "integration");
    assert_eq!(
        pod.tolerations.unwrap()[0].key.as_deref(),
        Some("dedicated")
    );
    assert_eq!(
        pod.affinity
            .unwrap()
            .pod_anti_affinity
            .unwrap()
            .preferred_during_scheduling_ignored_during_execution
            .unwrap()[0]
            .pod_affinity_term
            .topology_key,
        "kubernetes.io/hostname"
    );
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("business-critical")
    );
    let meta = template.metadata.unwrap();
    let labels = meta.labels.unwrap();
    assert_eq!(labels["team"], "platform");
    assert_eq!(labels["sync.meshline.io/flow"], "won-deals-to-odoo");
    let annotations = meta.annotations.unwrap();
    assert_eq!(annotations["cost-center"], "finance");
    assert!(annotations.contains_key("sync.meshline.io/config-hash"));
    // Without defaults and flow settings, the pod template is what it was before these settings existed.
    let plain = desired(&flow()).deployment;
    let plain_pod = plain.spec.unwrap().template.spec.unwrap();
    assert_eq!(plain_pod.service_account_name, None);
    assert_eq!(plain_pod.node_selector, None);
    assert_eq!(plain_pod.tolerations, None);
    assert_eq!(plain_pod.affinity, None);
}

#[test]
fn a_flows_own_worker_settings_win_over_the_defaults() {
    let mut f = flow();
    f.spec.worker = Some(
        serde_json::from_value(serde_json::json!({
            "serviceAccountName": "erp-sync",
            "nodeSelector": {"pool": "finance"},
            "tolerations": [],
            "podLabels": {"team": "revops", "cost": "crm"},
            "podAnnotations": {"cost-center": "sales"}
        }))
        .unwrap(),
    );
    let merged = build::pod_settings(&f, &platform_defaults());
    assert_eq!(merged.service_account_name.as_deref(), Some("erp-sync"));
    assert_eq!(
        merged.priority_class_name.as_deref(),
        Some("business-critical"),
        "a field the flow leaves unset falls back to the default"
    );
    // Maps merge key by key, the flow's value winning.
    assert_eq!(
        merged.node_selector,
        BTreeMap::from([
            ("disk".to_string(), "ssd".to_string()),
            ("pool".to_string(), "finance".to_string())
        ])
    );
    assert_eq!(merged.pod_labels["team"], "revops");
    assert_eq!(merged.pod_labels["tier"], "integration");
    assert_eq!(merged.pod_labels["cost"], "crm");
    assert_eq!(merged.pod_annotations["cost-center"], "sales");
    assert_eq!(merged.pod_annotations["example.com/owner"], "platform");
    // A list the flow sets replaces the default one, even when empty.
    assert_eq!(merged.tolerations, Some(Vec::new()));
    assert_eq!(
        merged.image_pull_secrets,
        Some(vec![SecretRef {
            name: "regcred".into()
        }])
    );
    let d = desired_with(&f, platform_defaults()).deployment;
    let pod = d.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("erp-sync"));
    assert_eq!(pod.tolerations, Some(Vec::new()));
}

#[test]
fn pod_labels_never_move_the_controllers_selector() {
    let d = desired_with(&flow(), platform_defaults()).deployment;
    let spec = d.spec.unwrap();
    let labels = spec.template.metadata.unwrap().labels.unwrap();
    for (k, v) in spec.selector.match_labels.unwrap() {
        assert_eq!(labels[&k], v, "selector label {k}");
    }
}

fn invalid_settings_verdict(settings: serde_json::Value) -> validate::Verdict {
    let mut f = flow();
    f.spec.worker = Some(serde_json::from_value::<WorkerSpec>(settings).unwrap());
    verdict(&f)
}

#[test]
fn worker_settings_the_api_server_would_refuse_stop_the_flow_and_name_the_field() {
    let cases = [
        (
            serde_json::json!({"podLabels": {"sync.meshline.io/flow": "other"}}),
            "spec.worker.podLabels[sync.meshline.io/flow]: the controller sets this label",
        ),
        (
            serde_json::json!({"podLabels": {"app.kubernetes.io/component": "api"}}),
            "spec.worker.podLabels[app.kubernetes.io/component]: the controller sets this label",
        ),
        (
            serde_json::json!({"podLabels": {"team": "-revops"}}),
            "spec.worker.podLabels[team]: value \"-revops\"",
        ),
        (
            serde_json::json!({"podLabels": {"Example.com/team": "revops"}}),
            "spec.worker.podLabels[Example.com/team]: not a valid label key",
        ),
        (
            serde_json::json!({"podAnnotations": {"sync.meshline.io/config-hash": "0"}}),
            "spec.worker.podAnnotations[sync.meshline.io/config-hash]: keys under sync.meshline.io/ are the controller's",
        ),
        (
            serde_json::json!({"podAnnotations": {"bad key": "x"}}),
            "spec.worker.podAnnotations[bad key]: not a valid annotation key",
        ),
        (
            serde_json::json!({"podAnnotations": {"big": "x".repeat(256 * 1024)}}),
            "spec.worker.podAnnotations: 262147 bytes",
        ),
        (
            serde_json::json!({"nodeSelector": {"pool": "a b"}}),
            "spec.worker.nodeSelector[pool]: value \"a b\"",
        ),
        (
            serde_json::json!({"serviceAccountName": "Sync_Workers"}),
            "spec.worker.serviceAccountName: \"Sync_Workers\" must be a lowercase RFC 1123 subdomain",
        ),
        (
            serde_json::json!({"priorityClassName": "High"}),
            "spec.worker.priorityClassName: \"High\"",
        ),
        (
            serde_json::json!({"imagePullSecrets": [{"name": "reg cred"}]}),
            "spec.worker.imagePullSecrets[0].name",
        ),
        (
            serde_json::json!({"tolerations": [{"key": "dedicated", "operator": "Exists", "value": "sync"}]}),
            "spec.worker.tolerations[0].value: must be empty when operator is Exists",
        ),
        (
            serde_json::json!({"tolerations": [{"operator": "Equal", "value": "x"}]}),
            "spec.worker.tolerations[0].operator: must be Exists when key is empty",
        ),
        (
            serde_json::json!({"tolerations": [{"key": "k", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 30}]}),
            "spec.worker.tolerations[0].tolerationSeconds: only a NoExecute toleration",
        ),
        (
            serde_json::json!({"tolerations": [{"key": "k", "operator": "Matches"}]}),
            "spec.worker.tolerations[0].operator: \"Matches\" is not one of Equal, Exists",
        ),
        (
            serde_json::json!({"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{"topologyKey": ""}]}}}),
            "spec.worker.affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution[0].topologyKey: must not be empty",
        ),
        (
            serde_json::json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In"}]}]}}}}),
            "matchExpressions[0].values: must be non-empty with operator In",
        ),
        (
            serde_json::json!({"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 0, "preference": {}}]}}}),
            "preferredDuringSchedulingIgnoredDuringExecution[0].weight: 0 is not in the range 1 to 100",
        ),
    ];
    for (settings, says) in cases {
        let v = invalid_settings_verdict(settings.clone());
        assert!(!v.startable(), "{settings} must stop the flow");
        assert_eq!(v.worker_settings.reason(), "InvalidWorkerSettings");
        assert_eq!(v.first_failure().unwrap().reason(), "InvalidWorkerSettings");
        assert!(
            v.worker_settings.message().contains(says),
            "{settings}: {:?} does not say {says:?}",
            v.worker_settings.message()
        );
    }
    let good = invalid_settings_verdict(
        serde_json::to_value(WorkerSpec {
            pod: platform_defaults(),
            ..Default::default()
        })
        .unwrap(),
    );
    assert!(good.startable(), "{:?}", good.worker_settings);
}

#[test]
fn worker_defaults_flag_refuses_misspelt_and_invalid_settings() {
    use meshline::cli::controller::parse_worker_defaults;
    assert_eq!(
        parse_worker_defaults("{}").unwrap(),
        WorkerPodSettings::default()
    );
    assert_eq!(
        parse_worker_defaults("").unwrap(),
        WorkerPodSettings::default()
    );
    let parsed = parse_worker_defaults(&platform_defaults_json()).unwrap();
    assert_eq!(parsed, platform_defaults());
    let err = parse_worker_defaults(r#"{"nodeSelecter": {"pool": "a"}}"#).unwrap_err();
    assert!(
        err.contains("unknown field \"nodeSelecter\"") && err.contains("nodeSelector"),
        "{err}"
    );
    let err =
        parse_worker_defaults(r#"{"tolerations": [{"tolerationSeconds": "soon"}]}"#).unwrap_err();
    assert!(err.contains("tolerations[0].tolerationSeconds"), "{err}");
    let err = parse_worker_defaults(r#"{"podLabels": {"app.kubernetes.io/managed-by": "me"}}"#)
        .unwrap_err();
    assert!(
        err.contains("--worker-defaults.podLabels[app.kubernetes.io/managed-by]"),
        "{err}"
    );
    assert!(
        parse_worker_defaults("[]")
            .unwrap_err()
            .contains("JSON object")
    );
    assert!(parse_worker_defaults("{").unwrap_err().contains("not JSON"));
}

fn platform_defaults_json() -> String {
    serde_json::to_string(&platform_defaults()).unwrap()
}

#[test]
fn secret_key_requirements_follow_the_connectors() {
    let f = flow();
    let reqs = secrets::requirements(&f, None);
    assert_eq!(
        reqs["hubspot-app"][0].alternatives,
        vec![vec!["clientSecret", "accessToken"]]
    );
    assert_eq!(
        reqs["odoo-api-key"][0].alternatives,
        vec![vec!["login", "apiKey"]]
    );
    let mut keys = good_secrets();
    keys.insert("odoo-api-key".into(), Some(["login".to_string()].into()));
    let (reason, message) = secrets::check(&f, None, &keys).unwrap_err();
    assert_eq!(reason, "SecretKeysMissing");
    assert!(
        message.contains("odoo-api-key lacks key(s) apiKey"),
        "{message}"
    );
}

/// The example roster with an identity Secret, as a team that approves holds configures it.
fn roster_with_identities() -> OwnershipRoster {
    let mut r: OwnershipRoster = load("roster.yaml");
    r.spec.identity_secret_ref = Some(meshline::api::SecretRef {
        name: "commerce-identities".into(),
    });
    r
}

#[test]
fn the_rosters_identity_and_ticket_sink_secrets_are_mounted_read_only_like_the_flows() {
    let contract: SyncContract = load("contract.yaml");
    let roster = roster_with_identities();
    let d = build::build(BuildInputs {
        revision: Some("meshline-contract-test-000000000000"),
        flow: &flow(),
        contract: &contract,
        roster: Some(&roster),
        settings: &BuildSettings {
            worker_image: "img:1".into(),
            ..BuildSettings::default()
        },
        new_token: None,
    })
    .unwrap()
    .deployment;
    let pod = d.spec.unwrap().template.spec.unwrap();
    let volumes: BTreeMap<String, (String, Option<i32>)> = pod
        .volumes
        .unwrap()
        .into_iter()
        .filter_map(|v| {
            let s = v.secret?;
            Some((v.name, (s.secret_name?, s.default_mode)))
        })
        .collect();
    let mounts = pod.containers[0].volume_mounts.clone().unwrap();
    for secret in [
        "commerce-identities",
        "github-token",
        "alert-webhook-signing",
        "hubspot-app",
        "odoo-api-key",
    ] {
        let path = format!("/var/run/meshline/secrets/{secret}");
        let m = mounts
            .iter()
            .find(|m| m.mount_path == path)
            .unwrap_or_else(|| panic!("{secret} is not mounted: {mounts:?}"));
        assert_eq!(m.read_only, Some(true), "{secret}");
        assert_eq!(
            volumes[&m.name],
            (secret.to_string(), Some(0o440)),
            "{secret}"
        );
    }

    // A Secret the flow and the roster both name is mounted once.
    let mut shared = roster_with_identities();
    shared.spec.identity_secret_ref.as_mut().unwrap().name = "hubspot-app".into();
    let names = build::mounted_secrets(&flow(), Some(&shared));
    assert_eq!(
        names,
        [
            "alert-webhook-signing",
            "github-token",
            "hubspot-app",
            "odoo-api-key"
        ]
    );
}

#[test]
fn a_ticket_sink_secret_without_its_key_stops_the_flow_naming_the_roster_field_and_key() {
    let mut keys = good_secrets();
    keys.insert(
        "alert-webhook-signing".into(),
        Some(["token".to_string()].into()),
    );
    let rosters = vec![Arc::new(load::<OwnershipRoster>("roster.yaml"))];
    let v = validate::validate(Inputs {
        flow: &flow(),
        contract: Some(Arc::new(load::<SyncContract>("contract.yaml"))),
        rosters: &rosters,
        secrets: &keys,
        compile: &validate::compile_contract,
        worker_defaults: &Default::default(),
    });
    assert!(!v.startable());
    assert_eq!(v.secrets_ready.reason(), "SecretKeysMissing");
    let message = v.secrets_ready.message();
    assert!(
        message.contains("Secret alert-webhook-signing lacks key(s) signingSecret")
            && message.contains(
                "OwnershipRoster commerce-owners spec.ticketSinks[1].credentialsSecretRef"
            ),
        "{message}"
    );
    // The roster's identity Secret must exist as well (its keys are the owners' ids, none fixed).
    let mut keys = good_secrets();
    keys.insert("commerce-identities".into(), None);
    let rosters = vec![Arc::new(roster_with_identities())];
    let v = validate::validate(Inputs {
        flow: &flow(),
        contract: Some(Arc::new(load::<SyncContract>("contract.yaml"))),
        rosters: &rosters,
        secrets: &keys,
        compile: &validate::compile_contract,
        worker_defaults: &Default::default(),
    });
    assert_eq!(v.secrets_ready.reason(), "SecretNotFound");
    assert!(
        v.secrets_ready
            .message()
            .contains("Secret commerce-identities does not exist (referenced by OwnershipRoster commerce-owners spec.identitySecretRef)"),
        "{}",
        v.secrets_ready.message()
    );
}

#[test]
fn netsuite_accepts_either_m2m_or_tba_keys() {
    let r = secrets::KeyRequirement {
        purpose: "sink".into(),
        alternatives: vec![
            vec!["clientId", "certificateId", "privateKey"],
            vec![
                "accountId",
                "consumerKey",
                "consumerSecret",
                "tokenId",
                "tokenSecret",
            ],
        ],
    };
    let tba: BTreeSet<String> = [
        "accountId",
        "consumerKey",
        "consumerSecret",
        "tokenId",
        "tokenSecret",
    ]
    .map(String::from)
    .into();
    assert_eq!(r.missing(&tba), None);
    let partial: BTreeSet<String> = ["clientId".to_string()].into();
    assert_eq!(
        r.missing(&partial),
        Some(vec!["certificateId", "privateKey"])
    );
}

fn compute(
    f: &SyncFlow,
    observation: Option<&Observation>,
    previous: Option<&SyncFlowStatus>,
    now: &str,
) -> SyncFlowStatus {
    let v = verdict(f);
    let c = v.contract.clone();
    status::compute(StatusInputs {
        generation: f.metadata.generation,
        verdict: &v,
        paused: f.spec.paused,
        replicas: 1,
        capped: None,
        deployment: None,
        observation,
        sla: c.as_ref().and_then(|c| c.spec.sla.as_ref()),
        live_contract: c.as_deref(),
        flow_name: f.metadata.name.as_deref().unwrap_or_default(),
        previous,
        now,
    })
}

#[test]
fn transition_time_moves_only_when_a_condition_status_changes() {
    let f = flow();
    let first = compute(&f, None, None, "2026-01-01T00:00:00Z");
    let second = compute(&f, None, Some(&first), "2026-01-01T00:05:00Z");
    assert_eq!(first.conditions, second.conditions);
    assert!(!differs(Some(&first), &second, |s| &mut s.conditions));
    let prev = vec![meshline::api::Condition {
        r#type: "Ready".into(),
        status: "False".into(),
        last_transition_time: Some("t0".into()),
        ..Default::default()
    }];
    let next = vec![meshline::api::Condition {
        r#type: "Ready".into(),
        status: "True".into(),
        ..Default::default()
    }];
    assert_eq!(
        carry_transition_times(&prev, next, "t1")[0]
            .last_transition_time
            .as_deref(),
        Some("t1")
    );
}

#[test]
fn open_breaker_and_late_records_degrade_the_flow() {
    let w: meshline::worker::api::WorkerStatus = serde_json::from_value(serde_json::json!({
        "flow": "f", "contractVersion": "2.0.1", "backend": "sqlite",
        "counters": {"received": 1, "delivered": 0, "failed": 0, "retried": 0, "deadLettered": 0, "held": 0},
        "pending": 1, "failureRate": "0", "lastDeliveryTime": null, "mttrSeconds": null,
        "manualInterventionsPer1k": "0", "oldestPendingSeconds": 7200,
        "circuitBreaker": {"reason": "401 from the ERP", "since": "2026-01-01T00:00:00Z"}, "paused": null
    }))
    .unwrap();
    let c: SyncContract = load("contract.yaml");
    // The late records are the ledger's (read once per flow); the open breaker is the process's (read per pod).
    let ledger: Vec<&str> = status::sla_breaches(&w, c.spec.sla.as_ref())
        .iter()
        .map(|b| b.0)
        .collect();
    assert_eq!(ledger, vec!["DeliveryLatencyOverSla"]);
    let process: Vec<&str> = status::process_state_breaches(&w)
        .iter()
        .map(|b| b.0)
        .collect();
    assert_eq!(process, vec!["CircuitBreakerOpen"]);
}

#[test]
fn lease_decisions() {
    use chrono::Utc;
    use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    assert_eq!(
        leader::decide(None, "me", Utc::now()),
        leader::Decision::Create
    );
    let lease = |holder: &str, age_s: i64| Lease {
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(
                k8s_openapi::jiff::Timestamp::from_second(Utc::now().timestamp() - age_s).unwrap(),
            )),
            ..LeaseSpec::default()
        }),
        ..Lease::default()
    };
    assert_eq!(
        leader::decide(Some(&lease("me", 100)), "me", Utc::now()),
        leader::Decision::Renew
    );
    assert_eq!(
        leader::decide(Some(&lease("other", 2)), "me", Utc::now()),
        leader::Decision::Standby {
            holder: "other".into()
        }
    );
    assert_eq!(
        leader::decide(Some(&lease("other", 60)), "me", Utc::now()),
        leader::Decision::TakeOver
    );
}

#[test]
fn backoff_doubles_and_is_capped() {
    use meshline::controller::flow::backoff;
    assert_eq!(backoff(0).as_secs(), 5);
    assert_eq!(backoff(1).as_secs(), 10);
    assert_eq!(backoff(20).as_secs(), 300);
}

#[test]
fn status_is_read_from_each_pod_and_only_the_workers_503_is_an_answer() {
    use meshline::controller::poll::{
        FetchError, WorkerAnswer, WorkerPod, parse_answer, pod_proxy_path, pod_url, status_port,
    };
    // The port is the one `status_port` names (the worker's operations port), whatever its number.
    let port = status_port();
    assert_eq!(
        pod_proxy_path("commerce-sync", "meshline-won-deals-7d9f8-abcde"),
        format!(
            "/api/v1/namespaces/commerce-sync/pods/meshline-won-deals-7d9f8-abcde:{port}/proxy/status"
        )
    );
    let pod = |address: &str| WorkerPod {
        name: "p".into(),
        address: address.into(),
        ready: true,
    };
    assert_eq!(
        pod_url(&pod("10.1.0.7")),
        format!("http://10.1.0.7:{port}/status")
    );
    assert_eq!(
        pod_url(&pod("fd00::7")),
        format!("http://[fd00::7]:{port}/status")
    );

    let body = br#"{"error": "no ledger", "problems": [{"kind": "LedgerUnavailable", "message": "refused", "since": "2026-01-01T00:00:00Z"}]}"#;
    match parse_answer("u", 503, body).unwrap() {
        WorkerAnswer::NotStarted(f) => {
            assert_eq!(f.error, "no ledger");
            assert_eq!(f.problems[0].kind, "LedgerUnavailable");
        }
        other => panic!("{other:?}"),
    }
    let proxy = br#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"no endpoints available","reason":"ServiceUnavailable","code":503}"#;
    assert!(matches!(
        parse_answer("u", 503, proxy),
        Err(FetchError::Status { status: 503, .. })
    ));
    assert!(matches!(
        parse_answer("u", 500, body),
        Err(FetchError::Status { status: 500, .. })
    ));
    assert!(matches!(
        parse_answer("u", 200, b"not json"),
        Err(FetchError::Malformed { .. })
    ));
}

#[test]
fn a_configuration_too_large_for_a_config_map_is_a_clear_error() {
    let mut contract: SyncContract = load("contract.yaml");
    // Within the CRD's bounds field by field, too large all together.
    let template = contract.spec.fields[0].clone();
    for i in 0..1100 {
        let mut f = template.clone();
        f.name = format!("extra{i}");
        f.description = Some("x".repeat(1000));
        contract.spec.fields.push(f);
    }
    let err = build::build(BuildInputs {
        revision: Some("meshline-contract-test-000000000000"),
        flow: &flow(),
        contract: &contract,
        roster: None,
        settings: &BuildSettings {
            worker_image: "img:1".into(),
            ..BuildSettings::default()
        },
        new_token: None,
    })
    .unwrap_err();
    assert!(
        err.contains("over the 1048576 bytes a ConfigMap may hold")
            && err.contains("ConfigMap meshline-won-deals-to-odoo"),
        "{err}"
    );
}

#[tokio::test]
async fn a_lease_name_the_api_server_would_refuse_stops_the_controller_at_start() {
    let settings = meshline::controller::Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        status_period: std::time::Duration::from_secs(5),
        worker_image: "img:1".into(),
        worker_defaults: Default::default(),
        lease_name: "meshline_controller:leader".into(),
        lease_namespace: "meshline-system".into(),
        identity: "me".into(),
        namespace: None,
        status_via_proxy: false,
        poll: meshline::controller::poll::PollSettings::default(),
        no_leader_election: false,
        network_policies: meshline::controller::FlowNetworkPolicies::Off,
        outage: Default::default(),
        ops_page: None,
    };
    let err = meshline::controller::run(settings).await.unwrap_err();
    let text = err.to_string();
    assert_eq!(err.metric_label(), "lease", "{text}");
    assert!(
        text.contains("meshline-system/meshline_controller:leader")
            && text.contains("--lease-name must be a lowercase RFC 1123 subdomain"),
        "{text}"
    );
}

#[test]
fn worker_pods_come_from_the_status_services_slices_once_each_with_their_own_readiness() {
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use meshline::controller::poll::{WorkerPod, worker_pods};
    let slice = |ns: &str, service: &str, family: &str, endpoints: serde_json::Value| {
        std::sync::Arc::new(
            serde_json::from_value::<EndpointSlice>(serde_json::json!({
                "metadata": {"name": format!("{service}-{family}"), "namespace": ns,
                             "labels": {"kubernetes.io/service-name": service}},
                "addressType": family, "endpoints": endpoints,
            }))
            .unwrap(),
        )
    };
    let ep = |pod: &str, ip: &str, serving: bool, terminating: bool| {
        serde_json::json!({"addresses": [ip], "targetRef": {"kind": "Pod", "name": pod},
            "conditions": {"ready": true, "serving": serving, "terminating": terminating}})
    };
    let slices = vec![
        slice(
            "ns",
            "meshline-f-status",
            "IPv4",
            serde_json::json!([
                ep("b", "10.0.0.2", false, false),
                ep("a", "10.0.0.1", true, false),
                ep("old", "10.0.0.9", true, true)
            ]),
        ),
        // The same pods in the IPv6 slice of a dual-stack Service.
        slice(
            "ns",
            "meshline-f-status",
            "IPv6",
            serde_json::json!([ep("a", "fd00::1", true, false)]),
        ),
        // Another Service of the flow, another namespace, an FQDN slice: none of them.
        slice(
            "ns",
            "meshline-f",
            "IPv4",
            serde_json::json!([ep("c", "10.0.0.3", true, false)]),
        ),
        slice(
            "other",
            "meshline-f-status",
            "IPv4",
            serde_json::json!([ep("d", "10.0.0.4", true, false)]),
        ),
        slice(
            "ns",
            "meshline-f-status",
            "FQDN",
            serde_json::json!([ep("e", "e.example", true, false)]),
        ),
    ];
    assert_eq!(
        worker_pods(&slices, "ns", "f"),
        vec![
            WorkerPod {
                name: "a".into(),
                address: "10.0.0.1".into(),
                ready: true
            },
            WorkerPod {
                name: "b".into(),
                address: "10.0.0.2".into(),
                ready: false
            },
        ]
    );
}

#[test]
fn a_ledger_pvc_brings_back_its_flow_by_name_without_an_owner_reference() {
    use meshline::controller::run::flows_of_ledger;
    let mut a = flow();
    a.metadata.namespace = Some("commerce-sync".into());
    let mut b = a.clone();
    b.metadata.name = Some("other-flow".into());
    let mut elsewhere = a.clone();
    elsewhere.metadata.namespace = Some("other-team".into());
    let flows = vec![Arc::new(a), Arc::new(b), Arc::new(elsewhere)];
    let hit = flows_of_ledger(
        &flows,
        Some("commerce-sync"),
        "meshline-won-deals-to-odoo-ledger",
    );
    assert_eq!(hit.len(), 1);
    assert_eq!(hit[0].name, "won-deals-to-odoo");
    assert_eq!(hit[0].namespace.as_deref(), Some("commerce-sync"));
    assert!(
        flows_of_ledger(&flows, Some("commerce-sync"), "meshline-won-deals-to-odoo").is_empty()
    );
}

fn desired_with_roster(flow: &SyncFlow, roster: &OwnershipRoster) -> build::Desired {
    let contract: SyncContract = load("contract.yaml");
    build::build(BuildInputs {
        revision: Some("meshline-contract-test-000000000000"),
        flow,
        contract: &contract,
        roster: Some(roster),
        settings: &BuildSettings {
            worker_image: "img:1".into(),
            ..BuildSettings::default()
        },
        new_token: None,
    })
    .unwrap()
}

#[test]
fn the_audit_runs_nightly_in_a_pod_that_holds_only_the_flow_token() {
    use meshline::controller::flow::audit;
    let d = desired(&flow());
    let cron = d.audit.expect("hubspot to odoo can be audited");
    assert_eq!(
        cron.metadata.name.as_deref(),
        Some("meshline-audit-won-deals-to-odoo")
    );
    let owner = &cron.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("SyncFlow", Some(true))
    );
    let spec = cron.spec.unwrap();
    assert_eq!(spec.schedule, audit::DEFAULT_SCHEDULE);
    assert_eq!(spec.suspend, Some(false));
    assert_eq!(spec.concurrency_policy.as_deref(), Some("Forbid"));
    let job = spec.job_template.spec.unwrap();
    assert!(
        job.backoff_limit.unwrap() > 0,
        "a retried Job joins the run"
    );
    let template = job.template;
    let labels = template.metadata.unwrap().labels.unwrap();
    // Never one of the worker's pods: the worker Services must not route to it.
    let worker_selector = d.deployment.spec.unwrap().selector.match_labels.unwrap();
    assert!(
        !worker_selector
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v)),
        "{labels:?} matches the worker selector {worker_selector:?}"
    );
    assert_eq!(labels["app.kubernetes.io/component"], "audit");
    let pod = template.spec.unwrap();
    // Differences found (exit 1) end the Job; a partial or failed attempt (exit 2) is retried in a new pod.
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    let rules = job.pod_failure_policy.as_ref().unwrap().rules.clone();
    let fail_job = rules.iter().find(|r| r.action == "FailJob").unwrap();
    let codes = fail_job.on_exit_codes.as_ref().unwrap();
    assert_eq!(
        (
            codes.container_name.as_deref(),
            codes.operator.as_str(),
            codes.values.as_slice()
        ),
        (Some("audit"), "In", &[1][..])
    );
    assert!(rules.iter().any(|r| r.action == "Ignore"
        && r.on_pod_conditions.as_ref().unwrap()[0].type_ == "DisruptionTarget"));
    assert_eq!(pod.automount_service_account_token, Some(false));
    let volumes: Vec<_> = pod
        .volumes
        .unwrap()
        .into_iter()
        .map(|v| (v.name, v.secret.and_then(|s| s.secret_name)))
        .collect();
    assert_eq!(
        volumes,
        vec![
            (
                "token".to_string(),
                Some("meshline-won-deals-to-odoo-token".to_string())
            ),
            ("tmp".to_string(), None)
        ],
        "no credential of either system reaches the audit pod"
    );
    let c = &pod.containers[0];
    assert_eq!(
        c.args.clone().unwrap(),
        [
            "audit",
            "won-deals-to-odoo",
            "--url",
            "http://meshline-won-deals-to-odoo-status.commerce-sync.svc:8081",
            "--token-file",
            "/var/run/meshline/token/token"
        ]
    );
    assert!(c.ports.is_none() && c.liveness_probe.is_none());
    let sc = c.security_context.clone().unwrap();
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
}

#[test]
fn the_audit_follows_the_roster_schedule_and_stops_with_the_flow() {
    let mut roster: OwnershipRoster = load("roster.yaml");
    roster.spec.audit = Some(meshline::api::AuditSchedule {
        schedule: Some("30 5 * * 1-5".into()),
        time_zone: Some("Europe/Berlin".into()),
        window: None,
        suspend: false,
    });
    let spec = desired_with_roster(&flow(), &roster)
        .audit
        .unwrap()
        .spec
        .unwrap();
    assert_eq!(spec.schedule, "30 5 * * 1-5");
    assert_eq!(spec.time_zone.as_deref(), Some("Europe/Berlin"));
    assert_eq!(spec.suspend, Some(false));

    // A time zone the API server cannot load: no CronJob (the roster's condition says why), never a write
    // the API server refuses.
    roster.spec.audit.as_mut().unwrap().time_zone = Some("Europe/Berln".into());
    assert!(desired_with_roster(&flow(), &roster).audit.is_none());
    roster.spec.audit.as_mut().unwrap().time_zone = Some("Europe/Berlin".into());
    roster.spec.audit.as_mut().unwrap().schedule = Some("0 2 * * 7".into());
    assert!(desired_with_roster(&flow(), &roster).audit.is_none());
    roster.spec.audit.as_mut().unwrap().schedule = Some("30 5 * * 1-5".into());

    roster.spec.audit.as_mut().unwrap().suspend = true;
    let suspended = desired_with_roster(&flow(), &roster).audit.unwrap();
    assert_eq!(suspended.spec.unwrap().suspend, Some(true));

    let mut paused = flow();
    paused.spec.paused = true;
    let cron = desired(&paused).audit.unwrap();
    assert_eq!(
        cron.spec.unwrap().suspend,
        Some(true),
        "a paused flow has no worker to ask"
    );
}

#[test]
fn a_flow_whose_sides_have_no_query_api_gets_no_audit() {
    use meshline::controller::flow::audit;
    let mut f = flow();
    f.spec.sink.system = meshline::api::SinkSystem::Http;
    assert!(desired(&f).audit.is_none());
    assert!(
        audit::unauditable(&f)
            .unwrap()
            .starts_with("spec.sink.system")
    );
    let mut f = flow();
    f.spec.source.system = meshline::api::SourceSystem::Generic;
    assert!(desired(&f).audit.is_none());
    assert!(
        audit::unauditable(&f)
            .unwrap()
            .starts_with("spec.source.system")
    );
}

#[test]
fn the_audit_cron_job_name_fits_in_52_characters() {
    use meshline::controller::flow::audit;
    let long = "a".repeat(253);
    let name = audit::cron_job_name(&long);
    assert!(name.len() <= 52, "{name}");
    meshline::controller::names::NameRule::CronJob
        .check(&name)
        .unwrap();
    assert_ne!(name, audit::cron_job_name(&"a".repeat(252)));
}

#[test]
fn a_finished_audit_is_one_event_with_its_outcome() {
    use meshline::api::{AuditOutcome, AuditSideSummary, FlowAuditStatus};
    use meshline::controller::flow::audit::finished;
    let run = |id: i64, outcome: Option<AuditOutcome>| FlowAuditStatus {
        run: id,
        outcome,
        started_at: "2026-12-01T02:00:00Z".into(),
        window_from: "2026-11-24T02:00:00Z".into(),
        window_to: "2026-12-01T02:00:00Z".into(),
        crm: AuditSideSummary {
            count: 3,
            totals: [("EUR".to_string(), "300.00".to_string())].into(),
        },
        erp: AuditSideSummary {
            count: 2,
            totals: [("EUR".to_string(), "200.00".to_string())].into(),
        },
        matched: 2,
        unexplained: 1,
        unexplained_ids: vec!["123".into()],
        ..FlowAuditStatus::default()
    };
    let unexplained = run(7, Some(AuditOutcome::Unexplained));
    let e = finished(None, Some(&unexplained)).expect("a first result is news");
    assert_eq!(e.reason, "AuditUnexplained");
    assert!(matches!(e.type_, kube::runtime::events::EventType::Warning));
    let note = e.note.unwrap();
    assert!(
        note.contains("1 unexplained") && note.contains("123"),
        "{note}"
    );
    assert!(
        note.contains("300.00 EUR") && note.contains("200.00 EUR"),
        "{note}"
    );
    assert!(finished(Some(&unexplained), Some(&unexplained)).is_none());
    // A run still going says nothing; its end does.
    let running = run(8, None);
    assert!(finished(Some(&unexplained), Some(&running)).is_none());
    let mut partial = run(8, Some(AuditOutcome::Partial));
    partial.partial_reason = Some("salesforce rate-limited the audit".into());
    let e = finished(Some(&running), Some(&partial)).unwrap();
    assert_eq!(e.reason, "AuditPartial");
    assert!(
        e.note
            .unwrap()
            .contains("not reconciled (salesforce rate-limited")
    );
    let e = finished(
        Some(&partial),
        Some(&run(9, Some(AuditOutcome::Reconciled))),
    )
    .unwrap();
    assert_eq!(e.reason, "AuditReconciled");
    assert!(matches!(e.type_, kube::runtime::events::EventType::Normal));
}
