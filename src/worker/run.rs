//! Assembles a worker from a flow's rendered configuration: the sink with the flow's pressure limits, the
//! source (webhook routes or the Salesforce poller), the lookups and their refresh, then runs until shutdown.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};

use super::{RenderedFlow, Worker, WorkerError, WorkerSettings};
use crate::api::{LookupBinding, LookupSource, LookupSpec, SourceMode, SourceSystem};
use crate::connectors::sources::{salesforce::SalesforcePoller, webhook};
use crate::connectors::{Credentials, Intake, Sink, sinks};

/// Everything beyond [`WorkerSettings`] that running a real flow needs.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Directory with one JSON file per ConfigMap lookup (`<name>.json`), as the controller mounts them.
    pub lookups_dir: Option<PathBuf>,
}

fn credentials(settings: &WorkerSettings, secret: &str, prefix: &str) -> Credentials {
    Credentials::new(
        settings
            .secrets_dir
            .as_ref()
            .map(|d| d.join(secret))
            .as_deref(),
        prefix,
    )
}

/// Starts the worker of `rendered` with its real connectors. The caller awaits its own shutdown signal and
/// then calls [`Worker::shutdown`].
pub async fn start_flow(
    rendered: &RenderedFlow,
    settings: &WorkerSettings,
    options: &RunOptions,
) -> Result<Worker, WorkerError> {
    start_flow_on(rendered, settings, options, None).await
}

/// [`start_flow`] on sockets already listening (see [`Worker::start_on`]). Everything that can fail is
/// done before the worker starts serving, so a failed attempt leaves the sockets to whoever answers for them.
pub async fn start_flow_on(
    rendered: &RenderedFlow,
    settings: &WorkerSettings,
    options: &RunOptions,
    listeners: Option<super::Listeners>,
) -> Result<Worker, WorkerError> {
    let flow = rendered.flow_name();
    let spec = &rendered.flow.spec;
    let setup = |message: String| WorkerError::Setup {
        flow: flow.clone(),
        message,
    };
    let sink_credentials = credentials(settings, &spec.sink.credentials_secret_ref.name, "sink");
    let sink: Arc<dyn Sink> = sinks::build_limited(
        &spec.sink,
        &spec.delivery,
        sink_credentials,
        sinks::http_client(),
    )
    .map_err(|e| match e {
        sinks::BuildError::Credentials { .. } => WorkerError::Credentials {
            flow: flow.clone(),
            message: format!("spec.sink: {e}"),
        },
        e => setup(format!("spec.sink: {e}")),
    })?;
    let source_error = |e: crate::connectors::sources::SourceError| match e {
        crate::connectors::sources::SourceError::Credentials(_) => WorkerError::Credentials {
            flow: flow.clone(),
            message: format!("spec.source: {e}"),
        },
        e => setup(format!("spec.source: {e}")),
    };
    let source_credentials =
        credentials(settings, &spec.source.credentials_secret_ref.name, "source");

    let declared = rendered.contract.spec.lookups.clone();
    let first = load_lookups(
        &spec.lookups,
        &declared,
        sink.as_ref(),
        options.lookups_dir.as_deref(),
    )
    .await;
    let (initial, failed) = match first {
        Ok(v) => (v, None),
        Err(e) => (Value::Object(Map::new()), Some(e)),
    };

    let webhook_config = match spec.source.mode {
        SourceMode::Webhook => Some(
            webhook::WebhookConfig::from_spec(&flow, &spec.source, &source_credentials)
                .map_err(source_error)?,
        ),
        SourceMode::Poll => None,
    };
    let poller = match spec.source.mode {
        SourceMode::Poll if spec.source.system != SourceSystem::Salesforce => {
            return Err(setup(
                "spec.source: poll mode is available for salesforce only".into(),
            ));
        }
        SourceMode::Poll => Some(
            SalesforcePoller::from_spec(&flow, &spec.source, &source_credentials)
                .map_err(source_error)?,
        ),
        SourceMode::Webhook => None,
    };
    let mut worker = Worker::start_on(
        rendered,
        settings,
        sink.clone(),
        initial,
        {
            let source = spec.source.clone();
            let credentials = source_credentials.clone();
            move |intake| match webhook_config {
                Some(config) => webhook::router_rotating(
                    config,
                    intake as Arc<dyn Intake>,
                    &source,
                    credentials,
                ),
                None => axum::Router::new(),
            }
        },
        listeners,
    )
    .await?;
    if let Some(reason) = failed {
        tracing::error!(flow = %flow, %reason, "lookups did not load; records are stored but not processed until they do");
        worker
            .pipeline
            .set_gate(Some(format!("lookups unavailable: {reason}")));
    }

    if !spec.lookups.is_empty() {
        let interval = spec
            .lookups
            .iter()
            .filter_map(|l| l.refresh_interval.map(Duration::from))
            .min()
            .unwrap_or(Duration::from_secs(600))
            .max(Duration::from_secs(1));
        let pipeline = worker.pipeline.clone();
        let bindings = spec.lookups.clone();
        let dir = options.lookups_dir.clone();
        let mut shutdown = worker.shutdown_signal();
        let flow_name = flow.clone();
        let declared = declared.clone();
        worker.spawn(async move {
            loop {
                // Retry sooner while the flow is gated on its lookups.
                let wait = if pipeline.gated().is_some() { Duration::from_secs(5).min(interval) } else { interval };
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => return,
                }
                match load_lookups(&bindings, &declared, pipeline.sink.as_ref(), dir.as_deref()).await {
                    Ok(tables) => match super::build_env(&pipeline.contract, &flow_name, &tables) {
                        Ok(env) => {
                            pipeline.set_env(env);
                            pipeline.set_gate(None);
                        }
                        Err(e) => tracing::error!(flow = %flow_name, error = %e, "refreshed lookups rejected; keeping the previous ones"),
                    },
                    // A failed refresh keeps the last good snapshot: stale prices beat rejecting every order.
                    Err(e) => tracing::warn!(flow = %flow_name, error = %e, "lookup refresh failed; keeping the previous snapshot"),
                }
            }
        });
    }

    if let Some(poller) = poller {
        let poller = poller.reporting_to(worker.pipeline.source_api.clone());
        let intake: Arc<dyn Intake> = worker.intake.clone();
        let shutdown = worker.shutdown_signal();
        let flow_name = flow.clone();
        worker.spawn(async move {
            if let Err(e) = poller.run(intake, shutdown).await {
                tracing::error!(flow = %flow_name, error = %e, "the Salesforce poller stopped");
            }
        });
    }
    Ok(worker)
}

/// Loads every lookup of the flow into `{name: {key: entry}}`.
pub async fn load_lookups(
    bindings: &[LookupBinding],
    declared: &[LookupSpec],
    sink: &dyn Sink,
    dir: Option<&Path>,
) -> Result<Value, String> {
    let mut tables = Map::new();
    for binding in bindings {
        let entries: Vec<Value> = match binding.from {
            LookupSource::Sink => {
                let resource = binding.resource.as_deref().unwrap_or(&binding.name);
                sink.fetch_lookup(resource, &binding.key)
                    .await
                    .map_err(|e| format!("lookup {}: {e}", binding.name))?
            }
            LookupSource::ConfigMap => {
                let dir = dir.ok_or_else(|| {
                    format!("lookup {}: no lookups directory is mounted", binding.name)
                })?;
                let path = dir.join(format!("{}.json", binding.name));
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("lookup {}: {}: {e}", binding.name, path.display()))?;
                let value: Value = serde_json::from_str(&text)
                    .map_err(|e| format!("lookup {}: {}: {e}", binding.name, path.display()))?;
                entries_of(value)
            }
            LookupSource::Http => {
                let url = binding
                    .url
                    .as_deref()
                    .ok_or_else(|| format!("lookup {}: url is required", binding.name))?;
                let response = sinks::http_client()
                    .get(url)
                    .send()
                    .await
                    .map_err(|e| format!("lookup {}: {e}", binding.name))?;
                if !response.status().is_success() {
                    return Err(format!(
                        "lookup {}: HTTP {}",
                        binding.name,
                        response.status()
                    ));
                }
                entries_of(
                    response
                        .json()
                        .await
                        .map_err(|e| format!("lookup {}: {e}", binding.name))?,
                )
            }
        };
        let fields: Vec<&str> = declared
            .iter()
            .find(|d| d.name == binding.name)
            .map(|d| d.fields.iter().map(|f| f.name.as_str()).collect())
            .unwrap_or_default();
        let entries = entries
            .into_iter()
            .map(|e| contract_field_names(e, &fields))
            .collect();
        tables.insert(
            binding.name.clone(),
            Value::Object(key_entries(entries, &binding.key)),
        );
    }
    Ok(Value::Object(tables))
}

/// ERPs spell columns their own way (NetSuite's SuiteQL answers in lower case: `unitprice`); an entry field
/// that matches a declared field ignoring case is renamed to the contract's spelling.
fn contract_field_names(entry: Value, declared: &[&str]) -> Value {
    let Value::Object(mut map) = entry else {
        return entry;
    };
    for name in declared {
        if map.contains_key(*name) {
            continue;
        }
        let found = map.keys().find(|k| k.eq_ignore_ascii_case(name)).cloned();
        if let Some(k) = found
            && let Some(v) = map.remove(&k)
        {
            map.insert((*name).to_string(), v);
        }
    }
    Value::Object(map)
}

/// A lookup document is either a list of entries or an object already keyed.
fn entries_of(value: Value) -> Vec<Value> {
    match value {
        Value::Array(items) => items,
        Value::Object(map) => map
            .into_iter()
            .map(|(k, mut v)| {
                if let Value::Object(o) = &mut v {
                    o.entry("__key").or_insert(Value::String(k));
                }
                v
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn key_entries(entries: Vec<Value>, key: &str) -> Map<String, Value> {
    let mut out = BTreeMap::new();
    for mut entry in entries {
        let k = entry
            .get(key)
            .or_else(|| entry.get("__key"))
            .and_then(|k| match k {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            });
        if let (Some(k), Value::Object(o)) = (k, &mut entry) {
            o.remove("__key");
            out.insert(k, entry);
        }
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erp_column_spelling_is_matched_to_the_contract() {
        let entry = serde_json::json!({"sku": "A", "unitprice": "1.00", "CURRENCY": "USD"});
        let renamed = contract_field_names(entry, &["unitPrice", "currency"]);
        assert_eq!(
            renamed,
            serde_json::json!({"sku": "A", "unitPrice": "1.00", "currency": "USD"})
        );
    }

    #[test]
    fn lookup_documents_are_keyed_by_the_binding_key() {
        let list =
            entries_of(serde_json::json!([{"sku": "A", "p": 1}, {"sku": 7, "p": 2}, {"p": 3}]));
        let keyed = key_entries(list, "sku");
        assert_eq!(keyed.keys().cloned().collect::<Vec<_>>(), vec!["7", "A"]);
        let object = entries_of(serde_json::json!({"B": {"p": 1}}));
        assert_eq!(
            Value::Object(key_entries(object, "sku")),
            serde_json::json!({"B": {"p": 1}})
        );
    }
}
