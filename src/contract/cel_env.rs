//! The CEL environment contracts are written in: the `Decimal` type for money, the function catalogue (the `cel`
//! standard functions, the Kubernetes extension library, and the decimal functions), and the conversions
//! between CEL values and JSON.
//!
//! Expressions are "the Kubernetes language for validation rules", so the Kubernetes library (strings, lists,
//! sets, regex, quantity, semver, math, ...) is registered as it is on an API server. The decimal functions
//! are registered after it and share names with the quantity functions (`add`, `sub`, `isLessThan`,
//! `compareTo`, ...): they dispatch on the receiver, handle a `Decimal` themselves and hand anything else to the
//! Kubernetes implementation, so `quantity("1Gi").add(quantity("1Mi"))` keeps working.
//!
//! Money never passes through `f64` here: a decimal is parsed from its text, computed with `rust_decimal`'s
//! checked arithmetic and written back as text (see [`decimal_to_json`]).

use std::fmt;
use std::sync::{Arc, LazyLock};

use kube::core::cel::KubeCelExt;
use kube::core::cel::cel::common::ast::{CallExpr, Expr};
use kube::core::cel::cel::extractors::{Arguments, This};
use kube::core::cel::cel::objects::{Key, Map, Opaque, Value};
use kube::core::cel::cel::{Context, ExecutionError, IdedExpr, ResolveResult};
use rust_decimal::Decimal;

/// CEL type name of a decimal, as `type_name` and error messages show it.
pub const DECIMAL_TYPE: &str = "meshline.Decimal";

/// An exact decimal (money) as an opaque CEL value.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CelDecimal(pub Decimal);

impl fmt::Debug for CelDecimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "decimal(\"{}\")", self.0)
    }
}

impl Opaque for CelDecimal {
    fn runtime_type_name(&self) -> &str {
        DECIMAL_TYPE
    }

    fn json(&self) -> Option<serde_json::Value> {
        Some(decimal_to_json(self.0))
    }
}

pub(crate) fn decimal_value(d: Decimal) -> Value {
    Value::Opaque(Arc::new(CelDecimal(d)))
}

pub(crate) fn as_decimal(value: &Value) -> Option<Decimal> {
    match value {
        Value::Opaque(o) => o.downcast_ref::<CelDecimal>().map(|d| d.0),
        _ => None,
    }
}

/// Parses the text of a decimal: an optional `-`, digits, and an optional fraction, or JSON's exponent form.
/// `rust_decimal` alone would also accept `1_000`, which is not a number anywhere else in a contract.
pub(crate) fn parse_decimal(text: &str) -> Result<Decimal, DecimalError> {
    let bytes = text.as_bytes();
    let mut i = usize::from(bytes.first() == Some(&b'-'));
    let int_start = i;
    while i < bytes.len() && bytes[i].is_ascii_digit() {
        i += 1;
    }
    if i == int_start {
        return Err(DecimalError::Syntax);
    }
    if i < bytes.len() && bytes[i] == b'.' {
        i += 1;
        let frac_start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if i == frac_start {
            return Err(DecimalError::Syntax);
        }
    }
    let scientific = i < bytes.len() && (bytes[i] == b'e' || bytes[i] == b'E');
    if scientific {
        i += 1;
        if i < bytes.len() && (bytes[i] == b'+' || bytes[i] == b'-') {
            i += 1;
        }
        let exp_start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if i == exp_start {
            return Err(DecimalError::Syntax);
        }
    }
    if i != bytes.len() {
        return Err(DecimalError::Syntax);
    }
    if !scientific {
        return Decimal::from_str_exact(text).map_err(|_| DecimalError::OutOfRange);
    }
    // The exponent form is applied by hand, exactly: rust_decimal's own parser rounds past 28 places.
    let split = text.find(['e', 'E']).unwrap_or(text.len());
    let mut d = Decimal::from_str_exact(&text[..split]).map_err(|_| DecimalError::OutOfRange)?;
    let exponent = text[split + 1..].trim_start_matches('+');
    if exponent.trim_start_matches('-').len() > 3 {
        return Err(DecimalError::OutOfRange);
    }
    let exponent: i32 = exponent.parse().map_err(|_| DecimalError::Syntax)?;
    if exponent >= 0 {
        for _ in 0..exponent {
            d = d
                .checked_mul(Decimal::TEN)
                .ok_or(DecimalError::OutOfRange)?;
        }
    } else {
        let scale = d.scale() + exponent.unsigned_abs();
        d.set_scale(scale).map_err(|_| DecimalError::OutOfRange)?;
    }
    Ok(d)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DecimalError {
    Syntax,
    OutOfRange,
}

impl fmt::Display for DecimalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecimalError::Syntax => f.write_str("not a decimal number"),
            DecimalError::OutOfRange => f.write_str(
                "beyond the decimal range (at most 28 significant digits and 28 decimal places)",
            ),
        }
    }
}

/// Writes a decimal into JSON without going through arithmetic in `f64`.
///
/// An integral decimal that fits an `i64` becomes a JSON integer. Any other decimal with at most 15 significant
/// digits becomes a JSON number: every such decimal is the shortest representation of the nearest `f64`, so the
/// printed text is exactly the decimal (trailing zeros aside: `12.50` prints as `12.5`), and a reader parsing it
/// as `f64` or as a decimal gets the intended value. A decimal with more significant digits would not survive
/// that, so it becomes a JSON string of its exact text.
pub fn decimal_to_json(d: Decimal) -> serde_json::Value {
    let n = d.normalize();
    if n.scale() == 0
        && let Ok(i) = i64::try_from(n.mantissa())
    {
        return serde_json::Value::from(i);
    }
    let mantissa = n.mantissa().unsigned_abs();
    let digits = mantissa.checked_ilog10().map_or(1, |l| l + 1);
    if digits <= 15
        && let Some(number) =
            serde_json::Number::from_f64(exact_f64(n.is_sign_negative(), mantissa, n.scale()))
    {
        return serde_json::Value::Number(number);
    }
    serde_json::Value::String(n.to_string())
}

/// A declared object (the record, one of its nested objects, a lookup entry) with its members by position.
///
/// Members are resolved to positions when a contract is compiled, so reading `record.amount` is an index, not a
/// hash lookup; the names are shared by every value of the same object schema. Whenever a value leaves the
/// contract evaluator (into a library function), it becomes an ordinary CEL map (see [`to_cel`]).
#[derive(PartialEq, Eq)]
pub(crate) struct Struct {
    pub(crate) keys: Arc<[Key]>,
    pub(crate) fields: Fields,
}

/// The member values of a struct. Up to eight live inside the struct itself, so a line item costs one
/// allocation, not two.
#[derive(PartialEq, Eq)]
pub(crate) enum Fields {
    Inline(usize, [Option<Value>; 8]),
    Heap(Box<[Option<Value>]>),
}

impl Fields {
    pub(crate) fn new(len: usize) -> Fields {
        if len <= 8 {
            Fields::Inline(len, Default::default())
        } else {
            Fields::Heap(vec![None; len].into_boxed_slice())
        }
    }
}

impl std::ops::Deref for Fields {
    type Target = [Option<Value>];

    fn deref(&self) -> &[Option<Value>] {
        match self {
            Fields::Inline(len, values) => &values[..*len],
            Fields::Heap(values) => values,
        }
    }
}

impl std::ops::DerefMut for Fields {
    fn deref_mut(&mut self) -> &mut [Option<Value>] {
        match self {
            Fields::Inline(len, values) => &mut values[..*len],
            Fields::Heap(values) => values,
        }
    }
}

impl fmt::Debug for Struct {
    // Values are left out on purpose: a debug print must not carry personal data into a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{{{} fields}}",
            self.fields.iter().filter(|v| v.is_some()).count()
        )
    }
}

impl Opaque for Struct {
    fn runtime_type_name(&self) -> &str {
        "map"
    }

    fn json(&self) -> Option<serde_json::Value> {
        let mut out = serde_json::Map::new();
        for (k, v) in self.present() {
            out.insert(k.to_string(), value_to_json(v).ok()?);
        }
        Some(serde_json::Value::Object(out))
    }
}

impl Struct {
    pub(crate) fn get(&self, name: &str) -> Option<&Value> {
        let i = self
            .keys
            .iter()
            .position(|k| matches!(k, Key::String(s) if s.as_str() == name))?;
        self.fields[i].as_ref()
    }

    pub(crate) fn present(&self) -> impl Iterator<Item = (&Key, &Value)> {
        self.keys
            .iter()
            .zip(self.fields.iter())
            .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
    }

    pub(crate) fn len(&self) -> usize {
        self.fields.iter().filter(|v| v.is_some()).count()
    }
}

pub(crate) fn as_struct(value: &Value) -> Option<&Struct> {
    match value {
        Value::Opaque(o) => o.downcast_ref::<Struct>(),
        _ => None,
    }
}

/// FxHash: a few cycles per word instead of SipHash's tens. Lookup tables are keyed by the ERP's data, and a
/// record can only query them, never insert, so the table's layout is not the record's to choose.
#[derive(Default, Clone, Copy)]
pub(crate) struct FxHasher(u64);

impl std::hash::Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            self.write_u64(u64::from_le_bytes(chunk.try_into().expect("eight bytes")));
        }
        let tail = chunks.remainder();
        if !tail.is_empty() {
            let word = tail
                .iter()
                .rev()
                .fold(0u64, |w, &b| (w << 8) | u64::from(b));
            self.write_u64(word);
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.write_u64(u64::from(i));
    }

    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

pub(crate) type FxBuild = std::hash::BuildHasherDefault<FxHasher>;

/// A lookup table: entries (structs) by string key.
#[derive(PartialEq, Eq)]
pub(crate) struct Table {
    /// The member names of every entry (the lookup's declared fields).
    pub(crate) keys: Arc<[Key]>,
    pub(crate) entries: std::collections::HashMap<String, Value, FxBuild>,
}

impl fmt::Debug for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{{} entries}}", self.entries.len())
    }
}

impl Opaque for Table {
    fn runtime_type_name(&self) -> &str {
        "map"
    }
}

pub(crate) fn as_table(value: &Value) -> Option<&Table> {
    match value {
        Value::Opaque(o) => o.downcast_ref::<Table>(),
        _ => None,
    }
}

/// The value as the `cel` library knows it: structs and tables become maps, recursively. Only values handed
/// to a library function pay for this.
pub(crate) fn to_cel(value: &Value) -> Value {
    if let Some(s) = as_struct(value) {
        let map = s.present().map(|(k, v)| (k.clone(), to_cel(v))).collect();
        return Value::Map(Map { map: Arc::new(map) });
    }
    if let Some(t) = as_table(value) {
        let map = t
            .entries
            .iter()
            .map(|(k, v)| (Key::String(Arc::new(k.clone())), to_cel(v)))
            .collect();
        return Value::Map(Map { map: Arc::new(map) });
    }
    match value {
        Value::List(items) if items.iter().any(needs_conversion) => {
            Value::List(Arc::new(items.iter().map(to_cel).collect()))
        }
        Value::Map(map) if map.map.values().any(needs_conversion) => Value::Map(Map {
            map: Arc::new(
                map.map
                    .iter()
                    .map(|(k, v)| (k.clone(), to_cel(v)))
                    .collect(),
            ),
        }),
        other => other.clone(),
    }
}

fn needs_conversion(value: &Value) -> bool {
    match value {
        Value::List(items) => items.iter().any(needs_conversion),
        Value::Map(map) => map.map.values().any(needs_conversion),
        other => as_struct(other).is_some() || as_table(other).is_some(),
    }
}

/// The `f64` nearest to `mantissa / 10^scale`, as parsing the decimal's text would give, without the text:
/// both operands are exact in `f64` (a mantissa of at most 15 digits is below 2^53, and 10^scale for scale up
/// to 22 is exact), and IEEE division rounds correctly. Larger scales take the text route.
fn exact_f64(negative: bool, mantissa: u128, scale: u32) -> f64 {
    const POWERS: [f64; 23] = [
        1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
        1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
    ];
    let magnitude = match POWERS.get(scale as usize) {
        Some(power) => mantissa as f64 / power,
        None => format!("{mantissa}e-{scale}").parse().unwrap_or(f64::NAN),
    };
    if negative { -magnitude } else { magnitude }
}

/// Converts a CEL value into the JSON the sink receives. Timestamps become RFC 3339 strings, durations CEL's
/// duration text, decimals follow [`decimal_to_json`].
pub(crate) fn value_to_json(value: &Value) -> Result<serde_json::Value, String> {
    Ok(match value {
        Value::Null => serde_json::Value::Null,
        Value::Bool(b) => serde_json::Value::Bool(*b),
        Value::Int(i) => serde_json::Value::from(*i),
        Value::UInt(u) => serde_json::Value::from(*u),
        Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(serde_json::Value::Number)
            .ok_or_else(|| "a NaN or infinite double cannot be written to JSON".to_string())?,
        Value::String(s) => serde_json::Value::String(s.as_str().to_string()),
        Value::Timestamp(t) => {
            serde_json::Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        }
        Value::Duration(d) => serde_json::Value::String(duration_text(d)),
        Value::List(items) => {
            serde_json::Value::Array(items.iter().map(value_to_json).collect::<Result<_, _>>()?)
        }
        Value::Map(map) => {
            let mut out = serde_json::Map::new();
            for (k, v) in map.map.iter() {
                let key = match k {
                    Key::String(s) => s.as_str().to_string(),
                    other => other.to_string(),
                };
                out.insert(key, value_to_json(v)?);
            }
            serde_json::Value::Object(out)
        }
        Value::Opaque(_) if as_struct(value).is_some() => {
            let s = as_struct(value).expect("checked");
            let mut out = serde_json::Map::new();
            for (k, v) in s.present() {
                out.insert(k.to_string(), value_to_json(v)?);
            }
            serde_json::Value::Object(out)
        }
        Value::Opaque(_) if as_table(value).is_some() => {
            let t = as_table(value).expect("checked");
            let mut out = serde_json::Map::new();
            for (k, v) in &t.entries {
                out.insert(k.clone(), value_to_json(v)?);
            }
            serde_json::Value::Object(out)
        }
        Value::Opaque(o) => match o.json() {
            Some(json) => json,
            None => {
                return Err(format!(
                    "a {} cannot be written to JSON",
                    o.runtime_type_name()
                ));
            }
        },
        Value::Bytes(_) => {
            return Err("bytes cannot be written to JSON; convert them with string()".into());
        }
        Value::Function(..) => return Err("a function cannot be written to JSON".into()),
    })
}

/// CEL's text form of a duration: seconds with the fraction they need (`90s`, `1.5s`).
fn duration_text(d: &chrono::Duration) -> String {
    let nanos = d.subsec_nanos().unsigned_abs();
    let sign = if d.num_seconds() == 0 && d.subsec_nanos() < 0 {
        "-"
    } else {
        ""
    };
    if nanos == 0 {
        format!("{}s", d.num_seconds())
    } else {
        let fraction = format!("{nanos:09}");
        format!(
            "{sign}{}.{}s",
            d.num_seconds(),
            fraction.trim_end_matches('0')
        )
    }
}

/// The CEL type name of a value, for error messages (never the value itself).
pub(crate) fn type_name(value: &Value) -> String {
    match value {
        Value::Opaque(o) => o.runtime_type_name().to_string(),
        Value::Float(_) => "double".into(),
        other => other.type_of().to_string(),
    }
}

/// The Kubernetes environment without the decimal functions: the target of delegation for receivers that are
/// not decimals (quantities, semantic versions).
static KUBERNETES: LazyLock<Context<'static>> = LazyLock::new(|| {
    let mut ctx = Context::default();
    ctx.register_all();
    ctx
});

/// The full environment: standard functions, the Kubernetes library and the decimal functions.
static BASE: LazyLock<Context<'static>> = LazyLock::new(|| {
    let mut ctx = Context::default();
    ctx.register_all();
    ctx.add_function("decimal", fn_decimal);
    ctx.add_function("add", fn_add);
    ctx.add_function("sub", fn_sub);
    ctx.add_function("mul", fn_mul);
    ctx.add_function("div", fn_div);
    ctx.add_function("abs", fn_abs);
    ctx.add_function("neg", fn_neg);
    ctx.add_function("round", fn_round);
    ctx.add_function("compareTo", fn_compare_to);
    ctx.add_function("isLessThan", fn_is_less_than);
    ctx.add_function("isLessThanOrEqual", fn_is_less_than_or_equal);
    ctx.add_function("isGreaterThan", fn_is_greater_than);
    ctx.add_function("isGreaterThanOrEqual", fn_is_greater_than_or_equal);
    ctx
});

/// The shared base context: built once per process, never per record.
pub(crate) fn base_context() -> &'static Context<'static> {
    &BASE
}

/// Variable names the delegation calls bind their operands to. `@` cannot start a CEL identifier, so they never
/// collide with a contract's names.
pub(crate) const TARGET_VAR: &str = "@t";
pub(crate) const ARG_VARS: [&str; 8] = ["@a0", "@a1", "@a2", "@a3", "@a4", "@a5", "@a6", "@a7"];

/// Builds the call expression `@t.name(@a0, ...)` (or `name(@a0, ...)`, or `prefix.name(...)` for a
/// namespaced function), which evaluates a function from the catalogue on values computed elsewhere.
pub(crate) fn call_expression(name: &str, receiver: CallReceiver<'_>, arity: usize) -> IdedExpr {
    let ident = |s: &str| IdedExpr {
        id: 0,
        expr: Expr::Ident(s.to_string()),
    };
    let target = match receiver {
        CallReceiver::None => None,
        CallReceiver::Value => Some(Box::new(ident(TARGET_VAR))),
        CallReceiver::Namespace(ns) => Some(Box::new(ident(ns))),
    };
    IdedExpr {
        id: 0,
        expr: Expr::Call(CallExpr {
            func_name: name.to_string(),
            target,
            args: ARG_VARS[..arity.min(ARG_VARS.len())]
                .iter()
                .map(|a| ident(a))
                .collect(),
        }),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CallReceiver<'a> {
    None,
    Value,
    Namespace(&'a str),
}

/// Evaluates a prepared call expression in `ctx` with the receiver and arguments bound. Panics inside a library
/// function become errors: one record must not take a worker down.
pub(crate) fn invoke(
    ctx: &Context<'_>,
    call: &IdedExpr,
    target: Option<Value>,
    args: &[Value],
) -> ResolveResult {
    let mut scope = ctx.new_inner_scope();
    if let Some(target) = target {
        scope.add_variable_from_value(TARGET_VAR, to_cel(&target));
    }
    for (name, arg) in ARG_VARS.iter().zip(args) {
        scope.add_variable_from_value(*name, to_cel(arg));
    }
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Value::resolve(call, &scope)
    })) {
        Ok(result) => result,
        Err(_) => Err(ExecutionError::function_error(
            call_name(call),
            "the function panicked",
        )),
    }
}

fn call_name(call: &IdedExpr) -> &str {
    match &call.expr {
        Expr::Call(c) => &c.func_name,
        _ => "?",
    }
}

/// Hands a method call on a non-decimal receiver to the Kubernetes implementation of the same name.
pub(crate) fn delegate_to_kubernetes(name: &str, this: Value, args: &[Value]) -> ResolveResult {
    invoke(
        &KUBERNETES,
        &call_expression(name, CallReceiver::Value, args.len()),
        Some(this),
        args,
    )
}

fn decimal_arg(name: &str, value: &Value) -> Result<Decimal, ExecutionError> {
    match value {
        Value::Int(i) => Ok(Decimal::from(*i)),
        Value::UInt(u) => Ok(Decimal::from(*u)),
        other => as_decimal(other).ok_or_else(|| {
            ExecutionError::function_error(
                name,
                format!("expected a decimal or an int, got {}", type_name(other)),
            )
        }),
    }
}

/// `decimal(string|int) -> Decimal`.
pub(crate) fn make_decimal(value: &Value) -> Result<Decimal, ExecutionError> {
    match value {
        Value::String(s) => parse_decimal(s).map_err(|e| {
            ExecutionError::function_error("decimal", format!("{:?} is {e}", s.as_str()))
        }),
        Value::Int(i) => Ok(Decimal::from(*i)),
        Value::UInt(u) => Ok(Decimal::from(*u)),
        other => match as_decimal(other) {
            Some(d) => Ok(d),
            None => Err(ExecutionError::function_error(
                "decimal",
                format!(
                    "takes a string or an int, not a {} (money is never a double)",
                    type_name(other)
                ),
            )),
        },
    }
}

fn fn_decimal(value: Value) -> ResolveResult {
    make_decimal(&value).map(decimal_value)
}

/// The methods of `Decimal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DecOp {
    Add,
    Sub,
    Mul,
    Div,
    Abs,
    Neg,
    Round,
    CompareTo,
    IsLessThan,
    IsLessThanOrEqual,
    IsGreaterThan,
    IsGreaterThanOrEqual,
}

impl DecOp {
    const ALL: [DecOp; 12] = [
        DecOp::Add,
        DecOp::Sub,
        DecOp::Mul,
        DecOp::Div,
        DecOp::Abs,
        DecOp::Neg,
        DecOp::Round,
        DecOp::CompareTo,
        DecOp::IsLessThan,
        DecOp::IsLessThanOrEqual,
        DecOp::IsGreaterThan,
        DecOp::IsGreaterThanOrEqual,
    ];

    pub(crate) fn of(name: &str) -> Option<DecOp> {
        DecOp::ALL.into_iter().find(|op| op.name() == name)
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            DecOp::Add => "add",
            DecOp::Sub => "sub",
            DecOp::Mul => "mul",
            DecOp::Div => "div",
            DecOp::Abs => "abs",
            DecOp::Neg => "neg",
            DecOp::Round => "round",
            DecOp::CompareTo => "compareTo",
            DecOp::IsLessThan => "isLessThan",
            DecOp::IsLessThanOrEqual => "isLessThanOrEqual",
            DecOp::IsGreaterThan => "isGreaterThan",
            DecOp::IsGreaterThanOrEqual => "isGreaterThanOrEqual",
        }
    }

    /// Methods that exist for decimals only: on another receiver they are an error, not a delegation.
    fn decimal_only(self) -> bool {
        matches!(
            self,
            DecOp::Mul | DecOp::Div | DecOp::Abs | DecOp::Neg | DecOp::Round
        )
    }
}

/// An argument of a decimal method: a decimal the evaluator holds unboxed, or any value.
pub(crate) enum Operand<'v> {
    Dec(Decimal),
    Val(&'v Value),
}

/// The result of a decimal method, unboxed.
pub(crate) enum DecOut {
    Dec(Decimal),
    Int(i64),
    Bool(bool),
}

/// The decimal methods themselves, shared by the CEL functions below and the contract evaluator (which calls
/// them without boxing intermediate results). `argc` is the number of arguments given, for arity errors.
pub(crate) fn decimal_apply(
    op: DecOp,
    d: Decimal,
    arg: Option<Operand<'_>>,
    argc: usize,
) -> Result<DecOut, ExecutionError> {
    let name = op.name();
    let operand = || -> Result<Decimal, ExecutionError> {
        match &arg {
            None => Err(ExecutionError::invalid_argument_count(1, argc)),
            Some(Operand::Dec(x)) => Ok(*x),
            Some(Operand::Val(v)) => decimal_arg(name, v),
        }
    };
    let overflow = || ExecutionError::function_error(name, "decimal overflow");
    Ok(match op {
        DecOp::Add => DecOut::Dec(d.checked_add(operand()?).ok_or_else(overflow)?),
        DecOp::Sub => DecOut::Dec(d.checked_sub(operand()?).ok_or_else(overflow)?),
        DecOp::Mul => DecOut::Dec(d.checked_mul(operand()?).ok_or_else(overflow)?),
        DecOp::Div => {
            let rhs = operand()?;
            if rhs.is_zero() {
                return Err(ExecutionError::DivisionByZero(Value::Null));
            }
            DecOut::Dec(d.checked_div(rhs).ok_or_else(overflow)?)
        }
        DecOp::Abs => DecOut::Dec(d.abs()),
        DecOp::Neg => DecOut::Dec(-d),
        DecOp::Round => {
            let places = match &arg {
                None => 0,
                Some(Operand::Val(Value::Int(p))) if (0..=28).contains(p) => *p as u32,
                Some(_) => {
                    return Err(ExecutionError::function_error(
                        name,
                        "takes a scale from 0 to 28",
                    ));
                }
            };
            // Banker's rounding would surprise finance; money rounds half away from zero.
            DecOut::Dec(d.round_dp_with_strategy(
                places,
                rust_decimal::RoundingStrategy::MidpointAwayFromZero,
            ))
        }
        DecOp::CompareTo => DecOut::Int(match d.cmp(&operand()?) {
            std::cmp::Ordering::Less => -1,
            std::cmp::Ordering::Equal => 0,
            std::cmp::Ordering::Greater => 1,
        }),
        DecOp::IsLessThan => DecOut::Bool(d < operand()?),
        DecOp::IsLessThanOrEqual => DecOut::Bool(d <= operand()?),
        DecOp::IsGreaterThan => DecOut::Bool(d > operand()?),
        DecOp::IsGreaterThanOrEqual => DecOut::Bool(d >= operand()?),
    })
}

impl DecOut {
    pub(crate) fn into_value(self) -> Value {
        match self {
            DecOut::Dec(d) => decimal_value(d),
            DecOut::Int(i) => Value::Int(i),
            DecOut::Bool(b) => Value::Bool(b),
        }
    }
}

/// Runs a decimal method on CEL values. `None` means the receiver is not a decimal and the call belongs to
/// another type.
pub(crate) fn decimal_method(op: DecOp, this: &Value, args: &[Value]) -> Option<ResolveResult> {
    let d = as_decimal(this)?;
    Some(decimal_apply(op, d, args.first().map(Operand::Val), args.len()).map(DecOut::into_value))
}

fn dispatch(op: DecOp, this: Value, args: Arc<Vec<Value>>) -> ResolveResult {
    match decimal_method(op, &this, &args) {
        Some(result) => result,
        None => method_on_other_type(op, this, &args),
    }
}

/// A decimal method called on something that is not a decimal: a quantity or a semantic version goes to the
/// Kubernetes library, anything else is an error that names the type.
pub(crate) fn method_on_other_type(op: DecOp, this: Value, args: &[Value]) -> ResolveResult {
    let name = op.name();
    if op.decimal_only() {
        return Err(ExecutionError::function_error(
            name,
            format!("is a decimal method, not defined on {}", type_name(&this)),
        ));
    }
    match op {
        // Quantities and versions have no inclusive comparisons in Kubernetes; they are derived from compareTo.
        DecOp::IsLessThanOrEqual | DecOp::IsGreaterThanOrEqual => {
            match delegate_to_kubernetes("compareTo", this, args)? {
                Value::Int(c) => Ok(Value::Bool(if op == DecOp::IsLessThanOrEqual {
                    c <= 0
                } else {
                    c >= 0
                })),
                _ => Err(ExecutionError::function_error(
                    name,
                    "compareTo did not return an int",
                )),
            }
        }
        _ => delegate_to_kubernetes(name, this, args),
    }
}

macro_rules! dispatching_function {
    ($fn_name:ident, $op:expr) => {
        fn $fn_name(This(this): This<Value>, Arguments(args): Arguments) -> ResolveResult {
            dispatch($op, this, args)
        }
    };
}

dispatching_function!(fn_add, DecOp::Add);
dispatching_function!(fn_sub, DecOp::Sub);
dispatching_function!(fn_mul, DecOp::Mul);
dispatching_function!(fn_div, DecOp::Div);
dispatching_function!(fn_abs, DecOp::Abs);
dispatching_function!(fn_neg, DecOp::Neg);
dispatching_function!(fn_round, DecOp::Round);
dispatching_function!(fn_compare_to, DecOp::CompareTo);
dispatching_function!(fn_is_less_than, DecOp::IsLessThan);
dispatching_function!(fn_is_less_than_or_equal, DecOp::IsLessThanOrEqual);
dispatching_function!(fn_is_greater_than, DecOp::IsGreaterThan);
dispatching_function!(fn_is_greater_than_or_equal, DecOp::IsGreaterThanOrEqual);

/// Every function name an expression may call, as registered in [`base_context`]. The reference check refuses
/// any other name at compile time, so a typo is a compile error rather than a rejection of every record.
pub(crate) const FUNCTIONS: &[&str] = &[
    // cel standard library
    "contains",
    "size",
    "max",
    "min",
    "startsWith",
    "endsWith",
    "string",
    "bytes",
    "double",
    "int",
    "uint",
    "optional.none",
    "optional.of",
    "optional.ofNonZeroValue",
    "value",
    "hasValue",
    "or",
    "orValue",
    "matches",
    "duration",
    "timestamp",
    "getFullYear",
    "getMonth",
    "getDayOfYear",
    "getDayOfMonth",
    "getDate",
    "getDayOfWeek",
    "getHours",
    "getMinutes",
    "getSeconds",
    "getMilliseconds",
    // Kubernetes: strings
    "charAt",
    "indexOf",
    "lastIndexOf",
    "lowerAscii",
    "upperAscii",
    "replace",
    "split",
    "substring",
    "trim",
    "join",
    "strings.quote",
    "reverse",
    "format",
    // Kubernetes: lists and sets
    "isSorted",
    "sum",
    "slice",
    "sort",
    "flatten",
    "distinct",
    "first",
    "last",
    "lists.range",
    "sets.contains",
    "sets.equivalent",
    "sets.intersects",
    // Kubernetes: regex, URLs, IPs
    "find",
    "findAll",
    "url",
    "isURL",
    "getScheme",
    "getHost",
    "getHostname",
    "getPort",
    "getEscapedPath",
    "getQuery",
    "ip",
    "isIP",
    "ip.isCanonical",
    "family",
    "isLoopback",
    "isUnspecified",
    "isLinkLocalMulticast",
    "isLinkLocalUnicast",
    "isGlobalUnicast",
    "isIPv4",
    "isIPv6",
    "cidr",
    "isCIDR",
    "containsIP",
    "containsCIDR",
    "prefixLength",
    "masked",
    "isCIDRv4",
    "isCIDRv6",
    // Kubernetes: quantity and semver
    "quantity",
    "isQuantity",
    "isInteger",
    "asInteger",
    "asApproximateFloat",
    "sign",
    "semver",
    "isSemver",
    "major",
    "minor",
    "patch",
    // Kubernetes: math, encoders, formats
    "math.ceil",
    "math.floor",
    "math.round",
    "math.trunc",
    "math.abs",
    "math.sign",
    "math.isInf",
    "math.isNaN",
    "math.isFinite",
    "math.bitAnd",
    "math.bitOr",
    "math.bitXor",
    "math.bitNot",
    "math.bitShiftLeft",
    "math.bitShiftRight",
    "math.sqrt",
    "math.greatest",
    "math.least",
    "base64.decode",
    "base64.encode",
    "jsonpatch.escapeKey",
    "format.dns1123Label",
    "format.dns1123Subdomain",
    "format.dns1035Label",
    "format.dns1035LabelPrefix",
    "format.dns1123LabelPrefix",
    "format.dns1123SubdomainPrefix",
    "format.qualifiedName",
    "format.labelValue",
    "format.uri",
    "format.uuid",
    "format.byte",
    "format.date",
    "format.datetime",
    "format.named",
    "validate",
    // Meshline: decimals (isLessThan, isGreaterThan and compareTo are shared with quantity and semver)
    "decimal",
    "add",
    "sub",
    "mul",
    "div",
    "abs",
    "neg",
    "round",
    "compareTo",
    "isLessThan",
    "isLessThanOrEqual",
    "isGreaterThan",
    "isGreaterThanOrEqual",
];

pub(crate) fn is_function(name: &str) -> bool {
    FUNCTIONS.contains(&name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::cel::cel::Program;

    fn eval(expr: &str) -> ResolveResult {
        Program::compile(expr).unwrap().execute(base_context())
    }

    #[test]
    fn every_catalogued_function_is_registered() {
        for name in FUNCTIONS {
            let result = eval(&format!("{name}()"));
            assert!(
                !matches!(result, Err(ExecutionError::UndeclaredReference(_))),
                "{name} is catalogued but not registered"
            );
        }
    }

    #[test]
    fn decimals_compute_exactly_in_the_cel_library() {
        let cases = [
            (
                r#"decimal("0.1").add(decimal("0.2")) == decimal("0.3")"#,
                true,
            ),
            (
                r#"decimal("12.50").sub(decimal("12.00")).abs().isLessThanOrEqual(decimal("12.00").mul(decimal("0.05")))"#,
                true,
            ),
            (r#"decimal("10").div(3).round(2) == decimal("3.33")"#, true),
            (r#"decimal("2.345").round(2) == decimal("2.35")"#, true),
            (r#"decimal("-1").neg().compareTo(1) == 0"#, true),
            (r#"decimal(5).isGreaterThanOrEqual(decimal("5.00"))"#, true),
            (r#"decimal("1.0") == decimal("1.00")"#, true),
        ];
        for (expr, expected) in cases {
            assert_eq!(eval(expr), Ok(Value::Bool(expected)), "{expr}");
        }
    }

    #[test]
    fn quantity_and_semver_methods_still_work_next_to_decimals() {
        let cases = [
            r#"quantity("1Gi").add(quantity("1Mi")).isGreaterThan(quantity("1Gi"))"#,
            r#"quantity("500m").sub(quantity("100m")).isLessThan(quantity("1"))"#,
            r#"quantity("1").isLessThanOrEqual(quantity("1000m"))"#,
            r#"semver("1.2.3").isLessThan(semver("1.10.0"))"#,
            r#"semver("2.0.0").compareTo(semver("1.0.0")) == 1"#,
        ];
        for expr in cases {
            assert_eq!(eval(expr), Ok(Value::Bool(true)), "{expr}");
        }
    }

    #[test]
    fn decimal_errors_are_errors_not_panics() {
        for expr in [
            r#"decimal("abc")"#,
            r#"decimal("1_000")"#,
            r#"decimal(1.5)"#,
            r#"decimal("1").div(0)"#,
            r#"decimal("79228162514264337593543950335").add(1)"#,
            r#""text".mul(2)"#,
        ] {
            assert!(eval(expr).is_err(), "{expr}");
        }
    }

    #[test]
    fn decimals_are_written_to_json_exactly() {
        let cases = [
            ("12.50", serde_json::json!(12.5)),
            ("100", serde_json::json!(100)),
            ("100.000", serde_json::json!(100)),
            ("-0.05", serde_json::json!(-0.05)),
            ("123456789012.345", serde_json::json!(123456789012.345)),
            (
                "1234567890123.4567",
                serde_json::json!("1234567890123.4567"),
            ),
            (
                "0.1234567890123456",
                serde_json::json!("0.1234567890123456"),
            ),
            (
                "99999999999999999999",
                serde_json::json!("99999999999999999999"),
            ),
        ];
        for (text, expected) in cases {
            let json = decimal_to_json(parse_decimal(text).unwrap());
            assert_eq!(json, expected, "{text}");
            // The printed JSON text is the decimal itself.
            if let serde_json::Value::Number(n) = &json {
                assert_eq!(
                    parse_decimal(&n.to_string()).unwrap(),
                    parse_decimal(text).unwrap(),
                    "{text}"
                );
            }
        }
    }

    #[test]
    fn decimal_text_is_parsed_strictly() {
        for ok in [
            "0",
            "-1",
            "12.50",
            "1e3",
            "1.5E-2",
            "79228162514264337593543950335",
        ] {
            assert!(parse_decimal(ok).is_ok(), "{ok}");
        }
        for (bad, err) in [
            ("", DecimalError::Syntax),
            ("1_000", DecimalError::Syntax),
            ("+1", DecimalError::Syntax),
            (".5", DecimalError::Syntax),
            ("1.", DecimalError::Syntax),
            ("NaN", DecimalError::Syntax),
            ("79228162514264337593543950336", DecimalError::OutOfRange),
            ("1e400", DecimalError::OutOfRange),
            ("1e99999999999", DecimalError::OutOfRange),
        ] {
            assert_eq!(parse_decimal(bad), Err(err), "{bad}");
        }
    }
}
