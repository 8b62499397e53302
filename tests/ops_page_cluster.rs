//! The operations page as the controller serves it (`ClusterBackend`): flows and rosters from the controller's
//! caches, worker requests along its status path to a pod its status Service publishes, with the flow's token
//! from the Secret the controller made and the person's own token as the identity; a standby replica refuses.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::ObjectMeta;
use kube::runtime::watcher;
use meshline::api::{AuditOutcome, FlowAuditStatus, OwnershipRoster, SyncFlow};
use meshline::controller::Stores;
use meshline::controller::flow::build::{TOKEN_KEY, status_service_name, token_name};
use meshline::controller::poll::{FetchError, WorkerAnswer, WorkerPod, WorkerStatusSource};
use meshline::ops_page::cluster::ClusterBackend;

const NS: &str = "commerce-sync";
const FLOW: &str = "won-deals-to-odoo";
const FLOW_TOKEN: &str = "flow-token-0c61f2";

fn example<T: serde::de::DeserializeOwned>(file: &str) -> T {
    let text = std::fs::read_to_string(format!(
        "{}/examples/hubspot-odoo/{file}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    serde_yaml::from_str(&text).unwrap()
}

/// One call as the worker saw it: pod, method, path, flow token, identity, body.
type Call = (
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
);

/// The worker pods, answering every call with `200 {"items": []}` and remembering what reached them.
#[derive(Default)]
struct Pods {
    calls: Mutex<Vec<Call>>,
}

#[async_trait::async_trait]
impl WorkerStatusSource for Pods {
    async fn fetch(
        &self,
        _namespace: &str,
        _pod: &WorkerPod,
        _token: Option<&str>,
    ) -> Result<WorkerAnswer, FetchError> {
        unreachable!("the page reads status from the cache, not from the pods")
    }

    async fn call(
        &self,
        namespace: &str,
        pod: &WorkerPod,
        method: http::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), FetchError> {
        self.call_as(namespace, pod, method, path, token, None, body)
            .await
    }

    async fn call_as(
        &self,
        namespace: &str,
        pod: &WorkerPod,
        method: http::Method,
        path: &str,
        token: Option<&str>,
        identity: Option<&str>,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), FetchError> {
        assert_eq!(namespace, NS);
        self.calls.lock().unwrap().push((
            pod.name.clone(),
            method.to_string(),
            path.to_string(),
            token.map(str::to_string),
            identity.map(str::to_string),
            body.map(|b| String::from_utf8_lossy(b).into_owned()),
        ));
        if path.starts_with("/records/") && identity != Some("marcus-personal-token-7f3a9c21") {
            return Ok((
                403,
                br#"{"error":"who decides is not known: send your personal token"}"#.to_vec(),
            ));
        }
        // One held record and one dead letter for the flow page's lists.
        let item = serde_json::json!({
            "id": 7, "generation": 2, "source_key": "0065g0000000000777", "hold_rule": "discount-over-30",
            "hold_role": "finance", "dead_letter_reason": "erp:400", "last_error": "Invalid item",
            "payload": {"discount": 35},
        });
        Ok((
            200,
            serde_json::json!({"items": [item], "record": 7})
                .to_string()
                .into_bytes(),
        ))
    }
}

struct Page {
    base: String,
    pods: Arc<Pods>,
    leading: Arc<AtomicBool>,
    http: reqwest::Client,
    /// The caches' writing ends, kept as the reflectors keep theirs.
    _writers: meshline::controller::Writers,
}

/// The controller's caches holding the example's flow (with a last audit), roster and token Secret, and the
/// flow's status Service publishing an unready and a ready pod; the page served over them.
async fn serve() -> Page {
    let (stores, mut writers) = Stores::new();
    let mut flow: SyncFlow = example("flow.yaml");
    flow.metadata.namespace = Some(NS.into());
    flow.status.get_or_insert_with(Default::default).audit = Some(FlowAuditStatus {
        run: 4,
        outcome: Some(AuditOutcome::Partial),
        partial_reason: Some("odoo: <unreachable>".into()),
        started_at: "2026-12-01T02:00:00Z".into(),
        window_from: "2026-11-24T02:00:00Z".into(),
        window_to: "2026-12-01T02:00:00Z".into(),
        ..Default::default()
    });
    writers
        .flows
        .apply_watcher_event(&watcher::Event::Apply(flow));
    let mut roster: OwnershipRoster = example("roster.yaml");
    roster.metadata.namespace = Some(NS.into());
    writers
        .rosters
        .apply_watcher_event(&watcher::Event::Apply(roster));
    writers
        .tokens
        .apply_watcher_event(&watcher::Event::Apply(Secret {
            metadata: ObjectMeta {
                name: Some(token_name(FLOW)),
                namespace: Some(NS.into()),
                ..ObjectMeta::default()
            },
            data: Some([(TOKEN_KEY.to_string(), ByteString(FLOW_TOKEN.into()))].into()),
            ..Secret::default()
        }));
    let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "status-abc12", "namespace": NS,
                     "labels": {"kubernetes.io/service-name": status_service_name(FLOW)}},
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": ["10.0.0.7"], "conditions": {"ready": true, "serving": false},
             "targetRef": {"kind": "Pod", "name": "worker-a"}},
            {"addresses": ["10.0.0.8"], "conditions": {"ready": true, "serving": true},
             "targetRef": {"kind": "Pod", "name": "worker-b"}}
        ]
    }))
    .unwrap();
    writers
        .endpoint_slices
        .apply_watcher_event(&watcher::Event::Apply(slice));
    let pods = Arc::new(Pods::default());
    let leading = Arc::new(AtomicBool::new(false));
    let backend = Arc::new(ClusterBackend {
        stores,
        source: pods.clone(),
        leading: leading.clone(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(meshline::ops_page::serve(listener, backend));
    Page {
        base,
        pods,
        leading,
        http: reqwest::Client::new(),
        _writers: writers,
    }
}

/// The CSRF token the flow page put into its forms, and the cookie it set.
async fn form_credentials(page: &Page) -> (String, String) {
    let response = page
        .http
        .get(format!("{}/flows/{NS}/{FLOW}", page.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let cookie = response.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let body = response.text().await.unwrap();
    let at = body.find("name=\"csrf\" value=\"").unwrap() + "name=\"csrf\" value=\"".len();
    (cookie, body[at..at + 64].to_string())
}

#[tokio::test]
async fn a_standby_refuses_and_the_leader_shows_its_cached_flows_with_their_last_audit() {
    let page = serve().await;
    let standby = page.http.get(&page.base).send().await.unwrap();
    assert_eq!(standby.status(), 503);
    assert!(
        standby
            .text()
            .await
            .unwrap()
            .contains("only the leader serves the operations page")
    );

    page.leading.store(true, Ordering::Relaxed);
    let main = page.http.get(&page.base).send().await.unwrap();
    assert_eq!(main.status(), 200);
    let body = main.text().await.unwrap();
    assert!(body.contains(FLOW), "{body}");
    assert!(
        body.contains("partial (run 4"),
        "the cached status's audit: {body}"
    );
    assert!(
        body.contains("odoo: &lt;unreachable&gt;"),
        "escaped: {body}"
    );
    let exceptions = page
        .http
        .get(format!("{}/exceptions", page.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        exceptions.contains("Tomas Novak (Accounting) (commerce-sync/tomas)")
            && exceptions.contains("sink owner of flows by selector"),
        "the cached roster's owners: {exceptions}"
    );
}

#[tokio::test]
async fn a_decision_reaches_a_ready_pod_with_the_flow_token_and_the_persons_own_token() {
    let page = serve().await;
    page.leading.store(true, Ordering::Relaxed);
    let (cookie, csrf) = form_credentials(&page).await;
    // Reading the flow page listed its holds and dead letters from a ready pod, with the flow's token only.
    {
        let calls = page.pods.calls.lock().unwrap();
        assert!(!calls.is_empty());
        for (pod, method, _, token, identity, _) in calls.iter() {
            assert_eq!((pod.as_str(), method.as_str()), ("worker-b", "GET"));
            assert_eq!(token.as_deref(), Some(FLOW_TOKEN));
            assert_eq!(identity, &None);
        }
    }
    let decide = |identity: &'static str| {
        page.http
            .post(format!("{}/flows/{NS}/{FLOW}/records/7/approve", page.base))
            .header("origin", page.base.clone())
            .header("sec-fetch-site", "same-origin")
            .header("cookie", &cookie)
            .form(&[
                ("csrf", csrf.as_str()),
                ("identity", identity),
                ("reason", "discount agreed with the customer"),
                ("generation", "2"),
                ("role", "finance"),
            ])
            .send()
    };
    let approved = decide("marcus-personal-token-7f3a9c21").await.unwrap();
    assert_eq!(approved.status(), 200);
    let refused = decide("someone-elses-token-11aa22bb").await.unwrap();
    assert_eq!(
        refused.status(),
        403,
        "the worker's refusal is what the person reads"
    );
    assert!(
        refused
            .text()
            .await
            .unwrap()
            .contains("who decides is not known")
    );
    let calls = page.pods.calls.lock().unwrap().clone();
    let posts: Vec<&Call> = calls.iter().filter(|c| c.1 == "POST").collect();
    assert_eq!(posts.len(), 2, "{calls:?}");
    let (pod, _, path, token, identity, body) = posts[0];
    assert_eq!(pod, "worker-b", "a ready pod answers");
    assert_eq!(path, "/records/7/approve");
    assert_eq!(token.as_deref(), Some(FLOW_TOKEN));
    assert_eq!(identity.as_deref(), Some("marcus-personal-token-7f3a9c21"));
    let body: serde_json::Value = serde_json::from_str(body.as_deref().unwrap()).unwrap();
    assert_eq!(body["seen"]["generation"], 2);
    assert_eq!(body["seen"]["holdRole"], "finance");
}

#[tokio::test]
async fn a_flow_the_controller_does_not_know_is_not_found_and_reaches_no_pod() {
    let page = serve().await;
    page.leading.store(true, Ordering::Relaxed);
    let missing = page
        .http
        .get(format!("{}/flows/{NS}/no-such-flow", page.base))
        .send()
        .await
        .unwrap();
    assert!(missing.status().is_client_error(), "{}", missing.status());
    assert!(page.pods.calls.lock().unwrap().is_empty());
}
