//! The words of a ticket, shared by every wire format: its one-line headline, its fields, its examples and
//! its commands as text. The formats differ in markup (Block Kit, Atlassian Document Format, Markdown, JSON)
//! but say the same things in the same order, so a person reads the same ticket whichever sink reached them.
//! Everything here comes from the [`Ticket`], which is redacted before the ledger stores it; nothing is added.

use chrono::{DateTime, SecondsFormat, Utc};

use super::Event;
use crate::tickets::{Example, Ticket};

/// The longest text of one example's part (message, ERP response, snapshot) that any format carries; the
/// vendors' own limits are applied on top by each format.
pub const EXAMPLE_PART_CHARS: usize = 1500;

/// `s` with at most `max` characters (not bytes: the vendors count characters), ending in `…` when cut.
pub fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// `s` on one line: line breaks and tabs become spaces, runs of spaces collapse.
pub fn single_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The ticket in one line: `namespace/flow: title`.
pub fn headline(ticket: &Ticket) -> String {
    single_line(&format!(
        "{}/{}: {}",
        ticket.namespace, ticket.flow, ticket.title
    ))
}

/// A timestamp as the ticket's JSON writes it (RFC 3339, UTC).
pub fn timestamp(at: &DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// What a delivery says first: the event and the ticket's standing.
pub fn lead(ticket: &Ticket, event: Event) -> String {
    match event {
        Event::Opened => format!("Opened: {}", ticket.summary),
        Event::Updated => format!(
            "Updated ({}): {} occurrences, {} outstanding.",
            ticket.state.label(),
            ticket.count,
            ticket.outstanding
        ),
        Event::Resolved => format!(
            "Resolved: the cause cleared{} after {} occurrences.",
            ticket
                .resolved_at
                .map(|at| format!(" at {}", timestamp(&at)))
                .unwrap_or_default(),
            ticket.count
        ),
    }
}

/// One labelled fact of a ticket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub label: &'static str,
    pub value: String,
}

/// The ticket's facts, in the order every format shows them; absent ones are left out.
pub fn fields(ticket: &Ticket) -> Vec<Field> {
    let mut fields = Vec::new();
    let mut add = |label: &'static str, value: String| {
        if !value.trim().is_empty() {
            fields.push(Field { label, value });
        }
    };
    add("Flow", format!("{}/{}", ticket.namespace, ticket.flow));
    add("State", ticket.state.label().to_string());
    add("Owner", owner(ticket));
    add("Kind", ticket.kind.label().to_string());
    add(
        "Class",
        ticket
            .class
            .map(|c| c.label().to_string())
            .unwrap_or_default(),
    );
    add("Reason", ticket.reason.clone());
    add("Rule", ticket.rule.clone().unwrap_or_default());
    add(
        "Occurrences",
        format!("{} ({} outstanding)", ticket.count, ticket.outstanding),
    );
    add("Escalation step", ticket.escalation_step.to_string());
    add("Opened", timestamp(&ticket.opened_at));
    if let (Some(at), by) = (ticket.acknowledged_at, &ticket.acknowledged_by) {
        add(
            "Acknowledged",
            match by {
                Some(by) => format!("{} by {by}", timestamp(&at)),
                None => timestamp(&at),
            },
        );
    }
    add("Fingerprint", ticket.fingerprint.clone());
    fields
}

/// `Name (id, role)`.
pub fn owner(ticket: &Ticket) -> String {
    format!(
        "{} ({}, {})",
        ticket.owner.name,
        ticket.owner.id,
        ticket.role.as_str()
    )
}

/// One example's first line: `record 42 · source key … · correlation … · at …`.
pub fn example_heading(example: &Example) -> String {
    single_line(&format!(
        "record {} · source key {} · correlation {} · at {}",
        example.record,
        example.source_key,
        example.correlation_id,
        timestamp(&example.at)
    ))
}

/// An example's texts, labelled, each cut to [`EXAMPLE_PART_CHARS`]; the snapshot as indented JSON.
pub fn example_parts(example: &Example) -> Vec<(&'static str, String)> {
    let mut parts = Vec::new();
    if let Some(message) = example.message.as_deref().filter(|m| !m.trim().is_empty()) {
        parts.push(("Message", clip(message, EXAMPLE_PART_CHARS)));
    }
    if let Some(answer) = example
        .erp_response
        .as_deref()
        .filter(|m| !m.trim().is_empty())
    {
        parts.push(("ERP response", clip(answer, EXAMPLE_PART_CHARS)));
    }
    if let Some(snapshot) = &example.snapshot {
        let text = serde_json::to_string_pretty(snapshot).unwrap_or_default();
        parts.push(("Snapshot", clip(&text, EXAMPLE_PART_CHARS)));
    }
    parts
}

/// The commands, one a line.
pub fn commands(ticket: &Ticket) -> String {
    ticket.commands.join("\n")
}

/// The whole ticket as Markdown (GitHub issue bodies and comments). Text from the ticket goes into code
/// spans and fences where it could be read as markup (an ERP answer full of `<` and `*`).
pub fn markdown(ticket: &Ticket, event: Event) -> String {
    let mut out = format!("{}\n\n", lead(ticket, event));
    if event != Event::Opened {
        out.push_str(&format!("{}\n\n", ticket.summary));
    }
    out.push_str("| Field | Value |\n| --- | --- |\n");
    for field in fields(ticket) {
        out.push_str(&format!(
            "| {} | {} |\n",
            field.label,
            single_line(&field.value).replace('|', "\\|")
        ));
    }
    if !ticket.examples.is_empty() {
        out.push_str("\n### Latest records\n");
        for example in &ticket.examples {
            out.push_str(&format!("\n- {}\n", example_heading(example)));
            for (label, text) in example_parts(example) {
                out.push_str(&format!("\n  {label}:\n\n{}\n", fence(&text, "  ")));
            }
        }
    }
    if !ticket.commands.is_empty() {
        out.push_str(&format!(
            "\n### Commands\n\n{}\n",
            fence(&commands(ticket), "")
        ));
    }
    out
}

/// A fenced code block long enough that no backtick run inside `text` closes it.
fn fence(text: &str, indent: &str) -> String {
    let longest = text.split(|c| c != '`').map(str::len).max().unwrap_or(0);
    let ticks = "`".repeat(longest.max(2) + 1);
    let body: Vec<String> = text.lines().map(|l| format!("{indent}{l}")).collect();
    format!("{indent}{ticks}\n{}\n{indent}{ticks}", body.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_counts_characters_and_marks_the_cut() {
        assert_eq!(clip("héllo", 5), "héllo");
        assert_eq!(clip("héllo wörld", 5), "héll…");
        assert_eq!(clip("ééé", 1), "…");
    }

    #[test]
    fn a_fence_outlasts_backticks_in_the_text() {
        let fenced = fence("a ```` b", "");
        assert!(fenced.starts_with("`````\n"), "{fenced}");
    }
}
