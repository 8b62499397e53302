//! ERP sinks: NetSuite's REST record service, Odoo's JSON-RPC API, generic HTTP JSON and a PostgreSQL table.
//! Each delivers by upsert keyed by the contract's external id, so a retried delivery never duplicates.
//!
//! [`build`] picks the implementation from a flow's [`SinkSpec`]; [`Limited`] wraps any sink in the flow's
//! pressure policy (requests in flight and requests per second), because the ERP's limits are shared by every
//! integration of an account (NetSuite allows 15 to 65 concurrent requests per account). The sinks only speak
//! wire formats: they never retry (the worker does, with its backoff) and never log a credential.

pub mod http;
pub mod netsuite;
pub mod odoo;
pub mod postgres;
pub mod reload;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::{Mutex, Semaphore};
use tokio::time::Instant;

use super::{
    BatchLimits, Credentials, CredentialsError, Delivered, Delivery, Sink, SinkError,
    parse_retry_after, traceparent,
};
use crate::api::{DeliveryPolicy, ErrorClass, SinkSpec, SinkSystem};

/// Longest a TCP (and TLS) connection may take to open.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest one request may take, answer included. Set on every request, also when the caller's client has none.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A sink could not be built from its spec and Secret: a configuration problem, reported as a condition.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{system} sink: {field} is required")]
    MissingField {
        system: &'static str,
        field: &'static str,
    },
    #[error("{system} sink: {source}")]
    Credentials {
        system: &'static str,
        #[source]
        source: CredentialsError,
    },
    #[error("{system} sink: {reason}")]
    Invalid {
        system: &'static str,
        reason: String,
    },
}

impl BuildError {
    /// Stable label for conditions and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            BuildError::MissingField { .. } => "sink_missing_field",
            BuildError::Credentials { .. } => "sink_credentials",
            BuildError::Invalid { .. } => "sink_invalid",
        }
    }

    /// Always [`ErrorClass::Config`]: nothing a retry can fix.
    pub fn class(&self) -> ErrorClass {
        ErrorClass::Config
    }
}

pub(crate) fn required<'a>(
    system: &'static str,
    field: &'static str,
    value: Option<&'a String>,
) -> Result<&'a str, BuildError> {
    value
        .map(String::as_str)
        .filter(|v| !v.is_empty())
        .ok_or(BuildError::MissingField { system, field })
}

pub(crate) fn credential(
    system: &'static str,
    credentials: &Credentials,
    key: &str,
) -> Result<String, BuildError> {
    credentials
        .get(key)
        .map_err(|source| BuildError::Credentials { system, source })
}

pub(crate) fn optional_credential(
    system: &'static str,
    credentials: &Credentials,
    key: &str,
) -> Result<Option<String>, BuildError> {
    credentials
        .optional(key)
        .map_err(|source| BuildError::Credentials { system, source })
}

/// The sink a flow's spec describes, unwrapped (callers add [`Limited`] with the flow's policy).
///
/// `http` should come from [`http_client`] (or carry a connect timeout of its own); every request also sets
/// [`REQUEST_TIMEOUT`]. The PostgreSQL sink connects lazily, so building never blocks on the network.
pub fn build(
    spec: &SinkSpec,
    credentials: Credentials,
    http: reqwest::Client,
) -> Result<Arc<dyn Sink>, BuildError> {
    build_sized(spec, credentials, http, Pressure::default().concurrency)
}

/// [`build`] for a flow that keeps `concurrency` requests in flight: a sink that pools connections (the
/// PostgreSQL sink) opens up to that many, so every delivery slot the flow's policy grants has a connection.
pub fn build_sized(
    spec: &SinkSpec,
    credentials: Credentials,
    http: reqwest::Client,
    concurrency: usize,
) -> Result<Arc<dyn Sink>, BuildError> {
    Ok(match spec.system {
        SinkSystem::Netsuite => {
            Arc::new(netsuite::NetSuiteSink::from_spec(spec, &credentials, http)?)
        }
        SinkSystem::Odoo => Arc::new(odoo::OdooSink::from_spec(spec, &credentials, http)?),
        SinkSystem::Http => Arc::new(http::HttpSink::from_spec(spec, &credentials, http)?),
        SinkSystem::Postgres => Arc::new(postgres::PostgresSink::from_spec(
            spec,
            &credentials,
            concurrency,
        )?),
    })
}

/// [`build`] wrapped in the flow's [`DeliveryPolicy`] pressure, and rebuilt from its Secret when the Secret
/// is rotated ([`reload::Reloading`]).
pub fn build_limited(
    spec: &SinkSpec,
    policy: &DeliveryPolicy,
    credentials: Credentials,
    http: reqwest::Client,
) -> Result<Arc<Limited<Arc<dyn Sink>>>, BuildError> {
    let pressure = Pressure::from_policy(policy);
    let sink: Arc<dyn Sink> = Arc::new(reload::Reloading::new(
        spec,
        credentials,
        http,
        pressure.concurrency,
    )?);
    Ok(Arc::new(Limited::new(sink, pressure)))
}

/// A client with the connect and total timeouts every sink relies on.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .user_agent(concat!("meshline/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("a reqwest client with rustls and static settings always builds")
}

/// Adds the lineage headers every sink request carries.
pub(crate) fn lineage(
    request: reqwest::RequestBuilder,
    correlation_id: &str,
) -> reqwest::RequestBuilder {
    request
        .timeout(REQUEST_TIMEOUT)
        .header("X-Correlation-Id", correlation_id)
        .header("traceparent", traceparent(correlation_id))
}

/// A response read whole: status, `Retry-After`, `Location` and body.
pub(crate) struct Answer {
    pub status: u16,
    pub retry_after: Option<Duration>,
    pub location: Option<String>,
    pub body: String,
}

/// Sends the request and reads the answer; a transport failure is a transient [`SinkError`].
pub(crate) async fn send(
    system: &'static str,
    request: reqwest::RequestBuilder,
) -> Result<Answer, SinkError> {
    let response = request
        .send()
        .await
        .map_err(|e| super::transport_error(system, &e))?;
    let status = response.status().as_u16();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let retry_after = header("retry-after").and_then(|v| parse_retry_after(&v));
    let location = header("location");
    let body = response
        .text()
        .await
        .map_err(|e| super::transport_error(system, &e))?;
    Ok(Answer {
        status,
        retry_after,
        location,
        body,
    })
}

/// How hard a flow may push its sink.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pressure {
    /// Requests in flight at once (at least 1).
    pub concurrency: usize,
    /// Requests started per second; 0 means unlimited.
    pub rate_per_second: u32,
}

impl Default for Pressure {
    /// The pressure of a flow with the default delivery policy.
    fn default() -> Self {
        Pressure::from_policy(&DeliveryPolicy::default())
    }
}

impl Pressure {
    pub fn from_policy(policy: &DeliveryPolicy) -> Pressure {
        Pressure {
            concurrency: policy.concurrency.max(1) as usize,
            rate_per_second: policy.rate_limit,
        }
    }
}

/// A token bucket that hands out start times instead of polling: each caller takes a token, possibly driving
/// the balance negative, and sleeps exactly until its token would have accrued. No busy loop, FIFO-ish.
#[derive(Debug)]
pub(crate) struct Bucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    pub(crate) fn new(rate: u32) -> Bucket {
        let rate = f64::from(rate);
        // A tenth of a second of requests (at least one) may go at once, so a backlog never lands as one
        // second-sized burst on an ERP that counts concurrency too.
        let burst = (rate / 10.0).max(1.0);
        Bucket {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    pub(crate) async fn take(&self) {
        let wait = {
            let mut state = self.state.lock().await;
            self.reserve(&mut state, Instant::now())
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Takes a token at `now` from the balance `state` (tokens, last update) and returns how long the caller
    /// waits before it starts. Pure, so the schedule is testable without reading a clock.
    fn reserve(&self, state: &mut (f64, Instant), now: Instant) -> Duration {
        let (tokens, last) = *state;
        let tokens = (tokens + now.saturating_duration_since(last).as_secs_f64() * self.rate)
            .min(self.burst)
            - 1.0;
        *state = (tokens, now);
        if tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-tokens / self.rate)
        }
    }
}

/// Any sink behind the flow's pressure policy: at most `concurrency` requests in flight, at most
/// `rate_per_second` started per second. Deliveries, probes and lookups all count.
pub struct Limited<S> {
    inner: S,
    pressure: Pressure,
    permits: Semaphore,
    bucket: Option<Bucket>,
    in_flight: AtomicUsize,
}

impl<S: Sink> Limited<S> {
    pub fn new(inner: S, pressure: Pressure) -> Limited<S> {
        let concurrency = pressure.concurrency.max(1);
        Limited {
            inner,
            pressure: Pressure {
                concurrency,
                ..pressure
            },
            permits: Semaphore::new(concurrency),
            bucket: (pressure.rate_per_second > 0).then(|| Bucket::new(pressure.rate_per_second)),
            in_flight: AtomicUsize::new(0),
        }
    }

    /// Requests to the ERP in flight right now (the `sink_in_flight` gauge).
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub fn pressure(&self) -> Pressure {
        self.pressure
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }

    async fn enter(&self) -> InFlight<'_> {
        // The permit is taken before the token: a caller that waits for a slot must not burn rate meanwhile.
        let permit = self
            .permits
            .acquire()
            .await
            .expect("the semaphore is never closed");
        if let Some(bucket) = &self.bucket {
            bucket.take().await;
        }
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight {
            _permit: permit,
            counter: &self.in_flight,
        }
    }
}

struct InFlight<'a> {
    _permit: tokio::sync::SemaphorePermit<'a>,
    counter: &'a AtomicUsize,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        // Decremented before the permit is released (fields drop after this), so the gauge never overshoots.
        self.counter.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl<S: Sink> Sink for Limited<S> {
    fn system(&self) -> &'static str {
        self.inner.system()
    }

    async fn deliver(&self, delivery: Delivery<'_>) -> Result<Delivered, SinkError> {
        let _slot = self.enter().await;
        self.inner.deliver(delivery).await
    }

    /// A batch is one request to the ERP: it takes one slot and one token, like a single delivery.
    async fn deliver_batch(
        &self,
        deliveries: &[Delivery<'_>],
    ) -> Result<Vec<Result<Delivered, SinkError>>, SinkError> {
        let _slot = self.enter().await;
        self.inner.deliver_batch(deliveries).await
    }

    fn batch_limits(&self) -> Option<BatchLimits> {
        self.inner.batch_limits()
    }

    async fn probe(&self) -> Result<(), SinkError> {
        let _slot = self.enter().await;
        self.inner.probe().await
    }

    async fn fetch_lookup(&self, resource: &str, key: &str) -> Result<Vec<Value>, SinkError> {
        let _slot = self.enter().await;
        self.inner.fetch_lookup(resource, key).await
    }

    fn credentials_problem(&self) -> Option<String> {
        self.inner.credentials_problem()
    }
}

#[async_trait]
impl<S: Sink + ?Sized> Sink for Arc<S> {
    fn system(&self) -> &'static str {
        (**self).system()
    }

    async fn deliver(&self, delivery: Delivery<'_>) -> Result<Delivered, SinkError> {
        (**self).deliver(delivery).await
    }

    async fn deliver_batch(
        &self,
        deliveries: &[Delivery<'_>],
    ) -> Result<Vec<Result<Delivered, SinkError>>, SinkError> {
        (**self).deliver_batch(deliveries).await
    }

    fn batch_limits(&self) -> Option<BatchLimits> {
        (**self).batch_limits()
    }

    async fn probe(&self) -> Result<(), SinkError> {
        (**self).probe().await
    }

    async fn fetch_lookup(&self, resource: &str, key: &str) -> Result<Vec<Value>, SinkError> {
        (**self).fetch_lookup(resource, key).await
    }

    fn credentials_problem(&self) -> Option<String> {
        (**self).credentials_problem()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_spaces_requests_at_the_configured_rate() {
        // The schedule the bucket hands out, computed at fixed instants: no clock is read, so a busy machine
        // cannot change the answer.
        let bucket = Bucket::new(20);
        let t0 = Instant::now();
        let mut state = (bucket.burst, t0);
        let waits: Vec<Duration> = (0..12).map(|_| bucket.reserve(&mut state, t0)).collect();
        // A burst of two tokens, then one start every 50 ms: the twelfth caller starts half a second in.
        for (i, wait) in waits.iter().enumerate() {
            let expected = Duration::from_millis(50 * (i.saturating_sub(1)) as u64);
            let off = wait.abs_diff(expected);
            assert!(off < Duration::from_micros(1), "caller {i}: {wait:?}");
        }
        // Time that passes refills the bucket at the rate, never beyond the burst.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(bucket.reserve(&mut state, later), Duration::ZERO);
        assert_eq!(bucket.reserve(&mut state, later), Duration::ZERO);
        assert!(bucket.reserve(&mut state, later) > Duration::ZERO);
    }

    #[test]
    fn missing_fields_name_the_field() {
        let err = required("netsuite", "recordType", None).unwrap_err();
        assert_eq!(err.to_string(), "netsuite sink: recordType is required");
        assert_eq!(err.label(), "sink_missing_field");
    }
}
