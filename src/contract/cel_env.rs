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
use kube::core::cel::cel::objects::{Key, Opaque, Value};
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
    let digits = n
        .mantissa()
        .unsigned_abs()
        .checked_ilog10()
        .map_or(1, |l| l + 1);
    if digits <= 15
        && let Ok(f) = n.to_string().parse::<f64>()
        && let Some(number) = serde_json::Number::from_f64(f)
    {
        return serde_json::Value::Number(number);
    }
    serde_json::Value::String(n.to_string())
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
        scope.add_variable_from_value(TARGET_VAR, target);
    }
    for (name, arg) in ARG_VARS.iter().zip(args) {
        scope.add_variable_from_value(*name, arg.clone());
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

/// The arithmetic and comparison methods of `Decimal`, shared by the CEL functions below and the contract
/// evaluator. `None` means the receiver is not a decimal and the call belongs to another type.
pub(crate) fn decimal_method(name: &str, this: &Value, args: &[Value]) -> Option<ResolveResult> {
    let d = as_decimal(this)?;
    let arg = |i: usize| -> Result<Decimal, ExecutionError> {
        let v = args
            .get(i)
            .ok_or_else(|| ExecutionError::invalid_argument_count(i + 1, args.len()))?;
        decimal_arg(name, v)
    };
    let overflow = || ExecutionError::function_error(name, "decimal overflow");
    let result = (|| -> ResolveResult {
        Ok(match name {
            "add" => decimal_value(d.checked_add(arg(0)?).ok_or_else(overflow)?),
            "sub" => decimal_value(d.checked_sub(arg(0)?).ok_or_else(overflow)?),
            "mul" => decimal_value(d.checked_mul(arg(0)?).ok_or_else(overflow)?),
            "div" => {
                let rhs = arg(0)?;
                if rhs.is_zero() {
                    return Err(ExecutionError::DivisionByZero(Value::Null));
                }
                decimal_value(d.checked_div(rhs).ok_or_else(overflow)?)
            }
            "abs" => decimal_value(d.abs()),
            "neg" => decimal_value(-d),
            "round" => {
                let places = match args.first() {
                    None => 0,
                    Some(Value::Int(p)) if (0..=28).contains(p) => *p as u32,
                    Some(_) => {
                        return Err(ExecutionError::function_error(
                            name,
                            "takes a scale from 0 to 28",
                        ));
                    }
                };
                // Banker's rounding would surprise finance; money rounds half away from zero.
                decimal_value(d.round_dp_with_strategy(
                    places,
                    rust_decimal::RoundingStrategy::MidpointAwayFromZero,
                ))
            }
            "compareTo" => Value::Int(match d.cmp(&arg(0)?) {
                std::cmp::Ordering::Less => -1,
                std::cmp::Ordering::Equal => 0,
                std::cmp::Ordering::Greater => 1,
            }),
            "isLessThan" => Value::Bool(d < arg(0)?),
            "isLessThanOrEqual" => Value::Bool(d <= arg(0)?),
            "isGreaterThan" => Value::Bool(d > arg(0)?),
            "isGreaterThanOrEqual" => Value::Bool(d >= arg(0)?),
            _ => {
                return Err(ExecutionError::function_error(
                    name,
                    "is not a decimal method",
                ));
            }
        })
    })();
    Some(result)
}

/// Methods that exist for decimals only: on another receiver they are an error, not a delegation.
const DECIMAL_ONLY: &[&str] = &["mul", "div", "abs", "neg", "round"];

fn dispatch(name: &str, this: Value, args: Arc<Vec<Value>>) -> ResolveResult {
    match decimal_method(name, &this, &args) {
        Some(result) => result,
        None => method_on_other_type(name, this, &args),
    }
}

/// A decimal method name called on something that is not a decimal: a quantity or a semantic version goes to
/// the Kubernetes library, anything else is an error that names the type.
pub(crate) fn method_on_other_type(name: &str, this: Value, args: &[Value]) -> ResolveResult {
    if DECIMAL_ONLY.contains(&name) {
        return Err(ExecutionError::function_error(
            name,
            format!("is a decimal method, not defined on {}", type_name(&this)),
        ));
    }
    match name {
        // Quantities and versions have no inclusive comparisons in Kubernetes; they are derived from compareTo.
        "isLessThanOrEqual" | "isGreaterThanOrEqual" => {
            let ordering = delegate_to_kubernetes("compareTo", this, args)?;
            match ordering {
                Value::Int(c) => Ok(Value::Bool(if name == "isLessThanOrEqual" {
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
    ($fn_name:ident, $name:literal) => {
        fn $fn_name(This(this): This<Value>, Arguments(args): Arguments) -> ResolveResult {
            dispatch($name, this, args)
        }
    };
}

dispatching_function!(fn_add, "add");
dispatching_function!(fn_sub, "sub");
dispatching_function!(fn_mul, "mul");
dispatching_function!(fn_div, "div");
dispatching_function!(fn_abs, "abs");
dispatching_function!(fn_neg, "neg");
dispatching_function!(fn_round, "round");
dispatching_function!(fn_compare_to, "compareTo");
dispatching_function!(fn_is_less_than, "isLessThan");
dispatching_function!(fn_is_less_than_or_equal, "isLessThanOrEqual");
dispatching_function!(fn_is_greater_than, "isGreaterThan");
dispatching_function!(fn_is_greater_than_or_equal, "isGreaterThanOrEqual");

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
