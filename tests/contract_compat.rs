//! Compatibility between contract versions: one table row per classification rule, then the version-step rules.

use meshline::api::{
    CompatibilityMode, FieldSpec, FieldType, MappingField, RuleAction, RuleSpec, SignOff,
    SyncContractSpec,
};
use meshline::contract::compat::{Bump, ChangeKind, Effect};
use meshline::contract::{content_hash, diff, parse_manifest};

const EXAMPLE: &str = include_str!("../examples/salesforce-netsuite/contract.yaml");

fn base() -> SyncContractSpec {
    parse_manifest(EXAMPLE).unwrap().spec
}

fn field<'a>(spec: &'a mut SyncContractSpec, name: &str) -> &'a mut FieldSpec {
    spec.fields.iter_mut().find(|f| f.name == name).unwrap()
}

fn rule<'a>(spec: &'a mut SyncContractSpec, name: &str) -> &'a mut RuleSpec {
    spec.rules.iter_mut().find(|r| r.name == name).unwrap()
}

fn new_field(name: &str, ty: FieldType, required: bool) -> FieldSpec {
    FieldSpec {
        name: name.into(),
        r#type: ty,
        items: None,
        required,
        enum_values: None,
        pattern: None,
        minimum: None,
        maximum: None,
        max_length: None,
        pii: false,
        description: None,
    }
}

type Edit = fn(&mut SyncContractSpec);

/// Every kind of change, its effect on the records the contract accepts (or on the payload), and whether it
/// breaks BACKWARD, FORWARD and FULL.
#[test]
fn every_change_is_classified_with_schema_registry_meaning() {
    let cases: Vec<(&str, Edit, ChangeKind, Effect)> = vec![
        (
            "optional field added",
            |s| s.fields.push(new_field("region", FieldType::String, false)),
            ChangeKind::FieldAdded,
            Effect::None,
        ),
        (
            "required field added",
            |s| s.fields.push(new_field("region", FieldType::String, true)),
            ChangeKind::FieldAdded,
            Effect::Narrows,
        ),
        (
            "optional field removed",
            |s| s.fields.retain(|f| f.name != "customerPhone"),
            ChangeKind::FieldRemoved,
            Effect::None,
        ),
        (
            "required field removed",
            |s| s.fields.retain(|f| f.name != "accountName"),
            ChangeKind::FieldRemoved,
            Effect::Widens,
        ),
        (
            "optional made required",
            |s| field(s, "discountPercent").required = true,
            ChangeKind::FieldMadeRequired,
            Effect::Narrows,
        ),
        (
            "required made optional",
            |s| field(s, "accountName").required = false,
            ChangeKind::FieldMadeOptional,
            Effect::Widens,
        ),
        (
            "integer widened to decimal",
            |s| field(s, "lineItems[].quantity").r#type = FieldType::Decimal,
            ChangeKind::TypeWidened,
            Effect::Widens,
        ),
        (
            "decimal narrowed to integer",
            |s| field(s, "amount").r#type = FieldType::Integer,
            ChangeKind::TypeNarrowed,
            Effect::Narrows,
        ),
        (
            "enum widened to string",
            |s| {
                let f = field(s, "currencyIsoCode");
                f.r#type = FieldType::String;
                f.enum_values = None;
            },
            ChangeKind::TypeWidened,
            Effect::Widens,
        ),
        (
            "string narrowed to enum",
            |s| {
                let f = field(s, "accountName");
                f.r#type = FieldType::Enum;
                f.enum_values = Some(vec!["ACME".into()]);
                f.max_length = None;
            },
            ChangeKind::TypeNarrowed,
            Effect::Narrows,
        ),
        (
            "date widened to string",
            |s| field(s, "closeDate").r#type = FieldType::String,
            ChangeKind::TypeWidened,
            Effect::Widens,
        ),
        (
            "type changed to an unrelated one",
            |s| field(s, "name").r#type = FieldType::Boolean,
            ChangeKind::TypeChanged,
            Effect::Both,
        ),
        (
            "enum value added",
            |s| {
                field(s, "currencyIsoCode")
                    .enum_values
                    .as_mut()
                    .unwrap()
                    .push("NOK".into())
            },
            ChangeKind::EnumValuesAdded,
            Effect::Widens,
        ),
        (
            "enum value removed",
            |s| {
                field(s, "currencyIsoCode")
                    .enum_values
                    .as_mut()
                    .unwrap()
                    .retain(|v| v != "GBP")
            },
            ChangeKind::EnumValuesRemoved,
            Effect::Narrows,
        ),
        (
            "pattern added",
            |s| field(s, "accountName").pattern = Some("^[A-Z]".into()),
            ChangeKind::PatternAdded,
            Effect::Narrows,
        ),
        (
            "pattern removed",
            |s| field(s, "id").pattern = None,
            ChangeKind::PatternRemoved,
            Effect::Widens,
        ),
        (
            "pattern changed",
            |s| field(s, "id").pattern = Some("^006".into()),
            ChangeKind::PatternChanged,
            Effect::Both,
        ),
        (
            "minimum raised",
            |s| field(s, "amount").minimum = Some("1".into()),
            ChangeKind::BoundTightened,
            Effect::Narrows,
        ),
        (
            "minimum lowered",
            |s| field(s, "amount").minimum = Some("-1".into()),
            ChangeKind::BoundLoosened,
            Effect::Widens,
        ),
        (
            "minimum removed",
            |s| field(s, "lineItems[].unitPrice").minimum = None,
            ChangeKind::BoundLoosened,
            Effect::Widens,
        ),
        (
            "maximum lowered",
            |s| field(s, "amount").maximum = Some("100".into()),
            ChangeKind::BoundTightened,
            Effect::Narrows,
        ),
        (
            "maximum raised",
            |s| field(s, "amount").maximum = Some("20000000".into()),
            ChangeKind::BoundLoosened,
            Effect::Widens,
        ),
        (
            "maximum added",
            |s| field(s, "lineItems[].quantity").maximum = Some("1000".into()),
            ChangeKind::BoundTightened,
            Effect::Narrows,
        ),
        (
            "maxLength lowered",
            |s| field(s, "name").max_length = Some(80),
            ChangeKind::BoundTightened,
            Effect::Narrows,
        ),
        (
            "maxLength raised",
            |s| field(s, "name").max_length = Some(255),
            ChangeKind::BoundLoosened,
            Effect::Widens,
        ),
        (
            "maxLength removed",
            |s| field(s, "name").max_length = None,
            ChangeKind::BoundLoosened,
            Effect::Widens,
        ),
        (
            "pii flag changed",
            |s| field(s, "accountName").pii = true,
            ChangeKind::PiiChanged,
            Effect::None,
        ),
        (
            "description edited",
            |s| field(s, "id").description = Some("The Opportunity Id.".into()),
            ChangeKind::DescriptionChanged,
            Effect::None,
        ),
        (
            "reject rule added",
            |s| {
                s.rules.push(RuleSpec {
                    name: "usd-only".into(),
                    expression: "record.currencyIsoCode == 'USD'".into(),
                    message: "USD only".into(),
                    action: RuleAction::Reject,
                    approver_role: None,
                })
            },
            ChangeKind::RuleAdded,
            Effect::Narrows,
        ),
        (
            "warn rule added",
            |s| {
                s.rules.push(RuleSpec {
                    name: "notice".into(),
                    expression: "true".into(),
                    message: "m".into(),
                    action: RuleAction::Warn,
                    approver_role: None,
                })
            },
            ChangeKind::RuleAdded,
            Effect::None,
        ),
        (
            "reject rule removed",
            |s| s.rules.retain(|r| r.name != "known-sku"),
            ChangeKind::RuleRemoved,
            Effect::Widens,
        ),
        (
            "warn rule removed",
            |s| s.rules.retain(|r| r.name != "large-deal-notice"),
            ChangeKind::RuleRemoved,
            Effect::None,
        ),
        (
            "rule expression changed",
            |s| rule(s, "has-lines").expression = "size(record.lineItems) > 1".into(),
            ChangeKind::RuleExpressionChanged,
            Effect::Both,
        ),
        (
            "warn rule expression changed",
            |s| rule(s, "large-deal-notice").expression = "record.amount < 100".into(),
            ChangeKind::RuleExpressionChanged,
            Effect::None,
        ),
        (
            "reject rule relaxed to warn",
            |s| rule(s, "known-sku").action = RuleAction::Warn,
            ChangeKind::RuleActionChanged,
            Effect::Widens,
        ),
        (
            "warn rule made a reject rule",
            |s| rule(s, "large-deal-notice").action = RuleAction::Reject,
            ChangeKind::RuleActionChanged,
            Effect::Narrows,
        ),
        (
            "approver role changed",
            |s| rule(s, "discount-approval").approver_role = Some("cfo".into()),
            ChangeKind::ApproverRoleChanged,
            Effect::None,
        ),
        (
            "rule message edited",
            |s| rule(s, "has-lines").message = "Add a line.".into(),
            ChangeKind::RuleMessageChanged,
            Effect::None,
        ),
        (
            "mapping target added",
            |s| {
                s.mapping.fields.push(MappingField {
                    target: "department".into(),
                    expression: "'sales'".into(),
                    optional: false,
                })
            },
            ChangeKind::MappingTargetAdded,
            Effect::None,
        ),
        (
            "mapping target removed",
            |s| s.mapping.fields.retain(|f| f.target != "memo"),
            ChangeKind::MappingTargetRemoved,
            Effect::Both,
        ),
        (
            "mapping expression changed",
            |s| s.mapping.fields[3].expression = "record.accountName".into(),
            ChangeKind::MappingExpressionChanged,
            Effect::Both,
        ),
        (
            "mapping target made optional",
            |s| s.mapping.fields[3].optional = true,
            ChangeKind::MappingOptionalChanged,
            Effect::Widens,
        ),
        (
            "external id changed",
            |s| s.mapping.external_id = "record.id".into(),
            ChangeKind::ExternalIdChanged,
            Effect::Both,
        ),
        (
            "lookup added",
            |s| {
                let mut extra = s.lookups[0].clone();
                extra.name = "customers".into();
                s.lookups.push(extra);
            },
            ChangeKind::LookupAdded,
            Effect::None,
        ),
        (
            "lookup fields changed",
            |s| s.lookups[0].fields.pop().map(|_| ()).unwrap(),
            ChangeKind::LookupChanged,
            Effect::None,
        ),
        (
            "source entity changed",
            |s| s.source.entity = "Quote".into(),
            ChangeKind::SourceChanged,
            Effect::Both,
        ),
        (
            "target entity changed",
            |s| s.target.entity = "invoice".into(),
            ChangeKind::TargetChanged,
            Effect::Both,
        ),
        (
            "service level changed",
            |s| s.sla = None,
            ChangeKind::SlaChanged,
            Effect::None,
        ),
    ];
    for (name, edit, kind, effect) in cases {
        let old = base();
        let mut new = base();
        edit(&mut new);
        for mode in [
            CompatibilityMode::Backward,
            CompatibilityMode::Forward,
            CompatibilityMode::Full,
            CompatibilityMode::None,
        ] {
            let (mut old, mut new) = (old.clone(), new.clone());
            old.compatibility = mode;
            new.compatibility = mode;
            let report = diff(&old, &new);
            let change = report
                .changes
                .iter()
                .find(|c| c.kind == kind)
                .unwrap_or_else(|| panic!("{name}: no {kind:?} in {:?}", report.changes));
            assert_eq!(change.effect, effect, "{name}");
            let breaking = match mode {
                CompatibilityMode::Backward => matches!(effect, Effect::Narrows | Effect::Both),
                CompatibilityMode::Forward => matches!(effect, Effect::Widens | Effect::Both),
                CompatibilityMode::Full => effect != Effect::None,
                CompatibilityMode::None => false,
            };
            assert_eq!(change.breaking, breaking, "{name} under {mode:?}");
        }
    }
}

#[test]
fn a_change_of_array_element_type_is_classified_like_a_field_type_change() {
    let mut old = base();
    old.fields.push(FieldSpec {
        items: Some(FieldType::Integer),
        ..new_field("tags", FieldType::Array, false)
    });
    let mut new = old.clone();
    field(&mut new, "tags").items = Some(FieldType::Decimal);
    let report = diff(&old, &new);
    assert_eq!(report.changes[0].kind, ChangeKind::TypeWidened);
    assert_eq!(report.changes[0].path, "spec.fields[tags].items");
    field(&mut new, "tags").items = Some(FieldType::Boolean);
    assert_eq!(diff(&old, &new).changes[0].kind, ChangeKind::TypeChanged);
}

fn with_version(mut spec: SyncContractSpec, version: &str) -> SyncContractSpec {
    spec.version = version.into();
    spec
}

fn add_reject_rule(spec: &mut SyncContractSpec) {
    spec.rules.push(RuleSpec {
        name: "usd-only".into(),
        expression: "record.currencyIsoCode == 'USD'".into(),
        message: "USD only".into(),
        action: RuleAction::Reject,
        approver_role: None,
    });
}

#[test]
fn breaking_change_without_major_bump_is_rejected() {
    let mut new = with_version(base(), "1.3.0");
    add_reject_rule(&mut new);
    let report = diff(&base(), &new);
    assert!(report.is_breaking());
    assert!(!report.is_allowed());
    assert_eq!(report.required_bump, Bump::Major);
    assert_eq!(
        report.problems[0].label(),
        "breaking_change_without_major_bump"
    );
    assert_eq!(report.verdict(), "breaking");
}

#[test]
fn breaking_change_with_a_major_bump_is_allowed() {
    let mut new = with_version(base(), "2.0.0");
    add_reject_rule(&mut new);
    let report = diff(&base(), &new);
    assert!(
        report.is_breaking() && report.is_allowed(),
        "{:?}",
        report.problems
    );
    assert_eq!(report.actual_bump, Bump::Major);
}

#[test]
fn schema_change_without_minor_bump_is_rejected() {
    let mut new = with_version(base(), "1.2.1");
    new.fields
        .push(new_field("region", FieldType::String, false));
    let report = diff(&base(), &new);
    assert!(!report.is_breaking());
    assert_eq!(report.required_bump, Bump::Minor);
    assert_eq!(
        report.problems[0].label(),
        "schema_change_without_minor_bump"
    );
    let report = diff(&base(), &with_version(new, "1.3.0"));
    assert!(report.is_allowed());
}

#[test]
fn a_documentation_change_needs_only_a_patch_version() {
    let mut new = with_version(base(), "1.2.1");
    field(&mut new, "id").description = Some("The Opportunity Id.".into());
    rule(&mut new, "has-lines").message = "Add a line item.".into();
    let report = diff(&base(), &new);
    assert_eq!(report.required_bump, Bump::Patch);
    assert!(report.is_allowed(), "{:?}", report.problems);
}

#[test]
fn content_changed_without_version_change_is_rejected() {
    let mut new = base();
    field(&mut new, "id").description = Some("edited".into());
    let report = diff(&base(), &new);
    assert_ne!(report.old_hash, report.new_hash);
    assert_eq!(
        report.problems[0].label(),
        "content_changed_without_version_change"
    );
    // Reordering declarations is a content change too.
    let mut reordered = base();
    reordered.fields.swap(0, 1);
    let report = diff(&base(), &reordered);
    assert_eq!(report.changes[0].kind, ChangeKind::OtherContentChanged);
    assert_eq!(
        report.problems[0].label(),
        "content_changed_without_version_change"
    );
}

#[test]
fn a_version_that_goes_backwards_is_rejected() {
    let report = diff(&base(), &with_version(base(), "1.1.9"));
    assert_eq!(report.problems[0].label(), "version_not_increased");
}

#[test]
fn an_unchanged_contract_is_unchanged() {
    let report = diff(&base(), &base());
    assert!(report.changes.is_empty() && report.is_allowed());
    assert_eq!(report.verdict(), "unchanged");
    assert_eq!(report.required_bump, Bump::None);
}

#[test]
fn relaxing_the_mode_does_not_let_a_breaking_change_through_in_the_same_version() {
    let mut new = with_version(base(), "1.3.0");
    new.compatibility = CompatibilityMode::None;
    add_reject_rule(&mut new);
    let report = diff(&base(), &new);
    assert_eq!(report.mode, CompatibilityMode::Backward);
    assert!(!report.is_allowed());
    assert!(
        report
            .changes
            .iter()
            .any(|c| c.kind == ChangeKind::CompatibilityModeChanged)
    );
}

#[test]
fn the_content_hash_ignores_sign_offs_and_formatting_but_not_content() {
    let spec = base();
    let hash = content_hash(&spec);
    let mut signed = spec.clone();
    signed.sign_offs.push(SignOff {
        role: Some(meshline::api::OwnerRole::SyncOwner),
        content_hash: None,
        owner: "dana".into(),
        version: "1.2.0".into(),
        approved_at: None,
    });
    assert_eq!(content_hash(&signed), hash);
    let reformatted = EXAMPLE
        .replace("  fields:\n", "  fields:  # the schema\n")
        .replace("required: true", "required:   true");
    assert_eq!(
        content_hash(&parse_manifest(&reformatted).unwrap().spec),
        hash
    );
    let mut edited = spec;
    edited.fields[0].max_length = Some(18);
    assert_ne!(content_hash(&edited), hash);
    assert!(hash.as_str().starts_with("sha256:") && hash.as_str().len() == 71);
}

#[test]
fn whitespace_in_an_expression_is_not_a_change() {
    let mut new = base();
    rule(&mut new, "has-lines").expression = "size( record.lineItems )   >   0".into();
    let report = diff(&base(), &with_version(new, "1.2.1"));
    assert!(
        report
            .changes
            .iter()
            .all(|c| c.kind != ChangeKind::RuleExpressionChanged),
        "{:?}",
        report.changes
    );
}

#[test]
fn declaring_ordering_needs_a_minor_bump_and_moving_it_a_major_one() {
    use meshline::api::OrderingSpec;
    // The example orders by systemModstamp; without it is the "before".
    let mut unordered = base();
    unordered.ordering = None;
    let report = diff(&unordered, &with_version(base(), "1.3.0"));
    assert_eq!(report.changes.len(), 1, "{:?}", report.changes);
    assert_eq!(report.changes[0].kind, ChangeKind::OrderingChanged);
    assert_eq!(report.changes[0].path, "spec.ordering.field");
    assert!(!report.is_breaking());
    assert_eq!(report.required_bump, Bump::Minor);

    // Ordering by another field compares stored values of the old field with the new one's: breaking.
    let mut moved = with_version(base(), "1.3.0");
    moved
        .fields
        .push(new_field("lastModifiedDate", FieldType::Datetime, true));
    moved.ordering = Some(OrderingSpec {
        field: "lastModifiedDate".into(),
    });
    let report = diff(&base(), &moved);
    let change = report
        .changes
        .iter()
        .find(|c| c.kind == ChangeKind::OrderingChanged)
        .expect("an ordering change");
    assert!(change.breaking, "{change:?}");
    assert_eq!(report.required_bump, Bump::Major);
}
