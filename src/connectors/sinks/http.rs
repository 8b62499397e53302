//! Generic HTTP JSON sink: `PUT {baseUrl}/{externalId}` with the payload as the body.
//!
//! PUT to a URL named by the external id is an upsert by definition (RFC 9110 §9.3.4: PUT is idempotent, it
//! creates or replaces the target), so a retried delivery cannot duplicate even behind a server that ignores
//! idempotency keys. Every request also carries `Idempotency-Key: {externalId}.{payload digest}`: per the IETF
//! `Idempotency-Key` header draft a server may refuse a reused key with a different body (422), so the key names
//! one version of the record — a retry reuses it, an update gets a new one.
//!
//! Secret keys (both optional): `token` → `Authorization: Bearer …`; `signingSecret` → `X-Meshline-Timestamp`
//! (Unix seconds) and `X-Meshline-Signature: sha256=<hex HMAC-SHA256 of "{timestamp}.{body}">`, so the receiver
//! can verify origin and reject replays.
//!
//! ## Bulk endpoint (`spec.sink.bulk`, off by default)
//!
//! With `bulk: {path, maxRecords}` the sink takes batches ([`Sink::deliver_batch`]): one
//! `POST {baseUrl}{path}` carries up to `maxRecords` records (and at most 1 MiB of payloads):
//!
//! ```json
//! {"records": [{"externalId": "SO-1", "correlationId": "…", "attempt": 1,
//!               "idempotencyKey": "SO-1.3f2a…", "payload": {…}}]}
//! ```
//!
//! `idempotencyKey` is exactly the `Idempotency-Key` a single `PUT` of that record would carry, so a receiver
//! deduplicates per record whichever way it arrived. The request has no `Idempotency-Key` header of its own:
//! a retried batch differs in its `attempt` numbers and, after a bisection, in its records, and the header
//! draft lets a server refuse a reused key with another body (422), which would dead-letter good records.
//! The body is signed like a single delivery (`X-Meshline-Signature` over `"{timestamp}.{body}"`), and the
//! bearer token is the same. `X-Correlation-Id` (and `traceparent`) name the batch, `bulk-` and a digest of
//! the records' correlation ids (stable across retries of the same batch); each record's own correlation id
//! is in the body.
//!
//! The answer is `2xx` with one result per record, matched by `externalId` (order does not matter):
//!
//! ```json
//! {"results": [{"externalId": "SO-1", "status": 201, "erpId": "88"},
//!              {"externalId": "SO-2", "status": 422, "error": "amount must not be negative"}]}
//! ```
//!
//! Each `status` is read like the status of a single `PUT` (201 created, 200/204 updated, 401/403 flow-level,
//! 408/429/5xx transient, other 4xx permanent; `error` becomes the dead letter's ERP answer). A record with no
//! result, with several, or with a result that has no valid status is a transient failure of that record —
//! never taken as delivered. An answer that is not `2xx` fails the whole batch with the status's class (a
//! permanent one is bisected by the pipeline), except 404, 405 and 501: a bulk endpoint that does not exist
//! is a configuration error, and records wait instead of being dead-lettered one by one. A `2xx` answer that
//! is not this JSON fails the batch as transient. At most 16 MiB of the answer is read.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use hmac::{Hmac, Mac};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use url::Url;

use super::netsuite::oauth_encode;
use super::{BuildError, lineage, optional_credential, required, send};
use crate::api::{ErrorClass, SinkSpec};
use crate::connectors::{
    BatchLimits, Credentials, Delivered, Delivery, Sink, SinkError, parse_retry_after,
    transport_error, truncate,
};

const SYSTEM: &str = "http";
/// The most of a bulk answer that is read: a larger `2xx` answer is not trusted, a larger error is cut.
pub const MAX_BULK_ANSWER_BYTES: usize = 16 << 20;
const MAX_BULK_PATH: usize = 512;
const MAX_BULK_RECORDS: u32 = 10_000;

/// Upserts JSON documents with PUT, or many at once through the optional bulk endpoint.
pub struct HttpSink {
    http: reqwest::Client,
    base: Url,
    token: Option<String>,
    signing_secret: Option<String>,
    bulk: Option<BulkEndpoint>,
}

/// `spec.sink.bulk`, resolved.
struct BulkEndpoint {
    url: Url,
    max_records: usize,
}

/// One record of a bulk request (see the module doc for the shape).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BulkRecord<'a> {
    external_id: &'a str,
    correlation_id: &'a str,
    attempt: u32,
    idempotency_key: String,
    payload: &'a Value,
}

#[derive(Serialize)]
struct BulkRequest<'a> {
    records: Vec<BulkRecord<'a>>,
}

/// The `X-Correlation-Id` of a bulk request: a digest of its records' correlation ids, so a retry of the same
/// batch shows up under the same id in the ERP's logs.
pub fn bulk_correlation_id(deliveries: &[Delivery<'_>]) -> String {
    let mut digest = Sha256::new();
    for delivery in deliveries {
        digest.update(delivery.correlation_id.as_bytes());
        digest.update(b"\n");
    }
    format!("bulk-{}", &hex::encode(digest.finalize())[..16])
}

/// The `Idempotency-Key` for one version of a record.
pub fn idempotency_key(external_id: &str, body: &[u8]) -> String {
    format!("{external_id}.{}", &hex::encode(Sha256::digest(body))[..16])
}

/// The `X-Meshline-Signature` value for a body sent at `timestamp`.
pub fn signature(secret: &str, timestamp: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes a key of any length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

impl HttpSink {
    pub fn from_spec(
        spec: &SinkSpec,
        credentials: &Credentials,
        http: reqwest::Client,
    ) -> Result<Self, BuildError> {
        let base = required(SYSTEM, "baseUrl", spec.base_url.as_ref())?;
        let base = Url::parse(base).map_err(|e| BuildError::Invalid {
            system: SYSTEM,
            reason: format!("baseUrl {base:?}: {e}"),
        })?;
        let bulk = match &spec.bulk {
            Some(bulk) => Some(bulk_endpoint(&base, &bulk.path, bulk.max_records)?),
            None => None,
        };
        Ok(HttpSink {
            http,
            base,
            token: optional_credential(SYSTEM, credentials, "token")?,
            signing_secret: optional_credential(SYSTEM, credentials, "signingSecret")?,
            bulk,
        })
    }

    /// Adds `X-Meshline-Timestamp` and the HMAC signature over exactly `body`, when a signing secret is set.
    fn sign(&self, request: reqwest::RequestBuilder, body: &[u8]) -> reqwest::RequestBuilder {
        match &self.signing_secret {
            Some(secret) => {
                let timestamp = chrono::Utc::now().timestamp().to_string();
                request
                    .header("X-Meshline-Signature", signature(secret, &timestamp, body))
                    .header("X-Meshline-Timestamp", timestamp)
            }
            None => request,
        }
    }

    /// One bulk request for `deliveries`: `Err` when the batch failed as a whole, else one result each.
    async fn deliver_bulk(
        &self,
        bulk: &BulkEndpoint,
        deliveries: &[Delivery<'_>],
    ) -> Result<Vec<Result<Delivered, SinkError>>, SinkError> {
        let mut records = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            let payload = serialise(delivery.payload)?;
            records.push(BulkRecord {
                external_id: delivery.external_id,
                correlation_id: delivery.correlation_id,
                attempt: delivery.attempt,
                idempotency_key: idempotency_key(delivery.external_id, &payload),
                payload: delivery.payload,
            });
        }
        let body = serde_json::to_vec(&BulkRequest { records }).map_err(|e| {
            SinkError::new(
                SYSTEM,
                ErrorClass::Permanent,
                format!("bulk request is not serialisable: {e}"),
            )
        })?;
        let request = lineage(
            self.http.post(bulk.url.clone()),
            &bulk_correlation_id(deliveries),
        )
        .header("Content-Type", "application/json")
        .header("Accept", "application/json");
        let request = self.authorize(self.sign(request, &body)).body(body);
        let answer = send_bounded(request).await?;
        if !(200..300).contains(&answer.status) {
            let mut err =
                SinkError::from_status(SYSTEM, answer.status, answer.retry_after, &answer.body);
            if matches!(answer.status, 404 | 405 | 501) {
                // The endpoint itself is missing: no record is at fault, so none may be dead-lettered for it.
                err.class = ErrorClass::Config;
                err.message = format!(
                    "bulk endpoint {} answered HTTP {}; check spec.sink.bulk.path: {}",
                    bulk.url,
                    answer.status,
                    truncate(&answer.body, 300)
                );
            }
            return Err(err);
        }
        let whole_answer = || format!("HTTP {}\n{}", answer.status, truncate(&answer.body, 8192));
        if !answer.complete {
            let mut err = SinkError::new(
                SYSTEM,
                ErrorClass::Transient,
                format!(
                    "bulk answer from {} is larger than {MAX_BULK_ANSWER_BYTES} bytes",
                    bulk.url
                ),
            );
            err.status = Some(answer.status);
            err.response = Some(whole_answer());
            return Err(err);
        }
        let results = match serde_json::from_str::<Value>(&answer.body) {
            Ok(Value::Object(mut reply)) => match reply.remove("results") {
                Some(Value::Array(results)) => Ok(results),
                _ => Err("it has no \"results\" array".to_string()),
            },
            Ok(_) => Err("it is not a JSON object".to_string()),
            Err(e) => Err(format!("it is not JSON: {e}")),
        };
        let results = results.map_err(|why| {
            let mut err = SinkError::new(
                SYSTEM,
                ErrorClass::Transient,
                format!(
                    "bulk answer HTTP {} from {} cannot be read: {why}",
                    answer.status, bulk.url
                ),
            );
            err.status = Some(answer.status);
            err.response = Some(whole_answer());
            err
        })?;
        Ok(match_results(
            deliveries,
            &results,
            answer.retry_after,
            &whole_answer(),
        ))
    }

    /// `{baseUrl}/{segment}`, the segment percent-encoded so an id with `/` or `?` stays one segment.
    fn url(&self, segment: &str) -> Url {
        let mut url = self.base.clone();
        url.set_path(&format!(
            "{}/{}",
            self.base.path().trim_end_matches('/'),
            oauth_encode(segment)
        ));
        url
    }

    fn authorize(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }
}

#[async_trait]
impl Sink for HttpSink {
    fn system(&self) -> &'static str {
        SYSTEM
    }

    async fn deliver(&self, delivery: Delivery<'_>) -> Result<Delivered, SinkError> {
        let body = serialise(delivery.payload)?;
        let request = lineage(
            self.http.put(self.url(delivery.external_id)),
            delivery.correlation_id,
        )
        .header("Content-Type", "application/json")
        .header("Accept", "application/json")
        .header(
            "Idempotency-Key",
            idempotency_key(delivery.external_id, &body),
        );
        let request = self.sign(request, &body);
        let answer = send(SYSTEM, self.authorize(request).body(body)).await?;
        if !(200..300).contains(&answer.status) {
            return Err(SinkError::from_status(
                SYSTEM,
                answer.status,
                answer.retry_after,
                &answer.body,
            ));
        }
        let erp_id = serde_json::from_str::<Value>(&answer.body)
            .ok()
            .and_then(|b| match &b["id"] {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
            .or_else(|| {
                answer
                    .location
                    .as_deref()
                    .and_then(|l| l.rsplit('/').next())
                    .map(str::to_string)
            });
        // 201 Created vs 200/204 replaced (RFC 9110 §9.3.4).
        let created = match answer.status {
            201 => Some(true),
            200 | 204 => Some(false),
            _ => None,
        };
        Ok(Delivered {
            erp_id,
            created,
            status: answer.status,
        })
    }

    /// With `spec.sink.bulk`: its `maxRecords`, and the pipeline's default payload bytes per request.
    fn batch_limits(&self) -> Option<BatchLimits> {
        self.bulk.as_ref().map(|bulk| BatchLimits {
            max_records: bulk.max_records,
            max_bytes: BatchLimits::DEFAULT.max_bytes,
        })
    }

    /// One `POST` to the bulk endpoint; without `spec.sink.bulk`, one `PUT` per record.
    async fn deliver_batch(
        &self,
        deliveries: &[Delivery<'_>],
    ) -> Result<Vec<Result<Delivered, SinkError>>, SinkError> {
        match &self.bulk {
            Some(bulk) if !deliveries.is_empty() => self.deliver_bulk(bulk, deliveries).await,
            _ => {
                let mut results = Vec::with_capacity(deliveries.len());
                for delivery in deliveries {
                    results.push(self.deliver(*delivery).await);
                }
                Ok(results)
            }
        }
    }

    /// `GET {baseUrl}`: any answer but 401/403, 408/429 and 5xx means the service is back.
    async fn probe(&self) -> Result<(), SinkError> {
        let request = lineage(
            self.http.get(self.base.clone()),
            &uuid::Uuid::new_v4().to_string(),
        );
        let answer = send(SYSTEM, self.authorize(request)).await?;
        let err = SinkError::from_status(SYSTEM, answer.status, answer.retry_after, &answer.body);
        if answer.status < 400 || err.class == ErrorClass::Permanent {
            Ok(())
        } else {
            Err(err)
        }
    }

    /// `GET {baseUrl}/{resource}` answering a JSON array or `{"items": [...]}`; rows without `key` are left out.
    async fn fetch_lookup(&self, resource: &str, key: &str) -> Result<Vec<Value>, SinkError> {
        let request = lineage(
            self.http.get(self.url(resource)),
            &uuid::Uuid::new_v4().to_string(),
        );
        let answer = send(
            SYSTEM,
            self.authorize(request.header("Accept", "application/json")),
        )
        .await?;
        if !(200..300).contains(&answer.status) {
            return Err(SinkError::from_status(
                SYSTEM,
                answer.status,
                answer.retry_after,
                &answer.body,
            ));
        }
        let body: Value = serde_json::from_str(&answer.body).map_err(|e| {
            SinkError::new(
                SYSTEM,
                ErrorClass::Transient,
                format!("lookup {resource} is not JSON: {e}"),
            )
        })?;
        let rows = match body {
            Value::Array(rows) => rows,
            Value::Object(mut o) => match o.remove("items") {
                Some(Value::Array(rows)) => rows,
                _ => Vec::new(),
            },
            _ => Vec::new(),
        };
        Ok(rows.into_iter().filter(|r| r.get(key).is_some()).collect())
    }
}

fn serialise(payload: &Value) -> Result<Vec<u8>, SinkError> {
    serde_json::to_vec(payload).map_err(|e| {
        SinkError::new(
            SYSTEM,
            ErrorClass::Permanent,
            format!("payload is not serialisable: {e}"),
        )
    })
}

/// `spec.sink.bulk` checked again here, because a worker may read a flow file the API server never saw.
fn bulk_endpoint(base: &Url, path: &str, max_records: u32) -> Result<BulkEndpoint, BuildError> {
    let invalid = |reason: String| BuildError::Invalid {
        system: SYSTEM,
        reason,
    };
    if !path.starts_with('/') || path.len() > MAX_BULK_PATH || path.contains(['?', '#']) {
        return Err(invalid(format!(
            "bulk.path {path:?} must start with '/', have no query or fragment and be at most \
             {MAX_BULK_PATH} characters"
        )));
    }
    if !(1..=MAX_BULK_RECORDS).contains(&max_records) {
        return Err(invalid(format!(
            "bulk.maxRecords {max_records} must be between 1 and {MAX_BULK_RECORDS}"
        )));
    }
    let mut url = base.clone();
    url.set_path(&format!("{}{path}", base.path().trim_end_matches('/')));
    Ok(BulkEndpoint {
        url,
        max_records: max_records as usize,
    })
}

/// An answer read up to [`MAX_BULK_ANSWER_BYTES`]; `complete` is false when the rest was left unread.
struct BoundedAnswer {
    status: u16,
    retry_after: Option<Duration>,
    body: String,
    complete: bool,
}

async fn send_bounded(request: reqwest::RequestBuilder) -> Result<BoundedAnswer, SinkError> {
    let mut response = request
        .send()
        .await
        .map_err(|e| transport_error(SYSTEM, &e))?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    let mut body = Vec::new();
    let mut complete = true;
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| transport_error(SYSTEM, &e))?
    {
        let room = MAX_BULK_ANSWER_BYTES - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            complete = false;
            break;
        }
        body.extend_from_slice(&chunk);
    }
    Ok(BoundedAnswer {
        status,
        retry_after,
        body: String::from_utf8_lossy(&body).into_owned(),
        complete,
    })
}

/// One result per delivery, in the deliveries' order, from the answer's `results` matched by `externalId`.
/// A delivery is taken as delivered only when exactly one result names it and that result's status is 2xx.
fn match_results(
    deliveries: &[Delivery<'_>],
    results: &[Value],
    retry_after: Option<Duration>,
    whole_answer: &str,
) -> Vec<Result<Delivered, SinkError>> {
    let sent: HashSet<&str> = deliveries.iter().map(|d| d.external_id).collect();
    let mut by_id: HashMap<&str, Vec<&Value>> = HashMap::new();
    let mut unknown = Vec::new();
    for result in results {
        match result.get("externalId").and_then(Value::as_str) {
            Some(id) if sent.contains(id) => by_id.entry(id).or_default().push(result),
            Some(id) => unknown.push(format!("{id:?}")),
            None => unknown.push("(a result without a string externalId)".to_string()),
        }
    }
    let unmatched = |message: String| {
        let mut err = SinkError::new(SYSTEM, ErrorClass::Transient, message);
        err.response = Some(whole_answer.to_string());
        Err(err)
    };
    deliveries
        .iter()
        .map(|delivery| {
            let id = delivery.external_id;
            match by_id.get(id).map(Vec::as_slice).unwrap_or_default() {
                [result] => item_result(id, result, retry_after),
                [] if unknown.is_empty() => unmatched(format!(
                    "the bulk answer has no result for externalId {id:?}; not taken as delivered"
                )),
                [] => unmatched(format!(
                    "the bulk answer has no result for externalId {id:?} but names ids that were not \
                     sent: {}; not taken as delivered",
                    truncate(&unknown.join(", "), 300)
                )),
                several => unmatched(format!(
                    "the bulk answer has {} results for externalId {id:?}; not taken as delivered",
                    several.len()
                )),
            }
        })
        .collect()
}

/// One record's result, read like the answer to a single `PUT`.
fn item_result(
    external_id: &str,
    result: &Value,
    retry_after: Option<Duration>,
) -> Result<Delivered, SinkError> {
    let Some(status) = result
        .get("status")
        .and_then(Value::as_u64)
        .and_then(|s| u16::try_from(s).ok())
        .filter(|s| (100..=599).contains(s))
    else {
        let mut err = SinkError::new(
            SYSTEM,
            ErrorClass::Transient,
            format!(
                "the bulk result for externalId {external_id:?} has no HTTP status: {}",
                truncate(&result.to_string(), 200)
            ),
        );
        err.response = Some(truncate(&result.to_string(), 8192).to_string());
        return Err(err);
    };
    if !(200..300).contains(&status) {
        let error = match result.get("error") {
            Some(Value::String(text)) => text.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        };
        return Err(SinkError::from_status(SYSTEM, status, retry_after, &error));
    }
    let erp_id = match result.get("erpId") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    Ok(Delivered {
        erp_id,
        created: match status {
            201 => Some(true),
            200 | 204 => Some(false),
            _ => None,
        },
        status,
    })
}
