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

use async_trait::async_trait;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::{Digest, Sha256};
use url::Url;

use super::netsuite::oauth_encode;
use super::{BuildError, lineage, optional_credential, required, send};
use crate::api::{ErrorClass, SinkSpec};
use crate::connectors::{Credentials, Delivered, Delivery, Sink, SinkError};

const SYSTEM: &str = "http";

/// Upserts JSON documents with PUT.
pub struct HttpSink {
    http: reqwest::Client,
    base: Url,
    token: Option<String>,
    signing_secret: Option<String>,
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
        Ok(HttpSink {
            http,
            base,
            token: optional_credential(SYSTEM, credentials, "token")?,
            signing_secret: optional_credential(SYSTEM, credentials, "signingSecret")?,
        })
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
        let body = serde_json::to_vec(delivery.payload).map_err(|e| {
            SinkError::new(
                SYSTEM,
                ErrorClass::Permanent,
                format!("payload is not serialisable: {e}"),
            )
        })?;
        let mut request = lineage(
            self.http.put(self.url(delivery.external_id)),
            delivery.correlation_id,
        )
        .header("Content-Type", "application/json")
        .header("Accept", "application/json")
        .header(
            "Idempotency-Key",
            idempotency_key(delivery.external_id, &body),
        );
        if let Some(secret) = &self.signing_secret {
            let timestamp = chrono::Utc::now().timestamp().to_string();
            request = request
                .header("X-Meshline-Signature", signature(secret, &timestamp, &body))
                .header("X-Meshline-Timestamp", timestamp);
        }
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
