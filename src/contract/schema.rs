//! The field schema of a contract: compiled once from `spec.fields`, then used to validate each record and to
//! turn it into the typed CEL value the rules and the mapping read.
//!
//! Validation reports every violation of a record at once (up to a limit), each with the record's JSON path,
//! the rule broken and the offending value, redacted when the field is personal data. Fields the contract does
//! not declare are allowed and ignored (an open content model, as CRMs add fields all the time); they are not
//! part of the CEL value either, so no expression can depend on an undeclared field.

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Arc;

use kube::core::cel::cel::objects::{Key, Value};
use regex::Regex;
use rust_decimal::Decimal;

use super::cel_env::{DecimalError, Fields, Struct, as_struct, decimal_value, parse_decimal};
use super::outcome::{Reason, ReasonCode, Subject};
use super::record::{
    Json, KeySet, ParseError, Scanner, Skipped, member_segment, prefix_path, trim_path,
};
use super::redact::{Redaction, redact};
use super::{CompileError, CompileErrorKind};
use crate::api::{FieldSpec, FieldType};

/// Longest value text quoted in a violation; longer values are cut, so a reason stays readable and small.
const MAX_QUOTED_VALUE: usize = 80;
/// Compiled patterns are bounded too, so a contract cannot make a worker compile a gigantic automaton.
const MAX_REGEX_SIZE: usize = 1 << 20;

/// The compiled field schema.
#[derive(Debug)]
pub(crate) struct Schema {
    pub(crate) root: ObjectSchema,
    pub(crate) has_personal: bool,
    /// How many fields are read as JSON only (see [`Field::json_slot`]).
    pub(crate) json_slots: usize,
}

/// The declared members of one object: the record itself, an object field, or the elements of an array of
/// objects.
#[derive(Debug, Default)]
pub(crate) struct ObjectSchema {
    pub(crate) fields: Vec<Field>,
    /// The member names, shared by every value built for this object.
    pub(crate) keys: Arc<[Key]>,
    index: HashMap<String, usize>,
}

impl ObjectSchema {
    pub(crate) fn get(&self, name: &str) -> Option<&Field> {
        self.position(name).map(|i| &self.fields[i])
    }

    pub(crate) fn position(&self, name: &str) -> Option<usize> {
        // Linear search beats hashing for the handful of members most objects have.
        if self.fields.len() <= 16 {
            self.fields.iter().position(|f| f.name == name)
        } else {
            self.index.get(name).copied()
        }
    }

    pub(crate) fn names(&self) -> String {
        self.fields
            .iter()
            .map(|f| f.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One declared field.
#[derive(Debug)]
pub(crate) struct Field {
    /// The member name in its object (`sku`).
    pub(crate) name: String,
    /// The same name as a CEL map key, allocated once.
    pub(crate) key: Key,
    /// Position in its object: the slot of its value.
    pub(crate) index: usize,
    /// The schema path (`lineItems[].sku`).
    pub(crate) path: String,
    pub(crate) ty: FieldType,
    pub(crate) items: Option<FieldType>,
    pub(crate) required: bool,
    pub(crate) enum_values: Vec<String>,
    pub(crate) pattern: Option<Regex>,
    pub(crate) minimum: Option<Decimal>,
    pub(crate) maximum: Option<Decimal>,
    pub(crate) max_length: Option<u32>,
    pub(crate) pii: bool,
    /// This field or one nested in it is personal data.
    pub(crate) holds_personal: bool,
    /// Some expression reads this field (or a value that contains it), so records carry its CEL value.
    pub(crate) needed: bool,
    /// Only a plain mapping copy (`target: record.x`) reads this scalar field: the reader writes its JSON
    /// straight into this slot of the record's JSON side values, and no CEL value is built.
    pub(crate) json_slot: Option<usize>,
    /// Members of an object field, or of each element of an array of objects.
    pub(crate) children: Option<ObjectSchema>,
}

/// A field name split into segments: `lineItems[].sku` is `[("lineItems", true), ("sku", false)]`.
fn parse_name(name: &str) -> Option<Vec<(&str, bool)>> {
    let mut segments = Vec::new();
    for segment in name.split('.') {
        let (ident, array) = match segment.strip_suffix("[]") {
            Some(ident) => (ident, true),
            None => (segment, false),
        };
        let mut chars = ident.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return None;
        }
        segments.push((ident, array));
    }
    Some(segments)
}

pub(crate) fn compile(specs: &[FieldSpec], errors: &mut Vec<CompileError>) -> Schema {
    let at = |i: usize, attr: &str| format!("spec.fields[{i}].{attr}");
    let mut parsed: Vec<Option<(String, String)>> = Vec::with_capacity(specs.len()); // (parent, member)
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, spec) in specs.iter().enumerate() {
        let Some(segments) = parse_name(&spec.name) else {
            errors.push(CompileError::new(
                at(i, "name"),
                CompileErrorKind::InvalidFieldName,
                format!("{:?} is not a field path (use `amount`, `billingAddress.city` or `lineItems[].sku`)", spec.name),
            ));
            parsed.push(None);
            continue;
        };
        if let Some(first) = seen.insert(&spec.name, i) {
            errors.push(CompileError::new(
                at(i, "name"),
                CompileErrorKind::DuplicateField,
                format!(
                    "field {:?} is declared twice (first at spec.fields[{first}])",
                    spec.name
                ),
            ));
            parsed.push(None);
            continue;
        }
        let (last, last_array) = segments[segments.len() - 1];
        if last_array {
            errors.push(CompileError::new(
                at(i, "name"),
                CompileErrorKind::InvalidFieldName,
                format!(
                    "{:?} ends in `[]`; declare the array field itself (`{last}`) with `items`",
                    spec.name
                ),
            ));
            parsed.push(None);
            continue;
        }
        let parent = spec.name[..spec.name.len() - last.len()]
            .trim_end_matches('.')
            .to_string();
        parsed.push(Some((parent, last.to_string())));
        check_options(i, spec, errors);
    }

    // Every parent path must be a declared object, or the elements of a declared array of objects.
    let by_name: HashMap<&str, &FieldSpec> = specs.iter().map(|s| (s.name.as_str(), s)).collect();
    for (i, entry) in parsed.iter_mut().enumerate() {
        let Some((parent, _)) = entry else { continue };
        if parent.is_empty() {
            continue;
        }
        let problem = match parent.strip_suffix("[]") {
            Some(array) => match by_name.get(array) {
                Some(s) if s.r#type == FieldType::Array && s.items == Some(FieldType::Object) => {
                    None
                }
                Some(_) => Some(format!(
                    "`{array}` must be an array with `items: object` to have members"
                )),
                None => Some(format!(
                    "`{array}` is not declared (declare it as an array with `items: object`)"
                )),
            },
            None => match by_name.get(parent.as_str()) {
                Some(s) if s.r#type == FieldType::Object => None,
                Some(s) => Some(format!(
                    "`{parent}` is {}, not an object",
                    article(s.r#type)
                )),
                None => Some(format!(
                    "`{parent}` is not declared (declare it with `type: object`)"
                )),
            },
        };
        if let Some(problem) = problem {
            errors.push(CompileError::new(
                at(i, "name"),
                CompileErrorKind::UndeclaredParent,
                problem,
            ));
            *entry = None;
        }
    }

    let mut root = build_object("", specs, &parsed);
    let has_personal = mark_personal(&mut root);
    Schema {
        root,
        has_personal,
        json_slots: 0,
    }
}

fn article(ty: FieldType) -> String {
    match ty {
        FieldType::Integer | FieldType::Enum | FieldType::Object | FieldType::Array => {
            format!("an {}", ty.as_str())
        }
        _ => format!("a {}", ty.as_str()),
    }
}

fn build_object(
    prefix: &str,
    specs: &[FieldSpec],
    parsed: &[Option<(String, String)>],
) -> ObjectSchema {
    let mut object = ObjectSchema::default();
    for (spec, entry) in specs.iter().zip(parsed) {
        let Some((parent, member)) = entry else {
            continue;
        };
        if parent != prefix {
            continue;
        }
        let children = match (spec.r#type, spec.items) {
            (FieldType::Object, _) => Some(build_object(&spec.name, specs, parsed)),
            (FieldType::Array, Some(FieldType::Object)) => {
                Some(build_object(&format!("{}[]", spec.name), specs, parsed))
            }
            _ => None,
        };
        let pattern = spec.pattern.as_deref().and_then(|p| {
            regex::RegexBuilder::new(p)
                .size_limit(MAX_REGEX_SIZE)
                .build()
                .ok()
        });
        object.index.insert(member.clone(), object.fields.len());
        object.fields.push(Field {
            key: Key::String(Arc::new(member.clone())),
            index: object.fields.len(),
            name: member.clone(),
            path: spec.name.clone(),
            ty: spec.r#type,
            items: spec.items,
            required: spec.required,
            enum_values: spec.enum_values.clone().unwrap_or_default(),
            pattern,
            minimum: spec.minimum.as_deref().and_then(|m| parse_decimal(m).ok()),
            maximum: spec.maximum.as_deref().and_then(|m| parse_decimal(m).ok()),
            max_length: spec.max_length,
            pii: spec.pii,
            holds_personal: false,
            needed: false,
            json_slot: None,
            children,
        });
    }
    object.keys = object.fields.iter().map(|f| f.key.clone()).collect();
    object
}

impl Schema {
    /// Records which fields the contract's expressions read (by schema path); the containers of a read field
    /// are read too.
    pub(crate) fn mark_needed(&mut self, paths: &std::collections::HashSet<&str>) {
        fn mark(object: &mut ObjectSchema, paths: &std::collections::HashSet<&str>) -> bool {
            let mut any = false;
            for field in &mut object.fields {
                let nested = field.children.as_mut().is_some_and(|c| mark(c, paths));
                field.needed = nested || paths.contains(field.path.as_str());
                any |= field.needed;
            }
            any
        }
        mark(&mut self.root, paths);
    }

    /// Gives the scalar field at `path` (a dot path through objects) JSON slot `slot`. `false` if there is no
    /// such scalar field or expressions read it as a CEL value.
    pub(crate) fn assign_json_slot(&mut self, path: &str, slot: usize) -> bool {
        let mut object = &mut self.root;
        let mut segments = path.split('.').peekable();
        while let Some(segment) = segments.next() {
            let Some(i) = object.position(segment) else {
                return false;
            };
            let field = &mut object.fields[i];
            if segments.peek().is_none() {
                if field.needed || field.children.is_some() || field.ty == FieldType::Array {
                    return false;
                }
                field.json_slot = Some(slot);
                return true;
            }
            match &mut field.children {
                Some(children) if field.ty == FieldType::Object => object = children,
                _ => return false,
            }
        }
        false
    }
}

fn mark_personal(object: &mut ObjectSchema) -> bool {
    let mut any = false;
    for field in &mut object.fields {
        let nested = field.children.as_mut().is_some_and(mark_personal);
        field.holds_personal = field.pii || nested;
        any |= field.holds_personal;
    }
    any
}

/// The per-field rules the API server also enforces, checked again because `meshline validate` and the
/// controller can see specs that never went through an API server.
fn check_options(i: usize, spec: &FieldSpec, errors: &mut Vec<CompileError>) {
    use CompileErrorKind::{BadBound, BadPattern, InvalidFieldOption};
    let ty = spec.r#type;
    let mut found: Vec<(String, CompileErrorKind, String)> = Vec::new();
    match (ty, &spec.enum_values) {
        (FieldType::Enum, None) => found.push((
            "enumValues".into(),
            InvalidFieldOption,
            "an enum field needs enumValues".into(),
        )),
        (FieldType::Enum, Some(values)) if values.is_empty() => found.push((
            "enumValues".into(),
            InvalidFieldOption,
            "enumValues must not be empty".into(),
        )),
        (FieldType::Enum, Some(values)) => {
            for (j, v) in values.iter().enumerate() {
                if values[..j].contains(v) {
                    found.push((
                        format!("enumValues[{j}]"),
                        InvalidFieldOption,
                        format!("{v:?} is listed twice"),
                    ));
                }
            }
        }
        (_, Some(_)) => found.push((
            "enumValues".into(),
            InvalidFieldOption,
            format!("enumValues applies to enum fields, not {}", article(ty)),
        )),
        _ => {}
    }
    match (ty, spec.items) {
        (FieldType::Array, None) => found.push(("items".into(), InvalidFieldOption, "an array field needs items (its element type)".into())),
        (FieldType::Array, Some(items @ (FieldType::Array | FieldType::Enum))) => found.push((
            "items".into(),
            InvalidFieldOption,
            format!("items: {} is not supported; use string, integer, decimal, boolean, date, datetime or object", items.as_str()),
        )),
        (FieldType::Array, Some(_)) => {}
        (_, Some(_)) => found.push(("items".into(), InvalidFieldOption, format!("items applies to array fields, not {}", article(ty)))),
        _ => {}
    }
    if let Some(pattern) = &spec.pattern {
        if ty != FieldType::String {
            found.push((
                "pattern".into(),
                InvalidFieldOption,
                format!("pattern applies to string fields, not {}", article(ty)),
            ));
        } else if let Err(e) = regex::RegexBuilder::new(pattern)
            .size_limit(MAX_REGEX_SIZE)
            .build()
        {
            found.push((
                "pattern".into(),
                BadPattern,
                format!("bad pattern: {}", first_line(&e.to_string())),
            ));
        }
    }
    if spec.max_length.is_some() && !matches!(ty, FieldType::String | FieldType::Array) {
        found.push((
            "maxLength".into(),
            InvalidFieldOption,
            format!(
                "maxLength applies to string and array fields, not {}",
                article(ty)
            ),
        ));
    }
    let mut bounds = [None, None];
    for (slot, (attr, value)) in [("minimum", &spec.minimum), ("maximum", &spec.maximum)]
        .into_iter()
        .enumerate()
    {
        let Some(value) = value else { continue };
        if !matches!(ty, FieldType::Integer | FieldType::Decimal) {
            found.push((
                attr.into(),
                InvalidFieldOption,
                format!(
                    "{attr} applies to integer and decimal fields, not {}",
                    article(ty)
                ),
            ));
            continue;
        }
        match parse_decimal(value) {
            Ok(d) if !value.contains(['e', 'E']) => bounds[slot] = Some(d),
            _ => found.push((
                attr.into(),
                BadBound,
                format!("{value:?} is not a decimal like \"0\" or \"0.01\""),
            )),
        }
    }
    if let [Some(min), Some(max)] = bounds
        && min > max
    {
        found.push((
            "minimum".into(),
            BadBound,
            format!("minimum {min} is greater than maximum {max}"),
        ));
    }
    errors.extend(found.into_iter().map(|(attr, kind, reason)| {
        CompileError::new(format!("spec.fields[{i}].{attr}"), kind, reason)
    }));
}

fn first_line(s: &str) -> String {
    s.lines()
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or(s)
        .trim()
        .to_string()
}

/// The state of validating one record.
///
/// The record is validated as it is read: the reader follows the schema through the bytes and builds the CEL
/// value of the declared fields directly, skipping (but still checking) everything undeclared, so a record is
/// never held twice in memory.
pub(crate) struct Validator<'c> {
    pub(crate) redaction: &'c Redaction,
    pub(crate) max_violations: usize,
    pub(crate) violations: Vec<Reason>,
    /// Violations past `max_violations`, counted but not kept.
    pub(crate) dropped: usize,
    /// The longest array in the record, which bounds the cost of every comprehension.
    pub(crate) max_list_len: usize,
    /// The JSON of fields that only plain mapping copies read, by their slot.
    pub(crate) json: Vec<Option<serde_json::Value>>,
    path: String,
}

thread_local! {
    /// The path buffer of the last validation on this thread, kept so a record does not allocate its own.
    static PATH_BUFFER: Cell<String> = const { Cell::new(String::new()) };
}

impl Drop for Validator<'_> {
    fn drop(&mut self) {
        let mut path = std::mem::take(&mut self.path);
        path.clear();
        PATH_BUFFER.with(|buffer| buffer.set(path));
    }
}

/// What a violation shows as the offending value.
enum Offending<'t> {
    Text(&'t str),
    Described(String),
}

/// The outcome of reading one declared value.
enum Read {
    Value(Value),
    Null,
    /// A violation was recorded.
    Invalid,
}

impl<'c> Validator<'c> {
    pub(crate) fn new(redaction: &'c Redaction, max_violations: usize) -> Self {
        Validator {
            redaction,
            max_violations,
            violations: Vec::new(),
            dropped: 0,
            max_list_len: 0,
            json: Vec::new(),
            path: PATH_BUFFER.with(Cell::take),
        }
    }

    /// Reads and validates a record and builds its CEL value (declared fields only). A record that cannot be
    /// read at all (size, encoding, syntax, depth, duplicate keys, not an object) is an error; violations of
    /// the schema are collected.
    pub(crate) fn read(
        &mut self,
        schema: &Schema,
        bytes: &[u8],
        max_bytes: usize,
        max_depth: usize,
    ) -> Result<Value, ParseError> {
        let mut scanner = Scanner::new(bytes, max_bytes, max_depth)?;
        if schema.json_slots > 0 {
            self.json = vec![None; schema.json_slots];
        }
        scanner.skip_ws();
        if scanner.peek() != Some(b'{') {
            let skipped = scanner.skip_value(0).map_err(trim_path)?;
            scanner.finish()?;
            return Err(ParseError::NotAnObject {
                found: skipped.type_name(),
            });
        }
        let value = self
            .object(&schema.root, &mut scanner, 1)
            .map_err(trim_path)?;
        scanner.finish()?;
        Ok(value)
    }

    /// Adds the collected violations' summary, if some were dropped.
    pub(crate) fn finish(mut self) -> Vec<Reason> {
        if self.dropped > 0 {
            self.violations.push(Reason::new(
                ReasonCode::TooManyViolations,
                Subject::Record,
                format!("{} more violations were not listed", self.dropped),
            ));
        }
        std::mem::take(&mut self.violations)
    }

    fn count(&self) -> usize {
        self.violations.len() + self.dropped
    }

    fn violation(
        &mut self,
        code: ReasonCode,
        field: &Field,
        message: String,
        value: Option<Offending<'_>>,
    ) {
        if self.violations.len() >= self.max_violations {
            self.dropped += 1;
            return;
        }
        let value = value.map(|v| match v {
            Offending::Text(text) if field.pii => redact(text, self.redaction),
            Offending::Text(text) => quote(text),
            Offending::Described(description) => description,
        });
        self.violations
            .push(Reason::new(code, Subject::Field(self.path.clone()), message).with_value(value));
    }

    /// A skipped value's error, with the path of the member it was found under.
    fn under<'k>(&'k self, name: &'k str) -> impl FnOnce(ParseError) -> ParseError + 'k {
        move |e| prefix_path(e, &format!("{}{}", self.path, member_segment(name)))
    }

    fn object(
        &mut self,
        schema: &ObjectSchema,
        sc: &mut Scanner<'_>,
        depth: usize,
    ) -> Result<Value, ParseError> {
        sc.enter(depth)?;
        sc.eat(b'{');
        let mut fields = Fields::new(schema.fields.len());
        // Declared members seen (for duplicates) and present with a value (for required-field checks); a bad
        // value counts as present, so it is not also reported as missing.
        let mut seen = [0u64; 4];
        let mut present = [0u64; 4];
        let mut undeclared = KeySet::default();
        let mut hint = 0;
        if !sc.eat(b'}') {
            loop {
                let expected = schema.fields.get(hint).and_then(|f| sc.key_if(&f.name));
                let (key, position) = match expected {
                    Some(key) => (Cow::Borrowed(key), Some(hint)),
                    None => {
                        let key = sc.key()?;
                        let position = schema.position(&key);
                        (key, position)
                    }
                };
                if let Some(i) = position {
                    hint = i + 1;
                }
                match position {
                    Some(i) if i < 256 => {
                        let bit = 1u64 << (i % 64);
                        if seen[i / 64] & bit != 0 {
                            return Err(ParseError::DuplicateKey {
                                path: self.path.clone(),
                                key: key.into_owned(),
                            });
                        }
                        seen[i / 64] |= bit;
                        let field = &schema.fields[i];
                        let len = self.path.len();
                        push_member(&mut self.path, &key);
                        match self.value(field, field.ty, sc, depth)? {
                            Read::Value(v) => {
                                if field.needed {
                                    fields[i] = Some(v);
                                }
                                present[i / 64] |= bit;
                            }
                            Read::Invalid => present[i / 64] |= bit,
                            // null is how CRMs say "no value": the same as an absent field.
                            Read::Null => {}
                        }
                        self.path.truncate(len);
                    }
                    _ => {
                        sc.skip_value(depth).map_err(self.under(&key))?;
                        if let Some(key) = undeclared.insert(key) {
                            return Err(ParseError::DuplicateKey {
                                path: self.path.clone(),
                                key,
                            });
                        }
                    }
                }
                if !sc.next_item(b'}')? {
                    break;
                }
            }
        }
        for (i, field) in schema.fields.iter().enumerate() {
            if field.required && i < 256 && present[i / 64] & (1 << (i % 64)) == 0 {
                let len = self.path.len();
                push_member(&mut self.path, &field.name);
                self.violation(
                    ReasonCode::MissingField,
                    field,
                    format!("required {} field is missing", field.ty.as_str()),
                    None,
                );
                self.path.truncate(len);
            }
        }
        Ok(Value::Opaque(Arc::new(Struct {
            keys: schema.keys.clone(),
            fields,
        })))
    }

    /// Reads one value of a declared field (or, with `ty` its element type, one element of an array field).
    fn value(
        &mut self,
        field: &Field,
        ty: FieldType,
        sc: &mut Scanner<'_>,
        depth: usize,
    ) -> Result<Read, ParseError> {
        Ok(match sc.peek() {
            Some(b'n') => {
                sc.literal("null")?;
                Read::Null
            }
            Some(b'"') => {
                let s = sc.string()?;
                self.read_string(field, ty, s)
            }
            Some(b'-' | b'0'..=b'9') => {
                let n = sc.number()?;
                self.read_number(field, ty, n)
            }
            Some(b't' | b'f') => {
                let b = sc.peek() == Some(b't');
                sc.literal(if b { "true" } else { "false" })?;
                if ty == FieldType::Boolean {
                    self.keep_json(field, || serde_json::Value::Bool(b));
                    Read::Value(Value::Bool(b))
                } else {
                    self.wrong_type(
                        field,
                        ty,
                        "boolean",
                        Some(Offending::Text(if b { "true" } else { "false" })),
                    )
                }
            }
            Some(b'{') if ty == FieldType::Object => {
                let before = self.count();
                let value = match &field.children {
                    Some(children) => self.object(children, sc, depth + 1)?,
                    None => {
                        sc.skip_value(depth)
                            .map_err(|e| prefix_path(e, &self.path))?;
                        Value::Opaque(Arc::new(Struct {
                            keys: Arc::from([]),
                            fields: Fields::new(0),
                        }))
                    }
                };
                if self.count() == before {
                    Read::Value(value)
                } else {
                    Read::Invalid
                }
            }
            Some(b'[') if ty == FieldType::Array => self.array(field, sc, depth + 1)?,
            Some(b'{' | b'[') => {
                let skipped = sc
                    .skip_value(depth)
                    .map_err(|e| prefix_path(e, &self.path))?;
                let description = match skipped {
                    Skipped::Array(n) => format!("[{n} elements]"),
                    Skipped::Object(n) => format!("{{{n} members}}"),
                    _ => String::new(),
                };
                self.wrong_type(
                    field,
                    ty,
                    skipped.type_name(),
                    Some(Offending::Described(description)),
                )
            }
            _ => return Err(sc.syntax("expected a value")),
        })
    }

    fn array(
        &mut self,
        field: &Field,
        sc: &mut Scanner<'_>,
        depth: usize,
    ) -> Result<Read, ParseError> {
        sc.enter(depth)?;
        sc.eat(b'[');
        let element = field.items.unwrap_or(FieldType::String);
        let max = field.max_length.map_or(usize::MAX, |m| m as usize);
        // Most arrays are short; one allocation covers them.
        let mut values = if field.needed {
            Vec::with_capacity(8)
        } else {
            Vec::new()
        };
        let mut ok = true;
        let mut n = 0usize;
        if !sc.eat(b']') {
            loop {
                sc.skip_ws();
                if n >= max {
                    // Too long: the rest is only checked and counted, never built.
                    sc.skip_value(depth)
                        .map_err(|e| prefix_path(e, &format!("{}[{n}]", self.path)))?;
                } else {
                    let len = self.path.len();
                    push_index(&mut self.path, n);
                    match self.value(field, element, sc, depth)? {
                        Read::Value(v) if field.needed => values.push(v),
                        Read::Value(_) => {}
                        Read::Null => {
                            self.wrong_type(field, element, "null", None);
                            ok = false;
                        }
                        Read::Invalid => ok = false,
                    }
                    self.path.truncate(len);
                }
                n += 1;
                if !sc.next_item(b']')? {
                    break;
                }
            }
        }
        self.max_list_len = self.max_list_len.max(n);
        if n > max {
            self.violation(
                ReasonCode::TooLong,
                field,
                format!("has {n} elements, more than the maximum of {max}"),
                None,
            );
            return Ok(Read::Invalid);
        }
        Ok(match (ok, field.needed) {
            (true, true) => Read::Value(Value::List(Arc::new(values))),
            (true, false) => Read::Value(Value::Null),
            (false, _) => Read::Invalid,
        })
    }

    fn read_string(&mut self, field: &Field, ty: FieldType, s: Cow<'_, str>) -> Read {
        match ty {
            FieldType::String => {
                if let Some(max) = field.max_length
                    && s.len() > max as usize
                    && s.chars().count() > max as usize
                {
                    let message = format!("is longer than the maximum of {max} characters");
                    self.violation(
                        ReasonCode::TooLong,
                        field,
                        message,
                        Some(Offending::Text(&s)),
                    );
                    return Read::Invalid;
                }
                if let Some(pattern) = &field.pattern
                    && !pattern.is_match(&s)
                {
                    let message = format!("does not match the pattern {}", pattern.as_str());
                    self.violation(
                        ReasonCode::PatternMismatch,
                        field,
                        message,
                        Some(Offending::Text(&s)),
                    );
                    return Read::Invalid;
                }
                Read::Value(self.string_value(field, s))
            }
            FieldType::Enum => {
                if field.enum_values.iter().any(|v| *v == *s) {
                    Read::Value(self.string_value(field, s))
                } else {
                    let message = format!("is not one of: {}", field.enum_values.join(", "));
                    self.violation(
                        ReasonCode::NotInEnum,
                        field,
                        message,
                        Some(Offending::Text(&s)),
                    );
                    Read::Invalid
                }
            }
            FieldType::Date if is_rfc3339_date(&s) => Read::Value(self.string_value(field, s)),
            FieldType::Date => {
                let message = "is not an RFC 3339 date (YYYY-MM-DD)".to_string();
                self.violation(
                    ReasonCode::InvalidDate,
                    field,
                    message,
                    Some(Offending::Text(&s)),
                );
                Read::Invalid
            }
            FieldType::Datetime => match chrono::DateTime::parse_from_rfc3339(&s) {
                Ok(t) => {
                    self.keep_json(field, || {
                        serde_json::Value::String(
                            t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
                        )
                    });
                    Read::Value(Value::Timestamp(t))
                }
                Err(_) => {
                    let message = "is not an RFC 3339 date-time with offset (2026-11-27T10:00:00Z)"
                        .to_string();
                    self.violation(
                        ReasonCode::InvalidDatetime,
                        field,
                        message,
                        Some(Offending::Text(&s)),
                    );
                    Read::Invalid
                }
            },
            FieldType::Decimal => self.decimal(field, &s),
            _ => self.wrong_type(field, ty, "string", Some(Offending::Text(&s))),
        }
    }

    fn read_number(&mut self, field: &Field, ty: FieldType, text: &str) -> Read {
        match ty {
            FieldType::Integer => {
                let value = match text.parse::<i64>() {
                    Ok(i) => i,
                    Err(_) => match parse_decimal(text) {
                        Ok(d) if d.fract().is_zero() && i64::try_from(d).is_ok() => {
                            i64::try_from(d).unwrap_or_default()
                        }
                        Ok(d) if d.fract().is_zero() => {
                            return self.out_of_range(
                                field,
                                "is beyond the 64-bit integer range",
                                text,
                            );
                        }
                        Ok(_) => {
                            let message = "expected an integer, found a fraction".to_string();
                            self.violation(
                                ReasonCode::WrongType,
                                field,
                                message,
                                Some(Offending::Text(text)),
                            );
                            return Read::Invalid;
                        }
                        Err(_) => {
                            return self.out_of_range(
                                field,
                                "is beyond the 64-bit integer range",
                                text,
                            );
                        }
                    },
                };
                if self.bounds(field, Decimal::from(value), text) {
                    self.keep_json(field, || serde_json::Value::from(value));
                    Read::Value(Value::Int(value))
                } else {
                    Read::Invalid
                }
            }
            FieldType::Decimal => self.decimal(field, text),
            _ => self.wrong_type(field, ty, "number", Some(Offending::Text(text))),
        }
    }

    /// A validated string as a CEL value, allocated only when an expression reads it (or as JSON, when only a
    /// mapping copy does).
    fn string_value(&mut self, field: &Field, s: Cow<'_, str>) -> Value {
        if field.needed {
            Value::String(Arc::new(s.into_owned()))
        } else {
            self.keep_json(field, || serde_json::Value::String(s.into_owned()));
            Value::Null
        }
    }

    fn keep_json(&mut self, field: &Field, json: impl FnOnce() -> serde_json::Value) {
        if let Some(slot) = field.json_slot.and_then(|slot| self.json.get_mut(slot)) {
            *slot = Some(json());
        }
    }

    fn out_of_range(&mut self, field: &Field, message: &str, text: &str) -> Read {
        self.violation(
            ReasonCode::NumberOutOfRange,
            field,
            message.to_string(),
            Some(Offending::Text(text)),
        );
        Read::Invalid
    }

    fn wrong_type(
        &mut self,
        field: &Field,
        expected: FieldType,
        found: &str,
        value: Option<Offending<'_>>,
    ) -> Read {
        self.violation(
            ReasonCode::WrongType,
            field,
            format!("expected {}, found {found}", expected.as_str()),
            value,
        );
        Read::Invalid
    }

    fn decimal(&mut self, field: &Field, text: &str) -> Read {
        match parse_decimal(text) {
            Ok(d) if self.bounds(field, d, text) => {
                self.keep_json(field, || super::cel_env::decimal_to_json(d));
                Read::Value(if field.needed {
                    decimal_value(d)
                } else {
                    Value::Null
                })
            }
            Ok(_) => Read::Invalid,
            Err(DecimalError::Syntax) => {
                self.violation(
                    ReasonCode::InvalidDecimal,
                    field,
                    "is not a decimal number".into(),
                    Some(Offending::Text(text)),
                );
                Read::Invalid
            }
            Err(DecimalError::OutOfRange) => {
                self.out_of_range(field, &DecimalError::OutOfRange.to_string(), text)
            }
        }
    }

    fn bounds(&mut self, field: &Field, value: Decimal, text: &str) -> bool {
        if let Some(min) = field.minimum
            && value < min
        {
            self.violation(
                ReasonCode::BelowMinimum,
                field,
                format!("is below the minimum of {min}"),
                Some(Offending::Text(text)),
            );
            return false;
        }
        if let Some(max) = field.maximum
            && value > max
        {
            self.violation(
                ReasonCode::AboveMaximum,
                field,
                format!("is above the maximum of {max}"),
                Some(Offending::Text(text)),
            );
            return false;
        }
        true
    }
}

/// Appends `[n]` without the formatting machinery, which costs more than the rest of an element's path.
fn push_index(path: &mut String, n: usize) {
    path.push('[');
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    path.push_str(std::str::from_utf8(&digits[i..]).expect("ASCII digits"));
    path.push(']');
}

fn push_member(path: &mut String, name: &str) {
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(name);
}

fn is_rfc3339_date(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
        && chrono::NaiveDate::from_ymd_opt(
            s[0..4].parse().unwrap_or(0),
            s[5..7].parse().unwrap_or(0),
            s[8..10].parse().unwrap_or(0),
        )
        .is_some()
}

/// The text of a JSON value as a violation shows it.
pub(crate) fn json_text(json: &Json<'_>) -> String {
    match json {
        Json::String(s) => s.to_string(),
        Json::Number(n) => n.to_string(),
        Json::Bool(b) => b.to_string(),
        Json::Null => "null".into(),
        Json::Array(items) => format!("[{} elements]", items.len()),
        Json::Object(members) => format!("{{{} members}}", members.len()),
    }
}

fn quote(text: &str) -> String {
    if text.chars().count() <= MAX_QUOTED_VALUE {
        format!("{text:?}")
    } else {
        let cut: String = text.chars().take(MAX_QUOTED_VALUE).collect();
        format!("{cut:?}…")
    }
}

/// A record as snapshots keep it: declared fields only, personal fields redacted, numbers exact.
pub(crate) fn snapshot(
    schema: &ObjectSchema,
    members: &[(Cow<'_, str>, Json<'_>)],
    redaction: &Redaction,
) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for (name, json) in members {
        let Some(field) = schema.get(name) else {
            continue;
        };
        out.insert(name.to_string(), snapshot_field(field, json, redaction));
    }
    serde_json::Value::Object(out)
}

fn snapshot_field(field: &Field, json: &Json<'_>, redaction: &Redaction) -> serde_json::Value {
    if field.pii && !matches!(json, Json::Null) {
        return serde_json::Value::String(redact(&json_text(json), redaction));
    }
    match (json, &field.children) {
        (Json::Object(members), Some(children)) if field.ty == FieldType::Object => {
            snapshot(children, members, redaction)
        }
        (Json::Array(items), Some(children)) => serde_json::Value::Array(
            items
                .iter()
                .map(|item| match item {
                    Json::Object(members) => snapshot(children, members, redaction),
                    other => plain(other),
                })
                .collect(),
        ),
        (Json::Array(items), None) if field.ty == FieldType::Array => {
            serde_json::Value::Array(items.iter().map(plain).collect())
        }
        (other, _) => plain(other),
    }
}

/// A scalar as JSON; a structure where none is declared is described, since nothing says what it holds.
fn plain(json: &Json<'_>) -> serde_json::Value {
    match json {
        Json::Null => serde_json::Value::Null,
        Json::Bool(b) => serde_json::Value::Bool(*b),
        Json::String(s) => serde_json::Value::String(s.to_string()),
        Json::Number(n) => number_json(n),
        other => serde_json::Value::String(json_text(other)),
    }
}

pub(crate) fn number_json(text: &str) -> serde_json::Value {
    if let Ok(i) = text.parse::<i64>() {
        return serde_json::Value::from(i);
    }
    match parse_decimal(text) {
        Ok(d) => super::cel_env::decimal_to_json(d),
        Err(_) => serde_json::Value::String(text.to_string()),
    }
}

/// The personal values of a record read straight from its JSON (no validation), as text: what an ERP's or a
/// sink's error message might quote. The same fields as [`snapshot`] redacts, so both agree on what is personal.
pub(crate) fn personal_texts(
    schema: &ObjectSchema,
    members: &[(Cow<'_, str>, Json<'_>)],
    out: &mut Vec<String>,
) {
    for (name, json) in members {
        let Some(field) = schema.get(name) else {
            continue;
        };
        if field.pii {
            all_json_text(json, out);
            continue;
        }
        match (json, &field.children) {
            (Json::Object(members), Some(children)) => personal_texts(children, members, out),
            (Json::Array(items), Some(children)) => {
                for item in items {
                    if let Json::Object(members) = item {
                        personal_texts(children, members, out);
                    }
                }
            }
            _ => {}
        }
    }
}

fn all_json_text(json: &Json<'_>, out: &mut Vec<String>) {
    match json {
        Json::Null => {}
        Json::Array(items) => items.iter().for_each(|i| all_json_text(i, out)),
        Json::Object(members) => members.iter().for_each(|(_, v)| all_json_text(v, out)),
        scalar => out.push(json_text(scalar)),
    }
}

/// The personal values of a record, as text, for scrubbing messages that might quote them.
pub(crate) fn personal_values(schema: &Schema, record: &Value, out: &mut Vec<String>) {
    if schema.has_personal {
        collect_personal(&schema.root, record, out);
    }
}

fn collect_personal(schema: &ObjectSchema, value: &Value, out: &mut Vec<String>) {
    let Some(object) = as_struct(value) else {
        return;
    };
    for field in schema.fields.iter().filter(|f| f.holds_personal) {
        let Some(v) = object.fields.get(field.index).and_then(Option::as_ref) else {
            continue;
        };
        if field.pii {
            collect_all_text(v, out);
        } else if let Some(children) = &field.children {
            match v {
                Value::List(items) => items
                    .iter()
                    .for_each(|item| collect_personal(children, item, out)),
                other => collect_personal(children, other, out),
            }
        }
    }
}

fn collect_all_text(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::List(items) => items.iter().for_each(|v| collect_all_text(v, out)),
        Value::Map(map) => map.map.values().for_each(|v| collect_all_text(v, out)),
        Value::String(s) => out.push(s.to_string()),
        other if as_struct(other).is_some() => as_struct(other)
            .expect("checked")
            .present()
            .for_each(|(_, v)| collect_all_text(v, out)),
        Value::Int(i) => out.push(i.to_string()),
        Value::Timestamp(t) => out.push(t.to_rfc3339()),
        other => {
            if let Some(d) = super::cel_env::as_decimal(other) {
                out.push(d.to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(name: &str, ty: FieldType) -> FieldSpec {
        FieldSpec {
            name: name.into(),
            r#type: ty,
            items: None,
            required: false,
            enum_values: None,
            pattern: None,
            minimum: None,
            maximum: None,
            max_length: None,
            pii: false,
            description: None,
        }
    }

    /// A compiled schema whose every field is read by some expression.
    fn compile_ok(specs: &[FieldSpec]) -> Schema {
        let mut errors = Vec::new();
        let mut schema = compile(specs, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        schema.mark_needed(&specs.iter().map(|s| s.name.as_str()).collect());
        schema
    }

    fn validate(schema: &Schema, record: &str) -> (Value, Vec<Reason>) {
        let mut v = Validator::new(&Redaction::Fixed, 100);
        let value = v.read(schema, record.as_bytes(), 1 << 20, 64).unwrap();
        (value, v.finish())
    }

    fn codes(schema: &Schema, record: &str) -> Vec<(String, &'static str)> {
        validate(schema, record)
            .1
            .into_iter()
            .map(|r| {
                (
                    match r.subject {
                        Subject::Field(p) => p,
                        other => other.to_string(),
                    },
                    r.code.label(),
                )
            })
            .collect()
    }

    #[test]
    fn compile_errors_name_the_field_path_and_the_reason() {
        let mut enum_without_values = field("stage", FieldType::Enum);
        enum_without_values.enum_values = None;
        let mut bad_pattern = field("id", FieldType::String);
        bad_pattern.pattern = Some("([a-z".into());
        let mut pattern_on_int = field("n", FieldType::Integer);
        pattern_on_int.pattern = Some("x".into());
        let mut bad_min = field("amount", FieldType::Decimal);
        bad_min.minimum = Some("ten".into());
        let mut min_over_max = field("pct", FieldType::Decimal);
        min_over_max.minimum = Some("10".into());
        min_over_max.maximum = Some("1".into());
        let mut array_without_items = field("tags", FieldType::Array);
        array_without_items.items = None;
        let mut items_on_string = field("s", FieldType::String);
        items_on_string.items = Some(FieldType::String);
        let mut max_len_on_bool = field("b", FieldType::Boolean);
        max_len_on_bool.max_length = Some(3);
        let cases: Vec<(Vec<FieldSpec>, &str, &str)> = vec![
            (
                vec![field("a-b", FieldType::String)],
                "spec.fields[0].name",
                "invalid_field_name",
            ),
            (
                vec![field("lines[]", FieldType::String)],
                "spec.fields[0].name",
                "invalid_field_name",
            ),
            (
                vec![
                    field("a", FieldType::String),
                    field("a", FieldType::Integer),
                ],
                "spec.fields[1].name",
                "duplicate_field",
            ),
            (
                vec![field("address.city", FieldType::String)],
                "spec.fields[0].name",
                "undeclared_parent",
            ),
            (
                vec![
                    field("address", FieldType::String),
                    field("address.city", FieldType::String),
                ],
                "spec.fields[1].name",
                "undeclared_parent",
            ),
            (
                vec![field("lines[].sku", FieldType::String)],
                "spec.fields[0].name",
                "undeclared_parent",
            ),
            (
                vec![enum_without_values],
                "spec.fields[0].enumValues",
                "invalid_field_option",
            ),
            (vec![bad_pattern], "spec.fields[0].pattern", "bad_pattern"),
            (
                vec![pattern_on_int],
                "spec.fields[0].pattern",
                "invalid_field_option",
            ),
            (vec![bad_min], "spec.fields[0].minimum", "bad_bound"),
            (vec![min_over_max], "spec.fields[0].minimum", "bad_bound"),
            (
                vec![array_without_items],
                "spec.fields[0].items",
                "invalid_field_option",
            ),
            (
                vec![items_on_string],
                "spec.fields[0].items",
                "invalid_field_option",
            ),
            (
                vec![max_len_on_bool],
                "spec.fields[0].maxLength",
                "invalid_field_option",
            ),
        ];
        for (specs, path, label) in cases {
            let mut errors = Vec::new();
            compile(&specs, &mut errors);
            assert!(
                errors
                    .iter()
                    .any(|e| e.path == path && e.kind.label() == label && !e.reason.is_empty()),
                "expected {label} at {path}, got {errors:?}"
            );
        }
    }

    fn example_schema() -> Schema {
        let mut id = field("id", FieldType::String);
        id.required = true;
        id.pattern = Some("^006[A-Za-z0-9]{12}$".into());
        let mut name = field("name", FieldType::String);
        name.max_length = Some(5);
        let mut stage = field("stage", FieldType::Enum);
        stage.enum_values = Some(vec!["Open".into(), "Won".into()]);
        let mut amount = field("amount", FieldType::Decimal);
        amount.required = true;
        amount.minimum = Some("0".into());
        amount.maximum = Some("1000".into());
        let mut qty = field("qty", FieldType::Integer);
        qty.minimum = Some("1".into());
        let mut email = field("email", FieldType::String);
        email.pii = true;
        email.pattern = Some("@".into());
        let mut lines = field("lines", FieldType::Array);
        lines.items = Some(FieldType::Object);
        lines.max_length = Some(3);
        let mut sku = field("lines[].sku", FieldType::String);
        sku.required = true;
        let mut tags = field("tags", FieldType::Array);
        tags.items = Some(FieldType::Integer);
        compile_ok(&[
            id,
            name,
            stage,
            amount,
            qty,
            email,
            field("flag", FieldType::Boolean),
            field("day", FieldType::Date),
            field("at", FieldType::Datetime),
            field("address", FieldType::Object),
            field("address.city", FieldType::String),
            lines,
            sku,
            field("lines[].price", FieldType::Decimal),
            tags,
        ])
    }

    #[test]
    fn every_validation_type_accepts_good_values() {
        let schema = example_schema();
        let (value, violations) = validate(
            &schema,
            r#"{"id":"006000000000001","name":"abc","stage":"Won","amount":"12.50","qty":3,"email":"a@b",
                "flag":true,"day":"2026-02-28","at":"2026-11-27T10:00:00+01:00","address":{"city":"Oslo"},
                "lines":[{"sku":"A","price":1.5}],"tags":[1,2],"unknown":{"deep":[1]}}"#,
        );
        assert!(violations.is_empty(), "{violations:?}");
        let record = as_struct(&value).expect("a record is a struct");
        assert!(
            record.get("unknown").is_none(),
            "undeclared fields stay out of CEL"
        );
        assert_eq!(
            super::super::cel_env::as_decimal(record.get("amount").unwrap()),
            Some(Decimal::new(1250, 2))
        );
        assert!(matches!(record.get("at"), Some(Value::Timestamp(_))));
    }

    #[test]
    fn every_validation_type_rejects_bad_values_with_its_rule() {
        let schema = example_schema();
        let base = r#""id":"006000000000001","amount":1"#;
        let cases: &[(&str, &str, &str)] = &[
            (r#"{"amount":1}"#, "id", "missing_field"),
            (
                r#"{"id":"006000000000001","amount":null}"#,
                "amount",
                "missing_field",
            ),
            (r#"{"id":"x","amount":1}"#, "id", "pattern_mismatch"),
            (r#"{"id":7,"amount":1}"#, "id", "wrong_type"),
            (
                &format!(r#"{{{base},"name":"toolong"}}"#),
                "name",
                "too_long",
            ),
            (
                &format!(r#"{{{base},"stage":"Lost"}}"#),
                "stage",
                "not_in_enum",
            ),
            (&format!(r#"{{{base},"stage":1}}"#), "stage", "wrong_type"),
            (
                r#"{"id":"006000000000001","amount":"12,50"}"#,
                "amount",
                "invalid_decimal",
            ),
            (
                r#"{"id":"006000000000001","amount":-1}"#,
                "amount",
                "below_minimum",
            ),
            (
                r#"{"id":"006000000000001","amount":1000.01}"#,
                "amount",
                "above_maximum",
            ),
            (
                r#"{"id":"006000000000001","amount":1e40}"#,
                "amount",
                "number_out_of_range",
            ),
            (
                r#"{"id":"006000000000001","amount":true}"#,
                "amount",
                "wrong_type",
            ),
            (&format!(r#"{{{base},"qty":0}}"#), "qty", "below_minimum"),
            (&format!(r#"{{{base},"qty":1.5}}"#), "qty", "wrong_type"),
            (&format!(r#"{{{base},"qty":"2"}}"#), "qty", "wrong_type"),
            (
                &format!(r#"{{{base},"qty":9223372036854775808}}"#),
                "qty",
                "number_out_of_range",
            ),
            (&format!(r#"{{{base},"flag":"yes"}}"#), "flag", "wrong_type"),
            (
                &format!(r#"{{{base},"day":"2026-02-30"}}"#),
                "day",
                "invalid_date",
            ),
            (
                &format!(r#"{{{base},"day":"26-02-01"}}"#),
                "day",
                "invalid_date",
            ),
            (
                &format!(r#"{{{base},"at":"2026-11-27 10:00"}}"#),
                "at",
                "invalid_datetime",
            ),
            (
                &format!(r#"{{{base},"address":"Oslo"}}"#),
                "address",
                "wrong_type",
            ),
            (
                &format!(r#"{{{base},"address":{{"city":1}}}}"#),
                "address.city",
                "wrong_type",
            ),
            (
                &format!(r#"{{{base},"lines":{{}}}}"#),
                "lines",
                "wrong_type",
            ),
            (
                &format!(r#"{{{base},"lines":[{{}}]}}"#),
                "lines[0].sku",
                "missing_field",
            ),
            (
                &format!(r#"{{{base},"lines":[{{"sku":"a"}},{{"sku":"b","price":"x"}}]}}"#),
                "lines[1].price",
                "invalid_decimal",
            ),
            (
                &format!(
                    r#"{{{base},"lines":[{{"sku":"a"}},{{"sku":"a"}},{{"sku":"a"}},{{"sku":"a"}}]}}"#
                ),
                "lines",
                "too_long",
            ),
            (
                &format!(r#"{{{base},"lines":[1]}}"#),
                "lines[0]",
                "wrong_type",
            ),
            (
                &format!(r#"{{{base},"tags":[1,"2"]}}"#),
                "tags[1]",
                "wrong_type",
            ),
        ];
        for (record, path, label) in cases {
            let got = codes(&schema, record);
            assert!(
                got.contains(&(path.to_string(), *label)),
                "{record}: expected {label} at {path}, got {got:?}"
            );
        }
    }

    #[test]
    fn all_violations_are_reported_at_once() {
        let schema = example_schema();
        let got = codes(
            &schema,
            r#"{"name":"toolong","stage":"Lost","qty":0,"lines":[{},{"sku":1}]}"#,
        );
        let labels: Vec<_> = got.iter().map(|(p, l)| format!("{p}:{l}")).collect();
        assert_eq!(
            labels,
            [
                "name:too_long",
                "stage:not_in_enum",
                "qty:below_minimum",
                "lines[0].sku:missing_field",
                "lines[1].sku:wrong_type",
                "id:missing_field",
                "amount:missing_field"
            ]
        );
    }

    #[test]
    fn violations_of_personal_fields_show_the_redacted_value() {
        let schema = example_schema();
        let (_, violations) = validate(
            &schema,
            r#"{"id":"006000000000001","amount":1,"email":"alice.example.com"}"#,
        );
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].value.as_deref(), Some("[REDACTED]"));
        assert!(!format!("{violations:?}").contains("alice"));
    }

    #[test]
    fn the_number_of_violations_is_bounded() {
        let schema = example_schema();
        let json = format!(r#"{{"tags":[{}]}}"#, vec!["\"x\""; 500].join(","));
        let mut v = Validator::new(&Redaction::Fixed, 10);
        v.read(&schema, json.as_bytes(), 1 << 20, 64).unwrap();
        let reasons = v.finish();
        assert_eq!(reasons.len(), 11);
        assert_eq!(reasons[10].code, ReasonCode::TooManyViolations);
    }
}
