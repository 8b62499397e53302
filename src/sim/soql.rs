//! The part of SOQL the CRM stand-in answers: `SELECT <fields> FROM Opportunity [WHERE <conditions>]
//! [ORDER BY <field> [ASC|DESC]] [LIMIT <n>]`, where a condition is `<field> <op> <literal>`, joined by `AND`
//! or `OR` (not mixed on one level without parentheses, as Salesforce requires) and grouped by parentheses.
//!
//! Owns parsing and checking that text the way Salesforce does (keywords and field names case-insensitive,
//! literals typed by the field: a date unquoted, a boolean `true`/`false`, text quoted) and nothing else: no
//! I/O, no state. Anything outside this subset is refused with Salesforce's own error codes and message shape
//! (`MALFORMED_QUERY`, `INVALID_FIELD`, `INVALID_TYPE`), so a client that builds an unexpected query learns it
//! here rather than against a real org.

use std::cmp::Ordering;

use chrono::NaiveDate;
use rust_decimal::Decimal;

/// The sObject the stand-in holds.
pub const OBJECT: &str = "Opportunity";

/// A field's type, which decides the literal it is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    Id,
    Text,
    Date,
    DateTime,
    Boolean,
    Currency,
}

/// Opportunity's fields the stand-in keeps, by their canonical spelling.
pub const FIELDS: &[(&str, FieldType)] = &[
    ("Id", FieldType::Id),
    ("Name", FieldType::Text),
    ("StageName", FieldType::Text),
    ("CloseDate", FieldType::Date),
    ("IsWon", FieldType::Boolean),
    ("IsClosed", FieldType::Boolean),
    ("Amount", FieldType::Currency),
    ("CurrencyIsoCode", FieldType::Text),
    ("AccountId", FieldType::Id),
    ("SystemModstamp", FieldType::DateTime),
];

/// A field's value in a record, for comparison.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue {
    Text(String),
    Date(NaiveDate),
    Boolean(bool),
    Number(Decimal),
    Null,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// A `WHERE` clause.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    Compare {
        field: &'static str,
        op: Op,
        value: FieldValue,
    },
    And(Vec<Filter>),
    Or(Vec<Filter>),
}

/// A checked query.
#[derive(Debug, Clone, PartialEq)]
pub struct Soql {
    /// Canonical field names, in the order asked.
    pub fields: Vec<&'static str>,
    pub filter: Option<Filter>,
    /// Field and whether ascending.
    pub order_by: Option<(&'static str, bool)>,
    pub limit: Option<usize>,
}

/// Salesforce's refusal of a query: `[{"message": …, "errorCode": …}]` with HTTP 400.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SoqlError {
    pub error_code: &'static str,
    pub message: String,
}

impl Soql {
    /// Whether a record (its fields read through `value`) passes the `WHERE` clause.
    pub fn matches(&self, value: &dyn Fn(&str) -> FieldValue) -> bool {
        self.filter.as_ref().is_none_or(|f| f.matches(value))
    }
}

impl Filter {
    fn matches(&self, value: &dyn Fn(&str) -> FieldValue) -> bool {
        match self {
            Filter::And(all) => all.iter().all(|f| f.matches(value)),
            Filter::Or(any) => any.iter().any(|f| f.matches(value)),
            Filter::Compare {
                field,
                op,
                value: literal,
            } => {
                let actual = value(field);
                // SOQL: a comparison with a null field is false except `= null` / `!= null`.
                let ordering = match (&actual, literal) {
                    (FieldValue::Null, FieldValue::Null) => Some(Ordering::Equal),
                    (FieldValue::Null, _) | (_, FieldValue::Null) => None,
                    (a, b) => compare(a, b),
                };
                match (op, ordering) {
                    (Op::Ne, None) => true,
                    (_, None) => false,
                    (Op::Eq, Some(o)) => o == Ordering::Equal,
                    (Op::Ne, Some(o)) => o != Ordering::Equal,
                    (Op::Lt, Some(o)) => o == Ordering::Less,
                    (Op::Le, Some(o)) => o != Ordering::Greater,
                    (Op::Gt, Some(o)) => o == Ordering::Greater,
                    (Op::Ge, Some(o)) => o != Ordering::Less,
                }
            }
        }
    }
}

/// Orders two values of one field (text by its bytes, as Salesforce orders Ids).
pub fn compare(a: &FieldValue, b: &FieldValue) -> Option<Ordering> {
    match (a, b) {
        (FieldValue::Text(a), FieldValue::Text(b)) => Some(a.as_bytes().cmp(b.as_bytes())),
        (FieldValue::Date(a), FieldValue::Date(b)) => Some(a.cmp(b)),
        (FieldValue::Boolean(a), FieldValue::Boolean(b)) => Some(a.cmp(b)),
        (FieldValue::Number(a), FieldValue::Number(b)) => Some(a.cmp(b)),
        (FieldValue::Null, FieldValue::Null) => Some(Ordering::Equal),
        // Nulls sort first in an ascending SOQL ORDER BY.
        (FieldValue::Null, _) => Some(Ordering::Less),
        (_, FieldValue::Null) => Some(Ordering::Greater),
        _ => None,
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    Str(String),
    Op(Op),
    Comma,
    Open,
    Close,
}

struct Parser<'a> {
    soql: &'a str,
    tokens: Vec<(usize, Token)>,
    at: usize,
}

/// Parses and checks `soql` against the stand-in's Opportunity.
pub fn parse(soql: &str) -> Result<Soql, SoqlError> {
    let tokens = tokenize(soql)?;
    let mut p = Parser {
        soql,
        tokens,
        at: 0,
    };
    p.keyword("SELECT")?;
    let mut raw_fields = vec![p.word("a field name")?];
    while p.peek() == Some(&Token::Comma) {
        p.at += 1;
        raw_fields.push(p.word("a field name")?);
    }
    p.keyword("FROM")?;
    let (object_at, object) = p.word("an sObject name")?;
    if !object.eq_ignore_ascii_case(OBJECT) {
        return Err(p.error_at(
            "INVALID_TYPE",
            object_at,
            format!(
                "sObject type '{object}' is not supported. If you are attempting to use a custom object, be sure to append the '__c' after the entity name. Please reference your WSDL or the describe call for the appropriate names."
            ),
        ));
    }
    let mut fields = Vec::new();
    for (at, name) in raw_fields {
        fields.push(p.field(at, &name)?.0);
    }
    let mut soql_out = Soql {
        fields,
        filter: None,
        order_by: None,
        limit: None,
    };
    if p.is_keyword("WHERE") {
        p.at += 1;
        soql_out.filter = Some(p.condition()?);
    }
    if p.is_keyword("ORDER") {
        p.at += 1;
        p.keyword("BY")?;
        let (at, name) = p.word("a field name")?;
        let (field, _) = p.field(at, &name)?;
        let mut ascending = true;
        if p.is_keyword("ASC") {
            p.at += 1;
        } else if p.is_keyword("DESC") {
            p.at += 1;
            ascending = false;
        }
        soql_out.order_by = Some((field, ascending));
    }
    if p.is_keyword("LIMIT") {
        p.at += 1;
        let (at, n) = p.word("a number")?;
        let n: usize = n
            .parse()
            .map_err(|_| p.error_at("MALFORMED_QUERY", at, format!("unexpected token: '{n}'")))?;
        soql_out.limit = Some(n);
    }
    if let Some((at, token)) = p.tokens.get(p.at) {
        return Err(p.error_at(
            "MALFORMED_QUERY",
            *at,
            format!("unexpected token: '{}'", show(token)),
        ));
    }
    Ok(soql_out)
}

fn show(token: &Token) -> String {
    match token {
        Token::Word(w) => w.clone(),
        Token::Str(s) => format!("'{s}'"),
        Token::Op(op) => match op {
            Op::Eq => "=",
            Op::Ne => "!=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
        }
        .into(),
        Token::Comma => ",".into(),
        Token::Open => "(".into(),
        Token::Close => ")".into(),
    }
}

fn tokenize(soql: &str) -> Result<Vec<(usize, Token)>, SoqlError> {
    let bytes = soql.as_bytes();
    let mut tokens = Vec::new();
    let mut i = 0;
    let malformed = |at: usize, what: &str| SoqlError {
        error_code: "MALFORMED_QUERY",
        message: located(soql, at, what),
    };
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b',' => {
                tokens.push((i, Token::Comma));
                i += 1;
            }
            b'(' => {
                tokens.push((i, Token::Open));
                i += 1;
            }
            b')' => {
                tokens.push((i, Token::Close));
                i += 1;
            }
            b'=' => {
                tokens.push((i, Token::Op(Op::Eq)));
                i += 1;
            }
            b'!' if bytes.get(i + 1) == Some(&b'=') => {
                tokens.push((i, Token::Op(Op::Ne)));
                i += 2;
            }
            b'<' | b'>' => {
                let or_equal = bytes.get(i + 1) == Some(&b'=');
                let op = match (c, or_equal) {
                    (b'<', false) => Op::Lt,
                    (b'<', true) => Op::Le,
                    (_, false) => Op::Gt,
                    (_, true) => Op::Ge,
                };
                tokens.push((i, Token::Op(op)));
                i += if or_equal { 2 } else { 1 };
            }
            b'\'' => {
                let start = i;
                let mut value = String::new();
                i += 1;
                loop {
                    let Some(&b) = bytes.get(i) else {
                        return Err(malformed(start, "unterminated string literal"));
                    };
                    match b {
                        b'\\' => {
                            let escaped = match bytes.get(i + 1) {
                                Some(b'n') => '\n',
                                Some(b'r') => '\r',
                                Some(b't') => '\t',
                                Some(&e @ (b'\\' | b'\'' | b'"' | b'_' | b'%')) => e as char,
                                _ => return Err(malformed(i, "invalid escape sequence")),
                            };
                            value.push(escaped);
                            i += 2;
                        }
                        b'\'' => {
                            i += 1;
                            break;
                        }
                        _ => {
                            // A whole UTF-8 character, not one byte of it.
                            let ch = soql[i..].chars().next().unwrap_or('\u{fffd}');
                            value.push(ch);
                            i += ch.len_utf8();
                        }
                    }
                }
                tokens.push((start, Token::Str(value)));
            }
            c if c.is_ascii_alphanumeric() || c == b'_' || c == b'-' || c == b'.' => {
                let start = i;
                while i < bytes.len()
                    && (bytes[i].is_ascii_alphanumeric() || matches!(bytes[i], b'_' | b'-' | b'.'))
                {
                    i += 1;
                }
                tokens.push((start, Token::Word(soql[start..i].to_string())));
            }
            _ => {
                let ch = soql[i..].chars().next().unwrap_or('\u{fffd}');
                return Err(malformed(i, &format!("unexpected token: '{ch}'")));
            }
        }
    }
    Ok(tokens)
}

/// Salesforce's message layout: the query, a caret under the fault, its row and column, the reason.
fn located(soql: &str, at: usize, reason: &str) -> String {
    let column = soql[..at.min(soql.len())].chars().count() + 1;
    format!(
        "\n{soql}\n{}^\nERROR at Row:1:Column:{column}\n{reason}",
        " ".repeat(column - 1)
    )
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at).map(|(_, t)| t)
    }

    fn position(&self) -> usize {
        self.tokens
            .get(self.at)
            .map(|(at, _)| *at)
            .unwrap_or(self.soql.len())
    }

    fn error_at(&self, code: &'static str, at: usize, reason: String) -> SoqlError {
        SoqlError {
            error_code: code,
            message: located(self.soql, at, &reason),
        }
    }

    fn unexpected(&self, expected: &str) -> SoqlError {
        let reason = match self.peek() {
            Some(t) => format!("unexpected token: '{}' (expected {expected})", show(t)),
            None => format!("unexpected end of query (expected {expected})"),
        };
        self.error_at("MALFORMED_QUERY", self.position(), reason)
    }

    fn is_keyword(&self, keyword: &str) -> bool {
        matches!(self.peek(), Some(Token::Word(w)) if w.eq_ignore_ascii_case(keyword))
    }

    fn keyword(&mut self, keyword: &str) -> Result<(), SoqlError> {
        if self.is_keyword(keyword) {
            self.at += 1;
            Ok(())
        } else {
            Err(self.unexpected(keyword))
        }
    }

    fn word(&mut self, expected: &str) -> Result<(usize, String), SoqlError> {
        match self.tokens.get(self.at) {
            Some((at, Token::Word(w))) => {
                let out = (*at, w.clone());
                self.at += 1;
                Ok(out)
            }
            _ => Err(self.unexpected(expected)),
        }
    }

    fn field(&self, at: usize, name: &str) -> Result<(&'static str, FieldType), SoqlError> {
        FIELDS
            .iter()
            .find(|(f, _)| f.eq_ignore_ascii_case(name))
            .copied()
            .ok_or_else(|| {
                self.error_at(
                    "INVALID_FIELD",
                    at,
                    format!(
                        "No such column '{name}' on entity '{OBJECT}'. If you are attempting to use a custom field, be sure to append the '__c' after the custom field name. Please reference your WSDL or the describe call for the appropriate names."
                    ),
                )
            })
    }

    /// `term ((AND|OR) term)*`, one connective per level.
    fn condition(&mut self) -> Result<Filter, SoqlError> {
        let mut terms = vec![self.term()?];
        let mut connective: Option<bool> = None; // Some(true): AND
        loop {
            let and = if self.is_keyword("AND") {
                true
            } else if self.is_keyword("OR") {
                false
            } else {
                break;
            };
            if connective.is_some_and(|c| c != and) {
                return Err(self.error_at(
                    "MALFORMED_QUERY",
                    self.position(),
                    "unexpected token: mixing AND and OR needs parentheses".into(),
                ));
            }
            connective = Some(and);
            self.at += 1;
            terms.push(self.term()?);
        }
        Ok(match (connective, terms.len()) {
            (_, 1) => terms.remove(0),
            (Some(false), _) => Filter::Or(terms),
            _ => Filter::And(terms),
        })
    }

    fn term(&mut self) -> Result<Filter, SoqlError> {
        if self.peek() == Some(&Token::Open) {
            self.at += 1;
            let inner = self.condition()?;
            if self.peek() != Some(&Token::Close) {
                return Err(self.unexpected("')'"));
            }
            self.at += 1;
            return Ok(inner);
        }
        let (at, name) = self.word("a field name")?;
        let (field, kind) = self.field(at, &name)?;
        let op = match self.peek() {
            Some(Token::Op(op)) => *op,
            _ => return Err(self.unexpected("a comparison operator")),
        };
        self.at += 1;
        let literal_at = self.position();
        let literal = self.tokens.get(self.at).map(|(_, t)| t.clone());
        self.at += 1;
        let type_error = |what: &str| {
            self.error_at(
                "INVALID_FIELD",
                literal_at,
                format!("value of filter criterion for field '{field}' must be of type {what}"),
            )
        };
        let value = match (kind, literal) {
            (_, Some(Token::Word(w))) if w.eq_ignore_ascii_case("null") => FieldValue::Null,
            (FieldType::Id | FieldType::Text, Some(Token::Str(s))) => {
                if kind == FieldType::Id
                    && !((s.len() == 15 || s.len() == 18)
                        && s.chars().all(|c| c.is_ascii_alphanumeric()))
                {
                    return Err(self.error_at(
                        "INVALID_QUERY_FILTER_OPERATOR",
                        literal_at,
                        format!("invalid ID field: {s}"),
                    ));
                }
                FieldValue::Text(s)
            }
            (FieldType::Id | FieldType::Text, _) => {
                return Err(type_error("string and should be enclosed in quotes"));
            }
            (FieldType::Date, Some(Token::Word(w))) => {
                match NaiveDate::parse_from_str(&w, "%Y-%m-%d") {
                    Ok(d) if w.len() == 10 => FieldValue::Date(d),
                    _ => return Err(type_error("date and should not be enclosed in quotes")),
                }
            }
            (FieldType::Date, _) => {
                return Err(type_error("date and should not be enclosed in quotes"));
            }
            (FieldType::Boolean, Some(Token::Word(w))) if w.eq_ignore_ascii_case("true") => {
                FieldValue::Boolean(true)
            }
            (FieldType::Boolean, Some(Token::Word(w))) if w.eq_ignore_ascii_case("false") => {
                FieldValue::Boolean(false)
            }
            (FieldType::Boolean, _) => {
                return Err(type_error("boolean and should not be enclosed in quotes"));
            }
            (FieldType::Currency, Some(Token::Word(w))) => match w.parse::<Decimal>() {
                Ok(n) => FieldValue::Number(n),
                Err(_) => return Err(type_error("double and should not be enclosed in quotes")),
            },
            (FieldType::Currency, _) => {
                return Err(type_error("double and should not be enclosed in quotes"));
            }
            // The stand-in keeps SystemModstamp only to select it.
            (FieldType::DateTime, _) => {
                return Err(self.error_at(
                    "MALFORMED_QUERY",
                    at,
                    format!("the stand-in CRM does not filter on {field}"),
                ));
            }
        };
        Ok(Filter::Compare { field, op, value })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_audit_query_parses_with_its_window_keyset_and_limit() {
        let q = parse(
            "SELECT Id, Amount, CurrencyIsoCode FROM Opportunity WHERE IsWon = true AND CloseDate >= 2026-11-01 \
             AND CloseDate <= 2026-11-30 AND (StageName = 'Closed Won') AND Id > '006Dn0000000001AAA' ORDER BY Id LIMIT 2000",
        )
        .unwrap();
        assert_eq!(q.fields, vec!["Id", "Amount", "CurrencyIsoCode"]);
        assert_eq!(q.order_by, Some(("Id", true)));
        assert_eq!(q.limit, Some(2000));
        let deal = |id: &'static str, date: &'static str| {
            move |f: &str| match f {
                "Id" => FieldValue::Text(id.into()),
                "IsWon" => FieldValue::Boolean(true),
                "StageName" => FieldValue::Text("Closed Won".into()),
                "CloseDate" => FieldValue::Date(date.parse().unwrap()),
                _ => FieldValue::Null,
            }
        };
        assert!(q.matches(&deal("006Dn0000000002AAA", "2026-11-30")));
        assert!(!q.matches(&deal("006Dn0000000001AAA", "2026-11-30")));
        assert!(!q.matches(&deal("006Dn0000000002AAA", "2026-12-01")));
    }

    #[test]
    fn unknown_fields_objects_and_mistyped_literals_are_refused_as_salesforce_does() {
        let e = parse("SELECT Id, Amont FROM Opportunity").unwrap_err();
        assert_eq!(e.error_code, "INVALID_FIELD");
        assert!(
            e.message.contains("No such column 'Amont'"),
            "{}",
            e.message
        );
        assert!(
            e.message.contains("ERROR at Row:1:Column:12"),
            "{}",
            e.message
        );
        let e = parse("SELECT Id FROM Oportunity").unwrap_err();
        assert_eq!(e.error_code, "INVALID_TYPE");
        let e = parse("SELECT Id FROM Opportunity WHERE CloseDate >= '2026-11-01'").unwrap_err();
        assert_eq!(e.error_code, "INVALID_FIELD");
        assert!(e.message.contains("must be of type date"), "{}", e.message);
        let e =
            parse("SELECT Id FROM Opportunity WHERE IsWon = true AND Id > 'x' OR IsWon = false")
                .unwrap_err();
        assert_eq!(e.error_code, "INVALID_QUERY_FILTER_OPERATOR");
        let e = parse(
            "SELECT Id FROM Opportunity WHERE IsWon = true AND IsClosed = true OR IsWon = false",
        )
        .unwrap_err();
        assert_eq!(e.error_code, "MALFORMED_QUERY");
        let e = parse("DELETE FROM Opportunity").unwrap_err();
        assert_eq!(e.error_code, "MALFORMED_QUERY");
        let e = parse("SELECT Id FROM Opportunity LIMIT 10; DROP").unwrap_err();
        assert_eq!(e.error_code, "MALFORMED_QUERY");
    }
}
