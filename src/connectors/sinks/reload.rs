//! Rotated credentials without a restart. A mounted Secret changes in place (Kubernetes swaps its `..data`
//! symlink), but a sink reads its Secret once, when it is built; after a rotation the ERP refuses the old
//! credential and the circuit breaker would stay open. [`Reloading`] wraps the sink of a flow and rebuilds it
//! from the spec and the Secret's current files when they changed: checked when the ERP refuses with a
//! flow-level error (401/403), before that error reaches the breaker, and otherwise at most every
//! [`Reloading::CHECK_EVERY`], so a rotation announced ahead of the ERP's switch is picked up as well. The check
//! reads the few small files of one Secret; a sink is rebuilt only when their digest changed.
//!
//! Works the same for every sink (NetSuite TBA and M2M, Odoo, HTTP bearer, PostgreSQL): each keeps its
//! credentials in the instance being replaced, with its caches (an M2M token, an Odoo session), which belong
//! to the old credential anyway.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::Value;

use super::{BuildError, build_sized};
use crate::api::{ErrorClass, SinkSpec};
use crate::connectors::{BatchLimits, Credentials, Delivered, Delivery, Sink, SinkError};

/// A sink rebuilt from its Secret when the Secret's files change.
pub struct Reloading {
    spec: SinkSpec,
    credentials: Credentials,
    http: reqwest::Client,
    /// Requests the flow keeps in flight; a rebuilt sink pools as many connections.
    concurrency: usize,
    system: &'static str,
    current: RwLock<Arc<dyn Sink>>,
    seen: Mutex<Seen>,
}

struct Seen {
    fingerprint: Option<[u8; 32]>,
    checked_at: Instant,
    /// Why the Secret's current content could not build a sink, while it cannot.
    invalid: Option<String>,
}

impl Reloading {
    /// How often the Secret is looked at when nothing is failing.
    pub const CHECK_EVERY: Duration = Duration::from_secs(10);

    pub fn new(
        spec: &SinkSpec,
        credentials: Credentials,
        http: reqwest::Client,
        concurrency: usize,
    ) -> Result<Reloading, BuildError> {
        let fingerprint = credentials.fingerprint();
        let sink = build_sized(spec, credentials.clone(), http.clone(), concurrency)?;
        Ok(Reloading {
            spec: spec.clone(),
            concurrency,
            system: sink.system(),
            credentials,
            http,
            current: RwLock::new(sink),
            seen: Mutex::new(Seen {
                fingerprint,
                checked_at: Instant::now(),
                invalid: None,
            }),
        })
    }

    fn current(&self) -> Arc<dyn Sink> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Why the rotated Secret cannot be used, if it cannot (the previous credentials stay in use meanwhile).
    pub fn invalid_credentials(&self) -> Option<String> {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .invalid
            .clone()
    }

    /// Rebuilds the sink if the Secret changed since it was last looked at. `refused` forces a look (the ERP
    /// just refused the credential); otherwise the Secret is looked at every [`Self::CHECK_EVERY`]. Returns
    /// whether a new sink is in place.
    fn reload_if_rotated(&self, refused: bool) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if !refused && seen.checked_at.elapsed() < Self::CHECK_EVERY {
            return false;
        }
        seen.checked_at = Instant::now();
        let fingerprint = self.credentials.fingerprint();
        if fingerprint == seen.fingerprint {
            return false;
        }
        seen.fingerprint = fingerprint;
        match build_sized(
            &self.spec,
            self.credentials.clone(),
            self.http.clone(),
            self.concurrency,
        ) {
            Ok(sink) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = sink;
                seen.invalid = None;
                tracing::info!(
                    system = self.system,
                    "the sink's Secret changed; new credentials in use"
                );
                true
            }
            Err(e) => {
                tracing::error!(system = self.system, error = %e, "the sink's Secret changed but cannot be used; keeping the previous credentials");
                seen.invalid = Some(e.to_string());
                false
            }
        }
    }

    /// After a flow-level refusal: `Ok` when a rotation put new credentials in place (try again once),
    /// otherwise the error to pass on, which says so while the rotated Secret is unusable.
    fn after_refusal(&self, e: SinkError) -> Result<(), SinkError> {
        if self.reload_if_rotated(true) {
            return Ok(());
        }
        match self.invalid_credentials() {
            Some(why) => Err(SinkError {
                message: format!("{}; the rotated Secret cannot be used: {why}", e.message),
                ..e
            }),
            None => Err(e),
        }
    }
}

#[async_trait]
impl Sink for Reloading {
    fn system(&self) -> &'static str {
        self.system
    }

    async fn deliver(&self, delivery: Delivery<'_>) -> Result<Delivered, SinkError> {
        self.reload_if_rotated(false);
        match self.current().deliver(delivery).await {
            Err(e) if e.class == ErrorClass::FlowLevel => {
                self.after_refusal(e)?;
                self.current().deliver(delivery).await
            }
            other => other,
        }
    }

    async fn deliver_batch(
        &self,
        deliveries: &[Delivery<'_>],
    ) -> Result<Vec<Result<Delivered, SinkError>>, SinkError> {
        self.reload_if_rotated(false);
        match self.current().deliver_batch(deliveries).await {
            Err(e) if e.class == ErrorClass::FlowLevel => {
                self.after_refusal(e)?;
                self.current().deliver_batch(deliveries).await
            }
            other => other,
        }
    }

    fn batch_limits(&self) -> Option<BatchLimits> {
        self.current().batch_limits()
    }

    async fn probe(&self) -> Result<(), SinkError> {
        self.reload_if_rotated(false);
        match self.current().probe().await {
            Err(e) if e.class == ErrorClass::FlowLevel => {
                self.after_refusal(e)?;
                self.current().probe().await
            }
            other => other,
        }
    }

    async fn fetch_lookup(&self, resource: &str, key: &str) -> Result<Vec<Value>, SinkError> {
        self.reload_if_rotated(false);
        match self.current().fetch_lookup(resource, key).await {
            Err(e) if e.class == ErrorClass::FlowLevel => {
                self.after_refusal(e)?;
                self.current().fetch_lookup(resource, key).await
            }
            other => other,
        }
    }

    fn credentials_problem(&self) -> Option<String> {
        self.invalid_credentials()
    }
}
