//! Which Secret keys each connector reads, so the controller can say "Secret odoo-api-key has no key apiKey"
//! before a worker starts and fails. The key names mirror the connectors' `from_spec` code
//! (`src/connectors/sources/*.rs`, `src/connectors/sinks/*.rs`) and the ledger's (`src/worker/mod.rs`).
//! The flow's roster adds its ticket sinks' Secrets (the keys each sink type reads) and its identity Secret
//! (owner ids as keys, no fixed key: an empty one only means nobody can approve, which the worker says).
//!
//! Pure: takes the flow, its roster and the keys present, returns what is missing. Secret *values* never
//! pass through here.

use std::collections::{BTreeMap, BTreeSet};

use crate::api::{
    LedgerType, OwnershipRoster, SinkSystem, SourceMode, SourceSystem, SyncFlow, TicketSinkType,
    WebhookSignature,
};

/// What one Secret must hold: any one of the alternatives, each a set of keys that must all be present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRequirement {
    /// Why the flow references this Secret, e.g. `spec.sink.credentialsSecretRef (odoo)`.
    pub purpose: String,
    pub alternatives: Vec<Vec<&'static str>>,
}

impl KeyRequirement {
    fn new(purpose: impl Into<String>, alternatives: Vec<Vec<&'static str>>) -> Self {
        KeyRequirement {
            purpose: purpose.into(),
            alternatives,
        }
    }

    /// `None` when satisfied, otherwise the missing keys of the closest alternative.
    pub fn missing(&self, present: &BTreeSet<String>) -> Option<Vec<&'static str>> {
        if self.alternatives.is_empty() {
            return None;
        }
        let mut best: Option<Vec<&'static str>> = None;
        for alt in &self.alternatives {
            let missing: Vec<&'static str> = alt
                .iter()
                .copied()
                .filter(|k| !present.contains(*k))
                .collect();
            if missing.is_empty() {
                return None;
            }
            if best.as_ref().is_none_or(|b| missing.len() < b.len()) {
                best = Some(missing);
            }
        }
        best
    }

    pub fn describe(&self) -> String {
        self.alternatives
            .iter()
            .map(|a| a.join("+"))
            .collect::<Vec<_>>()
            .join(" or ")
    }
}

/// Every Secret the flow and its roster reference, by name, with what each use needs (a Secret may serve
/// several uses).
pub fn requirements(
    flow: &SyncFlow,
    roster: Option<&OwnershipRoster>,
) -> BTreeMap<String, Vec<KeyRequirement>> {
    let spec = &flow.spec;
    let mut out: BTreeMap<String, Vec<KeyRequirement>> = BTreeMap::new();
    let source = match (spec.source.mode, spec.source.system, spec.source.signature) {
        (SourceMode::Poll, SourceSystem::Salesforce, _) => KeyRequirement::new(
            "spec.source.credentialsSecretRef (salesforce poll: client credentials or JWT bearer)",
            vec![
                vec!["clientId", "clientSecret"],
                vec!["clientId", "privateKey", "username"],
            ],
        ),
        (SourceMode::Webhook, _, Some(WebhookSignature::HubspotV3)) => KeyRequirement::new(
            "spec.source.credentialsSecretRef (hubspot-v3 webhook)",
            vec![vec!["clientSecret", "accessToken"]],
        ),
        (SourceMode::Webhook, _, Some(WebhookSignature::HmacSha256)) => KeyRequirement::new(
            "spec.source.credentialsSecretRef (hmac-sha256 webhook)",
            vec![vec!["webhookSecret"]],
        ),
        _ => KeyRequirement::new("spec.source.credentialsSecretRef", vec![]),
    };
    out.entry(spec.source.credentials_secret_ref.name.clone())
        .or_default()
        .push(source);
    let sink = match spec.sink.system {
        SinkSystem::Netsuite => KeyRequirement::new(
            "spec.sink.credentialsSecretRef (netsuite: OAuth 2.0 M2M or TBA)",
            vec![
                vec!["clientId", "certificateId", "privateKey"],
                vec![
                    "accountId",
                    "consumerKey",
                    "consumerSecret",
                    "tokenId",
                    "tokenSecret",
                ],
            ],
        ),
        SinkSystem::Odoo => KeyRequirement::new(
            "spec.sink.credentialsSecretRef (odoo)",
            vec![vec!["login", "apiKey"]],
        ),
        // The HTTP sink's token and signing secret are both optional.
        SinkSystem::Http => KeyRequirement::new("spec.sink.credentialsSecretRef (http)", vec![]),
        SinkSystem::Postgres => KeyRequirement::new(
            "spec.sink.credentialsSecretRef (postgres)",
            vec![vec!["url"]],
        ),
    };
    out.entry(spec.sink.credentials_secret_ref.name.clone())
        .or_default()
        .push(sink);
    if spec.ledger.r#type == LedgerType::Postgres
        && let Some(secret) = &spec.ledger.credentials_secret_ref
    {
        out.entry(secret.name.clone())
            .or_default()
            .push(KeyRequirement::new(
                "spec.ledger.credentialsSecretRef (postgres ledger)",
                vec![vec!["url"]],
            ));
    }
    for (i, lookup) in spec.lookups.iter().enumerate() {
        if let Some(secret) = &lookup.credentials_secret_ref {
            out.entry(secret.name.clone())
                .or_default()
                .push(KeyRequirement::new(
                    format!("spec.lookups[{i}].credentialsSecretRef"),
                    vec![],
                ));
        }
    }
    if let Some(roster) = roster {
        roster_requirements(roster, &mut out);
    }
    out
}

/// The roster's Secrets: each ticket sink's credentials and the owners' identities.
fn roster_requirements(roster: &OwnershipRoster, out: &mut BTreeMap<String, Vec<KeyRequirement>>) {
    let name = roster.metadata.name.as_deref().unwrap_or_default();
    for (i, sink) in roster.spec.ticket_sinks.iter().enumerate() {
        // The keys each ticket sink reads to authenticate (or sign) its requests to the vendor's API.
        let (kind, keys) = match sink.r#type {
            TicketSinkType::Webhook => ("webhook", vec!["signingSecret"]),
            TicketSinkType::Slack => ("slack", vec!["webhookUrl"]),
            TicketSinkType::Jira => ("jira", vec!["email", "apiToken"]),
            TicketSinkType::Github => ("github", vec!["token"]),
            TicketSinkType::Pagerduty => ("pagerduty", vec!["routingKey"]),
        };
        out.entry(sink.credentials_secret_ref.name.clone())
            .or_default()
            .push(KeyRequirement::new(
                format!(
                    "OwnershipRoster {name} spec.ticketSinks[{i}].credentialsSecretRef ({kind})"
                ),
                vec![keys],
            ));
    }
    if let Some(secret) = &roster.spec.identity_secret_ref {
        out.entry(secret.name.clone())
            .or_default()
            .push(KeyRequirement::new(
                format!("OwnershipRoster {name} spec.identitySecretRef"),
                vec![],
            ));
    }
}

/// The outcome of checking the referenced Secrets: `Ok` or the first precise problem, as (reason, message).
pub fn check(
    flow: &SyncFlow,
    roster: Option<&OwnershipRoster>,
    present: &BTreeMap<String, Option<BTreeSet<String>>>,
) -> Result<(), (&'static str, String)> {
    let mut problems = Vec::new();
    let mut reason = "";
    for (name, uses) in requirements(flow, roster) {
        match present.get(&name) {
            None | Some(None) => {
                reason = "SecretNotFound";
                let purposes: Vec<&str> = uses.iter().map(|u| u.purpose.as_str()).collect();
                problems.push(format!(
                    "Secret {name} does not exist (referenced by {})",
                    purposes.join(", ")
                ));
            }
            Some(Some(keys)) => {
                for requirement in &uses {
                    if let Some(missing) = requirement.missing(keys) {
                        if reason.is_empty() {
                            reason = "SecretKeysMissing";
                        }
                        problems.push(format!(
                            "Secret {name} lacks key(s) {} needed by {} (expects {})",
                            missing.join(", "),
                            requirement.purpose,
                            requirement.describe()
                        ));
                    }
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err((reason, problems.join("; ")))
    }
}
