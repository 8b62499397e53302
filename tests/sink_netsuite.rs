//! The NetSuite sink against a local server that checks requests the way NetSuite does: OAuth 1.0a TBA
//! signatures recomputed from the request (RFC 5849 §3.4, HMAC-SHA256, nonces never reused), OAuth 2.0 M2M
//! assertions verified with the public key of the certificate the `kid` names (PS256 for RSA, ES256/ES384 for
//! EC, `iss`, `aud`, lifetime ≤ 60 min), bearer tokens that expire, upsert by `eid:` with 204 + `Location` (or
//! 202 + an async job's `Location`), 429 with `Retry-After`, and NetSuite's `o:errorDetails` JSON for a 400.

#[path = "support/sink_mock.rs"]
mod sink_mock;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Form, Json, Router};
use base64::Engine;
use hmac::{Hmac, Mac};
use meshline::api::{ErrorClass, SinkSystem};
use meshline::connectors::sinks::{self, netsuite::NetSuiteSink};
use meshline::connectors::{Delivery, Sink};
use serde_json::{Value, json};
use sha2::Sha256;
use sink_mock::{check_lineage, header, secret, serve};
use tokio::sync::Mutex;

const CONSUMER_KEY: &str = "ck-4f1d";
const CONSUMER_SECRET: &str = "cs/with+reserved=chars&more";
const TOKEN_ID: &str = "tok-88a0";
const TOKEN_SECRET: &str = "ts~secret 1";
const ACCOUNT: &str = "1234567-sb1";
const CLIENT_ID: &str = "client-9c2e";
const CERTIFICATE_ID: &str = "cert-Zx81";
const EC256_CERTIFICATE_ID: &str = "cert-Ec256";
const EC384_CERTIFICATE_ID: &str = "cert-Ec384";
const PSS_CERTIFICATE_ID: &str = "cert-Pss";

/// The certificates uploaded to the M2M setup: certificate id → the algorithm and public key NetSuite checks
/// the assertion with.
fn registered_certificate(
    kid: &str,
) -> Option<(jsonwebtoken::Algorithm, jsonwebtoken::DecodingKey)> {
    use jsonwebtoken::{Algorithm, DecodingKey};
    let key = match kid {
        CERTIFICATE_ID => (
            Algorithm::PS256,
            DecodingKey::from_rsa_pem(include_bytes!("data/sinks/netsuite_m2m_test_pub.pem")),
        ),
        // A certificate made as NetSuite's instructions say (`-newkey rsa-pss`); its public key as PKCS#1.
        PSS_CERTIFICATE_ID => (
            Algorithm::PS256,
            DecodingKey::from_rsa_pem(include_bytes!(
                "data/sinks/netsuite_m2m_rsa_pss_test_pub.pem"
            )),
        ),
        EC256_CERTIFICATE_ID => (
            Algorithm::ES256,
            DecodingKey::from_ec_pem(include_bytes!("data/sinks/netsuite_m2m_es256_test_pub.pem")),
        ),
        EC384_CERTIFICATE_ID => (
            Algorithm::ES384,
            DecodingKey::from_ec_pem(include_bytes!("data/sinks/netsuite_m2m_es384_test_pub.pem")),
        ),
        _ => return None,
    };
    Some((key.0, key.1.expect("test public key parses")))
}

#[derive(Default)]
struct NetSuite {
    base: Mutex<String>,
    /// (recordType, externalId) → (internal id, body).
    records: Mutex<HashMap<(String, String), (u64, Value)>>,
    next_id: AtomicU32,
    tokens: Mutex<HashSet<String>>,
    token_requests: AtomicU32,
    nonces: Mutex<HashSet<String>>,
    /// Answer the next N record requests with 429.
    throttle: AtomicU32,
    /// Refuse every record request with 401 (a revoked token or role).
    revoked: AtomicBool,
    correlations: Mutex<Vec<String>>,
    suiteql_pages: AtomicU32,
    /// Queue upserts as asynchronous jobs (`202 Accepted` + the job's `Location`), as with `Prefer:
    /// respond-async`.
    asynchronous: AtomicBool,
    next_job: AtomicU32,
}

type Shared = Arc<NetSuite>;

fn unauthorized(why: &str) -> Response {
    let body = json!({"type":"https://www.rfc-editor.org/rfc/rfc9110.html#section-15.5.2","title":"Unauthorized",
        "status":401,"o:errorDetails":[{"detail":format!("Invalid login attempt. {why}"),"o:errorCode":"INVALID_LOGIN"}]});
    (StatusCode::UNAUTHORIZED, Json(body)).into_response()
}

/// RFC 5849 §3.6 percent-encoding, written independently of the sink's.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn dec(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

impl NetSuite {
    /// Checks the `Authorization` header as NetSuite does, for either scheme.
    async fn authenticate(
        &self,
        method: &str,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Result<(), Response> {
        let auth = header(headers, "authorization");
        if let Some(token) = auth.strip_prefix("Bearer ") {
            return if self.tokens.lock().await.contains(token) {
                Ok(())
            } else {
                Err(unauthorized("expired token"))
            };
        }
        let Some(params) = auth.strip_prefix("OAuth ") else {
            return Err(unauthorized("no credentials"));
        };
        let mut oauth: HashMap<String, String> = HashMap::new();
        for part in params.split(", ") {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| unauthorized("malformed header"))?;
            oauth.insert(k.to_string(), dec(v.trim_matches('"')));
        }
        let get = |k: &str| oauth.get(k).cloned().unwrap_or_default();
        if get("realm") != "1234567_SB1"
            || get("oauth_consumer_key") != CONSUMER_KEY
            || get("oauth_token") != TOKEN_ID
        {
            return Err(unauthorized("unknown realm, consumer or token"));
        }
        if get("oauth_signature_method") != "HMAC-SHA256" || get("oauth_version") != "1.0" {
            return Err(unauthorized("signature method"));
        }
        let ts: i64 = get("oauth_timestamp")
            .parse()
            .map_err(|_| unauthorized("timestamp"))?;
        if (chrono::Utc::now().timestamp() - ts).abs() > 300 {
            return Err(unauthorized("stale timestamp"));
        }
        if !self.nonces.lock().await.insert(get("oauth_nonce")) {
            return Err(unauthorized("nonce reused"));
        }
        // Recompute: every oauth_* but the signature, plus the query, encoded, sorted, joined (§3.4.1.3).
        let mut pairs: Vec<(String, String)> = oauth
            .iter()
            .filter(|(k, _)| k.starts_with("oauth_") && *k != "oauth_signature")
            .map(|(k, v)| (enc(k), enc(v)))
            .collect();
        if let Some(q) = uri.query() {
            pairs
                .extend(url::form_urlencoded::parse(q.as_bytes()).map(|(k, v)| (enc(&k), enc(&v))));
        }
        pairs.sort();
        let normalized = pairs
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&");
        let base_uri = format!("http://{}{}", header(headers, "host"), uri.path());
        let base = format!("{method}&{}&{}", enc(&base_uri), enc(&normalized));
        let mut mac = Hmac::<Sha256>::new_from_slice(
            format!("{}&{}", enc(CONSUMER_SECRET), enc(TOKEN_SECRET)).as_bytes(),
        )
        .unwrap();
        mac.update(base.as_bytes());
        let expected =
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        if get("oauth_signature") != expected {
            return Err(unauthorized("signature mismatch"));
        }
        Ok(())
    }

    async fn gate(&self, method: &str, uri: &Uri, headers: &HeaderMap) -> Result<(), Response> {
        let correlation =
            check_lineage(headers).map_err(|e| (StatusCode::BAD_REQUEST, e).into_response())?;
        self.correlations.lock().await.push(correlation);
        if self.revoked.load(Ordering::SeqCst) {
            return Err(unauthorized("token revoked"));
        }
        self.authenticate(method, uri, headers).await?;
        if self.throttle.load(Ordering::SeqCst) > 0 {
            self.throttle.fetch_sub(1, Ordering::SeqCst);
            let body = json!({"title":"Too Many Requests","status":429,"o:errorDetails":[{"detail":
                "Request blocked by concurrency limit.","o:errorCode":"CONCURRENCY_LIMIT_EXCEEDED"}]});
            return Err((
                StatusCode::TOO_MANY_REQUESTS,
                [("Retry-After", "7")],
                Json(body),
            )
                .into_response());
        }
        Ok(())
    }
}

async fn token(State(ns): State<Shared>, Form(form): Form<HashMap<String, String>>) -> Response {
    ns.token_requests.fetch_add(1, Ordering::SeqCst);
    let invalid = |why: &str| {
        (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_client", "error_description": why})),
        )
            .into_response()
    };
    if form.get("grant_type").map(String::as_str) != Some("client_credentials")
        || form.get("client_assertion_type").map(String::as_str)
            != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    {
        return invalid("grant");
    }
    let assertion = form.get("client_assertion").cloned().unwrap_or_default();
    let Ok(head) = jsonwebtoken::decode_header(&assertion) else {
        return invalid("header");
    };
    let Some((algorithm, key)) = head.kid.as_deref().and_then(registered_certificate) else {
        return invalid("kid");
    };
    // The algorithm must be the one the uploaded certificate's key type and curve call for.
    if head.alg != algorithm || head.typ.as_deref() != Some("JWT") {
        return invalid("alg or typ");
    }
    let token_url = format!(
        "{}/services/rest/auth/oauth2/v1/token",
        ns.base.lock().await
    );
    let mut validation = jsonwebtoken::Validation::new(algorithm);
    validation.set_audience(&[token_url]);
    validation.set_issuer(&[CLIENT_ID]);
    validation.set_required_spec_claims(&["exp", "iat", "iss", "aud"]);
    let Ok(data) = jsonwebtoken::decode::<Value>(&assertion, &key, &validation) else {
        return invalid("signature");
    };
    let claims = data.claims;
    let lifetime = claims["exp"].as_i64().unwrap_or(0) - claims["iat"].as_i64().unwrap_or(0);
    let scopes: Vec<&str> = claims["scope"].as_str().unwrap_or("").split(',').collect();
    if !(1..=3600).contains(&lifetime) || !scopes.contains(&"rest_webservices") {
        return invalid("lifetime or scope");
    }
    let access = uuid::Uuid::new_v4().to_string();
    ns.tokens.lock().await.insert(access.clone());
    // NetSuite sends expires_in as a string.
    Json(json!({"access_token": access, "expires_in": "3600", "token_type": "Bearer"}))
        .into_response()
}

async fn upsert(
    State(ns): State<Shared>,
    Path((record_type, id)): Path<(String, String)>,
    uri: Uri,
    headers: HeaderMap,
    body: String,
) -> Response {
    if let Err(r) = ns.gate("PUT", &uri, &headers).await {
        return r;
    }
    let Some(external_id) = id.strip_prefix("eid:") else {
        return (StatusCode::BAD_REQUEST, "upsert needs eid:").into_response();
    };
    if header(&headers, "content-type") != "application/json" {
        return (StatusCode::UNSUPPORTED_MEDIA_TYPE, "json only").into_response();
    }
    let Ok(body) = serde_json::from_str::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "bad json").into_response();
    };
    if body["entity"]["id"] == "0" {
        let err = json!({"type":"https://www.rfc-editor.org/rfc/rfc9110.html#section-15.5.1","title":"Bad Request",
            "status":400,"o:errorDetails":[{"detail":"Invalid value for the resource or sub-resource field 'entity'.",
            "o:errorPath":"entity","o:errorCode":"INVALID_CONTENT"}]});
        return (StatusCode::BAD_REQUEST, Json(err)).into_response();
    }
    let mut records = ns.records.lock().await;
    let key = (record_type.clone(), external_id.to_string());
    let internal = records
        .get(&key)
        .map(|r| r.0)
        .unwrap_or_else(|| 4700 + u64::from(ns.next_id.fetch_add(1, Ordering::SeqCst)));
    records.insert(key, (internal, body));
    if ns.asynchronous.load(Ordering::SeqCst) {
        let job = 900 + ns.next_job.fetch_add(1, Ordering::SeqCst);
        return (
            StatusCode::ACCEPTED,
            [
                ("Location", format!("/services/rest/async/v1/job/{job}")),
                ("Preference-Applied", "respond-async".to_string()),
            ],
        )
            .into_response();
    }
    let location = format!(
        "{}/services/rest/record/v1/{record_type}/{internal}",
        ns.base.lock().await
    );
    (StatusCode::NO_CONTENT, [("Location", location)]).into_response()
}

async fn list(State(ns): State<Shared>, uri: Uri, headers: HeaderMap) -> Response {
    if let Err(r) = ns.gate("GET", &uri, &headers).await {
        return r;
    }
    Json(json!({"links": [], "count": 0, "hasMore": false, "items": [], "offset": 0, "totalResults": 0})).into_response()
}

async fn suiteql(
    State(ns): State<Shared>,
    Query(q): Query<HashMap<String, usize>>,
    uri: Uri,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Err(r) = ns.gate("POST", &uri, &headers).await {
        return r;
    }
    if header(&headers, "prefer") != "transient" {
        return (
            StatusCode::BAD_REQUEST,
            "SuiteQL requires Prefer: transient",
        )
            .into_response();
    }
    if body["q"] != "SELECT * FROM item" {
        return (StatusCode::BAD_REQUEST, "unexpected query").into_response();
    }
    ns.suiteql_pages.fetch_add(1, Ordering::SeqCst);
    let (limit, offset, total) = (q["limit"], q["offset"], 2500usize);
    let items: Vec<Value> = (offset..(offset + limit).min(total))
        .map(|i| json!({"links": [], "itemid": format!("SKU-{i:04}"), "baseprice": "10.00"}))
        .collect();
    Json(json!({"count": items.len(), "hasMore": offset + limit < total, "items": items, "offset": offset, "totalResults": total}))
        .into_response()
}

async fn start() -> (Shared, String) {
    let ns: Shared = Arc::default();
    let router = Router::new()
        .route("/services/rest/auth/oauth2/v1/token", post(token))
        .route("/services/rest/record/v1/{record_type}/{id}", put(upsert))
        .route("/services/rest/record/v1/{record_type}", get(list))
        .route("/services/rest/query/v1/suiteql", post(suiteql))
        .with_state(ns.clone());
    let base = serve(router).await;
    *ns.base.lock().await = base.clone();
    (ns, base)
}

fn tba_keys(consumer_secret: &'static str) -> Vec<(&'static str, &'static str)> {
    vec![
        ("accountId", ACCOUNT),
        ("consumerKey", CONSUMER_KEY),
        ("consumerSecret", consumer_secret),
        ("tokenId", TOKEN_ID),
        ("tokenSecret", TOKEN_SECRET),
    ]
}

fn m2m_keys(private_key: &'static str) -> Vec<(&'static str, &'static str)> {
    m2m_keys_for(CERTIFICATE_ID, private_key)
}

fn m2m_keys_for(
    certificate_id: &'static str,
    private_key: &'static str,
) -> Vec<(&'static str, &'static str)> {
    vec![
        ("accountId", ACCOUNT),
        ("clientId", CLIENT_ID),
        ("certificateId", certificate_id),
        ("privateKey", private_key),
    ]
}

const REGISTERED_KEY: &str = include_str!("data/sinks/netsuite_m2m_test_key.pem");

fn sink(base: &str, keys: &[(&str, &str)]) -> NetSuiteSink {
    let mut spec = sink_mock::spec(SinkSystem::Netsuite, Some(base));
    spec.record_type = Some("salesOrder".into());
    let (_dir, credentials) = secret(keys);
    // Keys are read at construction; the directory may go afterwards.
    NetSuiteSink::from_spec(&spec, &credentials, sinks::http_client()).expect("sink builds")
}

fn delivery<'a>(external_id: &'a str, payload: &'a Value, correlation_id: &'a str) -> Delivery<'a> {
    Delivery {
        external_id,
        payload,
        correlation_id,
        attempt: 1,
    }
}

#[tokio::test]
async fn retried_delivery_updates_instead_of_duplicating() {
    for keys in [tba_keys(CONSUMER_SECRET), m2m_keys(REGISTERED_KEY)] {
        let (ns, base) = start().await;
        let sink = sink(&base, &keys);
        let first = json!({"entity": {"id": "42"}, "memo": "first"});
        let second = json!({"entity": {"id": "42"}, "memo": "second"});
        let a = sink
            .deliver(delivery("SF-006/001 A", &first, "corr-1"))
            .await
            .expect("first delivery");
        let b = sink
            .deliver(delivery("SF-006/001 A", &second, "corr-2"))
            .await
            .expect("retried delivery");
        assert_eq!((a.status, b.status), (204, 204));
        assert_eq!(
            a.erp_id,
            b.erp_id,
            "{} updated the same internal id",
            sink.auth_scheme()
        );
        assert!(a.erp_id.as_deref().is_some_and(|id| id.starts_with("47")));
        let records = ns.records.lock().await;
        assert_eq!(
            records.len(),
            1,
            "{}: one record per external id",
            sink.auth_scheme()
        );
        let (_, stored) = &records[&("salesOrder".to_string(), "SF-006/001 A".to_string())];
        assert_eq!(stored["memo"], "second");
        assert_eq!(*ns.correlations.lock().await, ["corr-1", "corr-2"]);
    }
}

#[tokio::test]
async fn m2m_token_is_fetched_once_and_reused() {
    let (ns, base) = start().await;
    let sink = sink(&base, &m2m_keys(REGISTERED_KEY));
    assert_eq!(sink.auth_scheme(), "M2M");
    for i in 0..5 {
        let payload = json!({"entity": {"id": "42"}, "n": i});
        sink.deliver(delivery(&format!("SO-{i}"), &payload, "corr"))
            .await
            .expect("delivered");
    }
    assert_eq!(ns.token_requests.load(Ordering::SeqCst), 1);
    assert_eq!(ns.records.lock().await.len(), 5);
}

#[tokio::test]
async fn expired_token_is_renewed_once_and_the_delivery_succeeds() {
    let (ns, base) = start().await;
    let sink = sink(&base, &m2m_keys(REGISTERED_KEY));
    let payload = json!({"entity": {"id": "42"}});
    sink.deliver(delivery("SO-1", &payload, "c1"))
        .await
        .expect("first");
    // NetSuite forgets the token (expiry, revocation of the session): the next request gets a 401.
    ns.tokens.lock().await.clear();
    let done = sink
        .deliver(delivery("SO-2", &payload, "c2"))
        .await
        .expect("renewed");
    assert_eq!(done.status, 204);
    assert_eq!(ns.token_requests.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn expired_credentials_are_a_flow_level_error() {
    let (ns, base) = start().await;
    let payload = json!({"entity": {"id": "42"}});

    // M2M: a 401 even with a fresh token means the mapping or role is gone.
    let m2m = sink(&base, &m2m_keys(REGISTERED_KEY));
    ns.revoked.store(true, Ordering::SeqCst);
    let err = m2m
        .deliver(delivery("SO-1", &payload, "c"))
        .await
        .unwrap_err();
    assert_eq!(
        (err.class, err.status),
        (ErrorClass::FlowLevel, Some(401)),
        "{err}"
    );
    assert_eq!(
        ns.token_requests.load(Ordering::SeqCst),
        2,
        "one renewal, then no more"
    );
    assert!(err.message.contains("INVALID_LOGIN"), "{err}");
    assert!(
        m2m.probe()
            .await
            .is_err_and(|e| e.class == ErrorClass::FlowLevel)
    );
    ns.revoked.store(false, Ordering::SeqCst);
    m2m.probe()
        .await
        .expect("the probe passes once NetSuite accepts us again");

    // TBA: a secret that does not match the token's is caught by the signature check.
    let tba = sink(&base, &tba_keys("not-the-consumer-secret"));
    let err = tba
        .deliver(delivery("SO-1", &payload, "c"))
        .await
        .unwrap_err();
    assert_eq!(
        (err.class, err.status),
        (ErrorClass::FlowLevel, Some(401)),
        "{err}"
    );

    // M2M with a key whose certificate NetSuite does not know: the token endpoint refuses.
    let unknown = sink(
        &base,
        &m2m_keys(include_str!("data/sinks/unregistered_key.pem")),
    );
    let err = unknown
        .deliver(delivery("SO-1", &payload, "c"))
        .await
        .unwrap_err();
    assert_eq!(
        (err.class, err.status),
        (ErrorClass::FlowLevel, Some(400)),
        "{err}"
    );
    assert!(err.message.contains("token request failed"), "{err}");
    assert!(ns.records.lock().await.is_empty());
}

#[tokio::test]
async fn throttled_request_is_transient_and_carries_retry_after() {
    let (ns, base) = start().await;
    let sink = sink(&base, &tba_keys(CONSUMER_SECRET));
    ns.throttle.store(1, Ordering::SeqCst);
    let payload = json!({"entity": {"id": "42"}});
    let err = sink
        .deliver(delivery("SO-1", &payload, "c"))
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Transient);
    assert_eq!(
        (err.status, err.retry_after),
        (Some(429), Some(Duration::from_secs(7)))
    );
    // The next attempt (a fresh nonce and timestamp) goes through.
    sink.deliver(delivery("SO-1", &payload, "c"))
        .await
        .expect("retry after the wait");
}

#[tokio::test]
async fn rejected_record_is_permanent_with_netsuite_error_details() {
    let (ns, base) = start().await;
    let sink = sink(&base, &tba_keys(CONSUMER_SECRET));
    let payload = json!({"entity": {"id": "0"}});
    let err = sink
        .deliver(delivery("SO-1", &payload, "c"))
        .await
        .unwrap_err();
    assert_eq!((err.class, err.status), (ErrorClass::Permanent, Some(400)));
    assert!(
        err.message.contains("INVALID_CONTENT") && err.message.contains("(at entity)"),
        "{}",
        err.message
    );
    assert!(
        err.response
            .as_deref()
            .is_some_and(|r| r.starts_with("HTTP 400") && r.contains("o:errorDetails"))
    );
    assert!(ns.records.lock().await.is_empty());
}

#[tokio::test]
async fn lookup_reads_every_suiteql_page() {
    let (ns, base) = start().await;
    // Signed query parameters (limit, offset) are part of the TBA base string.
    let sink = sink(&base, &tba_keys(CONSUMER_SECRET));
    let items = sink.fetch_lookup("item", "itemid").await.expect("lookup");
    assert_eq!(items.len(), 2500);
    assert_eq!(ns.suiteql_pages.load(Ordering::SeqCst), 3);
    assert_eq!(items[2499]["itemid"], "SKU-2499");
    assert!(
        items[0].get("links").is_none(),
        "NetSuite's links are not lookup data"
    );
    let err = sink
        .fetch_lookup("item; DELETE", "itemid")
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Config);
}

#[tokio::test]
async fn secret_without_either_key_set_is_a_config_error() {
    let mut spec = sink_mock::spec(
        SinkSystem::Netsuite,
        Some("https://1234567.suitetalk.api.netsuite.com"),
    );
    spec.record_type = Some("salesOrder".into());
    let (_dir, credentials) = secret(&[("accountId", ACCOUNT)]);
    let err = sinks::build(&spec, credentials, sinks::http_client())
        .err()
        .expect("refused");
    assert_eq!(err.label(), "sink_invalid");
    assert!(
        err.to_string().contains("consumerKey") && err.to_string().contains("clientId"),
        "{err}"
    );
    let (_dir, credentials) = secret(&tba_keys(CONSUMER_SECRET));
    spec.record_type = None;
    let err = sinks::build(&spec, credentials, sinks::http_client())
        .err()
        .expect("refused");
    assert_eq!(err.to_string(), "netsuite sink: recordType is required");
}

#[tokio::test]
async fn m2m_signs_with_the_algorithm_the_key_calls_for() {
    use jsonwebtoken::Algorithm;
    let cases = [
        (CERTIFICATE_ID, REGISTERED_KEY, Algorithm::PS256),
        (
            PSS_CERTIFICATE_ID,
            include_str!("data/sinks/netsuite_m2m_rsa_pss_test_key.pem"),
            Algorithm::PS256,
        ),
        (
            EC256_CERTIFICATE_ID,
            include_str!("data/sinks/netsuite_m2m_es256_test_key.pem"),
            Algorithm::ES256,
        ),
        (
            EC384_CERTIFICATE_ID,
            include_str!("data/sinks/netsuite_m2m_es384_test_key.pem"),
            Algorithm::ES384,
        ),
    ];
    for (certificate_id, key, algorithm) in cases {
        let (ns, base) = start().await;
        let sink = sink(&base, &m2m_keys_for(certificate_id, key));
        assert_eq!(sink.assertion_algorithm(), Some(algorithm));
        let payload = json!({"entity": {"id": "42"}});
        let done = sink
            .deliver(delivery("SO-1", &payload, "c"))
            .await
            .unwrap_or_else(|e| panic!("{algorithm:?}: {e}"));
        assert_eq!(done.status, 204);
        assert_eq!(ns.token_requests.load(Ordering::SeqCst), 1);
    }
}

#[tokio::test]
async fn ec_key_for_an_rsa_certificate_is_refused_by_the_token_endpoint() {
    // The key signs ES256, but the certificate the kid names is RSA: NetSuite refuses the assertion.
    let (ns, base) = start().await;
    let sink = sink(
        &base,
        &m2m_keys_for(
            CERTIFICATE_ID,
            include_str!("data/sinks/netsuite_m2m_es256_test_key.pem"),
        ),
    );
    let payload = json!({"entity": {"id": "42"}});
    let err = sink
        .deliver(delivery("SO-1", &payload, "c"))
        .await
        .unwrap_err();
    assert_eq!(
        (err.class, err.status),
        (ErrorClass::FlowLevel, Some(400)),
        "{err}"
    );
    assert!(ns.records.lock().await.is_empty());
}

#[tokio::test]
async fn sec1_ec_key_is_refused_with_the_conversion_to_make() {
    let mut spec = sink_mock::spec(
        SinkSystem::Netsuite,
        Some("https://1234567.suitetalk.api.netsuite.com"),
    );
    spec.record_type = Some("salesOrder".into());
    let (_dir, credentials) = secret(&m2m_keys_for(
        EC256_CERTIFICATE_ID,
        include_str!("data/sinks/netsuite_m2m_es256_sec1_key.pem"),
    ));
    let err = sinks::build(&spec, credentials, sinks::http_client())
        .err()
        .expect("refused");
    let message = err.to_string();
    assert!(
        message.contains("privateKey") && message.contains("openssl pkcs8 -topk8"),
        "{message}"
    );
    let (_dir, credentials) = secret(&m2m_keys(
        "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n",
    ));
    let err = sinks::build(&spec, credentials, sinks::http_client())
        .err()
        .expect("refused");
    assert!(err.to_string().contains("privateKey"), "{err}");
}

#[tokio::test]
async fn asynchronous_job_id_is_never_taken_for_the_record_id() {
    let (ns, base) = start().await;
    let sink = sink(&base, &tba_keys(CONSUMER_SECRET));
    ns.asynchronous.store(true, Ordering::SeqCst);
    let payload = json!({"entity": {"id": "42"}, "memo": "queued"});
    let queued = sink
        .deliver(delivery("SO-9", &payload, "c1"))
        .await
        .expect("accepted");
    assert_eq!(queued.status, 202);
    assert_eq!(
        queued.erp_id, None,
        "the job's id (900) is not the record's internal id"
    );
    // Once NetSuite answers synchronously again, the same external id yields the record's real internal id.
    ns.asynchronous.store(false, Ordering::SeqCst);
    let done = sink
        .deliver(delivery("SO-9", &payload, "c2"))
        .await
        .expect("delivered");
    let records = ns.records.lock().await;
    let (internal, _) = records[&("salesOrder".to_string(), "SO-9".to_string())];
    assert_eq!(done.erp_id, Some(internal.to_string()));
    assert_eq!(records.len(), 1);
}
