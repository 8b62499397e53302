//! `meshline rollout` (issue #15) as a person runs it: the real binary, with KUBECONFIG naming a local HTTP
//! server that answers as the Kubernetes API server does for the objects the command touches. A small
//! "controller" task beside it acts on the rollout-command annotation the way the real one does: it runs the
//! pure state machine (`rollout::canary::decide`) with the command, writes `status.canary`, and records an
//! Event for a command it refuses.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use meshline::api::{CanaryPolicy, CanaryStatus, SyncFlow, TrackMeasures};
use meshline::rollout::canary::{
    self, COMMAND_ANNOTATION, Candidate, Command, Inputs, Measured, Observed,
};
use serde_json::{Value, json};

const NS: &str = "commerce-sync";
const FLOW: &str = "won-deals-to-odoo";
const CONTRACT: &str = "deal-to-sale-order";
const CANDIDATE: Candidate<'static> = Candidate {
    revision: "deal-to-sale-order-7f3a",
    version: "2.0.2",
};
const ACTIVE: &str = "deal-to-sale-order-1c2d";

fn policy() -> CanaryPolicy {
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
        p99_ms: Some(250),
        ..TrackMeasures::default()
    }
}

fn now() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now()
}

fn step(
    previous: Option<&CanaryStatus>,
    command: Option<Result<Command, String>>,
    measured: Option<Measured>,
    at: chrono::DateTime<chrono::Utc>,
) -> canary::Decision {
    let policy = policy();
    canary::decide(Inputs {
        policy: Some(&policy),
        shared_ledger: true,
        candidate: Some(CANDIDATE),
        active_revision: Some(ACTIVE),
        previous,
        command,
        observed: &Observed {
            applied_weight: Some(20),
            canary_pods: 1,
            ..Observed::default()
        },
        measured,
        now: at,
    })
}

/// A canary at its first step, its weight applied, with one inconclusive measurement (the canary dead-lettered
/// 8 % of its records, the stable track as much: the ERP, not the version).
fn progressing_canary() -> CanaryStatus {
    let t0 = now() - chrono::Duration::minutes(5);
    let st = step(None, None, None, t0).status.unwrap();
    let st = step(Some(&st), None, None, t0 + chrono::Duration::seconds(5))
        .status
        .unwrap();
    let st = step(
        Some(&st),
        None,
        Some(Measured::Taken {
            canary: measures(100, 8, "0.08"),
            stable: measures(400, 32, "0.08"),
        }),
        t0 + chrono::Duration::seconds(70),
    )
    .status
    .unwrap();
    assert_eq!(st.phase, canary::PROGRESSING);
    assert_eq!(st.measurements.len(), 1);
    assert_eq!(st.measurements[0].verdict, "Inconclusive");
    st
}

fn flow_object(canary: Option<CanaryStatus>) -> Value {
    let text = std::fs::read_to_string(format!(
        "{}/examples/hubspot-odoo/flow.yaml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let mut flow: SyncFlow = serde_yaml::from_str(&text).unwrap();
    flow.spec
        .rollout
        .get_or_insert_with(|| serde_json::from_value(json!({})).unwrap())
        .canary = Some(policy());
    flow.metadata.resource_version = Some("1".into());
    flow.metadata.generation = Some(1);
    let mut v = serde_json::to_value(&flow).unwrap();
    v["status"] = json!({"observedGeneration": 1, "canary": canary});
    v
}

fn contract_object() -> Value {
    let text = std::fs::read_to_string(format!(
        "{}/examples/hubspot-odoo/contract.yaml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let mut contract: Value = serde_yaml::from_str(&text).unwrap();
    contract["metadata"]["resourceVersion"] = json!("1");
    contract["status"] = json!({
            "activeRevision": ACTIVE, "candidateRevision": CANDIDATE.revision,
            "revisions": [
                {"name": ACTIVE, "version": "2.0.1", "contentHash": "sha256:a", "state": "Active"},
                {"name": CANDIDATE.revision, "version": "2.0.2", "contentHash": "sha256:b", "state": "Canary"}
            ]
    });
    contract
}

/// A PATCH as the API server received it.
#[derive(Clone, Debug)]
struct Patched {
    path: String,
    content_type: String,
    body: Value,
}

#[derive(Default)]
struct State {
    flows: BTreeMap<String, Value>,
    patches: Vec<Patched>,
    events: Vec<Value>,
}

#[derive(Clone)]
struct ApiServer {
    state: Arc<Mutex<State>>,
    patched: Arc<tokio::sync::Notify>,
}

fn not_found(resource: &str, name: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("{resource}.sync.meshline.io \"{name}\" not found"),
            "reason": "NotFound", "details": {"name": name, "group": "sync.meshline.io", "kind": resource},
            "code": 404
        })),
    )
        .into_response()
}

fn unprocessable(message: String) -> Response {
    (
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        axum::Json(json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": "UnsupportedMediaType", "code": 415
        })),
    )
        .into_response()
}

impl ApiServer {
    async fn handle(&self, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
        let path = uri.path().to_string();
        let flows = format!("/apis/sync.meshline.io/v1alpha1/namespaces/{NS}/syncflows/");
        let contract =
            format!("/apis/sync.meshline.io/v1alpha1/namespaces/{NS}/synccontracts/{CONTRACT}");
        let events = format!("/api/v1/namespaces/{NS}/events");
        if let Some(name) = path.strip_prefix(&flows) {
            let mut st = self.state.lock().unwrap();
            let Some(flow) = st.flows.get(name).cloned() else {
                return not_found("syncflows", name);
            };
            return match method {
                Method::GET => axum::Json(flow).into_response(),
                Method::PATCH => {
                    let content_type = headers
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    // The API server takes a merge patch only with its media type; any other body type would be
                    // read as something else (a strategic merge patch, an apply configuration).
                    if content_type != "application/merge-patch+json" {
                        return unprocessable(format!(
                            "the body of type {content_type} is unsupported"
                        ));
                    }
                    let patch: Value = match serde_json::from_slice(&body) {
                        Ok(v) => v,
                        Err(e) => {
                            return (StatusCode::BAD_REQUEST, e.to_string()).into_response();
                        }
                    };
                    st.patches.push(Patched {
                        path: path.clone(),
                        content_type,
                        body: patch.clone(),
                    });
                    let mut merged = flow;
                    merge(&mut merged, &patch);
                    let rv: u64 = merged["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap()
                        .parse()
                        .unwrap();
                    merged["metadata"]["resourceVersion"] = json!((rv + 1).to_string());
                    st.flows.insert(name.to_string(), merged.clone());
                    self.patched.notify_one();
                    axum::Json(merged).into_response()
                }
                _ => StatusCode::METHOD_NOT_ALLOWED.into_response(),
            };
        }
        if path == contract && method == Method::GET {
            return axum::Json(contract_object()).into_response();
        }
        if path == events && method == Method::GET {
            let query = uri.query().unwrap_or_default();
            let selector: String = url::form_urlencoded::parse(query.as_bytes())
                .find(|(k, _)| k == "fieldSelector")
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default();
            let st = self.state.lock().unwrap();
            let items: Vec<Value> = st
                .events
                .iter()
                .filter(|e| {
                    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
                        let (k, v) = term.split_once('=').unwrap();
                        let got = match k {
                            "involvedObject.kind" => &e["involvedObject"]["kind"],
                            "involvedObject.name" => &e["involvedObject"]["name"],
                            "reason" => &e["reason"],
                            _ => &Value::Null,
                        };
                        got == v
                    })
                })
                .cloned()
                .collect();
            return axum::Json(json!({
                "apiVersion": "v1", "kind": "EventList", "metadata": {"resourceVersion": "1"}, "items": items
            }))
            .into_response();
        }
        (StatusCode::NOT_FOUND, format!("no route {method} {path}")).into_response()
    }

    /// The fake controller: on each change of the flow, act on a command not acted on yet, as the flow
    /// reconcile does (the state machine decides; a refusal becomes an Event).
    async fn controller(self) {
        loop {
            self.patched.notified().await;
            let mut st = self.state.lock().unwrap();
            let flow = st.flows.get_mut(FLOW).unwrap();
            let previous: Option<CanaryStatus> =
                serde_json::from_value(flow["status"]["canary"].clone()).unwrap();
            let Some(value) = flow["metadata"]["annotations"][COMMAND_ANNOTATION].as_str() else {
                continue;
            };
            if previous.as_ref().and_then(|p| p.last_command.as_deref()) == Some(value) {
                continue;
            }
            let d = step(previous.as_ref(), Some(Command::parse(value)), None, now());
            flow["status"]["canary"] = serde_json::to_value(&d.status).unwrap();
            let refusals: Vec<Value> = d
                .notes
                .iter()
                .filter(|n| n.reason == "RolloutCommandRefused")
                .map(|n| {
                    json!({
                        "metadata": {"name": format!("{FLOW}.{}", n.reason.len()), "namespace": NS},
                        "involvedObject": {"kind": "SyncFlow", "name": FLOW, "namespace": NS},
                        "reason": n.reason, "message": n.message, "type": "Warning"
                    })
                })
                .collect();
            st.events.extend(refusals);
        }
    }
}

/// RFC 7386.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            for (k, v) in fields {
                if v.is_null() {
                    target.as_object_mut().unwrap().remove(k);
                } else {
                    merge(&mut target[k], v);
                }
            }
        }
        v => *target = v.clone(),
    }
}

struct Cluster {
    server: ApiServer,
    _dir: tempfile::TempDir,
    kubeconfig: std::path::PathBuf,
}

impl Cluster {
    /// The API server with the flow in `canary`; `controller` says whether a controller acts on commands.
    async fn start(canary: Option<CanaryStatus>, controller: bool) -> Cluster {
        let server = ApiServer {
            state: Arc::new(Mutex::new(State::default())),
            patched: Arc::new(tokio::sync::Notify::new()),
        };
        server
            .state
            .lock()
            .unwrap()
            .flows
            .insert(FLOW.into(), flow_object(canary));
        let s = server.clone();
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let s = s.clone();
                async move { s.handle(method, uri, headers, body).await }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        if controller {
            tokio::spawn(server.clone().controller());
        }
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: http://127.0.0.1:{port}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n    namespace: {NS}\ncurrent-context: test\nusers:\n- name: test\n  user:\n    token: test-token\n"
            ),
        )
        .unwrap();
        Cluster {
            server,
            _dir: dir,
            kubeconfig,
        }
    }

    async fn meshline(&self, args: &[&str]) -> (bool, String, String) {
        run_meshline(Some(&self.kubeconfig), args).await
    }

    fn flow(&self) -> Value {
        self.server.state.lock().unwrap().flows[FLOW].clone()
    }

    fn patches(&self) -> Vec<Patched> {
        self.server.state.lock().unwrap().patches.clone()
    }
}

async fn run_meshline(
    kubeconfig: Option<&std::path::Path>,
    args: &[&str],
) -> (bool, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshline"));
    cmd.args(args)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env("RUST_LOG", "warn");
    match kubeconfig {
        Some(k) => cmd.env("KUBECONFIG", k),
        None => cmd
            .env("KUBECONFIG", "/nonexistent/kubeconfig")
            .env("HOME", "/nonexistent"),
    };
    let out = cmd.output().await.unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn promote_sends_one_annotation_merge_patch_and_reports_what_the_controller_did() {
    let cluster = Cluster::start(Some(progressing_canary()), true).await;
    let (ok, stdout, stderr) = cluster
        .meshline(&["rollout", "promote", FLOW, "-n", NS, "--wait", "60s"])
        .await;
    assert!(ok, "stdout {stdout}\nstderr {stderr}");

    let patches = cluster.patches();
    assert_eq!(patches.len(), 1, "one PATCH: {patches:?}");
    let p = &patches[0];
    assert_eq!(
        p.path,
        format!("/apis/sync.meshline.io/v1alpha1/namespaces/{NS}/syncflows/{FLOW}")
    );
    assert_eq!(p.content_type, "application/merge-patch+json");
    // Only the annotation: nothing else of the object (Argo CD's to own) is sent back.
    let value = p.body["metadata"]["annotations"][COMMAND_ANNOTATION]
        .as_str()
        .expect("the command annotation")
        .to_string();
    assert_eq!(
        p.body,
        json!({"metadata": {"annotations": {COMMAND_ANNOTATION: value}}})
    );
    let command = Command::parse(&value).unwrap();
    assert_eq!(command.verb, canary::Verb::Promote);

    // The command the controller acted on is this one, and the output says what it led to.
    let canary = &cluster.flow()["status"]["canary"];
    assert_eq!(canary["lastCommand"], json!(value));
    assert_eq!(canary["phase"], canary::PROMOTING);
    assert!(stdout.contains("promote done"), "{stdout}");
    assert!(stdout.contains("Promoting (PromotedByUser)"), "{stdout}");
}

#[tokio::test]
async fn each_command_gets_a_fresh_id_so_a_second_pause_is_a_new_command() {
    let cluster = Cluster::start(Some(progressing_canary()), true).await;
    let (ok, stdout, stderr) = cluster.meshline(&["rollout", "pause", FLOW]).await;
    assert!(ok, "stdout {stdout}\nstderr {stderr}");
    assert!(stdout.contains("Paused (PausedByUser)"), "{stdout}");
    let (ok, stdout, stderr) = cluster.meshline(&["rollout", "resume", FLOW]).await;
    assert!(ok, "stdout {stdout}\nstderr {stderr}");
    assert!(stdout.contains("Progressing (ResumedByUser)"), "{stdout}");
    let patches = cluster.patches();
    assert_eq!(patches.len(), 2);
    assert_ne!(
        patches[0].body, patches[1].body,
        "each command has its own id"
    );
}

#[tokio::test]
async fn a_command_the_controller_refuses_exits_non_zero_with_its_reason() {
    let cluster = Cluster::start(Some(progressing_canary()), true).await;
    let (ok, stdout, stderr) = cluster.meshline(&["rollout", "retry", FLOW]).await;
    assert!(!ok, "a refused command fails: stdout {stdout}");
    assert!(
        stderr.contains(&format!(
            "SyncFlow {NS}/{FLOW}: the controller refused `retry`: retry: not possible while the rollout is Progressing"
        )),
        "{stderr}"
    );
    // Acted on (recorded) but the rollout is where it was.
    let canary = &cluster.flow()["status"]["canary"];
    assert_eq!(canary["phase"], canary::PROGRESSING);
    assert!(
        canary["lastCommand"]
            .as_str()
            .unwrap()
            .starts_with("retry:")
    );
}

#[tokio::test]
async fn status_prints_the_canary_its_figures_and_the_contracts_revisions() {
    let canary = progressing_canary();
    let cluster = Cluster::start(Some(canary.clone()), true).await;
    let (ok, stdout, stderr) = cluster
        .meshline(&["rollout", "status", FLOW, "-n", NS])
        .await;
    assert!(ok, "stderr {stderr}");
    for says in [
        format!("flow {NS}/{FLOW}"),
        format!(
            "contract {CONTRACT}: active revision {ACTIVE} (version 2.0.1), candidate revision {} (version 2.0.2)",
            CANDIDATE.revision
        ),
        format!(
            "canary: version 2.0.2 (revision {}) Progressing",
            CANDIDATE.revision
        ),
        "step 0 (1 of 2), weight 20% (applied 20%), step started 20".into(),
        "failed measurements 0, consecutive errors 0".into(),
        "Inconclusive".into(),
        // canary and stable: records/failure rate/dead-letter rate/p99
        "100/0.08/0.08/250ms".into(),
        "400/0.08/0.08/250ms".into(),
        "the sink or the source, not the version".into(),
    ] {
        assert!(stdout.contains(&says), "{says:?} missing from:\n{stdout}");
    }

    let (ok, stdout, _) = cluster
        .meshline(&["rollout", "status", FLOW, "--output", "json"])
        .await;
    assert!(ok);
    let printed: CanaryStatus = serde_json::from_str(&stdout).unwrap();
    assert_eq!(printed, canary);
    assert!(cluster.patches().is_empty(), "status writes nothing");
}

#[tokio::test]
async fn a_flow_without_a_canary_says_so() {
    let cluster = Cluster::start(None, true).await;
    let (ok, stdout, stderr) = cluster.meshline(&["rollout", "status", FLOW]).await;
    assert!(ok, "stderr {stderr}");
    assert!(
        stdout.contains("no canary rollout on this flow"),
        "{stdout}"
    );
    // Commanding it is an error, and nothing is written.
    let (ok, _, stderr) = cluster.meshline(&["rollout", "abort", FLOW]).await;
    assert!(!ok);
    assert!(
        stderr.contains(&format!("SyncFlow {NS}/{FLOW} has no canary rollout")),
        "{stderr}"
    );
    assert!(cluster.patches().is_empty());
}

#[tokio::test]
async fn an_unknown_flow_exits_non_zero_naming_it() {
    let cluster = Cluster::start(Some(progressing_canary()), true).await;
    for verb in ["status", "promote"] {
        let (ok, _, stderr) = cluster.meshline(&["rollout", verb, "nope", "-n", NS]).await;
        assert!(!ok, "{verb}");
        assert!(
            stderr.contains(&format!("SyncFlow {NS}/nope not found")),
            "{verb}: {stderr}"
        );
    }
}

#[tokio::test]
async fn without_a_cluster_the_error_says_how_to_name_one() {
    let (ok, _, stderr) = run_meshline(None, &["rollout", "status", FLOW]).await;
    assert!(!ok);
    assert!(
        stderr.contains("cannot reach a Kubernetes cluster"),
        "{stderr}"
    );
    assert!(stderr.contains("KUBECONFIG"), "{stderr}");
}

#[tokio::test]
async fn a_command_no_controller_acts_on_fails_after_the_wait_naming_the_flow() {
    let cluster = Cluster::start(Some(progressing_canary()), false).await;
    let (ok, _, stderr) = cluster
        .meshline(&["rollout", "abort", FLOW, "--wait", "1s"])
        .await;
    assert!(!ok);
    assert!(
        stderr.contains(&format!(
            "SyncFlow {NS}/{FLOW}: the controller did not act on `abort:"
        )),
        "{stderr}"
    );
    // The annotation stays for the controller to act on later.
    assert!(
        cluster.flow()["metadata"]["annotations"][COMMAND_ANNOTATION]
            .as_str()
            .unwrap()
            .starts_with("abort:")
    );

    // `--wait 0` sends it and returns.
    let (ok, stdout, _) = cluster
        .meshline(&["rollout", "pause", FLOW, "--wait", "0"])
        .await;
    assert!(ok);
    assert!(stdout.contains("not waiting"), "{stdout}");
    assert_eq!(cluster.patches().len(), 2);
}

/// The README's canary example is a rollout policy the CRD types accept, and its kubectl command writes the
/// annotation the controller reads.
#[test]
fn the_readmes_canary_example_is_what_the_flow_and_the_controller_accept() {
    let readme =
        std::fs::read_to_string(format!("{}/README.md", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let section = readme
        .split("## Canary rollouts of contract versions")
        .nth(1)
        .expect("the README's canary section");
    let yaml = section
        .split("```yaml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a YAML example");
    let flow: Value = serde_yaml::from_str(yaml).unwrap();
    let rollout: meshline::api::RolloutPolicy =
        serde_json::from_value(flow["spec"]["rollout"].clone()).unwrap();
    let canary = rollout.canary.expect("canary steps");
    let weights: Vec<u32> = canary.steps.iter().map(|s| s.weight).collect();
    assert!(weights.is_sorted() && !weights.is_empty(), "{weights:?}");
    assert!(canary.analysis.is_some());
    assert!(section.contains(&format!(
        "kubectl annotate syncflow won-deals-to-odoo {COMMAND_ANNOTATION}=promote:$(date +%s) --overwrite"
    )));
}
