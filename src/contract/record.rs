//! Bounded parsing of raw record bytes into a borrowed JSON tree.
//!
//! This module owns the first contact with untrusted input. It refuses, before allocating in proportion to
//! anything but the input it was given: records over the size limit, invalid UTF-8, nesting deeper than the
//! limit, malformed JSON and duplicate object keys (two readers could disagree on which value wins). Numbers are
//! kept as their source text, so a decimal amount is never rounded through an `f64`; the schema decides later
//! whether a number is an integer or a decimal and whether it is in range. It knows nothing about contracts.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

/// A parsed JSON value that borrows its strings and numbers from the input where it can.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Json<'a> {
    Null,
    Bool(bool),
    /// The number's source text, already checked against the JSON grammar.
    Number(&'a str),
    String(Cow<'a, str>),
    Array(Vec<Json<'a>>),
    Object(Vec<(Cow<'a, str>, Json<'a>)>),
}

impl Json<'_> {
    pub(crate) fn type_name(&self) -> &'static str {
        match self {
            Json::Null => "null",
            Json::Bool(_) => "boolean",
            Json::Number(_) => "number",
            Json::String(_) => "string",
            Json::Array(_) => "array",
            Json::Object(_) => "object",
        }
    }
}

/// Why a record could not be read as a JSON object. Messages name positions and keys, never values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    TooLarge {
        size: usize,
        limit: usize,
    },
    InvalidUtf8 {
        offset: usize,
    },
    TooDeep {
        limit: usize,
    },
    Syntax {
        offset: usize,
        message: &'static str,
    },
    DuplicateKey {
        path: String,
        key: String,
    },
    NotAnObject {
        found: &'static str,
    },
}

impl ParseError {
    /// Stable label for metrics, dead-letter reasons and tickets.
    pub fn label(&self) -> &'static str {
        match self {
            ParseError::TooLarge { .. } => "record_too_large",
            ParseError::InvalidUtf8 { .. } => "invalid_utf8",
            ParseError::TooDeep { .. } => "nesting_too_deep",
            ParseError::Syntax { .. } => "invalid_json",
            ParseError::DuplicateKey { .. } => "duplicate_key",
            ParseError::NotAnObject { .. } => "not_an_object",
        }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::TooLarge { size, limit } => {
                write!(f, "record is {size} bytes, over the limit of {limit} bytes")
            }
            ParseError::InvalidUtf8 { offset } => {
                write!(f, "record is not valid UTF-8 (at byte {offset})")
            }
            ParseError::TooDeep { limit } => write!(f, "record nests deeper than {limit} levels"),
            ParseError::Syntax { offset, message } => {
                write!(f, "record is not valid JSON at byte {offset}: {message}")
            }
            ParseError::DuplicateKey { path, key } => {
                if path.is_empty() {
                    write!(f, "record has the key {key:?} twice")
                } else {
                    write!(f, "record has the key {key:?} twice in {path}")
                }
            }
            ParseError::NotAnObject { found } => {
                write!(f, "record must be a JSON object, found {found}")
            }
        }
    }
}

impl std::error::Error for ParseError {}

/// Parses `bytes` as one JSON value of any type, within `max_bytes` and `max_depth`.
pub(crate) fn parse_value(
    bytes: &[u8],
    max_bytes: usize,
    max_depth: usize,
) -> Result<Json<'_>, ParseError> {
    if bytes.len() > max_bytes {
        // Checked before looking at the content, so a huge record costs nothing but this comparison.
        return Err(ParseError::TooLarge {
            size: bytes.len(),
            limit: max_bytes,
        });
    }
    let src = std::str::from_utf8(bytes).map_err(|e| ParseError::InvalidUtf8 {
        offset: e.valid_up_to(),
    })?;
    let mut parser = Parser {
        src,
        bytes,
        pos: 0,
        max_depth,
    };
    parser.skip_ws();
    let value = parser.value(0).map_err(|e| match e {
        ParseError::DuplicateKey { path, key } => ParseError::DuplicateKey {
            path: path.trim_start_matches('.').to_string(),
            key,
        },
        other => other,
    })?;
    parser.skip_ws();
    if parser.pos != bytes.len() {
        return Err(parser.syntax("unexpected characters after the value"));
    }
    Ok(value)
}

/// Parses `bytes` as a record: a JSON object.
pub(crate) fn parse_record(
    bytes: &[u8],
    max_bytes: usize,
    max_depth: usize,
) -> Result<Json<'_>, ParseError> {
    let value = parse_value(bytes, max_bytes, max_depth)?;
    match value {
        Json::Object(_) => Ok(value),
        other => Err(ParseError::NotAnObject {
            found: other.type_name(),
        }),
    }
}

struct Parser<'a> {
    src: &'a str,
    bytes: &'a [u8],
    pos: usize,
    max_depth: usize,
}

impl<'a> Parser<'a> {
    fn syntax(&self, message: &'static str) -> ParseError {
        ParseError::Syntax {
            offset: self.pos,
            message,
        }
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes.get(self.pos) {
            self.pos += 1;
        }
    }

    fn value(&mut self, depth: usize) -> Result<Json<'a>, ParseError> {
        match self.bytes.get(self.pos) {
            None => Err(self.syntax("unexpected end of input")),
            Some(b'{') => self.object(depth + 1),
            Some(b'[') => self.array(depth + 1),
            Some(b'"') => self.string().map(Json::String),
            Some(b't') => self.literal("true", Json::Bool(true)),
            Some(b'f') => self.literal("false", Json::Bool(false)),
            Some(b'n') => self.literal("null", Json::Null),
            Some(b'-' | b'0'..=b'9') => self.number().map(Json::Number),
            Some(_) => Err(self.syntax("expected a value")),
        }
    }

    fn literal(&mut self, word: &'static str, value: Json<'a>) -> Result<Json<'a>, ParseError> {
        if self.bytes[self.pos..].starts_with(word.as_bytes()) {
            self.pos += word.len();
            Ok(value)
        } else {
            Err(self.syntax("expected true, false or null"))
        }
    }

    fn number(&mut self) -> Result<&'a str, ParseError> {
        let start = self.pos;
        if self.bytes[self.pos] == b'-' {
            self.pos += 1;
        }
        match self.bytes.get(self.pos) {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(self.syntax("expected a digit")),
        }
        if self.bytes.get(self.pos) == Some(&b'.') {
            self.pos += 1;
            if !matches!(self.bytes.get(self.pos), Some(b'0'..=b'9')) {
                return Err(self.syntax("expected a digit after the decimal point"));
            }
            self.digits();
        }
        if let Some(b'e' | b'E') = self.bytes.get(self.pos) {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.bytes.get(self.pos) {
                self.pos += 1;
            }
            if !matches!(self.bytes.get(self.pos), Some(b'0'..=b'9')) {
                return Err(self.syntax("expected a digit in the exponent"));
            }
            self.digits();
        }
        Ok(&self.src[start..self.pos])
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.bytes.get(self.pos) {
            self.pos += 1;
        }
    }

    fn string(&mut self) -> Result<Cow<'a, str>, ParseError> {
        self.pos += 1; // opening quote
        let start = self.pos;
        loop {
            match self.bytes.get(self.pos) {
                None => return Err(self.syntax("unterminated string")),
                Some(b'"') => {
                    let s = &self.src[start..self.pos];
                    self.pos += 1;
                    return Ok(Cow::Borrowed(s));
                }
                Some(b'\\') => break,
                Some(0..=0x1f) => return Err(self.syntax("control character in string")),
                Some(_) => self.pos += 1,
            }
        }
        // Slow path: the string has escapes, so it is copied.
        let mut out = String::with_capacity(self.pos - start + 16);
        out.push_str(&self.src[start..self.pos]);
        loop {
            let run = self.pos;
            while let Some(&b) = self.bytes.get(self.pos) {
                if b == b'"' || b == b'\\' || b < 0x20 {
                    break;
                }
                self.pos += 1;
            }
            out.push_str(&self.src[run..self.pos]);
            match self.bytes.get(self.pos) {
                None => return Err(self.syntax("unterminated string")),
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(Cow::Owned(out));
                }
                Some(b'\\') => {
                    self.pos += 1;
                    let escaped = match self.bytes.get(self.pos) {
                        Some(b'"') => '"',
                        Some(b'\\') => '\\',
                        Some(b'/') => '/',
                        Some(b'b') => '\u{8}',
                        Some(b'f') => '\u{c}',
                        Some(b'n') => '\n',
                        Some(b'r') => '\r',
                        Some(b't') => '\t',
                        Some(b'u') => {
                            self.pos += 1;
                            let c = self.unicode_escape()?;
                            out.push(c);
                            continue;
                        }
                        _ => return Err(self.syntax("invalid escape")),
                    };
                    self.pos += 1;
                    out.push(escaped);
                }
                Some(_) => return Err(self.syntax("control character in string")),
            }
        }
    }

    /// Reads the four hex digits after `\u` (and a low surrogate after a high one).
    fn unicode_escape(&mut self) -> Result<char, ParseError> {
        let first = self.hex4()?;
        let code = match first {
            0xD800..=0xDBFF => {
                if self.bytes.get(self.pos) != Some(&b'\\')
                    || self.bytes.get(self.pos + 1) != Some(&b'u')
                {
                    return Err(self.syntax("unpaired surrogate in \\u escape"));
                }
                self.pos += 2;
                let second = self.hex4()?;
                if !(0xDC00..=0xDFFF).contains(&second) {
                    return Err(self.syntax("unpaired surrogate in \\u escape"));
                }
                0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00)
            }
            0xDC00..=0xDFFF => return Err(self.syntax("unpaired surrogate in \\u escape")),
            c => c,
        };
        char::from_u32(code).ok_or_else(|| self.syntax("invalid \\u escape"))
    }

    fn hex4(&mut self) -> Result<u32, ParseError> {
        let digits = self
            .bytes
            .get(self.pos..self.pos + 4)
            .ok_or_else(|| self.syntax("truncated \\u escape"))?;
        let mut code = 0u32;
        for &d in digits {
            let v = (d as char)
                .to_digit(16)
                .ok_or_else(|| self.syntax("invalid hex digit in \\u escape"))?;
            code = code * 16 + v;
        }
        self.pos += 4;
        Ok(code)
    }

    fn array(&mut self, depth: usize) -> Result<Json<'a>, ParseError> {
        if depth > self.max_depth {
            return Err(ParseError::TooDeep {
                limit: self.max_depth,
            });
        }
        self.pos += 1;
        let mut items = Vec::new();
        self.skip_ws();
        if self.bytes.get(self.pos) == Some(&b']') {
            self.pos += 1;
            return Ok(Json::Array(items));
        }
        loop {
            self.skip_ws();
            let item = self
                .value(depth)
                .map_err(|e| prefix_path(e, &format!("[{}]", items.len())))?;
            items.push(item);
            self.skip_ws();
            match self.bytes.get(self.pos) {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(Json::Array(items));
                }
                _ => return Err(self.syntax("expected ',' or ']'")),
            }
        }
    }

    fn object(&mut self, depth: usize) -> Result<Json<'a>, ParseError> {
        if depth > self.max_depth {
            return Err(ParseError::TooDeep {
                limit: self.max_depth,
            });
        }
        self.pos += 1;
        let mut members: Vec<(Cow<'a, str>, Json<'a>)> = Vec::new();
        self.skip_ws();
        if self.bytes.get(self.pos) == Some(&b'}') {
            self.pos += 1;
            return Ok(Json::Object(members));
        }
        loop {
            self.skip_ws();
            if self.bytes.get(self.pos) != Some(&b'"') {
                return Err(self.syntax("expected a string key"));
            }
            let key = self.string()?;
            self.skip_ws();
            if self.bytes.get(self.pos) != Some(&b':') {
                return Err(self.syntax("expected ':' after a key"));
            }
            self.pos += 1;
            self.skip_ws();
            let value = self
                .value(depth)
                .map_err(|e| prefix_path(e, &member_segment(&key)))?;
            members.push((key, value));
            self.skip_ws();
            match self.bytes.get(self.pos) {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    if let Some(key) = duplicate_key(&members) {
                        return Err(ParseError::DuplicateKey {
                            path: String::new(),
                            key,
                        });
                    }
                    return Ok(Json::Object(members));
                }
                _ => return Err(self.syntax("expected ',' or '}'")),
            }
        }
    }
}

fn member_segment(key: &str) -> String {
    if !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        format!(".{key}")
    } else {
        format!("[{key:?}]")
    }
}

/// Duplicate-key errors are built bottom-up: each enclosing level prepends its segment on the way out, so the
/// path costs nothing unless a duplicate is found. The leading `.` is trimmed once, at the top.
fn prefix_path(error: ParseError, segment: &str) -> ParseError {
    match error {
        ParseError::DuplicateKey { path, key } => ParseError::DuplicateKey {
            path: format!("{segment}{path}"),
            key,
        },
        other => other,
    }
}

fn duplicate_key(members: &[(Cow<'_, str>, Json<'_>)]) -> Option<String> {
    // Small objects (the common case) are checked pairwise; large ones with a set, so a hostile record with
    // many keys stays linear.
    if members.len() <= 16 {
        for (i, (key, _)) in members.iter().enumerate() {
            if members[..i].iter().any(|(other, _)| other == key) {
                return Some(key.to_string());
            }
        }
        None
    } else {
        let mut seen = HashSet::with_capacity(members.len());
        members
            .iter()
            .find(|(key, _)| !seen.insert(key.as_ref()))
            .map(|(key, _)| key.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: usize = 1 << 20;

    fn parse(s: &str) -> Result<Json<'_>, ParseError> {
        parse_record(s.as_bytes(), MB, 64)
    }

    #[test]
    fn numbers_keep_their_source_text() {
        let json =
            parse(r#"{"amount": 12.50, "big": 123456789012345678901234567890, "e": -1.5E+3}"#)
                .unwrap();
        let Json::Object(members) = json else {
            panic!("not an object")
        };
        assert_eq!(members[0].1, Json::Number("12.50"));
        assert_eq!(members[1].1, Json::Number("123456789012345678901234567890"));
        assert_eq!(members[2].1, Json::Number("-1.5E+3"));
    }

    #[test]
    fn strings_borrow_unless_escaped() {
        let json = parse(r#"{"a": "plain", "b": "tab\there \u00e9 \ud83d\ude00"}"#).unwrap();
        let Json::Object(members) = json else {
            panic!("not an object")
        };
        assert!(matches!(
            &members[0].1,
            Json::String(Cow::Borrowed("plain"))
        ));
        assert_eq!(
            members[1].1,
            Json::String(Cow::Owned("tab\there é 😀".into()))
        );
    }

    #[test]
    fn malformed_inputs_are_rejected_with_a_label() {
        let cases: &[(&[u8], &str)] = &[
            (b"[1,2]", "not_an_object"),
            (b"\"text\"", "not_an_object"),
            (b"42", "not_an_object"),
            (b"null", "not_an_object"),
            (b"", "invalid_json"),
            (b"{", "invalid_json"),
            (b"{\"a\":}", "invalid_json"),
            (b"{\"a\":1,}", "invalid_json"),
            (b"{\"a\":01}", "invalid_json"),
            (b"{\"a\":1.}", "invalid_json"),
            (b"{\"a\":-}", "invalid_json"),
            (b"{\"a\":1e}", "invalid_json"),
            (b"{\"a\":tru}", "invalid_json"),
            (b"{\"a\":\"x\ny\"}", "invalid_json"),
            (b"{\"a\":\"\\x\"}", "invalid_json"),
            (b"{\"a\":\"\\ud800\"}", "invalid_json"),
            (b"{\"a\":\"\\udc00\"}", "invalid_json"),
            (b"{\"a\":1} x", "invalid_json"),
            (b"{a:1}", "invalid_json"),
            (b"{\"a\":\"\xff\"}", "invalid_utf8"),
            (b"{\"a\":1,\"a\":2}", "duplicate_key"),
        ];
        for (input, label) in cases {
            let err = parse_record(input, MB, 64).expect_err(&String::from_utf8_lossy(input));
            assert_eq!(err.label(), *label, "{}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn duplicate_keys_are_found_at_any_depth_and_width() {
        let err = parse(r#"{"lineItems": [{"sku": "a"}, {"sku": "b", "sku": "c"}]}"#).unwrap_err();
        assert_eq!(
            err,
            ParseError::DuplicateKey {
                path: "lineItems[1]".into(),
                key: "sku".into()
            }
        );
        let mut wide = String::from("{");
        for i in 0..1000 {
            wide.push_str(&format!("\"k{i}\":{i},"));
        }
        wide.push_str("\"k500\":0}");
        assert_eq!(parse(&wide).unwrap_err().label(), "duplicate_key");
    }

    #[test]
    fn oversized_records_are_refused_before_parsing() {
        let big = vec![b' '; MB + 1];
        assert_eq!(
            parse_record(&big, MB, 64).unwrap_err(),
            ParseError::TooLarge {
                size: MB + 1,
                limit: MB
            }
        );
    }

    #[test]
    fn deep_nesting_is_refused_without_recursing_past_the_limit() {
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(parse(&deep).unwrap_err(), ParseError::TooDeep { limit: 64 });
        let ok = format!("{{\"a\":{}{}}}", "[".repeat(63), "]".repeat(63));
        assert!(parse(&ok).is_ok());
    }
}
