//! The page's HTML, built as strings by plain functions of plain values (no I/O), so rendering is tested
//! and benchmarked without a server. Every value that did not come from this file goes through [`escape`]
//! (text and double-quoted attribute values alike) or, inside a URL path, [`path_segment`] and then
//! [`escape`]; nothing is ever written into a script, a style or an unquoted attribute. No JavaScript.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Deserialize;
use serde_json::Value;

use super::backend::{FlowRef, flow_ref};
use crate::api::{Condition, OwnershipRoster, SyncFlow};

/// Escapes text for HTML element content and double- or single-quoted attribute values.
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.contains(['&', '<', '>', '"', '\'']) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Percent-encodes one URL path segment (a namespace, a name, a reason), so no value can add a path step,
/// a query or a scheme; the result still goes through [`escape`] in an attribute.
pub fn path_segment(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// A held record as the worker's `/holds` lists it (its payload already redacted by the contract).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct HeldRecord {
    pub id: i64,
    pub generation: i64,
    #[serde(default)]
    pub source_key: String,
    #[serde(default)]
    pub external_id: Option<String>,
    #[serde(default)]
    pub hold_rule: Option<String>,
    #[serde(default)]
    pub hold_role: Option<String>,
    #[serde(default)]
    pub received_at: Option<String>,
    #[serde(default)]
    pub payload: Value,
}

/// A dead letter as the worker's `/dead-letters` lists it.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct DeadLetter {
    pub id: i64,
    #[serde(default)]
    pub source_key: String,
    #[serde(default)]
    pub external_id: Option<String>,
    #[serde(default)]
    pub dead_letter_reason: Option<String>,
    #[serde(default)]
    pub last_error: Option<String>,
}

/// The page around a body. The one stylesheet is served by the page itself (`style-src 'self'`).
fn page(title: &str, body: &str) -> String {
    let mut out = String::with_capacity(body.len() + 600);
    out.push_str("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">");
    let _ = write!(out, "<title>{} · Meshline</title>", escape(title));
    out.push_str("<link rel=\"stylesheet\" href=\"/style.css\"></head><body>");
    out.push_str(
        "<nav><a href=\"/\">Flows</a> <a href=\"/exceptions\">Exceptions by owner</a></nav>",
    );
    out.push_str(body);
    out.push_str("</body></html>");
    out
}

/// The stylesheet (served at `/style.css`).
pub const STYLE: &str = "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}\
td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}\
.True{color:#060}.False{color:#a00}.bad{color:#a00}pre{white-space:pre-wrap;max-width:60em}\
nav a{margin-right:1em}form{margin:.3em 0}";

fn condition<'a>(flow: &'a SyncFlow, kind: &str) -> Option<&'a Condition> {
    flow.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.r#type == kind)
}

fn flow_href(r: &FlowRef) -> String {
    format!(
        "/flows/{}/{}",
        path_segment(&r.namespace),
        path_segment(&r.name)
    )
}

fn opt(v: Option<impl std::fmt::Display>) -> String {
    v.map_or_else(|| "–".to_string(), |v| v.to_string())
}

/// The main view: every flow with its health, counts, canary state, last audit and open tickets.
pub fn main_view(flows: &[SyncFlow]) -> String {
    let mut sorted: Vec<(FlowRef, &SyncFlow)> = flows.iter().map(|f| (flow_ref(f), f)).collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let no_status = crate::api::SyncFlowStatus::default();
    let mut b = String::with_capacity(600 + flows.len() * 900);
    let _ = write!(b, "<h1>Flows</h1><p>{} flows.</p>", flows.len());
    b.push_str(
        "<table id=\"flows\"><thead><tr><th>Flow</th><th>Health</th><th>Received</th><th>Delivered</th>\
         <th>Held</th><th>Dead letters</th><th>Failure rate</th><th>MTTR (s)</th>\
         <th>Interventions / 1k</th><th>Canary</th><th>Last audit</th><th>Open tickets</th></tr></thead><tbody>",
    );
    for (r, flow) in sorted {
        let status = flow.status.as_ref().unwrap_or(&no_status);
        let c = &status.counters;
        let _ = write!(
            b,
            "<tr><td><a href=\"{}\">{}</a></td><td>",
            escape(&flow_href(&r)),
            escape(&r.to_string())
        );
        for kind in ["Ready", "Degraded", "Progressing"] {
            if let Some(cond) = condition(flow, kind) {
                let _ = write!(
                    b,
                    "<div class=\"{}\" title=\"{}\">{}={} {}</div>",
                    escape(&cond.status),
                    escape(&cond.message),
                    escape(kind),
                    escape(&cond.status),
                    escape(&cond.reason)
                );
            }
        }
        let _ = write!(
            b,
            "</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>",
            c.received,
            c.delivered,
            c.held,
            c.dead_lettered,
            escape(&opt(status.failure_rate.as_deref())),
            opt(status.mttr_seconds),
            escape(&opt(status.manual_interventions_per_1k.as_deref())),
        );
        match &status.canary {
            Some(canary) => {
                let _ = write!(
                    b,
                    "{} {} step {} weight {}/{}",
                    escape(&canary.version),
                    escape(&canary.phase),
                    canary.step,
                    canary.applied_weight,
                    canary.weight
                );
            }
            None => b.push_str("none"),
        }
        b.push_str("</td><td>");
        match &status.audit {
            Some(audit) => audit_cell(&mut b, audit),
            None => b.push_str("never run"),
        }
        b.push_str("</td><td>");
        match &status.tickets {
            Some(t) => {
                let _ = write!(b, "{} open, {} acknowledged", t.open, t.acknowledged);
                for ticket in &t.oldest {
                    let _ = write!(
                        b,
                        "<div>{} {} ({}, {})</div>",
                        escape(&ticket.kind),
                        escape(&ticket.reason),
                        escape(&ticket.state),
                        escape(ticket.owner.as_deref().unwrap_or("nobody"))
                    );
                }
            }
            None => b.push('–'),
        }
        b.push_str("</td></tr>");
    }
    b.push_str("</tbody></table>");
    page("Flows", &b)
}

fn audit_cell(b: &mut String, audit: &crate::api::FlowAuditStatus) {
    let outcome = match audit.outcome {
        Some(crate::api::AuditOutcome::Reconciled) => "reconciled",
        Some(crate::api::AuditOutcome::Unexplained) => "unexplained differences",
        Some(crate::api::AuditOutcome::Partial) => "partial",
        None => "running",
    };
    let _ = write!(
        b,
        "<div>{} (run {}, {} → {})</div><div>CRM {} · ERP {} · matched {} · unexplained {}</div>",
        outcome,
        audit.run,
        escape(&audit.window_from),
        escape(&audit.window_to),
        audit.crm.count,
        audit.erp.count,
        audit.matched,
        audit.unexplained
    );
    if let Some(why) = &audit.partial_reason {
        let _ = write!(b, "<div class=\"bad\">{}</div>", escape(why));
    }
    for (explanation, n) in &audit.explained {
        let _ = write!(b, "<div>{}: {n}</div>", escape(explanation));
    }
    for (currency, total) in &audit.crm.totals {
        let erp = audit.erp.totals.get(currency).map_or("–", String::as_str);
        let _ = write!(
            b,
            "<div>{}: CRM {} · ERP {}</div>",
            escape(currency),
            escape(total),
            escape(erp)
        );
    }
}

/// One owner's row of the exceptions view.
struct OwnerRow {
    name: String,
    roles: Vec<String>,
    assignments: Vec<String>,
}

/// Exceptions by owner: each roster owner with the flows assigned to them (and as what) and the open
/// tickets those flows' statuses put with them.
pub fn exceptions_view(flows: &[SyncFlow], rosters: &[OwnershipRoster]) -> String {
    let mut b = String::from("<h1>Exceptions by owner</h1>");
    // By (namespace, owner id): the roster's owners, and owners named only in assignments.
    let mut owners: BTreeMap<(String, String), OwnerRow> = BTreeMap::new();
    for roster in rosters {
        let ns = roster.metadata.namespace.clone().unwrap_or_default();
        for owner in &roster.spec.owners {
            owners
                .entry((ns.clone(), owner.id.clone()))
                .or_insert_with(|| OwnerRow {
                    name: owner.name.clone(),
                    roles: owner.approver_roles.clone(),
                    assignments: Vec::new(),
                });
        }
        for a in &roster.spec.assignments {
            let flows_named = if a.flows.is_empty() {
                "flows by selector".to_string()
            } else {
                a.flows.join(", ")
            };
            for (role, who) in [
                ("sync owner", Some(&a.sync_owner)),
                ("source owner", a.source_owner.as_ref()),
                ("sink owner", a.sink_owner.as_ref()),
                ("platform owner", a.platform_owner.as_ref()),
            ] {
                if let Some(who) = who {
                    owners
                        .entry((ns.clone(), who.clone()))
                        .or_insert_with(|| OwnerRow {
                            name: who.clone(),
                            roles: Vec::new(),
                            assignments: Vec::new(),
                        })
                        .assignments
                        .push(format!("{role} of {flows_named}"));
                }
            }
        }
    }
    b.push_str(
        "<table id=\"owners\"><thead><tr><th>Owner</th><th>Approver roles</th><th>Assignments</th>\
         <th>Open tickets</th></tr></thead><tbody>",
    );
    for (
        (ns, id),
        OwnerRow {
            name,
            roles,
            assignments,
        },
    ) in &owners
    {
        let _ = write!(
            b,
            "<tr><td>{} ({}/{})</td><td>{}</td><td>",
            escape(name),
            escape(ns),
            escape(id),
            escape(&roles.join(", "))
        );
        for a in assignments {
            let _ = write!(b, "<div>{}</div>", escape(a));
        }
        b.push_str("</td><td>");
        for flow in flows
            .iter()
            .filter(|f| f.metadata.namespace.as_deref() == Some(ns))
        {
            let Some(t) = flow.status.as_ref().and_then(|s| s.tickets.as_ref()) else {
                continue;
            };
            let r = flow_ref(flow);
            if let Some(stats) = t.owners.iter().find(|o| &o.owner == id && o.open > 0) {
                let _ = write!(
                    b,
                    "<div><a href=\"{}\">{}</a>: {} open</div>",
                    escape(&flow_href(&r)),
                    escape(&r.name),
                    stats.open
                );
            }
            for ticket in t.oldest.iter().filter(|o| o.owner.as_deref() == Some(id)) {
                let _ = write!(
                    b,
                    "<div>{} {} {} since {}</div>",
                    escape(&r.name),
                    escape(&ticket.kind),
                    escape(&ticket.reason),
                    escape(&ticket.opened_at)
                );
            }
        }
        b.push_str("</td></tr>");
    }
    b.push_str("</tbody></table>");
    page("Exceptions by owner", &b)
}

/// One flow: its held records with approve and reject forms, its dead letters by reason with a replay
/// form per reason. `problems` are reading errors to show instead of silently empty lists.
pub fn flow_view(
    flow: &FlowRef,
    holds: &[HeldRecord],
    dead_letters: &[DeadLetter],
    csrf: &str,
    problems: &[String],
) -> String {
    let base = flow_href(flow);
    let mut b = String::with_capacity(2000 + holds.len() * 1500);
    let _ = write!(b, "<h1>Flow {}</h1>", escape(&flow.to_string()));
    for p in problems {
        let _ = write!(b, "<p class=\"bad\">{}</p>", escape(p));
    }
    let _ = write!(b, "<h2>Held records ({})</h2>", holds.len());
    b.push_str(
        "<p>Deciding needs your personal token (your key of the roster's identity Secret). The worker \
         checks it and your approver role; this page keeps nothing of it.</p>",
    );
    for h in holds {
        let context = serde_json::to_string_pretty(&h.payload).unwrap_or_default();
        let _ = write!(
            b,
            "<section class=\"hold\" id=\"record-{id}\"><h3>Record {id}: {key}</h3>\
             <p>Rule {rule}, waits for role {role}, generation {generation}, external id {ext}, \
             received {received}</p><pre>{context}</pre>",
            id = h.id,
            key = escape(&h.source_key),
            rule = escape(h.hold_rule.as_deref().unwrap_or("–")),
            role = escape(h.hold_role.as_deref().unwrap_or("none")),
            generation = h.generation,
            ext = escape(h.external_id.as_deref().unwrap_or("–")),
            received = escape(h.received_at.as_deref().unwrap_or("–")),
            context = escape(&context),
        );
        for action in ["approve", "reject"] {
            let _ = write!(
                b,
                "<form method=\"post\" action=\"{action_url}\" class=\"{action}\">\
                 <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
                 <input type=\"hidden\" name=\"generation\" value=\"{generation}\">\
                 <input type=\"hidden\" name=\"role\" value=\"{role}\">\
                 <label>Reason <input name=\"reason\" required maxlength=\"1000\"></label> \
                 <label>Your personal token <input type=\"password\" name=\"identity\" required \
                 autocomplete=\"off\"></label> \
                 <button type=\"submit\" name=\"do\" value=\"{action}\">{label}</button></form>",
                action_url = escape(&format!("{base}/records/{}/{action}", h.id)),
                csrf = escape(csrf),
                generation = h.generation,
                role = escape(h.hold_role.as_deref().unwrap_or("")),
                label = if action == "approve" {
                    "Approve"
                } else {
                    "Reject"
                },
            );
        }
        b.push_str("</section>");
    }
    let mut by_reason: BTreeMap<&str, Vec<&DeadLetter>> = BTreeMap::new();
    for d in dead_letters {
        by_reason
            .entry(d.dead_letter_reason.as_deref().unwrap_or("unknown"))
            .or_default()
            .push(d);
    }
    let _ = write!(b, "<h2>Dead letters ({})</h2>", dead_letters.len());
    for (reason, letters) in &by_reason {
        let _ = write!(
            b,
            "<section class=\"dead-letters\"><h3>{} ({})</h3><ul>",
            escape(reason),
            letters.len()
        );
        for d in letters {
            let _ = write!(
                b,
                "<li>Record {}: {} {}</li>",
                d.id,
                escape(&d.source_key),
                escape(d.last_error.as_deref().unwrap_or(""))
            );
        }
        let _ = write!(
            b,
            "</ul><form method=\"post\" action=\"{}\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <input type=\"hidden\" name=\"dead_letter_reason\" value=\"{}\">\
             <label>Why <input name=\"reason\" required maxlength=\"1000\"></label> \
             <label>Your personal token <input type=\"password\" name=\"identity\" required \
             autocomplete=\"off\"></label> \
             <button type=\"submit\">Replay all with this reason</button></form></section>",
            escape(&format!("{base}/dead-letters/replay")),
            escape(csrf),
            escape(reason)
        );
    }
    page(&format!("Flow {flow}"), &b)
}

/// The answer to an intervention: what the worker said (its refusal included), and the way back.
pub fn outcome_view(flow: &FlowRef, ok: bool, message: &str) -> String {
    let b = format!(
        "<h1>{}</h1><p id=\"outcome\" class=\"{}\">{}</p><p><a href=\"{}\">Back to flow {}</a></p>",
        if ok { "Done" } else { "Refused" },
        if ok { "ok" } else { "bad" },
        escape(message),
        escape(&flow_href(flow)),
        escape(&flow.to_string())
    );
    page(if ok { "Done" } else { "Refused" }, &b)
}

/// An error page (bad request, unknown flow, a cross-site post).
pub fn error_view(title: &str, message: &str) -> String {
    page(
        title,
        &format!(
            "<h1>{}</h1><p id=\"outcome\" class=\"bad\">{}</p>",
            escape(title),
            escape(message)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_makes_markup_and_quotes_inert_and_leaves_plain_text_alone() {
        assert_eq!(
            escape("<script>alert(1)</script>"),
            "&lt;script&gt;alert(1)&lt;/script&gt;"
        );
        assert_eq!(
            escape("\"'><img onerror=x>&"),
            "&quot;&#39;&gt;&lt;img onerror=x&gt;&amp;"
        );
        assert!(matches!(escape("Acme GmbH 25%"), Cow::Borrowed(_)));
    }

    #[test]
    fn a_path_segment_cannot_add_steps_queries_or_schemes() {
        assert_eq!(path_segment("../x?y#z"), "%2E%2E%2Fx%3Fy%23z");
        assert_eq!(path_segment("javascript:"), "javascript%3A");
    }
}
