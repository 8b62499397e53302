//! Routing and escalation, pure: which named owner a ticket belongs to, which ticket sinks it goes to, and
//! where the roster's escalation ladder has taken it by a given time.
//!
//! Routes match by error class and rule name. The most specific match wins (class and rule, then rule, then
//! class), the first in the roster's order among equals, so a roster can say "ERP rejections go to the
//! sink owner, except the pricing rule's, which go to the source owner" without caring about order. No match
//! gives the ticket to the sync owner. A role the flow's assignment leaves empty (no sink owner named) falls
//! back to the sync owner too: a ticket is never without a person.

use chrono::{DateTime, Utc};

use super::{Assignee, TicketState};
use crate::api::{
    Assignment, ErrorClass, ExceptionRoute, Owner, OwnerRole, OwnershipRosterSpec, RouteAction,
    TicketSinkType,
};

/// The cause a route is matched against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cause<'a> {
    pub class: Option<ErrorClass>,
    pub rule: Option<&'a str>,
}

/// Where a ticket goes before any escalation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Routed {
    /// The index of the matching route in `spec.routes`, if one matched.
    pub route: Option<usize>,
    pub action: RouteAction,
    pub role: OwnerRole,
    pub owner: String,
    /// The ticket sinks (by name) for a ticket that does not page.
    pub sinks: Vec<String>,
}

/// Where the ticket stands on the ladder at some time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// 0 before the first step; n after the n-th step (steps in order of `after`).
    pub step: u32,
    pub role: OwnerRole,
    pub owner: String,
    pub page: bool,
    /// The sinks: the route's, plus every PagerDuty sink while paging.
    pub sinks: Vec<String>,
}

fn specificity(route: &ExceptionRoute) -> u8 {
    match (&route.error_class, &route.rule) {
        (Some(_), Some(_)) => 3,
        (None, Some(_)) => 2,
        (Some(_), None) => 1,
        (None, None) => 0,
    }
}

fn matches(route: &ExceptionRoute, cause: Cause<'_>) -> bool {
    // A route that names neither never matches (the CRD refuses it; a hand-written file might not).
    if route.error_class.is_none() && route.rule.is_none() {
        return false;
    }
    let class_ok = match route.error_class {
        Some(c) => cause.class == Some(c),
        None => true,
    };
    let rule_ok = match &route.rule {
        Some(r) => cause.rule == Some(r.as_str()),
        None => true,
    };
    class_ok && rule_ok
}

/// The route that decides a cause: the most specific match, the first among equals.
pub fn matching_route<'r>(
    routes: &'r [ExceptionRoute],
    cause: Cause<'_>,
) -> Option<(usize, &'r ExceptionRoute)> {
    let mut best: Option<(usize, &ExceptionRoute)> = None;
    for (i, r) in routes.iter().enumerate() {
        if !matches(r, cause) {
            continue;
        }
        if best.is_none_or(|(_, b)| specificity(r) > specificity(b)) {
            best = Some((i, r));
        }
    }
    best
}

/// The owner id in `role`, or the sync owner when the assignment names nobody there.
pub fn owner_for(assignment: &Assignment, role: OwnerRole) -> (OwnerRole, String) {
    match assignment.owner_in(role) {
        Some(id) if !id.is_empty() => (role, id.to_string()),
        _ => (OwnerRole::SyncOwner, assignment.sync_owner.clone()),
    }
}

/// The sinks a non-paging ticket goes to: the route's sink when it names one that exists, otherwise the
/// first sink that is not a pager (a pager is for pages, not for every ticket), otherwise the first sink.
fn ticket_sinks(spec: &OwnershipRosterSpec, named: Option<&str>) -> Vec<String> {
    if let Some(name) = named
        && spec.ticket_sinks.iter().any(|s| s.name == name)
    {
        return vec![name.to_string()];
    }
    spec.ticket_sinks
        .iter()
        .find(|s| s.r#type != TicketSinkType::Pagerduty)
        .or_else(|| spec.ticket_sinks.first())
        .map(|s| vec![s.name.clone()])
        .unwrap_or_default()
}

/// Routes a cause for the flow `assignment` covers.
pub fn route(spec: &OwnershipRosterSpec, assignment: &Assignment, cause: Cause<'_>) -> Routed {
    let matched = matching_route(&spec.routes, cause);
    let (action, wanted, sink) = match matched {
        Some((_, r)) => (
            r.action,
            r.role.unwrap_or(OwnerRole::SyncOwner),
            r.ticket_sink.as_deref(),
        ),
        None => (RouteAction::Escalate, OwnerRole::SyncOwner, None),
    };
    let (role, owner) = owner_for(assignment, wanted);
    Routed {
        route: matched.map(|(i, _)| i),
        action,
        role,
        owner,
        sinks: ticket_sinks(spec, sink),
    }
}

/// A roster duration as a std one; a negative duration (the CRD's pattern refuses them) counts as zero.
fn std_duration(d: &kube::core::Duration) -> std::time::Duration {
    if d.is_negative() {
        std::time::Duration::ZERO
    } else {
        std::time::Duration::from(*d)
    }
}

/// Where the ladder has taken a ticket by `now`. The ladder runs while nobody has acknowledged the ticket;
/// an acknowledged ticket climbs on only once it has been open longer than the roster's `mttrTarget` (the
/// repair is taking too long). A resolved ticket stays where it was. `reached` is the step already recorded,
/// so a ticket never steps back down when the roster changes or the clock is adjusted.
pub fn place(
    spec: &OwnershipRosterSpec,
    assignment: &Assignment,
    routed: &Routed,
    opened_at: DateTime<Utc>,
    state: TicketState,
    reached: u32,
    now: DateTime<Utc>,
) -> Placement {
    let mut ladder: Vec<_> = spec.escalation.iter().collect();
    // Stable: steps with equal `after` keep the roster's order.
    ladder.sort_by_key(|s| std_duration(&s.after));
    let age = (now - opened_at).to_std().unwrap_or_default();
    let climbing = match state {
        TicketState::Open => true,
        TicketState::Acknowledged => spec
            .mttr_target
            .as_ref()
            .is_some_and(|t| age > std_duration(t)),
        TicketState::Resolved => false,
    };
    let due = if climbing {
        ladder
            .iter()
            .filter(|s| age >= std_duration(&s.after))
            .count() as u32
    } else {
        0
    };
    let step = due.max(reached).min(ladder.len() as u32);
    let (role, owner, page) = match step.checked_sub(1).and_then(|i| ladder.get(i as usize)) {
        None => (routed.role, routed.owner.clone(), false),
        Some(s) => {
            let (role, owner) = match (&s.owner, s.role) {
                (Some(id), _) => (routed.role, id.clone()),
                (None, Some(role)) => owner_for(assignment, role),
                (None, None) => (routed.role, routed.owner.clone()),
            };
            (role, owner, s.page)
        }
    };
    let mut sinks = routed.sinks.clone();
    if page {
        for s in &spec.ticket_sinks {
            if s.r#type == TicketSinkType::Pagerduty && !sinks.contains(&s.name) {
                sinks.push(s.name.clone());
            }
        }
    }
    Placement {
        step,
        role,
        owner,
        page,
        sinks,
    }
}

/// The roster's owner as a ticket shows them; an id the roster does not list shows as itself.
pub fn assignee(spec: &OwnershipRosterSpec, id: &str) -> Assignee {
    match spec.owners.iter().find(|o| o.id == id) {
        Some(Owner {
            id,
            name,
            email,
            chat,
            pager,
            ..
        }) => Assignee {
            id: id.clone(),
            name: name.clone(),
            email: email.clone(),
            chat: chat.clone(),
            pager: pager.clone(),
        },
        None => Assignee {
            id: id.to_string(),
            name: id.to_string(),
            ..Assignee::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{EscalationStep, SecretRef, TicketSink};

    fn owner(id: &str) -> Owner {
        Owner {
            id: id.into(),
            name: format!("Owner {id}"),
            email: Some(format!("{id}@example.com")),
            chat: None,
            pager: None,
            approver_roles: vec![],
            kubernetes_user: None,
            kubernetes_groups: vec![],
        }
    }

    fn sink(name: &str, t: TicketSinkType) -> TicketSink {
        TicketSink {
            name: name.into(),
            r#type: t,
            url: Some("https://example.com".into()),
            project: None,
            repository: None,
            channel: None,
            credentials_secret_ref: SecretRef { name: "s".into() },
        }
    }

    fn route_of(
        class: Option<ErrorClass>,
        rule: Option<&str>,
        role: OwnerRole,
        sink: Option<&str>,
    ) -> ExceptionRoute {
        ExceptionRoute {
            error_class: class,
            rule: rule.map(Into::into),
            action: RouteAction::Escalate,
            role: Some(role),
            approver_role: None,
            ticket_sink: sink.map(Into::into),
        }
    }

    fn assignment() -> Assignment {
        Assignment {
            flows: vec!["orders".into()],
            flow_selector: None,
            sync_owner: "sam".into(),
            source_owner: Some("sol".into()),
            sink_owner: Some("erin".into()),
            platform_owner: None,
        }
    }

    fn spec(routes: Vec<ExceptionRoute>, escalation: Vec<EscalationStep>) -> OwnershipRosterSpec {
        OwnershipRosterSpec {
            owners: ["sam", "sol", "erin", "pat"]
                .into_iter()
                .map(owner)
                .collect(),
            assignments: vec![assignment()],
            escalation,
            routes,
            ticket_sinks: vec![
                sink("pager", TicketSinkType::Pagerduty),
                sink("jira", TicketSinkType::Jira),
                sink("slack", TicketSinkType::Slack),
            ],
            identity_secret_ref: None,
            audit: None,
            mttr_target: None,
        }
    }

    fn step(
        after: &str,
        owner: Option<&str>,
        role: Option<OwnerRole>,
        page: bool,
    ) -> EscalationStep {
        EscalationStep {
            after: after.parse().unwrap(),
            owner: owner.map(Into::into),
            role,
            page,
        }
    }

    const PERM: Option<ErrorClass> = Some(ErrorClass::Permanent);

    #[test]
    fn the_routing_table_class_by_rule_by_route() {
        let routes = vec![
            route_of(PERM, None, OwnerRole::SinkOwner, None),
            route_of(None, Some("pricing"), OwnerRole::SourceOwner, Some("slack")),
            route_of(PERM, Some("pricing"), OwnerRole::PlatformOwner, None),
            route_of(Some(ErrorClass::Hold), None, OwnerRole::SourceOwner, None),
        ];
        let s = spec(routes, vec![]);
        let a = assignment();
        // (class, rule) → (matching route, role, owner, sinks)
        #[allow(clippy::type_complexity)]
        let table: Vec<(
            Option<ErrorClass>,
            Option<&str>,
            Option<usize>,
            OwnerRole,
            &str,
            &str,
        )> = vec![
            // Class only.
            (PERM, None, Some(0), OwnerRole::SinkOwner, "erin", "jira"),
            (
                PERM,
                Some("other"),
                Some(0),
                OwnerRole::SinkOwner,
                "erin",
                "jira",
            ),
            // Rule only beats class only.
            (
                Some(ErrorClass::Transient),
                Some("pricing"),
                Some(1),
                OwnerRole::SourceOwner,
                "sol",
                "slack",
            ),
            // Class and rule beat both; the platform role is empty, so the sync owner takes it.
            (
                PERM,
                Some("pricing"),
                Some(2),
                OwnerRole::SyncOwner,
                "sam",
                "jira",
            ),
            (
                Some(ErrorClass::Hold),
                Some("discount"),
                Some(3),
                OwnerRole::SourceOwner,
                "sol",
                "jira",
            ),
            // Nothing matches: the sync owner, on the first sink that is not a pager.
            (
                Some(ErrorClass::FlowLevel),
                None,
                None,
                OwnerRole::SyncOwner,
                "sam",
                "jira",
            ),
            (None, None, None, OwnerRole::SyncOwner, "sam", "jira"),
        ];
        for (class, rule, want_route, role, who, sink) in table {
            let r = route(&s, &a, Cause { class, rule });
            assert_eq!(r.route, want_route, "{class:?} {rule:?}");
            assert_eq!(
                (r.role, r.owner.as_str()),
                (role, who),
                "{class:?} {rule:?}"
            );
            assert_eq!(r.sinks, vec![sink.to_string()], "{class:?} {rule:?}");
        }
    }

    #[test]
    fn among_equally_specific_routes_the_first_wins() {
        let s = spec(
            vec![
                route_of(PERM, None, OwnerRole::SinkOwner, None),
                route_of(PERM, None, OwnerRole::SourceOwner, None),
            ],
            vec![],
        );
        let r = route(
            &s,
            &assignment(),
            Cause {
                class: PERM,
                rule: None,
            },
        );
        assert_eq!((r.route, r.owner.as_str()), (Some(0), "erin"));
    }

    #[test]
    fn a_route_naming_an_unknown_sink_uses_the_default_sink() {
        let s = spec(
            vec![route_of(PERM, None, OwnerRole::SinkOwner, Some("gone"))],
            vec![],
        );
        let r = route(
            &s,
            &assignment(),
            Cause {
                class: PERM,
                rule: None,
            },
        );
        assert_eq!(r.sinks, vec!["jira".to_string()]);
    }

    #[test]
    fn escalation_climbs_the_ladder_until_acknowledged_and_pages_where_told() {
        let s = spec(
            vec![route_of(PERM, None, OwnerRole::SinkOwner, None)],
            vec![
                // Out of order on purpose: the ladder sorts by `after`.
                step("2h", Some("pat"), None, true),
                step("30m", None, Some(OwnerRole::SyncOwner), false),
            ],
        );
        let a = assignment();
        let routed = route(
            &s,
            &a,
            Cause {
                class: PERM,
                rule: None,
            },
        );
        let t0: DateTime<Utc> = "2026-12-01T10:00:00Z".parse().unwrap();
        let at = |mins: i64| t0 + chrono::Duration::minutes(mins);

        let p = place(&s, &a, &routed, t0, TicketState::Open, 0, at(29));
        assert_eq!((p.step, p.owner.as_str(), p.page), (0, "erin", false));
        assert_eq!(p.sinks, vec!["jira".to_string()]);

        let p = place(&s, &a, &routed, t0, TicketState::Open, 0, at(30));
        assert_eq!(
            (p.step, p.role, p.owner.as_str(), p.page),
            (1, OwnerRole::SyncOwner, "sam", false)
        );

        let p = place(&s, &a, &routed, t0, TicketState::Open, 1, at(120));
        assert_eq!((p.step, p.owner.as_str(), p.page), (2, "pat", true));
        assert_eq!(p.sinks, vec!["jira".to_string(), "pager".to_string()]);

        // Acknowledged at step 1: the ladder stops there, however long it takes (no mttrTarget).
        let p = place(&s, &a, &routed, t0, TicketState::Acknowledged, 1, at(600));
        assert_eq!((p.step, p.owner.as_str()), (1, "sam"));

        // Never back down: the recorded step holds even if the clock went back.
        let p = place(&s, &a, &routed, t0, TicketState::Open, 2, at(1));
        assert_eq!((p.step, p.owner.as_str(), p.page), (2, "pat", true));
    }

    #[test]
    fn an_acknowledged_ticket_past_the_mttr_target_climbs_on() {
        let mut s = spec(
            vec![],
            vec![
                step("10m", None, Some(OwnerRole::SinkOwner), false),
                step("1h", Some("pat"), None, true),
            ],
        );
        s.mttr_target = Some("4h".parse().unwrap());
        let a = assignment();
        let routed = route(
            &s,
            &a,
            Cause {
                class: PERM,
                rule: None,
            },
        );
        let t0: DateTime<Utc> = "2026-12-01T10:00:00Z".parse().unwrap();
        let at = |mins: i64| t0 + chrono::Duration::minutes(mins);
        let p = place(&s, &a, &routed, t0, TicketState::Acknowledged, 0, at(239));
        assert_eq!(p.step, 0);
        let p = place(&s, &a, &routed, t0, TicketState::Acknowledged, 0, at(241));
        assert_eq!((p.step, p.owner.as_str(), p.page), (2, "pat", true));
        // A resolved ticket does not climb.
        let p = place(&s, &a, &routed, t0, TicketState::Resolved, 0, at(600));
        assert_eq!(p.step, 0);
    }

    #[test]
    fn an_unlisted_owner_shows_as_their_id() {
        let s = spec(vec![], vec![]);
        assert_eq!(
            assignee(&s, "sam").email.as_deref(),
            Some("sam@example.com")
        );
        assert_eq!(assignee(&s, "ghost").name, "ghost");
    }
}
