//! An in-process Kubernetes API double for the controller tests and benchmark, in the `tower-test` pattern of
//! kube's own examples: every request the controller makes is recorded (method, path, query, body) and answered
//! from a small in-memory state, so a test can assert exactly which writes happened.
//!
//! Before answering a write, the double refuses what a real kube-apiserver refuses, with the same status code,
//! reason and `Status` body (see [`rules`], the one place those rules live): object names per kind, label keys
//! and values, the annotations' total size, the scheduling and identity fields of a pod template (service
//! account and priority class names, node selector, tolerations, affinity), a ConfigMap's or Secret's data size,
//! and server-side-apply patches
//! without the right `apiVersion` and `kind`. A controller bug of that class then fails a reconcile test here
//! instead of a reconcile on a cluster.
//!
//! Collections are listed and watched the way the API server serves them: a GET of a collection path answers a
//! `<Kind>List` with the `resourceVersion` it reflects, filtered by `labelSelector` (parsed and validated as
//! apimachinery does: a malformed selector is a 400); with `watch=true` the answer is a stream of
//! `{"type", "object"}` lines, starting after the given `resourceVersion` (nothing that happened after it is
//! missed) and open until the double is dropped. Every [`ApiDouble::put`] stamps a new `resourceVersion`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use futures::channel::mpsc;

use http::{Request, Response};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};

/// One request as the API server would have seen it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    /// `application/apply-patch+yaml` for a server-side apply, `application/merge-patch+json` for a merge patch.
    pub content_type: String,
    pub body: Value,
    /// The HTTP status the double answered with (a refusal is 4xx).
    pub answered: u16,
}

impl Recorded {
    pub fn is_write(&self) -> bool {
        self.method != "GET"
    }
    /// `fieldManager=meshline-controller` and `force=true`, as every server-side apply must carry.
    pub fn is_forced_apply(&self) -> bool {
        self.method == "PATCH"
            && self.query.contains("fieldManager=meshline-controller")
            && self.query.contains("force=true")
    }
    pub fn kind(&self) -> &str {
        self.body
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }
}

#[derive(Clone, Default)]
pub struct ApiDouble {
    pub requests: Arc<Mutex<Vec<Recorded>>>,
    /// Objects by their API path (without `/status`), answered to GET and used as the base of PATCH answers.
    pub objects: Arc<Mutex<BTreeMap<String, Value>>>,
    /// The change log the watches are served from, and the open watches.
    history: Arc<Mutex<History>>,
}

/// Every change since the double started (so a watch from any `resourceVersion` is served), and the watches.
#[derive(Default)]
struct History {
    version: u64,
    events: Vec<(u64, &'static str, String, Value)>,
    watches: Vec<Watch>,
}

struct Watch {
    collection: collections::Collection,
    selector: selectors::Selector,
    send: mpsc::UnboundedSender<Result<Vec<u8>, std::io::Error>>,
}

/// An object of the hubspot-odoo example (`examples/hubspot-odoo/<file>`).
pub fn load<T: serde::de::DeserializeOwned>(file: &str) -> T {
    let text = std::fs::read_to_string(format!(
        "{}/examples/hubspot-odoo/{file}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    serde_yaml::from_str(&text).unwrap()
}

/// Feeds `obj` into a controller cache as its watch would on a create or an update.
pub fn apply<K: kube::Resource<DynamicType = ()> + Clone>(
    w: &mut kube::runtime::reflector::store::Writer<K>,
    obj: K,
) {
    w.apply_watcher_event(&kube::runtime::watcher::Event::Apply(obj));
}

/// Removes `obj` from a controller cache as its watch would on a delete.
pub fn delete<K: kube::Resource<DynamicType = ()> + Clone>(
    w: &mut kube::runtime::reflector::store::Writer<K>,
    obj: K,
) {
    w.apply_watcher_event(&kube::runtime::watcher::Event::Delete(obj));
}

/// `contract` as the contract reconciler leaves it once its spec is the active revision: the status names the
/// revision and the revision cache holds it. Flow reconciles run the active revision, never the live spec.
pub fn activated(
    mut contract: meshline::api::SyncContract,
    revisions: &mut kube::runtime::reflector::store::Writer<
        k8s_openapi::api::apps::v1::ControllerRevision,
    >,
) -> meshline::api::SyncContract {
    use meshline::controller::contract::build;
    let hash = meshline::contract::content_hash(&contract.spec)
        .as_str()
        .to_string();
    let revision = build::controller_revision(&contract, &hash, 1);
    let name = revision.metadata.name.clone().unwrap();
    revisions.apply_watcher_event(&kube::runtime::watcher::Event::Apply(revision));
    let status = contract.status.get_or_insert_with(Default::default);
    status.active_revision = Some(name.clone());
    status.current_version = Some(contract.spec.version.clone());
    status.revisions.retain(|r| r.content_hash != hash);
    status.revisions.push(meshline::api::ContractRevision {
        name: Some(name),
        version: contract.spec.version.clone(),
        content_hash: hash,
        state: meshline::api::RevisionState::Active,
        ..Default::default()
    });
    contract
}

/// A controller context on `double` with empty caches, started with a test worker image: what the contract and
/// flow reconcile tests drive.
pub fn context(
    double: &ApiDouble,
) -> (
    Arc<meshline::controller::Context>,
    meshline::controller::Writers,
) {
    let (stores, writers) = meshline::controller::Stores::new();
    let ctx = Arc::new(meshline::controller::Context::new(
        double.client(),
        meshline::controller::flow::build::BuildSettings {
            worker_image: "ghcr.io/meshline/meshline:test".into(),
            ..Default::default()
        },
        stores,
        Arc::new(meshline::controller::metrics::Metrics::new()),
    ));
    (ctx, writers)
}

/// What a contract reconcile created (revisions, preflight Jobs), fed into the caches as the watches would
/// deliver them. A created Job carries the uid the double gave it.
#[derive(Default)]
pub struct Created {
    pub revisions: Vec<k8s_openapi::api::apps::v1::ControllerRevision>,
    pub jobs: Vec<k8s_openapi::api::batch::v1::Job>,
}

pub fn settle_created(
    requests: &[Recorded],
    writers: &mut meshline::controller::Writers,
) -> Created {
    use kube::runtime::watcher::Event;
    let mut created = Created::default();
    for r in requests.iter().filter(|r| r.method == "POST") {
        match r.kind() {
            "ControllerRevision" => {
                let rev: k8s_openapi::api::apps::v1::ControllerRevision =
                    serde_json::from_value(r.body.clone()).unwrap();
                writers
                    .revisions
                    .apply_watcher_event(&Event::Apply(rev.clone()));
                created.revisions.push(rev);
            }
            "Job" => {
                let mut job: k8s_openapi::api::batch::v1::Job =
                    serde_json::from_value(r.body.clone()).unwrap();
                job.metadata.uid = Some(format!("uid-{}", job.metadata.name.as_deref().unwrap()));
                writers.jobs.apply_watcher_event(&Event::Apply(job.clone()));
                created.jobs.push(job);
            }
            _ => {}
        }
    }
    created
}

fn watch_line(kind: &str, object: &Value) -> Vec<u8> {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap();
    line.push(b'\n');
    line
}

impl ApiDouble {
    pub fn new() -> ApiDouble {
        ApiDouble::default()
    }

    /// Starts the double and returns a client that talks to it. Needs a Tokio runtime.
    pub fn client(&self) -> Client {
        let (service, mut handle) =
            tower_test::mock::pair::<Request<Body>, Response<axum::body::Body>>();
        let me = self.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let bytes = http_body_util::BodyExt::collect(body)
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let mut recorded = Recorded {
                    method: parts.method.to_string(),
                    path: parts.uri.path().to_string(),
                    query: parts.uri.query().unwrap_or_default().to_string(),
                    content_type: parts
                        .headers
                        .get(http::header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string(),
                    body,
                    answered: 0,
                };
                if let Some(collection) = collections::collection(&recorded) {
                    let (status, body) = me.serve_collection(&collection, &recorded);
                    recorded.answered = status;
                    me.requests.lock().unwrap().push(recorded);
                    let response = Response::builder()
                        .status(status)
                        .header("content-type", "application/json")
                        .body(body)
                        .unwrap();
                    send.send_response(response);
                    continue;
                }
                let (status, answer) = match rules::check(&recorded) {
                    Ok(()) => me.answer(&recorded),
                    Err(refusal) => refusal,
                };
                recorded.answered = status;
                me.requests.lock().unwrap().push(recorded);
                let response = Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(axum::body::Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap();
                send.send_response(response);
            }
        });
        Client::new(service, "default")
    }

    fn answer(&self, r: &Recorded) -> (u16, Value) {
        let objects = self.objects.lock().unwrap();
        let base = r.path.trim_end_matches("/status").to_string();
        match r.method.as_str() {
            "GET" => match objects.get(&r.path) {
                Some(v) => (200, v.clone()),
                None => (404, not_found(&r.path)),
            },
            "PATCH" => {
                let mut answer = objects
                    .get(&base)
                    .cloned()
                    .unwrap_or_else(|| r.body.clone());
                if r.path.ends_with("/status") {
                    answer["status"] = r.body["status"].clone();
                } else if let (Some(a), Some(b)) = (answer.as_object_mut(), r.body.as_object()) {
                    for (k, v) in b {
                        if k == "spec"
                            && a.get("spec").is_some_and(Value::is_object)
                            && v.is_object()
                        {
                            for (sk, sv) in v.as_object().unwrap() {
                                a["spec"][sk] = sv.clone();
                            }
                        } else {
                            a.insert(k.clone(), v.clone());
                        }
                    }
                }
                (200, answer)
            }
            "POST" => {
                // The API server gives every created object its uid.
                let mut created = r.body.clone();
                if let Some(meta) = created.get_mut("metadata").and_then(Value::as_object_mut) {
                    let name = meta.get("name").and_then(Value::as_str).unwrap_or_default();
                    meta.insert("uid".into(), json!(format!("uid-{name}")));
                }
                (201, created)
            }
            "DELETE" => (
                200,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}),
            ),
            _ => (405, not_found(&r.path)),
        }
    }

    /// Stores an object under its API path with a new `resourceVersion`, and tells the watches that select it.
    pub fn put(&self, path: &str, mut object: Value) {
        let mut history = self.history.lock().unwrap();
        history.version += 1;
        let version = history.version;
        if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), json!(version.to_string()));
        }
        let existed = self
            .objects
            .lock()
            .unwrap()
            .insert(path.to_string(), object.clone())
            .is_some();
        let kind = if existed { "MODIFIED" } else { "ADDED" };
        history.record(version, kind, path, object);
    }

    /// Removes an object, as its deletion would, and tells the watches that selected it.
    pub fn remove(&self, path: &str) {
        let mut history = self.history.lock().unwrap();
        let Some(mut object) = self.objects.lock().unwrap().remove(path) else {
            return;
        };
        history.version += 1;
        let version = history.version;
        if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), json!(version.to_string()));
        }
        history.record(version, "DELETED", path, object);
    }

    /// A list or a watch of a collection.
    fn serve_collection(
        &self,
        collection: &collections::Collection,
        r: &Recorded,
    ) -> (u16, axum::body::Body) {
        let full = |status: u16, v: Value| {
            (
                status,
                axum::body::Body::from(serde_json::to_vec(&v).unwrap()),
            )
        };
        let query = collections::query(&r.query);
        let selector = match selectors::parse(query.get("labelSelector").map_or("", String::as_str))
        {
            Ok(s) => s,
            Err(message) => return full(400, rules::bad_request(message)),
        };
        let mut history = self.history.lock().unwrap();
        let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
        if !watching {
            let objects = self.objects.lock().unwrap();
            let items: Vec<Value> = objects
                .iter()
                .filter(|(path, object)| collection.holds(path) && selector.matches(object))
                .map(|(_, o)| o.clone())
                .collect();
            return full(
                200,
                json!({
                    "kind": format!("{}List", collection.kind), "apiVersion": collection.api_version(),
                    "metadata": {"resourceVersion": history.version.to_string()}, "items": items,
                }),
            );
        }
        let (send, receive) = mpsc::unbounded();
        // From a version: what happened after it. From none (or "0"): the objects there are now, as ADDED.
        let since = query
            .get("resourceVersion")
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|v| *v > 0);
        match since {
            Some(since) => {
                for (version, kind, path, object) in &history.events {
                    if *version > since && collection.holds(path) && selector.matches(object) {
                        let _ = send.unbounded_send(Ok(watch_line(kind, object)));
                    }
                }
            }
            None => {
                for (path, object) in self.objects.lock().unwrap().iter() {
                    if collection.holds(path) && selector.matches(object) {
                        let _ = send.unbounded_send(Ok(watch_line("ADDED", object)));
                    }
                }
            }
        }
        history.watches.push(Watch {
            collection: collection.clone(),
            selector,
            send,
        });
        (200, axum::body::Body::from_stream(receive))
    }

    pub fn put_secret(&self, namespace: &str, name: &str, keys: &[&str]) {
        let secret = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                ..Default::default()
            },
            data: Some(
                keys.iter()
                    .map(|k| (k.to_string(), ByteString(b"x".to_vec())))
                    .collect(),
            ),
            ..Default::default()
        };
        self.put(
            &format!("/api/v1/namespaces/{namespace}/secrets/{name}"),
            serde_json::to_value(secret).unwrap(),
        );
    }

    /// Drops the change log watches are replayed from, keeping the objects. For a long run without watches (the
    /// canary benchmark): the log keeps every version of every object written, which is the double's memory, not
    /// the controller's. A watch opened later from an old `resourceVersion` misses what was dropped.
    pub fn forget_history(&self) {
        self.history.lock().unwrap().events = Vec::new();
    }

    pub fn take(&self) -> Vec<Recorded> {
        std::mem::take(&mut *self.requests.lock().unwrap())
    }
}

impl History {
    fn record(&mut self, version: u64, kind: &'static str, path: &str, object: Value) {
        self.watches.retain(|w| {
            if !(w.collection.holds(path) && w.selector.matches(&object)) {
                return !w.send.is_closed();
            }
            w.send.unbounded_send(Ok(watch_line(kind, &object))).is_ok()
        });
        self.events.push((version, kind, path.to_string(), object));
    }
}

/// Which requests are lists or watches of a collection, and of which one.
pub mod collections {
    use std::collections::BTreeMap;

    use super::Recorded;

    /// A collection: every object of a resource, in one namespace or in all.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Collection {
        /// `/api/v1` or `/apis/<group>/<version>`.
        pub prefix: String,
        pub namespace: Option<String>,
        pub resource: String,
        pub kind: String,
        pub group: String,
        pub version: String,
    }

    impl Collection {
        pub fn api_version(&self) -> String {
            if self.group.is_empty() {
                self.version.clone()
            } else {
                format!("{}/{}", self.group, self.version)
            }
        }
        /// Whether the object at `path` belongs to this collection.
        pub fn holds(&self, path: &str) -> bool {
            let Some(rest) = path.strip_prefix(&self.prefix) else {
                return false;
            };
            let parts: Vec<&str> = rest.trim_matches('/').split('/').collect();
            match (parts.as_slice(), &self.namespace) {
                (["namespaces", ns, resource, _name], Some(want)) => {
                    ns == want && *resource == self.resource
                }
                (["namespaces", _, resource, _name], None) => *resource == self.resource,
                _ => false,
            }
        }
    }

    /// The kinds the double lists and watches, by resource.
    fn kind(resource: &str) -> Option<&'static str> {
        Some(match resource {
            "endpointslices" => "EndpointSlice",
            "services" => "Service",
            "secrets" => "Secret",
            "configmaps" => "ConfigMap",
            "deployments" => "Deployment",
            "pods" => "Pod",
            "jobs" => "Job",
            "controllerrevisions" => "ControllerRevision",
            _ => return None,
        })
    }

    /// The collection a GET is for, if it is one (`.../<resource>` with no name after it).
    pub fn collection(r: &Recorded) -> Option<Collection> {
        if r.method != "GET" {
            return None;
        }
        let parts: Vec<&str> = r.path.trim_matches('/').split('/').collect();
        let (group, version, rest) = match parts.as_slice() {
            ["api", v, rest @ ..] => ("", *v, rest),
            ["apis", g, v, rest @ ..] => (*g, *v, rest),
            _ => return None,
        };
        let (namespace, resource) = match rest {
            ["namespaces", ns, resource] => (Some(ns.to_string()), *resource),
            [resource] => (None, *resource),
            _ => return None,
        };
        let prefix = if group.is_empty() {
            format!("/api/{version}")
        } else {
            format!("/apis/{group}/{version}")
        };
        Some(Collection {
            prefix,
            namespace,
            resource: resource.to_string(),
            kind: kind(resource)?.to_string(),
            group: group.to_string(),
            version: version.to_string(),
        })
    }

    /// A query string's parameters, percent-decoded.
    pub fn query(q: &str) -> BTreeMap<String, String> {
        url::form_urlencoded::parse(q.as_bytes())
            .into_owned()
            .collect()
    }
}

/// Label selectors as apimachinery's `labels.Parse` reads them: `k=v`, `k==v`, `k!=v`, `k`, `!k`,
/// `k in (a,b)`, `k notin (a,b)`, joined by commas; keys and values validated like labels, and anything else a
/// 400 with the parser's words.
pub mod selectors {
    use serde_json::Value;

    use super::rules::{label_value_errors, qualified_name_errors};

    #[derive(Debug, Clone, PartialEq)]
    pub enum Requirement {
        Equals(String, String),
        NotEquals(String, String),
        Exists(String),
        NotExists(String),
        In(String, Vec<String>),
        NotIn(String, Vec<String>),
    }

    #[derive(Debug, Clone, PartialEq, Default)]
    pub struct Selector(pub Vec<Requirement>);

    impl Selector {
        pub fn matches(&self, object: &Value) -> bool {
            let labels = &object["metadata"]["labels"];
            let get = |k: &str| labels.get(k).and_then(Value::as_str);
            self.0.iter().all(|r| match r {
                Requirement::Equals(k, v) => get(k) == Some(v.as_str()),
                Requirement::NotEquals(k, v) => get(k) != Some(v.as_str()),
                Requirement::Exists(k) => get(k).is_some(),
                Requirement::NotExists(k) => get(k).is_none(),
                Requirement::In(k, vs) => get(k).is_some_and(|l| vs.iter().any(|v| v == l)),
                Requirement::NotIn(k, vs) => get(k).is_none_or(|l| vs.iter().all(|v| v != l)),
            })
        }
    }

    fn key(k: &str) -> Result<String, String> {
        let k = k.trim();
        match qualified_name_errors(k).first() {
            None => Ok(k.to_string()),
            Some(e) => Err(format!(
                "unable to parse requirement: key: Invalid value: {}: {e}",
                Value::from(k)
            )),
        }
    }

    fn value(k: &str, v: &str) -> Result<String, String> {
        let v = v.trim();
        match label_value_errors(v).first() {
            None => Ok(v.to_string()),
            Some(e) => Err(format!(
                "unable to parse requirement: values[0][{k}]: Invalid value: {}: {e}",
                Value::from(v)
            )),
        }
    }

    /// Splits at the commas outside parentheses.
    fn split(s: &str) -> Result<Vec<&str>, String> {
        let (mut out, mut depth, mut start) = (Vec::new(), 0i32, 0);
        for (i, c) in s.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    out.push(&s[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
            if !(0..=1).contains(&depth) {
                return Err(format!(
                    "unable to parse requirement: unbalanced parentheses in {s:?}"
                ));
            }
        }
        if depth != 0 {
            return Err(format!(
                "unable to parse requirement: unbalanced parentheses in {s:?}"
            ));
        }
        out.push(&s[start..]);
        Ok(out)
    }

    fn set(k: &str, rest: &str) -> Result<Vec<String>, String> {
        let inner = rest
            .trim()
            .strip_prefix('(')
            .and_then(|r| r.strip_suffix(')'))
            .ok_or_else(|| format!("found '{}', expected: '('", rest.trim()))?;
        inner.split(',').map(|v| value(k, v)).collect()
    }

    pub fn parse(selector: &str) -> Result<Selector, String> {
        if selector.trim().is_empty() {
            return Ok(Selector::default());
        }
        let mut out = Vec::new();
        for part in split(selector)? {
            let part = part.trim();
            if part.is_empty() {
                return Err(format!("found '', expected: identifier in {selector:?}"));
            }
            let r = if let Some(k) = part.strip_prefix('!') {
                Requirement::NotExists(key(k)?)
            } else if let Some((k, v)) = part.split_once("!=") {
                let k = key(k)?;
                Requirement::NotEquals(k.clone(), value(&k, v)?)
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                let k = key(k)?;
                Requirement::Equals(k.clone(), value(&k, v)?)
            } else if let Some((k, rest)) = part.split_once(" notin ") {
                let k = key(k)?;
                Requirement::NotIn(k.clone(), set(&k, rest)?)
            } else if let Some((k, rest)) = part.split_once(" in ") {
                let k = key(k)?;
                Requirement::In(k.clone(), set(&k, rest)?)
            } else {
                Requirement::Exists(key(part)?)
            };
            out.push(r);
        }
        Ok(Selector(out))
    }
}

fn not_found(path: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": format!("{path} not found"), "reason": "NotFound", "code": 404})
}

/// What a real kube-apiserver refuses, and how it says so. Written from apimachinery's validation (not from the
/// controller's own `names` module, so a mistake there is not repeated here).
pub mod rules {
    use std::sync::LazyLock;

    use regex::Regex;
    use serde_json::{Value, json};

    use super::Recorded;

    const SUBDOMAIN_RE: &str = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*";
    const DNS1035_RE: &str = r"[a-z]([-a-z0-9]*[a-z0-9])?";
    const LABEL_VALUE_RE: &str = r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?";
    const QUALIFIED_NAME_RE: &str = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]";
    const CONFIG_KEY_RE: &str = r"[-._a-zA-Z0-9]+";
    /// `TotalAnnotationSizeLimitB`: keys and values of all annotations of one object.
    pub const ANNOTATIONS_MAX_BYTES: usize = 256 * 1024;
    /// An `events.k8s.io/v1` Event's `note`.
    pub const EVENT_NOTE_MAX_BYTES: usize = 1024;
    /// `MaxSecretSize`, which ConfigMaps share: all `data` and `binaryData` of one object.
    pub const DATA_MAX_BYTES: usize = 1024 * 1024;

    fn full(re: &str) -> Regex {
        Regex::new(&format!("^(?:{re})$")).unwrap()
    }
    static SUBDOMAIN: LazyLock<Regex> = LazyLock::new(|| full(SUBDOMAIN_RE));
    static DNS1035: LazyLock<Regex> = LazyLock::new(|| full(DNS1035_RE));
    static LABEL_VALUE: LazyLock<Regex> = LazyLock::new(|| full(LABEL_VALUE_RE));
    static QUALIFIED_NAME: LazyLock<Regex> = LazyLock::new(|| full(QUALIFIED_NAME_RE));
    static CONFIG_KEY: LazyLock<Regex> = LazyLock::new(|| full(CONFIG_KEY_RE));

    /// The naming rule of each kind the controller writes, by its resource (the path segment).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum NameRule {
        /// RFC 1123 subdomain of at most `max` characters.
        Subdomain { max: usize },
        /// RFC 1035 label (Services), at most 63.
        Dns1035Label,
    }

    /// Kind and naming rule of a resource.
    pub fn kind_of(resource: &str) -> (&'static str, NameRule) {
        let sub = NameRule::Subdomain { max: 253 };
        match resource {
            "services" => ("Service", NameRule::Dns1035Label),
            // The Jobs a CronJob creates append 11 characters to its name.
            "cronjobs" => ("CronJob", NameRule::Subdomain { max: 52 }),
            // A Job's name is also its pods' `job-name` label value.
            "jobs" => ("Job", NameRule::Subdomain { max: 63 }),
            "configmaps" => ("ConfigMap", sub),
            "controllerrevisions" => ("ControllerRevision", sub),
            "pods" => ("Pod", sub),
            "secrets" => ("Secret", sub),
            "deployments" => ("Deployment", sub),
            "persistentvolumeclaims" => ("PersistentVolumeClaim", sub),
            "poddisruptionbudgets" => ("PodDisruptionBudget", sub),
            "leases" => ("Lease", sub),
            "networkpolicies" => ("NetworkPolicy", sub),
            "events" => ("Event", sub),
            "syncflows" => ("SyncFlow", sub),
            "synccontracts" => ("SyncContract", sub),
            "ownershiprosters" => ("OwnershipRoster", sub),
            _ => ("Unknown", sub),
        }
    }

    /// Why `name` breaks `rule`, in the API server's words.
    pub fn name_errors(rule: NameRule, name: &str) -> Vec<String> {
        let mut out = Vec::new();
        match rule {
            NameRule::Subdomain { max } => {
                if name.len() > max {
                    out.push(format!("must be no more than {max} characters"));
                }
                if !SUBDOMAIN.is_match(name) {
                    out.push(format!("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '{SUBDOMAIN_RE}')"));
                }
            }
            NameRule::Dns1035Label => {
                if name.len() > 63 {
                    out.push("must be no more than 63 characters".into());
                }
                if !DNS1035.is_match(name) {
                    out.push(format!("a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '{DNS1035_RE}')"));
                }
            }
        }
        out
    }

    /// Why `value` is not a label value.
    pub fn label_value_errors(value: &str) -> Vec<String> {
        let mut out = Vec::new();
        if value.len() > 63 {
            out.push("must be no more than 63 characters".into());
        }
        if !LABEL_VALUE.is_match(value) {
            out.push(format!("a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '{LABEL_VALUE_RE}')"));
        }
        out
    }

    /// Why `key` is not a label or annotation key (`[prefix/]name`, the prefix a subdomain).
    pub fn qualified_name_errors(key: &str) -> Vec<String> {
        let mut out = Vec::new();
        let (prefix, name) = match key.split_once('/') {
            Some((p, n)) => (Some(p), n),
            None => (None, key),
        };
        if let Some(p) = prefix {
            if p.is_empty() {
                out.push("prefix part must be non-empty".into());
            } else {
                out.extend(
                    name_errors(NameRule::Subdomain { max: 253 }, p)
                        .into_iter()
                        .map(|e| format!("prefix part {e}")),
                );
            }
        }
        if name.is_empty() {
            out.push("name part must be non-empty".into());
        } else {
            if name.len() > 63 {
                out.push("name part must be no more than 63 characters".into());
            }
            if !QUALIFIED_NAME.is_match(name) {
                out.push(format!("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '{QUALIFIED_NAME_RE}')"));
            }
        }
        out
    }

    /// One field error, as `field.Error` prints it.
    #[derive(Debug, Clone)]
    pub struct Cause {
        pub field: String,
        pub reason: &'static str,
        pub message: String,
    }

    fn invalid_value(field: &str, value: &str, detail: &str) -> Cause {
        Cause {
            field: field.into(),
            reason: "FieldValueInvalid",
            message: format!("Invalid value: {}: {detail}", Value::from(value)),
        }
    }

    fn too_long(field: &str, max: usize) -> Cause {
        Cause {
            field: field.into(),
            reason: "FieldValueTooLong",
            message: format!("Too long: must have at most {max} bytes"),
        }
    }

    fn labels(field: &str, labels: Option<&Value>, out: &mut Vec<Cause>) {
        let Some(map) = labels.and_then(Value::as_object) else {
            return;
        };
        for (k, v) in map {
            for e in qualified_name_errors(k) {
                out.push(invalid_value(field, k, &e));
            }
            let v = v.as_str().unwrap_or_default();
            for e in label_value_errors(v) {
                out.push(invalid_value(field, v, &e));
            }
        }
    }

    fn annotations(field: &str, annotations: Option<&Value>, out: &mut Vec<Cause>) {
        let Some(map) = annotations.and_then(Value::as_object) else {
            return;
        };
        let mut total = 0;
        for (k, v) in map {
            for e in qualified_name_errors(&k.to_lowercase()) {
                out.push(invalid_value(field, k, &e));
            }
            total += k.len() + v.as_str().map_or(0, str::len);
        }
        if total > ANNOTATIONS_MAX_BYTES {
            out.push(too_long(field, ANNOTATIONS_MAX_BYTES));
        }
    }

    fn required(field: &str) -> Cause {
        Cause {
            field: field.into(),
            reason: "FieldValueRequired",
            message: "Required value".into(),
        }
    }

    fn not_supported(field: &str, value: &str, supported: &[&str]) -> Cause {
        let list: Vec<String> = supported.iter().map(|s| format!("\"{s}\"")).collect();
        Cause {
            field: field.into(),
            reason: "FieldValueNotSupported",
            message: format!(
                "Unsupported value: {}: supported values: {}",
                Value::from(value),
                list.join(", ")
            ),
        }
    }

    fn str_of(v: &Value) -> &str {
        v.as_str().unwrap_or_default()
    }

    /// A label selector's requirements (`ValidateLabelSelectorRequirement`) or a node selector's
    /// (`ValidateNodeSelectorRequirement`, which adds `Gt` and `Lt`).
    fn requirements(field: &str, exprs: Option<&Value>, node: bool, out: &mut Vec<Cause>) {
        for (i, e) in exprs
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let f = format!("{field}[{i}]");
            let key = str_of(&e["key"]);
            for err in qualified_name_errors(key) {
                out.push(invalid_value(&format!("{f}.key"), key, &err));
            }
            let values = e["values"].as_array().map_or(0, Vec::len);
            let op = str_of(&e["operator"]);
            match op {
                "In" | "NotIn" if values == 0 => out.push(required(&format!("{f}.values"))),
                "Exists" | "DoesNotExist" if values > 0 => out.push(Cause {
                    field: format!("{f}.values"),
                    reason: "FieldValueForbidden",
                    message: "Forbidden: may not be specified when `operator` is 'Exists' or 'DoesNotExist'".into(),
                }),
                "Gt" | "Lt" if node && values != 1 => out.push(required(&format!("{f}.values"))),
                "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
                "Gt" | "Lt" if node => {}
                _ => {
                    let mut ops = vec!["DoesNotExist", "Exists", "In", "NotIn"];
                    if node {
                        ops.extend(["Gt", "Lt"]);
                    }
                    out.push(not_supported(&format!("{f}.operator"), op, &ops));
                }
            }
        }
    }

    fn pod_affinity_terms(
        field: &str,
        terms: Option<&Value>,
        weighted: bool,
        out: &mut Vec<Cause>,
    ) {
        for (i, t) in terms
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let f = format!("{field}[{i}]");
            let (term, f) = if weighted {
                let w = t["weight"].as_i64().unwrap_or(0);
                if !(1..=100).contains(&w) {
                    out.push(invalid_value(
                        &format!("{f}.weight"),
                        &w.to_string(),
                        "must be in the range 1-100",
                    ));
                }
                (&t["podAffinityTerm"], format!("{f}.podAffinityTerm"))
            } else {
                (t, f)
            };
            let key = str_of(&term["topologyKey"]);
            if key.is_empty() {
                out.push(Cause {
                    field: format!("{f}.topologyKey"),
                    reason: "FieldValueRequired",
                    message: "Required value: can not be empty".into(),
                });
            } else {
                for err in qualified_name_errors(key) {
                    out.push(invalid_value(&format!("{f}.topologyKey"), key, &err));
                }
            }
            labels(
                &format!("{f}.labelSelector.matchLabels"),
                term["labelSelector"].get("matchLabels"),
                out,
            );
            requirements(
                &format!("{f}.labelSelector.matchExpressions"),
                term["labelSelector"].get("matchExpressions"),
                false,
                out,
            );
        }
    }

    /// What `ValidatePodSpec` checks of the fields the controller sets from a flow's worker settings.
    fn pod_spec(field: &str, pod: &Value, out: &mut Vec<Cause>) {
        for name_field in ["serviceAccountName", "priorityClassName"] {
            let name = str_of(&pod[name_field]);
            if !name.is_empty() {
                for e in name_errors(NameRule::Subdomain { max: 253 }, name) {
                    out.push(invalid_value(&format!("{field}.{name_field}"), name, &e));
                }
            }
        }
        labels(
            &format!("{field}.nodeSelector"),
            pod.get("nodeSelector"),
            out,
        );
        for (i, t) in pod["tolerations"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let f = format!("{field}.tolerations[{i}]");
            let key = str_of(&t["key"]);
            if !key.is_empty() {
                for e in qualified_name_errors(key) {
                    out.push(invalid_value(&format!("{f}.key"), key, &e));
                }
            }
            let value = str_of(&t["value"]);
            match str_of(&t["operator"]) {
                "" | "Equal" => {
                    if key.is_empty() {
                        out.push(invalid_value(
                            &format!("{f}.operator"),
                            str_of(&t["operator"]),
                            "operator must be Exists when `key` is empty, which means \"match all values and all keys\"",
                        ));
                    }
                    for e in label_value_errors(value) {
                        out.push(invalid_value(&format!("{f}.value"), value, &e));
                    }
                }
                "Exists" => {
                    if !value.is_empty() {
                        out.push(invalid_value(
                            &format!("{f}.operator"),
                            value,
                            "value must be empty when `operator` is 'Exists'",
                        ));
                    }
                }
                other => out.push(not_supported(
                    &format!("{f}.operator"),
                    other,
                    &["Equal", "Exists"],
                )),
            }
            let effect = str_of(&t["effect"]);
            if !matches!(effect, "" | "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
                out.push(not_supported(
                    &format!("{f}.effect"),
                    effect,
                    &["NoExecute", "NoSchedule", "PreferNoSchedule"],
                ));
            }
            if t.get("tolerationSeconds").is_some_and(|s| !s.is_null()) && effect != "NoExecute" {
                out.push(invalid_value(
                    &format!("{f}.effect"),
                    effect,
                    "effect must be 'NoExecute' when `tolerationSeconds` is set",
                ));
            }
        }
        let affinity = &pod["affinity"];
        let node = &affinity["nodeAffinity"];
        if let Some(required_terms) = node.get("requiredDuringSchedulingIgnoredDuringExecution") {
            let f = format!(
                "{field}.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
            );
            let terms = required_terms["nodeSelectorTerms"].as_array();
            if terms.is_none_or(Vec::is_empty) {
                out.push(required(&format!("{f}.nodeSelectorTerms")));
            }
            for (i, term) in terms.into_iter().flatten().enumerate() {
                requirements(
                    &format!("{f}.nodeSelectorTerms[{i}].matchExpressions"),
                    term.get("matchExpressions"),
                    true,
                    out,
                );
            }
        }
        for (i, p) in node["preferredDuringSchedulingIgnoredDuringExecution"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let f = format!(
                "{field}.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[{i}]"
            );
            let w = p["weight"].as_i64().unwrap_or(0);
            if !(1..=100).contains(&w) {
                out.push(invalid_value(
                    &format!("{f}.weight"),
                    &w.to_string(),
                    "must be in the range 1-100",
                ));
            }
            requirements(
                &format!("{f}.preference.matchExpressions"),
                p["preference"].get("matchExpressions"),
                true,
                out,
            );
        }
        for kind in ["podAffinity", "podAntiAffinity"] {
            let a = &affinity[kind];
            pod_affinity_terms(
                &format!("{field}.affinity.{kind}.requiredDuringSchedulingIgnoredDuringExecution"),
                a.get("requiredDuringSchedulingIgnoredDuringExecution"),
                false,
                out,
            );
            pod_affinity_terms(
                &format!("{field}.affinity.{kind}.preferredDuringSchedulingIgnoredDuringExecution"),
                a.get("preferredDuringSchedulingIgnoredDuringExecution"),
                true,
                out,
            );
        }
    }

    /// The field errors of an object of `resource` named `name` (a whole object, or a patch of one).
    pub fn object_errors(resource: &str, name: &str, body: &Value) -> Vec<Cause> {
        let (kind, rule) = kind_of(resource);
        let mut out: Vec<Cause> = name_errors(rule, name)
            .iter()
            .map(|e| invalid_value("metadata.name", name, e))
            .collect();
        let meta = &body["metadata"];
        // An owner reference names its owner completely; the API server refuses an empty uid.
        for (i, owner) in meta["ownerReferences"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            for field in ["apiVersion", "kind", "name", "uid"] {
                if owner[field].as_str().unwrap_or_default().is_empty() {
                    out.push(required(&format!("metadata.ownerReferences[{i}].{field}")));
                }
            }
        }
        labels("metadata.labels", meta.get("labels"), &mut out);
        annotations("metadata.annotations", meta.get("annotations"), &mut out);
        let template = &body["spec"]["template"]["metadata"];
        labels(
            "spec.template.metadata.labels",
            template.get("labels"),
            &mut out,
        );
        annotations(
            "spec.template.metadata.annotations",
            template.get("annotations"),
            &mut out,
        );
        labels(
            "spec.selector.matchLabels",
            body["spec"]["selector"].get("matchLabels"),
            &mut out,
        );
        if let Some(pod) = body["spec"]["template"].get("spec") {
            pod_spec("spec.template.spec", pod, &mut out);
        }
        if kind == "Job" {
            job_spec("spec", &body["spec"], &mut out);
        }
        if kind == "CronJob" {
            cron_job_spec(&body["spec"], &mut out);
        }
        if kind == "Service" {
            labels("spec.selector", body["spec"].get("selector"), &mut out);
            for (i, port) in items(&body["spec"]["ports"]) {
                port_name(&format!("spec.ports[{i}].name"), &port["name"], &mut out);
                port_name(
                    &format!("spec.ports[{i}].targetPort"),
                    &port["targetPort"],
                    &mut out,
                );
            }
        }
        if kind == "Deployment" {
            let pod = &body["spec"]["template"]["spec"];
            for (c, container) in items(&pod["containers"]) {
                for (i, port) in items(&container["ports"]) {
                    port_name(
                        &format!("spec.template.spec.containers[{c}].ports[{i}].name"),
                        &port["name"],
                        &mut out,
                    );
                }
                for probe in ["livenessProbe", "readinessProbe"] {
                    port_name(
                        &format!("spec.template.spec.containers[{c}].{probe}.httpGet.port"),
                        &container[probe]["httpGet"]["port"],
                        &mut out,
                    );
                }
            }
        }
        if kind == "NetworkPolicy" {
            selector("spec.podSelector", &body["spec"]["podSelector"], &mut out);
            for (i, rule) in items(&body["spec"]["ingress"]) {
                for (j, peer) in items(&rule["from"]) {
                    let at = format!("spec.ingress[{i}].from[{j}]");
                    selector(&format!("{at}.podSelector"), &peer["podSelector"], &mut out);
                    selector(
                        &format!("{at}.namespaceSelector"),
                        &peer["namespaceSelector"],
                        &mut out,
                    );
                    if let Some(cidr) = peer["ipBlock"]["cidr"].as_str()
                        && !valid_cidr(cidr)
                    {
                        out.push(invalid_value(
                            &format!("{at}.ipBlock.cidr"),
                            cidr,
                            "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)",
                        ));
                    }
                }
                for (j, port) in items(&rule["ports"]) {
                    port_name(
                        &format!("spec.ingress[{i}].ports[{j}].port"),
                        &port["port"],
                        &mut out,
                    );
                }
            }
        }
        if kind == "Event"
            && let Some(note) = body["note"].as_str()
            && note.len() > EVENT_NOTE_MAX_BYTES
        {
            out.push(too_long("note", EVENT_NOTE_MAX_BYTES));
        }
        if matches!(kind, "ConfigMap" | "Secret") {
            let mut total = 0;
            for field in ["data", "binaryData", "stringData"] {
                for (k, v) in body
                    .get(field)
                    .and_then(Value::as_object)
                    .into_iter()
                    .flatten()
                {
                    if k.len() > 253 || !CONFIG_KEY.is_match(k) {
                        out.push(invalid_value(&format!("{field}[{k}]"), k, &format!("a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '{CONFIG_KEY_RE}')")));
                    }
                    total += k.len() + v.as_str().map_or(0, str::len);
                }
            }
            if total > DATA_MAX_BYTES {
                out.push(too_long("data", DATA_MAX_BYTES));
            }
        }
        out
    }

    /// A CronJob's own fields (`ValidateCronJobSpec`) and its Job template's.
    fn cron_job_spec(spec: &Value, out: &mut Vec<Cause>) {
        let schedule = str_of(&spec["schedule"]);
        if schedule.is_empty() {
            out.push(required("spec.schedule"));
        } else if schedule.contains("TZ") {
            out.push(invalid_value(
                "spec.schedule",
                schedule,
                "cannot use TZ or CRON_TZ in schedule, use timeZone field instead",
            ));
        } else if !schedule.starts_with('@') && schedule.split_whitespace().count() != 5 {
            out.push(invalid_value(
                "spec.schedule",
                schedule,
                &format!(
                    "expected exactly 5 fields, found {}: {schedule}",
                    schedule.split_whitespace().count()
                ),
            ));
        }
        // `time.LoadLocation`: a file of the zoneinfo database, by its exact name.
        if let Some(zone) = spec["timeZone"].as_str() {
            // scripts/test installs tzdata; without it every named zone would be refused, loudly.
            let known = std::path::Path::new("/usr/share/zoneinfo").join(zone);
            if zone.eq_ignore_ascii_case("local")
                || zone.contains("..")
                || zone.starts_with('/')
                || !known.is_file()
            {
                out.push(invalid_value(
                    "spec.timeZone",
                    zone,
                    &format!("unknown time zone {zone}"),
                ));
            }
        }
        if let Some(policy) = spec["concurrencyPolicy"].as_str()
            && !["Allow", "Forbid", "Replace"].contains(&policy)
        {
            out.push(not_supported(
                "spec.concurrencyPolicy",
                policy,
                &["Allow", "Forbid", "Replace"],
            ));
        }
        let template = &spec["jobTemplate"];
        labels(
            "spec.jobTemplate.metadata.labels",
            template["metadata"].get("labels"),
            out,
        );
        let job = &template["spec"];
        labels(
            "spec.jobTemplate.spec.template.metadata.labels",
            job["template"]["metadata"].get("labels"),
            out,
        );
        annotations(
            "spec.jobTemplate.spec.template.metadata.annotations",
            job["template"]["metadata"].get("annotations"),
            out,
        );
        if let Some(pod) = job["template"].get("spec") {
            pod_spec("spec.jobTemplate.spec.template.spec", pod, out);
        }
        job_spec("spec.jobTemplate.spec", job, out);
    }

    /// A Job's restart policy and pod failure policy (`validateJobSpec`, `validatePodFailurePolicy`).
    fn job_spec(at: &str, job: &Value, out: &mut Vec<Cause>) {
        let pod = &job["template"]["spec"];
        let restart = str_of(&pod["restartPolicy"]);
        if !["OnFailure", "Never"].contains(&restart) {
            out.push(not_supported(
                &format!("{at}.template.spec.restartPolicy"),
                restart,
                &["OnFailure", "Never"],
            ));
        }
        let Some(policy) = job.get("podFailurePolicy").filter(|p| !p.is_null()) else {
            return;
        };
        if restart != "Never" {
            out.push(invalid_value(
                &format!("{at}.template.spec.restartPolicy"),
                restart,
                "only \"Never\" is supported when podFailurePolicy is specified",
            ));
        }
        let containers: Vec<&str> = items(&pod["containers"])
            .chain(items(&pod["initContainers"]))
            .map(|(_, c)| str_of(&c["name"]))
            .collect();
        for (i, rule) in items(&policy["rules"]) {
            let r = format!("{at}.podFailurePolicy.rules[{i}]");
            let action = str_of(&rule["action"]);
            if !["FailJob", "FailIndex", "Ignore", "Count"].contains(&action) {
                out.push(not_supported(
                    &format!("{r}.action"),
                    action,
                    &["Count", "FailIndex", "FailJob", "Ignore"],
                ));
            }
            let codes = rule.get("onExitCodes").filter(|c| !c.is_null());
            let conditions = rule.get("onPodConditions").filter(|c| !c.is_null());
            if codes.is_some() == conditions.is_some() {
                out.push(invalid_value(
                    &r,
                    "",
                    "specifying one of onExitCodes and onPodConditions is required",
                ));
            }
            if let Some(codes) = codes {
                let f = format!("{r}.onExitCodes");
                let name = codes["containerName"].as_str();
                if let Some(name) = name
                    && !containers.contains(&name)
                {
                    out.push(invalid_value(
                        &format!("{f}.containerName"),
                        name,
                        "must be one of the container or initContainer names in the pod template",
                    ));
                }
                let op = str_of(&codes["operator"]);
                if !["In", "NotIn"].contains(&op) {
                    out.push(not_supported(
                        &format!("{f}.operator"),
                        op,
                        &["In", "NotIn"],
                    ));
                }
                let values: Vec<i64> = items(&codes["values"])
                    .filter_map(|(_, v)| v.as_i64())
                    .collect();
                if values.is_empty() || values.len() > 255 {
                    out.push(invalid_value(
                        &format!("{f}.values"),
                        "",
                        "must have at least one value and at most 255",
                    ));
                }
                if op == "In" && values.contains(&0) {
                    out.push(invalid_value(
                        &format!("{f}.values"),
                        "0",
                        "must not be 0 for the In operator",
                    ));
                }
                if values.windows(2).any(|w| w[0] >= w[1]) {
                    out.push(invalid_value(
                        &format!("{f}.values"),
                        "",
                        "must be ordered and unique",
                    ));
                }
            }
            for (j, c) in conditions.map(items).into_iter().flatten() {
                let status = str_of(&c["status"]);
                if !["True", "False", "Unknown"].contains(&status) {
                    out.push(not_supported(
                        &format!("{r}.onPodConditions[{j}].status"),
                        status,
                        &["False", "True", "Unknown"],
                    ));
                }
                if str_of(&c["type"]).is_empty() {
                    out.push(required(&format!("{r}.onPodConditions[{j}].type")));
                }
            }
        }
    }

    fn items(list: &Value) -> impl Iterator<Item = (usize, &Value)> {
        list.as_array().into_iter().flatten().enumerate()
    }

    /// A named port (`IsValidPortName`, an IANA service name): at most 15 characters, lower-case letters,
    /// digits and '-', at least one letter, no '-' at either end or twice in a row. A number is checked
    /// elsewhere; an absent one is fine here.
    fn port_name(field: &str, value: &Value, out: &mut Vec<Cause>) {
        let Some(name) = value.as_str() else {
            return;
        };
        let mut errors = Vec::new();
        if name.len() > 15 {
            errors.push("must be no more than 15 characters");
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            errors.push("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)");
        }
        if name.contains("--") {
            errors.push("must not contain consecutive hyphens");
        }
        if !name.chars().any(|c| c.is_ascii_lowercase()) {
            errors.push("must contain at least one letter (a-z)");
        }
        if name.starts_with('-') || name.ends_with('-') {
            errors.push("must not begin or end with a hyphen");
        }
        for e in errors {
            out.push(invalid_value(field, name, e));
        }
    }

    /// A label selector's `matchLabels` and `matchExpressions` (keys qualified names, values label values).
    fn selector(field: &str, value: &Value, out: &mut Vec<Cause>) {
        labels(
            &format!("{field}.matchLabels"),
            value.get("matchLabels"),
            out,
        );
        for (i, expr) in items(&value["matchExpressions"]) {
            let key = expr["key"].as_str().unwrap_or_default();
            for e in qualified_name_errors(key) {
                out.push(invalid_value(
                    &format!("{field}.matchExpressions[{i}].key"),
                    key,
                    &e,
                ));
            }
            let op = expr["operator"].as_str().unwrap_or_default();
            let values: Vec<&str> = items(&expr["values"])
                .filter_map(|(_, v)| v.as_str())
                .collect();
            match op {
                "In" | "NotIn" if values.is_empty() => out.push(Cause {
                    field: format!("{field}.matchExpressions[{i}].values"),
                    reason: "FieldValueRequired",
                    message: "Required value: must be specified when `operator` is 'In' or 'NotIn'"
                        .into(),
                }),
                "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
                other => out.push(invalid_value(
                    &format!("{field}.matchExpressions[{i}].operator"),
                    other,
                    "not a valid selector operator",
                )),
            }
            for (j, v) in values.iter().enumerate() {
                for e in label_value_errors(v) {
                    out.push(invalid_value(
                        &format!("{field}.matchExpressions[{i}].values[{j}]"),
                        v,
                        &e,
                    ));
                }
            }
        }
    }

    fn valid_cidr(cidr: &str) -> bool {
        let Some((ip, bits)) = cidr.split_once('/') else {
            return false;
        };
        match (ip.parse::<std::net::IpAddr>(), bits.parse::<u8>()) {
            (Ok(std::net::IpAddr::V4(_)), Ok(b)) => b <= 32,
            (Ok(std::net::IpAddr::V6(_)), Ok(b)) => b <= 128,
            _ => false,
        }
    }

    /// A `422 Invalid` answer, shaped like `apierrors.NewInvalid` (whose message names the kind with its group,
    /// `Deployment.apps "x" is invalid: ...`, and a core kind alone).
    pub fn invalid(group: &str, kind: &str, name: &str, causes: &[Cause]) -> Value {
        let qualified = if group.is_empty() {
            kind.to_string()
        } else {
            format!("{kind}.{group}")
        };
        let each: Vec<String> = causes
            .iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect();
        let list = if each.len() == 1 {
            each[0].clone()
        } else {
            format!("[{}]", each.join(", "))
        };
        let mut details = json!({
            "name": name,
            "kind": kind,
            "causes": causes.iter().map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field})).collect::<Vec<_>>(),
        });
        if !group.is_empty() {
            details["group"] = json!(group);
        }
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("{qualified} {} is invalid: {list}", Value::from(name)),
            "reason": "Invalid", "details": details, "code": 422,
        })
    }

    /// A `400 BadRequest` answer.
    pub fn bad_request(message: String) -> Value {
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": "BadRequest", "code": 400,
        })
    }

    /// A request's target: `/api/v1/namespaces/<ns>/<resource>[/<name>[/<sub>]]` or the same under
    /// `/apis/<group>/<version>`.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Target {
        pub group: String,
        pub version: String,
        pub resource: String,
        pub name: Option<String>,
        pub subresource: Option<String>,
    }

    impl Target {
        pub fn api_version(&self) -> String {
            if self.group.is_empty() {
                self.version.clone()
            } else {
                format!("{}/{}", self.group, self.version)
            }
        }
    }

    pub fn target(path: &str) -> Option<Target> {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, version, rest) = match parts.as_slice() {
            ["api", v, rest @ ..] => ("", *v, rest),
            ["apis", g, v, rest @ ..] => (*g, *v, rest),
            _ => return None,
        };
        let rest = match rest {
            ["namespaces", _ns, rest @ ..] if !rest.is_empty() => rest,
            other => other,
        };
        Some(Target {
            group: group.into(),
            version: version.into(),
            resource: rest.first()?.to_string(),
            name: rest.get(1).map(|s| s.to_string()),
            subresource: rest.get(2).map(|s| s.to_string()),
        })
    }

    /// The OpenAPI schema of each of Meshline's custom resources, by plural, read from `crds/` (which a test
    /// keeps equal to what `meshline crd` renders; reading the files costs far less memory than rendering,
    /// which matters to the controller benchmark's RSS figure).
    static SCHEMAS: LazyLock<std::collections::HashMap<String, (String, Value)>> =
        LazyLock::new(|| {
            ["synccontracts", "syncflows", "ownershiprosters"]
                .into_iter()
                .map(|plural| {
                    let file = format!(
                        "{}/crds/{plural}.sync.meshline.io.yaml",
                        env!("CARGO_MANIFEST_DIR")
                    );
                    let text = std::fs::read_to_string(&file)
                        .unwrap_or_else(|e| panic!("cannot read {file}: {e}"));
                    let v: Value = serde_yaml::from_str(&text).unwrap();
                    (
                        plural.to_string(),
                        (
                            v["spec"]["names"]["kind"].as_str().unwrap().to_string(),
                            v["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone(),
                        ),
                    )
                })
                .collect()
        });

    /// The bounds a CRD's structural schema puts on a custom resource (`maxLength`, `maxItems`,
    /// `maxProperties`), which the API server enforces on every write, status included.
    pub fn schema_errors(schema: &Value, value: &Value, path: &str, out: &mut Vec<Cause>) {
        let at = |p: &str| {
            if p.is_empty() {
                "<root>".to_string()
            } else {
                p.to_string()
            }
        };
        match value {
            Value::String(s) => {
                if let Some(max) = schema["maxLength"].as_u64()
                    && s.chars().count() as u64 > max
                {
                    out.push(Cause {
                        field: at(path),
                        reason: "FieldValueTooLong",
                        message: format!("Too long: may not be more than {max} bytes"),
                    });
                }
            }
            Value::Array(items) => {
                if let Some(max) = schema["maxItems"].as_u64()
                    && items.len() as u64 > max
                {
                    out.push(Cause {
                        field: at(path),
                        reason: "FieldValueTooMany",
                        message: format!(
                            "Too many: {}: must have at most {max} items",
                            items.len()
                        ),
                    });
                }
                for (i, item) in items.iter().enumerate() {
                    schema_errors(&schema["items"], item, &format!("{path}[{i}]"), out);
                }
            }
            Value::Object(map) => {
                if let Some(max) = schema["maxProperties"].as_u64()
                    && map.len() as u64 > max
                {
                    out.push(Cause {
                        field: at(path),
                        reason: "FieldValueTooMany",
                        message: format!("Too many: {}: must have at most {max} items", map.len()),
                    });
                }
                for (k, v) in map {
                    let child = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    let sub = schema["properties"]
                        .get(k)
                        .or_else(|| schema.get("additionalProperties"))
                        .unwrap_or(&Value::Null);
                    schema_errors(sub, v, &child, out);
                }
            }
            _ => {}
        }
    }

    /// Whether the real API server would accept this write; if not, its answer (code and `Status` body).
    pub fn check(r: &Recorded) -> Result<(), (u16, Value)> {
        if !matches!(r.method.as_str(), "POST" | "PATCH" | "PUT") {
            return Ok(());
        }
        let Some(t) = target(&r.path) else {
            return Ok(());
        };
        let apply = r.content_type.starts_with("application/apply-patch");
        if apply {
            // The field manager's first check (`structuredMergeManager.Apply`), for objects and subresources
            // alike: a status apply without them is refused before anything else is looked at.
            let sent = r.body["apiVersion"].as_str().unwrap_or_default();
            if sent != t.api_version() {
                return Err((
                    400,
                    bad_request(format!(
                        "Incorrect version specified in apply patch. Specified patch version: {sent}, expected: {}",
                        t.api_version()
                    )),
                ));
            }
            if r.body["kind"].as_str().unwrap_or_default().is_empty() {
                return Err((
                    400,
                    bad_request(format!("Object 'Kind' is missing in '{}'", r.body)),
                ));
            }
        }
        if let Some((kind, schema)) = SCHEMAS.get(&t.resource) {
            let mut causes = Vec::new();
            schema_errors(schema, &r.body, "", &mut causes);
            if !causes.is_empty() {
                let name = t.name.clone().unwrap_or_default();
                return Err((422, invalid(&t.group, kind, &name, &causes)));
            }
        }
        if t.subresource.is_some() {
            return Ok(());
        }
        let in_body = r.body["metadata"]["name"].as_str();
        let name = match (&t.name, in_body) {
            (Some(url), Some(body)) if url != body => {
                return Err((
                    400,
                    bad_request(format!(
                        "the name of the object ({body}) does not match the name on the URL ({url})"
                    )),
                ));
            }
            (Some(url), _) => url.clone(),
            (None, Some(body)) => body.to_string(),
            // `generateName`: the server makes a valid name.
            (None, None) => return Ok(()),
        };
        let causes = object_errors(&t.resource, &name, &r.body);
        if causes.is_empty() {
            Ok(())
        } else {
            let (kind, _) = kind_of(&t.resource);
            Err((422, invalid(&t.group, kind, &name, &causes)))
        }
    }
}
