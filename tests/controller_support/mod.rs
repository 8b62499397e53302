//! An in-process Kubernetes API double for the controller tests and benchmark, in the `tower-test` pattern of
//! kube's own examples: every request the controller makes is recorded (method, path, query, body) and answered
//! from a small in-memory state, so a test can assert exactly which writes happened.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

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
    pub body: Value,
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
}

impl ApiDouble {
    pub fn new() -> ApiDouble {
        ApiDouble::default()
    }

    /// Starts the double and returns a client that talks to it. Needs a Tokio runtime.
    pub fn client(&self) -> Client {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let me = self.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let bytes = http_body_util::BodyExt::collect(body)
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let recorded = Recorded {
                    method: parts.method.to_string(),
                    path: parts.uri.path().to_string(),
                    query: parts.uri.query().unwrap_or_default().to_string(),
                    body,
                };
                let (status, answer) = me.answer(&recorded);
                me.requests.lock().unwrap().push(recorded);
                let response = Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
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
            "POST" => (201, r.body.clone()),
            "DELETE" => (
                200,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}),
            ),
            _ => (405, not_found(&r.path)),
        }
    }

    pub fn put(&self, path: &str, object: Value) {
        self.objects
            .lock()
            .unwrap()
            .insert(path.to_string(), object);
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

    pub fn take(&self) -> Vec<Recorded> {
        std::mem::take(&mut *self.requests.lock().unwrap())
    }
}

fn not_found(path: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": format!("{path} not found"), "reason": "NotFound", "code": 404})
}
