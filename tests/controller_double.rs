//! The API double refuses what a real kube-apiserver refuses, with the same code, reason and `Status` body. These
//! tests drive it through kube's own client, as the controller does, so a double that grew lenient fails here
//! before it lets a controller bug through.

mod controller_support;

use std::collections::BTreeMap;

use controller_support::ApiDouble;
use controller_support::rules::{ANNOTATIONS_MAX_BYTES, DATA_MAX_BYTES};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::core::Status;
use serde_json::json;

const NS: &str = "commerce-sync";

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(NS.into()),
        ..ObjectMeta::default()
    }
}

fn config_map(name: &str) -> ConfigMap {
    ConfigMap {
        metadata: meta(name),
        ..ConfigMap::default()
    }
}

/// The API error of a refused request (panics when it was accepted).
fn refused<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> Box<Status> {
    match result {
        Err(kube::Error::Api(s)) => s,
        other => panic!("expected the API server to refuse, got {other:?}"),
    }
}

fn assert_invalid(s: &Status, kind: &str, field: &str, says: &str) {
    assert_eq!(s.code, 422, "{s:?}");
    assert_eq!(s.reason, "Invalid", "{s:?}");
    assert!(s.is_failure(), "{s:?}");
    let details = s.details.as_ref().expect("a 422 carries details");
    assert_eq!(details.kind, kind);
    assert!(
        details.causes.iter().any(|c| c.field == field),
        "no cause on {field}: {s:?}"
    );
    let qualified = if details.group.is_empty() {
        kind.to_string()
    } else {
        format!("{kind}.{}", details.group)
    };
    assert!(
        s.message
            .starts_with(&format!("{qualified} \"{}\" is invalid: ", details.name)),
        "{}",
        s.message
    );
    assert!(s.message.contains(says), "{:?} lacks {says:?}", s.message);
}

async fn create_cm(double: &ApiDouble, cm: &ConfigMap) -> Result<ConfigMap, kube::Error> {
    Api::<ConfigMap>::namespaced(double.client(), NS)
        .create(&PostParams::default(), cm)
        .await
}

#[tokio::test]
async fn config_map_named_with_a_content_hash_prefix_is_refused() {
    let double = ApiDouble::new();
    let s = refused(
        create_cm(
            &double,
            &config_map("meshline-contract-opportunity-to-sales-order-sha256:f6241"),
        )
        .await,
    );
    assert_invalid(
        &s,
        "ConfigMap",
        "metadata.name",
        "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters",
    );
    // The same name in hex only, and a dotted one, are fine for a ConfigMap.
    create_cm(
        &double,
        &config_map("meshline-contract-opportunity-to-sales-order-f6241"),
    )
    .await
    .unwrap();
    create_cm(&double, &config_map("meshline-won.deals"))
        .await
        .unwrap();
    let s = refused(create_cm(&double, &config_map(&"a".repeat(254))).await);
    assert_invalid(
        &s,
        "ConfigMap",
        "metadata.name",
        "must be no more than 253 characters",
    );
    create_cm(&double, &config_map(&"a".repeat(253)))
        .await
        .unwrap();
}

#[tokio::test]
async fn service_names_are_dns_1035_labels() {
    let double = ApiDouble::new();
    let api = Api::<Service>::namespaced(double.client(), NS);
    let svc = |name: &str| Service {
        metadata: meta(name),
        ..Service::default()
    };
    for (name, says) in [
        ("meshline-won.deals", "a DNS-1035 label"),
        ("1-meshline", "start with an alphabetic character"),
        (&"s".repeat(64), "must be no more than 63 characters"),
    ] {
        let s = refused(api.create(&PostParams::default(), &svc(name)).await);
        assert_invalid(&s, "Service", "metadata.name", says);
    }
    api.create(&PostParams::default(), &svc(&"s".repeat(63)))
        .await
        .unwrap();
    // A server-side apply is checked the same way as a create.
    let s = refused(
        api.patch(
            "meshline-won.deals",
            &PatchParams::apply("meshline-controller").force(),
            &Patch::Apply(svc("meshline-won.deals")),
        )
        .await,
    );
    assert_invalid(&s, "Service", "metadata.name", "a DNS-1035 label");
}

#[tokio::test]
async fn cron_jobs_stop_at_52_characters_and_jobs_at_63() {
    let double = ApiDouble::new();
    let cron = Api::<CronJob>::namespaced(double.client(), NS);
    let cj = |n: usize| {
        let mut c = valid_cron_job();
        c.metadata = meta(&"c".repeat(n));
        c
    };
    let s = refused(cron.create(&PostParams::default(), &cj(53)).await);
    assert_invalid(
        &s,
        "CronJob",
        "metadata.name",
        "must be no more than 52 characters",
    );
    assert_eq!(s.details.as_ref().unwrap().group, "batch");
    cron.create(&PostParams::default(), &cj(52)).await.unwrap();

    let jobs = Api::<Job>::namespaced(double.client(), NS);
    let job = |n: usize| Job {
        metadata: meta(&"j".repeat(n)),
        spec: valid_cron_job().spec.unwrap().job_template.spec,
        ..Job::default()
    };
    let s = refused(jobs.create(&PostParams::default(), &job(64)).await);
    assert_invalid(
        &s,
        "Job",
        "metadata.name",
        "must be no more than 63 characters",
    );
    jobs.create(&PostParams::default(), &job(63)).await.unwrap();
}

/// The smallest CronJob the API server takes: a schedule and a Job template whose pod never restarts.
fn valid_cron_job() -> CronJob {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": "audit"},
        "spec": {
            "schedule": "0 2 * * *",
            "jobTemplate": {"spec": {"template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "audit", "image": "img:1"}]
            }}}}
        }
    }))
    .unwrap()
}

#[tokio::test]
async fn cron_jobs_are_refused_for_what_the_api_server_refuses() {
    let double = ApiDouble::new();
    let cron = Api::<CronJob>::namespaced(double.client(), NS);
    let with = |patch: serde_json::Value| {
        let mut c = serde_json::to_value(valid_cron_job()).unwrap();
        json_patch(&mut c, patch);
        serde_json::from_value::<CronJob>(c).unwrap()
    };
    let cases = [
        (
            serde_json::json!({"spec": {"timeZone": "Europe/Berln"}}),
            "spec.timeZone",
            "unknown time zone Europe/Berln",
        ),
        (
            serde_json::json!({"spec": {"schedule": "CRON_TZ=UTC 0 2 * * *"}}),
            "spec.schedule",
            "use timeZone field instead",
        ),
        (
            serde_json::json!({"spec": {"jobTemplate": {"spec": {"template": {"spec": {"restartPolicy": "Always"}}}}}}),
            "spec.jobTemplate.spec.template.spec.restartPolicy",
            "Unsupported value",
        ),
        (
            serde_json::json!({"spec": {"jobTemplate": {"spec": {
                "template": {"spec": {"restartPolicy": "OnFailure"}},
                "podFailurePolicy": {"rules": [{"action": "FailJob",
                    "onExitCodes": {"containerName": "audit", "operator": "In", "values": [1]}}]}
            }}}}),
            "spec.jobTemplate.spec.template.spec.restartPolicy",
            "only \"Never\" is supported when podFailurePolicy is specified",
        ),
        (
            serde_json::json!({"spec": {"jobTemplate": {"spec": {
                "podFailurePolicy": {"rules": [{"action": "FailJob",
                    "onExitCodes": {"containerName": "worker", "operator": "In", "values": [2, 1]}}]}
            }}}}),
            "spec.jobTemplate.spec.podFailurePolicy.rules[0].onExitCodes.containerName",
            "must be one of the container",
        ),
    ];
    for (i, (patch, field, message)) in cases.into_iter().enumerate() {
        let mut c = with(patch);
        c.metadata.name = Some(format!("audit-{i}"));
        let s = refused(cron.create(&PostParams::default(), &c).await);
        assert_invalid(&s, "CronJob", field, message);
    }
    let mut ok = with(
        serde_json::json!({"spec": {"timeZone": "Europe/Berlin", "jobTemplate": {"spec": {
            "podFailurePolicy": {"rules": [
                {"action": "FailJob", "onExitCodes": {"containerName": "audit", "operator": "In", "values": [1]}},
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
            ]}
        }}}}),
    );
    ok.metadata.name = Some("audit-ok".into());
    cron.create(&PostParams::default(), &ok).await.unwrap();
}

/// Merges `patch` into `target` (objects key by key, anything else replaced), as a JSON merge patch does.
fn json_patch(target: &mut serde_json::Value, patch: serde_json::Value) {
    match (target, patch) {
        (serde_json::Value::Object(t), serde_json::Value::Object(p)) => {
            for (k, v) in p {
                json_patch(t.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (t, p) => *t = p,
    }
}

#[tokio::test]
async fn label_keys_and_values_are_checked() {
    let double = ApiDouble::new();
    let labelled = |k: &str, v: &str| {
        let mut cm = config_map("labelled");
        cm.metadata.labels = Some(BTreeMap::from([(k.to_string(), v.to_string())]));
        cm
    };
    for (k, v, says) in [
        (
            "sync.meshline.io/flow",
            "x".repeat(64),
            "must be no more than 63 characters",
        ),
        (
            "sync.meshline.io/flow",
            "-flow".to_string(),
            "a valid label must be an empty string",
        ),
        (
            "sync.meshline.io/flow",
            "a:b".to_string(),
            "a valid label must be an empty string",
        ),
        (
            "Sync.Meshline.io/flow",
            "ok".to_string(),
            "prefix part a lowercase RFC 1123 subdomain",
        ),
        (
            "sync.meshline.io/bad key",
            "ok".to_string(),
            "name part must consist of alphanumeric characters",
        ),
    ] {
        let s = refused(create_cm(&double, &labelled(k, &v)).await);
        assert_invalid(&s, "ConfigMap", "metadata.labels", says);
    }
    create_cm(&double, &labelled("sync.meshline.io/flow", &"x".repeat(63)))
        .await
        .unwrap();
    create_cm(&double, &labelled("sync.meshline.io/flow", ""))
        .await
        .unwrap();

    // Pod template labels of a workload are labels too.
    let api = Api::<Job>::namespaced(double.client(), NS);
    let job: Job = serde_json::from_value(json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "replay", "namespace": NS},
        "spec": {"template": {"metadata": {"labels": {"sync.meshline.io/flow": "y".repeat(70)}}, "spec": {"containers": []}}}
    }))
    .unwrap();
    let s = refused(api.create(&PostParams::default(), &job).await);
    assert_invalid(
        &s,
        "Job",
        "spec.template.metadata.labels",
        "must be no more than 63 characters",
    );
}

#[tokio::test]
async fn annotations_and_data_have_a_total_size() {
    let double = ApiDouble::new();
    let mut cm = config_map("annotated");
    cm.metadata.annotations = Some(BTreeMap::from([
        ("a".to_string(), "x".repeat(ANNOTATIONS_MAX_BYTES / 2)),
        ("b".to_string(), "x".repeat(ANNOTATIONS_MAX_BYTES / 2)),
    ]));
    let s = refused(create_cm(&double, &cm).await);
    assert_invalid(
        &s,
        "ConfigMap",
        "metadata.annotations",
        "Too long: must have at most 262144 bytes",
    );
    cm.metadata.annotations = Some(BTreeMap::from([(
        "a".to_string(),
        "x".repeat(ANNOTATIONS_MAX_BYTES - 1),
    )]));
    create_cm(&double, &cm).await.unwrap();

    let mut cm = config_map("big");
    cm.data = Some(BTreeMap::from([(
        "flow.yaml".to_string(),
        "x".repeat(DATA_MAX_BYTES),
    )]));
    let s = refused(create_cm(&double, &cm).await);
    assert_invalid(
        &s,
        "ConfigMap",
        "data",
        "Too long: must have at most 1048576 bytes",
    );
    cm.data = Some(BTreeMap::from([(
        "flow.yaml".to_string(),
        "x".repeat(DATA_MAX_BYTES - "flow.yaml".len()),
    )]));
    create_cm(&double, &cm).await.unwrap();
}

#[tokio::test]
async fn status_apply_without_api_version_and_kind_is_a_bad_request() {
    let double = ApiDouble::new();
    let mut contract: meshline::api::SyncContract = serde_yaml::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/hubspot-odoo/contract.yaml"
        ))
        .unwrap(),
    )
    .unwrap();
    contract.metadata.namespace = Some(NS.into());
    double.put(
        &format!(
            "/apis/sync.meshline.io/v1alpha1/namespaces/{NS}/synccontracts/deal-to-sale-order"
        ),
        serde_json::to_value(&contract).unwrap(),
    );
    let api = Api::<meshline::api::SyncContract>::namespaced(double.client(), NS);
    let pp = PatchParams::apply("meshline-controller").force();
    let s = refused(
        api.patch_status(
            "deal-to-sale-order",
            &pp,
            &Patch::Apply(json!({"status": {"currentVersion": "2.0.1"}})),
        )
        .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (400, "BadRequest"), "{s:?}");
    assert!(
        s.message
            .contains("Incorrect version specified in apply patch. Specified patch version: , expected: sync.meshline.io/v1alpha1"),
        "{}",
        s.message
    );
    let s = refused(
        api.patch_status(
            "deal-to-sale-order",
            &pp,
            &Patch::Apply(json!({"apiVersion": "sync.meshline.io/v1alpha1", "status": {}})),
        )
        .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (400, "BadRequest"), "{s:?}");
    assert!(
        s.message.contains("Object 'Kind' is missing"),
        "{}",
        s.message
    );
    api.patch_status(
        "deal-to-sale-order",
        &pp,
        &Patch::Apply(json!({
            "apiVersion": "sync.meshline.io/v1alpha1", "kind": "SyncContract",
            "status": {"currentVersion": "2.0.1"}
        })),
    )
    .await
    .unwrap();
    // A merge patch needs neither.
    api.patch_status(
        "deal-to-sale-order",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {}})),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_refused_write_is_still_recorded() {
    let double = ApiDouble::new();
    refused(create_cm(&double, &config_map("Bad_Name")).await);
    let requests = double.take();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].method, "POST");
    assert_eq!(requests[0].body["metadata"]["name"], "Bad_Name");
    assert_eq!(requests[0].answered, 422);
}

#[tokio::test]
async fn custom_resource_status_beyond_the_crd_bounds_is_refused() {
    let double = ApiDouble::new();
    let api = Api::<meshline::api::SyncFlow>::namespaced(double.client(), NS);
    let pp = PatchParams::apply("meshline-controller").force();
    let status = |message: String| {
        json!({
            "apiVersion": "sync.meshline.io/v1alpha1", "kind": "SyncFlow",
            "status": {"conditions": [{"type": "Ready", "status": "False", "reason": "LedgerUnavailable", "message": message}]}
        })
    };
    let s = refused(
        api.patch_status("won-deals", &pp, &Patch::Apply(status("m".repeat(4097))))
            .await,
    );
    assert_invalid(
        &s,
        "SyncFlow",
        "status.conditions[0].message",
        "Too long: may not be more than 4096 bytes",
    );
    assert!(
        s.message
            .starts_with("SyncFlow.sync.meshline.io \"won-deals\" is invalid"),
        "{}",
        s.message
    );
    // At the bound it is accepted (the double answers with what it was sent, which is not a whole SyncFlow,
    // so only the refusal matters here).
    assert!(!matches!(
        api.patch_status("won-deals", &pp, &Patch::Apply(status("m".repeat(4096))))
            .await,
        Err(kube::Error::Api(_))
    ));
}

#[tokio::test]
async fn an_event_note_over_1_kib_is_refused() {
    let double = ApiDouble::new();
    let api = Api::<k8s_openapi::api::events::v1::Event>::namespaced(double.client(), NS);
    let event = |note: String| k8s_openapi::api::events::v1::Event {
        metadata: meta("won-deals.1"),
        note: Some(note),
        event_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        )),
        ..Default::default()
    };
    // 600 two-byte characters: within 1,000 characters, over 1,024 bytes.
    let s = refused(
        api.create(&PostParams::default(), &event("é".repeat(600)))
            .await,
    );
    assert_invalid(
        &s,
        "Event",
        "note",
        "Too long: must have at most 1024 bytes",
    );
    api.create(
        &PostParams::default(),
        &event(meshline::controller::flow::event_note(&"é".repeat(600))),
    )
    .await
    .unwrap();
}

fn endpoint_slice(name: &str, service: &str, pod: &str) -> serde_json::Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": NS, "labels": {
            "kubernetes.io/service-name": service,
            "app.kubernetes.io/managed-by": "meshline-controller",
        }},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.1.0.7"], "conditions": {"ready": true, "serving": false},
                       "targetRef": {"kind": "Pod", "name": pod}}],
    })
}

fn slice_path(name: &str) -> String {
    format!("/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices/{name}")
}

#[tokio::test]
async fn endpoint_slices_are_listed_by_label_selector_and_a_malformed_selector_is_refused() {
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use kube::api::ListParams;
    let double = ApiDouble::new();
    double.put(
        &slice_path("a-status-x1"),
        endpoint_slice("a-status-x1", "meshline-a-status", "pod-a"),
    );
    double.put(
        &slice_path("a-x2"),
        endpoint_slice("a-x2", "meshline-a", "pod-a"),
    );
    double.put(
        "/apis/discovery.k8s.io/v1/namespaces/elsewhere/endpointslices/b-status-x3",
        endpoint_slice("b-status-x3", "meshline-a-status", "pod-b"),
    );
    let client = double.client();
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NS);
    let status_only = slices
        .list(&ListParams::default().labels("kubernetes.io/service-name=meshline-a-status"))
        .await
        .unwrap();
    let names: Vec<_> = status_only
        .items
        .iter()
        .map(|s| s.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, vec!["a-status-x1"]);
    assert!(status_only.metadata.resource_version.is_some());
    // Set-based and negated requirements, as labels.Parse reads them.
    let not_status = slices
        .list(&ListParams::default().labels(
            "kubernetes.io/service-name notin (meshline-a-status),app.kubernetes.io/managed-by",
        ))
        .await
        .unwrap();
    assert_eq!(not_status.items.len(), 1);
    assert_eq!(not_status.items[0].metadata.name.as_deref(), Some("a-x2"));
    // Across namespaces.
    let all: Api<EndpointSlice> = Api::all(client.clone());
    let everywhere = all
        .list(&ListParams::default().labels("kubernetes.io/service-name==meshline-a-status"))
        .await
        .unwrap();
    assert_eq!(everywhere.items.len(), 2);
    // A value that is not a label value is a 400, as the API server answers it.
    let s = refused(
        slices
            .list(&ListParams::default().labels("kubernetes.io/service-name=-bad-"))
            .await,
    );
    assert_eq!(s.code, 400, "{s:?}");
    assert_eq!(s.reason, "BadRequest");
    assert!(
        s.message.starts_with("unable to parse requirement"),
        "{}",
        s.message
    );
    let s = refused(
        slices
            .list(&ListParams::default().labels("kubernetes.io/service-name in (a"))
            .await,
    );
    assert_eq!(s.code, 400, "{s:?}");
}

#[tokio::test]
async fn an_endpoint_slice_watch_sees_every_change_after_its_version_and_only_what_it_selects() {
    use futures::{StreamExt, TryStreamExt};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use kube::api::{ListParams, WatchEvent, WatchParams};
    let double = ApiDouble::new();
    double.put(
        &slice_path("a-status-x1"),
        endpoint_slice("a-status-x1", "meshline-a-status", "pod-a"),
    );
    let client = double.client();
    let slices: Api<EndpointSlice> = Api::namespaced(client, NS);
    let selector = "kubernetes.io/service-name=meshline-a-status";
    let version = slices
        .list(&ListParams::default().labels(selector))
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    // Changes between the list and the watch are not lost: the watch starts from the list's version.
    double.put(
        &slice_path("a-status-x1"),
        endpoint_slice("a-status-x1", "meshline-a-status", "pod-a2"),
    );
    double.put(
        &slice_path("other"),
        endpoint_slice("other", "meshline-b-status", "pod-b"),
    );
    let mut events = slices
        .watch(&WatchParams::default().labels(selector), &version)
        .await
        .unwrap()
        .boxed();
    match events.try_next().await.unwrap().unwrap() {
        WatchEvent::Modified(s) => assert_eq!(
            s.endpoints[0].target_ref.as_ref().unwrap().name.as_deref(),
            Some("pod-a2")
        ),
        other => panic!("{other:?}"),
    }
    // And after the watch opened.
    double.put(
        &slice_path("a-status-x4"),
        endpoint_slice("a-status-x4", "meshline-a-status", "pod-c"),
    );
    double.remove(&slice_path("a-status-x1"));
    match events.try_next().await.unwrap().unwrap() {
        WatchEvent::Added(s) => assert_eq!(s.metadata.name.as_deref(), Some("a-status-x4")),
        other => panic!("{other:?}"),
    }
    match events.try_next().await.unwrap().unwrap() {
        WatchEvent::Deleted(s) => assert_eq!(s.metadata.name.as_deref(), Some("a-status-x1")),
        other => panic!("{other:?}"),
    }
}

/// A worker Deployment with the given pod spec fields, applied as the controller applies it.
async fn apply_deployment(
    double: &ApiDouble,
    pod_spec: serde_json::Value,
) -> Result<k8s_openapi::api::apps::v1::Deployment, kube::Error> {
    let mut spec = json!({"containers": [{"name": "worker", "image": "img:1"}]});
    for (k, v) in pod_spec.as_object().unwrap() {
        spec[k] = v.clone();
    }
    let d: k8s_openapi::api::apps::v1::Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "meshline-flow", "namespace": NS},
        "spec": {
            "selector": {"matchLabels": {"sync.meshline.io/flow": "flow"}},
            "template": {"metadata": {"labels": {"sync.meshline.io/flow": "flow"}}, "spec": spec}
        }
    }))
    .unwrap();
    Api::namespaced(double.client(), NS)
        .patch(
            "meshline-flow",
            &PatchParams::apply("meshline-controller").force(),
            &Patch::Apply(&d),
        )
        .await
}

#[tokio::test]
async fn pod_scheduling_and_identity_fields_are_checked() {
    let double = ApiDouble::new();
    let field = "spec.template.spec";
    for (pod, at, says) in [
        (
            json!({"serviceAccountName": "Sync_Workers"}),
            format!("{field}.serviceAccountName"),
            "a lowercase RFC 1123 subdomain",
        ),
        (
            json!({"priorityClassName": "-high"}),
            format!("{field}.priorityClassName"),
            "a lowercase RFC 1123 subdomain",
        ),
        (
            json!({"nodeSelector": {"pool": "a b"}}),
            format!("{field}.nodeSelector"),
            "a valid label must be an empty string",
        ),
        (
            json!({"nodeSelector": {"bad key": "a"}}),
            format!("{field}.nodeSelector"),
            "name part must consist of alphanumeric characters",
        ),
        (
            json!({"tolerations": [{"key": "dedicated", "operator": "Exists", "value": "sync"}]}),
            format!("{field}.tolerations[0].operator"),
            "value must be empty when `operator` is 'Exists'",
        ),
        (
            json!({"tolerations": [{"operator": "Equal", "value": "sync"}]}),
            format!("{field}.tolerations[0].operator"),
            "operator must be Exists when `key` is empty",
        ),
        (
            json!({"tolerations": [{"key": "k", "operator": "Matches"}]}),
            format!("{field}.tolerations[0].operator"),
            "Unsupported value: \"Matches\"",
        ),
        (
            json!({"tolerations": [{"key": "k", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 30}]}),
            format!("{field}.tolerations[0].effect"),
            "effect must be 'NoExecute' when `tolerationSeconds` is set",
        ),
        (
            json!({"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{"topologyKey": ""}]}}}),
            format!(
                "{field}.affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution[0].topologyKey"
            ),
            "Required value: can not be empty",
        ),
        (
            json!({"affinity": {"podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 101, "podAffinityTerm": {"topologyKey": "zone"}}]}}}),
            format!(
                "{field}.affinity.podAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].weight"
            ),
            "must be in the range 1-100",
        ),
        (
            json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}}}),
            format!(
                "{field}.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms"
            ),
            "Required value",
        ),
        (
            json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In"}]}]}}}}),
            format!(
                "{field}.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].values"
            ),
            "Required value",
        ),
    ] {
        let s = refused(apply_deployment(&double, pod.clone()).await);
        assert_invalid(&s, "Deployment", &at, says);
    }
    // What a platform team sets in practice is accepted.
    apply_deployment(
        &double,
        json!({
            "serviceAccountName": "sync-workers",
            "priorityClassName": "business-critical",
            "imagePullSecrets": [{"name": "regcred"}],
            "nodeSelector": {"node.kubernetes.io/pool": "integration"},
            "tolerations": [
                {"key": "dedicated", "operator": "Equal", "value": "sync", "effect": "NoSchedule"},
                {"operator": "Exists"},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 60}
            ],
            "affinity": {
                "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "cpu", "operator": "Gt", "values": ["2"]}]}]}},
                "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                    {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                     "labelSelector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]}}}]}
            }
        }),
    )
    .await
    .unwrap();
}
