//! `OwnershipRoster`: the named people behind each flow, how failures reach them, and who approves what.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use kube::core::Duration;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Condition, ErrorClass, OwnerRole, SecretRef};

/// Named owners per flow, escalation, exception routes and ticket sinks. A flow without a sync owner in
/// some roster does not start.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "sync.meshline.io",
    version = "v1alpha1",
    kind = "OwnershipRoster",
    doc = "Named owners of flows (sync, source, sink, platform), escalation, exception routes and ticket sinks.",
    namespaced,
    status = "OwnershipRosterStatus",
    shortname = "roster",
    shortname = "or",
    category = "meshline",
    printcolumn = r#"{"name":"Owners","type":"integer","jsonPath":".status.ownerCount"}"#,
    printcolumn = r#"{"name":"Flows","type":"integer","jsonPath":".status.coveredFlowCount"}"#,
    printcolumn = r#"{"name":"Unowned","type":"integer","jsonPath":".status.unownedFlowCount"}"#,
    printcolumn = r#"{"name":"Tickets","type":"integer","jsonPath":".status.tickets.open"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.owners.all(o, self.owners.exists_one(p, p.id == o.id))", "message": "owner ids must be unique"},
    {"rule": "!has(self.assignments) || self.assignments.all(a, self.owners.exists(o, o.id == a.syncOwner))", "message": "every assignment's syncOwner must be one of the owners"},
    {"rule": "!has(self.ticketSinks) || self.ticketSinks.all(t, self.ticketSinks.exists_one(u, u.name == t.name))", "message": "ticket sink names must be unique"}
]))]
pub struct OwnershipRosterSpec {
    /// The people (or teams) who own flows.
    #[schemars(length(min = 1, max = 100))]
    pub owners: Vec<Owner>,
    /// Which flows each set of owners is responsible for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub assignments: Vec<Assignment>,
    /// Who is told next, and after how long, while a failure stays open.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub escalation: Vec<EscalationStep>,
    /// What happens to each kind of exception.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub routes: Vec<ExceptionRoute>,
    /// Where tickets and pages go.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub ticket_sinks: Vec<TicketSink>,
    /// The time within which a failure should be repaired; longer repairs escalate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 64),
        pattern(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
    )]
    pub mttr_target: Option<Duration>,
    /// A Secret whose keys are owner ids and whose values are that owner's personal token: how the worker
    /// knows who approves or rejects a held record (`X-Meshline-Identity: <token>`). The roster itself never
    /// holds a token. Without it nobody can approve or reject a held record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_secret_ref: Option<SecretRef>,
    /// When the roster's flows are reconciled (CRM against ERP). Absent: nightly at 02:00 over 7 days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<super::AuditSchedule>,
}

/// A person or team.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Owner {
    /// Stable id that assignments, routes and sign-offs use.
    #[schemars(
        length(min = 1, max = 63),
        pattern(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub id: String,
    #[schemars(length(min = 1, max = 256))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 254), pattern(r"^[^@\s]+@[^@\s]+\.[^@\s]+$"))]
    pub email: Option<String>,
    /// Chat handle, e.g. `@dana` or a Slack member id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub chat: Option<String>,
    /// Pager service (e.g. a PagerDuty service id) for escalations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub pager: Option<String>,
    /// Approver roles this owner holds, e.g. `finance`, matched against a hold rule's `approverRole`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20), inner(length(max = 63)))]
    pub approver_roles: Vec<String>,
    /// The Kubernetes user (`request.userInfo.username`, e.g. `dana@example.com` or
    /// `system:serviceaccount:ns:name`) that may add this owner's sign-offs to a SyncContract when the chart's
    /// sign-off policy (`signOffPolicy.enabled`) is on. Without the policy this field is informational.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub kubernetes_user: Option<String>,
    /// Kubernetes groups (`request.userInfo.groups`) whose members may add this owner's sign-offs when the
    /// chart's sign-off policy is on. Bounded so the policy's CEL stays within the API server's cost budget.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20), inner(length(min = 1, max = 253)))]
    pub kubernetes_groups: Vec<String>,
}

/// Owners of a set of flows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.flows) || has(self.flowSelector)", "message": "an assignment names flows or selects them by label"}
]))]
pub struct Assignment {
    /// Flow names in the roster's namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 200), inner(length(max = 253)))]
    pub flows: Vec<String>,
    /// Flows selected by their labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_selector: Option<LabelSelector>,
    /// Owner id accountable for the flow end to end (required).
    #[schemars(length(min = 1, max = 63))]
    pub sync_owner: String,
    /// Owner id of the CRM side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub source_owner: Option<String>,
    /// Owner id of the ERP side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub sink_owner: Option<String>,
    /// Owner id of the platform.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub platform_owner: Option<String>,
}

impl Assignment {
    /// The owner id in a role, if any.
    pub fn owner_in(&self, role: OwnerRole) -> Option<&str> {
        match role {
            OwnerRole::SyncOwner => Some(self.sync_owner.as_str()),
            OwnerRole::SourceOwner => self.source_owner.as_deref(),
            OwnerRole::SinkOwner => self.sink_owner.as_deref(),
            OwnerRole::PlatformOwner => self.platform_owner.as_deref(),
        }
    }
}

/// One step of the escalation ladder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.owner) != has(self.role)", "message": "an escalation step names exactly one of owner or role"}
]))]
pub struct EscalationStep {
    /// How long after the failure opened.
    #[schemars(
        length(max = 64),
        pattern(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
    )]
    pub after: Duration,
    /// An owner id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub owner: Option<String>,
    /// Or whoever holds this role for the flow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<OwnerRole>,
    /// Page (not only ticket) at this step.
    #[serde(default)]
    pub page: bool,
}

/// What a route does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum RouteAction {
    /// Retry automatically within the flow's delivery policy.
    AutoRetry,
    /// Open a ticket with the role's owner and follow the escalation ladder.
    Escalate,
    /// Hold the record until a person in `approverRole` decides.
    HoldForApproval,
}

/// An exception route: a matcher and an action.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.errorClass) || has(self.rule)", "message": "a route matches an errorClass or a rule name"},
    {"rule": "self.action != 'holdForApproval' || has(self.approverRole)", "message": "holdForApproval needs approverRole"},
    {"rule": "self.action != 'escalate' || has(self.role)", "message": "escalate needs the role that owns the ticket"}
]))]
pub struct ExceptionRoute {
    /// Matches records that failed with this class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_class: Option<ErrorClass>,
    /// Matches records that broke this contract rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub rule: Option<String>,
    pub action: RouteAction,
    /// Owner role that receives the ticket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<OwnerRole>,
    /// Approver role for holdForApproval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub approver_role: Option<String>,
    /// Ticket sink name; the first sink when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub ticket_sink: Option<String>,
}

/// Ticket and paging systems.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum TicketSinkType {
    Webhook,
    Slack,
    Jira,
    Github,
    Pagerduty,
}

/// Where tickets go.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.type != 'jira' || (has(self.url) && has(self.project))", "message": "a jira sink needs url and project"},
    {"rule": "self.type != 'github' || has(self.repository)", "message": "a github sink needs repository (owner/name)"},
    {"rule": "self.type != 'slack' || has(self.channel)", "message": "a slack sink needs channel"},
    {"rule": "self.type != 'webhook' || has(self.url)", "message": "a webhook sink needs url"},
    {"rule": "!has(self.url) || !self.url.matches('^[a-zA-Z][a-zA-Z0-9+.-]*://[^/]*@')", "message": "credentials must not be embedded in a URL; use credentialsSecretRef"}
]))]
pub struct TicketSink {
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    pub r#type: TicketSinkType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), pattern(r"^https?://"))]
    pub url: Option<String>,
    /// Jira project key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub project: Option<String>,
    /// GitHub `owner/name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 200), pattern(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$"))]
    pub repository: Option<String>,
    /// Slack channel id or name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub channel: Option<String>,
    /// Secret with the token, routing key or signing secret.
    pub credentials_secret_ref: SecretRef,
}

/// Coverage of the roster.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OwnershipRosterStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default)]
    pub owner_count: i32,
    /// Flows this roster assigns owners to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub covered_flows: Vec<String>,
    #[serde(default)]
    pub covered_flow_count: i32,
    /// Flows in the namespace that no roster gives a sync owner.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flows_without_sync_owner: Vec<String>,
    #[serde(default)]
    pub unowned_flow_count: i32,
    /// The covered flows' tickets together: per owner, times to acknowledge and resolve; failing sinks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tickets: Option<super::common::TicketSummary>,
}
