//! Compiling contract expressions and evaluating them, bounded, against one record.
//!
//! An expression is parsed by the `cel` crate and then lowered, once per contract version, into a small tree
//! of typed nodes: identifiers are resolved to the record, a lookup, `contract`, `flow` or a comprehension slot;
//! the macros (`all`, `exists`, `exists_one`, `map`, `filter`) become loops; constant calls such as
//! `decimal("0.05")` are folded; constant regular expressions are compiled. Lowering is also where the reference
//! check happens: every `record.x.y` path (also through comprehension variables, `l.sku` → `lineItems[].sku`)
//! must be a declared field, every lookup member a declared lookup field, every function a catalogued one.
//!
//! Evaluation walks that tree over `cel` values that share their data (`Arc`), so reading a record never copies
//! it. Functions this module does not implement natively are called through the `cel` interpreter with the
//! shared base context (see `cel_env`), so they behave exactly as the library defines them. The `cel` crate has
//! no cost limit, so this evaluator carries one: a step budget (every node, every loop iteration, and the size
//! of every value it builds count) and a deadline in CPU time of the evaluating thread (see `clock`), checked as
//! it goes. A statically bounded
//! comprehension depth and a per-record estimate (see [`Program::estimate`]) let a record that would exceed
//! the budget be refused before any work is done.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use kube::core::cel::cel::common::ast::{
    ComprehensionExpr, EntryExpr, Expr, LiteralValue, operators,
};
use kube::core::cel::cel::objects::{Key, KeyRef, Map, Value};
use kube::core::cel::cel::parser::Parser;
use kube::core::cel::cel::{ExecutionError, IdedExpr};
use regex::Regex;
use rust_decimal::Decimal;

use super::cel_env::{
    CallReceiver, DecOp, DecOut, Operand, Struct, Table, as_decimal, as_struct, as_table,
    base_context, call_expression, decimal_apply, decimal_method, decimal_value, invoke,
    is_function, make_decimal, to_cel, type_name,
};
use super::clock::{CpuClock, CpuDeadline};
use super::schema::{Field, ObjectSchema, Schema};
use super::{CompileError, CompileErrorKind, Limits};
use crate::api::FieldType;

/// Deepest bracket nesting accepted before parsing: the parser recurses on nesting, so this keeps a hostile
/// expression from exhausting the stack before any other check can run.
const MAX_BRACKET_NESTING: usize = 32;
/// Most operators and member selections in one expression, for the same reason (operator chains nest too).
const MAX_OPERATORS: usize = 600;
/// Bytes a built value may hold per budget step (strings, lists, maps are charged for their size).
const BYTES_PER_STEP: usize = 64;

/// Constant folding at compile time is bounded by a small step budget and the compiling thread's CPU clock.
static FOLD_CLOCK: CpuClock = CpuClock::thread();

/// A lookup as the expressions see it: a map from key to an entry with declared fields.
#[derive(Debug, Clone)]
pub(crate) struct LookupDecl {
    pub(crate) name: String,
    pub(crate) fields: Vec<(String, FieldType)>,
    /// The field names as keys of the entries' structs.
    pub(crate) keys: Arc<[Key]>,
}

impl LookupDecl {
    pub(crate) fn new(name: &str, fields: Vec<(String, FieldType)>) -> Self {
        let keys = fields
            .iter()
            .map(|(n, _)| Key::String(Arc::new(n.clone())))
            .collect();
        LookupDecl {
            name: name.to_string(),
            fields,
            keys,
        }
    }
}

/// What an expression may refer to.
pub(crate) struct Declarations<'a> {
    pub(crate) schema: &'a Schema,
    pub(crate) lookups: &'a [LookupDecl],
    pub(crate) limits: &'a Limits,
}

/// A compiled expression.
#[derive(Debug)]
pub(crate) struct Program {
    root: Node,
    /// Number of nodes: the cost of one evaluation without loops.
    size: u64,
    /// Deepest comprehension nesting.
    depth: u32,
    /// Whether a comprehension ranges over a lookup table (then the table's size bounds the loop).
    iterates_lookup: bool,
    /// Comprehension variable slots the expression needs.
    pub(crate) slots: usize,
    /// The expression reads a personal field (or a value that contains one).
    pub(crate) personal: bool,
    /// The schema paths whose values the expression reads; fields no expression reads are validated but never
    /// built into CEL values.
    pub(crate) needed: Vec<String>,
    /// For an expression that is exactly `record.a.b`: the keys to follow, so it is copied without evaluation.
    pub(crate) direct: Option<Direct>,
}

impl Program {
    /// Worst-case steps for a record whose longest list has `n` elements: every node runs once per iteration
    /// of every enclosing comprehension.
    pub(crate) fn estimate(&self, n: usize, largest_lookup: usize) -> u64 {
        let n = if self.iterates_lookup {
            n.max(largest_lookup)
        } else {
            n
        }
        .max(1) as u64;
        self.size.saturating_mul(n.saturating_pow(self.depth))
    }
}

/// Compiles one expression. `path` names it in errors (`spec.rules[2].expression`).
pub(crate) fn compile(
    decls: &Declarations<'_>,
    source: &str,
    path: &str,
) -> Result<Program, Vec<CompileError>> {
    let error = |kind, reason: String| vec![CompileError::new(path.to_string(), kind, reason)];
    if source.trim().is_empty() {
        return Err(error(
            CompileErrorKind::CelSyntax,
            "the expression is empty".into(),
        ));
    }
    if source.len() > decls.limits.max_expression_len {
        return Err(error(
            CompileErrorKind::ExpressionTooLong,
            format!(
                "the expression is {} bytes, over the limit of {}",
                source.len(),
                decls.limits.max_expression_len
            ),
        ));
    }
    if let Err(reason) = prescan(source) {
        return Err(error(CompileErrorKind::ExpressionTooComplex, reason));
    }
    let parsed = std::panic::catch_unwind(|| {
        Parser::new()
            .max_recursion_depth(MAX_BRACKET_NESTING as u16 * 3)
            .parse(source)
    });
    let ast = match parsed {
        Ok(Ok(ast)) => ast,
        Ok(Err(errors)) => {
            let reason = errors
                .errors
                .iter()
                .map(|e| format!("{}:{}: {}", e.pos.0, e.pos.1, e.msg))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(error(
                CompileErrorKind::CelSyntax,
                format!("CEL syntax error at {reason}"),
            ));
        }
        Err(_) => {
            return Err(error(
                CompileErrorKind::CelSyntax,
                "the CEL parser could not read the expression".into(),
            ));
        }
    };
    let mut lowering = Lowering {
        decls,
        path,
        scope: Vec::new(),
        slots: 0,
        depth: 0,
        max_depth: 0,
        size: 0,
        iterates_lookup: false,
        personal: false,
        needed: Vec::new(),
        errors: Vec::new(),
    };
    let (root, _) = lowering.lower(&ast);
    if lowering.max_depth > decls.limits.max_comprehension_depth {
        lowering.errors.push(CompileError::new(
            path.to_string(),
            CompileErrorKind::ExpressionTooComplex,
            format!(
                "comprehensions nest {} deep, over the limit of {}: the cost grows with the list length to that power",
                lowering.max_depth, decls.limits.max_comprehension_depth
            ),
        ));
    }
    if !lowering.errors.is_empty() {
        return Err(lowering.errors);
    }
    Ok(Program {
        direct: direct_path(&ast, decls.schema),
        root,
        size: lowering.size,
        depth: lowering.max_depth as u32,
        iterates_lookup: lowering.iterates_lookup,
        slots: lowering.slots,
        personal: lowering.personal,
        needed: lowering.needed,
    })
}

/// Checks bracket nesting and operator count without parsing, skipping string literals.
fn prescan(source: &str) -> Result<(), String> {
    let bytes = source.as_bytes();
    let (mut depth, mut operators, mut i) = (0usize, 0usize, 0usize);
    while i < bytes.len() {
        match bytes[i] {
            quote @ (b'"' | b'\'') => {
                let triple = bytes[i..].starts_with(&[quote; 3]);
                i += if triple { 3 } else { 1 };
                while i < bytes.len() {
                    if bytes[i] == b'\\' {
                        i += 2;
                        continue;
                    }
                    if triple && bytes[i..].starts_with(&[quote; 3]) {
                        i += 2;
                        break;
                    }
                    if !triple && bytes[i] == quote {
                        break;
                    }
                    i += 1;
                }
            }
            b'(' | b'[' | b'{' => {
                depth += 1;
                if depth > MAX_BRACKET_NESTING {
                    return Err(format!(
                        "brackets nest deeper than {MAX_BRACKET_NESTING} levels"
                    ));
                }
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            b'+' | b'-' | b'*' | b'/' | b'%' | b'<' | b'>' | b'=' | b'!' | b'&' | b'|' | b'?'
            | b'.' | b',' => {
                operators += 1;
                if operators > MAX_OPERATORS {
                    return Err(format!(
                        "more than {MAX_OPERATORS} operators; split the rule"
                    ));
                }
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// An expression that is exactly `record.a.b`, as the member slots to follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Direct {
    pub(crate) slots: Vec<usize>,
    /// `record.a.b`, for messages.
    pub(crate) path: String,
}

fn direct_path(ast: &IdedExpr, schema: &Schema) -> Option<Direct> {
    let mut names = Vec::new();
    let mut node = ast;
    loop {
        match &node.expr {
            Expr::Select(select) if !select.test => {
                names.push(select.field.as_str());
                node = &select.operand;
            }
            Expr::Ident(name) if name == "record" && !names.is_empty() => break,
            _ => return None,
        }
    }
    names.reverse();
    let mut object = &schema.root;
    let mut slots = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let index = object.position(name)?;
        slots.push(index);
        if i + 1 < names.len() {
            let field = &object.fields[index];
            object = match (field.ty, &field.children) {
                (FieldType::Object, Some(children)) => children,
                _ => return None,
            };
        }
    }
    Some(Direct {
        slots,
        path: format!("record.{}", names.join(".")),
    })
}

/// What the reference check knows about the value of a sub-expression.
#[derive(Debug, Clone, Copy)]
enum Shape<'s> {
    Unknown,
    /// The record itself (or the members of an object).
    Object(&'s ObjectSchema, &'s str),
    /// A declared field's value.
    Field(&'s Field),
    /// An element of an array field.
    Element(&'s Field),
    LookupTable(usize),
    LookupEntry(usize),
    Contract,
    Flow,
}

#[derive(Debug)]
enum Node {
    Const(Value),
    Record,
    Lookup(usize),
    Contract,
    Flow,
    Local(usize),
    /// `operand.key`; `slot` is the member's position when the operand is a declared object.
    Select(Box<Node>, Key, Option<usize>),
    Has(Box<Node>, Key, Option<usize>),
    Index(Box<Node>, Box<Node>),
    /// Member selections and indexes from a variable, walked by reference: only the value at the end is copied.
    Path(Box<Path>),
    Not(Box<Node>),
    Neg(Box<Node>),
    NotStrictlyFalse(Box<Node>),
    And(Box<Node>, Box<Node>),
    Or(Box<Node>, Box<Node>),
    Cond(Box<Node>, Box<Node>, Box<Node>),
    Binary(BinOp, Box<Node>, Box<Node>),
    List(Vec<Node>),
    Map(Vec<(Node, Node)>),
    All {
        range: Box<Node>,
        slot: usize,
        pred: Box<Node>,
    },
    Exists {
        range: Box<Node>,
        slot: usize,
        pred: Box<Node>,
    },
    ExistsOne {
        range: Box<Node>,
        slot: usize,
        pred: Box<Node>,
    },
    MapList {
        range: Box<Node>,
        slot: usize,
        filter: Option<Box<Node>>,
        func: Box<Node>,
    },
    Filter {
        range: Box<Node>,
        slot: usize,
        pred: Box<Node>,
    },
    Fold(Box<Fold>),
    Builtin {
        builtin: Builtin,
        receiver: bool,
        args: Vec<Node>,
    },
    Matches(Box<Node>, Arc<Regex>),
    Delegate(Box<Delegate>),
}

#[derive(Debug)]
struct Path {
    root: Root,
    steps: Vec<Step>,
    /// Some step is an index, whose value must be computed before walking.
    indexed: bool,
}

#[derive(Debug, Clone, Copy)]
enum Root {
    Record,
    Lookup(usize),
    Contract,
    Flow,
    Local(usize),
}

#[derive(Debug)]
enum Step {
    Member(Key, Option<usize>),
    Index(Node),
}

/// Appends a selection or an index to `operand`, making or extending a path when the operand is a variable.
fn extend(operand: Node, step: Step) -> Node {
    let root = match operand {
        Node::Path(mut path) => {
            path.indexed |= matches!(step, Step::Index(_));
            path.steps.push(step);
            return Node::Path(path);
        }
        Node::Record => Root::Record,
        Node::Lookup(i) => Root::Lookup(i),
        Node::Contract => Root::Contract,
        Node::Flow => Root::Flow,
        Node::Local(slot) => Root::Local(slot),
        other => {
            return match step {
                Step::Member(key, slot) => Node::Select(Box::new(other), key, slot),
                Step::Index(index) => Node::Index(Box::new(other), Box::new(index)),
            };
        }
    };
    let indexed = matches!(step, Step::Index(_));
    Node::Path(Box::new(Path {
        root,
        steps: vec![step],
        indexed,
    }))
}

#[derive(Debug)]
struct Fold {
    range: Node,
    iter_slot: usize,
    accu_slot: usize,
    init: Node,
    cond: Node,
    step: Node,
    result: Node,
}

#[derive(Debug)]
struct Delegate {
    name: String,
    call: IdedExpr,
    target: Option<Node>,
    args: Vec<Node>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BinOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    In,
}

/// Functions evaluated natively because rules call them on every record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Builtin {
    Size,
    Contains,
    StartsWith,
    EndsWith,
    ToString,
    ToInt,
    ToDouble,
    ToDecimal,
    /// A decimal method; other receivers are handed to the Kubernetes library.
    Method(DecOp),
}

impl Builtin {
    fn of(name: &str) -> Option<Builtin> {
        Some(match name {
            "size" => Builtin::Size,
            "contains" => Builtin::Contains,
            "startsWith" => Builtin::StartsWith,
            "endsWith" => Builtin::EndsWith,
            "string" => Builtin::ToString,
            "int" => Builtin::ToInt,
            "double" => Builtin::ToDouble,
            "decimal" => Builtin::ToDecimal,
            other => Builtin::Method(DecOp::of(other)?),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Builtin::Size => "size",
            Builtin::Contains => "contains",
            Builtin::StartsWith => "startsWith",
            Builtin::EndsWith => "endsWith",
            Builtin::ToString => "string",
            Builtin::ToInt => "int",
            Builtin::ToDouble => "double",
            Builtin::ToDecimal => "decimal",
            Builtin::Method(op) => op.name(),
        }
    }
}

/// Functions with constant arguments that are evaluated once, at compile time.
const FOLDABLE_DELEGATES: &[&str] = &["timestamp", "duration", "quantity", "semver"];

struct Lowering<'d, 's> {
    decls: &'d Declarations<'s>,
    path: &'d str,
    /// Comprehension variables in scope, innermost last.
    scope: Vec<(String, usize, Shape<'s>)>,
    slots: usize,
    depth: usize,
    max_depth: usize,
    size: u64,
    iterates_lookup: bool,
    personal: bool,
    needed: Vec<String>,
    errors: Vec<CompileError>,
}

impl<'d, 's> Lowering<'d, 's> {
    fn fail(&mut self, kind: CompileErrorKind, reason: String) -> (Node, Shape<'s>) {
        self.errors
            .push(CompileError::new(self.path.to_string(), kind, reason));
        (Node::Const(Value::Null), Shape::Unknown)
    }

    /// Lowers an expression whose value is used as a whole (an argument, an operand, a result).
    fn lower(&mut self, e: &IdedExpr) -> (Node, Shape<'s>) {
        let (node, shape) = self.lower_shape(e);
        self.consume(shape);
        (node, shape)
    }

    /// Marks what a value used as a whole needs built: a declared object or element needs all its members.
    fn consume(&mut self, shape: Shape<'s>) {
        fn subtree(object: &ObjectSchema, out: &mut Vec<String>) {
            for f in &object.fields {
                out.push(f.path.clone());
                if let Some(children) = &f.children {
                    subtree(children, out);
                }
            }
        }
        match shape {
            Shape::Object(o, _) => subtree(o, &mut self.needed),
            Shape::Field(f) | Shape::Element(f) => {
                self.needed.push(f.path.clone());
                if let Some(children) = &f.children {
                    subtree(children, &mut self.needed);
                }
            }
            _ => {}
        }
    }

    /// Lowers an expression that is narrowed before use (selected from, indexed, iterated, measured).
    fn lower_shape(&mut self, e: &IdedExpr) -> (Node, Shape<'s>) {
        self.size += 1;
        match &e.expr {
            Expr::Literal(literal) => (Node::Const(literal_value(literal)), Shape::Unknown),
            Expr::Ident(name) => self.ident(name, false),
            Expr::Select(select) => {
                let (operand, shape) = self.operand(&select.operand);
                let child = self.member(shape, &select.field);
                let (key, slot) = self.slot(shape, &select.field);
                if select.test {
                    (Node::Has(Box::new(operand), key, slot), Shape::Unknown)
                } else {
                    self.taint(child);
                    (extend(operand, Step::Member(key, slot)), child)
                }
            }
            Expr::Call(call) => self.call(call),
            Expr::List(list) => {
                if !list.optional_indices.is_empty() {
                    return self.fail(
                        CompileErrorKind::UnsupportedSyntax,
                        "optional list elements are not supported".into(),
                    );
                }
                let items: Vec<Node> = list.elements.iter().map(|x| self.lower(x).0).collect();
                (fold_list(items), Shape::Unknown)
            }
            Expr::Map(map) => {
                let mut entries = Vec::with_capacity(map.entries.len());
                for entry in &map.entries {
                    match &entry.expr {
                        EntryExpr::MapEntry(m) if !m.optional => {
                            let key = self.lower(&m.key).0;
                            let value = self.lower(&m.value).0;
                            entries.push((key, value));
                        }
                        _ => {
                            return self.fail(
                                CompileErrorKind::UnsupportedSyntax,
                                "optional map entries are not supported".into(),
                            );
                        }
                    }
                }
                (Node::Map(entries), Shape::Unknown)
            }
            Expr::Comprehension(c) => self.comprehension(c),
            Expr::Struct(s) => self.fail(
                CompileErrorKind::UnsupportedSyntax,
                format!(
                    "message construction ({} {{...}}) is not supported; use a map literal",
                    s.type_name
                ),
            ),
            Expr::Unspecified => {
                self.fail(CompileErrorKind::CelSyntax, "incomplete expression".into())
            }
        }
    }

    /// Lowers the operand of a selection or an index: there, `record` is about to be narrowed to a field, so it
    /// does not count as reading every personal field.
    fn operand(&mut self, e: &IdedExpr) -> (Node, Shape<'s>) {
        match &e.expr {
            Expr::Ident(name) => {
                self.size += 1;
                self.ident(name, true)
            }
            _ => self.lower_shape(e),
        }
    }

    fn ident(&mut self, name: &str, narrowed: bool) -> (Node, Shape<'s>) {
        if let Some((_, slot, shape)) = self.scope.iter().rev().find(|(n, _, _)| n == name) {
            return (Node::Local(*slot), *shape);
        }
        let decls = self.decls;
        match name {
            "record" => {
                if !narrowed && decls.schema.has_personal {
                    self.personal = true;
                }
                (Node::Record, Shape::Object(&decls.schema.root, ""))
            }
            "contract" => (Node::Contract, Shape::Contract),
            "flow" => (Node::Flow, Shape::Flow),
            _ => match decls.lookups.iter().position(|l| l.name == name) {
                Some(i) => (Node::Lookup(i), Shape::LookupTable(i)),
                None => {
                    let lookups: Vec<&str> =
                        decls.lookups.iter().map(|l| l.name.as_str()).collect();
                    let mut known = vec!["record"];
                    known.extend(lookups);
                    known.extend(["contract", "flow"]);
                    known.extend(self.scope.iter().map(|(n, _, _)| n.as_str()));
                    self.fail(
                        CompileErrorKind::UnknownReference,
                        format!(
                            "`{name}` is not defined (known names: {})",
                            known.join(", ")
                        ),
                    )
                }
            },
        }
    }

    fn taint(&mut self, shape: Shape<'s>) {
        if let Shape::Field(f) | Shape::Element(f) = shape
            && f.holds_personal
        {
            self.personal = true;
        }
    }

    /// The key of `shape.name` and, for a declared object, the member's slot. The key is the schema's own
    /// allocation, so the evaluator's check that a slot belongs to the value is a pointer comparison.
    fn slot(&self, shape: Shape<'s>, name: &str) -> (Key, Option<usize>) {
        let object = match shape {
            Shape::Object(o, _) => Some(o),
            Shape::Field(f) | Shape::Element(f) => f.children.as_ref(),
            Shape::LookupEntry(i) => {
                let decl = &self.decls.lookups[i];
                if let Some(slot) = decl.fields.iter().position(|(n, _)| n == name) {
                    return (decl.keys[slot].clone(), Some(slot));
                }
                None
            }
            _ => None,
        };
        match object.and_then(|o| o.position(name).map(|i| (o, i))) {
            Some((o, i)) => (o.fields[i].key.clone(), Some(i)),
            None => (Key::String(Arc::new(name.to_string())), None),
        }
    }

    /// The shape of `shape.name`, or a reference error.
    fn member(&mut self, shape: Shape<'s>, name: &str) -> Shape<'s> {
        let object = |o: &'s ObjectSchema, prefix: &str| -> Result<Shape<'s>, String> {
            match o.get(name) {
                Some(f) => Ok(Shape::Field(f)),
                None => {
                    let at = if prefix.is_empty() {
                        "record".to_string()
                    } else {
                        format!("record.{prefix}")
                    };
                    let known = o.names();
                    Err(format!(
                        "record.{}{name} is not a field of the contract (fields of {at}: {})",
                        if prefix.is_empty() {
                            String::new()
                        } else {
                            format!("{prefix}.")
                        },
                        if known.is_empty() {
                            "none".into()
                        } else {
                            known
                        }
                    ))
                }
            }
        };
        let result = match shape {
            Shape::Unknown => Ok(Shape::Unknown),
            Shape::Object(o, prefix) => object(o, prefix),
            Shape::Field(f) => match (f.ty, &f.children) {
                (FieldType::Object, Some(children)) => object(children, &f.path),
                (FieldType::Array, _) => Err(format!(
                    "record.{} is an array: iterate it (record.{}.all(x, x.{name} ...)) or index it",
                    f.path, f.path
                )),
                (ty, _) => Err(format!(
                    "record.{} is {} and has no member `{name}`",
                    f.path,
                    article(ty)
                )),
            },
            Shape::Element(f) => match (f.items, &f.children) {
                (Some(FieldType::Object), Some(children)) => {
                    object(children, &format!("{}[]", f.path))
                }
                (items, _) => Err(format!(
                    "the elements of record.{} are {} and have no member `{name}`",
                    f.path,
                    items.map_or("values".into(), |t| format!("{}s", t.as_str()))
                )),
            },
            Shape::LookupTable(i) => Ok(Shape::LookupEntry(i)),
            Shape::LookupEntry(i) => {
                let lookup = &self.decls.lookups[i];
                if lookup.fields.iter().any(|(n, _)| n == name) {
                    Ok(Shape::Unknown)
                } else {
                    let known: Vec<&str> = lookup.fields.iter().map(|(n, _)| n.as_str()).collect();
                    Err(format!(
                        "`{name}` is not a field of lookup {} (fields: {})",
                        lookup.name,
                        known.join(", ")
                    ))
                }
            }
            Shape::Contract if name == "version" => Ok(Shape::Unknown),
            Shape::Contract => Err(format!(
                "contract.{name} is not defined (contract has: version)"
            )),
            Shape::Flow if name == "name" => Ok(Shape::Unknown),
            Shape::Flow => Err(format!("flow.{name} is not defined (flow has: name)")),
        };
        match result {
            Ok(shape) => {
                // Even a field that is only tested (`has()`) or compared must be built.
                if let Shape::Field(f) = shape {
                    self.needed.push(f.path.clone());
                }
                shape
            }
            Err(reason) => {
                self.errors.push(CompileError::new(
                    self.path.to_string(),
                    CompileErrorKind::UnknownReference,
                    reason,
                ));
                Shape::Unknown
            }
        }
    }

    fn index_shape(&mut self, shape: Shape<'s>, index: &Node) -> Shape<'s> {
        match shape {
            Shape::Field(f) if f.ty == FieldType::Array => Shape::Element(f),
            Shape::LookupTable(i) => Shape::LookupEntry(i),
            Shape::Object(..) | Shape::Field(_) => match index {
                Node::Const(Value::String(name)) => self.member(shape, name),
                _ => Shape::Unknown,
            },
            _ => Shape::Unknown,
        }
    }

    fn call(&mut self, call: &kube::core::cel::cel::common::ast::CallExpr) -> (Node, Shape<'s>) {
        let name = call.func_name.as_str();
        let args = &call.args;
        let binary = |op| Some(op);
        let op = match (name, args.len()) {
            (operators::EQUALS, 2) => binary(BinOp::Eq),
            (operators::NOT_EQUALS, 2) => binary(BinOp::Ne),
            (operators::LESS, 2) => binary(BinOp::Lt),
            (operators::LESS_EQUALS, 2) => binary(BinOp::Le),
            (operators::GREATER, 2) => binary(BinOp::Gt),
            (operators::GREATER_EQUALS, 2) => binary(BinOp::Ge),
            (operators::ADD, 2) => binary(BinOp::Add),
            (operators::SUBSTRACT, 2) => binary(BinOp::Sub),
            (operators::MULTIPLY, 2) => binary(BinOp::Mul),
            (operators::DIVIDE, 2) => binary(BinOp::Div),
            (operators::MODULO, 2) => binary(BinOp::Rem),
            (operators::IN, 2) => binary(BinOp::In),
            _ => None,
        };
        if let Some(op) = op {
            let lhs = self.lower(&args[0]).0;
            let rhs = self.lower(&args[1]).0;
            return (
                Node::Binary(op, Box::new(lhs), Box::new(rhs)),
                Shape::Unknown,
            );
        }
        match (name, args.len()) {
            (operators::CONDITIONAL, 3) => {
                let c = self.lower(&args[0]).0;
                let (t, ts) = self.lower(&args[1]);
                let (f, _) = self.lower(&args[2]);
                return (Node::Cond(Box::new(c), Box::new(t), Box::new(f)), ts);
            }
            (operators::LOGICAL_AND, 2) | (operators::LOGICAL_OR, 2) => {
                let l = Box::new(self.lower(&args[0]).0);
                let r = Box::new(self.lower(&args[1]).0);
                let node = if name == operators::LOGICAL_AND {
                    Node::And(l, r)
                } else {
                    Node::Or(l, r)
                };
                return (node, Shape::Unknown);
            }
            (operators::LOGICAL_NOT, 1) => {
                return (Node::Not(Box::new(self.lower(&args[0]).0)), Shape::Unknown);
            }
            (operators::NEGATE, 1) => return (fold_neg(self.lower(&args[0]).0), Shape::Unknown),
            (operators::NOT_STRICTLY_FALSE, 1) => {
                return (
                    Node::NotStrictlyFalse(Box::new(self.lower(&args[0]).0)),
                    Shape::Unknown,
                );
            }
            (operators::INDEX, 2) => {
                let (operand, shape) = self.operand(&args[0]);
                let index = self.lower(&args[1]).0;
                let shape = self.index_shape(shape, &index);
                self.taint(shape);
                return (extend(operand, Step::Index(index)), shape);
            }
            (operators::OPT_INDEX, _) | (operators::OPT_SELECT, _) => {
                return self.fail(
                    CompileErrorKind::UnsupportedSyntax,
                    "optional selection (?.) is not supported; use has()".into(),
                );
            }
            _ => {}
        }

        // A namespaced function: `math.abs(x)` parses as a call of `abs` on the identifier `math`.
        if let Some(target) = &call.target
            && let Expr::Ident(namespace) = &target.expr
            && !self.is_variable(namespace)
        {
            let qualified = format!("{namespace}.{name}");
            if is_function(&qualified) {
                let args: Vec<Node> = args.iter().map(|a| self.lower(a).0).collect();
                return self.delegate(&qualified, Receiver::Namespace(namespace), args, None);
            }
            if !is_function(name) {
                return self.fail(
                    CompileErrorKind::UnknownFunction,
                    format!("`{qualified}` is not a known function"),
                );
            }
        }
        if !is_function(name) {
            let hint = match name {
                operators::HAS
                | operators::ALL
                | operators::EXISTS
                | operators::EXISTS_ONE
                | operators::MAP
                | operators::FILTER => {
                    format!(
                        "`{name}` is a macro and takes a variable and an expression, e.g. list.{name}(x, x > 0)"
                    )
                }
                _ => format!("`{name}` is not a known function"),
            };
            return self.fail(CompileErrorKind::UnknownFunction, hint);
        }
        // size() needs only a count, not the members of what it measures.
        let measure = name == "size";
        let target = call.target.as_ref().map(|t| {
            if measure {
                self.operand(t).0
            } else {
                self.lower(t).0
            }
        });
        let mut lowered: Vec<Node> = Vec::with_capacity(args.len() + 1);
        let receiver = target.is_some();
        lowered.extend(target);
        for a in args {
            lowered.push(if measure {
                self.operand(a).0
            } else {
                self.lower(a).0
            });
        }

        if name == "matches"
            && lowered.len() == 2
            && let Node::Const(Value::String(pattern)) = &lowered[1]
        {
            return match regex::RegexBuilder::new(pattern)
                .size_limit(1 << 20)
                .build()
            {
                Ok(re) => {
                    let subject = lowered.swap_remove(0);
                    (
                        Node::Matches(Box::new(subject), Arc::new(re)),
                        Shape::Unknown,
                    )
                }
                Err(err) => self.fail(
                    CompileErrorKind::BadPattern,
                    format!(
                        "bad pattern in matches(): {}",
                        err.to_string().lines().last().unwrap_or("")
                    ),
                ),
            };
        }
        if let Some(builtin) = Builtin::of(name) {
            let node = Node::Builtin {
                builtin,
                receiver,
                args: lowered,
            };
            return self.fold(node, name);
        }
        let (target, args) = if receiver {
            (Some(lowered.remove(0)), lowered)
        } else {
            (None, lowered)
        };
        let receiver = if target.is_some() {
            Receiver::Value
        } else {
            Receiver::None
        };
        self.delegate(name, receiver, args, target)
    }

    fn is_variable(&self, name: &str) -> bool {
        matches!(name, "record" | "contract" | "flow")
            || self.decls.lookups.iter().any(|l| l.name == name)
            || self.scope.iter().any(|(n, _, _)| n == name)
    }

    fn delegate(
        &mut self,
        name: &str,
        receiver: Receiver<'_>,
        args: Vec<Node>,
        target: Option<Node>,
    ) -> (Node, Shape<'s>) {
        if args.len() > super::cel_env::ARG_VARS.len() {
            return self.fail(
                CompileErrorKind::UnsupportedSyntax,
                format!("`{name}` is called with too many arguments"),
            );
        }
        let (call_name, cel_receiver) = match receiver {
            Receiver::Namespace(ns) => (
                name.rsplit('.').next().unwrap_or(name),
                CallReceiver::Namespace(ns),
            ),
            Receiver::Value => (name, CallReceiver::Value),
            Receiver::None => (name, CallReceiver::None),
        };
        let call = call_expression(call_name, cel_receiver, args.len());
        let node = Node::Delegate(Box::new(Delegate {
            name: name.to_string(),
            call,
            target,
            args,
        }));
        if FOLDABLE_DELEGATES.contains(&name) {
            self.fold(node, name)
        } else {
            (node, Shape::Unknown)
        }
    }

    /// Evaluates a call whose arguments are all constants now, so records never pay for it; a failure is a
    /// compile error (`decimal("abc")` is a mistake in the contract, not in a record).
    fn fold(&mut self, node: Node, name: &str) -> (Node, Shape<'s>) {
        let constant = match &node {
            Node::Builtin { args, .. } => args.iter().all(|a| matches!(a, Node::Const(_))),
            Node::Delegate(d) => d
                .target
                .iter()
                .chain(&d.args)
                .all(|a| matches!(a, Node::Const(_))),
            _ => false,
        };
        if !constant {
            return (node, Shape::Unknown);
        }
        let null = Value::Null;
        let mut frame = Frame::new(
            &null,
            &[],
            &null,
            &null,
            0,
            10_000,
            FOLD_CLOCK.deadline_after(Duration::from_millis(100)),
        );
        match eval(&node, &mut frame) {
            Ok(value) => (Node::Const(value), Shape::Unknown),
            Err(err) => self.fail(
                CompileErrorKind::InvalidConstant,
                format!(
                    "{name}(...) with these constant arguments fails: {}",
                    err.message
                ),
            ),
        }
    }

    fn comprehension(&mut self, c: &ComprehensionExpr) -> (Node, Shape<'s>) {
        let (range, range_shape) = self.operand(&c.iter_range);
        let element = match range_shape {
            Shape::Field(f) if f.ty == FieldType::Array => Shape::Element(f),
            Shape::LookupTable(_) => {
                self.iterates_lookup = true;
                Shape::Unknown
            }
            _ => Shape::Unknown,
        };
        let slot = self.slots;
        self.slots += 1;
        self.depth += 1;
        self.max_depth = self.max_depth.max(self.depth);
        self.scope.push((c.iter_var.clone(), slot, element));
        let accu = c.accu_var.as_str();
        let range = Box::new(range);
        let node = match macro_shape(c) {
            Some(Macro::All(pred)) => Node::All {
                range,
                slot,
                pred: Box::new(self.lower(pred).0),
            },
            Some(Macro::Exists(pred)) => Node::Exists {
                range,
                slot,
                pred: Box::new(self.lower(pred).0),
            },
            Some(Macro::ExistsOne(pred)) => Node::ExistsOne {
                range,
                slot,
                pred: Box::new(self.lower(pred).0),
            },
            Some(Macro::Map(filter, func)) => {
                let filter = filter.map(|f| Box::new(self.lower(f).0));
                Node::MapList {
                    range,
                    slot,
                    filter,
                    func: Box::new(self.lower(func).0),
                }
            }
            Some(Macro::Filter(pred)) => Node::Filter {
                range,
                slot,
                pred: Box::new(self.lower(pred).0),
            },
            None => {
                let accu_slot = self.slots;
                self.slots += 1;
                let init = self.lower(&c.accu_init).0;
                self.scope
                    .push((accu.to_string(), accu_slot, Shape::Unknown));
                let cond = self.lower(&c.loop_cond).0;
                let step = self.lower(&c.loop_step).0;
                let result = self.lower(&c.result).0;
                self.scope.pop();
                Node::Fold(Box::new(Fold {
                    range: *range,
                    iter_slot: slot,
                    accu_slot,
                    init,
                    cond,
                    step,
                    result,
                }))
            }
        };
        self.scope.pop();
        self.depth -= 1;
        // A filter returns elements of its range, so what is read from them later must be known to be read.
        let shape = match (&node, range_shape) {
            (Node::Filter { .. }, Shape::Field(f)) if f.ty == FieldType::Array => Shape::Field(f),
            _ => Shape::Unknown,
        };
        (node, shape)
    }
}

#[derive(Clone, Copy)]
enum Receiver<'a> {
    None,
    Value,
    Namespace(&'a str),
}

fn article(ty: FieldType) -> String {
    match ty {
        FieldType::Integer | FieldType::Enum | FieldType::Object | FieldType::Array => {
            format!("an {}", ty.as_str())
        }
        _ => format!("a {}", ty.as_str()),
    }
}

fn literal_value(literal: &LiteralValue) -> Value {
    let expr = IdedExpr {
        id: 0,
        expr: Expr::Literal(literal.clone()),
    };
    Value::resolve(&expr, base_context()).unwrap_or(Value::Null)
}

fn fold_list(items: Vec<Node>) -> Node {
    if items.iter().all(|i| matches!(i, Node::Const(_))) {
        let values = items
            .into_iter()
            .map(|i| {
                if let Node::Const(v) = i {
                    v
                } else {
                    Value::Null
                }
            })
            .collect();
        Node::Const(Value::List(Arc::new(values)))
    } else {
        Node::List(items)
    }
}

fn fold_neg(node: Node) -> Node {
    match node {
        Node::Const(Value::Int(i)) if i != i64::MIN => Node::Const(Value::Int(-i)),
        Node::Const(Value::Float(f)) => Node::Const(Value::Float(-f)),
        other => Node::Neg(Box::new(other)),
    }
}

/// The comprehension shapes the `cel` parser's macros produce.
enum Macro<'a> {
    All(&'a IdedExpr),
    Exists(&'a IdedExpr),
    ExistsOne(&'a IdedExpr),
    Map(Option<&'a IdedExpr>, &'a IdedExpr),
    Filter(&'a IdedExpr),
}

fn macro_shape(c: &ComprehensionExpr) -> Option<Macro<'_>> {
    let accu = c.accu_var.as_str();
    let is_accu = |e: &IdedExpr| matches!(&e.expr, Expr::Ident(n) if n == accu);
    fn call(e: &IdedExpr) -> Option<(&str, &[IdedExpr])> {
        match &e.expr {
            Expr::Call(call) if call.target.is_none() => {
                Some((call.func_name.as_str(), call.args.as_slice()))
            }
            _ => None,
        }
    }
    let literal = |e: &IdedExpr| match &e.expr {
        Expr::Literal(l) => Some(l.clone()),
        _ => None,
    };
    if !is_accu(&c.result) {
        // exists_one: the result is `@result == 1`.
        if let Some((operators::EQUALS, [a, _])) = call(&c.result)
            && is_accu(a)
            && let Some((operators::CONDITIONAL, [pred, _, _])) = call(&c.loop_step)
        {
            return Some(Macro::ExistsOne(pred));
        }
        return None;
    }
    match (literal(&c.accu_init), call(&c.loop_step)) {
        (Some(LiteralValue::Boolean(b)), Some((operators::LOGICAL_AND, [a, pred])))
            if *b.inner() && is_accu(a) =>
        {
            Some(Macro::All(pred))
        }
        (Some(LiteralValue::Boolean(b)), Some((operators::LOGICAL_OR, [a, pred])))
            if !*b.inner() && is_accu(a) =>
        {
            Some(Macro::Exists(pred))
        }
        (None, Some((operators::ADD, [a, list]))) if is_accu(a) => match &list.expr {
            Expr::List(l) if l.elements.len() == 1 => Some(Macro::Map(None, &l.elements[0])),
            _ => None,
        },
        (None, Some((operators::CONDITIONAL, [cond, step, otherwise]))) if is_accu(otherwise) => {
            match call(step) {
                Some((operators::ADD, [a, list])) if is_accu(a) => match &list.expr {
                    Expr::List(l) if l.elements.len() == 1 => match &l.elements[0].expr {
                        Expr::Ident(v) if *v == c.iter_var => Some(Macro::Filter(cond)),
                        _ => Some(Macro::Map(Some(cond), &l.elements[0])),
                    },
                    _ => None,
                },
                _ => None,
            }
        }
        _ => None,
    }
}

/// Why an evaluation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EvalErrorKind {
    /// A key or field was absent; an optional mapping target treats this as "leave it out".
    NoSuchKey,
    /// Any other runtime error: type mismatch, division by zero, overflow.
    Runtime,
    /// A library function's error. Its message is the library's and may quote its arguments.
    Library,
    /// The step budget ran out.
    Budget,
    /// The evaluating thread spent its CPU-time deadline.
    Deadline,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EvalError {
    pub(crate) kind: EvalErrorKind,
    pub(crate) message: String,
}

impl EvalError {
    fn runtime(message: impl Into<String>) -> Self {
        EvalError {
            kind: EvalErrorKind::Runtime,
            message: message.into(),
        }
    }

    fn no_such_key(key: &dyn fmt::Display) -> Self {
        EvalError {
            kind: EvalErrorKind::NoSuchKey,
            message: format!("no such key: {key}"),
        }
    }

    /// Budget and deadline errors end the evaluation; the logical operators must not absorb them.
    fn is_fatal(&self) -> bool {
        matches!(self.kind, EvalErrorKind::Budget | EvalErrorKind::Deadline)
    }

    fn no_overload(op: &str, a: &Value, b: &Value) -> Self {
        EvalError::runtime(format!(
            "no such overload: {} {op} {}",
            type_name(a),
            type_name(b)
        ))
    }
}

impl From<ExecutionError> for EvalError {
    fn from(e: ExecutionError) -> Self {
        // Messages name types and keys, never whole values; function messages are scrubbed by the caller.
        let message = match &e {
            ExecutionError::NoSuchKey(key) => return EvalError::no_such_key(key),
            ExecutionError::UndeclaredReference(name) => format!("undeclared reference to {name}"),
            ExecutionError::FunctionError { function, message } => {
                return EvalError {
                    kind: EvalErrorKind::Library,
                    message: format!("{function}: {message}"),
                };
            }
            ExecutionError::UnexpectedType { got, want } => {
                format!("unexpected type: got {got}, want {want}")
            }
            ExecutionError::InvalidArgumentCount { expected, actual } => {
                format!("wrong number of arguments: expected {expected}, got {actual}")
            }
            ExecutionError::NoSuchOverload => "no such overload".into(),
            ExecutionError::DivisionByZero(_) => "division by zero".into(),
            ExecutionError::RemainderByZero(_) => "remainder by zero".into(),
            ExecutionError::Overflow(op, _, _) => format!("{op} overflows"),
            ExecutionError::IndexOutOfBounds(_) => "index out of bounds".into(),
            ExecutionError::UnsupportedBinaryOperator(op, a, b) => {
                format!("no such overload: {} {op} {}", type_name(a), type_name(b))
            }
            ExecutionError::ValuesNotComparable(a, b) => {
                format!("{} and {} cannot be compared", type_name(a), type_name(b))
            }
            ExecutionError::UnsupportedUnaryOperator(op, v) => {
                format!("no such overload: {op} {}", type_name(v))
            }
            ExecutionError::NotSupportedAsMethod { method, target } => {
                format!("{method} is not a method of {}", type_name(target))
            }
            ExecutionError::UnsupportedTargetType { target } => {
                format!("unsupported receiver type {}", type_name(target))
            }
            ExecutionError::UnsupportedKeyType(v) | ExecutionError::UnsupportedMapIndex(v) => {
                format!("a {} cannot be a map key", type_name(v))
            }
            ExecutionError::UnsupportedListIndex(v) => {
                format!("a {} cannot be a list index", type_name(v))
            }
            _ => "evaluation failed".into(),
        };
        EvalError::runtime(message)
    }
}

/// Everything one evaluation reads, plus its budget.
pub(crate) struct Frame<'r> {
    record: &'r Value,
    lookups: &'r [Value],
    contract: &'r Value,
    flow: &'r Value,
    /// Comprehension variables; a contract rarely nests more than a few, so they usually live in the frame.
    locals: Locals,
    budget: u64,
    deadline: CpuDeadline<'r>,
    ticks: u32,
}

enum Locals {
    Inline([Value; 4]),
    Heap(Vec<Value>),
}

impl std::ops::Deref for Locals {
    type Target = [Value];

    fn deref(&self) -> &[Value] {
        match self {
            Locals::Inline(values) => values,
            Locals::Heap(values) => values,
        }
    }
}

impl std::ops::DerefMut for Locals {
    fn deref_mut(&mut self) -> &mut [Value] {
        match self {
            Locals::Inline(values) => values,
            Locals::Heap(values) => values,
        }
    }
}

impl<'r> Frame<'r> {
    pub(crate) fn new(
        record: &'r Value,
        lookups: &'r [Value],
        contract: &'r Value,
        flow: &'r Value,
        slots: usize,
        budget: u64,
        deadline: CpuDeadline<'r>,
    ) -> Self {
        Frame {
            record,
            lookups,
            contract,
            flow,
            locals: if slots <= 4 {
                Locals::Inline([Value::Null, Value::Null, Value::Null, Value::Null])
            } else {
                Locals::Heap(vec![Value::Null; slots])
            },
            budget,
            deadline,
            ticks: 0,
        }
    }

    #[inline]
    fn step(&mut self, cost: u64) -> Result<(), EvalError> {
        self.budget = match self.budget.checked_sub(cost) {
            Some(left) => left,
            None => {
                return Err(EvalError {
                    kind: EvalErrorKind::Budget,
                    message: "the evaluation ran out of its step budget".into(),
                });
            }
        };
        self.ticks = self.ticks.wrapping_add(1);
        // Reading the CPU clock is a system call and costs more than a step, so it is read every 1024 steps.
        if self.ticks & 1023 == 0 {
            self.check_deadline()?;
        }
        Ok(())
    }

    pub(crate) fn check_deadline(&self) -> Result<(), EvalError> {
        if self.deadline.passed() {
            Err(EvalError {
                kind: EvalErrorKind::Deadline,
                message: "the evaluation spent its CPU-time budget".into(),
            })
        } else {
            Ok(())
        }
    }

    fn charge_size(&mut self, bytes: usize) -> Result<(), EvalError> {
        self.step((bytes / BYTES_PER_STEP) as u64)
    }
}

impl Program {
    /// Evaluates the expression.
    pub(crate) fn eval(&self, frame: &mut Frame<'_>) -> Result<Value, EvalError> {
        eval(&self.root, frame)
    }

    /// Evaluates the expression straight into JSON: map and list literals and `map()` build JSON directly
    /// instead of CEL maps that would be converted afterwards.
    pub(crate) fn eval_json(&self, frame: &mut Frame<'_>) -> Result<serde_json::Value, EvalError> {
        eval_json(&self.root, frame)
    }
}

fn eval_json(node: &Node, f: &mut Frame<'_>) -> Result<serde_json::Value, EvalError> {
    match node {
        Node::Map(entries) => {
            f.step(1)?;
            let mut out = serde_json::Map::new();
            for (k, v) in entries {
                let key = match k {
                    Node::Const(Value::String(s)) => s.as_str().to_string(),
                    other => match eval(other, f)? {
                        Value::String(s) => s.as_str().to_string(),
                        Value::Int(i) => i.to_string(),
                        Value::UInt(u) => u.to_string(),
                        Value::Bool(b) => b.to_string(),
                        v => {
                            return Err(EvalError::runtime(format!(
                                "a {} cannot be a map key",
                                type_name(&v)
                            )));
                        }
                    },
                };
                let value = eval_json(v, f)?;
                if out.insert(key, value).is_some() {
                    return Err(EvalError::runtime("a map literal has the same key twice"));
                }
            }
            Ok(serde_json::Value::Object(out))
        }
        Node::List(items) => {
            f.step(1)?;
            Ok(serde_json::Value::Array(
                items
                    .iter()
                    .map(|i| eval_json(i, f))
                    .collect::<Result<_, _>>()?,
            ))
        }
        Node::MapList {
            range,
            slot,
            filter,
            func,
        } => {
            f.step(1)?;
            let range = eval_cow(range, f)?;
            let mut out = Vec::with_capacity(length_hint(&range));
            for item in iterate(&range)?.iter() {
                f.step(1)?;
                f.locals[*slot] = item.into_owned();
                if let Some(filter) = filter
                    && !expect_bool(eval(filter, f)?)?
                {
                    continue;
                }
                out.push(eval_json(func, f)?);
            }
            Ok(serde_json::Value::Array(out))
        }
        other => {
            let value = eval(other, f)?;
            super::cel_env::value_to_json(&value).map_err(EvalError::runtime)
        }
    }
}

/// The elements a comprehension ranges over: a list's elements or a map's keys.
enum Items<'v> {
    List(&'v [Value]),
    Keys(&'v Map),
    Members(&'v Struct),
    Entries(&'v Table),
}

impl<'v> Items<'v> {
    fn iter(&self) -> Box<dyn Iterator<Item = Cow<'v, Value>> + 'v> {
        match *self {
            Items::List(list) => Box::new(list.iter().map(Cow::Borrowed)),
            Items::Keys(map) => Box::new(map.map.keys().map(|k| Cow::Owned(Value::from(k)))),
            Items::Members(s) => Box::new(s.present().map(|(k, _)| Cow::Owned(Value::from(k)))),
            Items::Entries(t) => Box::new(
                t.entries
                    .keys()
                    .map(|k| Cow::Owned(Value::String(Arc::new(k.clone())))),
            ),
        }
    }
}

/// How many elements a comprehension over `range` will see, for sizing its output.
fn length_hint(range: &Value) -> usize {
    match range {
        Value::List(list) => list.len(),
        Value::Map(map) => map.map.len(),
        _ => 0,
    }
}

fn iterate(range: &Value) -> Result<Items<'_>, EvalError> {
    match range {
        Value::List(list) => Ok(Items::List(list)),
        Value::Map(map) => Ok(Items::Keys(map)),
        other => {
            if let Some(s) = as_struct(other) {
                Ok(Items::Members(s))
            } else if let Some(t) = as_table(other) {
                Ok(Items::Entries(t))
            } else {
                Err(EvalError::runtime(format!(
                    "cannot iterate over a {}",
                    type_name(other)
                )))
            }
        }
    }
}

/// A struct member or a table entry by name (as `in` and `[]` look them up).
fn named_member<'v>(value: &'v Value, name: &str) -> Option<&'v Value> {
    match as_table(value) {
        Some(t) => t.entries.get(name),
        None => as_struct(value).and_then(|s| s.get(name)),
    }
}

fn same_key(a: &Key, b: &Key) -> bool {
    match (a, b) {
        (Key::String(x), Key::String(y)) => Arc::ptr_eq(x, y) || x == y,
        _ => a == b,
    }
}

/// `value.key`: a struct member (by slot when the compiler resolved one), a table entry or a map entry.
/// `Ok(None)` is an absent member.
fn member<'v>(
    value: &'v Value,
    key: &Key,
    slot: Option<usize>,
) -> Result<Option<&'v Value>, EvalError> {
    if let Value::Opaque(_) = value {
        if let Some(s) = as_struct(value) {
            if let Some(i) = slot
                && s.keys.get(i).is_some_and(|k| same_key(k, key))
            {
                return Ok(s.fields[i].as_ref());
            }
            return Ok(match key {
                Key::String(name) => s.get(name),
                _ => None,
            });
        }
        if let Some(t) = as_table(value) {
            return Ok(match key {
                Key::String(name) => t.entries.get(name.as_str()),
                _ => None,
            });
        }
    }
    match value {
        Value::Map(map) => Ok(map.map.get(key)),
        other => Err(EvalError::runtime(format!(
            "a {} has no fields",
            type_name(other)
        ))),
    }
}

fn expect_bool(value: Value) -> Result<bool, EvalError> {
    match value {
        Value::Bool(b) => Ok(b),
        other => Err(EvalError::runtime(format!(
            "expected a bool, got {}",
            type_name(&other)
        ))),
    }
}

fn eval(node: &Node, f: &mut Frame<'_>) -> Result<Value, EvalError> {
    f.step(1)?;
    match node {
        Node::Const(v) => Ok(v.clone()),
        Node::Record => Ok(f.record.clone()),
        Node::Lookup(i) => f
            .lookups
            .get(*i)
            .cloned()
            .ok_or_else(|| EvalError::runtime("lookup data is missing")),
        Node::Contract => Ok(f.contract.clone()),
        Node::Flow => Ok(f.flow.clone()),
        Node::Local(slot) => Ok(f.locals[*slot].clone()),
        Node::Select(operand, key, slot) => {
            let operand = eval(operand, f)?;
            member(&operand, key, *slot)?
                .cloned()
                .ok_or_else(|| EvalError::no_such_key(key))
        }
        Node::Has(operand, key, slot) => {
            let operand = eval_cow(operand, f)?;
            Ok(Value::Bool(member(&operand, key, *slot)?.is_some()))
        }
        Node::Path(path) => resolve(path, f).cloned(),
        Node::Index(operand, index) => {
            let operand = eval(operand, f)?;
            let index = eval(index, f)?;
            self::index(&operand, &index)
        }
        Node::Not(x) => Ok(Value::Bool(!expect_bool(eval(x, f)?)?)),
        Node::Neg(x) => negate(eval(x, f)?),
        Node::NotStrictlyFalse(x) => match eval(x, f) {
            Ok(Value::Bool(b)) => Ok(Value::Bool(b)),
            Err(e) if e.is_fatal() => Err(e),
            _ => Ok(Value::Bool(true)),
        },
        // CEL's logical operators are commutative over errors: `false && error` and `error && false` are both
        // false, so the order of conditions in a rule never changes its verdict.
        Node::And(l, r) => logical(l, r, f, false),
        Node::Or(l, r) => logical(l, r, f, true),
        Node::Cond(c, t, e) => {
            if expect_bool(eval(c, f)?)? {
                eval(t, f)
            } else {
                eval(e, f)
            }
        }
        Node::Binary(op, l, r) => match op {
            BinOp::In => {
                let l = eval(l, f)?;
                let r = eval_cow(r, f)?;
                contains(&l, &r, f)
            }
            _ => {
                let l = eval_num(l, f)?;
                let r = eval_num(r, f)?;
                match decimal_binary(*op, &l, &r)? {
                    Some(value) => Ok(value),
                    None => binary(*op, l.into_value(), r.into_value(), f),
                }
            }
        },
        Node::List(items) => {
            let values = items
                .iter()
                .map(|i| eval(i, f))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Value::List(Arc::new(values)))
        }
        Node::Map(entries) => {
            let mut map = HashMap::with_capacity(entries.len());
            for (k, v) in entries {
                let key = match eval(k, f)? {
                    Value::String(s) => Key::String(s),
                    Value::Int(i) => Key::Int(i),
                    Value::UInt(u) => Key::Uint(u),
                    Value::Bool(b) => Key::Bool(b),
                    other => {
                        return Err(EvalError::runtime(format!(
                            "a {} cannot be a map key",
                            type_name(&other)
                        )));
                    }
                };
                let value = eval(v, f)?;
                if map.insert(key, value).is_some() {
                    return Err(EvalError::runtime("a map literal has the same key twice"));
                }
            }
            Ok(Value::Map(Map { map: Arc::new(map) }))
        }
        Node::All { range, slot, pred } => quantifier(range, *slot, pred, f, false),
        Node::Exists { range, slot, pred } => quantifier(range, *slot, pred, f, true),
        Node::ExistsOne { range, slot, pred } => {
            let range = eval_cow(range, f)?;
            let mut count = 0;
            for item in iterate(&range)?.iter() {
                f.locals[*slot] = item.into_owned();
                if expect_bool(eval(pred, f)?)? {
                    count += 1;
                }
            }
            Ok(Value::Bool(count == 1))
        }
        Node::MapList {
            range,
            slot,
            filter,
            func,
        } => {
            let range = eval_cow(range, f)?;
            let mut out = Vec::with_capacity(length_hint(&range));
            for item in iterate(&range)?.iter() {
                f.locals[*slot] = item.into_owned();
                if let Some(filter) = filter
                    && !expect_bool(eval(filter, f)?)?
                {
                    continue;
                }
                out.push(eval(func, f)?);
            }
            Ok(Value::List(Arc::new(out)))
        }
        Node::Filter { range, slot, pred } => {
            let range = eval_cow(range, f)?;
            let mut out = Vec::with_capacity(length_hint(&range));
            for item in iterate(&range)?.iter() {
                f.locals[*slot] = item.clone().into_owned();
                if expect_bool(eval(pred, f)?)? {
                    out.push(item.into_owned());
                }
            }
            Ok(Value::List(Arc::new(out)))
        }
        Node::Fold(fold) => {
            let range = eval_cow(&fold.range, f)?;
            f.locals[fold.accu_slot] = eval(&fold.init, f)?;
            for item in iterate(&range)?.iter() {
                f.locals[fold.iter_slot] = item.into_owned();
                if !expect_bool(eval(&fold.cond, f)?)? {
                    break;
                }
                f.locals[fold.accu_slot] = eval(&fold.step, f)?;
            }
            eval(&fold.result, f)
        }
        Node::Builtin {
            builtin: Builtin::Method(_),
            receiver: true,
            args,
        } if args.len() <= 2 => eval_num(node, f).map(Num::into_value),
        Node::Builtin {
            builtin,
            receiver,
            args,
        } => match args.as_slice() {
            [a] => {
                let a = eval(a, f)?;
                call_builtin(*builtin, *receiver, &[a], f)
            }
            [a, b] => {
                let a = eval(a, f)?;
                let b = eval(b, f)?;
                call_builtin(*builtin, *receiver, &[a, b], f)
            }
            args => {
                let values = args
                    .iter()
                    .map(|a| eval(a, f))
                    .collect::<Result<Vec<_>, _>>()?;
                call_builtin(*builtin, *receiver, &values, f)
            }
        },
        Node::Matches(subject, re) => match eval(subject, f)? {
            Value::String(s) => {
                f.charge_size(s.len())?;
                Ok(Value::Bool(re.is_match(&s)))
            }
            other => Err(EvalError::runtime(format!(
                "matches() needs a string, got {}",
                type_name(&other)
            ))),
        },
        Node::Delegate(d) => {
            let target = d.target.as_ref().map(|t| eval(t, f)).transpose()?;
            let args = d
                .args
                .iter()
                .map(|a| eval(a, f))
                .collect::<Result<Vec<_>, _>>()?;
            precheck_delegate(&d.name, target.as_ref(), &args, f)?;
            let result = invoke(base_context(), &d.call, target, &args)?;
            f.charge_size(value_size(&result))?;
            Ok(result)
        }
    }
}

/// The values of a path's index steps; paths rarely have more than one, so the first is kept inline.
#[derive(Default)]
struct Indexes {
    first: Option<Value>,
    rest: Vec<Value>,
}

impl Indexes {
    fn push(&mut self, value: Value) {
        if self.first.is_none() {
            self.first = Some(value);
        } else {
            self.rest.push(value);
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Value> {
        self.first.iter().chain(self.rest.iter())
    }
}

/// A number as the evaluator carries it between decimal operations: unboxed when it is a decimal, so a chain
/// like `a.sub(b).abs().isLessThanOrEqual(c)` allocates nothing.
enum Num {
    Dec(Decimal),
    Val(Value),
}

impl Num {
    fn into_value(self) -> Value {
        match self {
            Num::Dec(d) => decimal_value(d),
            Num::Val(v) => v,
        }
    }

    fn of(value: &Value) -> Num {
        match as_decimal(value) {
            Some(d) => Num::Dec(d),
            None => Num::Val(value.clone()),
        }
    }

    /// A decimal, or an int or uint read exactly as one.
    fn decimal(&self) -> Option<Decimal> {
        match self {
            Num::Dec(d) => Some(*d),
            Num::Val(v) => decimal_operand(v),
        }
    }

    fn is_decimal(&self) -> bool {
        match self {
            Num::Dec(_) => true,
            Num::Val(v) => as_decimal(v).is_some(),
        }
    }
}

fn eval_num(node: &Node, f: &mut Frame<'_>) -> Result<Num, EvalError> {
    match node {
        Node::Const(v) => {
            f.step(1)?;
            Ok(Num::of(v))
        }
        Node::Path(path) => {
            f.step(1)?;
            Ok(Num::of(resolve(path, f)?))
        }
        Node::Builtin {
            builtin: Builtin::Method(op),
            receiver: true,
            args,
        } if args.len() <= 2 => {
            f.step(1)?;
            let this = eval_num(&args[0], f)?;
            let Num::Dec(d) = this else {
                // Not a decimal: the library decides (a quantity, a version, or an error).
                let mut values = vec![this.into_value()];
                for arg in &args[1..] {
                    values.push(eval(arg, f)?);
                }
                return call_builtin(Builtin::Method(*op), true, &values, f).map(Num::Val);
            };
            let arg = match args.get(1) {
                Some(a) => Some(eval_num(a, f)?),
                None => None,
            };
            let operand = arg.as_ref().map(|a| match a {
                Num::Dec(x) => Operand::Dec(*x),
                Num::Val(v) => Operand::Val(v),
            });
            Ok(match decimal_apply(*op, d, operand, args.len() - 1)? {
                DecOut::Dec(x) => Num::Dec(x),
                DecOut::Int(i) => Num::Val(Value::Int(i)),
                DecOut::Bool(b) => Num::Val(Value::Bool(b)),
            })
        }
        other => Ok(Num::Val(eval(other, f)?)),
    }
}

/// Operators with a decimal operand, computed without boxing; `None` when neither operand is a decimal.
fn decimal_binary(op: BinOp, l: &Num, r: &Num) -> Result<Option<Value>, EvalError> {
    if !l.is_decimal() && !r.is_decimal() {
        return Ok(None);
    }
    let (Some(x), Some(y)) = (l.decimal(), r.decimal()) else {
        return match op {
            // Unequal types are unequal, as everywhere in CEL.
            BinOp::Eq => Ok(Some(Value::Bool(false))),
            BinOp::Ne => Ok(Some(Value::Bool(true))),
            _ => Ok(None),
        };
    };
    let value = match op {
        BinOp::Eq => Value::Bool(x == y),
        BinOp::Ne => Value::Bool(x != y),
        BinOp::Lt => Value::Bool(x < y),
        BinOp::Le => Value::Bool(x <= y),
        BinOp::Gt => Value::Bool(x > y),
        BinOp::Ge => Value::Bool(x >= y),
        BinOp::In => return Ok(None),
        BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div | BinOp::Rem => {
            if matches!(op, BinOp::Div | BinOp::Rem) && y.is_zero() {
                return Err(EvalError::runtime("division by zero"));
            }
            let result = match op {
                BinOp::Add => x.checked_add(y),
                BinOp::Sub => x.checked_sub(y),
                BinOp::Mul => x.checked_mul(y),
                BinOp::Div => x.checked_div(y),
                _ => x.checked_rem(y),
            };
            decimal_value(result.ok_or_else(|| EvalError::runtime("decimal overflow"))?)
        }
    };
    Ok(Some(value))
}

/// The value a path leads to, borrowed from the frame's data.
fn resolve<'f>(path: &Path, f: &'f mut Frame<'_>) -> Result<&'f Value, EvalError> {
    if path.indexed {
        let (root, indexes) = path_start(path, f)?;
        return match root {
            Some(root) => walk(root, &path.steps, &indexes),
            None => {
                let Root::Local(slot) = path.root else {
                    unreachable!("only locals live in the frame")
                };
                walk(&f.locals[slot], &path.steps, &indexes)
            }
        };
    }
    f.step(path.steps.len() as u64)?;
    let mut value: &Value = match path.root {
        Root::Record => f.record,
        Root::Lookup(i) => f
            .lookups
            .get(i)
            .ok_or_else(|| EvalError::runtime("lookup data is missing"))?,
        Root::Contract => f.contract,
        Root::Flow => f.flow,
        Root::Local(slot) => &f.locals[slot],
    };
    for step in &path.steps {
        if let Step::Member(key, slot) = step {
            value = member(value, key, *slot)?.ok_or_else(|| EvalError::no_such_key(key))?;
        }
    }
    Ok(value)
}

/// Evaluates a path's indexes and finds its root. The root is `None` for a comprehension variable, which lives
/// in the frame; every other root outlives the frame, so walking from it borrows nothing from the frame.
fn path_start<'r>(
    path: &Path,
    f: &mut Frame<'r>,
) -> Result<(Option<&'r Value>, Indexes), EvalError> {
    let mut indexes = Indexes::default();
    for step in &path.steps {
        match step {
            Step::Index(node) => indexes.push(eval(node, f)?),
            Step::Member(..) => f.step(1)?,
        }
    }
    let root = match path.root {
        Root::Record => Some(f.record),
        Root::Lookup(i) => Some(
            f.lookups
                .get(i)
                .ok_or_else(|| EvalError::runtime("lookup data is missing"))?,
        ),
        Root::Contract => Some(f.contract),
        Root::Flow => Some(f.flow),
        Root::Local(_) => None,
    };
    Ok((root, indexes))
}

fn walk<'v>(root: &'v Value, steps: &[Step], indexes: &Indexes) -> Result<&'v Value, EvalError> {
    let mut value = root;
    let mut next_index = indexes.iter();
    for step in steps {
        value = match step {
            Step::Member(key, slot) => {
                member(value, key, *slot)?.ok_or_else(|| EvalError::no_such_key(key))?
            }
            Step::Index(_) => {
                index_ref(value, next_index.next().expect("one value per index step"))?
            }
        };
    }
    Ok(value)
}

/// Evaluates without copying when the value is (part of) the record, a lookup, `contract` or `flow`.
fn eval_cow<'r>(node: &Node, f: &mut Frame<'r>) -> Result<Cow<'r, Value>, EvalError> {
    match node {
        Node::Path(path) if !matches!(path.root, Root::Local(_)) => {
            f.step(1)?;
            let (root, indexes) = path_start(path, f)?;
            walk(root.expect("not a local"), &path.steps, &indexes).map(Cow::Borrowed)
        }
        Node::Record => {
            f.step(1)?;
            Ok(Cow::Borrowed(f.record))
        }
        Node::Lookup(i) => {
            f.step(1)?;
            let lookups = f.lookups;
            lookups
                .get(*i)
                .map(Cow::Borrowed)
                .ok_or_else(|| EvalError::runtime("lookup data is missing"))
        }
        other => eval(other, f).map(Cow::Owned),
    }
}

fn logical(l: &Node, r: &Node, f: &mut Frame<'_>, or: bool) -> Result<Value, EvalError> {
    // For `&&` the deciding value is false, for `||` it is true.
    let decisive = or;
    let left = match eval(l, f) {
        Ok(Value::Bool(b)) if b == decisive => return Ok(Value::Bool(decisive)),
        Ok(Value::Bool(_)) => Ok(()),
        Ok(other) => Err(EvalError::runtime(format!(
            "expected a bool, got {}",
            type_name(&other)
        ))),
        Err(e) if e.is_fatal() => return Err(e),
        Err(e) => Err(e),
    };
    match eval(r, f) {
        Ok(Value::Bool(b)) if b == decisive => Ok(Value::Bool(decisive)),
        Ok(Value::Bool(b)) => left.map(|_| Value::Bool(b)),
        Ok(other) => left.and(Err(EvalError::runtime(format!(
            "expected a bool, got {}",
            type_name(&other)
        )))),
        Err(e) if e.is_fatal() => Err(e),
        Err(e) => left.and(Err(e)),
    }
}

fn quantifier(
    range: &Node,
    slot: usize,
    pred: &Node,
    f: &mut Frame<'_>,
    exists: bool,
) -> Result<Value, EvalError> {
    let range = eval_cow(range, f)?;
    let mut error = None;
    for item in iterate(&range)?.iter() {
        f.locals[slot] = item.into_owned();
        match eval(pred, f) {
            Ok(Value::Bool(b)) if b == exists => return Ok(Value::Bool(exists)),
            Ok(Value::Bool(_)) => {}
            Ok(other) => {
                error.get_or_insert_with(|| {
                    EvalError::runtime(format!("expected a bool, got {}", type_name(&other)))
                });
            }
            Err(e) if e.is_fatal() => return Err(e),
            Err(e) => {
                error.get_or_insert(e);
            }
        }
    }
    match error {
        Some(e) => Err(e),
        None => Ok(Value::Bool(!exists)),
    }
}

fn index(operand: &Value, index: &Value) -> Result<Value, EvalError> {
    index_ref(operand, index).cloned()
}

fn index_ref<'v>(operand: &'v Value, index: &Value) -> Result<&'v Value, EvalError> {
    match (operand, index) {
        (Value::List(list), Value::Int(_) | Value::UInt(_)) => {
            let i = match index {
                Value::Int(i) => usize::try_from(*i).ok(),
                Value::UInt(u) => usize::try_from(*u).ok(),
                _ => None,
            };
            i.and_then(|i| list.get(i)).ok_or_else(|| {
                // The index itself is not shown: it may be a record's value.
                EvalError::runtime(format!("index out of bounds (size {})", list.len()))
            })
        }
        (Value::Map(map), key) => {
            let key_ref = KeyRef::try_from(key).map_err(|v| {
                EvalError::runtime(format!("a {} cannot be a map key", type_name(&v)))
            })?;
            map.get(&key_ref)
                .ok_or_else(|| EvalError::no_such_key(&KeyText(key)))
        }
        (Value::Opaque(_), Value::String(name))
            if as_struct(operand).is_some() || as_table(operand).is_some() =>
        {
            named_member(operand, name).ok_or_else(|| EvalError::no_such_key(&KeyText(index)))
        }
        (operand, index) => Err(EvalError::no_overload("[]", operand, index)),
    }
}

/// A key as an error message shows it.
struct KeyText<'a>(&'a Value);

impl fmt::Display for KeyText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Value::String(s) => f.write_str(s),
            Value::Int(i) => write!(f, "{i}"),
            Value::UInt(u) => write!(f, "{u}"),
            Value::Bool(b) => write!(f, "{b}"),
            other => f.write_str(&type_name(other)),
        }
    }
}

fn negate(value: Value) -> Result<Value, EvalError> {
    if let Some(d) = as_decimal(&value) {
        return Ok(decimal_value(-d));
    }
    match value {
        Value::Int(i) => i
            .checked_neg()
            .map(Value::Int)
            .ok_or_else(|| EvalError::runtime("negation overflows")),
        Value::Float(x) => Ok(Value::Float(-x)),
        Value::Duration(d) => Ok(Value::Duration(-d)),
        other => Err(EvalError::runtime(format!(
            "no such overload: -{}",
            type_name(&other)
        ))),
    }
}

/// A decimal operand, or an int taken exactly as a decimal.
fn decimal_operand(value: &Value) -> Option<Decimal> {
    match value {
        Value::Int(i) => Some(Decimal::from(*i)),
        Value::UInt(u) => Some(Decimal::from(*u)),
        other => as_decimal(other),
    }
}

/// Equality as CEL defines it (numbers compare across int, uint and double; other type mismatches are simply
/// unequal), extended to decimals: a decimal equals a decimal or an int with the same value.
pub(crate) fn equal(a: &Value, b: &Value) -> bool {
    if let (Value::Opaque(_), _) | (_, Value::Opaque(_)) = (a, b)
        && (as_struct(a).is_some()
            || as_table(a).is_some()
            || as_struct(b).is_some()
            || as_table(b).is_some())
    {
        // Objects compare as the maps they stand for; rare enough to convert.
        return equal(&to_cel(a), &to_cel(b));
    }
    if as_decimal(a).is_some() || as_decimal(b).is_some() {
        return match (decimal_operand(a), decimal_operand(b)) {
            (Some(x), Some(y)) => x == y,
            _ => false,
        };
    }
    match (a, b) {
        (Value::List(x), Value::List(y)) => {
            x.len() == y.len() && x.iter().zip(y.iter()).all(|(x, y)| equal(x, y))
        }
        (Value::Map(x), Value::Map(y)) => {
            x.map.len() == y.map.len()
                && x.map
                    .iter()
                    .all(|(k, v)| y.map.get(k).is_some_and(|w| equal(v, w)))
        }
        (Value::Float(x), Value::Float(y)) => x == y,
        _ => a == b,
    }
}

fn compare(a: &Value, b: &Value) -> Result<Ordering, EvalError> {
    if (as_decimal(a).is_some() || as_decimal(b).is_some())
        && let (Some(x), Some(y)) = (decimal_operand(a), decimal_operand(b))
    {
        return Ok(x.cmp(&y));
    }
    match (a, b) {
        (Value::Map(_) | Value::List(_) | Value::Opaque(_), _)
        | (_, Value::Map(_) | Value::List(_) | Value::Opaque(_)) => {
            Err(EvalError::no_overload("<", a, b))
        }
        _ => a
            .partial_cmp(b)
            .ok_or_else(|| EvalError::no_overload("<", a, b)),
    }
}

fn binary(op: BinOp, l: Value, r: Value, f: &mut Frame<'_>) -> Result<Value, EvalError> {
    let cmp = |o: Ordering| -> bool {
        match op {
            BinOp::Lt => o == Ordering::Less,
            BinOp::Le => o != Ordering::Greater,
            BinOp::Gt => o == Ordering::Greater,
            _ => o != Ordering::Less,
        }
    };
    match op {
        BinOp::Eq => Ok(Value::Bool(equal(&l, &r))),
        BinOp::Ne => Ok(Value::Bool(!equal(&l, &r))),
        BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => {
            compare(&l, &r).map(|o| Value::Bool(cmp(o)))
        }
        BinOp::In => contains(&l, &r, f),
        BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div | BinOp::Rem => {
            if as_decimal(&l).is_some() || as_decimal(&r).is_some() {
                let (Some(x), Some(y)) = (decimal_operand(&l), decimal_operand(&r)) else {
                    return Err(EvalError::no_overload(op_symbol(op), &l, &r));
                };
                if matches!(op, BinOp::Div | BinOp::Rem) && y.is_zero() {
                    return Err(EvalError::runtime("division by zero"));
                }
                let result = match op {
                    BinOp::Add => x.checked_add(y),
                    BinOp::Sub => x.checked_sub(y),
                    BinOp::Mul => x.checked_mul(y),
                    BinOp::Div => x.checked_div(y),
                    _ => x.checked_rem(y),
                };
                return result
                    .map(decimal_value)
                    .ok_or_else(|| EvalError::runtime("decimal overflow"));
            }
            if op == BinOp::Add {
                let size = match (&l, &r) {
                    (Value::String(a), Value::String(b)) => a.len() + b.len(),
                    (Value::List(a), Value::List(b)) => (a.len() + b.len()) * 16,
                    _ => 0,
                };
                f.charge_size(size)?;
                // Concatenated into an exactly sized string: the library's version copies the left operand
                // first and grows it after.
                if let (Value::String(a), Value::String(b)) = (&l, &r) {
                    let mut s = String::with_capacity(a.len() + b.len());
                    s.push_str(a);
                    s.push_str(b);
                    return Ok(Value::String(Arc::new(s)));
                }
            }
            let result = match op {
                BinOp::Add => l + r,
                BinOp::Sub => l - r,
                BinOp::Mul => l * r,
                BinOp::Div => l / r,
                _ => l % r,
            };
            result.map_err(EvalError::from)
        }
    }
}

/// `l in r`: membership in a list, or a key of a map, struct or table.
fn contains(l: &Value, r: &Value, f: &mut Frame<'_>) -> Result<Value, EvalError> {
    match r {
        Value::List(list) => {
            f.step(list.len() as u64)?;
            Ok(Value::Bool(list.iter().any(|x| equal(l, x))))
        }
        Value::Map(map) => match KeyRef::try_from(l) {
            Ok(key) => Ok(Value::Bool(map.get(&key).is_some())),
            Err(_) => Ok(Value::Bool(false)),
        },
        Value::Opaque(_) if as_struct(r).is_some() || as_table(r).is_some() => match l {
            Value::String(name) => Ok(Value::Bool(named_member(r, name).is_some())),
            _ => Ok(Value::Bool(false)),
        },
        _ => Err(EvalError::no_overload("in", l, r)),
    }
}

fn op_symbol(op: BinOp) -> &'static str {
    match op {
        BinOp::Add => "+",
        BinOp::Sub => "-",
        BinOp::Mul => "*",
        BinOp::Div => "/",
        BinOp::Rem => "%",
        _ => "?",
    }
}

fn call_builtin(
    builtin: Builtin,
    receiver: bool,
    args: &[Value],
    f: &mut Frame<'_>,
) -> Result<Value, EvalError> {
    let result = match (builtin, args) {
        (Builtin::Size, [v]) => match v {
            // CEL counts a string's size in code points.
            Value::String(s) => {
                f.charge_size(s.len())?;
                Some(Value::Int(s.chars().count() as i64))
            }
            Value::List(l) => Some(Value::Int(l.len() as i64)),
            Value::Map(m) => Some(Value::Int(m.map.len() as i64)),
            Value::Bytes(b) => Some(Value::Int(b.len() as i64)),
            other => as_struct(other)
                .map(|s| s.len())
                .or_else(|| as_table(other).map(|t| t.entries.len()))
                .map(|n| Value::Int(n as i64)),
        },
        (
            Builtin::Contains | Builtin::StartsWith | Builtin::EndsWith,
            [Value::String(s), Value::String(p)],
        ) => {
            f.charge_size(s.len())?;
            Some(Value::Bool(match builtin {
                Builtin::Contains => s.contains(p.as_str()),
                Builtin::StartsWith => s.starts_with(p.as_str()),
                _ => s.ends_with(p.as_str()),
            }))
        }
        (Builtin::ToString, [v]) => match v {
            Value::String(_) => Some(v.clone()),
            Value::Int(i) => Some(Value::String(Arc::new(i.to_string()))),
            Value::UInt(u) => Some(Value::String(Arc::new(u.to_string()))),
            Value::Bool(b) => Some(Value::String(Arc::new(b.to_string()))),
            Value::Timestamp(t) => Some(Value::String(Arc::new(
                t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            ))),
            other => as_decimal(other).map(|d| Value::String(Arc::new(d.to_string()))),
        },
        (Builtin::ToInt, [v]) => match v {
            Value::Int(_) => Some(v.clone()),
            other => match as_decimal(other) {
                Some(d) => Some(Value::Int(
                    i64::try_from(d.trunc()).map_err(|_| EvalError::runtime("int() overflows"))?,
                )),
                None => None,
            },
        },
        (Builtin::ToDouble, [v]) => match as_decimal(v) {
            // An explicit request for a double: the text round trip is the correctly rounded value.
            Some(d) => Some(Value::Float(
                d.to_string()
                    .parse()
                    .map_err(|_| EvalError::runtime("double() failed"))?,
            )),
            None => None,
        },
        (Builtin::ToDecimal, [v]) => Some(decimal_value(make_decimal(v)?)),
        (Builtin::Method(name), [this, rest @ ..]) if receiver => {
            match decimal_method(name, this, rest) {
                Some(result) => Some(result?),
                None => {
                    return super::cel_env::method_on_other_type(name, this.clone(), rest)
                        .map_err(EvalError::from);
                }
            }
        }
        _ => None,
    };
    match result {
        Some(value) => Ok(value),
        // Not a case the fast path knows: the library implementation decides (and reports its own errors).
        None => {
            let (target, rest) = if receiver {
                (args.first().cloned(), &args[1..])
            } else {
                (None, args)
            };
            let receiver = if receiver {
                CallReceiver::Value
            } else {
                CallReceiver::None
            };
            let call = call_expression(builtin.name(), receiver, rest.len());
            Ok(invoke(base_context(), &call, target, rest)?)
        }
    }
}

/// Refuses library calls whose output would be far larger than their input before they allocate it.
fn precheck_delegate(
    name: &str,
    target: Option<&Value>,
    args: &[Value],
    f: &mut Frame<'_>,
) -> Result<(), EvalError> {
    let too_big = || EvalError {
        kind: EvalErrorKind::Budget,
        message: format!("{name}() would build a value beyond the step budget"),
    };
    match name {
        "lists.range" => {
            if let Some(Value::Int(n)) = args.first()
                && (*n < 0 || *n as u64 > f.budget)
            {
                return Err(too_big());
            }
        }
        "replace" => {
            if let (Some(Value::String(s)), Some(Value::String(new))) = (target, args.get(1)) {
                let worst = (s.len() + 1).saturating_mul(new.len().max(1));
                if (worst / BYTES_PER_STEP) as u64 > f.budget {
                    return Err(too_big());
                }
            }
        }
        _ => {}
    }
    let input: usize = target.iter().copied().chain(args).map(value_size).sum();
    f.charge_size(input)
}

/// A rough size in bytes, for charging the budget.
fn value_size(value: &Value) -> usize {
    match value {
        Value::String(s) => s.len(),
        Value::Bytes(b) => b.len(),
        Value::List(l) => l.len() * 16,
        Value::Map(m) => m.map.len() * 32,
        other => as_struct(other).map_or(0, |s| s.fields.len() * 32),
    }
}
