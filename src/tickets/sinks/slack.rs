//! Slack ticket sink: one Block Kit message per event through an incoming webhook.
//!
//! The incoming-webhook URL is itself the credential (whoever holds it can post to the channel), so it comes
//! from the Secret key `webhookUrl`, never from `spec.url`, and it is never quoted in an error. An incoming
//! webhook is bound to one channel when the Slack app is installed and ignores a `channel` in the payload,
//! so `spec.channel` is informational here (it tells people where tickets appear).
//!
//! Incoming webhooks cannot edit or delete a message, so every event (opened, updated, resolved) posts a new
//! one. Nor can they deduplicate or be asked what was posted: a send that timed out or lost its answer may or
//! may not have posted, and the only way to make sure is to post again. So, unlike the webhook sink
//! (`Idempotency-Key`), PagerDuty (`dedup_key`) and Jira and GitHub (which look for their copy), **an
//! in-doubt resend may post a version twice**. It is bounded: this process resends a version at most once;
//! when that resend has no clear answer either, the version counts as delivered rather than risk a third
//! copy (a worker restart may resend once more). Use the webhook or Jira sink where a ticket must arrive
//! exactly once. Slack answers `200 ok`, or 4xx with a plain-text reason (`invalid_payload`, `no_text`,
//! `channel_not_found`, 404 `no_service`, 410 `channel_is_archived`) that no retry fixes, or 429 with
//! `Retry-After`. Block Kit's limits are kept here: a header's `plain_text` ≤ 150 characters, a section's
//! text ≤ 3000, ≤ 10 fields of ≤ 2000 each, ≤ 10 context elements, ≤ 50 blocks; `text` is the fallback for
//! notifications and clients that do not render blocks.

use std::collections::HashSet;
use std::sync::Mutex;

use async_trait::async_trait;
use serde_json::{Value, json};
use url::Url;

use super::render::{self, clip};
use super::{Delivery, Event, SinkError, SinkRef, TicketSink, USER_AGENT, credential, send};
use crate::connectors::Credentials;
use crate::tickets::Ticket;

pub const HEADER_CHARS: usize = 150;
pub const SECTION_TEXT_CHARS: usize = 3000;
pub const FIELD_CHARS: usize = 2000;
pub const MAX_FIELDS: usize = 10;
pub const MAX_BLOCKS: usize = 50;
/// Slack truncates a message's `text` beyond 40,000 characters; the fallback stays far below.
pub const FALLBACK_CHARS: usize = 3000;

pub struct SlackSink {
    name: String,
    http: reqwest::Client,
    webhook: Url,
    /// (fingerprint, version) pairs this process resent in doubt and got no clear answer for.
    resent: Mutex<HashSet<(String, i64)>>,
}

impl SlackSink {
    pub fn from_spec(
        spec: &crate::api::TicketSink,
        credentials: &Credentials,
        http: reqwest::Client,
    ) -> Result<Self, String> {
        let raw = credential(credentials, "webhookUrl")?;
        // The reason never quotes the value: it is the credential.
        let webhook = Url::parse(raw.trim())
            .ok()
            .filter(|u| matches!(u.scheme(), "https" | "http"))
            .ok_or_else(|| {
                "credential \"webhookUrl\" is malformed: it is not an http(s) URL".to_string()
            })?;
        Ok(SlackSink {
            name: spec.name.clone(),
            http,
            webhook,
            resent: Mutex::new(HashSet::new()),
        })
    }
}

/// Escapes `&`, `<` and `>` the way Slack's `mrkdwn` requires, keeping at most `max` characters in all
/// (never cutting an escape in half).
pub fn mrkdwn(raw: &str, max: usize) -> String {
    let escaped = raw
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    if escaped.chars().count() <= max {
        return escaped;
    }
    let mut out = String::new();
    let mut used = 0;
    for c in raw.chars() {
        let piece = match c {
            '&' => "&amp;".to_string(),
            '<' => "&lt;".to_string(),
            '>' => "&gt;".to_string(),
            c => c.to_string(),
        };
        let len = piece.chars().count();
        if used + len > max.saturating_sub(1) {
            out.push('…');
            return out;
        }
        used += len;
        out.push_str(&piece);
    }
    out
}

/// A code block in `mrkdwn`: ticks cannot be escaped in Slack, so they are replaced by a look-alike.
fn code(raw: &str, max: usize) -> String {
    let inner = mrkdwn(&raw.replace('`', "ˋ"), max.saturating_sub(6));
    format!("```{inner}```")
}

/// The message for one event of `ticket`.
pub fn message(ticket: &Ticket, event: Event) -> Value {
    let headline = render::headline(ticket);
    let mut blocks = vec![json!({
        "type": "header",
        "text": {"type": "plain_text", "text": clip(&format!("[{}] {headline}", event.label()), HEADER_CHARS), "emoji": false}
    })];
    let mut lead = render::lead(ticket, event);
    if event != Event::Opened && !ticket.summary.trim().is_empty() {
        lead = format!("{lead}\n{}", ticket.summary);
    }
    let mut owner = String::new();
    if let Some(chat) = ticket.owner.chat.as_deref().and_then(member_mention) {
        // A member id mentions (and notifies) the owner; a display name in text would not.
        owner = format!("\n{chat}");
    }
    let section_text = format!(
        "{}{owner}",
        mrkdwn(&lead, SECTION_TEXT_CHARS - owner.chars().count())
    );
    let fields: Vec<Value> = render::fields(ticket)
        .into_iter()
        .take(MAX_FIELDS)
        .map(|f| {
            let label = format!("*{}*\n", f.label);
            json!({"type": "mrkdwn", "text": format!("{label}{}", mrkdwn(&f.value, FIELD_CHARS - label.chars().count()))})
        })
        .collect();
    blocks.push(json!({"type": "section", "text": {"type": "mrkdwn", "text": section_text}, "fields": fields}));
    for example in &ticket.examples {
        let mut text = format!("*{}*", mrkdwn(&render::example_heading(example), 500));
        for (label, part) in render::example_parts(example) {
            text.push_str(&format!("\n{label}:\n{}", code(&part, 800)));
        }
        blocks.push(json!({"type": "section", "text": {"type": "mrkdwn", "text": clip(&text, SECTION_TEXT_CHARS)}}));
    }
    if !ticket.commands.is_empty() {
        blocks.push(json!({"type": "section", "text": {"type": "mrkdwn",
            "text": format!("*Commands*\n{}", code(&render::commands(ticket), SECTION_TEXT_CHARS - 13))}}));
    }
    blocks.truncate(MAX_BLOCKS - 1);
    blocks.push(json!({"type": "context", "elements": [{"type": "mrkdwn", "text": mrkdwn(
        &format!("meshline ticket {} · version {} · {}", ticket.fingerprint, ticket.version, ticket.kind.label()),
        SECTION_TEXT_CHARS)}]}));
    json!({
        "text": mrkdwn(&format!("[{}] {headline}: {}", event.label(), ticket.summary), FALLBACK_CHARS),
        "blocks": blocks,
    })
}

/// `<@U123ABC>` for a Slack member id (`U…` or `W…`, upper-case letters and digits), else nothing.
fn member_mention(chat: &str) -> Option<String> {
    let id = chat.trim().trim_start_matches('@');
    let is_id = id.len() >= 9
        && (id.starts_with('U') || id.starts_with('W'))
        && id
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit());
    is_id.then(|| format!("<@{id}>"))
}

#[async_trait]
impl TicketSink for SlackSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn deliver(&self, delivery: Delivery<'_>) -> Result<SinkRef, SinkError> {
        let ticket = delivery.ticket;
        let posted = json!({"posted": ticket.version});
        let version = (ticket.fingerprint.clone(), ticket.version);
        if delivery.in_doubt
            && !self
                .resent
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(version.clone())
        {
            // Already resent once without a clear answer: a second resend could be a third copy.
            self.forget(&version);
            tracing::warn!(
                sink = %self.name,
                ticket = %ticket.fingerprint,
                version = ticket.version,
                "slack: this version was already resent in doubt; not posting it again"
            );
            return Ok(posted);
        }
        let body = message(ticket, Event::of(&delivery));
        let request = self
            .http
            .post(self.webhook.clone())
            .header("User-Agent", USER_AGENT)
            .json(&body);
        // The path of an incoming webhook carries its secret; errors say only which endpoint it was.
        let what = "POST (incoming webhook)";
        // No answer at all: it may have posted, so this resend (if it was one) stays counted.
        let answer = send(&self.name, what, request).await?;
        if !answer.success() {
            // A 4xx (429 included) posted nothing, so a later resend is not a copy; a 5xx may have posted.
            if answer.status < 500 {
                self.forget(&version);
            }
            return Err(answer.error(&self.name, what));
        }
        self.forget(&version);
        Ok(posted)
    }
}

impl SlackSink {
    fn forget(&self, version: &(String, i64)) {
        self.resent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(version);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_are_never_cut_in_half() {
        assert_eq!(mrkdwn("a<b>&c", 100), "a&lt;b&gt;&amp;c");
        assert_eq!(mrkdwn("ab<cd", 5), "ab…");
        assert_eq!(mrkdwn("ab<cd", 7), "ab&lt;…");
        assert_eq!(mrkdwn("ab<cd", 8), "ab&lt;cd", "what fits is not cut");
    }

    #[test]
    fn only_member_ids_become_mentions() {
        assert_eq!(
            member_mention("@U024BE7LH").as_deref(),
            Some("<@U024BE7LH>")
        );
        assert_eq!(member_mention("@dana"), None);
    }
}
