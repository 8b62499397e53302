//! Why a difference exists, from what the ledger knows about the record behind its external id (the CRM
//! record's id, the ledger's source key), pure. The rules, in order:
//!
//! - no record in the ledger: **unexplained** (the sync never received the deal, or the ERP's order was not
//!   made by it);
//! - a duplicate: **unexplained** whatever the record's state (the sync upserts by external id; it never
//!   makes two orders of one deal);
//! - the record is `held`: **held**; `dead_lettered`: **deadLettered** with its reason;
//! - it is waiting (received, validated, retry scheduled, delivering): **inFlight**, its newest revision has
//!   not reached the ERP yet;
//! - it is `delivered`, and the sides disagree on the amount or currency: **staleRevision** when the ERP holds
//!   exactly the money of the revision the ledger delivered and the CRM's money differs from it (the deal
//!   changed after the delivery and that change has not reached the ledger: a webhook still to come, a
//!   poll not yet run). When the ERP holds something else than what was delivered, or the ledger no longer
//!   has the delivered payload (the delivered retention reduced it), it is **unexplained**: someone changed
//!   the order in the ERP, or the delivery did not land;
//! - delivered and the ERP has no order, or delivered and the CRM no longer lists the deal as closed in the
//!   window: **unexplained** (an order deleted in the ERP; a deal reopened after delivery, which finance
//!   should see).
//!
//! **filtered** is never given: the ledger does not record that a contract rule filtered a record out (a
//! rule rejects to the dead letters or holds; there is no "skip" outcome), so a filtered deal shows as
//! dead-lettered or held by its rule. The label is kept so the status's keys stay the documented ones.

use std::str::FromStr;

use rust_decimal::Decimal;
use serde_json::Value;

use super::compare::{Difference, DifferenceKind, Money};
use crate::ledger::{AuditRecordFacts, RecordState};

/// A difference the ledger explains.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Explanation {
    Held { rule: Option<String> },
    DeadLettered { reason: String },
    InFlight,
    StaleRevision,
    Filtered,
}

impl Explanation {
    /// The key in `FlowAuditStatus::explained` and the metric's `explanation` label.
    pub fn label(&self) -> &'static str {
        match self {
            Explanation::Held { .. } => "held",
            Explanation::DeadLettered { .. } => "deadLettered",
            Explanation::InFlight => "inFlight",
            Explanation::StaleRevision => "staleRevision",
            Explanation::Filtered => "filtered",
        }
    }

    pub const LABELS: [&'static str; 5] = [
        "held",
        "deadLettered",
        "inFlight",
        "staleRevision",
        "filtered",
    ];
}

/// Where the CRM's amount and currency are in a record's source payload, to read the money of the revision
/// the ledger holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoneyFields {
    /// Dotted path of the amount, e.g. `Amount` (Salesforce) or `properties.amount` (HubSpot).
    pub amount: String,
    /// Dotted path of the currency code; `None` or absent in a payload: `default_currency`.
    pub currency: Option<String>,
    pub default_currency: String,
}

impl Default for MoneyFields {
    fn default() -> Self {
        MoneyFields {
            amount: "Amount".into(),
            currency: Some("CurrencyIsoCode".into()),
            default_currency: "USD".into(),
        }
    }
}

impl MoneyFields {
    /// The money in a source payload, or `None` when the payload has no readable amount.
    pub fn read(&self, payload: &str) -> Option<Money> {
        let value: Value = serde_json::from_str(payload).ok()?;
        let at = |path: &str| {
            path.split('.')
                .try_fold(&value, |v, key| v.get(key))
                .filter(|v| !v.is_null())
        };
        let amount = match at(&self.amount)? {
            Value::Number(n) => Decimal::from_str(&n.to_string())
                .or_else(|_| Decimal::from_scientific(&n.to_string()))
                .ok()?,
            Value::String(s) => Decimal::from_str(s.trim()).ok()?,
            _ => return None,
        };
        let currency = self
            .currency
            .as_deref()
            .and_then(at)
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| self.default_currency.clone());
        Some(Money { currency, amount })
    }
}

/// Explains `difference` from the ledger's `facts` about its record; `None`: unexplained.
pub fn explain(
    difference: &Difference,
    facts: Option<&AuditRecordFacts>,
    fields: &MoneyFields,
) -> Option<Explanation> {
    let facts = facts?;
    if difference.kind == DifferenceKind::Duplicate {
        return None;
    }
    match facts.state {
        RecordState::Held => Some(Explanation::Held {
            rule: facts.hold_rule.clone(),
        }),
        RecordState::DeadLettered => Some(Explanation::DeadLettered {
            reason: facts
                .dead_letter_reason
                .clone()
                .unwrap_or_else(|| "unknown".into()),
        }),
        RecordState::Received
        | RecordState::Validated
        | RecordState::RetryScheduled
        | RecordState::Delivering => Some(Explanation::InFlight),
        RecordState::Delivered => match difference.kind {
            DifferenceKind::AmountMismatch | DifferenceKind::CurrencyMismatch => {
                let delivered = fields.read(facts.payload.as_deref()?)?;
                let (crm, erp) = (difference.crm.as_ref()?, difference.erp.as_ref()?);
                (same_money(erp, &delivered) && !same_money(crm, &delivered))
                    .then_some(Explanation::StaleRevision)
            }
            _ => None,
        },
    }
}

fn same_money(a: &Money, b: &Money) -> bool {
    a.currency == b.currency && a.amount == b.amount
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diff(
        kind: DifferenceKind,
        crm: Option<(&str, i64)>,
        erp: Option<(&str, i64)>,
    ) -> Difference {
        let money = |m: Option<(&str, i64)>| m.map(|(c, a)| Money::new(c, Decimal::from(a)));
        Difference {
            external_id: "006A".into(),
            kind,
            crm: money(crm),
            erp: money(erp),
        }
    }

    fn facts(state: RecordState, payload: Option<&str>) -> AuditRecordFacts {
        AuditRecordFacts {
            source_key: "006A".into(),
            state,
            dead_letter_reason: (state == RecordState::DeadLettered).then(|| "erp:422".into()),
            hold_rule: (state == RecordState::Held).then(|| "discount_cap".into()),
            payload: payload.map(str::to_string),
        }
    }

    #[test]
    fn a_record_the_ledger_does_not_know_is_unexplained() {
        let d = diff(DifferenceKind::DealWithoutOrder, Some(("USD", 5)), None);
        assert_eq!(explain(&d, None, &MoneyFields::default()), None);
    }

    #[test]
    fn held_dead_lettered_and_waiting_records_explain_a_missing_order() {
        let d = diff(DifferenceKind::DealWithoutOrder, Some(("USD", 5)), None);
        let f = MoneyFields::default();
        assert_eq!(
            explain(&d, Some(&facts(RecordState::Held, None)), &f),
            Some(Explanation::Held {
                rule: Some("discount_cap".into())
            })
        );
        assert_eq!(
            explain(&d, Some(&facts(RecordState::DeadLettered, None)), &f),
            Some(Explanation::DeadLettered {
                reason: "erp:422".into()
            })
        );
        for waiting in [
            RecordState::Received,
            RecordState::Validated,
            RecordState::RetryScheduled,
            RecordState::Delivering,
        ] {
            assert_eq!(
                explain(&d, Some(&facts(waiting, None)), &f),
                Some(Explanation::InFlight),
                "{waiting:?}"
            );
        }
        assert_eq!(
            explain(&d, Some(&facts(RecordState::Delivered, None)), &f),
            None,
            "a delivered deal whose order is gone is for a person to look at"
        );
    }

    #[test]
    fn an_amount_mismatch_is_a_stale_revision_only_when_the_erp_holds_what_was_delivered() {
        let f = MoneyFields::default();
        let delivered = r#"{"Amount": 100.0, "CurrencyIsoCode": "USD"}"#;
        // The CRM moved to 120 after the ledger delivered 100, which the ERP holds.
        let stale = diff(
            DifferenceKind::AmountMismatch,
            Some(("USD", 120)),
            Some(("USD", 100)),
        );
        assert_eq!(
            explain(
                &stale,
                Some(&facts(RecordState::Delivered, Some(delivered))),
                &f
            ),
            Some(Explanation::StaleRevision)
        );
        // The ledger delivered what the CRM says, yet the ERP holds something else: changed in the ERP.
        let edited = diff(
            DifferenceKind::AmountMismatch,
            Some(("USD", 100)),
            Some(("USD", 90)),
        );
        assert_eq!(
            explain(
                &edited,
                Some(&facts(RecordState::Delivered, Some(delivered))),
                &f
            ),
            None
        );
        // Without the delivered payload (purged) nothing can be claimed.
        assert_eq!(
            explain(&stale, Some(&facts(RecordState::Delivered, None)), &f),
            None
        );
    }

    #[test]
    fn a_duplicate_is_never_explained() {
        let d = diff(
            DifferenceKind::Duplicate,
            Some(("USD", 5)),
            Some(("USD", 5)),
        );
        assert_eq!(
            explain(
                &d,
                Some(&facts(RecordState::Received, None)),
                &MoneyFields::default()
            ),
            None
        );
    }

    #[test]
    fn money_is_read_from_nested_paths_strings_and_the_default_currency() {
        let f = MoneyFields {
            amount: "properties.amount".into(),
            currency: Some("properties.deal_currency_code".into()),
            default_currency: "EUR".into(),
        };
        assert_eq!(
            f.read(r#"{"properties": {"amount": "1234.50"}}"#),
            Some(Money::new("EUR", "1234.5".parse().unwrap()))
        );
        assert_eq!(f.read(r#"{"properties": {}}"#), None);
        assert_eq!(f.read("not json"), None);
    }
}
