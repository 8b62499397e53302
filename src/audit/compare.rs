//! The comparison of a flow's two sides, pure: the CRM's closed deals and the ERP's orders of one window,
//! matched by external id (the CRM record's id), give each side's count and exact money totals per currency,
//! the deals matched by an order of the same amount and currency, and every difference.
//!
//! [`Comparison`] takes both sides as one stream in external-id order (what the ledger's index yields), so it
//! holds one external id's orders at a time however large the window is. Amounts are `rust_decimal`
//! decimals: totals are exact, and `10.5` equals `10.50`.

use std::collections::BTreeMap;

use rust_decimal::Decimal;

use crate::connectors::queries::AuditedOrder;
use crate::ledger::AuditSide;

/// An amount in a currency.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Money {
    /// ISO 4217 code.
    pub currency: String,
    pub amount: Decimal,
}

impl Money {
    pub fn new(currency: &str, amount: Decimal) -> Money {
        Money {
            currency: currency.to_string(),
            amount,
        }
    }
}

impl std::fmt::Display for Money {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.currency, self.amount.normalize())
    }
}

/// How the two sides disagree about one external id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DifferenceKind {
    /// A closed deal with no order.
    DealWithoutOrder,
    /// An order whose external id names no closed deal of the window.
    OrderWithoutDeal,
    /// Both exist, in the same currency, for different amounts.
    AmountMismatch,
    /// Both exist, in different currencies.
    CurrencyMismatch,
    /// More than one deal or order for one external id (the sync upserts by external id, so it never makes
    /// two orders of one deal).
    Duplicate,
}

impl DifferenceKind {
    /// Stable label, for reports and tickets.
    pub fn label(self) -> &'static str {
        match self {
            DifferenceKind::DealWithoutOrder => "dealWithoutOrder",
            DifferenceKind::OrderWithoutDeal => "orderWithoutDeal",
            DifferenceKind::AmountMismatch => "amountMismatch",
            DifferenceKind::CurrencyMismatch => "currencyMismatch",
            DifferenceKind::Duplicate => "duplicate",
        }
    }
}

/// One difference: the external id, how the sides differ, and what each side holds (the first of each side's
/// orders for a duplicate).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Difference {
    pub external_id: String,
    pub kind: DifferenceKind,
    pub crm: Option<Money>,
    pub erp: Option<Money>,
}

/// One side's count and totals per currency.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SideTotals {
    pub count: i64,
    pub totals: BTreeMap<String, Decimal>,
}

impl SideTotals {
    fn add(&mut self, money: &Money) {
        self.count += 1;
        *self.totals.entry(money.currency.clone()).or_default() += money.amount;
    }

    /// The totals as the status shows them: decimal strings without trailing zeros.
    pub fn summary(&self) -> crate::api::AuditSideSummary {
        crate::api::AuditSideSummary {
            count: self.count,
            totals: self
                .totals
                .iter()
                .map(|(currency, total)| (currency.clone(), total.normalize().to_string()))
                .collect(),
        }
    }
}

/// What a comparison found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub crm: SideTotals,
    pub erp: SideTotals,
    /// Deals with exactly one order of the same amount and currency.
    pub matched: i64,
    /// Every difference, in external-id order.
    pub differences: Vec<Difference>,
}

/// The stream handed to [`Comparison::push`] went backwards: it must be in external-id order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "audit comparison: external id {got:?} came after {previous:?}; the orders must be sorted by external id"
)]
pub struct OutOfOrder {
    pub previous: String,
    pub got: String,
}

/// A comparison fed one order at a time, in external-id order (either side first within an id).
#[derive(Debug, Default)]
pub struct Comparison {
    tally: Tally,
    /// The external id being gathered, with its orders on each side.
    current: Option<(String, Vec<Money>, Vec<Money>)>,
}

impl Comparison {
    pub fn new() -> Comparison {
        Comparison::default()
    }

    /// Adds one order of `side`.
    pub fn push(&mut self, side: AuditSide, order: AuditedOrder) -> Result<(), OutOfOrder> {
        let money = Money {
            currency: order.currency,
            amount: order.amount,
        };
        match side {
            AuditSide::Crm => self.tally.crm.add(&money),
            AuditSide::Erp => self.tally.erp.add(&money),
        }
        let same = matches!(&self.current, Some((id, _, _)) if *id == order.external_id);
        if !same {
            if let Some((previous, _, _)) = &self.current
                && previous.as_str() > order.external_id.as_str()
            {
                return Err(OutOfOrder {
                    previous: previous.clone(),
                    got: order.external_id,
                });
            }
            self.settle();
            self.current = Some((order.external_id, Vec::new(), Vec::new()));
        }
        let (_, crm, erp) = self.current.as_mut().expect("set above");
        match side {
            AuditSide::Crm => crm.push(money),
            AuditSide::Erp => erp.push(money),
        }
        Ok(())
    }

    /// Decides the external id gathered so far.
    fn settle(&mut self) {
        let Some((external_id, mut crm, mut erp)) = self.current.take() else {
            return;
        };
        let kind = match (crm.len(), erp.len()) {
            (1, 1) if crm[0].currency != erp[0].currency => DifferenceKind::CurrencyMismatch,
            (1, 1) if crm[0].amount != erp[0].amount => DifferenceKind::AmountMismatch,
            (1, 1) => {
                self.tally.matched += 1;
                return;
            }
            (1, 0) => DifferenceKind::DealWithoutOrder,
            (0, 1) => DifferenceKind::OrderWithoutDeal,
            _ => DifferenceKind::Duplicate,
        };
        crm.truncate(1);
        erp.truncate(1);
        self.tally.differences.push(Difference {
            external_id,
            kind,
            crm: crm.pop(),
            erp: erp.pop(),
        });
    }

    pub fn finish(mut self) -> Tally {
        self.settle();
        self.tally
    }
}

/// Compares two sides held in memory (sorting them first): for `meshline dev`'s stand-ins and tests. The
/// driver streams from the ledger instead.
pub fn compare(crm: Vec<AuditedOrder>, erp: Vec<AuditedOrder>) -> Tally {
    let mut all: Vec<(AuditSide, AuditedOrder)> = crm
        .into_iter()
        .map(|o| (AuditSide::Crm, o))
        .chain(erp.into_iter().map(|o| (AuditSide::Erp, o)))
        .collect();
    all.sort_by(|a, b| a.1.external_id.cmp(&b.1.external_id));
    let mut comparison = Comparison::new();
    for (side, order) in all {
        comparison
            .push(side, order)
            .expect("sorted by external id above");
    }
    comparison.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(id: &str, currency: &str, amount: &str) -> AuditedOrder {
        AuditedOrder {
            external_id: id.into(),
            currency: currency.into(),
            amount: amount.parse().unwrap(),
        }
    }

    #[test]
    fn totals_are_exact_per_currency_where_binary_floats_would_drift() {
        // 0.1 + 0.2 is not 0.3 in f64; a finance total must be.
        let crm = vec![
            order("a", "USD", "0.1"),
            order("b", "USD", "0.2"),
            order("c", "EUR", "1000000000000.01"),
            order("d", "EUR", "0.99"),
        ];
        let erp = vec![
            order("a", "USD", "0.10"),
            order("b", "USD", "0.2"),
            order("c", "EUR", "1000000000000.01"),
            order("d", "EUR", "0.990"),
        ];
        let tally = compare(crm, erp);
        assert_eq!(tally.crm.count, 4);
        assert_eq!(tally.crm.totals["USD"], "0.3".parse::<Decimal>().unwrap());
        assert_eq!(
            tally.crm.summary().totals["EUR"],
            "1000000000001",
            "exact to the cent and without trailing zeros"
        );
        assert_eq!(tally.erp.summary().totals["USD"], "0.3");
        assert_eq!(tally.matched, 4, "0.10 equals 0.1");
        assert!(tally.differences.is_empty());
    }

    #[test]
    fn every_kind_of_difference_is_found_and_named_by_external_id() {
        let crm = vec![
            order("001-matched", "USD", "10"),
            order("002-no-order", "USD", "20"),
            order("004-amount", "USD", "40"),
            order("005-currency", "USD", "50"),
            order("006-dup", "EUR", "60"),
        ];
        let erp = vec![
            order("001-matched", "USD", "10.00"),
            order("003-no-deal", "USD", "30"),
            order("004-amount", "USD", "41"),
            order("005-currency", "EUR", "50"),
            order("006-dup", "EUR", "60"),
            order("006-dup", "EUR", "60"),
        ];
        let tally = compare(crm, erp);
        let kinds: Vec<(&str, DifferenceKind)> = tally
            .differences
            .iter()
            .map(|d| (d.external_id.as_str(), d.kind))
            .collect();
        assert_eq!(
            kinds,
            [
                ("002-no-order", DifferenceKind::DealWithoutOrder),
                ("003-no-deal", DifferenceKind::OrderWithoutDeal),
                ("004-amount", DifferenceKind::AmountMismatch),
                ("005-currency", DifferenceKind::CurrencyMismatch),
                ("006-dup", DifferenceKind::Duplicate),
            ]
        );
        assert_eq!(tally.matched, 1);
        assert_eq!((tally.crm.count, tally.erp.count), (5, 6));
        assert_eq!(tally.erp.totals["EUR"], Decimal::from(170));
        let amount = &tally.differences[2];
        assert_eq!(amount.crm, Some(Money::new("USD", Decimal::from(40))));
        assert_eq!(amount.erp, Some(Money::new("USD", Decimal::from(41))));
    }

    #[test]
    fn a_stream_out_of_external_id_order_is_refused_naming_both_ids() {
        let mut c = Comparison::new();
        c.push(AuditSide::Crm, order("b", "USD", "1")).unwrap();
        let err = c.push(AuditSide::Erp, order("a", "USD", "1")).unwrap_err();
        assert_eq!(
            err,
            OutOfOrder {
                previous: "b".into(),
                got: "a".into()
            }
        );
    }
}
