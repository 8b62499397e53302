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
    let mut scanner = Scanner::new(bytes, max_bytes, max_depth)?;
    scanner.skip_ws();
    let value = scanner.value(0).map_err(trim_path)?;
    scanner.finish()?;
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

/// Duplicate-key paths are built with a leading `.`; it is trimmed once, at the top.
pub(crate) fn trim_path(error: ParseError) -> ParseError {
    match error {
        ParseError::DuplicateKey { path, key } => ParseError::DuplicateKey {
            path: path.trim_start_matches('.').to_string(),
            key,
        },
        other => other,
    }
}

/// The lexer under both the tree parser here and the schema-directed reader in `schema`: it reads one token
/// at a time from input that is already known to be within the size limit and valid UTF-8.
pub(crate) struct Scanner<'a> {
    src: &'a str,
    bytes: &'a [u8],
    pos: usize,
    pub(crate) max_depth: usize,
}

/// What a skipped value was, for a message that must not quote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Skipped {
    Null,
    Bool,
    Number,
    String,
    Array(usize),
    Object(usize),
}

impl Skipped {
    pub(crate) fn type_name(self) -> &'static str {
        match self {
            Skipped::Null => "null",
            Skipped::Bool => "boolean",
            Skipped::Number => "number",
            Skipped::String => "string",
            Skipped::Array(_) => "array",
            Skipped::Object(_) => "object",
        }
    }
}

impl<'a> Scanner<'a> {
    /// Refuses oversized and non-UTF-8 input before reading any of it.
    pub(crate) fn new(
        bytes: &'a [u8],
        max_bytes: usize,
        max_depth: usize,
    ) -> Result<Self, ParseError> {
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
        Ok(Scanner {
            src,
            bytes,
            pos: 0,
            max_depth,
        })
    }

    pub(crate) fn syntax(&self, message: &'static str) -> ParseError {
        ParseError::Syntax {
            offset: self.pos,
            message,
        }
    }

    /// Checks that nothing but whitespace follows the value.
    pub(crate) fn finish(&mut self) -> Result<(), ParseError> {
        self.skip_ws();
        if self.pos == self.bytes.len() {
            Ok(())
        } else {
            Err(self.syntax("unexpected characters after the value"))
        }
    }

    pub(crate) fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes.get(self.pos) {
            self.pos += 1;
        }
    }

    pub(crate) fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    /// Consumes `byte` after optional whitespace.
    pub(crate) fn eat(&mut self, byte: u8) -> bool {
        self.skip_ws();
        if self.peek() == Some(byte) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    pub(crate) fn enter(&self, depth: usize) -> Result<(), ParseError> {
        if depth > self.max_depth {
            Err(ParseError::TooDeep {
                limit: self.max_depth,
            })
        } else {
            Ok(())
        }
    }

    /// After a member or an element: `true` for another one (`,`), `false` at the closing bracket.
    pub(crate) fn next_item(&mut self, close: u8) -> Result<bool, ParseError> {
        self.skip_ws();
        match self.peek() {
            Some(b',') => {
                self.pos += 1;
                Ok(true)
            }
            Some(b) if b == close => {
                self.pos += 1;
                Ok(false)
            }
            _ => Err(self.syntax(if close == b'}' {
                "expected ',' or '}'"
            } else {
                "expected ',' or ']'"
            })),
        }
    }

    /// Reads `"<expected>":` if that is the next member's key, exactly (no escapes), and nothing otherwise.
    /// A record usually lists its members in the contract's order, so this is how most keys are read.
    pub(crate) fn key_if(&mut self, expected: &str) -> Option<&'a str> {
        self.skip_ws();
        let start = self.pos + 1;
        let end = start + expected.len();
        // Compared byte by byte: names are short, and a call to memcmp costs more than the loop.
        let matches = |candidate: &[u8]| {
            candidate
                .iter()
                .zip(expected.as_bytes())
                .all(|(a, b)| a == b)
        };
        if self.peek() == Some(b'"')
            && self.bytes.get(end) == Some(&b'"')
            && self.bytes.get(start..end).is_some_and(matches)
        {
            self.pos = end + 1;
            if self.eat(b':') {
                self.skip_ws();
                return Some(&self.src[start..end]);
            }
            // Not a key after all (a syntax error): read it again the long way, which reports it.
            self.pos = start - 1;
        }
        None
    }

    /// Reads `"key":` at the start of an object member.
    pub(crate) fn key(&mut self) -> Result<Cow<'a, str>, ParseError> {
        self.skip_ws();
        if self.peek() != Some(b'"') {
            return Err(self.syntax("expected a string key"));
        }
        let key = self.string()?;
        if !self.eat(b':') {
            return Err(self.syntax("expected ':' after a key"));
        }
        self.skip_ws();
        Ok(key)
    }

    fn value(&mut self, depth: usize) -> Result<Json<'a>, ParseError> {
        match self.peek() {
            None => Err(self.syntax("unexpected end of input")),
            Some(b'{') => self.object(depth + 1),
            Some(b'[') => self.array(depth + 1),
            Some(b'"') => self.string().map(Json::String),
            Some(b't') => self.literal("true").map(|_| Json::Bool(true)),
            Some(b'f') => self.literal("false").map(|_| Json::Bool(false)),
            Some(b'n') => self.literal("null").map(|_| Json::Null),
            Some(b'-' | b'0'..=b'9') => self.number().map(Json::Number),
            Some(_) => Err(self.syntax("expected a value")),
        }
    }

    pub(crate) fn literal(&mut self, word: &'static str) -> Result<(), ParseError> {
        if self.bytes[self.pos..].starts_with(word.as_bytes()) {
            self.pos += word.len();
            Ok(())
        } else {
            Err(self.syntax("expected true, false or null"))
        }
    }

    pub(crate) fn number(&mut self) -> Result<&'a str, ParseError> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(self.syntax("expected a digit")),
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.syntax("expected a digit after the decimal point"));
            }
            self.digits();
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
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

    pub(crate) fn string(&mut self) -> Result<Cow<'a, str>, ParseError> {
        self.pos += 1; // opening quote
        let start = self.pos;
        self.pos = plain_run(self.bytes, self.pos);
        match self.peek() {
            None => return Err(self.syntax("unterminated string")),
            Some(b'"') => {
                let s = &self.src[start..self.pos];
                self.pos += 1;
                return Ok(Cow::Borrowed(s));
            }
            Some(b'\\') => {}
            Some(_) => return Err(self.syntax("control character in string")),
        }
        // Slow path: the string has escapes, so it is copied.
        let mut out = String::with_capacity(self.pos - start + 16);
        out.push_str(&self.src[start..self.pos]);
        loop {
            let run = self.pos;
            self.pos = plain_run(self.bytes, self.pos);
            out.push_str(&self.src[run..self.pos]);
            match self.peek() {
                None => return Err(self.syntax("unterminated string")),
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(Cow::Owned(out));
                }
                Some(b'\\') => {
                    self.pos += 1;
                    let escaped = match self.peek() {
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
        self.enter(depth)?;
        self.pos += 1;
        let mut items = Vec::new();
        if self.eat(b']') {
            return Ok(Json::Array(items));
        }
        loop {
            self.skip_ws();
            let item = self
                .value(depth)
                .map_err(|e| prefix_path(e, &format!("[{}]", items.len())))?;
            items.push(item);
            if !self.next_item(b']')? {
                return Ok(Json::Array(items));
            }
        }
    }

    fn object(&mut self, depth: usize) -> Result<Json<'a>, ParseError> {
        self.enter(depth)?;
        self.pos += 1;
        let mut members: Vec<(Cow<'a, str>, Json<'a>)> = Vec::with_capacity(8);
        if self.eat(b'}') {
            return Ok(Json::Object(members));
        }
        loop {
            let key = self.key()?;
            let value = self
                .value(depth)
                .map_err(|e| prefix_path(e, &member_segment(&key)))?;
            members.push((key, value));
            if !self.next_item(b'}')? {
                if let Some(key) = duplicate_key(members.iter().map(|(k, _)| k.as_ref())) {
                    return Err(ParseError::DuplicateKey {
                        path: String::new(),
                        key,
                    });
                }
                return Ok(Json::Object(members));
            }
        }
    }

    /// Reads past one value without building it, with the same checks as parsing it (syntax, depth,
    /// duplicate keys), and says what it was.
    pub(crate) fn skip_value(&mut self, depth: usize) -> Result<Skipped, ParseError> {
        match self.peek() {
            None => Err(self.syntax("unexpected end of input")),
            Some(b'{') => {
                self.enter(depth + 1)?;
                self.pos += 1;
                let mut keys = KeySet::default();
                if self.eat(b'}') {
                    return Ok(Skipped::Object(0));
                }
                loop {
                    let key = self.key()?;
                    self.skip_value(depth + 1)
                        .map_err(|e| prefix_path(e, &member_segment(&key)))?;
                    if let Some(key) = keys.insert(key) {
                        return Err(ParseError::DuplicateKey {
                            path: String::new(),
                            key,
                        });
                    }
                    if !self.next_item(b'}')? {
                        return Ok(Skipped::Object(keys.len()));
                    }
                }
            }
            Some(b'[') => {
                self.enter(depth + 1)?;
                self.pos += 1;
                let mut n = 0;
                if self.eat(b']') {
                    return Ok(Skipped::Array(0));
                }
                loop {
                    self.skip_ws();
                    self.skip_value(depth + 1)
                        .map_err(|e| prefix_path(e, &format!("[{n}]")))?;
                    n += 1;
                    if !self.next_item(b']')? {
                        return Ok(Skipped::Array(n));
                    }
                }
            }
            Some(b'"') => self.string().map(|_| Skipped::String),
            Some(b't') => self.literal("true").map(|_| Skipped::Bool),
            Some(b'f') => self.literal("false").map(|_| Skipped::Bool),
            Some(b'n') => self.literal("null").map(|_| Skipped::Null),
            Some(b'-' | b'0'..=b'9') => self.number().map(|_| Skipped::Number),
            Some(_) => Err(self.syntax("expected a value")),
        }
    }
}

/// The end of the run of bytes that need no attention inside a string: stops at `"`, `\\` or a control
/// character. Eight bytes are tested at a time; this loop is most of the cost of reading a record.
fn plain_run(bytes: &[u8], mut i: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    while let Some(chunk) = bytes.get(i..i + 8) {
        let w = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        let quote = w ^ (ONES * u64::from(b'"'));
        let backslash = w ^ (ONES * u64::from(b'\\'));
        // A byte is flagged when it is zero after the xor (a quote or a backslash) or below 0x20; the lowest
        // flag is always a true match, which is the only one used.
        let flags = (quote.wrapping_sub(ONES) & !quote
            | backslash.wrapping_sub(ONES) & !backslash
            | w.wrapping_sub(ONES * 0x20) & !w)
            & HIGH;
        if flags != 0 {
            return i + (flags.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    // The last few bytes of the input (a string is almost never this close to the end).
    while let Some(&b) = bytes.get(i) {
        if b == b'"' || b == b'\\' || b < 0x20 {
            break;
        }
        i += 1;
    }
    i
}

/// The keys seen in one object, for duplicate detection. The first few are kept inline and searched
/// linearly; past that they move into a hash set, so a hostile record with many keys stays linear.
#[derive(Default)]
pub(crate) struct KeySet<'a> {
    inline: [Cow<'a, str>; 8],
    len: usize,
    large: Option<HashSet<Cow<'a, str>>>,
}

impl<'a> KeySet<'a> {
    /// Adds `key`; returns it back if it was already there.
    pub(crate) fn insert(&mut self, key: Cow<'a, str>) -> Option<String> {
        if let Some(set) = &mut self.large {
            if set.contains(&key) {
                return Some(key.into_owned());
            }
            set.insert(key);
            self.len += 1;
            return None;
        }
        if self.inline[..self.len].contains(&key) {
            return Some(key.into_owned());
        }
        if self.len < self.inline.len() {
            self.inline[self.len] = key;
        } else {
            let mut set: HashSet<Cow<'a, str>> =
                self.inline.iter_mut().map(std::mem::take).collect();
            set.insert(key);
            self.large = Some(set);
        }
        self.len += 1;
        None
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

pub(crate) fn member_segment(key: &str) -> String {
    if !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        format!(".{key}")
    } else {
        format!("[{key:?}]")
    }
}

/// Duplicate-key errors are built bottom-up: each enclosing level prepends its segment on the way out, so the
/// path costs nothing unless a duplicate is found.
pub(crate) fn prefix_path(error: ParseError, segment: &str) -> ParseError {
    match error {
        ParseError::DuplicateKey { path, key } => ParseError::DuplicateKey {
            path: format!("{segment}{path}"),
            key,
        },
        other => other,
    }
}

fn duplicate_key<'k>(keys: impl Iterator<Item = &'k str>) -> Option<String> {
    let mut set = KeySet::default();
    for key in keys {
        if let Some(dup) = set.insert(Cow::Borrowed(key)) {
            return Some(dup);
        }
    }
    None
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
