//! The OwnershipRoster reconciler: the status lists the flows the roster covers and the flows of its namespace
//! that no roster gives a sync owner (those do not start).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use kube::ResourceExt;
use kube::runtime::controller::Action;

use super::flow::status::{carry_transition_times, differs};
use super::{Context, Error, apply};
use crate::api::{Condition, OwnershipRoster, OwnershipRosterStatus, SyncFlow};
use crate::validate::assignment_covers;

/// Flows (by name) the roster's assignments cover.
pub fn covered(roster: &OwnershipRoster, flows: &[Arc<SyncFlow>]) -> BTreeSet<String> {
    let ns = roster.metadata.namespace.as_deref();
    flows
        .iter()
        .filter(|f| f.metadata.namespace.as_deref() == ns)
        .filter(|f| {
            roster
                .spec
                .assignments
                .iter()
                .any(|a| assignment_covers(a, f))
        })
        .map(|f| f.name_any())
        .collect()
}

/// The roster's next status. Pure.
pub fn compute(
    roster: &OwnershipRoster,
    rosters: &[Arc<OwnershipRoster>],
    flows: &[Arc<SyncFlow>],
    now: &str,
) -> OwnershipRosterStatus {
    let ns = roster.metadata.namespace.as_deref();
    let mine = covered(roster, flows);
    let unowned: Vec<String> = flows
        .iter()
        .filter(|f| f.metadata.namespace.as_deref() == ns)
        .filter(|f| {
            !rosters
                .iter()
                .filter(|r| r.metadata.namespace.as_deref() == ns)
                .any(|r| r.spec.assignments.iter().any(|a| assignment_covers(a, f)))
        })
        .map(|f| f.name_any())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let old = roster.status.clone().unwrap_or_default();
    let condition = Condition {
        r#type: "Accepted".into(),
        status: "True".into(),
        reason: if unowned.is_empty() {
            "AllFlowsOwned"
        } else {
            "FlowsWithoutSyncOwner"
        }
        .into(),
        message: if unowned.is_empty() {
            format!(
                "covers {} flow(s); every flow in the namespace has a sync owner",
                mine.len()
            )
        } else {
            format!(
                "covers {} flow(s); {} flow(s) in the namespace have no sync owner and do not start: {}",
                mine.len(),
                unowned.len(),
                unowned.join(", ")
            )
        },
        observed_generation: roster.metadata.generation,
        last_transition_time: None,
    };
    OwnershipRosterStatus {
        observed_generation: roster.metadata.generation,
        conditions: carry_transition_times(&old.conditions, vec![condition], now),
        owner_count: i32::try_from(roster.spec.owners.len()).unwrap_or(i32::MAX),
        covered_flow_count: i32::try_from(mine.len()).unwrap_or(i32::MAX),
        covered_flows: mine.into_iter().collect(),
        unowned_flow_count: i32::try_from(unowned.len()).unwrap_or(i32::MAX),
        flows_without_sync_owner: unowned,
    }
}

pub async fn reconcile(roster: Arc<OwnershipRoster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&roster, &ctx).await;
    ctx.metrics.observe(
        "OwnershipRoster",
        started.elapsed(),
        result.as_ref().err().map(Error::metric_label),
    );
    result
}

async fn reconcile_inner(roster: &OwnershipRoster, ctx: &Context) -> Result<Action, Error> {
    if roster.namespace().is_none() {
        return Err(Error::NoNamespace {
            kind: "OwnershipRoster",
            name: roster.name_any(),
        });
    }
    if roster.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let next = compute(
        roster,
        &ctx.stores.rosters.state(),
        &ctx.stores.flows.state(),
        &super::now_rfc3339(),
    );
    if differs(roster.status.as_ref(), &next, |s| &mut s.conditions) {
        apply::apply_status(&ctx.client, roster, &next, &ctx.metrics).await?;
    }
    Ok(Action::requeue(super::flow::RESYNC))
}
