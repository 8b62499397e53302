//! Leader election through a `coordination.k8s.io` Lease: one replica reconciles, the others wait. The lease
//! is created with POST and renewed or taken over with PUT carrying the resourceVersion it read, so two
//! candidates racing for an expired lease cannot both win (the loser gets 409 Conflict).

use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;

use super::FIELD_MANAGER;

/// How long a lease holds without renewal, and how often the holder renews it.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
pub const RENEW_EVERY: Duration = Duration::from_secs(5);

/// What to do with the lease as read.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// No lease yet: create it, holding it.
    Create,
    /// Ours: renew it.
    Renew,
    /// Someone else's and expired: take it over.
    TakeOver,
    /// Someone else's and current: wait.
    Standby { holder: String },
}

/// Pure: the decision from the lease, our identity and the time.
pub fn decide(lease: Option<&Lease>, me: &str, now: DateTime<Utc>) -> Decision {
    let Some(lease) = lease else {
        return Decision::Create;
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.unwrap_or_default();
    if holder == me {
        return Decision::Renew;
    }
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    let expired = match spec.renew_time {
        Some(MicroTime(t)) => {
            let renewed = DateTime::<Utc>::from_timestamp(t.as_second(), 0).unwrap_or_default();
            now.signed_duration_since(renewed).num_seconds() > duration
        }
        None => true,
    };
    if holder.is_empty() || expired {
        Decision::TakeOver
    } else {
        Decision::Standby { holder }
    }
}

pub struct LeaderElection {
    pub api: Api<Lease>,
    pub name: String,
    pub identity: String,
}

impl LeaderElection {
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str) -> LeaderElection {
        LeaderElection {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
        }
    }

    fn now_micro() -> MicroTime {
        MicroTime(k8s_openapi::jiff::Timestamp::now())
    }

    /// One round; returns whether we hold the lease afterwards.
    pub async fn step(&self) -> Result<bool, kube::Error> {
        let current = self.api.get_opt(&self.name).await?;
        let pp = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        match decide(current.as_ref(), &self.identity, Utc::now()) {
            Decision::Standby { .. } => Ok(false),
            Decision::Create => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
                        acquire_time: Some(Self::now_micro()),
                        renew_time: Some(Self::now_micro()),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                match self.api.create(&pp, &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
            decision => {
                let mut lease = current.unwrap_or_default();
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                if decision == Decision::TakeOver {
                    spec.holder_identity = Some(self.identity.clone());
                    spec.acquire_time = Some(Self::now_micro());
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.lease_duration_seconds = Some(LEASE_DURATION.as_secs() as i32);
                spec.renew_time = Some(Self::now_micro());
                // replace() sends the resourceVersion read above: a concurrent writer makes this a 409.
                match self.api.replace(&self.name, &pp, &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Keeps trying and renewing; publishes leadership on `tx`. Leadership is dropped as soon as a renewal has
    /// not succeeded for a lease duration, before another candidate may take it over.
    pub async fn run(self, tx: watch::Sender<bool>) {
        let mut last_ok: Option<tokio::time::Instant> = None;
        loop {
            match self.step().await {
                Ok(true) => {
                    last_ok = Some(tokio::time::Instant::now());
                    if !*tx.borrow() {
                        tracing::info!(lease = %self.name, identity = %self.identity, "acquired the leader Lease");
                    }
                    tx.send_replace(true);
                }
                Ok(false) => {
                    last_ok = None;
                    if *tx.borrow() {
                        tracing::warn!(lease = %self.name, "the leader Lease is held by another replica");
                    }
                    tx.send_replace(false);
                }
                Err(e) => {
                    tracing::warn!(lease = %self.name, error = %e, "cannot renew the leader Lease");
                    let stale = last_ok.is_none_or(|t| t.elapsed() >= LEASE_DURATION - RENEW_EVERY);
                    if stale {
                        tx.send_replace(false);
                    }
                }
            }
            tokio::time::sleep(RENEW_EVERY).await;
        }
    }
}
