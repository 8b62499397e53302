//! Odoo's external JSON-RPC API (`POST {baseUrl}/jsonrpc`): find the record by its reference, then `create`
//! or `write` it.
//!
//! Wire format (Odoo documentation, "External RPC API"): a JSON-RPC 2.0 request with method `call` and params
//! `{service, method, args}`. `common.authenticate(db, login, apiKey, {})` returns the user id (or `false`);
//! `object.execute_kw(db, uid, apiKey, model, method, args, kwargs)` runs an ORM method. Odoo reports a failure
//! with HTTP 200 and an `error` member whose `data.name` is the Python exception (`odoo.exceptions.…`), so the
//! class comes from that name, not from the status.
//!
//! Upsert: `search` on the reference field (`client_order_ref` for `sale.order`, `partner_ref` for
//! `purchase.order`, `ref` otherwise) for the external id; none → `create` with the reference set, one →
//! `write`, several → a permanent error (someone else created duplicates; writing one of them would hide it).
//!
//! One2many and many2many fields (`order_line`) are written with Odoo's x2many commands: `[0, 0, values]`
//! creates a line, `[5, 0, 0]` clears them all, `[6, 0, ids]` sets the linked ids. The sink owns the rule that
//! an upsert *states* the record, lines included: on `write`, every command list that does not start with a
//! clear (5) or a set (6) gets `[5, 0, 0]` in front, so a mapping that emits only `[0, 0, …]` per line
//! replaces the lines instead of appending them again on every update. A list that already starts with 5 or 6
//! is the mapping's own choice and is left alone; so is an empty list (Odoo reads it as "no change": emit
//! `[[5, 0, 0]]` to remove every line). `create` needs no clear, there is nothing to replace yet.
//!
//! Batches ([`Sink::deliver_batch`], up to 100 records): one `search_read` with `[ref, "in", ids]` learns
//! which records exist, then one `create` with the list of the new records' values (Odoo 12+ takes a list
//! and answers the ids in the same order, in one transaction), then one `write` per existing record, each
//! with its own result. The `create` goes first on purpose: if it fails, nothing of the batch has been
//! written yet, so the whole batch fails (`Err`) and the pipeline bisects a permanent failure down to the
//! poison record, or retries a transient one; no record is dead-lettered for another's error. Once the
//! `create` has succeeded every record has its own outcome. A retry stays safe because every attempt starts
//! with the search: a `create` that committed but whose answer was lost is found and written the next time.
//! 100 records a batch because a `create` runs the ORM's computations (taxes, prices) for every order line
//! in one request, and Odoo kills a request after `limit_time_cpu` (60 s by default) while Meshline gives up
//! after 30 s; a few hundred orders with lines would come close.
//!
//! Secret keys: `login` and `apiKey` (an API key is used where the password would be). The spec gives
//! `database` and `model` (default `sale.order`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use serde_json::{Value, json};
use tokio::sync::Mutex;
use url::Url;

use super::http::bulk_correlation_id;
use super::{BuildError, credential, lineage, required, send};
use crate::api::{ErrorClass, SinkSpec};
use crate::connectors::{
    BatchLimits, Credentials, Delivered, Delivery, Sink, SinkError, classify_status, truncate,
};

const SYSTEM: &str = "odoo";
const DEFAULT_MODEL: &str = "sale.order";
const LOOKUP_PAGE: u64 = 500;
const MAX_LOOKUP_ROWS: usize = 200_000;
/// Records per batch: see the module doc for why fewer than the pipeline's default.
pub const BATCH_RECORDS: usize = 100;

/// Upserts records into an Odoo model.
pub struct OdooSink {
    http: reqwest::Client,
    endpoint: Url,
    database: String,
    model: String,
    login: String,
    api_key: String,
    uid: Mutex<Option<i64>>,
    next_id: AtomicU64,
}

/// The field that holds the external id on `model`.
pub fn reference_field(model: &str) -> &'static str {
    match model {
        "sale.order" => "client_order_ref",
        "purchase.order" => "partner_ref",
        _ => "ref",
    }
}

/// Whether `value` is a list of x2many commands: arrays of two or three elements whose first is a command
/// number 0–6 (`[0, 0, {…}]`, `[4, 12]`, `[6, 0, [1, 2]]`).
fn is_command_list(value: &Value) -> bool {
    value.as_array().is_some_and(|items| {
        !items.is_empty()
            && items.iter().all(|item| {
                item.as_array().is_some_and(|c| {
                    (2..=3).contains(&c.len()) && c[0].as_u64().is_some_and(|n| n <= 6)
                })
            })
    })
}

/// The values of a `write` with every x2many command list made to replace, not extend: `[5, 0, 0]` is put in
/// front of each list that does not already start with a clear (5) or a set (6). Returns the fields changed.
pub fn replace_x2many_on_write(values: &mut serde_json::Map<String, Value>) -> Vec<String> {
    let mut changed = Vec::new();
    for (field, value) in values.iter_mut() {
        if !is_command_list(value) {
            continue;
        }
        let Some(commands) = value.as_array_mut() else {
            continue;
        };
        let first = commands[0][0].as_u64();
        if !matches!(first, Some(5 | 6)) {
            commands.insert(0, json!([5, 0, 0]));
            changed.push(field.clone());
        }
    }
    changed
}

/// The class of an Odoo exception by its `data.name`, or `None` to fall back to the HTTP status.
pub fn classify_exception(name: &str) -> Option<ErrorClass> {
    let short = name.rsplit('.').next().unwrap_or(name);
    match short {
        // Wrong or revoked credentials, or a user without the rights: no record can pass until fixed.
        "AccessDenied" | "AccessError" | "SessionExpiredException" => Some(ErrorClass::FlowLevel),
        // The record itself is wrong (a constraint, a missing many2one, an unknown field).
        "ValidationError" | "UserError" | "MissingError" | "ValueError" | "KeyError"
        | "TypeError" => Some(ErrorClass::Permanent),
        _ => None,
    }
}

impl OdooSink {
    pub fn from_spec(
        spec: &SinkSpec,
        credentials: &Credentials,
        http: reqwest::Client,
    ) -> Result<Self, BuildError> {
        let base = required(SYSTEM, "baseUrl", spec.base_url.as_ref())?;
        let mut endpoint = Url::parse(base).map_err(|e| BuildError::Invalid {
            system: SYSTEM,
            reason: format!("baseUrl {base:?}: {e}"),
        })?;
        endpoint.set_path(&format!(
            "{}/jsonrpc",
            endpoint.path().trim_end_matches('/')
        ));
        Ok(OdooSink {
            http,
            endpoint,
            database: required(SYSTEM, "database", spec.database.as_ref())?.to_string(),
            model: spec
                .model
                .clone()
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| DEFAULT_MODEL.to_string()),
            login: credential(SYSTEM, credentials, "login")?,
            api_key: credential(SYSTEM, credentials, "apiKey")?,
            uid: Mutex::new(None),
            next_id: AtomicU64::new(1),
        })
    }

    /// The model the sink writes (`sale.order` by default).
    pub fn model(&self) -> &str {
        &self.model
    }

    /// One JSON-RPC call; the `result` member, or the `error` member as a classified [`SinkError`].
    async fn rpc(
        &self,
        service: &str,
        method: &str,
        args: Value,
        correlation_id: &str,
    ) -> Result<Value, SinkError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = json!({
            "jsonrpc": "2.0",
            "method": "call",
            "params": { "service": service, "method": method, "args": args },
            "id": id,
        });
        let request = lineage(self.http.post(self.endpoint.clone()), correlation_id).json(&body);
        let answer = send(SYSTEM, request).await?;
        if !(200..300).contains(&answer.status) {
            return Err(SinkError::from_status(
                SYSTEM,
                answer.status,
                answer.retry_after,
                &answer.body,
            ));
        }
        let mut reply: Value = serde_json::from_str(&answer.body).map_err(|e| {
            SinkError::new(
                SYSTEM,
                ErrorClass::Transient,
                format!("answer to {service}.{method} is not JSON: {e}"),
            )
        })?;
        if let Some(error) = reply.get("error").filter(|e| !e.is_null()) {
            let name = error["data"]["name"].as_str().unwrap_or("");
            let message = error["data"]["message"]
                .as_str()
                .or(error["message"].as_str())
                .unwrap_or("");
            let class = classify_exception(name).unwrap_or_else(|| classify_status(answer.status));
            let mut err = SinkError::new(
                SYSTEM,
                class,
                format!("{service}.{method}: {name}: {}", truncate(message, 500)),
            );
            err.status = Some(answer.status);
            err.response = Some(format!(
                "HTTP {}\n{}",
                answer.status,
                truncate(&answer.body, 8192)
            ));
            return Err(err);
        }
        Ok(reply
            .get_mut("result")
            .map(Value::take)
            .unwrap_or(Value::Null))
    }

    /// The user id for `login`, authenticating once and again after an access error.
    async fn uid(&self, correlation_id: &str) -> Result<i64, SinkError> {
        let mut uid = self.uid.lock().await;
        if let Some(uid) = *uid {
            return Ok(uid);
        }
        let args = json!([self.database, self.login, self.api_key, {}]);
        let result = self
            .rpc("common", "authenticate", args, correlation_id)
            .await?;
        // A wrong login or key is not an exception in Odoo: authenticate answers `false`.
        let id = result.as_i64().ok_or_else(|| {
            SinkError::new(
                SYSTEM,
                ErrorClass::FlowLevel,
                format!(
                    "database {} refused the login {:?} with the configured apiKey",
                    self.database, self.login
                ),
            )
        })?;
        *uid = Some(id);
        Ok(id)
    }

    /// One ORM call as the sink's user (the audit's `search_read` goes through here too).
    pub(crate) async fn execute_kw(
        &self,
        model: &str,
        method: &str,
        args: Value,
        kwargs: Value,
        correlation_id: &str,
    ) -> Result<Value, SinkError> {
        let uid = self.uid(correlation_id).await?;
        let args = json!([
            self.database,
            uid,
            self.api_key,
            model,
            method,
            args,
            kwargs
        ]);
        let result = self.rpc("object", "execute_kw", args, correlation_id).await;
        if matches!(&result, Err(e) if e.class == ErrorClass::FlowLevel) {
            // A revoked key shows up here: authenticate again before the next call.
            *self.uid.lock().await = None;
        }
        result
    }

    /// The payload as the values of a `create` or `write`, with the reference field set to the external id.
    fn values(&self, delivery: &Delivery<'_>) -> Result<Value, SinkError> {
        let mut values = delivery.payload.clone();
        let Some(object) = values.as_object_mut() else {
            return Err(SinkError::new(
                SYSTEM,
                ErrorClass::Permanent,
                "an Odoo payload must be a JSON object",
            ));
        };
        object.insert(
            reference_field(&self.model).to_string(),
            Value::String(delivery.external_id.to_string()),
        );
        Ok(values)
    }

    /// `write` on one existing record, its x2many command lists made to replace (see the module doc).
    async fn write(
        &self,
        id: &Value,
        mut values: Value,
        correlation_id: &str,
    ) -> Result<Delivered, SinkError> {
        if let Some(object) = values.as_object_mut() {
            replace_x2many_on_write(object);
        }
        self.execute_kw(
            &self.model,
            "write",
            json!([[id], values]),
            json!({}),
            correlation_id,
        )
        .await?;
        Ok(Delivered {
            erp_id: Some(id.to_string()),
            created: Some(false),
            status: 200,
        })
    }

    fn duplicates(&self, external_id: &str) -> SinkError {
        SinkError::new(
            SYSTEM,
            ErrorClass::Permanent,
            format!(
                "several {} records have {} = {external_id:?}; resolve the duplicates in Odoo",
                self.model,
                reference_field(&self.model)
            ),
        )
    }

    fn unexpected(what: &str, value: &Value) -> SinkError {
        SinkError::new(
            SYSTEM,
            ErrorClass::Transient,
            format!("{what} answered {}", truncate(&value.to_string(), 200)),
        )
    }
}

#[async_trait]
impl Sink for OdooSink {
    fn system(&self) -> &'static str {
        SYSTEM
    }

    async fn deliver(&self, delivery: Delivery<'_>) -> Result<Delivered, SinkError> {
        let field = reference_field(&self.model);
        let values = self.values(&delivery)?;
        let domain = json!([[[field, "=", delivery.external_id]]]);
        let found = self
            .execute_kw(
                &self.model,
                "search",
                domain,
                json!({ "limit": 2 }),
                delivery.correlation_id,
            )
            .await?;
        let ids = found
            .as_array()
            .ok_or_else(|| Self::unexpected("search", &found))?;
        match ids.as_slice() {
            [] => {
                let created = self
                    .execute_kw(
                        &self.model,
                        "create",
                        json!([values]),
                        json!({}),
                        delivery.correlation_id,
                    )
                    .await?;
                // Odoo 17+ answers a list of ids for create, older versions one id.
                let id = created
                    .as_i64()
                    .or_else(|| created.get(0).and_then(Value::as_i64));
                let id = id.ok_or_else(|| Self::unexpected("create", &created))?;
                Ok(Delivered {
                    erp_id: Some(id.to_string()),
                    created: Some(true),
                    status: 200,
                })
            }
            [id] => self.write(id, values, delivery.correlation_id).await,
            _ => Err(self.duplicates(delivery.external_id)),
        }
    }

    fn batch_limits(&self) -> Option<BatchLimits> {
        Some(BatchLimits {
            max_records: BATCH_RECORDS,
            ..BatchLimits::DEFAULT
        })
    }

    /// One `search_read`, one `create` of the new records' list, one `write` per existing record (the
    /// module doc says why in this order).
    async fn deliver_batch(
        &self,
        deliveries: &[Delivery<'_>],
    ) -> Result<Vec<Result<Delivered, SinkError>>, SinkError> {
        if deliveries.is_empty() {
            return Ok(Vec::new());
        }
        let field = reference_field(&self.model);
        let correlation = bulk_correlation_id(deliveries);
        let mut results: Vec<Option<Result<Delivered, SinkError>>> =
            (0..deliveries.len()).map(|_| None).collect();
        let mut values = Vec::with_capacity(deliveries.len());
        for (i, delivery) in deliveries.iter().enumerate() {
            match self.values(delivery) {
                Ok(v) => values.push(Some(v)),
                Err(e) => {
                    values.push(None);
                    results[i] = Some(Err(e));
                }
            }
        }
        let wanted: Vec<&str> = deliveries
            .iter()
            .zip(&values)
            .filter(|(_, v)| v.is_some())
            .map(|(d, _)| d.external_id)
            .collect();
        if wanted.is_empty() {
            return Ok(results.into_iter().flatten().collect());
        }
        // search_read, not search: the reference of each id found is what ties it to a record of the batch.
        let found = self
            .execute_kw(
                &self.model,
                "search_read",
                json!([[[field, "in", wanted]]]),
                json!({ "fields": [field] }),
                &correlation,
            )
            .await?;
        let rows = found
            .as_array()
            .ok_or_else(|| Self::unexpected("search_read", &found))?;
        let mut existing: HashMap<&str, Vec<&Value>> = HashMap::new();
        for row in rows {
            let (Some(reference), Some(id)) = (row[field].as_str(), row.get("id")) else {
                return Err(Self::unexpected("search_read", row));
            };
            existing.entry(reference).or_default().push(id);
        }

        let mut to_create = Vec::new();
        let mut to_write = Vec::new();
        for (i, delivery) in deliveries.iter().enumerate() {
            let Some(v) = values[i].take() else { continue };
            match existing.get(delivery.external_id).map(Vec::as_slice) {
                None | Some([]) => to_create.push((i, v)),
                Some([id]) => to_write.push((i, *id, v)),
                Some(_) => results[i] = Some(Err(self.duplicates(delivery.external_id))),
            }
        }

        if !to_create.is_empty() {
            let list: Vec<&Value> = to_create.iter().map(|(_, v)| v).collect();
            // Nothing is written before this call, so its failure is the whole batch's (see the module doc).
            let created = self
                .execute_kw(
                    &self.model,
                    "create",
                    json!([list]),
                    json!({}),
                    &correlation,
                )
                .await?;
            let ids: Option<Vec<i64>> = match &created {
                Value::Array(ids) => ids.iter().map(Value::as_i64).collect(),
                single => single.as_i64().map(|id| vec![id]),
            };
            match ids.filter(|ids| ids.len() == to_create.len()) {
                Some(ids) => {
                    for ((i, _), id) in to_create.iter().zip(ids) {
                        results[*i] = Some(Ok(Delivered {
                            erp_id: Some(id.to_string()),
                            created: Some(true),
                            status: 200,
                        }));
                    }
                }
                None => {
                    // Created, but which id is whose is unknown: the retry's search will find them.
                    let err = Self::unexpected(
                        &format!("create of {} records", to_create.len()),
                        &created,
                    );
                    for (i, _) in &to_create {
                        results[*i] = Some(Err(err.clone()));
                    }
                }
            }
        }

        let mut refused: Option<SinkError> = None;
        for (i, id, v) in to_write {
            let result = match &refused {
                // Credentials that failed one write fail the next: spare Odoo the calls.
                Some(err) => Err(err.clone()),
                None => self.write(id, v, deliveries[i].correlation_id).await,
            };
            if let Err(e) = &result
                && matches!(e.class, ErrorClass::FlowLevel | ErrorClass::Config)
            {
                refused = Some(e.clone());
            }
            results[i] = Some(result);
        }
        Ok(results
            .into_iter()
            .map(|r| {
                // Every delivery has been given a result above; should one be missed, it is retried, never
                // taken as delivered.
                r.unwrap_or_else(|| {
                    Err(SinkError::new(
                        SYSTEM,
                        ErrorClass::Transient,
                        "the batch ended without a result for this record",
                    ))
                })
            })
            .collect())
    }

    async fn probe(&self) -> Result<(), SinkError> {
        let correlation = uuid::Uuid::new_v4().to_string();
        // Authenticate afresh: the probe is what tells a fixed key from a still-broken one.
        *self.uid.lock().await = None;
        self.execute_kw(
            &self.model,
            "search",
            json!([[]]),
            json!({ "limit": 1 }),
            &correlation,
        )
        .await
        .map(|_| ())
    }

    /// `search_read` on the model `resource`, 500 rows a page; rows without `key` are left out.
    async fn fetch_lookup(&self, resource: &str, key: &str) -> Result<Vec<Value>, SinkError> {
        let correlation = uuid::Uuid::new_v4().to_string();
        let mut rows = Vec::new();
        let mut offset = 0u64;
        loop {
            let kwargs = json!({ "offset": offset, "limit": LOOKUP_PAGE, "order": "id" });
            let page = self
                .execute_kw(resource, "search_read", json!([[]]), kwargs, &correlation)
                .await?;
            let page = page
                .as_array()
                .cloned()
                .ok_or_else(|| Self::unexpected("search_read", &page))?;
            let count = page.len() as u64;
            rows.extend(page.into_iter().filter(|r| {
                r.get(key)
                    .is_some_and(|v| !v.is_null() && *v != Value::Bool(false))
            }));
            if count < LOOKUP_PAGE {
                return Ok(rows);
            }
            offset += count;
            if offset as usize >= MAX_LOOKUP_ROWS {
                return Err(SinkError::new(
                    SYSTEM,
                    ErrorClass::Config,
                    format!("lookup {resource} has more than {MAX_LOOKUP_ROWS} rows"),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_command_lists_not_already_replacing_get_a_clear() {
        let mut values = json!({
            "order_line": [[0, 0, {"product_id": 1}], [0, 0, {"product_id": 2}]],
            "tag_ids": [[6, 0, [3, 4]]],
            "cleared": [[5, 0, 0], [0, 0, {"x": 1}]],
            "empty": [],
            "scores": [1, 2, 3],
            "pairs": [[7, 0, 0]],
            "note": "text",
        });
        let changed = replace_x2many_on_write(values.as_object_mut().unwrap());
        assert_eq!(changed, ["order_line"]);
        assert_eq!(
            values["order_line"],
            json!([[5, 0, 0], [0, 0, {"product_id": 1}], [0, 0, {"product_id": 2}]])
        );
        assert_eq!(values["tag_ids"], json!([[6, 0, [3, 4]]]));
        assert_eq!(values["cleared"], json!([[5, 0, 0], [0, 0, {"x": 1}]]));
        assert_eq!(values["empty"], json!([]));
        assert_eq!(values["pairs"], json!([[7, 0, 0]]));
    }

    #[test]
    fn exceptions_are_classified_by_name() {
        assert_eq!(
            classify_exception("odoo.exceptions.ValidationError"),
            Some(ErrorClass::Permanent)
        );
        assert_eq!(
            classify_exception("odoo.exceptions.AccessDenied"),
            Some(ErrorClass::FlowLevel)
        );
        assert_eq!(
            classify_exception("psycopg2.errors.SerializationFailure"),
            None
        );
    }
}
