//! Step 4 and 5 of every reconcile: server-side apply under the one field manager, skipped when the cached
//! object already carries the desired content hash, and deletion of owned objects no longer desired.

use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{APPLIED_HASH, Error, FIELD_MANAGER};

/// SSA parameters: our field manager, and `force`, because the controller is the only rightful owner of the
/// fields it sets (a `kubectl edit` of a worker Deployment is drift to undo, not a conflict to report).
pub fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// Whether `live` already is what `desired` would make it, by the content hash both carry.
pub fn up_to_date<K: Resource>(desired: &K, live: Option<&K>) -> bool {
    let want = desired
        .meta()
        .annotations
        .as_ref()
        .and_then(|a| a.get(APPLIED_HASH));
    let have = live
        .and_then(|l| l.meta().annotations.as_ref())
        .and_then(|a| a.get(APPLIED_HASH));
    want.is_some() && want == have
}

/// Applies `desired` unless `in_sync`; returns whether it wrote.
pub async fn apply<K>(
    client: &Client,
    desired: &K,
    in_sync: bool,
    metrics: &super::metrics::Metrics,
) -> Result<bool, Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug,
{
    if in_sync {
        return Ok(false);
    }
    let ns = desired.namespace().unwrap_or_default();
    let name = desired.name_any();
    let api: Api<K> = Api::namespaced(client.clone(), &ns);
    api.patch(&name, &apply_params(), &Patch::Apply(desired))
        .await
        .map_err(|e| Error::api("apply", K::kind(&()).to_string(), format!("{ns}/{name}"), e))?;
    metrics.writes.inc();
    Ok(true)
}

/// Creates `obj` once; an object that already exists is left as it is (used for the token Secret, whose value
/// must never change under the people holding it).
pub async fn create_once<K>(
    client: &Client,
    obj: &K,
    metrics: &super::metrics::Metrics,
) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug,
{
    let ns = obj.namespace().unwrap_or_default();
    let api: Api<K> = Api::namespaced(client.clone(), &ns);
    let pp = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    };
    metrics.writes.inc();
    match api.create(&pp, obj).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(Error::api(
            "create",
            K::kind(&()).to_string(),
            format!("{ns}/{}", obj.name_any()),
            e,
        )),
    }
}

/// Deletes an owned object that is no longer desired; one already gone is fine.
pub async fn delete<K>(
    client: &Client,
    ns: &str,
    name: &str,
    metrics: &super::metrics::Metrics,
) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + DeserializeOwned
        + Clone
        + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    metrics.writes.inc();
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(Error::api(
            "delete",
            K::kind(&()).to_string(),
            format!("{ns}/{name}"),
            e,
        )),
    }
}

/// Server-side applies a status: `apiVersion` and `kind` in the body, as the API server requires.
pub async fn apply_status<K>(
    client: &Client,
    obj: &K,
    status: &impl Serialize,
    metrics: &super::metrics::Metrics,
) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + DeserializeOwned
        + Clone
        + Debug,
{
    let ns = obj.namespace().unwrap_or_default();
    let name = obj.name_any();
    let api: Api<K> = Api::namespaced(client.clone(), &ns);
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(&name, &apply_params(), &Patch::Apply(body))
        .await
        .map_err(|e| {
            Error::api(
                "apply status of",
                K::kind(&()).to_string(),
                format!("{ns}/{name}"),
                e,
            )
        })?;
    metrics.writes.inc();
    Ok(())
}
